"""
Build the ACDC data set in the SSL4MIS h5 layout that train.py and evaluate.py read (or a synthetic
left-atrium set in UA-MT's layout, for the 3D quick start).

    python prepare_acdc.py                                   # synthetic phantoms at data/ACDC (no download)
    python prepare_acdc.py --la --out data/LA_synthetic      # synthetic 3D left-atrium phantoms, UA-MT layout
    python prepare_acdc.py --raw ~/ACDC/database --out data/ACDC   # from the official NIfTI download
    python prepare_acdc.py --check data/ACDC                 # verify a folder, e.g. the SSL4MIS h5 download
    python prepare_acdc.py --raw ~/Task02_Heart --out data/mine   # your own scans, Decathlon or nnU-Net v2 layout:
        imagesTr/<case>.nii.gz (Decathlon) or <case>_0000.nii.gz (nnU-Net) + labelsTr/<case>.nii.gz
                                            labeled, split into train and val (--val-fraction; by patient
                                            when names say so, as patient001_frame01)
        imagesTr/ without a label, imagesUnlabeled/, imagesTs/ without labelsTs/   unlabeled (self-training only)
        imagesTs/ + labelsTs/               test; dataset.json 'labels' names the classes
      The plan chooses 2D (slices over 3 times thicker than the pixels: a U-Net on each slice) or 3D (a V-Net
      on crops), says why, and resamples to its spacing (2D: in plane only); --2d or --3d overrides it.

Layout written (and checked):
    ROOT/train.list, val.list, test.list   volume names, one a line (train.list order = labeling order)
    ROOT/train_slices.list                 slice names of the training volumes
    ROOT/data/<volume>.h5                  'image' float32 (S, H, W) in [0, 1], 'label' uint8 (S, H, W)
    ROOT/data/slices/<volume>_slice_<i>.h5 'image' float32 (H, W), 'label' uint8 (H, W), i from 1
--la and your own scans take UA-MT's LA layout instead, which the V-Net path reads (so LA and your scans share
one reader): ROOT/2018LA_Seg_Training Set/<case>/mri_norm2.h5 ('image' float32 (i, j, k), 'label' uint8),
train.list (your own: labeled, then unlabeled, then the validation cases) and test.list; your own scans also
get dataset.json with the classes, the plan (2D or 3D and why, spacing, crop, crops a step), the intensity
scheme, the validation count and each case's native shape, spacing and affine.
Everything is written into a temporary folder beside --out that is renamed to --out only when
complete. --force replaces only a folder this script wrote (its lists and data/), never one that
holds the current directory; the old folder is renamed aside first and deleted last, so a kill at any
moment leaves the old data set or the new one, whole.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

import data

# The standard ACDC split of SSL4MIS (used by BCP and every ACDC semi-supervised paper): 70 training
# patients in labeling order (the first 3 are "5%", the first 7 "10%"), 10 validation patients, and the
# remaining 20 of patients 1-100 for testing.
TRAIN_PATIENTS = (99, 38, 50, 100, 58, 21, 49, 20, 72, 40, 60, 89, 4, 56, 98, 96, 31, 18, 94, 47, 48, 55, 97, 74,
                  43, 41, 63, 37, 95, 54, 26, 88, 32, 69, 6, 71, 12, 73, 61, 17, 25, 10, 57, 29, 51, 5, 36, 46, 62,
                  34, 76, 92, 70, 77, 67, 3, 91, 16, 14, 44, 42, 90, 53, 27, 35, 86, 23, 9, 79, 15)
VAL_PATIENTS = (28, 85, 82, 87, 19, 30, 78, 45, 2, 39)
TEST_PATIENTS = tuple(sorted(set(range(1, 101)) - set(TRAIN_PATIENTS) - set(VAL_PATIENTS)))
NUM_CLASSES = 4
FRAMES = ("frame01", "frame02")  # end-diastole, end-systole


# ----------------------------------------------------------------------------- writing the layout

def write_h5(path, image, label, **more_labels):
    """'image' float32, 'label' uint8 and any further label maps (uint8), gzip-compressed."""
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        for key, array in {"label": label, **more_labels}.items():
            f.create_dataset(key, data=array.astype(np.uint8), compression="gzip")


LISTS = ("train", "val", "test", "train_slices")


def is_dataset(folder):
    """A folder this script wrote: the SYNTHETIC marker, or the lists and data/."""
    return (folder / "SYNTHETIC").is_file() or (folder / data.LA_FOLDER).is_dir() and (folder / "train.list").is_file() or (
        (folder / "data").is_dir() and all((folder / f"{name}.list").is_file() for name in LISTS))


def check_replaceable(out, force):
    """Refuse to write over anything but a data set, and over a folder that holds the current directory."""
    if not out.exists():
        return
    if not force:
        raise data.DataError(f"{out}: already exists (pass --force to replace it)")
    if not out.is_dir() or not is_dataset(out):
        raise data.DataError(f"{out}: not a data set written by prepare_acdc.py (no SYNTHETIC marker, lists or data/); "
                            f"refusing to replace it, even with --force")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise data.DataError(f"{out}: holds the current directory; refusing to replace it")


def clean_leftovers(out):
    """Staging folders of a killed run are deleted; an old data set renamed aside is put back if the
    new one never arrived, deleted if it did."""
    for staging in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(staging, ignore_errors=True)
    for old in out.parent.glob(f".{out.name}.old-*"):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(out)


def write_layout(out, volumes, force, marker=None, info=None, la=False):
    """Write (split, volume name, image (S, H, W), label (S, H, W)[, {name: more label maps}]) tuples
    into a temporary folder beside --out, slices for the training volumes, the lists, then swap it in
    for --out. `volumes` may be a generator: one volume is in memory at a time. info: written as
    dataset.json (your own data), after the last volume. la: UA-MT's layout instead (<case>/mri_norm2.h5
    under data.LA_FOLDER, train.list and test.list)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    check_replaceable(out, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the data set is an ordinary folder
    try:
        (staging / ("." if la else "data/slices")).mkdir(parents=True, exist_ok=True)
        lists = {"train": [], "val": [], "test": [], "train_slices": []}
        for split, name, image, label, *more in volumes:
            lists[split].append(name)
            path = data.volume_path(staging, "la" if la else "acdc", name)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_h5(path, image, label, **(more[0] if more else {}))
            if split == "train" and not la:
                for i, (image_slice, label_slice) in enumerate(zip(image, label), start=1):
                    write_h5(data.slice_path(staging, f"{name}_slice_{i}"), image_slice, label_slice)
                    lists["train_slices"].append(f"{name}_slice_{i}")
        for split, names in lists.items():
            if names or not la:
                (staging / f"{split}.list").write_text("".join(n + "\n" for n in names))
        if marker:
            (staging / "SYNTHETIC").write_text(marker)
        if info:
            (staging / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        clean_leftovers(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return lists


# ----------------------------------------------------------------------------- the official NIfTI download


def read_info(path):
    """Info.cfg -> {'ED': int, 'ES': int}."""
    try:
        fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
        return {key: int(fields[key].strip()) for key in ("ED", "ES")}
    except FileNotFoundError:
        raise data.DataError(f"{path}: missing") from None
    except (KeyError, ValueError):
        raise data.DataError(f"{path}: needs 'ED: <frame>' and 'ES: <frame>' lines") from None


def read_frame(folder, patient, frame):
    stem = folder / f"patient{patient:03d}_frame{frame:02d}"
    image_path, label_path = Path(f"{stem}.nii.gz"), Path(f"{stem}_gt.nii.gz")
    for path in (image_path, label_path):
        if not path.exists():
            raise data.DataError(f"{path}: missing")
    image, label = data.read_nifti(image_path), data.read_nifti(label_path)
    if image.ndim != 3 or image.shape != label.shape:
        raise data.DataError(f"{label_path}: shape {label.shape} does not match the image's {image.shape}")
    if label.min() < 0 or label.max() >= NUM_CLASSES or not np.all(label == np.round(label)):
        raise data.DataError(f"{label_path}: label values must be integers 0..{NUM_CLASSES - 1}, got {np.unique(label)[:10]}")
    return data.normalize(image.astype(np.float64), image_path), label.astype(np.uint8)


def official_volumes(raw):
    """Yield (split, name, image, label) for every frame of the standard split found under raw."""
    raw = Path(raw)
    if not raw.is_dir():
        raise data.DataError(f"{raw}: no such folder (expected the official ACDC download)")
    folders = {int(p.name[7:]): p for p in raw.rglob("patient[0-9][0-9][0-9]") if p.is_dir()}
    if not folders:
        raise data.DataError(f"{raw}: no patientXXX folders found (expected the official ACDC download)")
    outside = sorted(n for n in folders if n > 100)
    if outside:
        print(f"skipping {len(outside)} patients outside the standard split (patient{outside[0]:03d}-"
              f"patient{outside[-1]:03d}: the ACDC challenge test set, not used by the paper's table)")
    found = 0
    for split, patients in (("train", TRAIN_PATIENTS), ("val", VAL_PATIENTS), ("test", TEST_PATIENTS)):
        for patient in patients:
            if patient not in folders:
                continue
            found += 1
            info = read_info(folders[patient] / "Info.cfg")
            for name, frame in zip(FRAMES, (info["ED"], info["ES"])):
                yield (split, f"patient{patient:03d}_{name}", *read_frame(folders[patient], patient, frame))
    if not found:
        raise data.DataError(f"{raw}: none of patients 001-100 found")


# ----------------------------------------------------------------------------- your own scans (nnU-Net layout)


def dataset_channels(raw):
    """(DIR/dataset.json as a dict, {} without one; its channels: nnU-Net v2's 'channel_names' or the
    Decathlon's 'modality', {"0": "MRI"})."""
    path = raw / "dataset.json"
    fields = data.read_json(path) if path.exists() else {}
    if not isinstance(fields, dict):
        raise data.DataError(f"{path}: expected a JSON object with 'labels' and 'modality' or 'channel_names'")
    return fields, fields.get("channel_names") or fields.get("modality") or {}


def channel_suffix(raw, images):
    """'_0000' for nnU-Net v2's image names, '' for the Decathlon's, by dataset.json ('channel_names' is
    nnU-Net's, 'modality' the Decathlon's), else by the names themselves. One channel per case: a
    second channel (<case>_0001) or a multi-modal dataset.json is refused."""
    fields, channels = dataset_channels(raw)
    if len(channels) > 1:
        raise data.DataError(f"{raw / 'dataset.json'}: {len(channels)} channels ({', '.join(map(str, channels.values()))}); "
                            f"one channel per case is supported")
    numbered = [re.search(r"_\d{4}$", data.scan_stem(p)) is not None for p in images]
    nnunet = "channel_names" in fields or "modality" not in fields and numbered and all(numbered)
    second = next((p for p in images if nnunet and not data.scan_stem(p).endswith(data.NNUNET_CHANNEL)), None)
    if second:
        raise data.DataError(f"{second}: not channel 0 (<case>{data.NNUNET_CHANNEL}); one channel per case is supported")
    return data.NNUNET_CHANNEL if nnunet else ""


def class_names_of(raw):
    """Foreground class names from DIR/dataset.json (nnU-Net v2 {"name": value} or Decathlon
    {"value": "name"}), or None without one."""
    path = raw / "dataset.json"
    if not path.exists():
        return None
    fields = data.read_json(path)
    try:
        labels = fields["labels"]
        by_value = {int(v): k for k, v in labels.items()} if all(str(v).isdigit() for v in labels.values()) \
            else {int(k): v for k, v in labels.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise data.DataError(f"{path}: needs 'labels' as in nnU-Net or the Decathlon ({error!r})") from None
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise data.DataError(f"{path}: labels must be 0 .. C-1 with C >= 2, got {sorted(by_value)}")
    return [str(by_value[c]) for c in range(1, len(by_value))]


SUBJECT = re.compile(r"^(.+?)-(?:frame|time|timepoint|tp|phase|visit|ses|session|ed|es)-?\d*$", re.IGNORECASE)


def subject_of(name):
    """The patient or subject a case belongs to, when its name says so: 'patient001-frame01' (nnU-Net's ACDC)
    -> 'patient001', also -tp2, -visit3, -ses-1, -ED; otherwise the case itself."""
    match = SUBJECT.match(name)
    return match.group(1) if match else name


def own_cases(raw, val_fraction, seed):
    """Your own scans as the Medical Segmentation Decathlon (imagesTr/<case>.nii.gz) or nnU-Net v2
    (imagesTr/<case>_0000.nii.gz) lays them out -> (info for dataset.json, {case: image path}, {case:
    label path}, {case: split}). Labeled cases of imagesTr are split into train and val (val_fraction of
    their patients when names say so (subject_of: both frames of a patient on one side), else of the cases,
    shuffled by seed); every scan without a label (imagesTr, imagesUnlabeled, and imagesTs, where
    the Decathlon withholds the labels) is 'unlabeled' (training, self-training only); imagesTs with
    labelsTs is the test split."""
    raw = Path(raw)
    scans = {split: data.nifti_files(raw / folder) for folder, split in
             (("imagesTr", "train"), ("imagesUnlabeled", "unlabeled"), ("imagesTs", "test"))}
    suffix = channel_suffix(raw, [path for paths in scans.values() for path in paths])
    images, labels = {}, {}
    for split, paths in scans.items():
        for path in paths:
            name = data.case_name(path, suffix)
            if name in images:
                raise data.DataError(f"{path}: case {name} appears twice (names are compared with '_' read as '-')")
            images[name] = (split, path)
    for folder in ("labelsTr", "labelsTs"):
        for path in data.nifti_files(raw / folder):
            if data.case_name(path) not in images:
                raise data.DataError(f"{path}: a label without an image ({raw / folder.replace('labels', 'images')}/"
                                    f"{data.scan_stem(path)}{suffix}.nii.gz)")
            labels[data.case_name(path)] = path
    if not any(split == "train" and name in labels for name, (split, _) in images.items()):
        raise data.DataError(f"{raw}: no labeled training cases (imagesTr/<case>{suffix}.nii.gz with labelsTr/<case>.nii.gz)")
    values = {name: np.unique(data.read_nifti(path)) for name, path in labels.items()}  # read again when written:
    # the classes must be known before the first volume is, and only one volume is held at a time
    for name, found in values.items():
        if found.min() < 0 or not np.array_equal(found, np.round(found)):
            raise data.DataError(f"{labels[name]}: label values must be whole numbers from 0, got {found[:10]}")
    if not any(values[name].max() > 0 for name, (split, _) in images.items() if split == "train" and name in values):
        raise data.DataError(f"{raw / 'labelsTr'}: every training label map is empty (background only); "
                             f"there is no organ to learn")
    class_names = class_names_of(raw)
    num_classes = len(class_names) + 1 if class_names else int(max(v.max() for v in values.values())) + 1
    for name, found in values.items():
        others = [v.max() for n, v in values.items() if n != name]
        if found.max() >= num_classes or (not class_names and others and found.max() > max(others)):
            raise data.DataError(f"{labels[name]}: holds class {found.max():g}, which "
                                + (f"dataset.json does not list (classes 0..{num_classes - 1})" if class_names else
                                   "no other label has; list the classes in dataset.json 'labels' if that is right"))
    labeled = [name for name, (split, _) in images.items() if split == "train" and name in labels]
    subjects = list(dict.fromkeys(subject_of(name) for name in labeled))
    subjects = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    n_val = min(len(subjects) - 1, max(int(val_fraction > 0), round(len(subjects) * val_fraction)))  # at least one
    held_aside = set(subjects[:n_val])
    labeled = [name for subject in subjects for name in labeled if subject_of(name) == subject]  # a subject's cases together
    splits = {name: "val" if subject_of(name) in held_aside else "train" for name in labeled}
    unlabeled = [name for name in images if name not in labels]
    splits |= {name: "unlabeled" for name in unlabeled}
    splits |= {name: "test" for name, (split, _) in images.items() if split == "test" and name in labels}
    unlabeled_tests = sum(images[name][0] == "test" for name in unlabeled)
    if unlabeled_tests:
        print(f"{unlabeled_tests} imagesTs scans have no labelsTs: they join the unlabeled scans (self-training only)")
    by_subject = len(subjects) < len(labeled)
    info = {"num_classes": num_classes, "class_names": class_names or [f"class {c}" for c in range(1, num_classes)],
            "unlabeled": unlabeled, "source": str(raw),
            "validation": f"{sum(split == 'val' for split in splits.values())} cases held aside "
                          + (f"by patient ({n_val} of {len(subjects)}: each patient's labeled cases on one side)" if by_subject
                             else f"by case ({n_val} of {len(labeled)})")}
    order = ["train", "unlabeled", "val", "test"]  # train.list: labeled first (the labeling order), then unlabeled
    splits = dict(sorted(splits.items(), key=lambda item: order.index(item[1])))
    return info, {name: path for name, (_, path) in images.items()}, labels, splits


FOREGROUND_SAMPLES = 100_000  # CT statistics: at most this many foreground voxels of each labeled scan


def modality_of(raw):
    """'CT' or 'MRI' from DIR/dataset.json (nnU-Net v2 channel_names, or the Decathlon's modality);
    MRI when it says neither."""
    _, channels = dataset_channels(raw)
    return "CT" if str(channels.get("0", "")).upper() == "CT" else "MRI"


def read_labels_3d(path, shape, affine):
    """A label map (i, j, k) uint8 of any stored type (own_cases checked its values), on its scan's grid."""
    labels, header = data.read_nifti(path, with_header=True)
    labels = (labels[None] if labels.ndim == 2 else labels).transpose(2, 1, 0)
    label_affine = data.nifti_geometry(header, path)[1]
    if labels.shape != shape or not np.allclose(label_affine, affine, atol=1e-3):
        raise data.DataError(f"{path}: shape {labels.shape} and affine {np.round(label_affine, 3).tolist()} "
                            f"differ from the scan's {shape} and {np.round(affine, 3).tolist()}")
    return labels.astype(np.uint8)


# The plan of your own scans: nnU-Net's planning step, budgeted for a 2-core CPU's time instead of a GPU's memory
ANISOTROPY = 3  # an axis whose median spacing is over 3 times the finest axis's holds thick slices (nnU-Net's rule)
PLANNED_VOXELS = {2: 160 * 160,  # the median slice (2D) or scan (3D) resampled holds at most this many voxels: ACDC's
                  3: 200_000}    # CPU patch in 2D; 2.9 mm on the whole-field LA task in 3D, where 3 mm learned the
                                 # atrium and finer voxels did not (docs/own_scans.md)
CPU_PATCH = {2: (160, 160), 3: (64, 64, 32)}  # the plan's largest crop, cut to the median resampled slice or scan
LABELED_CROPS = {2: 6, 3: 8}  # labeled crops a step (self-training adds as many unlabeled): ACDC's CPU batch in 2D;
                              # in 3D, 2 learned nothing in 300 steps
NONZERO_SHARE = 3 / 4  # MRI is z-scored inside its nonzero region when that region's box is less than this share
                       # of the scan (nnU-Net's rule for scans with a large empty margin)


def choose_dims(spacings, shapes):
    """2D or 3D from the labeled training scans' spacings and shapes (along i, j, k), as nnU-Net chooses for
    thick slices: 2D for single slices, and where the slices (k) lie more than ANISOTROPY times the in-plane
    spacing apart, each slice then segmented at the in-plane spacing; else 3D. -> (2 or 3, the reason in one line)."""
    if np.median(np.asarray(shapes)[:, 2]) == 1:
        return 2, "2D: the scans are single slices"
    median = np.median(np.asarray(spacings, float), axis=0)
    ratio = median[2] / median[:2].min()
    voxels = " x ".join(f"{s:.3g}" for s in median)
    if ratio > ANISOTROPY:
        return 2, (f"2D: slices {median[2]:.3g} mm apart are {ratio:.1f} times the {median[:2].min():.3g} mm pixels (thick "
                   f"slices: over {ANISOTROPY} times, nnU-Net's rule), so each slice is segmented at its in-plane spacing")
    thick = median.argmax() if median.max() > ANISOTROPY * median.min() else None
    return 3, (f"3D: median voxels {voxels} mm" + (f", thick along axis {'ijk'[thick]} (a 2D plan takes slices along k)"
                                                   if thick is not None else f", no axis over {ANISOTROPY} times another"))


def plan_grid(spacings, shapes, dims, spacing=None):
    """nnU-Net's planning step, for a 2-core CPU, from the labeled training scans' spacings and shapes (along
    i, j, k). 3D: the target spacing is their median (the 10th percentile on a thick-slice axis), coarsened alike
    on every finer axis until the median scan holds at most PLANNED_VOXELS voxels (nnU-Net's low-resolution
    stage, for a CPU's time). 2D: the same over the in-plane axes i, j (the median slice), each scan keeping its
    own slices (None along k). The crop: CPU_PATCH cut to the median resampled scan or slice (multiples of 16);
    the crops a step. --spacing replaces the spacing (its first two in 2D). -> the plan's dict."""
    spacings, shapes = np.asarray(spacings, float)[:, :dims], np.asarray(shapes, float)[:, :dims]
    if spacing is None:
        target = np.median(spacings, axis=0)
        thick = target > ANISOTROPY * target.min()
        target[thick] = np.percentile(spacings[:, thick], 10, axis=0)
        extent, finest = np.median(shapes * spacings, axis=0), target.min()  # mm
        while np.prod(np.maximum(1, np.round(extent / np.maximum(target, finest)))) > PLANNED_VOXELS[dims]:
            finest *= 1.05
        target = np.maximum(target, finest).round(2)
    else:
        target = np.asarray(spacing, float)[:dims]
    median_shape = np.median(shapes * spacings / target, axis=0).round().astype(int)
    return {"dims": dims, "spacing": target.tolist() + [None] * (3 - dims), "median_shape": median_shape.tolist(),
            "patch_size": data.fitted_patch(CPU_PATCH[dims], median_shape), "labeled_batch_size": LABELED_CROPS[dims],
            "batch_size": 2 * LABELED_CROPS[dims]}


def intensity_rule(raw, images, training, seed, ct_window=None):
    """How the scans' intensities are normalised (nnU-Net's rules): CT clipped to the 0.5 and 99.5
    percentiles of the labeled training foreground (or --ct-window), then that foreground's mean and standard
    deviation; MRI z-scored per scan, inside its nonzero region when that region's box holds less than
    NONZERO_SHARE of the median training scan. -> the preprocessing's dict (without the spacing)."""
    rule = {"modality": modality_of(Path(raw))}
    if rule["modality"] == "CT":
        rng, samples = np.random.default_rng(seed), []
        for name, label_path in training.items():
            image, _, affine, _ = data.read_scan_3d(images[name])
            foreground = image[read_labels_3d(label_path, image.shape, affine) > 0]
            samples.append(rng.choice(foreground, min(len(foreground), FOREGROUND_SAMPLES), replace=False))
        samples = np.concatenate(samples).astype(np.float64)
        low, high = ct_window or np.percentile(samples, [0.5, 99.5]).tolist()
        clipped = np.clip(samples, low, high)
        return rule | {"window": [float(low), float(high)], "mean": float(clipped.mean()), "std": max(float(clipped.std()), 1e-8),
                       "normalization": "clipped to the window, then the training foreground's mean and std"}
    shares = []
    for name in training:
        image = data.read_scan_3d(images[name])[0]
        occupied = [np.flatnonzero(image.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        shares.append(np.prod([(o[-1] - o[0] + 1) / n if len(o) else 0 for o, n in zip(occupied, image.shape)]))
    inside = float(np.median(shares)) < NONZERO_SHARE
    return rule | {"nonzero_only": inside,
                   "normalization": "z-score inside each scan's nonzero region" if inside else "z-score over each scan"}


def own_volumes(raw, val_fraction, seed, dims=None, spacing=None, ct_window=None):
    """Your own scans as volumes in UA-MT's layout, which the LA path reads (crops, sliding windows): arrays in
    NIfTI index order (i, j, k), resampled to the plan's spacing (plan_grid: 2D or 3D as choose_dims finds, or
    `dims`; in 2D only in plane), intensities by modality (intensity_rule). train.list holds the labeled
    training cases, then the unlabeled, then the validation cases (train.py holds the last --val-cases aside);
    the plan and each case's native shape, spacing and affine go to dataset.json, and a test or validation
    case's native label map to its h5 ('label_native') for scoring on the scan's own grid. One scan is in
    memory at a time, as float32 (its labels as uint8). -> (info, a generator of (split, name, image, label[,
    more label maps]))."""
    info, images, labels, splits = own_cases(raw, val_fraction, seed)
    training = {name: labels[name] for name, split in splits.items() if split == "train"}
    headers = {name: data.read_nifti_header(path) for name, path in images.items()}  # headers only
    spacings = {name: data.nifti_geometry(header, images[name])[0] for name, header in headers.items()}
    shapes = {name: data.nifti_shape(header) for name, header in headers.items()}
    chosen, reason = choose_dims([spacings[n] for n in training], [shapes[n] for n in training])
    if dims and dims != chosen:
        reason = f"{dims}D as --{dims}d asks; the scans alone would have chosen {reason}"
    dims = dims or chosen
    if spacing and len(spacing) != dims:
        raise data.DataError(f"--spacing takes {dims} numbers for the {dims}D plan ({reason}), got {len(spacing)}")
    plan = plan_grid([spacings[n] for n in training], [shapes[n] for n in training], dims, spacing)
    plan["reason"] = reason
    for name, case_spacing in spacings.items():
        data.check_spacing(case_spacing, data.target_spacing(case_spacing, plan["spacing"]), images[name])
    preprocessing = {"spacing": plan["spacing"], "grid": data.EXACT_GRID} | intensity_rule(raw, images, training, seed, ct_window)
    info |= {"plan": plan, "preprocessing": preprocessing, "val_cases": sum(split == "val" for split in splits.values()),
             "cases": {}}

    def volumes():
        for name, split in splits.items():
            image, case_spacing, affine, _ = data.read_scan_3d(images[name])
            label = read_labels_3d(labels[name], image.shape, affine) if name in labels else np.zeros(image.shape, np.uint8)
            native_shape = list(image.shape)
            resampled = data.preprocess_3d(image, case_spacing, preprocessing, images[name])
            del image
            info["cases"][name] = {"shape": native_shape, "spacing": case_spacing.tolist(), "affine": affine.tolist(),
                                   "resampled_shape": list(resampled.shape)}
            more = {"label_native": label} if split in ("val", "test") else {}
            steps = data.spacing_steps(case_spacing, data.target_spacing(case_spacing, preprocessing["spacing"]))
            yield ("test" if split == "test" else "train"), name, resampled, \
                data.resample_spacing(torch.from_numpy(label), resampled.shape, steps, nearest=True).numpy(), more
    return info, volumes()


# ----------------------------------------------------------------------------- synthetic phantoms

def phantom_frame(rng, shape, slices, anatomy, systole):
    """One short-axis cine-MRI phantom volume (S, H, W) and its labels: bright LV blood pool inside a
    dark myocardial ring, a bright RV crescent beside it, body tissue, lungs, texture, bias field and
    noise; the heart tapers from base to apex and contracts at end-systole."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    a = anatomy
    cos, sin = math.cos(a["angle"]), math.sin(a["angle"])
    u = ((cols - a["cx"]) * cos + (rows - a["cy"]) * sin)  # heart-aligned coordinates
    v = (-(cols - a["cx"]) * sin + (rows - a["cy"]) * cos)
    squeeze = 0.72 if systole else 1.0
    thicken = 1.35 if systole else 1.0
    body = ((cols - w / 2) / (0.46 * w)) ** 2 + ((rows - h / 2) / (0.40 * h)) ** 2 < 1
    lungs = [(((cols - w / 2 - s * 0.27 * w) / (0.13 * w)) ** 2 + ((rows - h * 0.45) / (0.22 * h)) ** 2) < 1 for s in (-1, 1)]
    images, labels = np.empty((slices, h, w), np.float32), np.zeros((slices, h, w), np.uint8)
    for s in range(slices):
        depth = s / max(slices - 1, 1)  # 0 at the base, 1 at the apex
        taper = 1.0 - 0.65 * depth ** 1.6
        lv_radius = a["lv_radius"] * squeeze * taper
        wall = a["wall"] * thicken * (0.8 + 0.3 * taper)
        radius = np.sqrt((u / a["ellipticity"]) ** 2 + (v * a["ellipticity"]) ** 2)
        lv = radius < lv_radius
        myo = (radius >= lv_radius) & (radius < lv_radius + wall)
        rv_radius = a["rv_radius"] * (0.85 if systole else 1.0) * taper ** 1.3
        rv_center = lv_radius + wall + rv_radius * 0.45
        rv = (np.sqrt(((u + rv_center) / 1.25) ** 2 + (v / 0.95) ** 2) < rv_radius) & (radius >= lv_radius + wall + 1.0)
        if depth > 0.85:  # the RV ends before the apex
            rv[:] = False
        label = np.zeros((h, w), np.uint8)
        label[rv], label[myo], label[lv] = 1, 2, 3
        texture = sum(amplitude * np.sin(fr * rows + fc * cols + phase) for amplitude, fr, fc, phase in a["texture"])
        image = np.where(body, a["tissue"] + texture, 0.03)
        for lung in lungs:
            image = np.where(lung & body, a["lung"], image)
        for x, y, r, intensity in a["vessels"]:  # bright look-alikes of blood pools: aorta, vessels
            image = np.where((cols - x) ** 2 + (rows - y) ** 2 < (r * (0.6 + 0.4 * taper)) ** 2, intensity, image)
        image = np.where(label == 1, a["rv_blood"], image)
        image = np.where(label == 2, a["myo"], image)
        image = np.where(label == 3, a["lv_blood"], image)
        bias = 1 + a["bias"] * ((cols - w / 2) / w * a["bias_dir"][0] + (rows - h / 2) / h * a["bias_dir"][1])
        image = image * bias + rng.normal(0, a["noise"], (h, w))
        images[s], labels[s] = np.clip(image, 0, None) ** a["gamma"], label
    return images, labels


def random_anatomy(rng, shape):
    h, w = shape
    return {"cx": w * rng.uniform(0.40, 0.60), "cy": h * rng.uniform(0.40, 0.58), "angle": rng.uniform(-0.6, 0.6),
            "lv_radius": min(h, w) * rng.uniform(0.07, 0.12), "wall": min(h, w) * rng.uniform(0.035, 0.055),
            "rv_radius": min(h, w) * rng.uniform(0.10, 0.15), "ellipticity": rng.uniform(0.85, 1.15),
            "tissue": rng.uniform(0.35, 0.55), "lung": rng.uniform(0.02, 0.12), "myo": rng.uniform(0.15, 0.32),
            "lv_blood": rng.uniform(0.75, 1.0), "rv_blood": rng.uniform(0.6, 0.95),
            "texture": [(rng.uniform(0.02, 0.08), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0, 6.3))
                        for _ in range(3)],
            "bias": rng.uniform(0.0, 0.6), "bias_dir": rng.normal(size=2), "noise": rng.uniform(0.02, 0.09),
            "gamma": rng.uniform(0.8, 1.25),
            "vessels": [(w * rng.uniform(0.3, 0.7), h * rng.uniform(0.65, 0.8), min(h, w) * rng.uniform(0.03, 0.07),
                         rng.uniform(0.6, 1.0)) for _ in range(rng.integers(1, 4))]}


def synthetic_volumes(patients, seed):
    """Yield (split, name, image, label) for a synthetic set split 70/10/20 like ACDC."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.arange(1, patients + 1))
    n_val, n_test = max(1, round(patients * 0.1)), max(1, round(patients * 0.2))
    n_train = patients - n_val - n_test
    if n_train < 1:
        raise data.DataError(f"--patients {patients}: need at least 3 patients (train, val, test)")
    for position, patient in enumerate(order):
        split = "train" if position < n_train else "val" if position < n_train + n_val else "test"
        shape = (int(rng.integers(18, 29)) * 8, int(rng.integers(18, 29)) * 8)
        slices = int(rng.integers(6, 12))
        anatomy = random_anatomy(rng, shape)
        for name, systole in zip(FRAMES, (False, True)):
            image, label = phantom_frame(rng, shape, slices, anatomy, systole)
            yield split, f"patient{patient:03d}_{name}", data.normalize(image, f"synthetic patient{patient:03d}"), label


def tube(grid, start, direction, length, radius):
    """Voxels of `grid` (3, *S) within `radius` of the segment from `start` along the unit `direction`."""
    offset = grid - start[:, None, None, None]
    along = np.clip((offset * direction[:, None, None, None]).sum(0), 0, length)
    return ((offset - along * direction[:, None, None, None]) ** 2).sum(0) < radius ** 2


def la_phantom(rng, shape):
    """One synthetic left-atrium volume (D1, D2, D3), z-scored as UA-MT's LA volumes are, and its 0/1
    label: a contrast-filled atrium (an ellipsoid) with 2-4 pulmonary veins and an appendage; a bright
    aorta-like tube that is not labeled, tissue texture, a bias field and noise."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))  # (3, *S)
    center = np.array(shape) * rng.uniform(0.4, 0.6, 3)
    radii = np.array([rng.uniform(9, 14), rng.uniform(8, 12), rng.uniform(6, 9)])
    atrium = (((grid - center[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
    for _ in range(rng.integers(2, 5)):  # pulmonary veins leave the atrium backwards and sideways
        direction = rng.normal(size=3) * (1.0, 1.0, 0.5)
        direction /= np.linalg.norm(direction)
        atrium |= tube(grid, center + 0.7 * radii * direction, direction, rng.uniform(6, 12), rng.uniform(1.8, 3.0))
    appendage = center + radii * rng.choice([-1, 1], 3) * (0.8, 0.5, 0.3)
    atrium |= ((grid - appendage[:, None, None, None]) ** 2).sum(0) < rng.uniform(3, 5) ** 2
    side = center + np.array([0, rng.choice([-1, 1]) * (radii[1] + rng.uniform(5, 9)), -shape[2]])
    aorta = tube(grid, side, np.array([0.0, 0.0, 1.0]), 3 * shape[2], rng.uniform(3, 5)) & ~atrium
    texture = sum(rng.uniform(0.03, 0.08) * np.sin((rng.uniform(-0.4, 0.4, 3)[:, None, None, None] * grid).sum(0) + rng.uniform(0, 6.3))
                  for _ in range(3))
    image = rng.uniform(0.25, 0.4) + texture
    image = np.where(atrium, rng.uniform(0.8, 1.0), np.where(aorta, rng.uniform(0.7, 0.95), image))
    image = image * (1 + rng.uniform(0, 0.4) * (grid[0] / shape[0] - 0.5)) + rng.normal(0, rng.uniform(0.04, 0.1), shape)
    return ((image - image.mean()) / image.std()).astype(np.float32), atrium.astype(np.uint8)


def synthetic_la_volumes(cases, seed):
    """Yield (split, case, image, label) for a synthetic LA set: the last fifth for test.list."""
    rng = np.random.default_rng(seed)
    n_test = max(1, cases // 5)
    if cases - n_test < 3:
        raise data.DataError(f"--patients {cases}: need at least 4 cases (labeled, unlabeled, validation, test)")
    for i in range(cases):
        shape = (int(rng.integers(56, 73)), int(rng.integers(52, 65)), int(rng.integers(36, 45)))
        yield ("train" if i < cases - n_test else "test"), f"LA{i + 1:03d}", *la_phantom(rng, shape)


SYNTHETIC_BANNER = """\
SYNTHETIC data: short-axis cine-MRI phantoms, not ACDC. Numbers on it say the pipeline works, not how
BCP does on real hearts. For ACDC: register at https://www.creatis.insa-lyon.fr/Challenge/acdc/ and run
    python prepare_acdc.py --raw <download>/database --out data/ACDC
or use the SSL4MIS h5 copy (github.com/HiLab-git/SSL4MIS, data/ACDC) as --root directly."""


# ----------------------------------------------------------------------------- checking a folder

def check_la(dataset):
    """An LA root in UA-MT's layout: train.list and test.list, each listed case's mri_norm2.h5 readable
    with a 3D image and labels of one shape in 0..C-1, no case listed twice or in both lists."""
    root, problems, lists = dataset.root, [], {}
    for split in ("train", "test"):
        if split == "test" and dataset.own and not (root / "test.list").exists():
            lists[split] = []  # your own scans without imagesTs + labelsTs
            continue
        try:
            lists[split] = data.read_list(root, f"{split}.list")
        except data.DataError as error:
            problems.append(str(error))
            lists[split] = []
    try:
        data.check_splits(root)
    except data.DataError as error:
        problems.append(str(error))
    for name in dict.fromkeys(lists["train"] + lists["test"]):
        path = dataset.path(name)
        try:
            data.read_h5(path, 3, dataset.num_classes) if path.exists() else problems.append(f"{path}: listed but missing")
        except data.DataError as error:
            problems.append(str(error))
    print(f"LA layout: {len(lists['train'])} train.list cases, {len(lists['test'])} test.list cases")
    return problems


def check(root):
    """Verify lists against files, dtypes, value ranges and labels; print counts per split.
    Returns the list of problems (one line each)."""
    root, problems = Path(root), []
    if not root.is_dir():
        return [f"{root}: no such folder"]
    try:
        dataset = data.Dataset(root)
    except data.DataError as error:
        return [str(error)]
    if dataset.layout == "la":
        return check_la(dataset)
    lists = {}
    for split in LISTS:
        path = root / f"{split}.list"
        lists[split] = path.read_text().split() if path.exists() else []
        if not path.exists() or (not lists[split] and split != "test"):  # your own data may have no test split
            problems.append(f"{path}: missing or empty")
    num_classes = dataset.num_classes
    try:
        data.check_splits(root)
    except data.DataError as error:
        problems.append(str(error))
    train_patients = {data.patient_of(v) for v in lists["train"]}
    for name in lists["train_slices"]:
        if data.patient_of(name) not in train_patients:
            problems.append(f"{root / 'train_slices.list'}: {name} belongs to no patient of train.list")
    items = [(data.slice_path(root, n), 2) for n in lists["train_slices"]]
    items += [(dataset.path(n), 3) for split in ("train", "val", "test") for n in lists[split]]
    for path, ndim in items:
        if not path.exists():
            problems.append(f"{path}: listed but missing")
            continue
        try:
            with h5py.File(path, "r") as f:
                image, label = f["image"], f["label"]
                if image.dtype != np.float32 or label.dtype != np.uint8:
                    problems.append(f"{path}: dtypes {image.dtype}/{label.dtype}, expected float32/uint8")
                image, label = image[()], label[()]
        except (OSError, KeyError) as error:
            problems.append(f"{path}: cannot read 'image' and 'label' ({error})")
            continue
        if image.ndim != ndim or image.shape != label.shape:
            problems.append(f"{path}: expected {ndim}D image and label of one shape, got {image.shape} and {label.shape}")
        elif not (np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
            problems.append(f"{path}: image values must lie in [0, 1], got {image.min()}..{image.max()}")
        elif label.max(initial=0) >= num_classes:
            problems.append(f"{path}: label values must lie in 0..{num_classes - 1}, got max {label.max()}")
    for split in ("train", "val", "test"):
        patients = {data.patient_of(v) for v in lists[split]}
        slices = len(lists["train_slices"]) if split == "train" else 0
        print(f"{split:5s}: {len(patients):3d} patients, {len(lists[split]):3d} volumes" + (f", {slices} slices" if slices else ""))
    if dataset.synthetic:
        print("this folder holds SYNTHETIC phantoms, not ACDC")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", help="the official ACDC download (folders patientXXX with Info.cfg and NIfTI files), "
                                 "or your own scans in the nnU-Net layout (imagesTr/, labelsTr/, ...)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="your own scans: the share of labeled patients (of labeled cases where names say no patient) "
                        "kept for validation, at least one")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--3d", dest="dims", action="store_const", const=3,
                      help="your own scans as whole 3D volumes for the V-Net, whatever their spacing says")
    kind.add_argument("--2d", dest="dims", action="store_const", const=2,
                      help="your own scans as 2D slices (along k) for the U-Net, whatever their spacing says "
                           "(by default the plan chooses: 2D for slices over 3 times thicker than the pixels)")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                   help="your own scans: resample every scan to this spacing in mm, X Y Z in 3D, X Y in 2D (the "
                        "plan's: the labeled scans' median, coarser for large scans)")
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="your own CT scans: clip to this window (the 0.5 and 99.5 percentiles of the labeled training "
                        "foreground)")
    p.add_argument("--out", default="data/ACDC", help="where to write the layout")
    p.add_argument("--check", metavar="ROOT", help="verify an existing folder instead of writing one")
    p.add_argument("--patients", type=int, help="synthetic set: number of patients (ACDC 100, split 70/10/20; "
                                                  "--la 30 cases, the last fifth for testing)")
    p.add_argument("--la", action="store_true", help="synthetic 3D left-atrium phantoms in UA-MT's layout instead")
    p.add_argument("--seed", type=int, default=1337, help="random seed of the synthetic set and of your own val split")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.ct_window and args.ct_window[0] >= args.ct_window[1]:
        p.error(f"--ct-window LO HI needs LO < HI, got {args.ct_window[0]:g} {args.ct_window[1]:g}")
    if args.spacing and min(args.spacing) <= 0:
        p.error(f"--spacing must be positive, got {args.spacing}")
    if (args.dims or args.spacing or args.ct_window) and not (args.raw and (Path(args.raw) / "imagesTr").is_dir()):
        p.error("--2d, --3d, --spacing and --ct-window take your own scans: --raw DIR with DIR/imagesTr")
    if args.spacing and len(args.spacing) not in (2, 3):
        p.error(f"--spacing takes X Y (2D) or X Y Z (3D) in mm, got {len(args.spacing)} numbers")
    try:
        if args.check:
            problems = check(args.check)
            for problem in problems:
                print(problem)
            print(f"{len(problems)} problem(s) in {args.check}" if problems else f"{args.check}: OK")
            return 1 if problems else 0
        start = time.time()
        if args.raw and (Path(args.raw) / "imagesTr").is_dir():
            info, volumes = own_volumes(args.raw, args.val_fraction, args.seed, args.dims, args.spacing, args.ct_window)
            lists = write_layout(args.out, volumes, args.force, info=info, la=True)
            done, plan = info["preprocessing"], info["plan"]
            spacing = " x ".join(f"{s:g}" for s in plan["spacing"] if s is not None) + (" mm in plane, each scan's own "
                                                                                          "slices" if plan["dims"] == 2 else " mm")
            print(f"wrote {args.out}: {len(lists['train'])} train.list cases ({len(info['unlabeled'])} unlabeled, the last "
                  f"{info['val_cases']} for validation), {len(lists['test'])} test.list cases, {info['num_classes']} classes "
                  f"({', '.join(info['class_names'])}) in {time.time() - start:.0f} s")
            print(f"validation: {info['validation']}")
            print(f"plan (dataset.json; flags override it): {plan['reason']}")
            smallest = np.min([info["cases"][name]["resampled_shape"] for name in lists["train"]], axis=0)[:plan["dims"]]
            crop = data.fitted_patch(plan["patch_size"], smallest)  # as train.py cuts it
            cut = f" (the median's {' x '.join(map(str, plan['patch_size']))}, cut to the smallest case's " \
                  f"{' x '.join(map(str, smallest))})" if crop != plan["patch_size"] else ""
            print(f"  spacing {spacing} (median {'slice' if plan['dims'] == 2 else 'scan'} "
                  f"{' x '.join(map(str, plan['median_shape']))} voxels), crops {' x '.join(map(str, crop))}{cut}, "
                  f"{plan['labeled_batch_size']} labeled crops a step (+ as many unlabeled in self-training); "
                  f"{done['modality']}: {done['normalization']}")
            return 0
        elif args.raw:
            lists = write_layout(args.out, official_volumes(args.raw), args.force)
        elif args.la:
            cases = args.patients or 30
            marker = f"SYNTHETIC left-atrium phantoms, not LA\n--la --patients {cases} --seed {args.seed}\n"
            lists = write_layout(args.out, synthetic_la_volumes(cases, args.seed), args.force, marker=marker, la=True)
            print(f"wrote {args.out}: {len(lists['train'])} train.list and {len(lists['test'])} test.list cases "
                  f"(UA-MT's layout, SYNTHETIC) in {time.time() - start:.0f} s")
            return 0
        else:
            args.patients = args.patients or 100
            print(SYNTHETIC_BANNER)
            marker = f"{SYNTHETIC_BANNER}\n--patients {args.patients} --seed {args.seed}\n"
            marker_path = Path(args.out) / "SYNTHETIC"
            if not args.force and marker_path.exists() and marker_path.read_text() == marker and not check(args.out):
                print(f"{args.out} already holds this synthetic set; nothing to do")
                return 0
            lists = write_layout(args.out, synthetic_volumes(args.patients, args.seed), args.force, marker=marker)
        print(f"wrote {args.out}: {len(lists['train'])} train volumes ({len(lists['train_slices'])} slices), "
              f"{len(lists['val'])} val, {len(lists['test'])} test volumes in {time.time() - start:.0f} s")
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
