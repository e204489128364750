"""`python -m mamlib.bench` (`make bench`): step times, peak memory and query speed of every path, in one table.

Each case builds its network from the entry scripts' own configs (composed with ``preset=cpu`` or the sizes asked
for), runs a few warm-up calls, then times ``--repeats`` calls (more for cheap cases, up to ``--min-seconds`` of
timing) and reports the median. Memory is the process's peak
resident set (VmHWM) while the case runs, after resetting it (Linux ``/proc/self/clear_refs``); elsewhere the column
is empty. Writes ``BENCH.md`` and ``bench.json`` to ``--output``. Run it on an idle machine: a second busy process
slows a 2-thread PyTorch loop several-fold.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import arm
from .cli import compose_config
from .errors import UserError
from .evaluation import markdown_table
from .experiment import make_optimizer
from .files import write_json_atomic, write_text_atomic
from .marginal import log_normalizer, normalized_log_marginal
from .nets import build_backbone
from .orders import random_order
from .progress import progress
from .runtime import autocast, fast_bf16, select_device, synchronize

# Sizes other than the presets: `compare` are the sizes at which this code was compared with the original
# (U-Net 64 channels x 2 blocks with attention, transformer d 128 x 4 layers, Ising MLP 512 x 4).
SIZE_OVERRIDES = {
    "cpu": {"preset": "cpu"},
    "compare": {"preset": "cpu", "unet": {"channels": 64, "num_res_blocks": 2, "attention": True},
                "mlp": {"hidden": 512, "num_layers": 4}},
    "paper": {"preset": "paper"},
}
ISING_SIDES = (4, 10, 20, 30)  # D = 16, 100, 400, 900
TRAIN_BATCH = 32  # maximum-likelihood training steps (the presets' own batches differ: text8's is 512)
QUERY_BATCH = 8
STEPS_PER_PASS = (1, 2, 4, 8, 16)
CHAIN_STEPS_MEASURED = 16  # chain-rule steps timed per query; the full D-step time is extrapolated from them


def peak_memory_reset() -> bool:
    """Free what earlier cases left behind, then restart the peak at the current resident set (Linux only)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed blocks; hand them back so they do not count
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mib() -> float | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


class Timer:
    """Times one case per call and advances the progress bar (one tick per case)."""

    def __init__(self, device, repeats: int, warmup: int, bar=None, min_seconds: float = 0.0, max_repeats: int = 200):
        self.device, self.repeats, self.warmup, self.bar = device, repeats, warmup, bar
        # cheap cases (tens of ms) get more calls, up to min_seconds of timing: their medians over 5 calls moved 2.7x
        self.min_seconds, self.max_repeats = min_seconds, max_repeats

    def __call__(self, fn, label: str = "") -> dict:
        """Median seconds of ``fn()`` and the peak memory of the timed calls."""
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
        for _ in range(self.warmup):
            fn()
        can_reset = peak_memory_reset()
        seconds = []
        while len(seconds) < self.repeats or (sum(seconds) < self.min_seconds and len(seconds) < self.max_repeats):
            seconds.append(self._seconds(fn))
        if self.bar is not None:
            self.bar.update(1)
        return {"median_s": statistics.median(seconds), "calls": len(seconds),
                "peak_mib": peak_memory_mib() if can_reset else None}

    def _seconds(self, fn) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        fn()
        synchronize(self.device)
        return time.perf_counter() - start

    def paired(self, first, second, label: str = "", first_per_round: int = 1) -> tuple[dict, dict]:
        """Medians of ``first()`` and ``second()`` timed in alternation, for a ratio of two cases: the machine's speed
        drifts between cases timed minutes apart (a MaM/AO-ARM-S ratio moved 0.66-0.93 D that way), and adjacent
        calls see the same drift. ``first_per_round`` calls of a cheap ``first`` per call of ``second``."""
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
        for _ in range(self.warmup):
            first(), second()
        seconds = ([], [])
        while len(seconds[1]) < self.repeats or (sum(seconds[0]) + sum(seconds[1]) < self.min_seconds
                                                  and len(seconds[1]) < self.max_repeats):
            for fn, times, calls in zip((first, second), seconds, (first_per_round, 1)):
                times.extend(self._seconds(fn) for _ in range(calls))
        if self.bar is not None:
            self.bar.update(1)
        return tuple({"median_s": statistics.median(times), "calls": len(times)} for times in seconds)


def train_step(net, loss_fn, parameters, backpropagates: bool = False):
    """One optimizer step; ``backpropagates``: loss_fn runs its own backward (an objective's loss_and_backward)."""
    optimizer = make_optimizer(parameters, OmegaConf.create({"optimizer": "adam", "lr": 1e-4, "betas": [0.9, 0.999],
                                                             "weight_decay": 0.0}))  # what training builds

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        if not backpropagates:
            loss.backward()
        optimizer.step()

    return step


def in_bf16(loss_fn, device):
    """The loss under bf16 autocast (backward and optimizer outside it), as the trainer runs ``train.precision=bf16``."""
    def loss_in_bf16():
        with autocast(device, True):
            return loss_fn()
    return loss_in_bf16


def arch_config(cfg, sizes: str):
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    arch.update(SIZE_OVERRIDES[sizes].get(arch["name"], {}))
    return OmegaConf.create(arch)


# -- cases ---------------------------------------------------------------------------------------------------------

def data_backbones(sizes: str):
    """(label, config name, overrides, K, D, image shape) of the maximum-likelihood backbones."""
    preset = SIZE_OVERRIDES[sizes]["preset"]
    return [("U-Net", "image", [f"preset={preset}", "dataset=mnist_offline"], 2, 784, (28, 28)),
            ("transformer", "text", [f"preset={preset}"], 27, 250, None)]


def maximum_likelihood_cases(sizes: str, device, timer: Timer, batch_override: int | None):
    from .stages.mam_mle import MarginalObjective

    rows = []
    for label, data, overrides, K, D, image_shape in data_backbones(sizes):
        stage1_cfg = compose_config(f"ao_arm_{data}", overrides)
        stage2_cfg = compose_config(f"mam_{data}", overrides)
        # one batch size for every backbone (also the on-policy buffer's, drawn by ancestral sampling)
        stage1_cfg.train.batch_size = stage2_cfg.train.batch_size = batch_override or TRAIN_BATCH
        generator = torch.Generator().manual_seed(0)
        common = {"backbone": label, "sizes": sizes, "D": D}

        torch.manual_seed(0)
        net = build_backbone(arch_config(stage1_cfg, sizes), K, D, image_shape=image_shape).to(device).train()
        batch = stage1_cfg.train.batch_size
        x = torch.randint(0, K, (batch, D), generator=generator).to(device)
        stage1_loss = lambda: arm.aoarm_loss(net, x)[0]
        step = train_step(net, stage1_loss, net.parameters())
        rows.append({**common, "case": "stage 1 AO-ARM step", "batch": batch, **timer(step, f"{label} stage 1")})
        if fast_bf16(device):
            step = train_step(net, in_bf16(stage1_loss, device), net.parameters())
            rows.append({**common, "case": "stage 1 AO-ARM step, train.precision=bf16", "batch": batch,
                         **timer(step, f"{label} stage 1 bf16")})

        # the paper's stage-2 step (data + on-policy rows: the original's workload), whatever a tuned config trains on
        stage2_cfg.include_onpolicy = True
        torch.manual_seed(0)
        net = build_backbone(arch_config(stage2_cfg, sizes), K, D, image_shape=image_shape, marginal=True).to(device).train()
        for name, parameter in net.named_parameters():
            parameter.requires_grad = name.startswith(net.marginal_prefixes) or not stage2_cfg.freeze_conditional
        batch = stage2_cfg.train.batch_size
        x = torch.randint(0, K, (batch, D), generator=generator).to(device)
        stand_in = type("Data", (), {"train": torch.randint(0, K, (max(batch, 64), D), generator=generator)})()
        objective = MarginalObjective(net, stage2_cfg, stand_in, device)
        objective.on_epoch_start(0)
        stage2_loss, trained = lambda: objective.loss(x)[0], [p for p in net.parameters() if p.requires_grad]
        step = train_step(net, stage2_loss, trained)
        rows.append({**common, "case": "stage 2 MaM step", "batch": f"{batch} + {batch} on-policy",
                     **timer(step, f"{label} stage 2")})
        if fast_bf16(device):
            rows.append({**common, "case": "stage 2 MaM step, train.precision=bf16", "batch": f"{batch} + {batch} on-policy",
                         **timer(train_step(net, in_bf16(stage2_loss, device), trained), f"{label} stage 2 bf16")})
        if label == "U-Net":  # train.activation_checkpointing: the same step, blocks recomputed in backward
            net.set_activation_checkpointing(True)
            rows.append({**common, "case": "stage 2 MaM step, activation checkpointing", "batch": f"{batch} + {batch} on-policy",
                         **timer(step, f"{label} stage 2, checkpointing")})
            net.set_activation_checkpointing(False)

        net.eval()
        rows.extend(query_cases(net, K, D, common, batch_override or QUERY_BATCH, device, timer))
    return rows


@torch.no_grad()
def query_cases(net, K, D, common, batch, device, timer: Timer):
    """One marginal pass vs the chain rule (AO-ARM-S: one order, E: five), and the chain rule per steps_per_pass."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, K, (batch, D), generator=generator).to(device)
    full = torch.ones_like(x, dtype=torch.bool)
    normalizer = log_normalizer(net, device)  # frozen: computed once, as the scripts and mamlib.load do
    marginal_query = lambda: normalized_log_marginal(net, x, full, normalizer)
    marginal = timer(marginal_query, f"{common['backbone']} marginal pass")
    rows = [{**common, "case": "marginal pass f(x) - f(empty)", "batch": batch, **marginal, "note": "f(empty) cached"}]
    order = random_order(batch, D, device=device)
    measured = min(CHAIN_STEPS_MEASURED, D)
    prefix_mask = order < measured  # a |S| = measured query: the chain rule takes exactly `measured` steps
    chain_query = lambda steps_per_pass: arm.chain_rule_log_prob(net, x, prefix_mask, order=order, steps_per_pass=steps_per_pass)
    best = None  # fastest fp32 steps_per_pass: the ratios below compare fp32 with fp32
    # eval.precision=bf16 where the device has fast bf16: the same chain rules with bf16 passes
    for precision in ["fp32"] + (["bf16"] if fast_bf16(device) else []):
        net.set_conditional_precision(precision)
        label = "" if precision == "fp32" else ", eval.precision=bf16"
        for steps_per_pass in STEPS_PER_PASS:
            if steps_per_pass > measured:
                break
            result = timer(lambda: chain_query(steps_per_pass), f"{common['backbone']} chain rule x{steps_per_pass}{label}")
            full_seconds = result["median_s"] * D / measured
            rows.append({**common, "case": f"exact likelihood, steps_per_pass={steps_per_pass}{label}", "batch": batch,
                         "median_s": full_seconds, "peak_mib": result["peak_mib"],
                         "note": f"{measured} of {D} steps timed, x{D / measured:.4g}"})
            if precision == "fp32" and (best is None or full_seconds < best[1]):
                best = (steps_per_pass, full_seconds)
    net.set_conditional_precision("fp32")
    steps_per_pass = best[0]
    # the ratio comes from the two cases timed again in alternation: the fastest of five medians above is biased low,
    # and the marginal pass was timed before them
    paired_marginal, paired_chain = timer.paired(marginal_query, lambda: chain_query(steps_per_pass),
                                                 f"{common['backbone']} marginal pass vs chain rule")
    single_order, marginal_s = paired_chain["median_s"] * D / measured, paired_marginal["median_s"]
    note = (f"steps_per_pass={steps_per_pass} (fastest above); {measured} of {D} steps timed, in alternation with "
            f"the marginal pass ({marginal_s:.4g} s, {paired_marginal['calls']} pairs)")
    rows.append({**common, "case": "AO-ARM-S log p(x) (1 order)", "batch": batch, "median_s": single_order,
                 "ratio": single_order / marginal_s, "note": note + "; ratio = time / marginal pass"})
    rows.append({**common, "case": "AO-ARM-E log p(x) (5 orders)", "batch": batch, "median_s": 5 * single_order,
                 "ratio": 5 * single_order / marginal_s, "note": "5 x AO-ARM-S; ratio = time / that marginal pass"})
    return rows


def ising_cases(sizes: str, device, timer: Timer, sides, batch_override: int | None):
    from .energy.ising import IsingModel
    from .stages.energy import ARMEnergyObjective, MaMEnergyObjective

    rows = []
    preset = SIZE_OVERRIDES[sizes]["preset"]
    for side in sides:
        D = side * side
        step_functions = {}
        for model, logp_mc in (("MAM", False), ("ARM", False), ("ARM", True)):
            cfg = compose_config("ising_eb", [f"preset={preset}", f"ising_model.dim={side}", f"model={model}", f"logp_mc={logp_mc}"])
            if batch_override:
                cfg.train.batch_size = batch_override
            target = IsingModel(side, side, sigma=cfg.ising_model.sigma, bias=cfg.ising_model.bias)
            torch.manual_seed(0)
            net = build_backbone(arch_config(cfg, sizes), 2, D, marginal=model == "MAM").to(device).train()
            objective = (MaMEnergyObjective if model == "MAM" else ARMEnergyObjective)(net, target, cfg, device)
            objective.on_epoch_start(0)
            label = {("MAM", False): "Ising MaM-KL step", ("ARM", False): "Ising ARM step (exact log p)",
                     ("ARM", True): "Ising ARM-MC step (one-step log p)"}[(model, logp_mc)]
            piecewise = getattr(objective, "loss_and_backward", None)
            # defaults bind this iteration's objects: the steps are called again after the loop (the paired timing)
            loss_fn = (lambda run=piecewise: run(None)) if piecewise else (lambda run=objective: run.loss(None)[0])
            step_functions[label] = train_step(net, loss_fn, net.parameters(), backpropagates=piecewise is not None)
            result = timer(step_functions[label], f"{label}, D={D}")
            note = f"steps_per_pass={cfg.eval.steps_per_pass}" if (model, logp_mc) == ("ARM", False) else ""
            rows.append({"backbone": "MLP", "sizes": sizes, "D": D, "case": label, "batch": cfg.train.batch_size, **result,
                         "note": note})
        # the ratio from the two steps timed again in alternation (see Timer.paired), five MaM steps per ARM step
        mam, arm_exact = timer.paired(step_functions["Ising MaM-KL step"], step_functions["Ising ARM step (exact log p)"],
                                      f"Ising MaM vs ARM, D={D}", first_per_round=5)
        ratio = arm_exact["median_s"] / mam["median_s"]
        rows.append({"backbone": "MLP", "sizes": sizes, "D": D, "case": "Ising ARM / MaM step time", "ratio": ratio,
                     "note": f"{ratio / D:.3g} x D; timed in alternation: ARM {arm_exact['median_s']:.4g} s "
                             f"({arm_exact['calls']} calls), MaM {mam['median_s']:.4g} s ({mam['calls']} calls)"})
    return rows


# -- report --------------------------------------------------------------------------------------------------------

COLUMNS = ["case", "backbone", "sizes", "D", "batch", "median_s", "calls", "ratio", "peak_mib", "note"]


def machine_description(device) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": str(device),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}


def write_bench(rows: list[dict], info: dict, output: Path, command: str) -> tuple[Path, Path]:
    output.mkdir(parents=True, exist_ok=True)
    header = (f"# Benchmark\n\n`{command}` on {info['device']}, {info['threads']} threads, torch {info['torch']}, "
              f"{info['date']}.\nMedians of the timed repeats; peak_mib = the process's peak resident memory while the "
              "case ran (includes PyTorch itself, about 0.2 GiB). Chain-rule rows time a measured number of steps and "
              "scale to D (stated per row).\n\n")
    markdown_path, json_path = output / "BENCH.md", output / "bench.json"
    write_text_atomic(markdown_path, header + markdown_table(rows, COLUMNS))
    clean = [{key: (None if isinstance(value, float) and not math.isfinite(value) else value) for key, value in row.items()}
             for row in rows]
    write_json_atomic(json_path, {"machine": info, "command": command, "columns": COLUMNS, "rows": clean}, indent=2)
    return markdown_path, json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mamlib.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="outputs/bench", help="folder for BENCH.md and bench.json")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated size sets: cpu (the presets), compare (the sizes compared with the original), "
                             "paper; default cpu,compare on CPU and cpu,paper on an accelerator")
    parser.add_argument("--only", default="all", choices=["all", "mle", "ising"], help="which cases to run")
    parser.add_argument("--ising-sides", default=",".join(map(str, ISING_SIDES)), help="lattice sides for the Ising cases")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="keep timing a case past --repeats until this much time is spent (at most 200 calls)")
    parser.add_argument("--batch", type=int, default=None, help="override every case's batch size (for a quick check)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's own choice)")
    args = parser.parse_args(argv)
    try:
        device = select_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        sizes = (args.sizes or ("cpu,compare" if device.type == "cpu" else "cpu,paper")).split(",")
        unknown = [s for s in sizes if s not in SIZE_OVERRIDES]
        if unknown:
            raise UserError(f"--sizes {','.join(unknown)} is unknown; use a comma-separated list of {sorted(SIZE_OVERRIDES)}")
        sides = [int(side) for side in args.ising_sides.split(",") if side]
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    jobs = [(size, kind) for size in sizes for kind in ("mle", "ising") if args.only in ("all", kind)]
    cases_per_job = {"mle": len(data_backbones("cpu")) * (4 + len(STEPS_PER_PASS)) + 1, "ising": 4 * len(sides)}  # + 1: U-Net checkpointing
    bar = progress(total=sum(cases_per_job[kind] for _, kind in jobs), desc="bench", unit="case")
    timer = Timer(device, args.repeats, args.warmup, bar, min_seconds=args.min_seconds)
    rows: list[dict] = []
    for size, kind in jobs:
        if kind == "mle":
            rows.extend(maximum_likelihood_cases(size, device, timer, args.batch))
        else:
            rows.extend(ising_cases(size, device, timer, sides, args.batch))
    bar.close()
    command = "python -m mamlib.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown_path, json_path = write_bench(rows, machine_description(device), Path(args.output), command.strip())
    print(markdown_path.read_text())
    print(f"wrote {markdown_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
