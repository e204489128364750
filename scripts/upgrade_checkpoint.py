"""Rewrite a format-1 checkpoint (pickled numpy RNG state) as format 2, which loads with weights_only=True.

A format-1 file is read with weights_only=True, allowing only the numpy types its RNG state holds (no code runs):
    python scripts/upgrade_checkpoint.py <run dir>/checkpoints/last.pt [more.pt ...]
The old file is kept next to the new one as <name>.format1.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from mamlib.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint


def plain_rng(rng: dict) -> dict:
    """The format-1 RNG states (Python tuples, a numpy array) as format 2 stores them (see mamlib.runtime.rng_state)."""
    version, words, gauss = rng["python"]
    kind, keys, position, has_gauss, cached = rng["numpy"]
    return {**rng, "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


# what a format-1 numpy RNG state (a uint32 array) unpickles to; nothing else is allowed
NUMPY_RNG_GLOBALS = [getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct, np.ndarray, np.dtype,
                     type(np.dtype(np.uint32))]


def upgrade(path: Path) -> None:
    with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
        payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format_version") != 1:
        raise SystemExit(f"{path}: format {payload.get('format_version')}, not 1; nothing to do")
    payload.pop("format_version")
    if "rng" in payload:
        payload["rng"] = plain_rng(payload["rng"])
    shutil.copy2(path, path.with_name(path.name + ".format1"))
    save_checkpoint(path, payload)
    load_checkpoint(path)  # proves it now loads safely
    print(f"{path}: upgraded to format {FORMAT_VERSION}")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        upgrade(Path(name))
