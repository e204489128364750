"""Use a trained model from Python, and export it as a folder that loads without pickle.

    model = mamlib.load("<run dir>/checkpoints/last.pt")    # or a folder written by mode=export; device="auto"
    model.log_prob(x)                                       # x: (B, D) ints, -1 = missing -> float64 (B,)
    model.log_prob(x, given=mask)                           # log p(x_{A minus B} | x_B), B = mask, A = observed

``Model`` is a ``torch.nn.Module``. Every method takes either one array with -1 at missing positions, or
``(x, observed_mask)`` in the library's value convention (mamlib/orders.py): a (B, D) batch, one (D,) row, or for image
models (B, H, W) / (B, 1, H, W). Outputs follow the input: torch in -> torch on the model's device, numpy or lists in
-> numpy; one row in -> no batch axis out. Log-probabilities are float64 natural logs, values int64. ``log_prob`` is
differentiable for torch inputs under grad mode. ``seed=None`` draws from torch's global generator; an int gives the
same result on every call without touching it; ``generator=`` (a torch.Generator on the model's device) is used instead.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelHubMixin

from . import arm
from .checkpoint import CheckpointError, check_same_data, load_checkpoint, load_model_state
from .errors import OutputError, UserError
from .files import atomic_write, file_digest, temp_path_for, write_text_atomic
from .marginal import log_marginal, log_normalizer
from .orders import fixed_order, order_observed_first
from .runtime import resolve_precision, seeded, select_device

CHECKPOINT_KINDS = ("ao_arm", "mam", "energy")
METHODS = ("marginal", "chain")
PRECISIONS = ("fp32", "bf16", "auto")
EXPORT_FORMAT, EXPORT_VERSION = "mamlib-export", 1
WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE = "model.safetensors", "config.json", "metrics.json", "README.md"


class ModelUsageError(UserError, ValueError):
    """A call the model cannot answer: wrong shape, a value out of range, or a method this kind of model lacks."""


# -- loading ---------------------------------------------------------------------------------------

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def load(path, device="auto", precision: str = "fp32") -> "Model":
    """A checkpoint file (any kind the project saves), a folder written by ``mode=export`` / ``save_pretrained``, or a
    Hugging Face Hub id (``owner/name``, not an existing path), in eval mode on ``device``.

    ``device``: ``auto`` (the accelerator when present, else the CPU, as the scripts' ``device=auto``), a device name or
    a ``torch.device``. ``precision``: ``fp32``, ``bf16`` or ``auto`` for the conditional passes (:meth:`Model.set_precision`).
    """
    local = Path(path)
    if local.is_dir():
        if not (local / CONFIG_FILE).is_file():
            raise CheckpointError(f"{local} is a folder without {CONFIG_FILE}: pass a checkpoint file "
                                  "(<run dir>/checkpoints/last.pt) or a folder written by mode=export")
        return Model.from_folder(local, device, precision=precision)
    if not local.exists() and isinstance(path, str) and HUB_ID.match(path) and local.suffix not in CHECKPOINT_SUFFIXES:
        try:
            return Model.from_pretrained(path, device=device, precision=precision)
        except (CheckpointError, ModelUsageError):
            raise
        except Exception as error:  # huggingface_hub's network, cache and repository errors
            detail = (str(error).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{path} is not a local file or folder, and loading it as a Hugging Face Hub model id "
                                  f"failed ({type(error).__name__}: {detail}); pass a checkpoint file, an exported folder, "
                                  "or a Hub id that is online or in the local cache (HF_HUB_CACHE)") from None
    return Model.from_checkpoint(local, device, precision=precision)


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


class InputForm:
    """How the caller passed x (torch or numpy, one row or a batch, flat or image-shaped): outputs come back the same way."""

    def __init__(self, is_torch: bool, single: bool, row_shape: tuple):
        self.is_torch, self.single, self.row_shape = is_torch, single, row_shape

    def _out(self, tensor: torch.Tensor):
        if self.single:
            tensor = tensor[0]
        return tensor if self.is_torch else tensor.detach().cpu().numpy()

    def per_row(self, values: torch.Tensor):
        """(B,) -> (B,), or a 0-d value for one row."""
        return self._out(values)

    def rows(self, values: torch.Tensor):
        """(B, D) -> the input's own shape ((B, D), (B, H, W), (B, 1, H, W), or one row without the batch axis)."""
        return self._out(values.reshape(len(values), *self.row_shape))

    def per_position(self, values: torch.Tensor):
        """(B, D, K) -> (B, D, K), or (D, K) for one row."""
        return self._out(values)


def as_int_tensor(value, name: str, device) -> tuple[torch.Tensor, bool]:
    """(int64 tensor on ``device``, whether the caller passed a torch tensor) of an integer (or bool) array."""
    if not torch.is_tensor(value):
        return torch.from_numpy(as_int_array(value, name)).to(device), False
    tensor = value.detach()
    if tensor.is_floating_point():
        if not (bool(torch.isfinite(tensor).all()) and bool((tensor == tensor.round()).all())):
            raise ModelUsageError(f"{name} must hold integers, got dtype {tensor.dtype}; convert with .long()")
    elif tensor.is_complex():
        raise ModelUsageError(f"{name} must hold integers, got dtype {tensor.dtype}; convert with .long()")
    return tensor.long().to(device), True


def resolve_device(device) -> torch.device:
    """``auto`` (the accelerator when present, else the CPU, as the scripts' device=auto), a name, or a torch.device."""
    try:
        return select_device(str(device))
    except (RuntimeError, ValueError) as error:
        raise ModelUsageError(f"device={device!r}: {error}") from None


class Model(torch.nn.Module, ModelHubMixin, library_name="mamlib", tags=["marginalization-models"]):
    """A trained network (the submodule ``net``) with the questions it can answer: log_prob (joint, marginal and
    conditional, differentiable), sample, sample_with_log_prob, infill, log_conditionals, encode/decode.

    A ``torch.nn.Module``: ``.to(device)``, ``.device``, ``.eval()``/``.train()``, ``.parameters()`` and ``state_dict``
    work as usual; a loaded model starts in eval mode.
    """

    def __init__(self, net, dataset: dict, kind: str, architecture: dict, has_marginal: bool, step=None, order=None,
                 config=None, source=None, device=None, precision: str | None = None):
        super().__init__()
        self.net = net
        self.dataset_info = data_description(dataset)
        self.kind = kind                    # checkpoint kind: ao_arm | mam | energy
        self.architecture = architecture
        self.has_marginal = bool(has_marginal)
        self.step = step
        self.order = order                  # None: any order; forward | backward: a fixed-order ARM baseline
        self.config = config or {}          # the training run's resolved config
        self.source = source
        self._codec = None
        self._normalizer = None             # (weights' identity, f(empty)) for frozen weights
        if device is not None:
            self.to(resolve_device(device))
        if precision is not None:
            self.set_precision(precision)
        self.eval()

    @classmethod
    def from_checkpoint(cls, path, device="auto", kinds=CHECKPOINT_KINDS, expected_data: dict | None = None,
                        image_shape=None, precision: str = "fp32") -> "Model":
        """``expected_data``: a dataset description the checkpoint must match (the scripts pass their dataset's)."""
        device = resolve_device(device)
        net, payload, _ = net_from_checkpoint(path, kinds, expected_data, device, image_shape=image_shape)
        return cls(net, payload["dataset"], payload["kind"], payload["arch"], payload["has_marginal"], step=payload.get("step"),
                   order=arm_order(payload), config=payload.get("config"), source=str(path), device=device,
                   precision=precision)

    @classmethod
    def from_folder(cls, folder, device="auto", precision: str = "fp32") -> "Model":
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
        return cls(net, config["dataset"], config["kind"], config["architecture"], config["has_marginal"],
                   step=config["step"], order=config["order"], config=config["training_config"], source=str(folder),
                   device=device, precision=precision)

    # -- what it is ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are (``.to(device)`` moves them)."""
        for tensor in itertools.chain(self.net.parameters(), self.net.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def precision(self) -> str:
        """``fp32`` or ``bf16``: the precision of the conditional passes (chain rule, sampling, infill)."""
        return getattr(self.net, "conditional_precision", "fp32")

    def set_precision(self, precision: str) -> "Model":
        """``fp32``, ``bf16`` (conditional passes under bf16 autocast) or ``auto`` (bf16 where this device runs it faster).
        Marginal-network passes always run in fp32."""
        if precision not in PRECISIONS:
            raise ModelUsageError(f"precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        self.net.set_conditional_precision(resolve_precision(precision, self.device))
        return self

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
    def _row_shapes(self) -> list[tuple]:
        image = self.dataset_info.get("image_shape")
        shapes = [(self.num_positions,)]
        if image and int(np.prod(image)) == self.num_positions:
            shapes += [tuple(image), (1, *image)]
        return shapes

    def _form(self, shape: tuple, is_torch: bool) -> InputForm:
        for row in self._row_shapes():
            if len(shape) in (len(row), len(row) + 1) and tuple(shape[len(shape) - len(row):]) == row:
                return InputForm(is_torch, len(shape) == len(row), row)
        images = " or (B, H, W) / (B, 1, H, W) images" if len(self._row_shapes()) > 1 else ""
        raise ModelUsageError(f"x has shape {tuple(shape)}; this model takes (B, {self.num_positions}) rows{images}, "
                              f"or one ({self.num_positions},) row")

    def _mask(self, value, name: str, raw_shape, batch: int) -> torch.Tensor:
        mask, _ = as_int_tensor(value, name, self.device)
        if tuple(mask.shape) != tuple(raw_shape) or not bool(((mask == 0) | (mask == 1)).all()):
            raise ModelUsageError(f"{name} must be a bool array of x's shape {tuple(raw_shape)}, got shape {tuple(mask.shape)}")
        return mask.reshape(batch, self.num_positions).bool()

    def inputs(self, x, observed_mask=None, given=None):
        """(x, observed_mask, given or None, form): (B, D) tensors on the model's device in the value convention, checked,
        from a -1-coded array or from values plus a mask, and the input's form (for outputs of the same kind)."""
        raw, is_torch = as_int_tensor(x, "x", self.device)
        form = self._form(tuple(raw.shape), is_torch)
        batch = 1 if form.single else raw.shape[0]
        values = raw.reshape(batch, self.num_positions)
        K = self.num_classes
        if observed_mask is None:
            bad = (values < -1) | (values >= K)
            if bool(bad.any()):
                raise ModelUsageError(f"x holds the value {int(values[bad][0])}; values must be 0..{K - 1}, with -1 for missing")
            mask = values >= 0
        else:
            mask = self._mask(observed_mask, "observed_mask", raw.shape, batch)
            bad = mask & ((values < 0) | (values >= K))
            if bool(bad.any()):
                raise ModelUsageError(f"x holds the observed value {int(values[bad][0])}; observed values must be 0..{K - 1}")
        values = torch.where(mask, values, torch.zeros_like(values))
        condition = None
        if given is not None:
            condition = self._mask(given, "given", raw.shape, batch)
            outside = condition & ~mask
            if bool(outside.any()):
                row, position = (int(i) for i in outside.nonzero()[0])
                raise ModelUsageError(f"given marks position {position} of row {row}, which x does not observe; given must be a "
                                      "subset of the observed positions: give its value in x or unmark it in given")
        return values, mask, condition, form

    def values(self, x, observed_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, observed_mask) as (B, D) tensors on the model's device in the value convention, checked."""
        values, mask, _, _ = self.inputs(x, observed_mask)
        return values, mask

    def ranks(self, batch_size: int):
        """The generation order for ``batch_size`` rows: the ARM baseline's fixed one, else None (random per call)."""
        return None if self.order is None else fixed_order(batch_size, self.num_positions, self.order, device=self.device)

    def check_prefix(self, observed_mask: torch.Tensor, what: str) -> None:
        """A fixed-order ARM knows p(x_S) and p(. | x_S) only when S is a prefix of its order."""
        if self.order is None:
            return
        prefix = fixed_order(len(observed_mask), self.num_positions, self.order, device=observed_mask.device) \
            < observed_mask.sum(1, keepdim=True)
        if not torch.equal(observed_mask, prefix):
            first = "first" if self.order == "forward" else "last"
            raise ModelUsageError(f"this ARM baseline generates positions in {self.order} order, so {what} needs the observed "
                                  f"positions of every row to be a prefix of that order (the {first} k positions); "
                                  "use a MaM checkpoint for other sets")

    def _randomness(self, seed, generator):
        """The context for a random call: ``seed`` forks torch's generators; ``generator`` is passed to every draw."""
        if seed is not None and generator is not None:
            raise ModelUsageError("pass seed= or generator=, not both")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ModelUsageError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != self.device.type:
                raise ModelUsageError(f"generator is on {generator.device}, the model on {self.device}: "
                                      "create it with torch.Generator(device=model.device)")
        return seeded(seed, self.device)

    @staticmethod
    def _batched(function, batch_size: int, desc: str, *tensors):
        """``function`` over row chunks of the (B, ...) tensors (None passes through), concatenated on the model's device."""
        from .progress import progress

        batch_size, total = positive_int(batch_size, "batch_size"), len(tensors[0])
        outputs = [function(*(t if t is None else t[start:start + batch_size] for t in tensors))
                   for start in progress(range(0, total, batch_size), desc=desc, disable=total <= batch_size, leave=False)]
        return torch.cat(outputs) if outputs else None

    # -- log-probabilities -------------------------------------------------------------------------------
    def _log_normalizer(self):
        """f(empty): cached while the weights stay the same and nothing needs its gradient, else recomputed (with grad)."""
        tensors = list(itertools.chain(self.net.parameters(), self.net.buffers()))
        if torch.is_grad_enabled() and any(p.requires_grad for p in tensors):
            empty = torch.zeros(1, self.num_positions, dtype=torch.long, device=self.device)
            return log_marginal(self.net, empty, torch.zeros_like(empty, dtype=torch.bool)).double()[0]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._normalizer is None or self._normalizer[0] != key:
            self._normalizer = (key, log_normalizer(self.net, self.device))
        return self._normalizer[1]

    def log_prob_function(self, method: str, orders: int = 1, steps_per_pass: int = 1, generator=None):
        """``function(x, observed_mask, given=None)`` on the model's device -> float64 (B,) log p(x_A | x_given)."""
        if method not in METHODS:
            raise ModelUsageError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
        orders, steps_per_pass = positive_int(orders, "orders"), positive_int(steps_per_pass, "steps_per_pass")
        if method == "marginal":
            if not self.has_marginal:
                raise ModelUsageError(f"method='marginal' needs a marginal network; this {self.description} has none: "
                                      "use method='chain' (score.network=conditional in the scripts)")

            def marginal(x, mask, given=None):
                if given is None:
                    return log_marginal(self.net, x, mask).double() - self._log_normalizer()
                both = log_marginal(self.net, torch.cat([x, x]), torch.cat([mask, given])).double()  # one pass, 2B rows
                return both[:len(x)] - both[len(x):]

            return marginal

        def chain(x, mask, given=None):
            terms = lambda order: arm.chain_rule_log_prob(self.net, x, mask, order, steps_per_pass, given_mask=given)
            if self.order is not None:  # one fixed order: orders > 1 would repeat the same value
                return terms(self.ranks(len(x)))
            return arm.combine_orders(torch.stack([terms(order_observed_first(mask, generator=generator))
                                                   for _ in range(orders)]))

        return chain

    def log_prob(self, x, observed_mask=None, given=None, method: str = "marginal", orders: int = 1,
                 batch_size: int = 256, seed=None, generator=None, steps_per_pass: int = 1):
        """float64 (B,) natural-log p(x_A) of each row's observed part A, or with ``given`` log p(x_{A∖B} | x_B).

        ``given``: a bool mask of x's shape marking the conditioning positions B, a subset of the observed positions.
        ``marginal``: f(x_A) - f(empty), one network pass (models with a marginal network); with ``given``,
        f(x_A) - f(x_B) in one pass over 2B rows. ``chain``: the chain rule of the conditionals along ``orders`` random
        orders (B first, then the rest of A; only the terms of A∖B are computed), log of the mean of their
        probabilities (an ARM baseline: its own order, for prefixes of it only). ``steps_per_pass`` chain steps share
        one network pass (faster, more memory). Differentiable: a torch input under grad mode gives a torch output with
        gradients to ``model.parameters()``; numpy and list inputs run without autograd and return numpy.
        """
        values, mask, condition, form = self.inputs(x, observed_mask, given)
        function = self.log_prob_function(method, orders, steps_per_pass, generator)
        self.check_prefix(mask, f"log_prob(method={method!r})")
        if condition is not None:
            self.check_prefix(condition, "log_prob(given=...)")
        with self._randomness(seed, generator), torch.set_grad_enabled(torch.is_grad_enabled() and form.is_torch):
            out = self._batched(function, batch_size, "log_prob", values, mask, condition)
        if out is None:
            out = torch.zeros(0, dtype=torch.float64, device=self.device)
        return form.per_row(out)

    def forward(self, x, observed_mask=None, **options):
        """``model(x, ...)`` is :meth:`log_prob`."""
        return self.log_prob(x, observed_mask, **options)

    # -- drawing ---------------------------------------------------------------------------------------
    def _draw(self, n, temperature, seed, generator, batch_size, with_log_prob: bool, return_tensors: str):
        if return_tensors not in ("np", "pt"):
            raise ModelUsageError(f"return_tensors={return_tensors!r} is unknown; use 'np' (numpy) or 'pt' (torch)")
        n, batch_size = positive_int(n, "n"), positive_int(batch_size, "batch_size")
        temperature = self._temperature(temperature)
        chunks, log_probs = [], []
        with self._randomness(seed, generator):
            for start in range(0, n, batch_size):
                size = min(batch_size, n - start)
                drawn = arm.sample_unconditional(self.net, size, order=self.ranks(size), temperature=temperature,
                                                 device=self.device, generator=generator, return_log_prob=with_log_prob)
                if with_log_prob:
                    drawn, log_prob = drawn
                    log_probs.append(log_prob)
                chunks.append(drawn)
        convert = (lambda t: t) if return_tensors == "pt" else (lambda t: t.cpu().numpy())
        samples = convert(torch.cat(chunks))
        return (samples, convert(torch.cat(log_probs))) if with_log_prob else samples

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, seed=None, generator=None, batch_size: int = 256,
               return_tensors: str = "np"):
        """int64 (n, D) samples by ancestral sampling (random orders; an ARM baseline: its own order).

        Always one array: numpy, or a torch tensor on the model's device with ``return_tensors="pt"``.
        """
        return self._draw(n, temperature, seed, generator, batch_size, False, return_tensors)

    @torch.no_grad()
    def sample_with_log_prob(self, n: int, seed=None, generator=None, batch_size: int = 256, return_tensors: str = "np"):
        """(int64 (n, D) samples, float64 (n,) log p of each sample along the order that drew it), at temperature 1.

        For a MaM a single-order value: the exact density of the (sample, order) pair, as importance weights need.
        """
        return self._draw(n, 1.0, seed, generator, batch_size, True, return_tensors)

    @torch.no_grad()
    def infill(self, x, observed_mask=None, temperature: float = 1.0, seed=None, generator=None, batch_size: int = 256):
        """int64, x's shape: every missing position drawn from p(. | x_S); the observed values are kept exactly."""
        values, mask, _, form = self.inputs(x, observed_mask)
        temperature = self._temperature(temperature)
        self.check_prefix(mask, "infill")
        draw = lambda rows, known: arm.sample(self.net, rows, known, order=self.ranks(len(rows)), temperature=temperature,
                                              generator=generator)
        with self._randomness(seed, generator):
            out = self._batched(draw, batch_size, "infill", values, mask) if len(values) else values
        return form.rows(out)

    @torch.no_grad()
    def log_conditionals(self, x, observed_mask=None, batch_size: int = 256):
        """float64 (B, D, K) log p(x_j = k | x_S) for every position j (flattened, row-major for images); an observed
        position is certain of its value (0 there, -inf elsewhere).

        An ARM baseline (prefix evidence only) defines in one pass just the next position of its order; the other
        unobserved positions are NaN.
        """
        values, mask, _, form = self.inputs(x, observed_mask)
        self.check_prefix(mask, "log_conditionals")

        def log_probs(rows, known):
            logs = arm.conditional_log_probs(self.net, rows, known).double()
            certain = torch.nn.functional.one_hot(rows, self.num_classes).double().log()
            logs = torch.where(known.unsqueeze(-1), certain, logs)
            if self.order is not None:
                defined = known | (self.ranks(len(rows)) == known.sum(1, keepdim=True))
                logs = torch.where(defined.unsqueeze(-1), logs, torch.full_like(logs, math.nan))
            return logs

        out = self._batched(log_probs, batch_size, "log_conditionals", values, mask) if len(values) else \
            torch.zeros(0, self.num_positions, self.num_classes, dtype=torch.float64, device=self.device)
        return form.per_position(out)

    @staticmethod
    def _temperature(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise ModelUsageError(f"temperature={value!r} must be a positive number")
        return float(value)

    # -- files and the Hugging Face Hub -------------------------------------------------------------------
    def export_files(self) -> dict[str, bytes | str]:
        """The export folder's files: model.safetensors (the network's state dict), config.json, metrics.json and the
        model card README.md. Figures and the training command come from the run folder of the checkpoint the model was
        loaded from (or are carried over from the export folder it was loaded from)."""
        from safetensors.torch import save

        state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in self.net.state_dict().items()}
        weights = save(state, metadata={"format": EXPORT_FORMAT})
        source = Path(self.source) if self.source else None
        origin, checkpoint, metrics, metrics_source, run_dir = None, None, {}, None, None
        if source is not None and source.is_file():  # a checkpoint in its run folder
            run_dir = run_folder_of(source)
            metrics, metrics_source = run_metrics(run_dir)
            origin, checkpoint = {"name": source.name, "sha256": file_digest(source)}, source.name
        elif source is not None and is_export_folder(source):  # an export (local or from the Hub cache)
            origin = read_export_config(source).get("source_checkpoint")
            checkpoint = (origin or {}).get("name")
            metrics, metrics_source = run_metrics(source)
        config = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "kind": self.kind,
                  "description": self.description, "architecture": self.architecture, "has_marginal": self.has_marginal,
                  "order": self.order, "dataset": self.dataset_info, "step": self.step,
                  "weights_sha256": hashlib.sha256(weights).hexdigest(), "source_checkpoint": origin,
                  "training_config": self.config}
        return {WEIGHTS_FILE: weights, CONFIG_FILE: json.dumps(config, indent=2, default=str) + "\n",
                METRICS_FILE: json.dumps(metrics, indent=2, default=str) + "\n",
                CARD_FILE: model_card(self, checkpoint, metrics, metrics_source, run_dir)}

    def save_pretrained(self, save_directory, *, overwrite: bool = False, config=None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs=None, **push_to_hub_kwargs):
        """Write ``save_directory`` (the files of :meth:`export_files`, the format of ``mode=export``) all at once.

        A non-empty folder is replaced only with ``overwrite=True`` and only if it is an earlier export. ``push_to_hub``
        (``repo_id``, default the folder's name) uploads the folder with huggingface_hub and returns the commit's url;
        ``config`` and ``model_card_kwargs`` (of huggingface_hub's signature) are not used: the config and the card are
        the export's own. Returns None without ``push_to_hub``.
        """
        folder = write_folder_atomic(Path(save_directory), self.export_files(), overwrite)
        if push_to_hub:
            return self.push_to_hub(repo_id=repo_id or folder.name, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        """huggingface_hub's hook: the export's files into an existing folder."""
        for name, content in self.export_files().items():
            if isinstance(content, str):
                write_text_atomic(Path(save_directory) / name, content)
            else:
                atomic_write(Path(save_directory) / name, lambda handle, data=content: handle.write(data))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, device="auto", precision: str = "fp32",
                        revision: str | None = None, cache_dir=None, force_download: bool = False,
                        local_files_only: bool = False, token=None) -> "Model":
        """A folder written by ``save_pretrained`` / ``mode=export``, or a Hugging Face Hub model id (``owner/name``)
        whose files are downloaded into (or, offline with ``HF_HUB_OFFLINE=1``, read from) the huggingface_hub cache."""
        return super().from_pretrained(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                       force_download=force_download, local_files_only=local_files_only, token=token,
                                       device=device, precision=precision)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         device="auto", precision: str = "fp32", **config_fields) -> "Model":
        """huggingface_hub's hook. ``config_fields``: config.json's entries, which huggingface_hub passes along; the
        folder's own config.json is read (and checked) by :meth:`from_folder` instead."""
        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            def download(name):
                return hf_hub_download(repo_id=model_id, filename=name, revision=revision, cache_dir=cache_dir,
                                       force_download=force_download, local_files_only=local_files_only, token=token)

            folder = Path(download(CONFIG_FILE)).parent
            download(WEIGHTS_FILE)
            try:
                download(METRICS_FILE)  # the figures a later save_pretrained carries over
            except EntryNotFoundError:
                pass
        return cls.from_folder(folder, device=device, precision=precision)

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


def model_card(model: Model, checkpoint: str | None, metrics: dict, metrics_source: str | None, run_dir: Path | None) -> str:
    info, config = model.dataset_info, model.config
    script = training_script(config, info)
    overrides = training_overrides(run_dir, config) if run_dir is not None else None
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
        f"{f'Exported from `{checkpoint}`' if checkpoint else 'Saved'} by `mode=export` / `save_pretrained` "
        f"(export format {EXPORT_VERSION}).", "",
        "## Data", "",
        f"`{model.dataset}` ({info['kind']} data): D = {model.num_positions} positions, K = {model.num_classes} values"
        f"{alphabet}." + (f" Energy target: `{json.dumps(target)}`." if target else ""), "",
        "## Training", "", *training, "",
        "## Results", "", *metrics_section(metrics, metrics_source), "",
        "## Use", "",
        "```python",
        "import mamlib",
        "",
        "model = mamlib.load(\"path/to/this/folder\")  # or a Hub id; safetensors + JSON: nothing is unpickled",
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
    """Write ``folder`` with model.safetensors, config.json, metrics.json and README.md, all at once
    (:meth:`Model.save_pretrained` of the checkpoint)."""
    folder = Path(folder)
    check_export_target(folder, overwrite)  # refuse before loading anything
    Model.from_checkpoint(checkpoint, device="cpu", kinds=kinds).save_pretrained(folder, overwrite=overwrite)
    return folder
