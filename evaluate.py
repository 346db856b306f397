"""
Score a checkpoint on a split of ACDC or LA with the paper's protocol, beside the paper's numbers.

    python evaluate.py --checkpoint runs/acdc_7/selftrain/best.pt          # the test split of data/ACDC
    python evaluate.py --root data/ACDC --split val --checkpoint P --json scores.json --save-png pictures/
    python evaluate.py --root data/LA --checkpoint runs/la_8/selftrain/best.pt     # LA's test.list
    python evaluate.py --checkpoint P --predict scans/ --out labels/   # segment NIfTI scans (your own)

A model segments as the plan its checkpoint keeps says (data.Plan: windows, post-processing, preprocessing;
--windows and --stride choose other windows); a split is scored as its data set's plan scores it.

Protocol (as the authors compute the tables). ACDC: every slice resized to the training patch size
(nearest), argmax, resized back (nearest). LA: sliding windows of the training crop (strides 18, 18,
4), the probabilities averaged, foreground where p1 > 0.5, the largest connected component. Then per
class on the 3D volume, in voxels: Dice and Jaccard (percent), HD95 and ASD. A class missing from the
prediction scores 0 on all four (counted and reported). That convention gives a missed class an HD95
and ASD of 0, the best possible: it flatters those two numbers, so read them with the count of empty
predictions. Mean over volumes, then over the classes.

Your own scans (a --root that prepare_acdc.py --raw wrote) are scored as nnU-Net scores them: their
models segment with nnU-Net's windows (every half window, Gaussian weights, in 2D on each slice; --windows
authors for 3D ones), the probabilities resampled to each scan's own grid and then the argmax, the largest
component kept only for the classes where validation chose it (train.py, with best.pt); Dice, Jaccard,
HD95 and ASD on that grid in mm. A class absent from both reference and prediction is left out of that
case's means; one absent from either alone scores Dice 0, its HD95 and ASD left out (undefined); each
kind is counted.
"""
import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import bcp
import data
import inference
import pictures

# The paper's tables by data set and labeled patients (cases). ACDC: test split, 20 patients / 40
# volumes, mean of RV, Myo, LV. LA: test split, 20 volumes (Table 1).
PAPER_ROWS = {
    "acdc": {3: [("U-Net (5%)", 47.83, 37.01, 31.16, 12.62), ("BCP paper (5%)", 87.59, 78.67, 1.90, 0.67)],
             7: [("U-Net (10%)", 79.41, 68.11, 9.35, 2.70), ("BCP paper (10%)", 88.84, 80.62, 3.98, 1.17),
                 ("MT-BCP student report (10%, beta 0.5, centred)", 88.29, 79.41, 2.47, 0.79)],
             70: [("U-Net (100%)", 91.44, 84.59, 4.30, 0.99)]},
    "la": {4: [("V-Net (5%)", 52.55, 39.60, 47.05, 9.87), ("BCP paper (5%)", 88.02, 78.72, 7.90, 2.15)],
           8: [("V-Net (10%)", 82.74, 71.72, 13.35, 3.26), ("BCP paper (10%)", 89.62, 81.31, 6.81, 1.76)],
           80: [("V-Net (100%)", 91.47, 84.36, 5.48, 1.51)]},
}


def check_writable(folder):
    """Make `folder` if needed and check that a file can be created in it; OSError names it if not."""
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()


def predict_scans(model, checkpoint, stride, scans, out_dir, device, png_dir=None):
    """Segment each NIfTI scan as its plan says and write <out_dir>/<name>.nii.gz, a uint8 label map with the
    scan's geometry (nnU-Net's <name>_0000 scans give <name>.nii.gz, as labelsTr names them). The plan's
    intensities bring the scan to the network (data.scan_input: ACDC min-max, LA z-scored, your own scans
    normalised and resampled as prepared) and its windows and post-processing segment it (inference.segment),
    the probabilities resampled back to the scan's grid where it was resampled. One scan is in memory at a
    time, as float32. png_dir: a montage of each scan with the outlines read back from the written file."""
    flags, plan = checkpoint["flags"], checkpoint["plan"]
    volumetric = plan.slices_last  # arrays in NIfTI index order (i, j, k), not ACDC's (slice, row, col)
    targets = {scan: out_dir / data.label_name(scan) for scan in scans}
    inputs = {scan.resolve() for scan in scans}
    for target in targets.values():
        if target.resolve() in inputs:
            raise data.DataError(f"{target}: is one of the scans to segment; give another --out")
    for scan, target in targets.items():
        start = time.time()
        shown, volume, native, header = data.scan_input(scan, plan)
        labels = inference.segment(model, torch.from_numpy(np.ascontiguousarray(volume)).to(device), plan, flags["patch_size"],
                                   stride, flags.get("scale") or 1.0, plan.classes_kept(flags["num_classes"], checkpoint.get("keep_largest")),
                                   native).cpu().numpy()
        data.write_nifti_labels(target, (labels.transpose(2, 1, 0) if volumetric else labels).astype(np.uint8), header)
        if png_dir:
            written = data.read_nifti(target)
            written = written.reshape(labels.shape[::-1]).transpose(2, 1, 0) if volumetric else written.reshape(shown.shape)
            pictures.save_montage(png_dir / f"{target.name.removesuffix('.nii.gz')}.png", shown, [written], slices_last=volumetric)
        print(f"{scan} -> {target} ({np.count_nonzero(labels)} foreground voxels, {time.time() - start:.1f} s)")


def score_split(model, checkpoint, dataset, args, device):
    """Each volume of the split segmented as the checkpoint's plan says and scored (bcp.score_volume) as the
    data set's plan scores, on its grid (your own scans: each scan's own, in mm) -> [per class scores] per
    volume. --save-png draws each volume on the grid the model saw."""
    flags, plan, scored = checkpoint["flags"], checkpoint["plan"], dataset.plan

    def score(case, prediction):
        if args.save_png:
            shown = prediction if case.native is None else data.resample_spacing(
                prediction, case.image.shape, data.spacing_steps(case.spacing, data.target_spacing(case.spacing, scored.preprocessing["spacing"])), nearest=True)
            pictures.save_montage(Path(args.save_png) / f"{case.name}.png", case.image.cpu().numpy(),
                                  [case.label.cpu().numpy(), shown.cpu().numpy()], slices_last=plan.slices_last)
        return bcp.score_volume(prediction.cpu().numpy(), case.truth.cpu().numpy(), flags["num_classes"], case.spacing, scored.scoring)

    cases = dataset.scored_cases(dataset.split(args.split, flags), flags, device, scored.grid)
    return inference.segment_and_score(model, cases, plan, flags, args.stride,
                                       plan.classes_kept(flags["num_classes"], checkpoint.get("keep_largest")), score)


def print_table(per_volume, checkpoint, dataset, args):
    """The mean of each class over the volumes, their mean, the paper's rows beside them and the count of
    empty predictions (and, for your own scans, of each kind nnU-Net counts). -> (per_class, mean, counts)."""
    flags, scored = checkpoint["flags"], dataset.plan
    class_names = dataset.names_of_classes(flags["num_classes"])
    with warnings.catch_warnings():  # a metric left out of every volume is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = {class_names[c]: {m: float(np.nanmean([v[c][m] for v in per_volume])) for m in bcp.METRICS}
                     for c in range(len(class_names))}
        mean = {m: float(np.nanmean([per_class[n][m] for n in class_names])) for m in bcp.METRICS}
    counts = {case: sum(s["case"] == case for v in per_volume for s in v) for case in bcp.CASES}
    print(f"{args.checkpoint} ({flags.get('phase')}, {flags.get('labeled_patients')} labeled patients) "
          f"on {args.root} {args.split}: {len(per_volume)} volumes")
    print(f"{'':42s} {'Dice %':>8s} {'Jaccard %':>10s} {'HD95':>8s} {'ASD':>8s}")
    for row_name, scores in [*per_class.items(), ("mean (ours)", mean)]:
        print(f"{row_name:42s} {scores['dice']:8.2f} {scores['jaccard']:10.2f} {scores['hd95']:8.2f} {scores['asd']:8.2f}")
    if dataset.synthetic:
        print("SYNTHETIC phantoms: the paper's rows do not apply")
    elif scored.name in PAPER_ROWS:
        if args.split != "test":
            print(f"the paper's rows below were measured on the test split, these on {args.split}")
        for row_name, *row in PAPER_ROWS[scored.name].get(flags.get("labeled_patients"), []):
            print(f"{row_name:42s} {row[0]:8.2f} {row[1]:10.2f} {row[2]:8.2f} {row[3]:8.2f}")
    total = len(per_volume) * len(class_names)
    if scored.scoring == "paper":
        print(f"class-volumes with an empty prediction (scored 0): {counts['empty prediction']} of {total}")
    else:
        print(f"class-volumes ({total}), as nnU-Net counts them: {counts['scored']} scored; "
              f"{counts['empty prediction']} with an empty prediction and {counts['empty reference']} with an empty "
              f"reference (Dice 0, HD95 and ASD left out); {counts['absent from both']} absent from both (left out)")
    if scored.grid == "native":
        print(f"scored on each scan's own grid ({checkpoint['plan'].windows} windows, the probabilities resampled back, then the "
              f"argmax), HD95 and ASD in mm")
    return per_class, mean, counts


def export_fp16(checkpoint, path, weights="model"):
    """The weights (the student's, or weights="teacher") in float16 with the flags, the plan and the
    post-processing validation chose: half the size; evaluation casts them back to float32 on load."""
    data.write_atomic(path, lambda f: torch.save(
        {"model": {k: v.half() if v.is_floating_point() else v for k, v in checkpoint[weights].items()},
         "flags": checkpoint["flags"], "plan": inference.saved_plan(checkpoint["plan"]), "iteration": checkpoint.get("iteration"),
         "best_dice": checkpoint.get("best_dice"), "keep_largest": checkpoint.get("keep_largest")}, f))


def embed_slices(model, bank, patch_size, batch_size=32):
    """(N, 256) features of slices: the U-Net bottleneck, averaged over space (no augmentation)."""
    features = []
    hook = model.encoder[-1].register_forward_hook(lambda module, inputs, output: features.append(output.mean((2, 3))))
    with torch.no_grad():
        for start in range(0, len(bank), batch_size):
            model(bank.batch(torch.arange(start, min(start + batch_size, len(bank))), patch_size)[0])
    hook.remove()
    return torch.cat(features).float().cpu().numpy()


def gaussian_kde(samples, grid):
    """Density of 1D samples on a grid, Gaussian kernel with Scott's bandwidth (as scipy.stats.gaussian_kde)."""
    bandwidth = samples.std(ddof=1) * len(samples) ** -0.2
    z = (grid[:, None] - samples[None, :]) / bandwidth
    return np.exp(-0.5 * z ** 2).sum(1) / (len(samples) * bandwidth * np.sqrt(2 * np.pi))


def feature_distributions(model, dataset, labeled_patients, patch_size, device, out_dir):
    """Figure 4.9 of the MT-BCP student report (Huynh T. P. and Le Q. T., Mean Teacher + BCP on ACDC
    10 %): are labeled and unlabeled slices embedded alike? Features of all training slices, projected
    on their first principal component, one Gaussian KDE per set."""
    labeled_names, unlabeled_names, _ = dataset.cases(labeled_patients)
    features = {name: embed_slices(model, dataset.bank(names, device), patch_size)
                for name, names in (("labeled", labeled_names), ("unlabeled", unlabeled_names)) if names}
    everything = np.concatenate(list(features.values()))
    center = everything.mean(0)
    direction = np.linalg.svd(everything - center, full_matrices=False)[2][0]
    projected = {name: (f - center) @ direction for name, f in features.items()}
    pad = 0.1 * (everything @ direction).std()
    grid = np.linspace(min(p.min() for p in projected.values()) - pad, max(p.max() for p in projected.values()) + pad, 200)
    densities = {name: gaussian_kde(p, grid) for name, p in projected.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(densities)
    rows = [",".join(["x", *names])] + [",".join(f"{v:.6g}" for v in (g, *(densities[n][i] for n in names)))
                                         for i, g in enumerate(grid)]
    data.write_atomic(out_dir / "kde.csv", ("\n".join(rows) + "\n").encode())
    colours = {"labeled": "#d62728", "unlabeled": "#1f77b4"}
    overlap = np.minimum(*densities.values()).sum() * (grid[1] - grid[0]) if len(densities) == 2 else float("nan")
    pictures.write_line_plot(out_dir / "kde.svg", {f"{n} ({len(projected[n])} slices)": (grid, densities[n], colours[n]) for n in names},
                        f"labeled vs unlabeled slices: overlap {overlap:.2f}",
                        "first principal component of the bottleneck features", "density")
    print(f"feature distributions: {out_dir / 'kde.csv'}, {out_dir / 'kde.svg'} (overlap of the two densities {overlap:.3f})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/ACDC")
    p.add_argument("--split", default="test", help="which <split>.list to score")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (best.pt)")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--save-png", metavar="DIR", help="write a montage per volume: image, ground truth, prediction")
    p.add_argument("--kde", metavar="DIR", help="write the labeled/unlabeled feature distributions (CSV, SVG)")
    p.add_argument("--export", metavar="FILE", help="also write the weights as a small fp16 checkpoint (model + flags)")
    p.add_argument("--predict", metavar="IN", help="segment NIfTI scans instead of scoring a split: a .nii/.nii.gz "
                                                   "file or a folder of them; label maps go to --out")
    p.add_argument("--out", metavar="DIR", help="--predict: where to write <name>.nii.gz label maps")
    p.add_argument("--stride", type=int, nargs=2, metavar=("XY", "Z"),
                   help="3D models: sliding-window strides along the first two axes and the third "
                        "(the authors' 18 4, at most the window)")
    p.add_argument("--windows", choices=["authors", "gaussian"],
                   help="3D models: the authors' sliding windows (every --stride, a plain mean; LA's default) or "
                        "nnU-Net's (every half window, Gaussian-weighted; your own scans' default; docs/own_scans.md)")
    p.add_argument("--weights", choices=["student", "teacher"], default="student",
                   help="the student (the paper's) or, in a self-training checkpoint, the EMA teacher")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.stride and min(args.stride) < 1:
        p.error(f"--stride must be positive, got {args.stride}")
    try:
        args.device = inference.checked_device(args.device)
    except ValueError as error:
        p.error(str(error))
    if bool(args.predict) != bool(args.out):
        p.error("--predict IN and --out DIR go together")
    if args.predict and (args.json or args.kde):
        p.error("--json and --kde score a split; --predict writes label maps only")
    return args, p


def main(argv=None):
    args, p = parse_args(argv)
    for folder in [Path(f).parent for f in (args.json, args.export) if f] + [Path(d) for d in (args.save_png, args.kde, args.out) if d]:
        check_writable(folder)  # before the evaluation, not after it
    weights = "model" if args.weights == "student" else "teacher"
    model, checkpoint = inference.load_model(args.checkpoint, args.device, weights)
    model.eval()
    flags, plan = checkpoint["flags"], checkpoint["plan"]
    if args.export:
        export_fp16(checkpoint, args.export, weights)
    if plan.dims == 2 and (args.stride or args.windows):
        p.error(f"--stride and --windows apply to 3D models; {args.checkpoint} holds a 2D U-Net")
    if args.windows == "gaussian" and args.stride:
        p.error("--stride sets the authors' windows; --windows gaussian steps every half window")
    if plan.dims == 3:  # the plan's windows, unless --windows or --stride asks for others
        checkpoint["plan"] = plan = replace(plan, windows=args.windows or ("authors" if args.stride else plan.windows))
        try:
            args.stride = inference.checked_strides(args.stride, flags["patch_size"])
        except ValueError as error:
            p.error(str(error))
    if plan.post_processing == "chosen":
        kept = plan.classes_kept(flags["num_classes"], checkpoint.get("keep_largest"))
        kept = f"classes {', '.join(map(str, kept))}" if kept else "no class"
        print(f"post-processing (chosen on validation): the largest component kept for {kept}")
    if args.predict:
        if plan.preprocessing["rule"] == "prepared":
            data.check_grid(plan.preprocessing, args.checkpoint, "train it again on scans prepared by this version")
        return predict_scans(model, checkpoint, args.stride, data.nifti_scans(args.predict), Path(args.out), args.device,
                             Path(args.save_png) if args.save_png else None)
    dataset = data.Dataset(args.root)
    data.check_splits(dataset.root)
    if (plan.dims, plan.slices_last) != (dataset.plan.dims, dataset.plan.slices_last):
        raise data.DataError(f"{args.checkpoint}: a {plan.dims}D model of {plan.name} data cannot segment the "
                             f"{dataset.plan.dims}D volumes of {args.root} ({dataset.plan.name})")
    if args.kde and plan.slices_last:
        raise data.DataError("--kde embeds ACDC's 2D slices; it does not apply to these volumes")
    per_volume = score_split(model, checkpoint, dataset, args, args.device)
    per_class, mean, counts = print_table(per_volume, checkpoint, dataset, args)
    if args.kde:
        feature_distributions(model, dataset, flags["labeled_patients"], flags["patch_size"], args.device, args.kde)
    if args.json:
        data.write_atomic(args.json, json.dumps(
            {"mean": mean, "per_class": per_class, "volumes": len(per_volume), "scoring": dataset.plan.scoring,
             "empty_predictions": counts["empty prediction"], "empty_references": counts["empty reference"],
             "absent_from_both": counts["absent from both"],
             "checkpoint": str(args.checkpoint), "split": args.split}, indent=2).encode() + b"\n")


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, OSError) as error:  # OSError: an output that cannot be written
        sys.exit(f"error: {error}")
