"""Use a trained model from Python, and export it as a folder that loads without pickle.

    model = mamlib.load("<run dir>/checkpoints/last.pt")    # or a folder written by mode=export
    model.log_prob(x)                                       # x: (B, D) ints, -1 = missing -> float64 (B,)

Every method takes either one array with -1 at missing positions, or ``(x, observed_mask)`` in the library's value
convention (mamlib/orders.py), as numpy or torch. Every method returns numpy arrays on the CPU: log-probabilities
and probabilities float64, values int64. ``seed=None`` draws from torch's global generator; an int gives the same
result on every call without touching it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch

from . import arm
from .checkpoint import CheckpointError, check_same_data, load_checkpoint, load_model_state
from .errors import OutputError, UserError
from .files import atomic_write, file_digest, temp_path_for, write_text_atomic
from .marginal import log_normalizer, normalized_log_marginal
from .orders import fixed_order, from_missing_coded
from .runtime import seeded

CHECKPOINT_KINDS = ("ao_arm", "mam", "energy")
METHODS = ("marginal", "chain")
EXPORT_FORMAT, EXPORT_VERSION = "mamlib-export", 1
WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE = "model.safetensors", "config.json", "metrics.json", "README.md"


class ModelUsageError(UserError, ValueError):
    """A call the model cannot answer: wrong shape, a value out of range, or a method this kind of model lacks."""


# -- loading ---------------------------------------------------------------------------------------

def load(path, device="cpu") -> "Model":
    """A checkpoint file (any kind the project saves) or a folder written by ``mode=export``, in eval mode on ``device``."""
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} is a folder without {CONFIG_FILE}: pass a checkpoint file "
                                  "(<run dir>/checkpoints/last.pt) or a folder written by mode=export")
        return Model.from_folder(path, device)
    return Model.from_checkpoint(path, device)


def data_description(info: dict) -> dict:
    """The checkpoint's dataset description plus what decoding and rebuilding need: kind, padding symbol, image shape.

    Energy-based runs describe their target instead of a dataset kind; MOSES descriptions omit the padding symbol.
    """
    target = info.get("target") or {}
    padding = info.get("padding_symbol") or target.get("padding_symbol")
    if padding is None and info.get("kind") == "molecule":
        from .data.moses import PADDING

        padding = PADDING.get(info["name"].rsplit("_", 1)[-1])
    kind = info.get("kind") or ("molecule" if padding else target.get("kind", "array"))
    full = {**info, "kind": kind, "padding_symbol": padding}
    if "image_shape" not in full:
        side = math.isqrt(info["D"])
        full["image_shape"] = [side, side] if kind == "image" and side * side == info["D"] else None
    return full


def build_net(arch: dict, info: dict, marginal: bool, image_shape=None):
    """An untrained backbone of the given architecture for the described data."""
    from omegaconf import OmegaConf

    from .nets import build_backbone

    shape = image_shape or data_description(info)["image_shape"]
    return build_backbone(OmegaConf.create(arch), info["K"], info["D"], image_shape=shape, marginal=marginal)


def net_from_checkpoint(path, kinds, dataset_info: dict | None, device, image_shape=None, marginal: bool | None = None,
                        allow_missing_marginal: bool = False, arch_overrides: dict | None = None):
    """Rebuild the backbone from the checkpoint's own arch config and load its weights strictly.

    ``dataset_info``: the data the checkpoint must have been trained on (None: take the checkpoint's own).

    ``allow_missing_marginal``: a stage-1 checkpoint loaded into a net with a marginal head; only the
    marginal head's keys may be absent. ``marginal=None`` builds the head iff the checkpoint has one.
    ``arch_overrides`` changes arch options that only concern missing parts (the marginal head's width).
    Returns (net, payload, missing keys); ``payload["arch"]`` is the architecture actually built.
    """
    payload = load_checkpoint(path, expected_kind=kinds)
    if dataset_info is not None:
        check_same_data(payload["dataset"], dataset_info, path)
    marginal = payload["has_marginal"] if marginal is None else marginal
    payload["arch"] = {**payload["arch"], **(arch_overrides or {})}
    net = build_net(payload["arch"], payload["dataset"], marginal, image_shape=image_shape)
    allowed = net.marginal_prefixes if allow_missing_marginal else ()
    missing = load_model_state(net, payload["model"], path, allowed)
    return net.to(device), payload, missing


def arm_order(payload: dict) -> str | None:
    """The fixed order of an energy-based ARM baseline as it was trained (None: an any-order model)."""
    if payload["kind"] != "energy" or payload["has_marginal"]:
        return None
    return (payload.get("config") or {}).get("arm_order", "forward")  # the config default when a test checkpoint has none


def as_int_array(value, name: str) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError as error:  # ragged nested lists
        raise ModelUsageError(f"{name} is not a rectangular array ({error}); pass a (B, D) array") from None
    if array.dtype.kind in "biu":
        return array.astype(np.int64)
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    raise ModelUsageError(f"{name} must hold integers, got dtype {array.dtype}; convert with .astype(int)")


def alphabet_text(alphabet: list[str], limit: int | None = None) -> str:
    """Single characters as one quoted string (text, SMILES), longer symbols space-separated (SELFIES)."""
    characters = all(len(symbol) == 1 for symbol in alphabet)
    shown = alphabet[:limit] if limit else alphabet
    text = repr("".join(shown)) if characters else " ".join(shown)
    return text + ("…" if len(shown) < len(alphabet) else "")


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ModelUsageError(f"{name}={value!r} must be a positive integer")
    return int(value)


class Model:
    """A trained network with the questions it can answer: log_prob, sample, infill, conditionals, encode/decode."""

    def __init__(self, net, dataset: dict, kind: str, architecture: dict, has_marginal: bool, step=None, order=None,
                 config=None, source=None, device="cpu"):
        self.net = net.eval()
        self.dataset_info = data_description(dataset)
        self.kind = kind                    # checkpoint kind: ao_arm | mam | energy
        self.architecture = architecture
        self.has_marginal = bool(has_marginal)
        self.step = step
        self.order = order                  # None: any order; forward | backward: a fixed-order ARM baseline
        self.config = config or {}          # the training run's resolved config
        self.source = source
        self.device = torch.device(device)
        self._codec = None
        self._log_normalizer = None

    @classmethod
    def from_checkpoint(cls, path, device="cpu", kinds=CHECKPOINT_KINDS, expected_data: dict | None = None,
                        image_shape=None) -> "Model":
        """``expected_data``: a dataset description the checkpoint must match (the scripts pass their dataset's)."""
        net, payload, _ = net_from_checkpoint(path, kinds, expected_data, torch.device(device), image_shape=image_shape)
        return cls(net, payload["dataset"], payload["kind"], payload["arch"], payload["has_marginal"], step=payload.get("step"),
                   order=arm_order(payload), config=payload.get("config"), source=str(path), device=device)

    @classmethod
    def from_folder(cls, folder, device="cpu") -> "Model":
        """A folder written by :func:`export_model`: safetensors weights and JSON, nothing unpickled."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = read_export_config(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file() or file_digest(weights) != config["weights_sha256"]:
            raise CheckpointError(f"{weights} is missing or damaged (its SHA-256 does not match {CONFIG_FILE}); "
                                  "export the checkpoint again")
        net = build_net(config["architecture"], config["dataset"], config["has_marginal"])
        load_model_state(net, load_file(weights), weights)
        return cls(net.to(device), config["dataset"], config["kind"], config["architecture"], config["has_marginal"],
                   step=config["step"], order=config["order"], config=config["training_config"], source=str(folder),
                   device=device)

    # -- what it is ------------------------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return self.dataset_info["name"]

    @property
    def num_classes(self) -> int:
        return int(self.dataset_info["K"])

    @property
    def num_positions(self) -> int:
        return int(self.dataset_info["D"])

    K = num_classes
    D = num_positions

    @property
    def alphabet(self) -> list[str] | None:
        return self.dataset_info.get("alphabet")

    @property
    def methods(self) -> tuple[str, ...]:
        """The ``method=`` values log_prob accepts for this model."""
        return METHODS if self.has_marginal else ("chain",)

    @property
    def description(self) -> str:
        if self.kind == "ao_arm":
            return "stage-1 AO-ARM (any-order conditionals, no marginal network)"
        if self.kind == "mam":
            return "stage-2 MaM (a marginal network trained on any-order conditionals)"
        if self.has_marginal:
            return "energy-based MaM (a marginal network and any-order conditionals)"
        return f"energy-based ARM baseline (one fixed {self.order} order)"

    def __repr__(self) -> str:
        info = self.dataset_info
        parameters = sum(p.numel() for p in self.net.parameters())
        alphabet = f", alphabet {alphabet_text(self.alphabet, limit=27)}" if self.alphabet else ""
        target = info.get("target") or {}
        target_text = ", ".join(f"{k}={target[k]}" for k in ("metric_name", "target_value", "tau", "sigma", "bias") if k in target)
        return (f"Model: {self.description}; {self.architecture.get('name')} backbone, {parameters / 1e6:.3g}M parameters, "
                f"trained {self.step if self.step is not None else '?'} steps on {self.dataset} ({info['kind']} data, "
                f"D={self.num_positions} positions, K={self.num_classes} values{alphabet})"
                f"{f'; energy target {target_text}' if target_text else ''}. log_prob methods: {', '.join(self.methods)}; "
                f"on {self.device}; from {self.source}.")

    # -- inputs ----------------------------------------------------------------------------------------
    def values(self, x, observed_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, observed_mask) in the value convention from a -1-coded array, or from values plus a mask; checked."""
        array = as_int_array(x, "x")
        K, D = self.num_classes, self.num_positions
        if array.ndim != 2 or array.shape[1] != D:
            raise ModelUsageError(f"x has shape {tuple(array.shape)}; this model takes (B, {D}) rows (one row: x[None])")
        if observed_mask is None:
            bad = (array < -1) | (array >= K)
            if bad.any():
                raise ModelUsageError(f"x holds the value {int(array[bad][0])}; values must be 0..{K - 1}, with -1 for missing")
            return from_missing_coded(array)
        mask = as_int_array(observed_mask, "observed_mask")
        if mask.shape != array.shape or not np.isin(mask, (0, 1)).all():
            raise ModelUsageError(f"observed_mask must be a bool array of x's shape {tuple(array.shape)}, "
                                  f"got shape {tuple(mask.shape)}")
        mask = mask.astype(bool)
        bad = mask & ((array < 0) | (array >= K))
        if bad.any():
            raise ModelUsageError(f"x holds the observed value {int(array[bad][0])}; observed values must be 0..{K - 1}")
        return torch.as_tensor(np.where(mask, array, 0)), torch.as_tensor(mask)

    def ranks(self, batch_size: int):
        """The generation order for ``batch_size`` rows: the ARM baseline's fixed one, else None (random per call)."""
        return None if self.order is None else fixed_order(batch_size, self.num_positions, self.order, device=self.device)

    def check_prefix(self, observed_mask: torch.Tensor, what: str) -> None:
        """A fixed-order ARM knows p(x_S) and p(. | x_S) only when S is a prefix of its order."""
        if self.order is None:
            return
        prefix = fixed_order(len(observed_mask), self.num_positions, self.order) < observed_mask.sum(1, keepdim=True)
        if not torch.equal(observed_mask, prefix):
            first = "first" if self.order == "forward" else "last"
            raise ModelUsageError(f"this ARM baseline generates positions in {self.order} order, so {what} needs the observed "
                                  f"positions of every row to be a prefix of that order (the {first} k positions); "
                                  "use a MaM checkpoint for other sets")

    def log_prob_function(self, method: str, orders: int = 1, steps_per_pass: int = 1):
        """``function(x, observed_mask)`` on the model's device -> float64 (B,) log p(x_S)."""
        if method not in METHODS:
            raise ModelUsageError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
        orders, steps_per_pass = positive_int(orders, "orders"), positive_int(steps_per_pass, "steps_per_pass")
        if method == "marginal":
            if not self.has_marginal:
                raise ModelUsageError(f"method='marginal' needs a marginal network; this {self.description} has none: "
                                      "use method='chain' (score.network=conditional in the scripts)")
            if self._log_normalizer is None:  # the weights are frozen: f(empty) once, then one pass per query
                self._log_normalizer = log_normalizer(self.net, self.device)
            return lambda x, mask: normalized_log_marginal(self.net, x, mask, self._log_normalizer)
        if self.order is not None:  # one fixed order: orders > 1 would repeat the same value
            return lambda x, mask: arm.chain_rule_log_prob(self.net, x, mask, order=self.ranks(len(x)), steps_per_pass=steps_per_pass)
        return lambda x, mask: arm.ensemble_log_prob(self.net, x, orders, mask, steps_per_pass)

    # -- questions -------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_prob(self, x, observed_mask=None, method: str = "marginal", orders: int = 1, batch_size: int = 256,
                 seed=None, steps_per_pass: int = 1) -> np.ndarray:
        """float64 (B,) natural-log p(x_S) of each row's observed part.

        ``marginal``: f(x_S) - f(empty), one network pass (models with a marginal network). ``chain``: the chain rule of
        the conditionals along ``orders`` random orders, log of the mean of their probabilities (an ARM baseline: its
        own order, for prefixes of it only). ``steps_per_pass`` chain steps share one network pass (faster, more memory).
        """
        from .experiment import batched

        x, mask = self.values(x, observed_mask)
        function = self.log_prob_function(method, orders, steps_per_pass)
        self.check_prefix(mask, f"log_prob(method={method!r})")
        with seeded(seed, self.device):
            return batched(function, x, mask, positive_int(batch_size, "batch_size"), self.device, desc="log_prob").numpy()

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, seed=None, batch_size: int = 256, return_log_prob: bool = False):
        """int64 (n, D) samples by ancestral sampling (random orders; an ARM baseline: its own order).

        ``return_log_prob``: also float64 (n,) log p of each sample along the order that drew it (temperature 1 only):
        for a MaM a single-order value, the exact density of the (sample, order) pair, as importance weights need.
        """
        n, batch_size = positive_int(n, "n"), positive_int(batch_size, "batch_size")
        temperature = self._temperature(temperature)
        if return_log_prob and temperature != 1.0:
            raise ModelUsageError(f"return_log_prob needs temperature=1 (got {temperature}): the log-probabilities are "
                                  "those of the model, not of the tempered sampler")
        chunks, log_probs = [], []
        with seeded(seed, self.device):
            for start in range(0, n, batch_size):
                size = min(batch_size, n - start)
                drawn = arm.sample_unconditional(self.net, size, order=self.ranks(size), temperature=temperature,
                                                 device=self.device, return_log_prob=return_log_prob)
                if return_log_prob:
                    drawn, log_prob = drawn
                    log_probs.append(log_prob.cpu())
                chunks.append(drawn.cpu())
        samples = torch.cat(chunks).numpy()
        return (samples, torch.cat(log_probs).numpy()) if return_log_prob else samples

    @torch.no_grad()
    def infill(self, x, observed_mask=None, temperature: float = 1.0, seed=None, batch_size: int = 256) -> np.ndarray:
        """int64 (B, D): every missing position drawn from p(. | x_S); the observed values are kept exactly."""
        from .experiment import batched

        x, mask = self.values(x, observed_mask)
        temperature = self._temperature(temperature)
        self.check_prefix(mask, "infill")
        if not len(x):
            return x.numpy()
        draw = lambda rows, known: arm.sample(self.net, rows, known, order=self.ranks(len(rows)), temperature=temperature)
        with seeded(seed, self.device):
            return batched(draw, x, mask, positive_int(batch_size, "batch_size"), self.device, desc="infill").numpy()

    @torch.no_grad()
    def conditionals(self, x, observed_mask=None, batch_size: int = 256) -> np.ndarray:
        """float64 (B, D, K) p(x_j = k | x_S) for every position j; an observed position is certain of its value.

        An ARM baseline (prefix evidence only) defines in one pass just the next position of its order; the other
        unobserved positions are NaN.
        """
        from .experiment import batched

        x, mask = self.values(x, observed_mask)
        self.check_prefix(mask, "conditionals")
        if not len(x):
            return np.zeros((0, self.num_positions, self.num_classes))

        def probabilities(rows, known):
            probs = arm.conditional_log_probs(self.net, rows, known).double().exp()
            probs = torch.where(known.unsqueeze(-1), torch.nn.functional.one_hot(rows, self.num_classes).double(), probs)
            if self.order is not None:
                defined = known | (self.ranks(len(rows)) == known.sum(1, keepdim=True))
                probs = torch.where(defined.unsqueeze(-1), probs, torch.full_like(probs, math.nan))
            return probs

        return batched(probabilities, x, mask, positive_int(batch_size, "batch_size"), self.device, desc="conditionals").numpy()

    @staticmethod
    def _temperature(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise ModelUsageError(f"temperature={value!r} must be a positive number")
        return float(value)

    # -- strings ---------------------------------------------------------------------------------------
    def _strings(self, what: str):
        """The dataset's own encoder/decoder (mamlib/data/base.py), rebuilt from the stored description."""
        if self._codec is None:
            info = self.dataset_info
            if not self.alphabet or info["kind"] not in ("text", "molecule"):
                raise ModelUsageError(f"{what} needs text or molecule data; {self.dataset} ({info['kind']}) has no alphabet: "
                                      "pass integer arrays instead")
            from .data.base import DiscreteDataset, tensor_dataset

            empty = tensor_dataset(np.zeros((0, self.num_positions), dtype=np.int64))
            self._codec = DiscreteDataset(name=self.dataset, kind=info["kind"], num_classes=self.num_classes,
                                          num_positions=self.num_positions, train=empty, val=empty, test=empty,
                                          alphabet=list(self.alphabet), padding_symbol=info["padding_symbol"])
        return self._codec

    def encode(self, strings) -> np.ndarray:
        """int64 (B, D) rows of a string or a list of strings, -1 = missing: text '_' (and past the end of a shorter
        string); molecules '[?]', in the model's own notation (SMILES or SELFIES), padded with the padding symbol."""
        codec = self._strings("encode")
        strings = [strings] if isinstance(strings, str) else list(strings)
        if not strings:
            return np.zeros((0, self.num_positions), dtype=np.int64)
        try:
            return np.stack([codec.encode(string) for string in strings]).reshape(len(strings), self.num_positions)
        except (ValueError, TypeError) as error:
            raise ModelUsageError(str(error)) from None

    def decode(self, rows) -> list[str] | str:
        """Strings of (B, D) rows (a list) or of one (D,) row (a str); -1 shows as '_' (text) or '[?]' (molecules)."""
        codec = self._strings("decode")
        array = as_int_array(rows, "rows")
        try:
            return codec.decode(array) if array.ndim == 1 else [codec.decode(row) for row in array]
        except (ValueError, TypeError) as error:
            raise ModelUsageError(str(error)) from None


# -- export ----------------------------------------------------------------------------------------

def read_export_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}); export the checkpoint again") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} was not written by mode=export (no \"format\": \"{EXPORT_FORMAT}\")")
    if config.get("format_version") != EXPORT_VERSION:
        raise CheckpointError(f"{path} has export format {config.get('format_version')}, this code reads {EXPORT_VERSION}; "
                              "export the checkpoint again with this version")
    return config


def is_export_folder(folder: Path) -> bool:
    try:
        read_export_config(folder)
        return True
    except CheckpointError:
        return False


def check_export_target(folder: Path, overwrite: bool) -> None:
    """Refuse before any work: a file, a non-empty folder without overwrite, or (even with it) a folder that is no export."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"export.dir={folder} is a file; give a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise OutputError(f"export.dir={folder} already exists and is not empty; pass overwrite=true to replace it, "
                              "or choose another export.dir")
        if not is_export_folder(folder):  # never delete a folder of the user's own files
            raise OutputError(f"export.dir={folder} holds files that mode=export did not write; overwrite=true replaces "
                              "only an earlier export: choose another export.dir")


def write_folder_atomic(folder: Path, files: dict[str, bytes | str], overwrite: bool) -> Path:
    """Write every file into a temporary sibling folder, then rename it into place: readers never see half an export."""
    check_export_target(folder, overwrite)
    temp = temp_path_for(folder)
    try:
        temp.mkdir(parents=True)
        for name, content in files.items():
            if isinstance(content, str):
                write_text_atomic(temp / name, content)
            else:
                atomic_write(temp / name, lambda handle, data=content: handle.write(data))
        if folder.is_dir() and any(folder.iterdir()):  # an earlier export (checked above): swap it out, then delete it
            old = temp_path_for(folder)
            os.rename(folder, old)
            os.rename(temp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, folder)  # replaces an empty folder
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise OutputError(f"could not write {folder}: {error.strerror or error}; "
                              "free disk space or choose a writable export.dir") from error
        raise
    return folder


def run_folder_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def run_metrics(run_dir: Path) -> tuple[dict, str | None]:
    """(figures, file name) of the run's evaluation (metrics.json, else results.json); ({}, None) when there is none."""
    for name in ("metrics.json", "results.json"):
        path = run_dir / name
        if path.is_file():
            try:
                figures = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(figures, dict):
                return figures, name
    return {}, None


SCRIPT_SUFFIX = {"image": "image", "text": "text", "molecule": "mol", "array": "seq"}
ENERGY_SCRIPTS = {"ising": "ising_eb", "molecule": "mol_property_eb"}
# options that do not change what training produced (outputs, modes, logging)
NON_TRAINING_KEYS = {"mode", "loadpath", "overwrite", "resume", "debug", "device", "hydra.run.dir"}
NON_TRAINING_GROUPS = ("hydra.", "export.", "score.", "generate.", "logger.")


def training_script(config: dict, info: dict) -> str | None:
    """The entry script that trained the run (``ao_arm/text_main.py`` ...), from its stored config."""
    stage = config.get("stage")
    if stage == "eb" and config.get("target") in ENERGY_SCRIPTS:
        return f"mam/{ENERGY_SCRIPTS[config['target']]}_main.py"
    if stage in ("ao_arm", "mam") and info.get("kind") in SCRIPT_SUFFIX:
        return f"{stage}/{SCRIPT_SUFFIX[info['kind']]}_main.py"
    return None


def training_overrides(run_dir: Path, config: dict) -> list[str] | None:
    """The run folder's recorded command-line overrides (Hydra's .hydra/overrides.yaml, i.e. the last command run
    there) without output-only options; stage 2 always names its stage-1 checkpoint. None when nothing is recorded."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        entries = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return None
    if any(str(entry).replace(" ", "") == "mode=export" for entry in entries):
        return None  # mode=export ran in this run folder and Hydra recorded its own command over the earlier one
    kept = []
    for entry in entries:
        key = str(entry).split("=", 1)[0].lstrip("+~")
        if key not in NON_TRAINING_KEYS and not key.startswith(NON_TRAINING_GROUPS):
            kept.append(str(entry))
    if config.get("stage") == "mam" and config.get("loadpath_pretrain"):
        kept = [o for o in kept if o.split("=", 1)[0] not in ("load_pretrain", "loadpath_pretrain")]
        kept += ["load_pretrain=True", f"loadpath_pretrain={config['loadpath_pretrain']}"]
    return kept


SUMMARY_FIGURES = (
    ("nll_bits_per_dim", "test NLL, bits per dimension (chain rule over random orders)"),
    ("orders", "orders combined for the test NLL"),
    ("num_examples", "test examples"), ("num_test_examples", "test examples"),
    ("marginal_gap_nats", "mean gap of the marginal network to the AO-ARM-E reference (nats)"),
    ("speedup_vs_AO-ARM-S", "speed-up of one marginal pass over the chain rule along one order (AO-ARM-S)"),
    ("speedup_vs_AO-ARM-E", "speed-up of one marginal pass over the chain-rule ensemble (AO-ARM-E)"),
)


def metrics_section(metrics: dict, source: str | None) -> list[str]:
    from .evaluation import markdown_table

    if not metrics:
        return ["No evaluation figures were found next to the checkpoint (run mode=eval, or mode=evaluate for "
                "energy-based runs, in the run folder before exporting); metrics.json is {}."]
    lines = [f"From the run folder's {source} (copied to {METRICS_FILE} here):", ""]
    table = metrics.get("table")
    rows = [table] if isinstance(table, dict) else table if isinstance(table, list) else []
    if rows and all(isinstance(row, dict) for row in rows):
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines += [markdown_table(rows, columns).rstrip(), ""]
    for key, label in SUMMARY_FIGURES:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"- {label}: {value:.4g}")
    pooled = metrics.get("pooled_marginal_vs_ensemble")
    if isinstance(pooled, dict) and "spearman" in pooled:
        lines.append(f"- correlation of the marginal network with AO-ARM-E, pooled over all groups: "
                     f"Spearman {pooled['spearman']:.4g}, Pearson {pooled.get('pearson', float('nan')):.4g}")
    return lines


def model_card(model: Model, checkpoint: Path, metrics: dict, metrics_source: str | None, run_dir: Path) -> str:
    info, config = model.dataset_info, model.config
    script = training_script(config, info)
    overrides = training_overrides(run_dir, config)
    if script and overrides is not None:
        folder, name = script.split("/")
        training = [f"Reconstructed command (the script from the stored config; the overrides as recorded in the run "
                    f"folder's .hydra/overrides.yaml, which holds the last command run there, without output options):", "",
                    f"    cd {folder} && python {name} {' '.join(shlex.quote(o) for o in overrides)}".rstrip()]
    elif script:
        training = [f"Trained with `{script}` (stage {config.get('stage')}); the command-line overrides were not recorded."]
    else:
        training = ["The training script is not recorded in the checkpoint."]
    training += ["", f"The complete resolved training configuration is `training_config` in {CONFIG_FILE}."]
    alphabet = f"; alphabet of {len(model.alphabet)} symbols: `{alphabet_text(model.alphabet)}`" if model.alphabet else ""
    target = info.get("target")
    lines = [
        f"# {model.dataset}: {model.description}", "",
        f"A {model.description}, trained for {model.step if model.step is not None else 'an unrecorded number of'} steps. Backbone: {model.architecture.get('name')} "
        f"({sum(p.numel() for p in model.net.parameters()):,} parameters). log_prob methods: {', '.join(model.methods)}. "
        f"Exported from `{checkpoint.name}` by `mode=export` (export format {EXPORT_VERSION}).", "",
        "## Data", "",
        f"`{model.dataset}` ({info['kind']} data): D = {model.num_positions} positions, K = {model.num_classes} values"
        f"{alphabet}." + (f" Energy target: `{json.dumps(target)}`." if target else ""), "",
        "## Training", "", *training, "",
        "## Results", "", *metrics_section(metrics, metrics_source), "",
        "## Use", "",
        "```python",
        "import mamlib",
        "",
        "model = mamlib.load(\"path/to/this/folder\")  # safetensors + JSON: nothing is unpickled",
        "print(model)",
        "x = model.sample(4, seed=0)",
        "x[:, model.num_positions // 2:] = -1          # -1 = missing",
        f"print(model.log_prob(x, method={model.methods[0]!r}))",
        "```", "",
        f"Files: `{WEIGHTS_FILE}` (weights), `{CONFIG_FILE}` (kind, architecture, data, training config, step), "
        f"`{METRICS_FILE}` (evaluation figures), `{CARD_FILE}` (this card).", "",
    ]
    return "\n".join(lines)


def export_model(checkpoint, folder, overwrite: bool = False, kinds=CHECKPOINT_KINDS) -> Path:
    """Write ``folder`` with model.safetensors, config.json, metrics.json and README.md, all at once."""
    from safetensors.torch import save

    checkpoint, folder = Path(checkpoint), Path(folder)
    check_export_target(folder, overwrite)
    model = Model.from_checkpoint(checkpoint, kinds=kinds)
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.net.state_dict().items()}
    weights = save(state, metadata={"format": EXPORT_FORMAT})
    run_dir = run_folder_of(checkpoint)
    metrics, metrics_source = run_metrics(run_dir)
    config = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "kind": model.kind,
              "description": model.description, "architecture": model.architecture, "has_marginal": model.has_marginal,
              "order": model.order, "dataset": model.dataset_info, "step": model.step,
              "weights_sha256": hashlib.sha256(weights).hexdigest(),
              "source_checkpoint": {"name": checkpoint.name, "sha256": file_digest(checkpoint)},
              "training_config": model.config}
    files = {WEIGHTS_FILE: weights, CONFIG_FILE: json.dumps(config, indent=2, default=str) + "\n",
             METRICS_FILE: json.dumps(metrics, indent=2, default=str) + "\n",
             CARD_FILE: model_card(model, checkpoint, metrics, metrics_source, run_dir)}
    return write_folder_atomic(folder, files, overwrite)
