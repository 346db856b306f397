"""
Build the ACDC data set in the SSL4MIS h5 layout that train.py and evaluate.py read.

    python prepare_acdc.py                                   # synthetic phantoms at data/ACDC (no download)
    python prepare_acdc.py --raw ~/ACDC/database --out data/ACDC   # from the official NIfTI download
    python prepare_acdc.py --check data/ACDC                 # verify a folder, e.g. the SSL4MIS h5 download

Layout written (and checked):
    ROOT/train.list, val.list, test.list   volume names, one a line (train.list order = labeling order)
    ROOT/train_slices.list                 slice names of the training volumes
    ROOT/data/<volume>.h5                  'image' float32 (S, H, W) in [0, 1], 'label' uint8 (S, H, W)
    ROOT/data/slices/<volume>_slice_<i>.h5 'image' float32 (H, W), 'label' uint8 (H, W), i from 1
Everything is written into a temporary folder beside --out that is renamed to --out only when
complete. --force replaces only a folder this script wrote (its lists and data/), never one that
holds the current directory; the old folder is renamed aside first and deleted last, so a kill at any
moment leaves the old data set or the new one, whole.
"""
import argparse
import gzip
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import bcp

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

def write_h5(path, image, label):
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        f.create_dataset("label", data=label.astype(np.uint8), compression="gzip")


LISTS = ("train", "val", "test", "train_slices")


def is_dataset(folder):
    """A folder this script wrote: the SYNTHETIC marker, or the lists and data/."""
    return (folder / "SYNTHETIC").is_file() or (
        (folder / "data").is_dir() and all((folder / f"{name}.list").is_file() for name in LISTS))


def check_replaceable(out, force):
    """Refuse to write over anything but a data set, and over a folder that holds the current directory."""
    if not out.exists():
        return
    if not force:
        raise bcp.DataError(f"{out}: already exists (pass --force to replace it)")
    if not out.is_dir() or not is_dataset(out):
        raise bcp.DataError(f"{out}: not a data set written by prepare_acdc.py (no SYNTHETIC marker, lists or data/); "
                            f"refusing to replace it, even with --force")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise bcp.DataError(f"{out}: holds the current directory; refusing to replace it")


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


def write_layout(out, volumes, force, marker=None):
    """Write (split, volume name, image (S, H, W), label (S, H, W)) tuples into a temporary folder
    beside --out, slices for the training volumes, the lists, then swap it in for --out. `volumes` may
    be a generator: one volume is in memory at a time."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    check_replaceable(out, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the data set is an ordinary folder
    try:
        (staging / "data" / "slices").mkdir(parents=True)
        lists = {"train": [], "val": [], "test": [], "train_slices": []}
        for split, name, image, label in volumes:
            write_h5(staging / "data" / f"{name}.h5", image, label)
            lists[split].append(name)
            if split == "train":
                for i, (image_slice, label_slice) in enumerate(zip(image, label), start=1):
                    write_h5(staging / "data" / "slices" / f"{name}_slice_{i}.h5", image_slice, label_slice)
                    lists["train_slices"].append(f"{name}_slice_{i}")
        for split, names in lists.items():
            (staging / f"{split}.list").write_text("".join(n + "\n" for n in names))
        if marker:
            (staging / "SYNTHETIC").write_text(marker)
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


def normalize(image, path):
    low, high = float(image.min()), float(image.max())
    if high <= low:
        raise bcp.DataError(f"{path}: the image is constant ({low}); cannot min-max normalise")
    return ((image - low) / (high - low)).astype(np.float32)


# ----------------------------------------------------------------------------- the official NIfTI download

NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}


def read_nifti(path):
    """A NIfTI-1 file (.nii or .nii.gz) -> numpy array in (slice, row, col) order, as SimpleITK's
    GetArrayFromImage gives it: the reverse of the NIfTI index order (i, j, k). scl_slope/scl_inter
    are applied when set (the result is then float)."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise bcp.DataError(f"{path}: cannot read ({error})") from None
    if len(raw) < 348:
        raise bcp.DataError(f"{path}: too short for a NIfTI-1 header ({len(raw)} bytes)")
    endian = next((e for e in "<>" if struct.unpack(e + "i", raw[:4])[0] == 348), None)
    if endian is None or raw[344:347] not in (b"n+1", b"ni1"):
        raise bcp.DataError(f"{path}: not a NIfTI-1 file")
    dims = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    slope, inter = struct.unpack(endian + "2f", raw[112:120])
    if datatype not in NIFTI_DTYPES:
        raise bcp.DataError(f"{path}: unsupported NIfTI datatype code {datatype}")
    if not 1 <= dims[0] <= 7:
        raise bcp.DataError(f"{path}: invalid number of dimensions {dims[0]}")
    shape = dims[1:1 + dims[0]]
    dtype = np.dtype(endian + NIFTI_DTYPES[datatype])
    count = math.prod(shape)
    if len(raw) < offset + count * dtype.itemsize:
        raise bcp.DataError(f"{path}: truncated: {shape} {dtype} needs {offset + count * dtype.itemsize} bytes, has {len(raw)}")
    data = np.frombuffer(raw, dtype, count, offset).reshape(shape[::-1])  # Fortran order -> (k, j, i)
    while data.ndim > 3 and data.shape[0] == 1:  # a trailing singleton time axis
        data = data[0]
    if slope not in (0.0, 1.0) or inter != 0.0:
        data = data * (slope or 1.0) + inter
    return data.copy()


def read_info(path):
    """Info.cfg -> {'ED': int, 'ES': int}."""
    try:
        fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
        return {key: int(fields[key].strip()) for key in ("ED", "ES")}
    except FileNotFoundError:
        raise bcp.DataError(f"{path}: missing") from None
    except (KeyError, ValueError):
        raise bcp.DataError(f"{path}: needs 'ED: <frame>' and 'ES: <frame>' lines") from None


def read_frame(folder, patient, frame):
    stem = folder / f"patient{patient:03d}_frame{frame:02d}"
    image_path, label_path = Path(f"{stem}.nii.gz"), Path(f"{stem}_gt.nii.gz")
    for path in (image_path, label_path):
        if not path.exists():
            raise bcp.DataError(f"{path}: missing")
    image, label = read_nifti(image_path), read_nifti(label_path)
    if image.ndim != 3 or image.shape != label.shape:
        raise bcp.DataError(f"{label_path}: shape {label.shape} does not match the image's {image.shape}")
    if label.min() < 0 or label.max() >= NUM_CLASSES or not np.all(label == np.round(label)):
        raise bcp.DataError(f"{label_path}: label values must be integers 0..{NUM_CLASSES - 1}, got {np.unique(label)[:10]}")
    return normalize(image.astype(np.float64), image_path), label.astype(np.uint8)


def official_volumes(raw):
    """Yield (split, name, image, label) for every frame of the standard split found under raw."""
    raw = Path(raw)
    if not raw.is_dir():
        raise bcp.DataError(f"{raw}: no such folder (expected the official ACDC download)")
    folders = {int(p.name[7:]): p for p in raw.rglob("patient[0-9][0-9][0-9]") if p.is_dir()}
    if not folders:
        raise bcp.DataError(f"{raw}: no patientXXX folders found (expected the official ACDC download)")
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
        raise bcp.DataError(f"{raw}: none of patients 001-100 found")


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
        raise bcp.DataError(f"--patients {patients}: need at least 3 patients (train, val, test)")
    for position, patient in enumerate(order):
        split = "train" if position < n_train else "val" if position < n_train + n_val else "test"
        shape = (int(rng.integers(18, 29)) * 8, int(rng.integers(18, 29)) * 8)
        slices = int(rng.integers(6, 12))
        anatomy = random_anatomy(rng, shape)
        for name, systole in zip(FRAMES, (False, True)):
            image, label = phantom_frame(rng, shape, slices, anatomy, systole)
            yield split, f"patient{patient:03d}_{name}", normalize(image, f"synthetic patient{patient:03d}"), label


SYNTHETIC_BANNER = """\
SYNTHETIC data: short-axis cine-MRI phantoms, not ACDC. Numbers on it say the pipeline works, not how
BCP does on real hearts. For ACDC: register at https://www.creatis.insa-lyon.fr/Challenge/acdc/ and run
    python prepare_acdc.py --raw <download>/database --out data/ACDC
or use the SSL4MIS h5 copy (github.com/HiLab-git/SSL4MIS, data/ACDC) as --root directly."""


# ----------------------------------------------------------------------------- checking a folder

def check(root):
    """Verify lists against files, dtypes, value ranges and labels; print counts per split.
    Returns the list of problems (one line each)."""
    root, problems = Path(root), []
    if not root.is_dir():
        return [f"{root}: no such folder"]
    lists = {}
    for split in LISTS:
        path = root / f"{split}.list"
        lists[split] = path.read_text().split() if path.exists() else []
        if not lists[split]:
            problems.append(f"{path}: missing or empty")
    train_patients = {bcp.patient_of(v) for v in lists["train"]}
    for name in lists["train_slices"]:
        if bcp.patient_of(name) not in train_patients:
            problems.append(f"{root / 'train_slices.list'}: {name} belongs to no patient of train.list")
    items = [(root / "data" / "slices" / f"{n}.h5", 2) for n in lists["train_slices"]]
    items += [(root / "data" / f"{n}.h5", 3) for split in ("train", "val", "test") for n in lists[split]]
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
        elif label.max(initial=0) >= NUM_CLASSES:
            problems.append(f"{path}: label values must lie in 0..{NUM_CLASSES - 1}, got max {label.max()}")
    for split in ("train", "val", "test"):
        patients = {bcp.patient_of(v) for v in lists[split]}
        slices = len(lists["train_slices"]) if split == "train" else 0
        print(f"{split:5s}: {len(patients):3d} patients, {len(lists[split]):3d} volumes" + (f", {slices} slices" if slices else ""))
    if (root / "SYNTHETIC").exists():
        print("this folder holds SYNTHETIC phantoms, not ACDC")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", help="the official ACDC download (folders patientXXX with Info.cfg and NIfTI files)")
    p.add_argument("--out", default="data/ACDC", help="where to write the layout")
    p.add_argument("--check", metavar="ROOT", help="verify an existing folder instead of writing one")
    p.add_argument("--patients", type=int, default=100, help="synthetic set: number of patients (split 70/10/20)")
    p.add_argument("--seed", type=int, default=1337, help="synthetic set: random seed")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        if args.check:
            problems = check(args.check)
            for problem in problems:
                print(problem)
            print(f"{len(problems)} problem(s) in {args.check}" if problems else f"{args.check}: OK")
            return 1 if problems else 0
        start = time.time()
        if args.raw:
            lists = write_layout(args.out, official_volumes(args.raw), args.force)
        else:
            print(SYNTHETIC_BANNER)
            marker = f"{SYNTHETIC_BANNER}\n--patients {args.patients} --seed {args.seed}\n"
            marker_path = Path(args.out) / "SYNTHETIC"
            if not args.force and marker_path.exists() and marker_path.read_text() == marker and not check(args.out):
                print(f"{args.out} already holds this synthetic set; nothing to do")
                return 0
            lists = write_layout(args.out, synthetic_volumes(args.patients, args.seed), args.force, marker=marker)
        print(f"wrote {args.out}: {len(lists['train'])} train volumes ({len(lists['train_slices'])} slices), "
              f"{len(lists['val'])} val, {len(lists['test'])} test volumes in {time.time() - start:.0f} s")
    except bcp.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
