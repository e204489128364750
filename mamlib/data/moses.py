"""MOSES molecules as SMILES characters (``moses_smiles``) or SELFIES symbols (``moses_selfies``).

Source: the data files inside the PyPI wheel of ``molsets==0.3.1`` (read with zipfile; the ``moses``
package itself is never imported — it does not import on current Python/pandas).
  train.csv.gz: 1,584,663 SMILES, test.csv.gz: 176,074 (one column, header ``SMILES``).

Alphabet: built once from the FULL train set and cached as ``<data_dir>/moses/alphabet_{smiles,selfies}.json``;
sorted symbols including the padding symbol (' ' for SMILES, '[nop]' for SELFIES), so indices do not
depend on Python's set order (the original's did). Rows are right-padded to D with the padding symbol.
Splits: load_full=true: train = first 90% of MOSES train, val = the rest, test = MOSES test;
load_full=false: train = first subset_sizes[0] of MOSES train, val = the next subset_sizes[1],
test = first subset_sizes[2] of MOSES test (default 10,000 / 1,000 / 1,000).
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import re
import zipfile
from pathlib import Path

import numpy as np

from ..progress import progress
from .base import DiscreteDataset, save_npy_atomic, tensor_dataset, write_json_atomic
from .fetch import DataSourceError, fetch_or_explain, pip_download_wheel, verify_source

MOLSETS_REQUIREMENT = "molsets==0.3.1"
WHEEL_NAME = "molsets-0.3.1-py3-none-any.whl"   # the one published wheel; only this exact file is read
SOURCE_MEMBERS = {"train": "moses/dataset/data/train.csv.gz", "test": "moses/dataset/data/test.csv.gz",
                  "test_scaffolds": "moses/dataset/data/test_scaffolds.csv.gz"}   # the last only for mamlib.moses_metrics
PADDING = {"smiles": " ", "selfies": "[nop]"}
FULL_TRAIN_PERCENT = 90
DEFAULT_SUBSET_SIZES = (10_000, 1_000, 1_000)
PARALLEL_MIN_MOLECULES = 20_000   # below this a worker pool costs more than it saves
_SELFIES_SYMBOL = re.compile(r"\[[^\[\]]*\]")


# ---------------------------------------------------------------------- source files
def find_or_fetch_wheel(folder: Path, download: bool = True) -> Path:
    wheel = folder / WHEEL_NAME
    if not wheel.exists():
        fix = (f"Fix: on a machine with PyPI access run `python -m pip download --no-deps {MOLSETS_REQUIREMENT} -d {folder}` "
               f"(or copy {WHEEL_NAME} into {folder}/). Installing molsets is not needed "
               "and does not work on current Python; only its wheel file is read.")
        fetched = fetch_or_explain(lambda: pip_download_wheel(MOLSETS_REQUIREMENT, folder), f"no {WHEEL_NAME} in {folder}",
                                   download, fix)
        if fetched != wheel:
            fetched.unlink(missing_ok=True)
            raise DataSourceError(f"pip fetched {fetched.name}, not {WHEEL_NAME}; copy {WHEEL_NAME} into {folder}/")
    return verify_source(wheel)


def read_moses_smiles(wheel: str | Path, source_split: str) -> list[str]:
    """The SMILES of MOSES ``train`` or ``test`` from the molsets wheel, in file order."""
    member = SOURCE_MEMBERS[source_split]
    with zipfile.ZipFile(wheel) as archive:
        try:
            raw = archive.read(member)
        except KeyError:
            raise ValueError(f"{wheel} has no {member}; is it the {MOLSETS_REQUIREMENT} wheel?") from None
    lines = gzip.decompress(raw).decode("ascii").splitlines()
    if not lines or lines[0].strip() != "SMILES":
        raise ValueError(f"{wheel}:{member} should start with the header 'SMILES', found {lines[:1]}")
    smiles = [line.strip() for line in lines[1:] if line.strip()]
    if not smiles:
        raise ValueError(f"{wheel}:{member} holds no molecules")
    return smiles


# ---------------------------------------------------------------------- SMILES -> SELFIES
def _smiles_to_selfies(smiles: str):
    import selfies

    try:
        return selfies.encoder(smiles)
    except Exception:  # selfies.EncoderError and RDKit-free parse failures; reported by the caller
        return None


def smiles_to_selfies(smiles: list[str], workers: int = 2) -> list[str]:
    """SELFIES of every SMILES; a pool of ``workers`` processes for large lists (closed before returning)."""
    if workers > 1 and len(smiles) >= PARALLEL_MIN_MOLECULES:
        # fork: workers only run the selfies package, and need not re-import the caller's __main__
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with context.Pool(workers) as pool:
            result = list(progress(pool.imap(_smiles_to_selfies, smiles, chunksize=2_000), total=len(smiles),
                                   desc="SMILES -> SELFIES", unit="mol"))
            pool.close()
            pool.join()
    else:
        result = [_smiles_to_selfies(s) for s in progress(smiles, desc="SMILES -> SELFIES", unit="mol", leave=False)]
    failed = [s for s, out in zip(smiles, result) if out is None]
    if failed:
        raise ValueError(f"selfies could not encode {len(failed)} molecules, e.g. {failed[:3]}")
    return result


def split_selfies_fast(string: str) -> list[str]:
    """Bracketed symbols of a SELFIES string; same as selfies.split_selfies for strings without '.'."""
    symbols = _SELFIES_SYMBOL.findall(string)
    if sum(map(len, symbols)) != len(string):
        import selfies

        symbols = list(selfies.split_selfies(string))
    return symbols


# ---------------------------------------------------------------------- alphabet
def _alphabet_path(folder: Path, string_type: str) -> Path:
    return folder / f"alphabet_{string_type}.json"


class TokenRows:
    """Molecules as compact rows of ids into ``symbols`` (one ``bytes`` object per molecule).

    Memory-light stand-in for lists of symbol strings: 1.58M SELFIES as lists of str take ~3.5 GB,
    as bytes ~0.1 GB. SMILES rows are the ASCII bytes themselves (id = character code).
    """

    def __init__(self, rows: list[bytes], symbols: list[str]):
        self.rows, self.symbols = rows, symbols
        self.lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))

    @classmethod
    def from_smiles(cls, smiles: list[str]) -> "TokenRows":
        rows = []
        for i, string in enumerate(smiles):
            try:
                rows.append(string.encode("ascii"))
            except UnicodeEncodeError:
                raise ValueError(f"SMILES {i} ({string!r}) has a non-ASCII character") from None
        return cls(rows, [chr(code) for code in range(128)])

    @classmethod
    def from_selfies(cls, selfies_strings: list[str]) -> "TokenRows":
        ids: dict[str, int] = {}
        try:
            rows = [bytes(ids.setdefault(symbol, len(ids)) for symbol in split_selfies_fast(string))
                    for string in selfies_strings]
        except ValueError:
            if len(ids) > 256:   # bytes() refuses ids > 255
                raise ValueError("more than 256 distinct SELFIES symbols; uint8 storage cannot hold them") from None
            raise
        return cls(rows, list(ids))

    def symbols_used(self) -> set[str]:
        codes = np.unique(np.frombuffer(b"".join(self.rows), dtype=np.uint8))
        return {self.symbols[code] for code in codes.tolist()}

    def to_matrix(self, alphabet: list[str], width: int, padding: str, what: str) -> np.ndarray:
        """uint8 (N, width) of alphabet indices, right-padded; clear errors for long rows / unknown symbols."""
        if len(alphabet) > 255:
            raise ValueError(f"alphabet of {len(alphabet)} symbols does not fit uint8 storage")
        too_long = np.flatnonzero(self.lengths > width)
        if too_long.size:
            longest = int(self.lengths.max())
            raise ValueError(f"{too_long.size} molecules of {what} have more than max_len={width} symbols (longest "
                             f"{longest}); set max_len >= {longest} or null (= longest train molecule)")
        index = {symbol: i for i, symbol in enumerate(alphabet)}
        lookup = np.full(max(len(self.symbols), 1), 255, dtype=np.uint8)   # 255 = not in the alphabet
        for code, symbol in enumerate(self.symbols):
            lookup[code] = index.get(symbol, 255)
        codes = np.frombuffer(b"".join(self.rows), dtype=np.uint8)
        values = lookup[codes]
        unknown = np.flatnonzero(values == 255)
        if unknown.size:
            molecule = int(np.searchsorted(np.cumsum(self.lengths), unknown[0], side="right"))
            raise ValueError(f"molecule {molecule} of {what} has the symbol {self.symbols[codes[unknown[0]]]!r}, which "
                             f"is not in the alphabet {alphabet}; delete the cached alphabet json only if the source "
                             "data changed")
        matrix = np.full((len(self.rows), width), index[padding], dtype=np.uint8)
        matrix[np.arange(width) < self.lengths[:, None]] = values   # row-major order matches the joined rows
        return matrix


def _tokenize(string_type: str, smiles: list[str], workers: int) -> TokenRows:
    if string_type == "smiles":
        return TokenRows.from_smiles(smiles)
    return TokenRows.from_selfies(smiles_to_selfies(smiles, workers))


# alphabets of the real MOSES train set (sorted, with padding), computed once by this loader and shipped
SHIPPED_ALPHABET_DIR = Path(__file__).with_name("moses_alphabets")


def _load_or_build_alphabet(folder: Path, string_type: str, workers: int, train_smiles) -> dict:
    """The cached alphabet JSON, built from the full MOSES train set (``train_smiles()``) on first use.

    Building SELFIES converts every train molecule (minutes); the padded full-train matrix is saved beside it
    (``selfies_train_tokens.npy``) so that load_full=true does not convert them again.
    """
    path = _alphabet_path(folder, string_type)
    if path.exists():
        info = json.loads(path.read_text())
        if info.get("padding_symbol") != PADDING[string_type] or len(info["alphabet"]) != info["alphabet_size"]:
            raise ValueError(f"{path} is not a valid {string_type} alphabet file; delete it to rebuild it")
        return info
    shipped = SHIPPED_ALPHABET_DIR / path.name
    if shipped.exists():
        # Built once from the full MOSES train set and shipped, so a fresh clone skips minutes of SELFIES conversion.
        info = json.loads(shipped.read_text())
        write_json_atomic(path, info)
        return info
    train_smiles = train_smiles()
    padding = PADDING[string_type]
    tokens = _tokenize(string_type, train_smiles, workers)
    alphabet = sorted(tokens.symbols_used() | {padding})   # = selfies.get_alphabet_from_selfies(...) | {'[nop]'}
    largest = int(tokens.lengths.max())
    if string_type == "selfies":
        save_npy_atomic(folder / "selfies_train_tokens.npy", tokens.to_matrix(alphabet, largest, padding, "MOSES train"))
    info = {"string_type": string_type, "alphabet": alphabet, "alphabet_size": len(alphabet),
            "largest_len": largest, "padding_symbol": padding,
            "source": f"{MOLSETS_REQUIREMENT} {SOURCE_MEMBERS['train']} ({len(train_smiles)} molecules)"}
    write_json_atomic(path, info)
    return info


def _fit_width(rows: np.ndarray, width: int, pad_index: int, what: str) -> np.ndarray:
    """Pad or cut a right-padded matrix to ``width`` columns (cutting only padding)."""
    if rows.shape[1] >= width:
        cut = rows[:, width:]
        too_long = np.flatnonzero((cut != pad_index).any(axis=1))
        if too_long.size:
            raise ValueError(f"{too_long.size} molecules of {what} have more than max_len={width} symbols; "
                             "raise max_len or set it to null (= longest train molecule)")
        return np.ascontiguousarray(rows[:, :width])
    wider = np.full((rows.shape[0], width), pad_index, dtype=rows.dtype)
    wider[:, :rows.shape[1]] = rows
    return wider


# ---------------------------------------------------------------------- loader
def _split_ranges(load_full: bool, n_train_source: int, n_test_source: int, subset_sizes) -> dict:
    """split -> (source split, start, stop)."""
    if load_full:
        cut = n_train_source * FULL_TRAIN_PERCENT // 100
        return {"train": ("train", 0, cut), "val": ("train", cut, n_train_source), "test": ("test", 0, n_test_source)}
    sizes = [int(n) for n in subset_sizes]
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"subset_sizes must be three positive counts [train, val, test], got {list(subset_sizes)}")
    n_train, n_val, n_test = sizes
    if n_train + n_val > n_train_source or n_test > n_test_source:
        raise ValueError(f"subset_sizes {sizes} need {n_train + n_val} train and {n_test} test molecules, but MOSES "
                         f"has {n_train_source} and {n_test_source}")
    return {"train": ("train", 0, n_train), "val": ("train", n_train, n_train + n_val), "test": ("test", 0, n_test)}


def load_moses(data_dir: Path, string_type: str, load_full: bool = True, max_len: int | None = None,
               download: bool = True, subset_sizes=DEFAULT_SUBSET_SIZES, workers: int = 2) -> DiscreteDataset:
    if string_type not in PADDING:
        raise ValueError(f"string_type must be 'smiles' or 'selfies', got {string_type!r}")
    folder = data_dir / "moses"
    folder.mkdir(parents=True, exist_ok=True)
    sources: dict[str, list[str]] = {}

    def source(name: str) -> list[str]:
        # the wheel is only needed (and fetched) when something is not cached yet
        if name not in sources:
            sources[name] = read_moses_smiles(find_or_fetch_wheel(folder, download), name)
        return sources[name]

    info = _load_or_build_alphabet(folder, string_type, workers, lambda: source("train"))
    alphabet, padding = info["alphabet"], info["padding_symbol"]
    pad_index = alphabet.index(padding)
    width = int(info["largest_len"]) if max_len is None else int(max_len)
    if width < 1:
        raise ValueError(f"max_len must be a positive integer or null, got {max_len}")

    variant = "full" if load_full else "first{}-{}-{}".format(*[int(n) for n in subset_sizes])
    caches = {split: folder / f"{string_type}_{variant}_D{width}_{split}.npy" for split in ("train", "val", "test")}
    if all(path.exists() for path in caches.values()):
        splits = {split: np.load(path) for split, path in caches.items()}
    else:
        ranges = _split_ranges(load_full, len(source("train")), len(source("test")), subset_sizes)
        train_tokens = folder / "selfies_train_tokens.npy"
        splits = {}
        for split, (source_name, start, stop) in ranges.items():
            what = f"the {split} split (MOSES {source_name}[{start}:{stop}])"
            if string_type == "selfies" and source_name == "train" and train_tokens.exists():
                rows = np.array(np.load(train_tokens, mmap_mode="r")[start:stop])  # copy only the rows needed
                rows = _fit_width(rows, width, pad_index, what)
            else:
                tokens = _tokenize(string_type, source(source_name)[start:stop], workers)
                rows = tokens.to_matrix(alphabet, width, padding, what)
            save_npy_atomic(caches[split], rows)
            splits[split] = rows
    return DiscreteDataset(name=f"moses_{string_type}", kind="molecule", num_classes=len(alphabet),
                           num_positions=width, train=tensor_dataset(splits["train"]), val=tensor_dataset(splits["val"]),
                           test=tensor_dataset(splits["test"]), alphabet=list(alphabet), padding_symbol=padding)
