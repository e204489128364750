"""MOSES generation metrics (Polykovskiy et al. 2020), computed by the project to the definitions of molsets 0.3.1.

    python -m mamlib.moses_metrics GEN.txt --output OUT.json [--n-jobs N]

GEN.txt holds one SMILES per line; an empty line or ``INVALID`` is an invalid sample. The ``molsets`` package does not
import on current Python (it pins pomegranate==0.12.0, and ``import moses`` uses a removed pandas API), so only its wheel's
files are read (mamlib/data/moses.py): the train, test and scaffold-test SMILES and the MCF and PAINS filter patterns.

Definitions (over the valid molecules, duplicates included, unless said otherwise):
  valid          share of lines that are non-empty and that RDKit parses and sanitises
  unique@k       distinct canonical SMILES among the first k valid molecules / their number; with fewer than k valid
                 molecules, over all of them (as molsets does: it only warns)
  Novelty        share of the distinct valid molecules whose canonical SMILES is not a MOSES train SMILES
  Filters        share with no ring of 8+ atoms, no formal charge, atoms only from C N S O F Cl Br H, and no MCF or PAINS
                 match (matched on the molecule with explicit hydrogens)
  IntDiv, IntDiv2  1 - mean_i (mean_j T(i, j)^p)^(1/p) over all pairs of the valid set, self-pairs included, p = 1, 2
                 (molsets' code takes the p-th root per molecule, then the mean; for p = 1 that is the plain mean)
  SNN/R          mean over valid molecules of the largest Tanimoto similarity to a molecule of R
  Frag/R         cosine similarity of the BRICS fragment counts of the valid set and of R
  Scaf/R         cosine similarity of the Bemis-Murcko scaffold counts (scaffolds with fewer than 2 rings dropped)
  FCD/R          Frechet distance between Gaussians fitted to the ChemNet activations (fcd-torch 1.0.7) of canonical SMILES
  logP, SA, QED, weight   Wasserstein-1 distance between the property's values on the valid set and on Test
R is Test (the MOSES test set, 176,074 molecules) or TestSF (the scaffold test set, 176,226). Tanimoto similarity is on
Morgan fingerprints (radius 2, 1,024 bits); two empty fingerprints count as identical (similarity 1). A metric that
cannot be computed (no valid molecule; FCD of fewer than 2 molecules or of a singular fit) is null.

Reference statistics are computed once per MOSES set and part (structure: fingerprints, fragments and scaffolds;
properties; chemnet: mean and covariance of the activations), with a progress bar, and cached as plain arrays in
``<data_dir>/moses/reference_<set>_<part>_<wheel sha256[:12]>.npz``. The wheel's own ``test_stats.npz`` is a pickle and is
never read here (tests/test_moses_metrics.py compares it with ours).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
import zipfile
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from .data.fetch import SOURCE_DIGESTS
from .data.moses import PARALLEL_MIN_MOLECULES, WHEEL_NAME, find_or_fetch_wheel, read_moses_smiles
from .errors import UserError
from .files import check_output_path, save_npz_atomic, write_json_atomic
from .progress import progress

log = logging.getLogger("mamlib")

UNIQUE_AT = (1000, 10000)
REFERENCE_SETS = {"Test": "test", "TestSF": "test_scaffolds"}   # key suffix -> source split of the molsets wheel
PROPERTY_NAMES = ("logP", "SA", "QED", "weight")
KEYS = ("valid", *(f"unique@{k}" for k in UNIQUE_AT), "Novelty", "Filters", "IntDiv", "IntDiv2",
        *(f"{metric}/{name}" for name in REFERENCE_SETS for metric in ("FCD", "SNN", "Frag", "Scaf")), *PROPERTY_NAMES)
INVALID = "INVALID"          # how the project's sample files mark a sample that is not a molecule
FINGERPRINT_RADIUS, FINGERPRINT_BITS = 2, 1024
SCAFFOLD_MIN_RINGS = 2
LARGEST_RING = 7             # Filters: a ring of more atoms fails
FILTER_ATOMS = frozenset({"C", "N", "S", "O", "F", "Cl", "Br", "H"})
FILTER_FILES = {"mcf": "moses/metrics/mcf.csv", "pains": "moses/metrics/wehi_pains.csv"}
CHEMNET_FILE = "ChemNet_v0.13_pretrained.pt"
CHEMNET_LENGTH = 350         # fcd-torch pads (or cuts) every SMILES to this many symbols
CHEMNET_BATCH = 512
TANIMOTO_BLOCK = 4096        # fingerprints per side of one similarity block (4096^2 float32 = 64 MB)
CACHE_FORMAT = 1             # bump when the cached arrays change meaning
FCD_REQUIREMENT = "fcd-torch==1.0.7"


# ---------------------------------------------------------------------- one molecule
def parse(smiles: str | None):
    """RDKit molecule of a non-empty SMILES that parses and sanitises; None otherwise (molsets' ``get_mol``; a molecule
    without atoms, which molsets would pass on to crash its SA score, is invalid too)."""
    from rdkit import Chem, rdBase

    if not smiles or smiles == INVALID:
        return None
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            return None
        try:
            Chem.SanitizeMol(mol)
        except ValueError:   # RDKit's sanitisation errors subclass ValueError
            return None
    return mol if mol.GetNumAtoms() else None


_filter_patterns: list = []   # MCF + PAINS as RDKit query molecules, set per process by use_filters


def use_filters(smarts: Sequence[str]) -> None:
    from rdkit import Chem

    global _filter_patterns
    _filter_patterns = [Chem.MolFromSmarts(pattern) for pattern in smarts]
    if any(pattern is None for pattern in _filter_patterns):
        raise ValueError("a MCF/PAINS pattern of the molsets wheel does not parse; is it the molsets==0.3.1 wheel?")


def passes_filters(mol) -> bool:
    from rdkit import Chem

    if any(len(ring) > LARGEST_RING for ring in mol.GetRingInfo().AtomRings()):
        return False
    atoms = mol.GetAtoms()
    if any(atom.GetFormalCharge() != 0 for atom in atoms) or any(atom.GetSymbol() not in FILTER_ATOMS for atom in atoms):
        return False
    with_hydrogens = Chem.AddHs(mol)   # PAINS patterns name hydrogens explicitly
    if any(with_hydrogens.HasSubstructMatch(pattern) for pattern in _filter_patterns):
        return False
    flat = Chem.MolToSmiles(mol, isomericSmiles=False)   # molsets also requires a SMILES that parses again
    return bool(flat) and Chem.MolFromSmiles(flat) is not None


def scaffold(mol) -> str | None:
    """Bemis-Murcko scaffold SMILES; None when it has fewer than SCAFFOLD_MIN_RINGS rings."""
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    try:
        core = MurckoScaffold.GetScaffoldForMol(mol)
    except (ValueError, RuntimeError):
        return None
    smiles = Chem.MolToSmiles(core)
    return smiles if smiles and core.GetRingInfo().NumRings() >= SCAFFOLD_MIN_RINGS else None


def properties(mol) -> tuple[float, float, float, float]:
    """(logP, SA, QED, weight) in PROPERTY_NAMES order."""
    from rdkit.Chem import QED, Crippen, Descriptors

    from .energy.molecules import sa_score

    return Crippen.MolLogP(mol), sa_score(mol), QED.qed(mol), Descriptors.MolWt(mol)


_fingerprinter = None


def fingerprint_bits(mol) -> bytes:
    """Morgan fingerprint (radius 2, 1,024 bits), packed into 128 bytes."""
    from rdkit.Chem import rdFingerprintGenerator

    global _fingerprinter
    if _fingerprinter is None:
        _fingerprinter = rdFingerprintGenerator.GetMorganGenerator(radius=FINGERPRINT_RADIUS, fpSize=FINGERPRINT_BITS)
    return np.packbits(_fingerprinter.GetFingerprintAsNumPy(mol)).tobytes()


def describe(smiles: str | None, parts: tuple[str, ...]) -> dict | None:
    """What the metrics need of one molecule (None when invalid): its canonical SMILES and the asked ``parts``."""
    from rdkit import Chem, rdBase

    mol = parse(smiles)
    if mol is None:
        return None
    with rdBase.BlockLogs():
        found = {"canonical": Chem.MolToSmiles(mol)}
        if "structure" in parts:
            found["fingerprint"] = fingerprint_bits(mol)
            found["fragments"] = Chem.MolToSmiles(Chem.FragmentOnBRICSBonds(mol)).split(".")
            found["scaffold"] = scaffold(mol)
        if "properties" in parts:
            found["properties"] = properties(mol)
        if "filters" in parts:
            found["filters"] = passes_filters(mol)
    return found


def describe_all(smiles: Sequence[str | None], parts: tuple[str, ...], what: str, n_jobs: int | None = None,
                 filters: Sequence[str] = ()) -> list[dict | None]:
    """:func:`describe` of every SMILES, with a progress bar; a pool of ``n_jobs`` processes for long lists."""
    work = partial(describe, parts=parts)
    workers = available_cores() if n_jobs is None else n_jobs
    bar = {"total": len(smiles), "desc": f"MOSES {what}", "unit": "mol"}
    if workers > 1 and len(smiles) >= PARALLEL_MIN_MOLECULES:
        # fork: the workers only run RDKit, and need not re-import the caller's __main__
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with context.Pool(workers, initializer=use_filters, initargs=(list(filters),)) as pool:
            described = list(progress(pool.imap(work, smiles, chunksize=500), **bar))
            pool.close()
            pool.join()
        return described
    use_filters(filters)
    return [work(s) for s in progress(smiles, **bar)]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on every platform
        return os.cpu_count() or 1


# ---------------------------------------------------------------------- sets of molecules
def unpack(bits: np.ndarray):
    """(N, 128) packed fingerprints -> (N, 1024) float32 tensor of 0/1 (their dot products, at most 1024, are exact)."""
    import torch

    return torch.from_numpy(np.unpackbits(np.asarray(bits, dtype=np.uint8), axis=1).astype(np.float32))


def tanimoto_aggregate(generated: np.ndarray, reference: np.ndarray, how: str, p: int = 1, device="cpu",
                       desc: str | None = None) -> np.ndarray:
    """Per generated fingerprint: the largest (how="max") or the p-th-power mean, p-th root taken (how="mean"),
    of its Tanimoto similarities to every reference fingerprint. Both as packed (N, 128) uint8 arrays."""
    import torch

    gen = unpack(generated).to(device)
    gen_bits = gen.sum(1)
    result = torch.zeros(len(gen), dtype=torch.float64, device=device)
    blocks = range(0, len(reference), TANIMOTO_BLOCK)
    for start in (progress(blocks, desc=desc, unit="block") if desc else blocks):
        ref = unpack(reference[start:start + TANIMOTO_BLOCK]).to(device)
        ref_bits = ref.sum(1)
        for first in range(0, len(gen), TANIMOTO_BLOCK):
            rows = slice(first, first + TANIMOTO_BLOCK)
            common = gen[rows] @ ref.T
            union = gen_bits[rows, None] + ref_bits[None, :] - common
            similarity = torch.where(union > 0, common / union.clamp(min=1), torch.ones_like(common))
            if how == "max":
                result[rows] = torch.maximum(result[rows], similarity.max(1).values.double())
            else:
                result[rows] += (similarity.double() ** p).sum(1)
    if how == "mean":
        result = (result / len(reference)) ** (1.0 / p)
    return result.cpu().numpy()


def internal_diversity(fingerprints: np.ndarray, p: int = 1, device="cpu") -> float:
    return float(1 - tanimoto_aggregate(fingerprints, fingerprints, "mean", p, device).mean())


def count_cosine(reference_keys: np.ndarray, reference_counts: np.ndarray, counts: Counter) -> float | None:
    """Cosine similarity of two count vectors over the union of their keys; None when either is empty."""
    if len(reference_keys) == 0 or not counts:
        return None
    index = {key: i for i, key in enumerate(reference_keys.tolist())}
    reference = reference_counts.astype(np.float64)
    generated = np.array(list(counts.values()), dtype=np.float64)
    dot = sum(reference[index[key]] * count for key, count in counts.items() if key in index)
    return float(dot / (np.linalg.norm(reference) * np.linalg.norm(generated)))


def counted(values) -> tuple[np.ndarray, np.ndarray]:
    """(keys, counts) of ``values`` as plain arrays, keys sorted."""
    tally = Counter(values)
    keys = sorted(tally)
    return np.array(keys, dtype=str), np.array([tally[key] for key in keys], dtype=np.int64)


# ---------------------------------------------------------------------- ChemNet (fcd-torch)
_chemnet = None


def chemnet():
    """fcd-torch's ChemNet, its weights read with ``torch.load(weights_only=True)``: the file is a list of
    (layer type, (state dict, layer arguments, options)) of tensors and plain values, so nothing else is unpickled."""
    global _chemnet
    if _chemnet is None:
        import torch
        try:
            import fcd_torch
            from fcd_torch.utils import load_imported_model
        except ImportError:
            raise UserError(f"the FCD needs ChemNet from {FCD_REQUIREMENT}; install it with "
                            f"`python -m pip install {FCD_REQUIREMENT}` (it is in requirements.txt)") from None
        layers = torch.load(Path(fcd_torch.__file__).with_name(CHEMNET_FILE), map_location="cpu", weights_only=True)
        _chemnet = load_imported_model(layers).eval()
    return _chemnet


def chemnet_activations(canonical: Sequence[str], device="cpu", what: str = "molecules") -> np.ndarray:
    """(N, 512) penultimate ChemNet activations of canonical SMILES, as fcd-torch's FCD.get_predictions computes them."""
    import torch
    from fcd_torch.utils import get_one_hot

    net = chemnet().to(device)
    batches = []
    with torch.no_grad():
        for start in progress(range(0, len(canonical), CHEMNET_BATCH), desc=f"ChemNet {what}", unit="batch"):
            one_hot = np.stack([get_one_hot(s, CHEMNET_LENGTH) for s in canonical[start:start + CHEMNET_BATCH]])
            inputs = torch.from_numpy(one_hot / one_hot.shape[2]).float().transpose(1, 2).to(device)
            # copy: the output is a view of all 88 LSTM steps (92 MB a batch); a view would keep them all in memory
            batches.append(net(inputs).cpu().numpy().copy())
    net.to("cpu")
    return np.concatenate(batches) if batches else np.zeros((0, 512), dtype=np.float32)


def gaussian_fit(activations: np.ndarray) -> dict | None:
    if len(activations) < 2:
        return None
    return {"mu": activations.astype(np.float64).mean(0), "sigma": np.cov(activations.T)}


def frechet_distance(reference: dict | None, generated: dict | None) -> float | None:
    from fcd_torch import calculate_frechet_distance

    if reference is None or generated is None:
        return None
    try:
        value = calculate_frechet_distance(reference["mu"], reference["sigma"], generated["mu"], generated["sigma"])
    except ValueError as error:   # a covariance too singular for a real matrix square root (very few molecules)
        log.warning("FCD not computed: %s", error)
        return None
    return float(value)


# ---------------------------------------------------------------------- reference statistics
def reference_path(folder: Path, split: str, part: str, size: int | None) -> Path:
    digest = SOURCE_DIGESTS[WHEEL_NAME].split(":")[1][:12]   # the wheel's sha256, checked by find_or_fetch_wheel
    subset = "" if size is None else f"_first{size}"
    return folder / f"reference_{split}{subset}_{part}_{digest}.npz"


def read_cached(path: Path, rdkit_version: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent, unreadable or made by another RDKit or cache format."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            stats = {name: cached[name] for name in cached.files}
        current = int(stats.pop("format")) == CACHE_FORMAT and str(stats.pop("rdkit")) == rdkit_version
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        log.warning("cannot read %s (%s); computing it again", path, error)
        return None
    if not current:
        log.info("%s was made by another RDKit or cache format; computing it again", path)
        return None
    return stats


def reference_statistics(data_dir, split: str, part: str, size: int | None = None, n_jobs: int | None = None,
                         device="cpu", download: bool = True) -> dict[str, np.ndarray]:
    """One part ("structure", "properties" or "chemnet") of the statistics of a MOSES set ("test" or "test_scaffolds"),
    over its first ``size`` molecules (None: all); computed once and cached as plain arrays beside the molsets wheel."""
    from rdkit import __version__ as rdkit_version

    folder = Path(data_dir) / "moses"
    path = reference_path(folder, split, part, size)   # named by the wheel's pinned digest: no need to read it here
    stats = read_cached(path, rdkit_version)
    if stats is not None:
        return stats
    smiles = read_moses_smiles(find_or_fetch_wheel(folder, download), split)[:size]
    log.info("computing the MOSES %s statistics of %s (%d molecules) once; cached in %s", part, split, len(smiles), path)
    described = [d for d in describe_all(smiles, (part,), f"{part} of {split}", n_jobs) if d is not None]
    if len(described) < len(smiles):
        log.warning("%d molecules of MOSES %s are not valid here and are left out", len(smiles) - len(described), split)
    if part == "structure":
        fragment_keys, fragment_counts = counted(f for d in described for f in d["fragments"])
        scaffold_keys, scaffold_counts = counted(d["scaffold"] for d in described if d["scaffold"] is not None)
        stats = {"fingerprints": np.frombuffer(b"".join(d["fingerprint"] for d in described), dtype=np.uint8)
                 .reshape(len(described), FINGERPRINT_BITS // 8),
                 "fragment_keys": fragment_keys, "fragment_counts": fragment_counts,
                 "scaffold_keys": scaffold_keys, "scaffold_counts": scaffold_counts}
    elif part == "properties":
        values = np.array([d["properties"] for d in described], dtype=np.float64).reshape(-1, len(PROPERTY_NAMES))
        stats = {name: values[:, i] for i, name in enumerate(PROPERTY_NAMES)}
    elif part == "chemnet":
        fit = gaussian_fit(chemnet_activations([d["canonical"] for d in described], device, split))
        if fit is None:
            raise UserError(f"the ChemNet statistics of MOSES {split} need at least 2 molecules; use a reference size >= 2")
        stats = fit
    else:
        raise ValueError(f"unknown part {part!r}; use structure, properties or chemnet")
    save_npz_atomic(path, format=np.array(CACHE_FORMAT), rdkit=np.array(rdkit_version), **stats)
    return stats


def filter_patterns(wheel: Path) -> list[str]:
    """The MCF and PAINS SMARTS of the molsets wheel (mcf.csv: ``name,smarts`` with a header; wehi_pains.csv:
    ``"smarts","<regId=name>"`` without one)."""
    import csv
    import io

    with zipfile.ZipFile(wheel) as archive:
        mcf = list(csv.DictReader(io.StringIO(archive.read(FILTER_FILES["mcf"]).decode())))
        pains = list(csv.reader(io.StringIO(archive.read(FILTER_FILES["pains"]).decode())))
    return [row["smarts"].strip() for row in mcf] + [row[0].strip() for row in pains if row]


# ---------------------------------------------------------------------- all metrics
class GeneratedSet:
    """The valid molecules of a generated set, each described once for every metric."""

    def __init__(self, smiles: Sequence[str | None], wheel: Path, n_jobs: int | None = None, device="cpu"):
        described = describe_all(list(smiles), ("structure", "properties", "filters"), "generated molecules", n_jobs,
                                 filter_patterns(wheel))
        self.count, self.device = len(described), device
        self.valid = [d for d in described if d is not None]
        self.canonical = [d["canonical"] for d in self.valid]
        self.fingerprints = np.frombuffer(b"".join(d["fingerprint"] for d in self.valid), dtype=np.uint8) \
            .reshape(len(self.valid), FINGERPRINT_BITS // 8)
        self.fragments = Counter(f for d in self.valid for f in d["fragments"])
        self.scaffolds = Counter(d["scaffold"] for d in self.valid if d["scaffold"] is not None)
        self.properties = np.array([d["properties"] for d in self.valid], dtype=np.float64).reshape(-1, len(PROPERTY_NAMES))
        self._chemnet_fit = None

    def chemnet_fit(self) -> dict | None:
        if self._chemnet_fit is None:
            self._chemnet_fit = gaussian_fit(chemnet_activations(self.canonical, self.device, "generated molecules"))
        return self._chemnet_fit


def own_metrics(generated: GeneratedSet, train_smiles: Sequence[str]) -> dict:
    """unique@k, Novelty, Filters, IntDiv and IntDiv2: the metrics that need no reference statistics."""
    canonical = generated.canonical
    if len(canonical) < max(UNIQUE_AT):
        log.warning("only %d valid molecules: unique@k for larger k is over all of them (as molsets does)", len(canonical))
    metrics = {f"unique@{k}": len(set(canonical[:k])) / len(canonical[:k]) for k in UNIQUE_AT}
    distinct = set(canonical)
    metrics["Novelty"] = len(distinct - set(train_smiles)) / len(distinct)
    metrics["Filters"] = float(np.mean([d["filters"] for d in generated.valid]))
    for key, p in (("IntDiv", 1), ("IntDiv2", 2)):
        metrics[key] = internal_diversity(generated.fingerprints, p, generated.device)
    return metrics


def reference_metrics(generated: GeneratedSet, name: str, structure: dict, chemnet_fit: dict) -> dict:
    """FCD, SNN, Frag and Scaf against one MOSES set (``name`` Test or TestSF) given its statistics."""
    snn = tanimoto_aggregate(generated.fingerprints, structure["fingerprints"], "max", device=generated.device,
                             desc=f"SNN/{name}")
    return {f"FCD/{name}": frechet_distance(chemnet_fit, generated.chemnet_fit()),
            f"SNN/{name}": float(snn.mean()),
            f"Frag/{name}": count_cosine(structure["fragment_keys"], structure["fragment_counts"], generated.fragments),
            f"Scaf/{name}": count_cosine(structure["scaffold_keys"], structure["scaffold_counts"], generated.scaffolds)}


def property_metrics(generated: GeneratedSet, test_properties: dict) -> dict:
    from scipy.stats import wasserstein_distance

    return {name: float(wasserstein_distance(test_properties[name], generated.properties[:, i]))
            for i, name in enumerate(PROPERTY_NAMES)}


def moses_metrics(smiles: Sequence[str | None], data_dir, n_jobs: int | None = None, device="cpu",
                  reference_size: int | None = None, download: bool = True) -> dict:
    """The MOSES metrics (KEYS, in that order) of generated SMILES; None or "" or "INVALID" = an invalid sample."""
    if not smiles:
        raise UserError("no samples to evaluate: the list of generated SMILES is empty")
    if reference_size is not None and reference_size < 2:
        raise UserError(f"reference size {reference_size} is too small; use at least 2 (or none: the whole MOSES sets)")
    wheel = find_or_fetch_wheel(Path(data_dir) / "moses", download)
    generated = GeneratedSet(smiles, wheel, n_jobs, device)
    metrics: dict = dict.fromkeys(KEYS)
    metrics["valid"] = len(generated.valid) / generated.count
    if not generated.valid:
        log.warning("no valid molecule among %d samples: every MOSES metric but 'valid' is null", generated.count)
        return metrics
    metrics.update(own_metrics(generated, read_moses_smiles(wheel, "train")))
    reference = partial(reference_statistics, data_dir, size=reference_size, n_jobs=n_jobs, device=device,
                        download=download)
    for name, split in REFERENCE_SETS.items():
        metrics.update(reference_metrics(generated, name, reference(split, "structure"), reference(split, "chemnet")))
    metrics.update(property_metrics(generated, reference("test", "properties")))
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in metrics.items()}


def read_generated(path) -> list[str]:
    """The lines of a GEN file (one SMILES per line; a trailing newline adds no sample)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no file {path}: give a text file with one SMILES per line") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path} as UTF-8 text ({error}); give a text file with one SMILES per line") from None
    lines = [line.strip() for line in text.splitlines()]
    if not lines:
        raise UserError(f"{path} is empty: write one SMILES per line (INVALID or an empty line for an invalid sample)")
    return lines


def evaluate_file(gen_path, output_path, data_dir=None, n_jobs: int | None = None, device="cpu",
                  reference_size: int | None = None, download: bool = True) -> dict:
    """The MOSES metrics of GEN file ``gen_path``, written as JSON to ``output_path`` (atomically); returns them."""
    from .runtime import default_data_dir

    check_output_path(output_path)   # before minutes of work
    if n_jobs is not None and n_jobs < 1:
        raise UserError(f"n_jobs={n_jobs} must be at least 1")
    smiles = read_generated(gen_path)
    metrics = moses_metrics(smiles, data_dir or default_data_dir(), n_jobs, device, reference_size, download)
    write_json_atomic(output_path, metrics, allow_nan=False)
    log.info("MOSES metrics of %d samples (%s) written to %s", len(smiles), gen_path, output_path)
    return metrics


def main(argv=None) -> int:
    from .cli import USER_ERROR_EXIT_CODE, one_line

    parser = argparse.ArgumentParser(prog="python -m mamlib.moses_metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("gen", help="text file, one SMILES per line (an empty line or INVALID is an invalid sample)")
    parser.add_argument("--output", required=True, help="JSON file to write the metrics to")
    parser.add_argument("--n-jobs", type=int, default=None,
                        help=f"processes for RDKit work on {PARALLEL_MIN_MOLECULES:,}+ molecules (default: all cores)")
    parser.add_argument("--data-dir", default=None, help="folder holding moses/ (default: $MAM_DATA_DIR or <repo>/data)")
    parser.add_argument("--device", default="cpu", help="torch device for ChemNet and the similarities (default cpu)")
    parser.add_argument("--reference-size", type=int, default=None,
                        help="use only the first N molecules of the MOSES test sets: quick, not comparable with MOSES")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        metrics = evaluate_file(args.gen, args.output, args.data_dir, args.n_jobs, args.device, args.reference_size)
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
