"""
Score a checkpoint on a split of ACDC or LA with the paper's protocol, beside the paper's numbers.

    python evaluate.py --checkpoint runs/acdc_7/selftrain/best.pt          # the test split of data/ACDC
    python evaluate.py --root data/ACDC --split val --checkpoint P --json scores.json --save-png pictures/
    python evaluate.py --root data/LA --checkpoint runs/la_8/selftrain/best.pt     # LA's test.list
    python evaluate.py --checkpoint P --predict scans/ --out labels/   # segment NIfTI scans (your own)

Protocol (as the authors compute the tables). ACDC: every slice resized to the training patch size
(nearest), argmax, resized back (nearest). LA: sliding windows of the training crop (strides 18, 18,
4), the probabilities averaged, foreground where p1 > 0.5, the largest connected component. Then per
class on the 3D volume, in voxels: Dice and Jaccard (percent), HD95 and ASD. A class missing from the
prediction scores 0 on all four (counted and reported). That convention gives a missed class an HD95
and ASD of 0, the best possible: it flatters those two numbers, so read them with the count of empty
predictions. Mean over volumes, then over the classes.

Your own scans (a --root that prepare_acdc.py --raw wrote) are scored as nnU-Net scores them: 3D
models segment with nnU-Net's windows (every half window, Gaussian weights; --windows authors for
the others), the probabilities resampled to each scan's own grid and then the argmax, the largest
component kept only for the classes where validation chose it (train.py decides after the last
step); Dice, Jaccard, HD95 and ASD on that grid in mm. A class absent from both reference and
prediction is left out of that case's means; one absent from either alone scores Dice 0, its HD95
and ASD left out (undefined); each kind is counted.
"""
import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch

import bcp
import prepare_acdc

METRICS = ("dice", "jaccard", "hd95", "asd")
ACDC_CLASSES = ("RV", "Myo", "LV")
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


def score_volume(prediction, label, num_classes, spacing=None, scoring="paper"):
    """Per foreground class: {'dice', 'jaccard' (percent), 'hd95', 'asd' (voxels, or mm with the
    voxel spacing), 'case'}, 'case' one of CASES. A class absent from the prediction: scoring "paper"
    scores 0 on all four (the authors' convention), "nnunet" Dice and Jaccard 0 with HD95 and ASD NaN
    (undefined; left out of the means), and NaN on all four when the reference lacks it too. A class
    absent from the reference alone: Dice and Jaccard 0, HD95 and ASD NaN, under both."""
    scores = []
    for c in range(1, num_classes):
        predicted, truth = prediction == c, label == c
        if predicted.any() and truth.any():
            metrics = bcp.binary_metrics(predicted, truth, spacing)
            scores.append({"dice": 100 * metrics["dice"], "jaccard": 100 * metrics["jaccard"],
                           "hd95": metrics["hd95"], "asd": metrics["asd"], "case": "scored"})
        elif not predicted.any() and scoring == "paper":
            scores.append({**dict.fromkeys(METRICS, 0.0), "case": "empty prediction"})
        elif not predicted.any() and not truth.any():
            scores.append({**dict.fromkeys(METRICS, math.nan), "case": "absent from both"})
        else:
            scores.append({"dice": 0.0, "jaccard": 0.0, "hd95": math.nan, "asd": math.nan,
                           "case": "empty prediction" if truth.any() else "empty reference"})
    return scores


CASES = ("scored", "empty prediction", "empty reference", "absent from both")


def native_label(path):
    """The label map of a scan on its own grid, which prepare_acdc.py --3d keeps beside the resampled one."""
    try:
        with h5py.File(path, "r") as f:
            return f["label_native"][()]
    except (OSError, KeyError) as error:
        raise bcp.DataError(f"{path}: no readable 'label_native' (written by prepare_acdc.py --3d; {error})") from None


def check_writable(folder):
    """Make `folder` if needed and check that a file can be created in it; OSError names it if not."""
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()


def save_montage(path, image, label_maps, size=160, rows=8, slices_last=False):
    """One row per slice: the image, then the outlines of each label map (ground truth, prediction).
    A volume with its slices along the last axis (LA) shows `rows` of them spread over the first map's
    foreground."""
    if slices_last:
        image, label_maps = np.moveaxis(image, -1, 0), [np.moveaxis(m, -1, 0) for m in label_maps]
        occupied = np.flatnonzero(label_maps[0].any((1, 2))) if label_maps[0].any() else np.arange(len(image))
        pick = np.linspace(occupied[0], occupied[-1], rows).round().astype(int)
        image, label_maps = image[pick], [m[pick] for m in label_maps]
    tiles = []
    for image_slice, *map_slices in zip(image, *label_maps):
        resized = [bcp.resize_nearest(torch.from_numpy(np.ascontiguousarray(a)), size, size).numpy()
                   for a in (image_slice, *map_slices)]
        picture = bcp.gray(resized[0])
        tiles += [picture] + [bcp.paint_labels(picture, labels, outline=True) for labels in resized[1:]]
    bcp.write_png(path, bcp.montage(tiles, columns=1 + len(label_maps)))


def nifti_scans(path):
    """The scans a --predict argument names: one .nii/.nii.gz file, or those in a folder."""
    path = Path(path)
    if path.is_dir():
        scans = sorted(p for p in path.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not scans:
            raise bcp.DataError(f"{path}: no .nii or .nii.gz files in this folder")
        return scans
    if not path.is_file():
        raise bcp.DataError(f"{path}: no such file or folder")
    return [path]


def largest_component_classes(flags):
    """The classes whose largest connected component is kept: every class under the LA protocol (None);
    for a model of your own 3D scans, those validation chose (train.py stores them as keep_largest),
    none before a choice."""
    return flags.get("keep_largest", []) if flags.get("preprocessing") else None


def classes_helped_by_largest_component(predictions, labels, num_classes):
    """nnU-Net's post-processing rule: keep only the largest connected component of a class where that
    raises the class's mean Dice over the validation cases (label tensors; a class absent from both
    left out). -> (those classes, [(class, mean Dice as predicted, with its largest component only)])."""
    as_predicted = torch.stack([bcp.dice_per_class(p, l, num_classes, "nnunet") for p, l in zip(predictions, labels)])
    largest_only = torch.stack([torch.stack([bcp.dice_per_class(bcp.keep_largest_component(p, [c]), l, num_classes,
                                                                "nnunet")[c - 1] for c in range(1, num_classes)])
                                for p, l in zip(predictions, labels)])
    before, after = as_predicted.nanmean(0).tolist(), largest_only.nanmean(0).tolist()
    return [c for c in range(1, num_classes) if after[c - 1] > before[c - 1]], list(zip(range(1, num_classes), before, after))


def choose_largest_component_classes(checkpoint_path, root, device):
    """After training on your own 3D scans: segment the validation cases on their own grids without
    post-processing, choose the classes by classes_helped_by_largest_component, and store them in the
    checkpoint's flags (keep_largest), which evaluation and --predict follow. -> what that returns."""
    model, checkpoint = bcp.load_model(checkpoint_path, device)
    model.eval()
    flags = checkpoint["flags"]
    predictions, labels = [], []
    for name, image, _ in bcp.load_la_volumes(root, bcp.la_cases(root, flags["labeled_patients"], flags["val_cases"])[2],
                                              flags["num_classes"]):
        labels.append(torch.from_numpy(native_label(Path(root) / bcp.LA_FOLDER / name / "mri_norm2.h5")).to(device))
        predictions.append(bcp.segment(model, torch.from_numpy(image).to(device), flags["patch_size"], flags["stride"],
                                       flags.get("scale") or 1.0, gaussian=True, keep_largest=[], size=labels[-1].shape))
    classes, table = classes_helped_by_largest_component(predictions, labels, flags["num_classes"])
    checkpoint["flags"] = {**flags, "keep_largest": classes}
    bcp.write_atomic(checkpoint_path, lambda f: torch.save(checkpoint, f))
    return classes, table


def predict_scans(model, flags, stride, gaussian, scans, out_dir, device, png_dir=None):
    """Segment each NIfTI scan as training saw its images and write <out_dir>/<name>.nii.gz, a uint8
    label map with the scan's geometry. ACDC (2D model): per-volume min-max to [0, 1], slices resized to
    the patch, nearest back. 3D models, in NIfTI index order (i, j, k), by sliding windows: trained on
    your own 3D scans, the training's intensities and spacing (prepare_acdc.py --3d), the probabilities
    resampled back to the scan's grid, then the argmax and the post-processing validation chose; on LA,
    the scan z-scored as a whole (as UA-MT preprocessed LA, which also cropped around the atrium) and
    the authors' largest component. One scan is in memory at a time, as float32.
    png_dir: a montage of each scan with the outlines read back from the written file."""
    patch_size, preprocessing = flags["patch_size"], flags.get("preprocessing")
    targets = {scan: out_dir / f"{prepare_acdc.scan_stem(scan)}.nii.gz" for scan in scans}
    inputs = {scan.resolve() for scan in scans}
    for target in targets.values():
        if target.resolve() in inputs:
            raise bcp.DataError(f"{target}: is one of the scans to segment; give another --out")
    for scan, target in targets.items():
        start = time.time()
        image, header = prepare_acdc.read_nifti(scan, with_header=True)
        volumetric = not isinstance(patch_size, int)
        if image.ndim not in ((3,) if volumetric else (2, 3)):
            raise bcp.DataError(f"{scan}: a {image.ndim}D image of shape {image.shape}; --predict takes one "
                                f"{'3D' if volumetric else '2D or 3D'} scan per file")
        if not np.isfinite(image).all():
            raise bcp.DataError(f"{scan}: {np.size(image) - np.isfinite(image).sum()} NaN or infinite voxels; "
                                f"fill or mask them before segmenting")
        if volumetric:  # (k, j, i) as read -> (i, j, k), the axis order of UA-MT's LA arrays
            shown = image.transpose(2, 1, 0).astype(np.float32)
            del image
            volume = (prepare_acdc.preprocess_3d(shown, prepare_acdc.nifti_geometry(header, scan)[0], preprocessing, scan)
                      if preprocessing else bcp.zscore(shown))  # both normalise `shown` in place
        else:
            shown = volume = prepare_acdc.normalize(image.astype(np.float64), scan).reshape(-1, *image.shape[-2:])  # (S, H, W)
        labels = bcp.segment(model, torch.from_numpy(np.ascontiguousarray(volume)).to(device), patch_size, stride,
                             flags.get("scale") or 1.0, gaussian, largest_component_classes(flags),
                             size=shown.shape if preprocessing else None).cpu().numpy()
        prepare_acdc.write_nifti_labels(target, (labels.transpose(2, 1, 0) if volumetric else labels).astype(np.uint8), header)
        if png_dir:
            written = prepare_acdc.read_nifti(target)
            written = written.transpose(2, 1, 0) if volumetric else written.reshape(shown.shape)
            save_montage(png_dir / f"{target.name.removesuffix('.nii.gz')}.png", shown, [written], slices_last=volumetric)
        print(f"{scan} -> {target} ({np.count_nonzero(labels)} foreground voxels, {time.time() - start:.1f} s)")


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


def feature_distributions(model, root, labeled_patients, num_classes, patch_size, device, out_dir):
    """Figure 4.9 of the MT-BCP student report (Huynh T. P. and Le Q. T., Mean Teacher + BCP on ACDC
    10 %): are labeled and unlabeled slices embedded alike? Features of all training slices, projected
    on their first principal component, one Gaussian KDE per set."""
    labeled_names, unlabeled_names = bcp.training_slices(root, labeled_patients)
    features = {name: embed_slices(model, bcp.SliceBank(*bcp.load_slices(root, names, num_classes), device), patch_size)
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
    bcp.write_atomic(out_dir / "kde.csv", ("\n".join(rows) + "\n").encode())
    colours = {"labeled": "#d62728", "unlabeled": "#1f77b4"}
    overlap = np.minimum(*densities.values()).sum() * (grid[1] - grid[0]) if len(densities) == 2 else float("nan")
    bcp.write_line_plot(out_dir / "kde.svg", {f"{n} ({len(projected[n])} slices)": (grid, densities[n], colours[n]) for n in names},
                        f"labeled vs unlabeled slices: overlap {overlap:.2f}",
                        "first principal component of the bottleneck features", "density")
    print(f"feature distributions: {out_dir / 'kde.csv'}, {out_dir / 'kde.svg'} (overlap of the two densities {overlap:.3f})")


def main(argv=None):
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.stride and min(args.stride) < 1:
        p.error(f"--stride must be positive, got {args.stride}")
    try:
        device = bcp.checked_device(args.device)
    except ValueError as error:
        p.error(str(error))
    if bool(args.predict) != bool(args.out):
        p.error("--predict IN and --out DIR go together")
    for folder in [Path(f).parent for f in (args.json, args.export) if f] + [Path(d) for d in (args.save_png, args.kde, args.out) if d]:
        check_writable(folder)  # before the evaluation, not after it

    model, checkpoint = bcp.load_model(args.checkpoint, device)
    model.eval()
    flags = checkpoint["flags"]
    if args.export:  # float16 halves the size; evaluation casts back to float32 on load
        bcp.write_atomic(args.export, lambda f: torch.save(
            {"model": {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()},
             "flags": flags, "iteration": checkpoint.get("iteration"), "best_dice": checkpoint.get("best_dice")}, f))
    num_classes, patch_size = flags["num_classes"], flags["patch_size"]
    if isinstance(patch_size, int):
        if args.stride:
            p.error(f"--stride applies to 3D models; {args.checkpoint} holds a 2D U-Net")
    else:
        args.stride = args.stride or bcp.default_stride(patch_size)
        if args.stride[0] > min(patch_size[:2]) or args.stride[1] > patch_size[2]:
            p.error(f"--stride {' '.join(map(str, args.stride))}: larger than the window {patch_size}; "
                    f"voxels between windows would be left out")
    args.windows = args.windows or ("gaussian" if flags.get("preprocessing") else "authors")
    keep_largest = largest_component_classes(flags)
    if keep_largest is not None and "keep_largest" not in flags:
        print("post-processing: none (train.py chooses it after a phase's last step)")
    elif keep_largest is not None:
        kept = f"classes {', '.join(map(str, keep_largest))}" if keep_largest else "no class"
        print(f"post-processing (chosen on validation): the largest component kept for {kept}")
    if args.predict:
        return predict_scans(model, flags, args.stride, args.windows == "gaussian",
                             nifti_scans(args.predict), Path(args.out), device, Path(args.save_png) if args.save_png else None)
    bcp.check_layout(args.root)
    bcp.check_splits(args.root)
    la = bcp.is_la_layout(args.root)
    if la == isinstance(patch_size, int):
        raise bcp.DataError(f"{args.checkpoint}: a {'2D' if la else '3D'} model cannot segment the "
                            f"{'LA' if la else 'ACDC'} volumes of {args.root}")
    if args.kde and la:
        raise bcp.DataError("--kde embeds 2D slices; it does not apply to LA")
    own_data = bcp.dataset_info(args.root)
    class_names = tuple(own_data.get("class_names") or (("LA",) if la else ACDC_CLASSES if num_classes == 4 else
                                                        [f"class {c}" for c in range(1, num_classes)]))
    if la:  # test.list, or the validation cases training held aside
        names = (bcp.read_list(args.root, f"{args.split}.list") if args.split != "val" else
                 bcp.la_cases(args.root, flags["labeled_patients"], flags["val_cases"])[2])
        volumes = bcp.load_la_volumes(args.root, names, num_classes, standardize=flags.get("standardize", False))
        path_of = lambda name: Path(args.root) / bcp.LA_FOLDER / name / "mri_norm2.h5"
    else:
        volumes = bcp.load_volumes(args.root, args.split, num_classes)
        path_of = lambda name: Path(args.root) / "data" / f"{name}.h5"

    native = own_data.get("cases")  # your own 3D scans: scored on each scan's own grid, in mm
    scoring = "nnunet" if own_data else "paper"
    per_volume = []
    for name, image, label in volumes:
        spacing, size = None, None
        if native:
            native_truth, spacing = native_label(path_of(name)), native[name]["spacing"]
            size = native_truth.shape
        prediction = bcp.segment(model, torch.from_numpy(image).to(device), patch_size, args.stride,
                                 flags.get("scale") or 1.0, args.windows == "gaussian", keep_largest, size).cpu()
        if args.save_png:  # on the grid the model saw
            shown = bcp.resample_labels(prediction, image.shape) if native else prediction
            save_montage(Path(args.save_png) / f"{name}.png", image, [label, shown.numpy()], slices_last=la)
        per_volume.append(score_volume(prediction.numpy(), native_truth if native else label, num_classes, spacing, scoring))

    with warnings.catch_warnings():  # a metric left out of every volume is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = {class_names[c]: {m: float(np.nanmean([v[c][m] for v in per_volume])) for m in METRICS}
                     for c in range(num_classes - 1)}
        mean = {m: float(np.nanmean([per_class[n][m] for n in class_names])) for m in METRICS}
    counts = {case: sum(s["case"] == case for v in per_volume for s in v) for case in CASES}

    print(f"{args.checkpoint} ({flags.get('phase')}, {flags.get('labeled_patients')} labeled patients) "
          f"on {args.root} {args.split}: {len(per_volume)} volumes")
    print(f"{'':42s} {'Dice %':>8s} {'Jaccard %':>10s} {'HD95':>8s} {'ASD':>8s}")
    for row_name, scores in [*per_class.items(), ("mean (ours)", mean)]:
        print(f"{row_name:42s} {scores['dice']:8.2f} {scores['jaccard']:10.2f} {scores['hd95']:8.2f} {scores['asd']:8.2f}")
    if (Path(args.root) / "SYNTHETIC").exists():
        print("SYNTHETIC phantoms: the paper's rows do not apply")
    elif not own_data:
        if args.split != "test":
            print(f"the paper's rows below were measured on the test split, these on {args.split}")
        for row_name, *row in PAPER_ROWS["la" if la else "acdc"].get(flags.get("labeled_patients"), []):
            print(f"{row_name:42s} {row[0]:8.2f} {row[1]:10.2f} {row[2]:8.2f} {row[3]:8.2f}")
    total = len(per_volume) * (num_classes - 1)
    if scoring == "paper":
        print(f"class-volumes with an empty prediction (scored 0): {counts['empty prediction']} of {total}")
    else:
        print(f"class-volumes ({total}), as nnU-Net counts them: {counts['scored']} scored; "
              f"{counts['empty prediction']} with an empty prediction and {counts['empty reference']} with an empty "
              f"reference (Dice 0, HD95 and ASD left out); {counts['absent from both']} absent from both (left out)")
    if native:
        print(f"scored on each scan's own grid ({args.windows} windows, the probabilities resampled back, then the "
              f"argmax), HD95 and ASD in mm")

    if args.kde:
        feature_distributions(model, args.root, flags["labeled_patients"], num_classes, patch_size, device, args.kde)
    if args.json:
        bcp.write_atomic(args.json, json.dumps(
            {"mean": mean, "per_class": per_class, "volumes": len(per_volume), "scoring": scoring,
             "empty_predictions": counts["empty prediction"], "empty_references": counts["empty reference"],
             "absent_from_both": counts["absent from both"],
             "checkpoint": str(args.checkpoint), "split": args.split}, indent=2).encode() + b"\n")


if __name__ == "__main__":
    try:
        main()
    except (bcp.DataError, OSError) as error:  # OSError: an output that cannot be written
        sys.exit(f"error: {error}")
