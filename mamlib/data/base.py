"""The dataset container shared by every loader, an in-memory row dataset and cache-file helpers.

Values follow the library convention (mamlib/orders.py): every dataset item is a LongTensor (D,) with
values 0..K-1; in user-facing rows -1 marks a missing position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

# one atomic writer for the whole project (mamlib/files.py), re-exported for the loaders
from ..files import save_npy_atomic, save_npz_atomic, write_json_atomic, write_text_atomic  # noqa: F401

MISSING = -1
MISSING_TEXT = "_"          # how a missing position is shown in decoded text
MISSING_MOLECULE = "[?]"    # ... and in decoded molecules (never a SMILES character or SELFIES symbol)
KINDS = ("image", "text", "molecule", "array")


class RowDataset(Dataset):
    """Rows of an in-memory integer matrix (N, D); item i is row i as a LongTensor (D,).

    ``data`` keeps the compact storage (uint8 when values fit) so that large corpora stay small;
    ``all_rows()`` returns the whole matrix as int64 for evaluation code that wants everything at once.
    """

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return self.data[index].long()

    def __getitems__(self, indices) -> list[torch.Tensor]:
        # DataLoader fetches a whole batch with one indexing operation through this hook.
        return list(self.data[torch.as_tensor(indices, dtype=torch.long)].long())

    def all_rows(self) -> torch.Tensor:
        return self.data.long()


def tensor_dataset(x) -> RowDataset:
    """Dataset over the rows of a 2-D integer array or tensor (values >= 0), stored as uint8 when they fit."""
    tensor = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    if tensor.dim() != 2:
        raise ValueError(f"tensor_dataset needs a 2-D (N, D) array, got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"tensor_dataset needs integer values 0..K-1, got dtype {tensor.dtype}; "
                         "convert with .astype(np.int64) after checking the values are whole numbers")
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError("tensor_dataset rows must hold class indices >= 0 (missing values are not allowed in data)")
    if tensor.dtype != torch.uint8:
        fits_uint8 = tensor.numel() == 0 or int(tensor.max()) <= 255
        tensor = tensor.to(torch.uint8 if fits_uint8 else torch.int64)
    return RowDataset(tensor)


@dataclass
class DiscreteDataset:
    """A discrete dataset: ``train/val/test`` items are LongTensor (D,) with values 0..K-1."""

    name: str
    kind: str
    num_classes: int
    num_positions: int
    train: Dataset
    val: Dataset
    test: Dataset
    alphabet: list[str] | None = None
    image_shape: tuple[int, int] | None = None
    padding_symbol: str | None = None
    data_sha256: str | None = None   # hash of a user's token array: the same name, K and D may hold other data

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"dataset kind must be one of {KINDS}, got {self.kind!r}")
        if self.alphabet is not None and len(self.alphabet) != self.num_classes:
            raise ValueError(f"alphabet has {len(self.alphabet)} symbols but num_classes={self.num_classes}")
        if self.padding_symbol is not None and (self.alphabet is None or self.padding_symbol not in self.alphabet):
            raise ValueError(f"padding symbol {self.padding_symbol!r} is not in the alphabet")
        self._symbol_index = {s: i for i, s in enumerate(self.alphabet)} if self.alphabet is not None else None

    # ------------------------------------------------------------------ decoding
    def decode(self, tokens) -> str:
        """One row of ints (-1 = missing) -> string.

        text: one character per position, missing -> '_'; molecules: symbols joined, padding dropped,
        missing -> '[?]'; images: one line per image row ('.' = 0, '#' = 1, '?' = missing, digits when K > 2);
        arrays: space-separated ints with '?' for missing.
        """
        row = np.asarray(tokens.detach().cpu() if torch.is_tensor(tokens) else tokens)
        if row.ndim != 1:
            raise ValueError(f"decode takes one row of shape (D,), got shape {row.shape}; "
                             "decode a batch with [dataset.decode(r) for r in rows]")
        if row.size and not np.issubdtype(row.dtype, np.integer):
            if not np.all(np.mod(row, 1) == 0):
                raise ValueError("decode needs integer tokens, got non-integral values")
            row = row.astype(np.int64)
        bad = (row < MISSING) | (row >= self.num_classes)
        if bad.any():
            raise ValueError(f"token {int(row[bad][0])} is outside 0..{self.num_classes - 1} (and -1 for missing)")
        if self.kind == "text":
            return "".join(MISSING_TEXT if t == MISSING else self.alphabet[t] for t in row.tolist())
        if self.kind == "molecule":
            return "".join(MISSING_MOLECULE if t == MISSING else
                           ("" if self.alphabet[t] == self.padding_symbol else self.alphabet[t]) for t in row.tolist())
        if self.kind == "image" and self.image_shape is not None:
            height, width = self.image_shape
            if row.size != height * width:
                raise ValueError(f"an image row must have {height * width} values, got {row.size}")
            if self.num_classes == 2:
                cell = {MISSING: "?", 0: ".", 1: "#"}
                lines = ["".join(cell[t] for t in line) for line in row.reshape(height, width).tolist()]
            else:
                lines = [" ".join("?" if t == MISSING else str(t) for t in line)
                         for line in row.reshape(height, width).tolist()]
            return "\n".join(lines)
        return " ".join("?" if t == MISSING else str(t) for t in row.tolist())

    # ------------------------------------------------------------------ encoding
    def encode(self, string: str) -> np.ndarray:
        """String -> int64 row of length D.

        text: one character per position, '_' -> -1 (missing); a shorter string fills the first positions
        and the rest are missing (-1), i.e. a prompt. Molecules: SMILES per character, SELFIES per symbol
        ('[?]' -> -1 in both); the rest is filled with the padding symbol.
        """
        if self.kind not in ("text", "molecule"):
            raise ValueError(f"encode works for text and molecule datasets; {self.name!r} is of kind {self.kind!r}")
        if not isinstance(string, str):
            raise TypeError(f"encode takes a str, got {type(string).__name__}")
        if self.kind == "text":
            symbols = list(string)
            fill = MISSING
        elif self.padding_symbol == "[nop]":
            symbols = _split_selfies(string)
            fill = self._symbol_index[self.padding_symbol]
        else:
            symbols = _split_smiles(string)
            fill = self._symbol_index[self.padding_symbol]
        if len(symbols) > self.num_positions:
            raise ValueError(f"{string!r} has {len(symbols)} symbols but dataset {self.name!r} has only "
                             f"D={self.num_positions} positions; shorten it (or use a larger max_len/seq_len)")
        row = np.full(self.num_positions, fill, dtype=np.int64)
        missing = MISSING_TEXT if self.kind == "text" else MISSING_MOLECULE
        for position, symbol in enumerate(symbols):
            if symbol == missing:
                row[position] = MISSING
                continue
            index = self._symbol_index.get(symbol)
            if index is None:
                raise ValueError(f"symbol {symbol!r} at position {position} of {string!r} is not in the alphabet "
                                 f"of {self.name!r}: {self.alphabet}")
            row[position] = index
        return row

    def describe(self) -> dict:
        """What a model trained on this dataset depends on; stored in checkpoints to check stage compatibility."""
        info = {"name": self.name, "kind": self.kind, "K": int(self.num_classes), "D": int(self.num_positions),
                "alphabet": list(self.alphabet) if self.alphabet is not None else None}
        return info if self.data_sha256 is None else {**info, "data_sha256": self.data_sha256}


def _split_smiles(string: str) -> list[str]:
    """SMILES per character, except the missing marker '[?]' which stays one symbol."""
    symbols, i = [], 0
    while i < len(string):
        if string.startswith(MISSING_MOLECULE, i):
            symbols.append(MISSING_MOLECULE)
            i += len(MISSING_MOLECULE)
        else:
            symbols.append(string[i])
            i += 1
    return symbols


def _split_selfies(string: str) -> list[str]:
    import selfies

    try:
        return list(selfies.split_selfies(string))
    except Exception as error:  # selfies raises plain ValueError on e.g. an unclosed bracket
        raise ValueError(f"{string!r} is not a valid SELFIES string ({error}); symbols look like [C][=O]") from error
