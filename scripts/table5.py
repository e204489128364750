"""The paper's Table 5 grid: molecule design for logP targets x temperatures, MaM and the ARM baseline, one table.

    python scripts/table5.py [--preset paper|cpu|tiny] [--models MAM ARM] [--targets 4 -4] [--taus 1 0.1] [--output DIR]
        [-- extra Hydra overrides for every run]

Each point trains `mam/mol_property_eb_main.py` into DIR/<model>_target<t>_tau<tau>/, then runs `mode=evaluate` and
`mode=generate` there. The default, --preset paper, trains every point with the paper's objective and alpha; --preset
cpu runs this project's recipe (configs/preset/mol_property_eb/cpu.yaml), which the table's header states. A point
whose generate_metrics.json exists is reused, not retrained (delete its folder to redo it; one run with other
overrides is refused), so an interrupted grid continues where it stopped; the point that was cut off is trained again
from the start (overwrite=true), so that every point gets the same budget. Writes DIR/table5.md and DIR/table5.json:
per point the steps trained, the unnormalised KL (the paper's column), mean ± std of the property over the generated
samples, validity and uniqueness, and the method of the run (objective, warm_start, alpha, preset, method).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ["objective", "warm_start", "alpha", "preset", "method"]
COLUMNS = ["model", "target", "tau", "steps", "KL - log Z (paper form)", "property mean", "property std", "validity",
           "uniqueness", "train (s)", "method"]


def run_point(folder: Path, preset: str, model: str, target: float, tau: float, extra: list[str]) -> dict:
    """Train, evaluate and generate one grid point (skipping what is done); returns its table row."""
    common = [sys.executable, "mol_property_eb_main.py", f"preset={preset}", f"model={model}", f"target_value={target}",
              f"tau={tau}", f"hydra.run.dir={folder}", *extra]
    seconds = None
    if (folder / "generate_metrics.json").exists():
        check_same_overrides(folder, common[2:])
    else:
        start = time.monotonic()
        overwrite = ["overwrite=true"] if (folder / "checkpoints" / "last.pt").exists() else []  # a run cut off mid-point
        for mode in (["mode=train", *overwrite], ["mode=evaluate"], ["mode=generate"]):
            print(f"\n$ (cd mam && {' '.join(common[1:] + mode)})", flush=True)
            subprocess.run(common + mode, cwd=ROOT / "mam", check=True)
        seconds = time.monotonic() - start
    evaluation = json.loads((folder / "metrics.json").read_text())
    generation = json.loads((folder / "generate_metrics.json").read_text())["unconditional"]
    return table_row(model, target, tau, trained_steps(folder), evaluation, generation, seconds)


def table_row(model: str, target: float, tau: float, steps, evaluation: dict, generation: dict, seconds) -> dict:
    """One point's row from its metrics.json (the method fields and the KL) and generate_metrics.json's samples."""
    return {"model": model, **{key: evaluation.get(key) for key in METHOD}, "target": target, "tau": tau, "steps": steps,
            "KL - log Z (paper form)": evaluation["table"].get("KL - log Z (paper form)"),
            "property mean": generation["property_mean"], "property std": generation["property_std"],
            "validity": generation["validity"], "uniqueness": generation["uniqueness"], "train (s)": seconds}


def recipe(preset: str, models: list[str], overrides: list[str]) -> str:
    """What every point trains with, per model, from the config the runs compose (the preset's files and the overrides)."""
    from mamlib.cli import compose_config
    from mamlib.stages.energy import method_fields

    described = []
    for model in models:
        fields = method_fields(compose_config("mol_property_eb", [f"preset={preset}", f"model={model}", *overrides]))
        described.append(f"{model}: {fields['method']}" + ("" if fields["alpha"] is None else f", alpha={fields['alpha']:g}"))
    return "; ".join(described)


def trained_steps(folder: Path) -> int | None:
    """The last optimizer step the run logged (training is time-limited at preset=cpu, so points differ)."""
    from mamlib.plots import read_metrics_jsonl  # the project's reader (a line cut short by a kill is skipped)

    path = folder / "metrics.jsonl"
    if not path.exists():
        return None
    return max((int(steps.max()) for steps, _ in read_metrics_jsonl(path).values() if len(steps)), default=None)


def check_same_overrides(folder: Path, expected: list[str]) -> None:
    """Refuse to reuse a finished point that was run with other settings (Hydra records each run's overrides)."""
    import yaml

    recorded = folder / ".hydra" / "overrides.yaml"
    if not recorded.exists():
        return
    ignored = ("mode=", "overwrite=", "hydra.")  # Hydra keeps its own (hydra.run.dir) apart
    used = {item for item in yaml.safe_load(recorded.read_text()) or [] if not item.startswith(ignored)}
    wanted = {item for item in expected if not item.startswith(ignored)}
    if used != wanted:
        sys.exit(f"error: {folder} holds a point run with other overrides ({' '.join(sorted(used ^ wanted))} differ); "
                 "delete that folder or choose another --output")


def markdown(rows: list[dict]) -> str:
    cell = lambda value: "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=["paper", "cpu", "tiny"])
    parser.add_argument("--models", nargs="+", default=["MAM", "ARM"], choices=["MAM", "ARM"])
    parser.add_argument("--targets", nargs="+", type=float, default=[4.0, -4.0])
    parser.add_argument("--taus", nargs="+", type=float, default=[1.0, 0.1])
    parser.add_argument("--output", default=None, help="default: outputs/table5/<preset>")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    if any(tau <= 0 for tau in args.taus):
        sys.exit("error: every --taus value must be > 0 (log f = -(g(x) - target)^2 / tau)")
    output = Path(args.output or ROOT / "outputs" / "table5" / args.preset).resolve()
    output.mkdir(parents=True, exist_ok=True)
    method = recipe(args.preset, args.models, args.overrides)
    print(f"Table 5 grid at preset={args.preset}: {method}", flush=True)
    rows = []
    for target in args.targets:
        for tau in args.taus:
            for model in args.models:
                folder = output / f"{model}_target{target:g}_tau{tau:g}"
                rows.append(run_point(folder, args.preset, model, target, tau, args.overrides))
                (output / "table5.json").write_text(json.dumps(rows, indent=1))  # after every point: nothing is lost
    table = markdown(rows)
    settings = f"\n\nOverrides of every run: `{' '.join(args.overrides)}`" if args.overrides else ""
    (output / "table5.md").write_text(f"# Table 5 grid (preset={args.preset}, logP)\n\nMethod: {method}{settings}\n\n{table}")
    print(f"\n{table}\nwrote {output / 'table5.md'} and {output / 'table5.json'}")


if __name__ == "__main__":
    main()
