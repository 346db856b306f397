"""Collect the ACDC ablation runs of run.sh into this folder: each run's logs, the README's mean ± std
table, and the validation and pseudo-label curves of the four --mix variants.

    bash measurements/ablation_acdc_128px/run.sh        # the trainings, one at a time (about 4.5 hours on 2 cores)
    python measurements/ablation_acdc_128px/summarize.py

Every run keeps the best.pt of its own validation curve and is scored on the same validation split, so
each number is a little optimistic, alike for every row.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import data  # noqa: E402
import pictures  # noqa: E402

RUNS = HERE.parents[1] / "runs" / "ablation"
ROWS = {  # table row: (run folder, phase)
    "U-Net, labeled only": ("unet", "supervised"),
    "pre-train only": ("bcp", "pretrain"),
    "no copy-paste (`--mix none`)": ("none", "selftrain"),
    "inward only (`--mix inward`)": ("inward", "selftrain"),
    "outward only (`--mix outward`)": ("outward", "selftrain"),
    "BCP (`--mix bidirectional`)": ("bidirectional", "selftrain"),
}
MIX_COLOURS = {"none": "#1f77b4", "inward": "#2ca02c", "outward": "#ff7f0e", "bidirectional": "#d62728"}
KEPT = ("flags.json", "metrics.jsonl", "train.log", "val.json", "curves.svg")
METRICS = ("dice", "jaccard", "hd95", "asd")
PSEUDO_BIN = 100  # steps per point of the pseudo-label curve (the Dice is logged every --log-every steps)


def finished_runs(patients, run, phase):
    """{seed: run folder} of the runs with a val.json."""
    return {int(d.name[4:]): d / run / phase for d in sorted((RUNS / f"p{patients}").glob("seed*"))
            if (d / run / phase / "val.json").exists()}


def metric_rows(folder):
    """The rows of a run's metrics.jsonl."""
    return data.read_metrics(folder / "metrics.jsonl")[0]


def logged(folder, key):
    """[(step, value)] of one key of a run's metrics."""
    return [(r["iter"], r[key]) for r in metric_rows(folder) if key in r]


def mean_std(values):
    """'mean ± sample standard deviation' over the seeds (just the value for one seed)."""
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(patients):
    """The markdown rows: the four metrics over the seeds, each seed's best validation Dice, the class-volumes
    with an empty prediction and the minutes a run took (validations included)."""
    lines = ["| row | seeds | best val Dice @ step, per seed | Dice % | Jaccard % | HD95 | ASD | empty | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (run, phase) in ROWS.items():
        runs = finished_runs(patients, run, phase)
        if not runs:
            continue
        scores = [json.loads((folder / "val.json").read_text()) for folder in runs.values()]
        best, minutes = [], []
        for folder in runs.values():
            rows = metric_rows(folder)
            top = max((r for r in rows if "val_dice" in r), key=lambda r: r["val_dice"])
            best.append(f"{top['val_dice']:.3f} @ {top['iter']}")
            minutes.append(max(r["time"] for r in rows if "time" in r) / 60)
        cells = [mean_std([s["mean"][m] for s in scores]) for m in METRICS]
        empty = sum(s["empty_predictions"] for s in scores)
        class_volumes = sum(s["volumes"] * len(s["per_class"]) for s in scores)
        lines.append(f"| {name} | {len(runs)} | {', '.join(best)} | {' | '.join(cells)} | {empty} of {class_volumes} "
                     f"| {np.mean(minutes):.1f} |")
    return "\n".join(lines)


def same_steps(curves, what):
    """The common steps of one curve per seed, {folder: [(step, value)]}; refuses seeds that differ."""
    steps = {folder: [step for step, _ in curve] for folder, curve in curves.items()}
    if len({tuple(s) for s in steps.values()}) > 1:
        raise SystemExit(f"{what} logged at other steps in {', '.join(map(str, steps))}: rerun them alike")
    return next(iter(steps.values()))


def bin_means(curve):
    """Mean value per PSEUDO_BIN steps of a [(step, value)] curve."""
    bins = sorted({(step - 1) // PSEUDO_BIN for step, _ in curve})
    return [np.mean([value for step, value in curve if (step - 1) // PSEUDO_BIN == b]) for b in bins]


def curves(patients):
    """Two SVGs: validation Dice (from the pre-trained model's, at step 0) and pseudo-label Dice against
    the self-training step, each the mean over the seeds that finished."""
    pretrained = {seed: max(d for _, d in logged(folder, "val_dice"))
                  for seed, folder in finished_runs(patients, "bcp", "pretrain").items()}
    validation, pseudo = {}, {}
    for mix, colour in MIX_COLOURS.items():
        runs = finished_runs(patients, mix, "selftrain")
        if not runs:
            continue
        val_curves = {folder: logged(folder, "val_dice") for folder in runs.values()}
        pseudo_curves = {folder: logged(folder, "pseudo_dice") for folder in runs.values()}
        steps = [0] + same_steps(val_curves, "validation Dice")
        same_steps(pseudo_curves, "pseudo-label Dice")
        dice = [[pretrained[seed]] + [d for _, d in val_curves[folder]] for seed, folder in runs.items()]
        pseudo_steps = [(b + 1) * PSEUDO_BIN for b in range(len(bin_means(next(iter(pseudo_curves.values())))))]
        name = f"{mix} (n = {len(runs)})"
        validation[name] = (steps, np.mean(dice, axis=0), colour)
        pseudo[name] = (pseudo_steps, np.mean([bin_means(c) for c in pseudo_curves.values()], axis=0), colour)
    if not validation:
        return
    title = f"ACDC, {patients} labeled patients"
    pictures.write_line_plot(HERE / f"p{patients}_val_dice.svg", validation,
                        f"{title}: validation Dice, mean of n seeds", "self-train step", "Dice")
    pictures.write_line_plot(HERE / f"p{patients}_pseudo_dice.svg", pseudo,
                        f"{title}: the teacher's pseudo-labels, mean of n seeds", "self-train step",
                        f"Dice (mean of {PSEUDO_BIN} steps)")


def copy_logs():
    """runs/ablation/p<N>/seed<S>/<row>/<phase>/ → p<N>/seed<S>/<row>/ here (the phase folder left out)."""
    for val_json in RUNS.glob("p*/seed*/*/*/val.json"):
        target = HERE / val_json.parent.parent.relative_to(RUNS)
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (val_json.parent / name).exists():
                shutil.copy(val_json.parent / name, target / name)


if __name__ == "__main__":
    copy_logs()
    for patients in sorted(int(d.name[1:]) for d in RUNS.glob("p*")):
        print(f"\n{patients} labeled patients\n{table(patients)}")
        curves(patients)
