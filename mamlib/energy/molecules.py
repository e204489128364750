"""Molecule property targets for energy-based training (paper §5.3, Table 5).

The unnormalised target density over token strings x is

    log f(x) = -(g(x) - target)^2 / tau,

where g is a property of the molecule that x decodes to: ``logP`` (RDKit Crippen MolLogP), ``QED``
(RDKit QED) or ``SA`` (Ertl-Schuffenhauer synthetic accessibility, from RDKit's Contrib/SA_Score).

Tokens follow the library convention (mamlib/orders.py): a (B, D) array of ints 0..K-1, index k meaning
``alphabet[k]``. The padding symbol ('[nop]' for SELFIES, ' ' for SMILES) is dropped wherever it occurs
(the SELFIES decoder ignores '[nop]' anyway; dropping SMILES spaces keeps a space inside a string from
silently truncating it, because RDKit reads anything after whitespace as the molecule's name).

Molecule processing, the same for every metric:
  SELFIES -> SMILES with ``selfies.decoder``; RDKit ``MolFromSmiles`` (which sanitizes); stereo removed by
  writing SMILES with ``isomericSmiles=False`` and parsing it again. An empty string, a decoder error, an
  RDKit parse/sanitization failure, a molecule without atoms or a metric that fails or is not finite all
  make the string *invalid*.

Differences from the original ``MolEvalModel`` (README, "Differences from the original code"):
  * no multiprocessing pool (the original opened a new 8-process pool per call and never closed it);
    serial RDKit costs about 0.2-1.5 ms per molecule, i.e. well under a second for a batch of 512;
  * invalid strings get a finite penalty instead of score -1e10 (reward ~ -1e21), see
    :func:`default_invalid_penalty`;
  * the SA score uses the ``sascorer`` shipped with RDKit (with its ``fpscores.pkl.gz``);
  * RDKit's error log is silenced only while this module parses molecules (``rdBase.BlockLogs``).
"""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import selfies
import torch
from rdkit import Chem, RDConfig, rdBase
from rdkit.Chem import QED, Crippen

# Plausible values of each metric for drug-like molecules; only used to place the default invalid penalty.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "logP": (-10.0, 10.0),
    "QED": (0.0, 1.0),   # QED is a desirability in [0, 1] by construction
    "SA": (1.0, 10.0),   # the SA score is clipped to [1, 10] by construction
}
# Gap between the worst in-range distance and the penalty, as a fraction of the range width.
PENALTY_MARGIN_FRACTION = 0.1

PADDING_SYMBOLS = {"SELFIES": "[nop]", "SMILES": " "}

_sascorer_module = None  # RDKit's Contrib sascorer, loaded on first use (the module reads its fragment table once)


def _sascorer():
    """Load RDKit's Contrib ``sascorer.py`` from its file, without adding the Contrib folder to sys.path."""
    global _sascorer_module
    if _sascorer_module is None:
        path = os.path.join(RDConfig.RDContribDir, "SA_Score", "sascorer.py")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"RDKit's SA score module was not found at {path}; install an RDKit build that ships "
                "Contrib/SA_Score (the PyPI 'rdkit' wheel does), or use metric_name='logP' or 'QED'")
        spec = importlib.util.spec_from_file_location("mamlib_rdkit_contrib_sascorer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _sascorer_module = module
    return _sascorer_module


def sa_score(mol) -> float:
    """Synthetic accessibility score of an RDKit molecule (1 = easy .. 10 = hard)."""
    if mol is None or mol.GetNumAtoms() == 0:
        raise ValueError("sa_score needs an RDKit molecule with at least one atom (got None or an empty molecule)")
    return float(_sascorer().calculateScore(mol))


def _log_p(mol) -> float:
    return float(Crippen.MolLogP(mol))


def _qed(mol) -> float:
    return float(QED.qed(mol))


METRICS = {"logP": _log_p, "QED": _qed, "SA": sa_score}


def _stereo_free_mol(smiles: str):
    """Parsed, sanitized molecule with stereo information removed; None when invalid or empty."""
    if not smiles:
        return None
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)  # sanitizes; None on parse or sanitization failure
        if mol is None or mol.GetNumAtoms() == 0:
            return None
        flat = Chem.MolToSmiles(mol, isomericSmiles=False)
        mol = Chem.MolFromSmiles(flat)
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return mol


def canonical_smiles(smiles: str) -> str | None:
    """Canonical RDKit SMILES without stereo of ``smiles``; None when it is empty or does not parse."""
    mol = _stereo_free_mol(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def default_invalid_penalty(metric_name: str, target_value: float, tau: float) -> float:
    """Reward given to invalid strings unless overridden: slightly below the worst plausible valid reward.

    With [g_min, g_max] = ``PLAUSIBLE_RANGES[metric_name]`` and margin = 0.1 * (g_max - g_min):

        penalty = -(max(|g_min - target|, |g_max - target|) + margin)^2 / tau

    An invalid string is treated like a valid molecule slightly worse than the worst plausible one.
    The original gave invalid strings score -1e10 (reward ~ -1e21). The KL objective standardizes rewards
    by their batch mean and std, so a single such value made every valid molecule's standardized reward
    nearly equal and removed the signal between valid molecules. A penalty of the same order as the
    valid rewards keeps invalid strings ranked last without erasing the differences between valid ones.
    Example: logP, target -4, tau 0.1 -> -(14 + 2)^2 / 0.1 = -2560 (a valid molecule with logP 10 gets -1960).
    """
    if metric_name not in PLAUSIBLE_RANGES:
        raise ValueError(f"unknown metric {metric_name!r}; choose one of {sorted(PLAUSIBLE_RANGES)}")
    low, high = PLAUSIBLE_RANGES[metric_name]
    margin = PENALTY_MARGIN_FRACTION * (high - low)
    worst_distance = max(abs(low - target_value), abs(high - target_value))
    return -((worst_distance + margin) ** 2) / tau


def _as_token_array(x, alphabet_size: int) -> np.ndarray:
    """(B, D) tokens (torch, numpy or nested lists) -> int64 numpy array, checked to lie in 0..K-1."""
    if torch.is_tensor(x):
        array = x.detach().cpu().numpy()
    else:
        array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"tokens must have shape (B, D), got shape {tuple(array.shape)}; "
                         "for a single string pass x[None]")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"tokens must be integers 0..K-1, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError("float tokens must hold whole numbers 0..K-1; pass a LongTensor of token indices")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= alphabet_size):
        raise ValueError(
            f"token values must lie in 0..{alphabet_size - 1} (alphabet size {alphabet_size}), got range "
            f"[{array.min()}, {array.max()}]; missing positions (-1) must be filled before scoring, and tokens "
            "stored as 1..K (the original MaM convention) must be shifted down by 1")
    return array


class MoleculePropertyTarget:
    """Unnormalised target log f(x) = -(g(x) - target)^2 / tau over SELFIES or SMILES token strings.

    alphabet: list of symbols, index = token value 0..K-1; must contain the padding symbol
        ('[nop]' for SELFIES, ' ' for SMILES).
    string_type: 'SELFIES' or 'SMILES'.
    metric_name: 'logP', 'QED' or 'SA'.
    invalid_penalty: reward of invalid strings; None -> :func:`default_invalid_penalty` (see its docstring
        for why a finite penalty near the valid rewards is used instead of the original -1e21).
    """

    def __init__(self, alphabet: list[str], string_type: str = "SELFIES", metric_name: str = "logP",
                 target_value: float = -4.0, tau: float = 0.1, invalid_penalty: float | None = None):
        if string_type not in PADDING_SYMBOLS:
            raise ValueError(f"unknown string_type {string_type!r}; use 'SELFIES' or 'SMILES'")
        if metric_name not in METRICS:
            raise ValueError(f"unknown metric {metric_name!r}; choose one of {sorted(METRICS)}")
        alphabet = list(alphabet)
        if not alphabet or not all(isinstance(symbol, str) for symbol in alphabet):
            raise ValueError("alphabet must be a non-empty list of strings (index = token value)")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated symbols; each token value must map to one distinct symbol")
        padding = PADDING_SYMBOLS[string_type]
        if padding not in alphabet:
            raise ValueError(f"a {string_type} alphabet must contain the padding symbol {padding!r}; append it")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        if not math.isfinite(float(target_value)):
            raise ValueError(f"target_value must be finite, got {target_value!r}")
        self.alphabet = alphabet
        self.string_type = string_type
        self.metric_name = metric_name
        self.target_value = float(target_value)
        self.tau = float(tau)
        self.padding_symbol = padding
        # Padding maps to '' so that joining a row drops it wherever it occurs.
        self._symbols = np.array([("" if symbol == padding else symbol) for symbol in alphabet], dtype=object)
        if invalid_penalty is None:
            self.invalid_penalty = default_invalid_penalty(metric_name, self.target_value, self.tau)
            self.invalid_penalty_source = "default"
        else:
            if not math.isfinite(float(invalid_penalty)):
                raise ValueError(f"invalid_penalty must be finite (a huge value swamps the reward "
                                 f"standardization), got {invalid_penalty!r}")
            self.invalid_penalty = float(invalid_penalty)
            self.invalid_penalty_source = "override"

    @property
    def alphabet_size(self) -> int:
        return len(self.alphabet)

    def strings(self, x) -> list[str]:
        """(B, D) token rows -> SELFIES/SMILES strings with the padding symbol dropped."""
        tokens = _as_token_array(x, self.alphabet_size)
        return ["".join(row) for row in self._symbols[tokens]]

    def _smiles_of_string(self, string: str) -> str:
        if self.string_type == "SMILES":
            return string
        try:
            return selfies.decoder(string)
        except selfies.DecoderError:
            return ""

    def _molecules(self, x) -> list:
        return [_stereo_free_mol(self._smiles_of_string(s)) for s in self.strings(x)]

    def smiles(self, x) -> list[str | None]:
        """Canonical SMILES without stereo per row; None when the row is invalid or empty."""
        return [None if mol is None else Chem.MolToSmiles(mol) for mol in self._molecules(x)]

    def properties(self, x) -> np.ndarray:
        """(B,) float64 metric value per row; NaN when the row is invalid."""
        metric = METRICS[self.metric_name]
        molecules = self._molecules(x)
        values = np.full(len(molecules), np.nan, dtype=np.float64)
        for i, mol in enumerate(molecules):
            if mol is None:
                continue
            try:
                with rdBase.BlockLogs():
                    value = metric(mol)
            except (ValueError, RuntimeError):  # an RDKit descriptor failing on an odd molecule -> invalid
                continue
            if value is not None and math.isfinite(value):
                values[i] = value
        return values

    def log_f(self, x) -> torch.Tensor:
        """(B,) float64 reward -(g - target)^2 / tau; invalid rows get ``self.invalid_penalty``."""
        values = self.properties(x)
        rewards = -((values - self.target_value) ** 2) / self.tau
        rewards[np.isnan(values)] = self.invalid_penalty
        device = x.device if torch.is_tensor(x) else None
        return torch.as_tensor(rewards, dtype=torch.float64, device=device)

    def validity_uniqueness(self, x) -> dict:
        """Fraction of valid rows, and distinct canonical SMILES among the valid rows / number valid.

        Validity is about parsing (the metric is not computed); with no valid rows uniqueness is NaN.
        """
        smiles = self.smiles(x)
        valid = [s for s in smiles if s is not None]
        num = len(smiles)
        return {
            "validity": len(valid) / num if num else float("nan"),
            "uniqueness": len(set(valid)) / len(valid) if valid else float("nan"),
            "num": num,
        }

    def describe(self) -> dict:
        low, high = PLAUSIBLE_RANGES[self.metric_name]
        return {
            "target": "molecule_property",
            "string_type": self.string_type,
            "metric_name": self.metric_name,
            "target_value": self.target_value,
            "tau": self.tau,
            "invalid_penalty": self.invalid_penalty,
            "invalid_penalty_source": self.invalid_penalty_source,
            "plausible_range": [low, high],
            "alphabet_size": self.alphabet_size,
            "padding_symbol": self.padding_symbol,
        }
