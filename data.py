"""
The data around BCP: what a --root holds, described once (Dataset), its images and labels, the
training banks with the authors' augmentation, whole-volume inference, scans, checkpoints. bcp.py is the
method and knows nothing of this file; train.py, evaluate.py, prepare_acdc.py and benchmark.py share it.

  1. errors, lists and the one description of a data set (Dataset)
  2. reading and writing arrays: SSL4MIS / UA-MT h5 files, NIfTI scans, your own scans' folders
  3. resampling and intensities
  4. the training banks: ACDC slices (SliceBank) and 3D volumes (VolumeBank) with their augmentation
  5. whole volumes: slice by slice (ACDC), sliding windows (3D), the probabilities back to a scan's grid,
     the post-processing chosen on validation
  6. checkpoints and run files, devices
"""
import gzip
import itertools
import json
import math
import os
import struct
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

import bcp

# -----------------------------------------------------------------------------
# 1. Errors, lists and the one description of a data set

class DataError(Exception):
    """Bad input data; the message names the file and the problem."""


def read_list(root, name):
    path = Path(root) / name
    if not path.is_file():
        raise DataError(f"{path}: missing list file (is --root the ACDC folder? run prepare_acdc.py)")
    names = path.read_text().split()
    if not names:
        raise DataError(f"{path}: the list is empty")
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice:
        raise DataError(f"{path}: {twice} is listed twice")
    return names


def patient_of(name):
    return name.split("_")[0]


def check_splits(root):
    """Refuse a case listed twice, and a case of val.list or test.list (where present) that train.list
    also holds: a case trained on would be scored. Cases are compared by patient (ACDC: a patient's ED
    and ES frames go together). Nothing to compare without a train.list."""
    if not (Path(root) / "train.list").is_file():
        return
    trained = {patient_of(name) for name in read_list(root, "train.list")}
    for held_out in ("val.list", "test.list"):
        path = Path(root) / held_out
        if path.is_file() and path.read_text().split():
            shared = next((name for name in read_list(root, held_out) if patient_of(name) in trained), None)
            if shared:
                raise DataError(f"{path}: {shared} is also a training case ({Path(root) / 'train.list'})")


LA_FOLDER = "2018LA_Seg_Training Set"  # UA-MT's layout: ROOT/<LA_FOLDER>/<case>/mri_norm2.h5, ROOT/train.list, test.list

ACDC_CLASSES = ("RV", "Myo", "LV")


def is_la_layout(root):
    return (Path(root) / LA_FOLDER).is_dir()


def check_layout(root):
    """Refuse a --root that exists but holds neither layout, saying what was looked for (a folder
    that does not exist is named by the first file it should hold)."""
    root = Path(root)
    if not root.is_dir() or is_la_layout(root) or (root / "train.list").is_file() or (root / "data").is_dir():
        return
    hint = f"; its parent is an LA root: --root {root.parent}" if is_la_layout(root.parent) else ""
    raise DataError(f"{root}: neither the ACDC layout (train.list, data/) nor the LA layout ({LA_FOLDER}/, "
                    f"train.list){hint}")


def read_json(path):
    """A JSON file as Python values; DataError naming the file when it is not readable JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"{path}: not readable JSON ({error})") from None


def read_dataset_json(root):
    """ROOT/dataset.json, which prepare_acdc.py --raw writes for your own data: 'num_classes', 'class_names',
    'unlabeled' (the training volumes that have no labels) and, in 3D, 'val_cases', 'plan' (prepare_acdc.plan_3d:
    spacing, crop, crops a step), 'preprocessing' (the spacing and intensities every scan was given) and 'cases'
    (each scan's own grid). {} for ACDC and LA."""
    path = Path(root) / "dataset.json"
    if not path.exists():
        return {}
    own = read_json(path)
    if not isinstance(own, dict) or not isinstance(own.get("num_classes"), int):
        raise DataError(f"{path}: needs an integer 'num_classes'")
    missing = [key for key in ("unlabeled", *(("val_cases", "preprocessing") if "cases" in own else ())) if key not in own]
    if missing:
        raise DataError(f"{path}: no {', '.join(repr(key) for key in missing)} (write it again with prepare_acdc.py --raw)")
    if "cases" in own:
        check_grid(own["preprocessing"], path, "prepare it again with prepare_acdc.py --raw")
    return own


EXACT_GRID = "exact spacing"  # preprocessing["grid"]: the scans were resampled by resample_spacing


def check_grid(preprocessing, path, advice):
    """Refuse scans prepared on the corner-aligned grid of earlier versions (up to commit 3af2b86): their
    predictions would go back to the scans' grids stretched by up to 7 %."""
    if preprocessing.get("grid") != EXACT_GRID:
        raise DataError(f"{path}: its scans were resampled on an earlier, corner-aligned grid, not to exactly "
                        f"the planned spacing; {advice}")


class Dataset:
    """What a --root holds, read once where it is opened; train.py, evaluate.py and prepare_acdc.py ask it.
      layout       "acdc": the SSL4MIS layout (2D slices to train on, volumes to validate and test);
                   "la": UA-MT's (3D volumes in <LA_FOLDER>/<case>/mri_norm2.h5), which your own 3D scans share
      dims         2 or 3: the network (bcp.NETWORKS), the length of a patch, how a whole volume is segmented
                   (slice by slice, or by sliding windows)
      num_classes  background included; class_names the others'
      own          your own data's dataset.json (read_dataset_json: its classes and plan), {} for ACDC and LA.
                   Your own data is validated and scored as nnU-Net does (scoring "nnunet": Gaussian windows, a class absent from both
                   reference and prediction left out), ACDC and LA as the paper ("paper"); your own 3D scans
                   on each scan's own grid (native_grids)
      synthetic    prepare_acdc.py's phantoms (its SYNTHETIC marker), not real scans"""

    def __init__(self, root):
        self.root = Path(root)
        check_layout(self.root)
        self.layout = "la" if is_la_layout(self.root) else "acdc"
        self.dims = 3 if self.layout == "la" else 2
        self.network = bcp.NETWORKS[self.dims]
        self.own = read_dataset_json(self.root)
        known = self.own.get("class_names") or (ACDC_CLASSES if self.layout == "acdc" else ("LA",))
        self.num_classes = self.own.get("num_classes", len(known) + 1)
        self.class_names = tuple(known)
        self.synthetic = (self.root / "SYNTHETIC").exists()
        self.scoring = "nnunet" if self.own else "paper"
        self.native_grids = "cases" in self.own

    def names_of_classes(self, num_classes):
        """The foreground classes' names for a model of num_classes (a --num-classes of its own: numbers)."""
        return self.class_names if len(self.class_names) == num_classes - 1 else tuple(f"class {c}" for c in range(1, num_classes))

    def path(self, name):
        """The h5 file of a volume."""
        return self.root / LA_FOLDER / name / "mri_norm2.h5" if self.layout == "la" else self.root / "data" / f"{name}.h5"

    def labeled_count(self):
        """Your own data: how many labeled training cases there are (None for ACDC and LA)."""
        if not self.own:
            return None
        if self.layout == "acdc":
            return len(labeled_patients(self.root, self.own))
        return len(read_list(self.root, "train.list")) - len(self.own["unlabeled"]) - self.own["val_cases"]

    def cases(self, labeled_count, val_count=None):
        """(labeled, unlabeled, validation) names. ACDC: training slices and the val.list volumes; 3D: volumes
        of train.list, the last val_count held aside for validation (la_cases)."""
        if self.layout == "acdc":
            return (*training_slices(self.root, labeled_count, self.own), read_list(self.root, "val.list"))
        return la_cases(self.root, labeled_count, val_count)

    def split(self, split, flags):
        """The volumes a checkpoint is scored on: <split>.list, or on LA the validation cases its training
        held aside (--split val)."""
        if self.layout == "la" and split == "val":
            return la_cases(self.root, flags["labeled_patients"], flags["val_cases"])[2]
        return read_list(self.root, f"{split}.list")

    def volumes(self, names, scale=1.0, standardize=False, num_classes=None):
        """[(name, image float32, label uint8)] of whole volumes: ACDC (S, H, W); 3D (D1, D2, D3) resampled by
        `scale`, each image z-scored with standardize; labels checked against num_classes (a run's
        --num-classes; the data set's by default)."""
        volumes = [(name, *read_h5(self.path(name), 3, num_classes or self.num_classes)) for name in names]
        if standardize:
            volumes = [(name, zscore(image), label) for name, image, label in volumes]
        return [(name, *rescale(image, label, scale)) for name, image, label in volumes]

    def bank(self, names, device, scale=1.0, standardize=False, foreground=0.0, num_classes=None):
        """The training bank of these slices (ACDC) or volumes (3D), on `device` (num_classes as volumes)."""
        num_classes = num_classes or self.num_classes
        if self.layout == "acdc":
            pairs = [read_h5(self.root / "data" / "slices" / f"{name}.h5", 2, num_classes) for name in names]
            return SliceBank([image for image, _ in pairs], [label for _, label in pairs], device)
        volumes = self.volumes(names, scale, standardize, num_classes)
        return VolumeBank([image for _, image, _ in volumes], [label for _, _, label in volumes], device,
                          foreground, num_classes)

    def native_label(self, name):
        """Your own 3D scans: the label map of a scan on its own grid, which prepare_acdc.py --3d keeps
        beside the resampled one."""
        path = self.path(name)
        try:
            with h5py.File(path, "r") as f:
                return f["label_native"][()]
        except (OSError, KeyError) as error:
            raise DataError(f"{path}: no readable 'label_native' (written by prepare_acdc.py --3d; {error})") from None


def labeled_patients(root, own):
    """The patients of train.list that have labels, in train.list order (the labeling order); own: your own
    data's dataset.json, which lists the unlabeled ones."""
    unlabeled = set(own.get("unlabeled", []))
    return list(dict.fromkeys(patient_of(v) for v in read_list(root, "train.list") if v not in unlabeled))


def training_slices(root, labeled_patients_count, own):
    """Slice names of train_slices.list split into (labeled, unlabeled): the labeled set is every
    slice of the first `labeled_patients_count` labeled patients in train.list order (3 -> 68, 7 -> 136
    on ACDC); every other slice, those of volumes without labels included, is unlabeled."""
    patients = labeled_patients(root, own)
    if not 1 <= labeled_patients_count <= len(patients):
        raise DataError(f"{Path(root) / 'train.list'}: asked for {labeled_patients_count} labeled patients, "
                        f"it holds {len(patients)}")
    chosen = set(patients[:labeled_patients_count])
    slices = read_list(root, "train_slices.list")
    labeled = [s for s in slices if patient_of(s) in chosen]
    if not labeled:
        raise DataError(f"{Path(root) / 'train_slices.list'}: no slices of the labeled patients {sorted(chosen)}")
    return labeled, [s for s in slices if patient_of(s) not in chosen]


def la_cases(root, labeled_count, validation_count):
    """The cases of train.list as (labeled, unlabeled, validation): labeled = the first N, as the authors
    take them; validation = the last K, held aside from training (the authors pick their checkpoint on
    the test split; we never look at it); unlabeled = every case between (none when every other case is
    labeled: the fully supervised row; self-training refuses that)."""
    cases = read_list(root, "train.list")
    if labeled_count + validation_count > len(cases):
        raise DataError(f"{Path(root) / 'train.list'}: {labeled_count} labeled and {validation_count} validation cases "
                        f"are more than its {len(cases)}")
    return cases[:labeled_count], cases[labeled_count:len(cases) - validation_count], cases[len(cases) - validation_count:]


# -----------------------------------------------------------------------------
# 2. Reading and writing arrays: h5 files, NIfTI scans, your own scans' folders

def read_h5(path, ndim, num_classes):
    """-> (image float32, label uint8) from an SSL4MIS h5 file, checked: both numeric arrays of one
    non-empty ndim-D shape, the image finite, the labels whole numbers in 0..num_classes-1."""
    arrays = {}
    try:
        with h5py.File(path, "r") as f:
            for key in ("image", "label"):
                if not isinstance(f.get(key), h5py.Dataset):
                    raise DataError(f"{path}: no '{key}' array (keys: {sorted(f)})")
                arrays[key] = np.asarray(f[key][()])
    except OSError as error:
        raise DataError(f"{path}: cannot read 'image' and 'label' ({error})") from None
    image, label = arrays["image"], arrays["label"]
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise DataError(f"{path}: '{key}' must hold numbers, got dtype {array.dtype}")
    if image.ndim != ndim or image.shape != label.shape:
        raise DataError(f"{path}: expected {ndim}D image and label of one shape, got {image.shape} and {label.shape}")
    if image.size == 0:
        raise DataError(f"{path}: empty image of shape {image.shape}")
    if not np.isfinite(image).all():
        raise DataError(f"{path}: the image holds {np.size(image) - np.isfinite(image).sum()} NaN or infinite values")
    if not np.array_equal(label, np.round(label)):
        raise DataError(f"{path}: labels must be whole numbers, got values like {label[label != np.round(label)].flat[0]}")
    if label.min() < 0 or label.max() >= num_classes:
        raise DataError(f"{path}: label values must lie in 0..{num_classes - 1} (--num-classes {num_classes}), "
                        f"got {label.min():g}..{label.max():g}")
    return image.astype(np.float32), label.astype(np.uint8)


NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}

NIFTI_COMPLEX = {32, 1792, 2048}

DEFLATE_MAX_RATIO = 1032  # gzip's deflate never expands data more than this many times
NIFTI_HEADER = 348  # bytes; a single-file NIfTI-1 (.nii) then has 4 extension bytes, data from byte 352

def read_nifti_header(path):
    """(the header's bytes, byte order) of a NIfTI-1 file, checked to be one. A gzipped file is
    decompressed only as far as it is read."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            raw = f.read(NIFTI_HEADER)
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if len(raw) < NIFTI_HEADER:
        raise DataError(f"{path}: too short for a NIfTI-1 header ({len(raw)} bytes)")
    endian = next((e for e in "<>" if struct.unpack(e + "i", raw[:4])[0] == NIFTI_HEADER), None)
    if endian is None or raw[344:347] not in (b"n+1", b"ni1"):
        raise DataError(f"{path}: not a NIfTI-1 file")
    return raw, endian


def read_nifti(path, with_header=False):
    """A NIfTI-1 file (.nii or .nii.gz) -> numpy array in (slice, row, col) order, as SimpleITK's
    GetArrayFromImage gives it: the reverse of the NIfTI index order (i, j, k), in the file's own data
    type, decompressed straight into the array (no second copy of a large scan). scl_slope/scl_inter
    are applied when set (the result is then float). with_header: also (header bytes, byte order),
    for write_nifti_labels."""
    header = raw, endian = read_nifti_header(path)
    dims = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    slope, inter = struct.unpack(endian + "2f", raw[112:120])
    if datatype in NIFTI_COMPLEX:
        raise DataError(f"{path}: complex-valued images are not supported (NIfTI datatype {datatype})")
    if datatype not in NIFTI_DTYPES:
        raise DataError(f"{path}: unsupported NIfTI datatype code {datatype}")
    if not 1 <= dims[0] <= 7:
        raise DataError(f"{path}: invalid number of dimensions {dims[0]}")
    shape = dims[1:1 + dims[0]]
    dtype = np.dtype(endian + NIFTI_DTYPES[datatype])
    needed = offset + math.prod(shape) * dtype.itemsize
    stored = os.path.getsize(path) * (DEFLATE_MAX_RATIO if str(path).endswith(".gz") else 1)  # at most this many bytes
    if min(shape) < 0 or needed > stored:
        raise DataError(f"{path}: its header declares a {' x '.join(map(str, shape))} {dtype.name} image "
                        f"({needed / 2**30:.3g} GiB), more than the file can hold: a damaged header or a truncated file")
    try:
        data = np.empty(shape[::-1], dtype)  # Fortran order (i, j, k) -> C order (k, j, i)
    except MemoryError:
        raise DataError(f"{path}: a {' x '.join(map(str, shape))} {dtype.name} image ({needed / 2**30:.3g} GiB) "
                        f"does not fit in this machine's memory") from None
    filled = memoryview(data.reshape(-1).view(np.uint8))
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            f.seek(offset)
            while filled.nbytes and (count := f.readinto(filled)):
                filled = filled[count:]
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if filled.nbytes:
        raise DataError(f"{path}: truncated: {shape} {dtype} needs {offset + data.nbytes} bytes, "
                            f"has {offset + data.nbytes - filled.nbytes}")
    while data.ndim > 3 and data.shape[0] == 1:  # a trailing singleton time axis
        data = data[0]
    slope = slope if math.isfinite(slope) and slope != 0 else 1.0  # 0 or NaN: no scaling (nibabel writes NaN)
    inter = inter if math.isfinite(inter) else 0.0
    if (slope, inter) != (1.0, 0.0):
        data = data * np.float32(slope) + np.float32(inter)
    return (data, header) if with_header else data


def write_nifti_labels(path, labels, header):
    """Write a (slice, row, col) uint8 label map as a gzipped NIfTI-1 with the geometry of the scan
    whose (header bytes, byte order) read_nifti returned: its dims, pixdim, qform and sform are kept,
    so the labels overlay the scan in ITK-SNAP, 3D Slicer or nibabel. The scan's data type, scaling and
    extensions are replaced (uint8, none, none). Written to a temporary name, then renamed."""
    raw, endian = header
    fields = bytearray(raw)
    struct.pack_into(endian + "2h", fields, 70, 2, 8)  # datatype uint8, 8 bits per voxel
    struct.pack_into(endian + "3f", fields, 108, NIFTI_HEADER + 4, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    struct.pack_into(endian + "2f", fields, 124, float(labels.max(initial=0)), 0.0)  # cal_max, cal_min
    fields[344:348] = b"n+1\0"  # one file
    payload = bytes(fields) + bytes(4) + np.ascontiguousarray(labels, np.uint8).tobytes()  # C (k, j, i) = NIfTI (i, j, k)
    write_atomic(path, gzip.compress(payload, compresslevel=6))


def nifti_shape(header):
    """The (i, j, k) size of a 3D scan from its header (read_nifti_header)."""
    raw, endian = header
    return list(struct.unpack(endian + "3h", raw[42:48]))


def nifti_geometry(header, path):
    """(voxel spacing along i, j, k in mm, 4 x 4 affine) of a header read_nifti returned: the affine of
    the sform when its code is set, else of the qform, else nibabel's fallback (the pixdim scaling with
    i flipped and the centre voxel at the origin), as nibabel chooses it."""
    raw, endian = header
    pixdim = np.array(struct.unpack(endian + "8f", raw[76:108]), dtype=float)
    qform_code, sform_code = struct.unpack(endian + "2h", raw[252:256])
    spacing = np.abs(pixdim[1:4])
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise DataError(f"{path}: voxel spacing (pixdim) must be positive, got {pixdim[1:4].tolist()}")
    shape = np.array(struct.unpack(endian + "3h", raw[42:48]), dtype=float)
    affine = np.diag([-spacing[0], *spacing[1:], 1.0])
    affine[:3, 3] = -(shape - 1) / 2 * np.diag(affine)[:3]
    if sform_code > 0:
        affine[:3] = np.array(struct.unpack(endian + "12f", raw[280:328]), dtype=float).reshape(3, 4)
    elif qform_code > 0:
        b, c, d, *offset = struct.unpack(endian + "6f", raw[256:280])
        a = math.sqrt(max(0.0, 1 - b * b - c * c - d * d))
        rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                             [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                             [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        affine[:3, :3] = rotation * [spacing[0], spacing[1], qfac * spacing[2]]
        affine[:3, 3] = offset
    return spacing, affine


def scan_stem(path):
    """'heart_007_0000.nii.gz' or '.nii' -> 'heart_007_0000'."""
    return path.name.removesuffix(".gz").removesuffix(".nii")


NNUNET_CHANNEL = "_0000"  # nnU-Net v2 names a case's first channel <case>_0000; the Decathlon names it <case>


def label_name(scan):
    """The file name of a scan's label map, as labelsTr names it: 'heart_007_0000.nii.gz' -> 'heart_007.nii.gz'."""
    return f"{scan_stem(scan).removesuffix(NNUNET_CHANNEL)}.nii.gz"


def case_name(path, suffix=""):
    """'imagesTr/heart_007_0000.nii.gz' -> 'heart-007': no '_', which separates patient and slice here."""
    return scan_stem(path).removesuffix(suffix).replace("_", "-")


def nifti_files(folder):
    """The .nii and .nii.gz files of a folder, sorted, without dotfiles (the '._<case>.nii.gz' that macOS
    leaves beside each file are not scans)."""
    return sorted(p for p in Path(folder).glob("*.nii*") if not p.name.startswith(".") and p.name.endswith((".nii", ".nii.gz")))


def nifti_scans(path):
    """The scans a --predict argument names: one .nii/.nii.gz file, or those in a folder (nifti_files:
    dotfiles skipped, as prepare_acdc.py skips them)."""
    path = Path(path)
    if path.is_dir():
        scans = nifti_files(path)
        if not scans:
            raise DataError(f"{path}: no .nii or .nii.gz files in this folder")
        return scans
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return [path]


# -----------------------------------------------------------------------------
# 3. Resampling and intensities

def zoom_index(size_in, size_out, device="cpu"):
    """Source index of each output position for a nearest-neighbour resize, as scipy.ndimage.zoom
    (order=0) computes it: round(o * (in - 1) / (out - 1)). Works on ints and on tensors of sizes."""
    if torch.is_tensor(size_in):
        device, size_in = size_in.device, size_in.float().unsqueeze(-1)
    position = torch.arange(size_out, dtype=torch.float32, device=device)
    return torch.floor(position * (size_in - 1) / max(size_out - 1, 1) + 0.5).long()


def resize_nearest(x, height, width):
    """Nearest-neighbour resize of the last two dims, (..., H, W) -> (..., height, width)."""
    rows, cols = zoom_index(x.shape[-2], height, x.device), zoom_index(x.shape[-1], width, x.device)
    return x[..., rows[:, None], cols[None, :]]


def scaled_size(shape, scale):
    return [max(1, round(s * scale)) for s in shape]


def resample(volume, size):
    """A (D1, D2, D3) or (C, D1, D2, D3) float tensor resampled trilinearly to `size`, the volumes' outer
    edges aligned (LA's --scale, as the authors' zoom would)."""
    batch = volume[None] if volume.ndim == 4 else volume[None, None]
    resampled = F.interpolate(batch.float(), size=list(size), mode="trilinear", align_corners=False)
    return resampled[0] if volume.ndim == 4 else resampled[0, 0]


def rescale(image, label, scale):
    """A volume (numpy) resampled by `scale` along every axis: the image trilinearly, the label by nearest
    neighbour (as scipy.ndimage.zoom, order 0). scale 1 returns both as they are."""
    if scale == 1:
        return image, label
    size = scaled_size(image.shape, scale)
    return (resample(torch.from_numpy(image), size).numpy(),
            resample_labels(torch.from_numpy(label), size).numpy())


def resample_labels(labels, size):
    """A (D1, D2, D3) label tensor resampled to `size` by nearest neighbour, as scipy.ndimage.zoom
    (order 0): equal sizes return it unchanged."""
    rows, cols, slices = (zoom_index(s, n, labels.device) for s, n in zip(labels.shape, size))
    return labels[rows[:, None, None], cols[None, :, None], slices[None, None, :]]


def grid_positions(length, size, step, device="cpu"):
    """Where each of `size` output voxels, `step` input voxels apart (the output spacing over the input's),
    lies on an input axis of `length` voxels, the two grids' outer edges starting together: (o + 1/2) step
    - 1/2, clamped to the input (nnU-Net's formula, with the spacings' ratio as the step, so the spacing is
    exact and the far edges may differ by part of a voxel)."""
    return ((torch.arange(size, device=device) + 0.5) * step - 0.5).clamp(0, length - 1)


def interpolate_along(volume, axis, position, nearest=False, chunk=16):
    """`volume` sampled along `axis` at fractional indices `position`: linearly, or the nearest voxel (labels).
    Linear goes `chunk` output slices at a time, so its temporaries stay small next to the volume."""
    if nearest:
        return volume.index_select(axis, torch.floor(position + 0.5).long())
    below = position.floor().long()
    fraction = (position - below).view(-1, *[1] * (volume.ndim - 1 - axis))
    above = (below + 1).clamp_max(volume.shape[axis] - 1)
    out = volume.new_empty([len(position) if a == axis else n for a, n in enumerate(volume.shape)])
    for start in range(0, len(position), chunk):
        part = slice(start, start + chunk)
        out.narrow(axis, start, len(below[part])).copy_(volume.index_select(axis, below[part]) * (1 - fraction[part])
                                                        + volume.index_select(axis, above[part]) * fraction[part])
    return out


def resample_spacing(volume, size, steps, nearest=False):
    """The last three axes of `volume` resampled to `size` at `steps` (each axis's output spacing over its
    input spacing: the spacing exactly), one axis at a time, the most shrunken first so the intermediate
    volumes stay small. Your own scans go to the planned spacing and back on this grid."""
    first = volume.ndim - 3
    for axis in sorted(range(3), key=lambda a: size[a] / volume.shape[first + a]):
        position = grid_positions(volume.shape[first + axis], size[axis], steps[axis], volume.device)
        volume = interpolate_along(volume, first + axis, position, nearest)
    return volume


def standardize(image, mean, std):
    """(image - mean) / std in place (float32)."""
    image -= np.float32(mean)
    image /= np.float32(std)
    return image


def zscore(image):
    """A float32 scan z-scored over all its voxels, in place."""
    return standardize(image, image.mean(dtype=np.float64), max(float(image.std(dtype=np.float64)), 1e-8))


def normalize(image, path):
    """Min-max to [0, 1] over the whole volume, as SSL4MIS prepared ACDC; a constant image is refused."""
    low, high = float(image.min()), float(image.max())
    if high <= low:
        raise DataError(f"{path}: the image is constant ({low}); cannot min-max normalise")
    return ((image - low) / (high - low)).astype(np.float32)


MAX_RESAMPLING = 16  # more than this many times the target spacing (or less than 1/16): a wrong header, not a thick slice


def normalize_3d(image, preprocessing):
    """MRI: z-score over the whole scan (as UA-MT's LA arrays), or over its nonzero voxels, the zeros kept
    (nnU-Net's rule for a large empty margin); CT: clipped to the window, then the training foreground's
    mean and standard deviation (nnU-Net's CT scheme). In place, float32."""
    if preprocessing["modality"] != "CT" and preprocessing.get("nonzero_only"):
        inside = image != 0
        image[inside] = zscore(image[inside])
        return image
    if preprocessing["modality"] != "CT":
        return zscore(image)
    np.clip(image, *preprocessing["window"], out=image)
    return standardize(image, preprocessing["mean"], preprocessing["std"])


def resampled_size(shape, spacing, target):
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target)]


def check_spacing(spacing, target, path):
    """Refuse a scan whose spacing is more than MAX_RESAMPLING times the target's (or less than its
    1 / MAX_RESAMPLING) along an axis: that is a wrong header or a wrong --spacing, not a thick slice."""
    ratio = np.asarray(spacing) / np.asarray(target)
    if (ratio > MAX_RESAMPLING).any() or (ratio < 1 / MAX_RESAMPLING).any():
        raise DataError(f"{path}: spacing {np.round(spacing, 4).tolist()} mm is more than {MAX_RESAMPLING} times "
                            f"the target {target} (or less than 1/{MAX_RESAMPLING}) along an axis; give --spacing, "
                            f"or check its header")


def spacing_steps(from_spacing, to_spacing):
    """Each axis's step from a grid of `from_spacing` to one of `to_spacing` (mm), in the first grid's voxels."""
    return [to / start for start, to in zip(from_spacing, to_spacing)]


def scan_grid(shape, spacing, preprocessing):
    """A scan's own grid as segment and resample_argmax take it, from the planned one: (its shape, the steps)."""
    return tuple(shape), spacing_steps(preprocessing["spacing"], spacing)


def preprocess_3d(image, spacing, preprocessing, path):
    """A scan (i, j, k) float32 normalised (in place), then resampled to exactly the target spacing
    (trilinear, resample_spacing) -> float32 array."""
    target = preprocessing["spacing"]
    check_spacing(spacing, target, path)
    size = resampled_size(image.shape, spacing, target)
    return resample_spacing(torch.from_numpy(normalize_3d(image, preprocessing)), size, spacing_steps(spacing, target)).numpy()


# -----------------------------------------------------------------------------
# 4. The training banks, with the authors' augmentation

def to_device(tensor, device):
    """A small host tensor (a step's slice indices, augmentation choices) copied to the training device
    without making the host wait: on CUDA through pinned memory, so the host can queue the next step
    while the GPU still runs this one."""
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class SliceBank:
    """Training slices of different sizes stored flat (ragged) on one device, batched augmentation.

    The authors' augmentation (SSL4MIS RandomGenerator) per slice: with p=0.5 rot90 by k in 0..3 then
    a flip on a random axis; otherwise with p=0.5 a rotation by an integer angle in [-20, 20) degrees
    (nearest, zeros outside); then a nearest resize to the (P, P) patch. Here the whole chain is one
    index map from output pixel to source pixel, so a batch is a single gather."""

    def __init__(self, images, labels, device):
        sizes = torch.tensor([image.shape for image in images])
        self.heights, self.widths = sizes[:, 0].to(device), sizes[:, 1].to(device)
        self.offsets = (sizes.prod(1).cumsum(0) - sizes.prod(1)).to(device)
        self.images = torch.from_numpy(np.concatenate([i.ravel() for i in images])).to(device)
        self.labels = torch.from_numpy(np.concatenate([l.ravel() for l in labels])).to(device)

    def __len__(self):
        return len(self.heights)

    @staticmethod
    def random_augmentation(batch_size, generator):
        """The random choices of the authors' ACDC augmentation, per slice, drawn on the CPU."""
        rot_flip = torch.rand(batch_size, generator=generator) < 0.5
        rotate = ~rot_flip & (torch.rand(batch_size, generator=generator) < 0.5)
        return {"rot_flip": rot_flip, "k": torch.randint(4, (batch_size,), generator=generator),
                "flip_axis": torch.randint(2, (batch_size,), generator=generator),
                "rotate": rotate, "angle": torch.randint(-20, 20, (batch_size,), generator=generator)}

    @staticmethod
    def no_augmentation(batch_size):
        return {key: torch.zeros(batch_size, dtype=torch.bool if key in ("rot_flip", "rotate") else torch.long)
                for key in ("rot_flip", "k", "flip_axis", "rotate", "angle")}

    def batch(self, index, patch, augmentation=None):
        """-> images (B, 1, *patch) float, labels (B, *patch) long for slice indices (B,), augmented with
        the choices of random_augmentation (none if not given)."""
        device = self.images.device
        index = to_device(index, device)
        aug = augmentation or self.no_augmentation(len(index))
        aug = {key: to_device(value, device).view(-1, 1, 1) for key, value in aug.items()}
        h, w = self.heights[index].view(-1, 1, 1), self.widths[index].view(-1, 1, 1)
        k = torch.where(aug["rot_flip"], aug["k"], 0)
        h_out, w_out = torch.where(k % 2 == 1, w, h), torch.where(k % 2 == 1, h, w)  # odd rot90 swaps H, W
        r = zoom_index(h_out.view(-1), patch[0]).view(-1, patch[0], 1)  # rows in the augmented slice
        c = zoom_index(w_out.view(-1), patch[1]).view(-1, 1, patch[1])
        r, c = torch.broadcast_tensors(r, c)  # (B, P, P)
        # undo the flip, then the rot90 (np.rot90 turns counter-clockwise)
        flip_rows = aug["rot_flip"] & (aug["flip_axis"] == 0)
        flip_cols = aug["rot_flip"] & (aug["flip_axis"] == 1)
        r, c = torch.where(flip_rows, h_out - 1 - r, r), torch.where(flip_cols, w_out - 1 - c, c)
        r, c = (torch.where(k == 1, c, torch.where(k == 2, h - 1 - r, torch.where(k == 3, h - 1 - c, r))),
                torch.where(k == 1, w - 1 - r, torch.where(k == 2, w - 1 - c, torch.where(k == 3, r, c))))
        # undo the rotation about the slice centre (scipy.ndimage.rotate, reshape=False, order=0)
        theta = torch.deg2rad(aug["angle"].float())
        cos, sin = torch.cos(theta), torch.sin(theta)
        dr, dc = r - (h - 1) / 2, c - (w - 1) / 2
        source_r, source_c = cos * dr + sin * dc + (h - 1) / 2, -sin * dr + cos * dc + (w - 1) / 2
        # like scipy, a point is outside (zero) when its unrounded source lies off the slice
        inside = ~aug["rotate"] | ((source_r >= 0) & (source_r <= h - 1) & (source_c >= 0) & (source_c <= w - 1))
        r = torch.where(aug["rotate"], torch.floor(source_r + 0.5).long(), r)
        c = torch.where(aug["rotate"], torch.floor(source_c + 0.5).long(), c)
        flat = torch.where(inside, self.offsets[index].view(-1, 1, 1) + r * w + c, 0)
        images = torch.where(inside, self.images[flat], 0.0).unsqueeze(1)
        labels = torch.where(inside, self.labels[flat], 0).long()
        return images, labels


LOCATIONS_PER_CLASS = 10_000  # foreground voxels remembered per class and volume for centred crops (nnU-Net's number)

def class_locations(label, num_classes, seed=1234):
    """[(K, 3) long tensor or None] for classes 1..C-1: up to LOCATIONS_PER_CLASS voxels of each class
    present in a (D1, D2, D3) label array, drawn once with a fixed seed (as nnU-Net keeps them)."""
    rng, locations = np.random.default_rng(seed), []
    for c in range(1, num_classes):
        voxels = np.argwhere(label == c)
        if len(voxels) > LOCATIONS_PER_CLASS:
            voxels = voxels[np.sort(rng.choice(len(voxels), LOCATIONS_PER_CLASS, replace=False))]
        locations.append(torch.from_numpy(voxels) if len(voxels) else None)
    return locations


def rot90_flip_point(point, shape, k, axis):
    """Where voxel `point` of a (D1, D2, D3) volume goes under torch.rot90(volume, k, (0, 1)) then
    .flip(axis), and the new shape."""
    (i, j, l), shape = point, list(shape)
    for _ in range(k % 4):  # one rot90 over (0, 1): new[i, j] = old[j, D2 - 1 - i]
        i, j = shape[1] - 1 - j, i
        shape[0], shape[1] = shape[1], shape[0]
    point = [i, j, l]
    point[axis] = shape[axis] - 1 - point[axis]
    return point, shape


def turned_shape(shape, k):
    """The shape of a (D1, D2, D3) volume after torch.rot90 by k over (0, 1)."""
    return [shape[1], shape[0], shape[2]] if k % 2 else [*shape]


def turned_crop(volume, k, axis, corner, patch):
    """The `patch`-sized box at `corner` of torch.rot90(volume, k, (0, 1)).flip(axis), zero outside the
    volume (the corner may lie in the padding; the box overlaps the volume), without turning the whole
    volume: the box is taken back through the flip and the rotation, cut from the volume, padded, and
    turned alone."""
    shape = turned_shape(volume.shape, k)  # the volume's own shape again once the rotations are undone
    low, high = list(corner), [c + p - 1 for c, p in zip(corner, patch)]  # inclusive
    low[axis], high[axis] = shape[axis] - 1 - high[axis], shape[axis] - 1 - low[axis]
    for _ in range(k % 4):  # undo one rot90 over (0, 1): new[i, j] = old[j, D2 - 1 - i]
        low[:2], high[:2] = [low[1], shape[0] - 1 - high[0]], [high[1], shape[0] - 1 - low[0]]
        shape[0], shape[1] = shape[1], shape[0]
    box = volume[tuple(slice(max(lo, 0), min(hi + 1, n)) for lo, hi, n in zip(low, high, shape))]
    padding = [side for lo, hi, n in zip(reversed(low), reversed(high), reversed(shape)) for side in (max(-lo, 0), max(hi + 1 - n, 0))]
    return torch.rot90(F.pad(box, padding), k, (0, 1)).flip(axis)


def foreground_crops(batch_size, share):
    """Which crops of a batch are centred on the organ: n = max(1, round(share * batch_size)) of them, spread
    evenly over the batch and the last always among them (nnU-Net centres the last n; spread, both
    half-batches a and b get their part). -> (batch_size,) bool."""
    count = max(1, round(share * batch_size))
    centred = torch.zeros(batch_size, dtype=torch.bool)
    centred[[round((j + 1) * batch_size / count) - 1 for j in range(count)]] = True
    return centred


class VolumeBank:
    """Training volumes of different sizes in host memory (on a GPU when they all fit in a quarter of
    its free memory); batches of random crops with the authors' LA augmentation (UA-MT's RandomRotFlip,
    RandomCrop), per volume: rot90 by k in 0..3 over the first two axes, a flip along axis 0 or 1
    (always), then a random crop of the patch, its corner drawn as np.random.randint(0, size - patch).
    A volume no larger than the patch along an axis is first zero-padded by (patch - size) // 2 + 3 on
    each side of that axis. (The authors' rule, once any axis is that small, pads every axis by
    max((patch - size) // 2 + 3, 0), so also an axis up to 4 voxels larger than the patch; real LA
    volumes are all larger than the crop, where the two agree.) Each crop is cut first and turned alone
    (turned_crop): the authors' voxels, without a copy of the whole volume. Only the crops go to `device`.

    foreground (nnU-Net's oversampling, for whole scans where most random crops miss the organ): this
    share of every batch's crops, at least one, is centred on a voxel of a foreground class present in its
    volume (the class drawn uniformly, then the voxel among class_locations) instead of placed uniformly,
    clipped to the volume (foreground_crops). 0 (the authors' LA crops) draws exactly the choices it drew
    before."""

    def __init__(self, images, labels, device, foreground=0.0, num_classes=2):
        device = torch.device(device)
        size = sum(image.nbytes + label.nbytes for image, label in zip(images, labels))
        fits = device.type == "cuda" and size < torch.cuda.mem_get_info(device)[0] / 4
        held = device if fits else torch.device("cpu")
        self.images = [torch.from_numpy(image).to(held) for image in images]
        self.labels = [torch.from_numpy(label).to(held) for label in labels]
        self.device, self.foreground = device, foreground
        self.locations = [class_locations(label, num_classes) for label in labels] if foreground else None

    def __len__(self):
        return len(self.images)

    def random_augmentation(self, batch_size, generator):
        """The random choices per volume, drawn on the CPU; the crop's corner as a fraction of the room.
        With foreground crops, also which are centred (foreground_crops) and where (class, voxel) as
        fractions, drawn after the authors' choices so that those stay as they were."""
        choices = {"k": torch.randint(4, (batch_size,), generator=generator),
                   "flip_axis": torch.randint(2, (batch_size,), generator=generator),
                   "corner": torch.rand(batch_size, 3, generator=generator)}
        if self.foreground:
            choices |= {"centred": foreground_crops(batch_size, self.foreground),
                        "location": torch.rand(batch_size, 2, generator=generator)}
        return choices

    def centre(self, i, pick):
        """A voxel of volume i for a centred crop: class, then voxel, chosen by two fractions in [0, 1);
        None when the volume has no foreground."""
        present = [voxels for voxels in self.locations[i] if voxels is not None]
        if not present:
            return None
        voxels = present[int(pick[0] * len(present))]
        return voxels[int(pick[1] * len(voxels))].tolist()

    def batch(self, index, patch, augmentation):
        """-> images (B, 1, *patch) float, labels (B, *patch) long on the device, for volume indices (B,)."""
        images, labels = [], []
        centred = augmentation.get("centred", torch.zeros(len(index), dtype=torch.bool)).tolist()
        picks = augmentation.get("location", torch.zeros(len(index), 2)).tolist()
        for i, k, axis, corner, centre, pick in zip(index.tolist(), *(augmentation[key].tolist() for key in ("k", "flip_axis", "corner")),
                                                     centred, picks):
            turned = turned_shape(self.images[i].shape, k)
            shortfall = [(p - s) // 2 + 3 if s <= p else 0 for s, p in zip(turned, patch)]
            padded = [s + 2 * short for s, short in zip(turned, shortfall)]
            voxel = self.centre(i, pick) if centre else None
            if voxel is None:
                start = [int(f * (s - p)) for f, s, p in zip(corner, padded, patch)]
            else:  # the voxel moved with the rotation, flip and padding; the crop around it stays inside
                voxel, _ = rot90_flip_point(voxel, self.images[i].shape, k, axis)
                start = [min(max(v + short - p // 2, 0), s - p) for v, short, p, s in zip(voxel, shortfall, patch, padded)]
            corner_in_turned = [b - short for b, short in zip(start, shortfall)]
            images.append(turned_crop(self.images[i], k, axis, corner_in_turned, patch))
            labels.append(turned_crop(self.labels[i], k, axis, corner_in_turned, patch))
        return torch.stack(images).unsqueeze(1).to(self.device), torch.stack(labels).long().to(self.device)


# -----------------------------------------------------------------------------
# 5. Whole volumes: slice by slice (ACDC), sliding windows (3D), post-processing

@torch.no_grad()
def segment_slices(model, image, patch):
    """ACDC: a volume slice by slice, as the authors: (S, H, W) float tensor -> (S, H, W) long labels.
    Each slice is resized to the (P, P) patch (nearest), segmented, and the argmax resized back."""
    slices = resize_nearest(image, *patch).unsqueeze(1)  # (S, 1, P, P)
    return resize_nearest(model(slices).argmax(1), *image.shape[-2:])


def window_starts(size, window, stride):
    """Corners of sliding windows along one axis, as UA-MT's test_single_case: every `stride`, the last
    flush with the end (ceil((size - window) / stride) + 1 windows). A stride larger than the window
    would leave voxels between windows uncovered: ValueError."""
    if stride < 1 or stride > window < size:
        raise ValueError(f"a sliding-window stride must lie in 1 .. the window ({window}), got {stride}")
    return [min(stride * i, size - window) for i in range(math.ceil((size - window) / stride) + 1)]


AUTHORS_STRIDE = (18, 4)  # UA-MT's and BCP's LA test strides (XY, Z) for a 112 x 112 x 80 window


def window_strides(stride):
    """--stride XY Z -> the strides along the three axes (XY, XY, Z)."""
    return (stride[0], stride[0], stride[1])


def default_stride(window):
    """The authors' strides, each at most the window's side: (XY, Z) for a (D1, D2, D3) window."""
    return [min(AUTHORS_STRIDE[0], *window[:2]), min(AUTHORS_STRIDE[1], window[2])]


def check_stride(stride, window):
    """--stride XY Z must not exceed the window along its axes, or voxels between windows would be left
    out: ValueError saying so."""
    if stride[0] > min(window[:2]) or stride[1] > window[2]:
        raise ValueError(f"--stride {' '.join(map(str, stride))}: larger than the window {list(window)}; "
                         f"voxels between windows would be left out")


def gaussian_importance(window, device="cpu"):
    """nnU-Net's window weights: a Gaussian centred on the window, sigma 1/8 of its size along each
    axis, scaled to a maximum of 1, its zeros raised to the smallest positive weight."""
    axes = [torch.exp(-0.5 * ((torch.arange(w, device=device) - (w - 1) / 2) / (w / 8)) ** 2) for w in window]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    return weights.clamp_min(weights[weights > 0].min())


@torch.no_grad()
def sliding_window_probabilities(model, image, window, strides, batch_size=4, weights=None):
    """LA: (D1, D2, D3) float tensor -> (C, D1, D2, D3) softmax probabilities averaged over the windows
    covering each voxel (the authors: a plain mean; weights (*window): a weighted one, as nnU-Net's
    Gaussian). A volume smaller than the window along an axis is zero-padded evenly and the result
    cropped back."""
    shortfall = [max(w - s, 0) for s, w in zip(image.shape, window)]
    padded = F.pad(image, [p for short in reversed(shortfall) for p in (short // 2, short - short // 2)])
    corners = list(itertools.product(*(window_starts(s, w, stride) for s, w, stride in zip(padded.shape, window, strides))))
    boxes = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in corners]
    weights = torch.ones(window, device=image.device) if weights is None else weights
    scores, counts = None, torch.zeros(padded.shape, device=image.device)
    for start in range(0, len(boxes), batch_size):
        group = boxes[start:start + batch_size]
        probs = model(torch.stack([padded[box] for box in group]).unsqueeze(1)).float().softmax(1)
        if scores is None:
            scores = torch.zeros(probs.shape[1], *padded.shape, device=image.device)
        for box, p in zip(group, probs):
            scores[(slice(None), *box)] += p * weights
            counts[box] += weights
    scores /= counts
    return scores[(slice(None), *(slice(short // 2, short // 2 + s) for short, s in zip(shortfall, image.shape)))]


def resample_argmax(probabilities, size, steps, slab=8):
    """(C, D1, D2, D3) probabilities -> (size) uint8 labels: resampled trilinearly to `size` at `steps`
    (resample_spacing's grid), then the argmax, `slab` output slices along the last axis at a time, so the
    probabilities are never held at full size. A thin structure survives that nearest-neighbour labels
    would cut."""
    depth = grid_positions(probabilities.shape[-1], size[2], steps[2], probabilities.device)
    rows, cols = (grid_positions(probabilities.shape[a], size[a - 1], steps[a - 1], probabilities.device) for a in (1, 2))
    labels = torch.empty(size, dtype=torch.uint8, device=probabilities.device)
    for start in range(0, size[2], slab):
        along_depth = interpolate_along(probabilities, 3, depth[start:start + slab])  # (C, D1, D2, s)
        in_plane = interpolate_along(interpolate_along(along_depth, 1, rows), 2, cols)
        labels[..., start:start + slab] = in_plane.argmax(0)
    return labels


def segment(model, image, patch, stride=None, scale=1.0, gaussian=False, keep_largest=None, native=None):
    """A whole volume's labels, by the length of the training patch. 2D: slice by slice (segment_slices).
    3D: sliding windows, every --stride XY Z with the probabilities averaged (the authors' LA test), or with
    gaussian nnU-Net's, every half window weighted by gaussian_importance; a model trained at --scale
    segments the volume resampled alike and its probabilities come back. Then the argmax (two classes:
    foreground where p1 > 0.5), on the volume's grid or on `native`, (size, steps) of your own scan's own
    grid (resample_argmax; scan_grid gives them), and the largest connected component of each class in keep_largest (None:
    every class, the authors' LA protocol; your own scans: those that validation chose). The model must
    be in eval mode."""
    if len(patch) == 2:
        return segment_slices(model, image, patch)
    strides, weights = (([w // 2 for w in patch], gaussian_importance(patch, image.device)) if gaussian
                        else (window_strides(stride or default_stride(patch)), None))
    resampled = resample(image, scaled_size(image.shape, scale)) if scale != 1 else image
    probabilities = sliding_window_probabilities(model, resampled, patch, strides, weights=weights)
    if scale != 1:
        probabilities = resample(probabilities, image.shape)
    labels = probabilities.argmax(0) if native is None else resample_argmax(probabilities, *native)
    classes = range(1, len(probabilities)) if keep_largest is None else keep_largest
    return bcp.keep_largest_components(labels[None], classes)[0]


def choose_post_processing(as_predicted, largest_only):
    """nnU-Net's post-processing rule: keep only the largest connected component of a class where that
    raises the class's mean Dice over the validation cases. Both: the mean Dice of each foreground class,
    as predicted and with only its largest component. -> the classes (1 .. C-1) it helps, and each class's
    mean Dice with the rule applied (the larger of the two), the score evaluation will report."""
    keep_largest = [c for c, (before, after) in enumerate(zip(as_predicted, largest_only), start=1) if after > before]
    return keep_largest, [after if c in keep_largest else before for c, (before, after) in enumerate(zip(as_predicted, largest_only), start=1)]


# -----------------------------------------------------------------------------
# 6. Checkpoints and run files, devices

def write_atomic(path, data):
    """Write bytes (or a callable that writes to a binary file) to `path` through a temporary file in
    the same folder, flushed to disk, then renamed over `path`: readers see the old or the new file,
    never a half-written one. The temporary file is removed if anything fails."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load_checkpoint(path, required=("model", "flags")):
    """A checkpoint dict written by train.py, loaded on the CPU with weights_only; it must hold the
    `required` keys."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint") from None
    except Exception as error:  # torch's message for what weights_only refuses runs over several lines
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise DataError(f"{path}: not a readable checkpoint ({type(error).__name__}: {first_line[:200]})") from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise DataError(f"{path}: not a train.py checkpoint (no {', '.join(repr(k) for k in missing)})")
    return checkpoint


def load_weights(model, weights, path):
    """model.load_state_dict(weights), with one clear line naming the file when they do not fit."""
    try:
        model.load_state_dict(weights)  # copies fp16 weights into the float32 parameters
    except (RuntimeError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: the weights do not fit this {type(model).__name__} "
                        f"({' '.join(str(error).split())[:300]})") from None


def load_model(path, device="cpu", weights="model"):
    """(U-Net or V-Net, by the length of the run's patch, with the weights of a train.py checkpoint or its
    fp16 export, on `device`; the checkpoint). weights "teacher": a self-training checkpoint's EMA teacher
    instead of its student ("model")."""
    checkpoint = load_checkpoint(path, required=(weights, "flags"))
    flags = checkpoint["flags"] if isinstance(checkpoint["flags"], dict) else {}
    num_classes, patch = flags.get("num_classes"), flags.get("patch_size")
    if not isinstance(num_classes, int):
        raise DataError(f"{path}: its flags do not say num_classes")
    if not (isinstance(patch, (list, tuple)) and len(patch) in bcp.NETWORKS):
        raise DataError(f"{path}: its flags do not give patch_size as 2 or 3 sizes (got {patch!r})")
    if checkpoint[weights] is None:
        raise DataError(f"{path}: holds no {weights} (a pre-training or supervised checkpoint has no teacher)")
    model = bcp.NETWORKS[len(patch)](num_classes=num_classes).to(device)
    load_weights(model, checkpoint[weights], path)
    return model, checkpoint


def checked_device(name):
    """torch.device(name); ValueError naming the problem for an unknown device or CUDA without a GPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def read_metrics(path):
    """The rows of a metrics.jsonl and how many lines did not parse (a write cut short by a kill)."""
    rows, torn = [], 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("iter"), int):
            rows.append(row)
        elif line.strip():
            torn += 1
    return rows, torn


