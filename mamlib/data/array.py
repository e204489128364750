"""A user's own discrete data: a ``.npy`` matrix (N, D) of class indices 0..K-1, shuffled and split."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..files import read_npy
from .base import DiscreteDataset, tensor_dataset


def resolve_array_path(path, data_dir: Path) -> Path:
    """``path`` as given (absolute or relative to the working directory), else relative to ``data_dir``."""
    if path is None or str(path) in ("", "None", "null", "???"):
        raise ValueError("dataset=array needs dataset.path=<file.npy> holding an (N, D) integer matrix")
    candidate = Path(str(path)).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    return data_dir / candidate


def load_array(data_dir: Path, path, K, val_fraction: float = 0.1, test_fraction: float = 0.1,
               seed: int = 0) -> DiscreteDataset:
    file = resolve_array_path(path, data_dir)
    if not file.exists():
        raise FileNotFoundError(f"dataset=array: {path} not found (looked at {file}); give an existing .npy file")
    if K is None or str(K) in ("None", "null", "???"):
        raise ValueError("dataset=array needs dataset.K = the number of classes (values must be 0..K-1)")
    num_classes = int(K)
    if num_classes < 2:
        raise ValueError(f"dataset.K must be >= 2, got {K}")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= float(fraction) < 1:
            raise ValueError(f"dataset.{name} must be in [0, 1), got {fraction}")
    if float(val_fraction) + float(test_fraction) >= 1:
        raise ValueError(f"val_fraction + test_fraction = {float(val_fraction) + float(test_fraction)} leaves no "
                         "training rows; make their sum < 1")
    array = read_npy(file, "dataset.path")
    if array.ndim != 2:
        raise ValueError(f"{file} has shape {array.shape}; dataset=array needs a 2-D (N, D) matrix, one row per example "
                         "(flatten images with array.reshape(len(array), -1))")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{file} has dtype {array.dtype}; dataset=array needs integer class indices 0..K-1 "
                         "(convert with array.astype(np.int64) if the values are whole numbers)")
    if array.size == 0:
        raise ValueError(f"{file} is empty (shape {array.shape})")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{file} holds values {low}..{high} but K={num_classes} allows only 0..{num_classes - 1}; "
                         "fix dataset.K or the data (missing values are not allowed in training data)")
    n = len(array)
    n_val = int(round(float(val_fraction) * n))
    n_test = int(round(float(test_fraction) * n))
    n_train = n - n_val - n_test
    if n_train < 1 or (float(val_fraction) > 0 and n_val < 1) or (float(test_fraction) > 0 and n_test < 1):
        raise ValueError(f"{file} has only {n} rows: too few for val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    # int64 bytes + shape: the same values give the same fingerprint whatever dtype they were saved with
    fingerprint = hashlib.sha256(f"{array.shape}".encode() + np.ascontiguousarray(array, dtype=np.int64).tobytes()).hexdigest()
    order = np.random.Generator(np.random.PCG64(int(seed))).permutation(n)
    shuffled = array[order]
    return DiscreteDataset(name="array", kind="array", num_classes=num_classes, num_positions=array.shape[1],
                           train=tensor_dataset(shuffled[:n_train]),
                           val=tensor_dataset(shuffled[n_train:n_train + n_val]),
                           test=tensor_dataset(shuffled[n_train + n_val:]), data_sha256=fingerprint)
