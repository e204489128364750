"""What every entry script's Hydra main does: check the config, run the stage, report the project's errors in one line.

An error the user can fix prints ``error: <what and the fix>`` on one line and exits with code 2; the full traceback
appears only with ``HYDRA_FULL_ERROR=1`` or ``debug=true``. Anything else (a bug) keeps its traceback.
"""
from __future__ import annotations

import importlib
import linecache
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .errors import ConfigError, UserError

PACKAGE_DIR = Path(__file__).resolve().parent
USER_ERROR_EXIT_CODE = 2


@dataclass(frozen=True)
class Field:
    """Type and range of one config value."""
    kind: type                  # int, float, bool or str
    low: float | None = None    # smallest allowed value
    strict: bool = False        # ``low`` itself is not allowed
    below: float | None = None  # values must be smaller than this
    high: float | None = None   # largest allowed value
    null: bool = False          # None (null) is allowed
    choices: tuple = ()


def positive(kind, null=False):
    return Field(kind, 0, strict=True, null=null)


def at_least(low, kind=int, null=False):
    return Field(kind, low, null=null)


def one_of(*choices):
    return Field(str, choices=choices)


# Every typed key any script defines; a key absent from a script's config is skipped.
FIELDS: dict[str, Field] = {
    "seed": at_least(0), "resume": Field(bool), "overwrite": Field(bool), "debug": Field(bool), "compile": Field(bool),
    "device": Field(str), "loadpath": Field(str, null=True), "data_dir": Field(str, null=True),
    "logger.mode": one_of("offline", "online", "disabled"),
    "marginal_init": one_of("scratch", "conditional"),
    "train.n_epochs": at_least(1), "train.max_steps": at_least(1, null=True), "train.max_minutes": positive(float, null=True),
    "train.batch_size": at_least(1), "train.effective_batch": at_least(1, null=True), "train.optimizer": one_of("adam", "adamw"),
    "train.lr": positive(float), "train.weight_decay": at_least(0, float), "train.clip": Field(float, null=True),
    "train.precision": one_of("fp32", "bf16", "auto"), "train.log_every": at_least(1), "train.checkpoint_every": at_least(1, null=True),
    "train.eval_every": at_least(1, null=True),
    "eval.mc_ll": at_least(1), "eval.num_examples": at_least(1, null=True), "eval.val_examples": at_least(1),
    "eval.batch_size": at_least(1), "eval.steps_per_pass": at_least(1), "eval.precision": one_of("fp32", "bf16", "auto"), "eval.num_samples": at_least(1),
    "eval.quality_examples": at_least(1), "eval.val_samples": at_least(1), "grad_variance.num_batches": at_least(2),
    "grad_variance.batch_size": at_least(2, null=True), "grad_variance.arm_loadpath": Field(str, null=True), "eval.variants_per_level": at_least(1), "eval.group_size": at_least(1),
    "eval.num_groups": at_least(1), "eval.timing_batch": at_least(1), "eval.timing_repeats": at_least(1),
    "eval.threshold": at_least(0, float),
    "generate.num_samples": at_least(1), "generate.batch_size": at_least(1), "generate.temperature": positive(float),
    "generate.start": at_least(0), "generate.end": at_least(0), "generate.conditional_samples": at_least(1),
    "generate.moses_reference_size": at_least(2, null=True),
    "score.input": Field(str, null=True), "score.output": Field(str, null=True), "score.orders": at_least(1),
    "score.network": one_of("marginal", "conditional"), "export.dir": Field(str, null=True),
    "dataset.K": at_least(2), "dataset.seq_len": at_least(1), "dataset.max_chars": at_least(1, null=True),
    "dataset.val_fraction": at_least(0, float), "dataset.test_fraction": at_least(0, float),
    "load_pretrain": Field(bool), "loadpath_pretrain": Field(str, null=True), "freeze_conditional": Field(bool),
    "include_onpolicy": Field(bool), "onpolicy_init": one_of("samples", "data", "regenerated"), "gibbs_steps": at_least(1),
    "init_from": Field(str, null=True),
    "warm_start.objective": Field(str, null=True, choices=("KL", "squared", "mcmc_mle")),
    "warm_start.fraction": Field(float, 0, strict=True, below=1.0),
    "model": one_of("MAM", "ARM"), "objective": one_of("KL", "squared", "mcmc_mle"), "keep_chains": Field(bool, null=True),
    "logp_mc": Field(bool), "alpha": at_least(0, float),
    "zlr": positive(float), "arm_order": one_of("forward", "backward"), "steps_per_epoch": at_least(1),
    "tau": positive(float), "L": at_least(1), "target_value": Field(float), "metric_name": one_of("logP", "QED", "SA"),
    "string_type": Field(str), "load_full": Field(bool), "dataset.max_len": at_least(1, null=True),
    "ising_model.dim": at_least(2), "ising_model.width": at_least(1, null=True), "ising_model.sigma": Field(float),
    "ising_model.bias": Field(float), "ising_model.n_samples": at_least(1), "ising_model.gt_steps": at_least(0),
    "step_surprise_share": Field(float, 0, below=1.0), "level_fit_rows": at_least(0), "level_fit_split": one_of("train", "val"),
    "level_fit_cells": Field(bool), "level_fit_size_buckets": at_least(0),
    "arch.marginal_head": one_of("pooled", "sum"),
    "train.lr_schedule": one_of("constant", "cosine"), "train.warmup_steps": at_least(0), "train.eval_at_start": Field(bool),
    "train.activation_checkpointing": Field(bool),
    "train.ema_decay": Field(float, 0, null=True, below=1.0),
    "eval.gap_examples": at_least(0), "eval.gap_val_examples": at_least(0), "eval.drift_rows": at_least(0),
    "eval.figure_examples": at_least(0),
}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_field(key: str, value, field: Field) -> None:
    if value is None:
        if not field.null:
            raise ConfigError(f"{key} must be set ({key}=...)")
        return
    ok_type = (isinstance(value, field.kind) and not (field.kind is not bool and isinstance(value, bool))) or \
        (field.kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok_type:
        raise ConfigError(f"{key}={value!r} is not {TYPE_NAMES[field.kind]}; give e.g. {key}={example(field)}")
    if field.kind is float and not math.isfinite(value):
        raise ConfigError(f"{key}={value} is not a finite number")
    if field.choices and value not in field.choices:
        raise ConfigError(f"{key}={value!r} is unknown; use one of {', '.join(field.choices)}")
    if field.low is not None and (value < field.low or (field.strict and value == field.low)):
        bound = f"> {field.low}" if field.strict else f">= {field.low}"
        raise ConfigError(f"{key}={value} is out of range: it must be {bound}")
    if field.high is not None and value > field.high:
        raise ConfigError(f"{key}={value} is out of range: it must be <= {field.high}")
    if field.below is not None and value >= field.below:
        raise ConfigError(f"{key}={value} is out of range: it must be < {field.below}")


def example(field: Field) -> str:
    if field.choices:
        return field.choices[0]
    return {int: str(max(1, int(field.low or 1))), float: "0.001", bool: "true", str: "<text>"}[field.kind]


def validate(cfg: DictConfig) -> None:
    """Check every known key once, up front: types, ranges and choices (ConfigError naming the key and the fix)."""
    for key, field in FIELDS.items():
        try:
            value = OmegaConf.select(cfg, key, default=KeyError, throw_on_missing=True)
        except MissingMandatoryValue:
            raise ConfigError(f"{key} must be given ({key}=...)") from None
        if value is not KeyError:
            check_field(key, value, field)
    level_fit_rows = OmegaConf.select(cfg, "level_fit_rows", default=0)
    if level_fit_rows and OmegaConf.select(cfg, "arch.marginal_head", default="pooled") != "sum":
        raise ConfigError(f"level_fit_rows={level_fit_rows} shifts the sum head's per-position scores: "
                          "add arch.marginal_head=sum, or set level_fit_rows=0")
    if OmegaConf.select(cfg, "level_fit_cells", default=False) and not level_fit_rows:
        raise ConfigError("level_fit_cells=true fits per-cell corrections on the level fit's draws: add level_fit_rows=N "
                          "(e.g. 32768), or set level_fit_cells=false")
    if OmegaConf.select(cfg, "level_fit_size_buckets", default=0) and not OmegaConf.select(cfg, "level_fit_cells", default=False):
        raise ConfigError("level_fit_size_buckets fits a correction by |S| together with the cells: add level_fit_cells=true, "
                          "or set level_fit_size_buckets=0")


def reject_added_keys() -> None:
    """``+key=`` and ``++key=`` add keys the script does not define; they would be ignored, so they fail."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        if override.is_add() or override.is_force_add():
            raise ConfigError(f"unknown key '{override.key_or_group}' (from '{override.input_line}'): "
                              "this script defines no such option; drop the override or fix its name "
                              "(`--cfg job` lists every key)")


def raised_by_project(error: BaseException) -> bool:
    """A UserError, or a ValueError/TypeError/FileNotFoundError from a ``raise`` statement in mamlib itself
    (those carry messages written for the user); not errors from inside torch, numpy or Python."""
    if isinstance(error, UserError):
        return True
    if not isinstance(error, (ValueError, TypeError, FileNotFoundError)):
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return False
    filename = frame.tb_frame.f_code.co_filename
    inside = Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    return inside and linecache.getline(filename, frame.tb_lineno).strip().startswith("raise")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def run_script(cfg: DictConfig, stage: str) -> None:
    """Validate ``cfg`` and run ``mamlib.stages.<stage>.run(cfg)``; the project's errors end the process with code 2."""
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or OmegaConf.select(cfg, "debug", default=False) is True
    try:
        reject_added_keys()
        validate(cfg)
        importlib.import_module(f"mamlib.stages.{stage}").run(cfg)
    except Exception as error:
        if debug or not raised_by_project(error):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)


CONFIG_DIR = PACKAGE_DIR.parent / "configs"


def compose_config(config_name: str, overrides: list[str], return_hydra_config: bool = False):
    """An entry script's config composed with ``overrides``, as its Hydra main would see it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)


def check_command_line(config_name: str, argv: list[str] | None = None) -> None:
    """Compose ``config_name`` with the command line's overrides before Hydra runs, so that Hydra's own errors (an
    unknown key or option, bad override syntax) are one ``error:`` line with exit code 2 like the project's.

    Skipped when Hydra flags are given (``--cfg``, ``--multirun``, ``--help`` ...): Hydra handles those itself.
    """
    argv = sys.argv[1:] if argv is None else argv
    if any(arg.startswith("-") for arg in argv) or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose_config(config_name, argv, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        message = one_line(error).split(" Config search path:")[0]  # the search path is noise for a mistyped option
        if message.startswith("Could not override '") and "To append to your config use +" in message:
            key = message.split("'")[1]
            message = (f"unknown key '{key}': this script defines no such option; drop the override or fix its name "
                       "(`--cfg job` lists every key)")
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT_CODE)
