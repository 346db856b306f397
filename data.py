"""
The data around BCP: what a --root holds and how it is trained, segmented and scored, decided once (its
Plan, in its Dataset), its images and labels, the training banks with the authors' augmentation, scans.
bcp.py is the method and inference.py the whole-volume inference; data.py imports neither, and train.py,
evaluate.py, prepare_acdc.py and benchmark.py share it.

  1. errors, lists, the plans (Plan: ACDC's, LA's, your own data's) and the one description of a data set
  2. reading and writing arrays: SSL4MIS / UA-MT h5 files, NIfTI scans, your own scans' folders
  3. resampling and intensities
  4. the training banks: ACDC slices (SliceBank) and volumes (VolumeBank: 3D crops, or 2D crops of a slice) with
     their augmentation
  5. run files
"""
import gzip
import json
import math
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# 1. Errors, lists, the plans and the one description of a data set

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


def volume_path(root, layout, name):
    """The h5 file of a whole volume in a layout ("acdc" or "la")."""
    return Path(root) / LA_FOLDER / name / "mri_norm2.h5" if layout == "la" else Path(root) / "data" / f"{name}.h5"


def slice_path(root, name):
    """The h5 file of an ACDC-layout training slice."""
    return Path(root) / "data" / "slices" / f"{name}.h5"


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


def read_dataset_json(root, layout):
    """ROOT/dataset.json, which prepare_acdc.py --raw writes for your own data (in UA-MT's layout, 2D or 3D):
    'num_classes', 'class_names', 'unlabeled' (the training volumes that have no labels), 'val_cases', 'plan'
    (prepare_acdc.plan_grid: 2D or 3D, spacing, crop, crops a step), 'preprocessing' (the spacing and intensities
    every scan was given) and 'cases' (each scan's own grid). {} for ACDC and LA."""
    path = Path(root) / "dataset.json"
    if not path.exists():
        return {}
    own = read_json(path)
    if not isinstance(own, dict) or not isinstance(own.get("num_classes"), int):
        raise DataError(f"{path}: needs an integer 'num_classes'")
    if layout != "la":
        raise DataError(f"{path}: your own scans as stretched 2D slices, as versions before the 2D plan wrote them; "
                        f"write them again with prepare_acdc.py --raw")
    missing = [key for key in ("unlabeled", "val_cases", "preprocessing", "cases") if key not in own]
    if missing:
        raise DataError(f"{path}: no {', '.join(repr(key) for key in missing)} (write it again with prepare_acdc.py --raw)")
    check_grid(own["preprocessing"], path, "prepare it again with prepare_acdc.py --raw")
    return own


EXACT_GRID = "exact spacing"  # preprocessing["grid"]: the scans were resampled by resample_spacing


def check_grid(preprocessing, path, advice):
    """Refuse scans prepared on the corner-aligned grid of earlier versions (up to commit 3af2b86): their
    predictions would go back to the scans' grids stretched by up to 7 %."""
    if preprocessing.get("grid") != EXACT_GRID:
        raise DataError(f"{path}: its scans were resampled on an earlier, corner-aligned grid, not to exactly "
                        f"the planned spacing; {advice}")


@dataclass(frozen=True)
class Plan:
    """How a data set is trained, segmented and scored, made once where the data is opened (Dataset.plan)
    and kept in every checkpoint, as nnU-Net's plans are: train.py, evaluate.py and benchmark.py read it
    and never work it out again. ACDC's and LA's are the paper's protocols as the authors run them
    (ACDC_PLAN, LA_PLAN); your own data's comes from its fingerprint, which prepare_acdc.py --raw wrote to
    its dataset.json (own_plan).
      name             "acdc", "la", "own2d" or "own3d": the log's, the run folder's and the paper's rows' name
      dims             2: slices and a U-Net; 3: volumes, crops and a V-Net (bcp.NETWORKS); a patch's length
      settings         train.py's flags under the paper's schedule, a dict by phase where phases differ: the
                       patch, images a step, each phase's steps and lr policy, the Dice form and pre-training
                       loss, the intensities (scale, standardize), the validation cases, the share of
                       self-training steps a --budget plans (step_ratio)
      cpu_settings     what --schedule cpu replaces, by name: in fp32, and in bf16 (its "precision") where the CPU
                       computes bf16; cpu_seconds: their seconds a step, validations included, on a 2-core CPU
      windows          how a whole volume is segmented: "slices" (each slice resized to the patch: the authors'
                       ACDC test), "authors" (windows every --stride, a plain mean: UA-MT's LA test) or
                       "gaussian" (every half window, Gaussian weights: nnU-Net's)
      post_processing  "none"; "largest": every class's largest component (the authors' LA test); "chosen":
                       per class where it raises the validation Dice, kept with best.pt (nnU-Net's rule)
      scoring          "paper": a class missing from the prediction scores 0; "nnunet": a class absent from
                       both prediction and reference is left out (bcp.dice_per_class)
      grid             "stored": scored on the h5 arrays; "native": on each scan's own grid, in mm
      preprocessing    how --predict brings a NIfTI scan to the network: {"rule": "minmax"} (SSL4MIS's ACDC),
                       {"rule": "zscore"} (UA-MT's LA), or {"rule": "prepared"} with prepare_acdc.py's preprocessing
                       of your own scans (spacing, modality, normalisation)
      limits           your own data: the most labeled and validation cases it holds
      smallest_volume  your own scans: the smallest resampled training volume, which cuts the crop
      slices_last      whether volumes are arrays in NIfTI index order (i, j, k), 2D slices along k (LA's, your
                       own scans'), not (S, H, W) (SSL4MIS's ACDC)
      unused_flags     flags that change nothing on this data, refused (ACDC's slices have no crops to centre)"""
    name: str
    dims: int
    settings: dict
    cpu_settings: dict
    cpu_seconds: dict
    windows: str
    post_processing: str
    scoring: str
    grid: str
    preprocessing: dict
    limits: dict = field(default_factory=dict)
    smallest_volume: list = None
    slices_last: bool = True
    unused_flags: tuple = ()

    def schedule(self, name, bf16):
        """(What --schedule `name` replaces, its key in cpu_settings and flags.json): nothing for "paper"; for
        "cpu" this plan's CPU schedule in bf16 where `bf16` asks and the plan has one, else its fp32 one."""
        if name == "paper":
            return {}, None
        precisions = {settings.get("precision", "fp32"): key for key, settings in self.cpu_settings.items()}
        key = precisions["bf16" if bf16 and "bf16" in precisions else "fp32"]
        return self.cpu_settings[key], key

    def resolve(self, base, phase, schedule, given):
        """A run's settings in one order: `base` (train.py's METHOD) | the plan's | the schedule's (what
        --schedule cpu replaces) | the flags `given` (those not None); a value by phase becomes this phase's.
        The patch as a tuple of dims sizes (cut to your own scans' smallest volume). -> (settings, the
        keys the schedule set)."""
        defaults = base | self.settings | schedule
        settings = {key: value[phase] if isinstance(value, dict) else value for key, value in defaults.items()}
        settings |= {key: given[key] for key in defaults if given.get(key) is not None}
        settings["patch_size"] = self.patch(settings["patch_size"])
        set_by_schedule = sorted(key for key in schedule if given.get(key) is None)
        return settings, set_by_schedule

    def selftrain_cost(self, schedule_key):
        """A self-training step's seconds over a pre-training step's, as the plan's CPU schedules measured them
        (a --budget's estimate until self-training measures its own)."""
        seconds = self.cpu_seconds[schedule_key or next(iter(self.cpu_seconds))]
        return seconds["selftrain"] / seconds["pretrain"]

    def patch(self, sizes):
        """1 or dims sizes -> a tuple of dims sizes (its length is the dimension), each at most your own
        scans' largest crop (said in one line); ValueError for another count."""
        if len(sizes) not in (1, self.dims):
            raise ValueError(f"--patch-size takes 1 or {self.dims} numbers for {self.dims}D data, got {len(sizes)}")
        patch = tuple(sizes) * (self.dims // len(sizes))
        fitted = patch if self.smallest_volume is None else tuple(fitted_patch(patch, self.smallest_volume))
        if fitted != patch:
            print(f"the crop {' x '.join(map(str, patch))} is larger than the smallest resampled case of train.list "
                  f"allows: crops of {' x '.join(map(str, fitted))}")
        return fitted

    def refuse(self, given, root):
        """A line naming the first flag given that asks for more than your own data at `root` holds; None if none."""
        for key in self.unused_flags:
            if given.get(key) is not None:
                return f"--{key.replace('_', '-')} {UNUSED[key]}; {root} holds 2D slices ({self.name})"
        for key, most in self.limits.items():
            if (given.get(key) or 0) > most:
                return f"--{key.replace('_', '-')} {given[key]}: {root} {LIMITS[key].format(most)}"
        if given.get("standardize") and self.preprocessing["rule"] == "prepared":
            return f"--standardize: prepare_acdc.py already normalised the intensities of {root}"
        return None

    def classes_kept(self, num_classes, chosen=None):
        """The classes whose largest connected component a prediction keeps: `chosen` on validation (None
        before a choice: none) or, as the plan says, none or every foreground class."""
        if self.post_processing == "chosen":
            return list(chosen or [])
        return list(range(1, num_classes)) if self.post_processing == "largest" else []


# The authors' ACDC script: slices resized whole to 256 x 256, batch 24 = 12 labeled + 12 unlabeled, 10,000 +
# 30,000 steps at a constant lr, the ACDC Dice, the two region terms in pre-training, SGD's momentum carried.
# --schedule cpu: both phases fill an hour on the machine they run on, validations included (--budget; the steps
# planned from its speed, the paper's share of 1 : 3, the lr decayed over them), with the patch and batch chosen on
# the validation split (docs/results.md, "An hour on a CPU"); in bf16 where the CPU computes bf16 natively
# (train.cpu_bf16), where a step costs 0.63-0.78 of an fp32 one. The iterations are the steps measured to fit an
# hour on a 2-core AMD EPYC, trained where the budget is off (torchrun; --iterations gives its own).
ACDC_CPU = {"patch_size": [160], "batch_size": 12, "labeled_batch_size": 6, "lr_decay": "poly",
            "iterations": {"pretrain": 6000, "selftrain": 4000}, "val_every": 500, "budget": 60}
ACDC_PLAN = Plan(
    name="acdc", dims=2,
    settings={"labeled_patients": 7, "batch_size": 24, "labeled_batch_size": 12, "patch_size": [256], "num_classes": 4,
              "iterations": {"supervised": 10000, "pretrain": 10000, "selftrain": 30000}, "lr_step": 0,
              "dice_loss": "acdc", "pretrain_loss": "regions", "selftrain_sgd": "pretrain", "step_ratio": 3},
    cpu_settings={"acdc": ACDC_CPU, "acdc_bf16": ACDC_CPU | {"precision": "bf16", "iterations": {"pretrain": 2500, "selftrain": 7500}}},
    cpu_seconds={"acdc": {"pretrain": 0.18, "selftrain": 0.48}, "acdc_bf16": {"pretrain": 0.14, "selftrain": 0.36}},
    windows="slices", post_processing="none", scoring="paper", grid="stored", preprocessing={"rule": "minmax"},
    slices_last=False, unused_flags=("val_cases", "stride", "scale", "foreground_crops", "standardize"))

# The authors' LA script: random 112 x 112 x 80 crops, 4 labeled (+ 4 unlabeled in self-training), 2,000 + 15,000
# steps, the lr divided by 10 every 2,500 self-training steps, the LA Dice over the whole crop in pre-training, SGD
# fresh in self-training, sliding windows every 18, 18, 4 and the largest component; 8 cases held aside to validate.
# --schedule cpu: volumes at half scale, 64 x 64 x 32 crops, each volume z-scored as loaded; an hour at the share
# of steps measured best, try 4's 800 : 3,400 (docs/results.md, "An hour on a CPU").
LA_CPU = {"patch_size": [64, 64, 32], "scale": 0.5, "batch_size": 8, "labeled_batch_size": 4, "lr_decay": "poly",
          "lr_step": 0, "iterations": {"pretrain": 800, "selftrain": 2000}, "val_every": 200, "standardize": True,
          "budget": 60, "step_ratio": 4.25}
LA_PLAN = Plan(
    name="la", dims=3,
    settings={"labeled_patients": 8, "batch_size": {"supervised": 4, "pretrain": 4, "selftrain": 8}, "labeled_batch_size": 4,
              "patch_size": [112, 112, 80], "num_classes": 2,
              "iterations": {"supervised": 6000, "pretrain": 2000, "selftrain": 15000},
              "lr_step": {"supervised": 2500, "pretrain": 0, "selftrain": 2500}, "dice_loss": "la", "pretrain_loss": "whole",
              "selftrain_sgd": "fresh", "val_cases": 8, "scale": 1.0, "foreground_crops": 0.0, "standardize": False,
              "step_ratio": 7.5},
    cpu_settings={"la": LA_CPU, "la_bf16": LA_CPU | {"precision": "bf16", "iterations": {"pretrain": 800, "selftrain": 3400}}},
    cpu_seconds={"la": {"pretrain": 0.51, "selftrain": 1.28}, "la_bf16": {"pretrain": 0.35, "selftrain": 0.81}},
    windows="authors", post_processing="largest", scoring="paper", grid="stored", preprocessing={"rule": "zscore"})

LIMITS = {"labeled_patients": "has {} labeled training cases",  # what Plan.refuse says of each limit
          "val_cases": "holds {} labeled validation cases (prepare_acdc.py --val-fraction sets them)"}
UNUSED = {"stride": "applies to 3D volumes only", "scale": "applies to 3D volumes only",  # what it says of a flag unused
          "standardize": "applies to 3D volumes only", "val_cases": "applies to cases held aside from train.list only",
          "foreground_crops": "applies to crops of whole volumes only"}
OWN_FOREGROUND_CROPS = 1 / 3  # your own scans: the share of labeled crops centred on a class (nnU-Net's)
OWN_3D_CPU = {"lr_decay": "poly", "lr_step": 0, "iterations": {"pretrain": 600, "selftrain": 900}, "val_every": 100}
OWN_SCORING = {"windows": "gaussian", "post_processing": "chosen", "scoring": "nnunet", "grid": "native"}  # nnU-Net's


def own_2d_plan(preprocessing, settings=None, limits=None, smallest_slice=None):
    """Your own 2D scans (thick slices): ACDC's network, losses and share of steps on the crop and slices a step
    prepare_acdc.py planned at its in-plane spacing (no slice stretched), a third of the labeled crops centred on
    a class, scored as nnU-Net scores (every half window, the post-processing chosen on validation, each scan's
    own grid). --schedule cpu: ACDC's hour (--budget 60, its lr and validations)."""
    planned = ("patch_size", "batch_size", "labeled_batch_size")  # the plan's, not ACDC's
    cpu = {key.replace("acdc", "own2d"): {k: v for k, v in schedule.items() if k not in planned}
           for key, schedule in ACDC_PLAN.cpu_settings.items()}
    seconds = {key.replace("acdc", "own2d"): value for key, value in ACDC_PLAN.cpu_seconds.items()}
    return replace(ACDC_PLAN, name="own2d", settings=ACDC_PLAN.settings | (settings or {}), cpu_settings=cpu,
                   cpu_seconds=seconds, **OWN_SCORING,
                   preprocessing={"rule": "prepared"} | preprocessing, limits=limits or {}, smallest_volume=smallest_slice,
                   slices_last=True, unused_flags=("stride", "scale", "standardize"))


def own_3d_plan(preprocessing, settings=None, limits=None, smallest_volume=None):
    """Your own 3D scans: LA's network and losses on the crop and crops a step prepare_acdc.py planned, a third
    of the labeled crops centred on a class, scored as nnU-Net scores (its windows, the post-processing
    chosen on validation, each scan's own grid) and --predict normalising and resampling as `preprocessing`
    says. --schedule cpu: at most 25 minutes on a 2-core CPU (docs/own_scans.md)."""
    return replace(LA_PLAN, name="own3d", settings=LA_PLAN.settings | (settings or {}), cpu_settings={"own3d": OWN_3D_CPU},
                   cpu_seconds={"own3d": {"pretrain": 0.48, "selftrain": 1.27}}, **OWN_SCORING,
                   preprocessing={"rule": "prepared"} | preprocessing, limits=limits or {}, smallest_volume=smallest_volume)


def own_plan(dataset):
    """Your own data's plan from its dataset.json (prepare_acdc.py --raw): its classes, every labeled case
    labeled, the cases held aside for validation, the crop and crops a step prepare_acdc.py planned (cut to the
    smallest resampled training volume), in 2D (own_2d_plan) or 3D (own_3d_plan) as it chose."""
    own, labeled = dataset.own, dataset.labeled_count()
    planned = own.get("plan", {})  # older 3D sets have none: LA's crop and crops a step
    settings = {"num_classes": own["num_classes"], "labeled_patients": labeled, "val_cases": own["val_cases"],
                "foreground_crops": OWN_FOREGROUND_CROPS}
    settings |= {key: planned[key] for key in ("patch_size", "labeled_batch_size") if key in planned}
    limits = {"labeled_patients": labeled, "val_cases": own["val_cases"]}
    names = read_list(dataset.root, "train.list")
    missing = next((name for name in names if "resampled_shape" not in own["cases"].get(name, {})), None)
    if missing:
        raise DataError(f"{dataset.root / 'dataset.json'}: no resampled shape of {missing} in 'cases' (write it again "
                        f"with prepare_acdc.py --raw)")
    smallest = np.min([own["cases"][name]["resampled_shape"] for name in names], axis=0).tolist()
    if planned.get("dims", 3) == 2:
        return own_2d_plan(own["preprocessing"], settings | {"batch_size": planned["batch_size"]}, limits, smallest[:2])
    if "batch_size" in planned:
        settings["batch_size"] = {"supervised": planned["labeled_batch_size"], "pretrain": planned["labeled_batch_size"],
                                  "selftrain": planned["batch_size"]}
    return own_3d_plan(own["preprocessing"], settings, limits, smallest)


def largest_crop(shape):
    """The largest crop a volume of `shape` holds, each side a multiple of 16 (the networks halve it four
    times), at least 16 (a smaller volume is padded)."""
    return [int(max(16, s // 16 * 16)) for s in shape]


def fitted_patch(patch, shape):
    """A crop cut to a volume's shape (largest_crop)."""
    return [min(int(p), largest) for p, largest in zip(patch, largest_crop(shape))]


class Dataset:
    """What a --root holds, read once where it is opened; train.py, evaluate.py, prepare_acdc.py and benchmark.py ask it.
      layout       where the files are: "acdc", the SSL4MIS layout (2D slices to train on, volumes to validate
                   and test); "la", UA-MT's (3D volumes in <LA_FOLDER>/<case>/mri_norm2.h5), which your own
                   scans share, 2D or 3D
      own          your own data's dataset.json (read_dataset_json), {} for ACDC and LA
      plan         how it is trained, segmented and scored (Plan): ACDC_PLAN, LA_PLAN or own_plan's
      num_classes  background included; class_names the others'
      synthetic    prepare_acdc.py's phantoms (its SYNTHETIC marker), not real scans
      unlabeled_truth  whether the unlabeled images have labels (ACDC's and LA's do; they never enter the loss,
                   only the pseudo-labels' diagnostics)"""

    def __init__(self, root):
        self.root = Path(root)
        check_layout(self.root)
        self.layout = "la" if is_la_layout(self.root) else "acdc"
        self.own = read_dataset_json(self.root, self.layout)
        known = self.own.get("class_names") or (ACDC_CLASSES if self.layout == "acdc" else ("LA",))
        self.num_classes = self.own.get("num_classes", len(known) + 1)
        self.class_names = tuple(known)
        self.synthetic = (self.root / "SYNTHETIC").exists()
        self.unlabeled_truth = not self.own.get("unlabeled")
        self.plan = own_plan(self) if self.own else ACDC_PLAN if self.layout == "acdc" else LA_PLAN

    def names_of_classes(self, num_classes):
        """The foreground classes' names for a model of num_classes (a --num-classes of its own: numbers)."""
        return self.class_names if len(self.class_names) == num_classes - 1 else tuple(f"class {c}" for c in range(1, num_classes))

    def path(self, name):
        """The h5 file of a volume."""
        return volume_path(self.root, self.layout, name)

    def labeled_count(self):
        """Your own data: how many labeled training cases there are."""
        return len(read_list(self.root, "train.list")) - len(self.own["unlabeled"]) - self.own["val_cases"]

    def cases(self, labeled_count, val_count=None):
        """(labeled, unlabeled, validation) names. ACDC: training slices and the val.list volumes; volumes of
        train.list (LA, your own scans), the last val_count held aside for validation (la_cases)."""
        if self.layout == "acdc":
            return (*training_slices(self.root, labeled_count), read_list(self.root, "val.list"))
        return la_cases(self.root, labeled_count, val_count)

    def split(self, split, flags):
        """The volumes a checkpoint is scored on: <split>.list, or on LA the validation cases its training
        held aside (--split val)."""
        if self.layout == "la" and split == "val":
            return la_cases(self.root, flags["labeled_patients"], flags["val_cases"])[2]
        return read_list(self.root, f"{split}.list")

    def volumes(self, names, scale=1.0, standardize=False, num_classes=None):
        """[(name, image float32, label uint8)] of whole volumes: ACDC (S, H, W); the others (i, j, k) resampled by
        `scale`, each image z-scored with standardize; labels checked against num_classes (a run's
        --num-classes; the data set's by default)."""
        volumes = [(name, *read_h5(self.path(name), 3, num_classes or self.num_classes)) for name in names]
        if standardize:
            volumes = [(name, zscore(image), label) for name, image, label in volumes]
        return [(name, *rescale(image, label, scale)) for name, image, label in volumes]

    def bank(self, names, device, flags=None, foreground=None):
        """The training bank of these slices (ACDC layout) or volumes (UA-MT's) on `device`, as a run with `flags`
        takes them (its classes; volumes at its scale, z-scored with its standardize); `foreground`, the share
        of crops centred on a class (VolumeBank)."""
        flags = {"num_classes": self.num_classes} | {key: value for key, value in (flags or {}).items() if value is not None}
        if self.layout == "acdc":
            pairs = [read_h5(slice_path(self.root, name), 2, flags["num_classes"]) for name in names]
            return SliceBank([image for image, _ in pairs], [label for _, label in pairs], device)
        volumes = self.volumes(names, flags.get("scale", 1.0), flags.get("standardize", False), flags["num_classes"])
        return VolumeBank([image for _, image, _ in volumes], [label for _, _, label in volumes], device,
                          foreground or 0.0, flags["num_classes"])

    def native_label(self, name):
        """Your own scans: the label map of a scan on its own grid, which prepare_acdc.py --raw keeps
        beside the resampled one."""
        path = self.path(name)
        try:
            with h5py.File(path, "r") as f:
                return f["label_native"][()]
        except (OSError, KeyError) as error:
            raise DataError(f"{path}: no readable 'label_native' (written by prepare_acdc.py --raw; {error})") from None


    def scored_cases(self, names, flags, device, grid="stored"):
        """The volumes of `names` as Cases on `device`, as a run with `flags` saw them (its z-scoring and
        classes; segment applies its scale), each with its reference on the grid named: "stored" (the h5
        arrays, in voxels) or "native" (your own scans: each scan's own grid, in mm)."""
        for name, image, label in self.volumes(names, standardize=flags.get("standardize") or False,
                                               num_classes=flags["num_classes"]):
            label = torch.from_numpy(label).to(device)
            truth, spacing, native = label, None, None
            if grid == "native":
                truth, spacing = torch.from_numpy(self.native_label(name)).to(device), self.own["cases"][name]["spacing"]
                native = scan_grid(truth.shape, spacing, self.plan.preprocessing)
            yield Case(name, torch.from_numpy(image).to(device), label, truth, spacing, native)


class Case(NamedTuple):
    """A whole volume to segment and score: its image as the network takes it, (S, H, W) or (D1, D2, D3), and
    its label on that grid; the reference it is scored against (the label, or your own scan's on its own
    grid), that reference's spacing in mm (None: voxels) and its grid when it is not the image's ((size,
    steps) of scan_grid; None: the image's). The tensors on one device."""
    name: str
    image: torch.Tensor
    label: torch.Tensor
    truth: torch.Tensor
    spacing: list = None
    native: tuple = None


def labeled_patients(root):
    """The patients of train.list, in train.list order (the labeling order)."""
    return list(dict.fromkeys(patient_of(v) for v in read_list(root, "train.list")))


def training_slices(root, labeled_patients_count):
    """Slice names of train_slices.list split into (labeled, unlabeled): the labeled set is every
    slice of the first `labeled_patients_count` patients in train.list order (3 -> 68, 7 -> 136 on ACDC);
    every other slice is unlabeled."""
    patients = labeled_patients(root)
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


def read_scan_3d(path, use="prepare_acdc.py --raw"):
    """(array (i, j, k) float32 in NIfTI index order, as UA-MT's LA arrays, spacing in mm, affine, header) of a
    scan, a 2D one as one slice (k = 1); `use` names what refuses another dimension."""
    array, header = read_nifti(path, with_header=True)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise DataError(f"{path}: a {array.ndim}D image of shape {array.shape}; {use} takes one 2D or 3D scan per file")
    return (array.transpose(2, 1, 0).astype(np.float32), *nifti_geometry(header, path), header)


def scan_input(path, plan):
    """A NIfTI scan as a model of `plan` takes it -> (shown: the array its pictures draw, volume: the network's
    input, float32; native: the scan's own grid the probabilities go back to, None for the input's; the header).
    ACDC: (S, H, W) slices min-max normalised over the volume (SSL4MIS's). The others in NIfTI index order
    (i, j, k): your own scans' preprocessing (normalised, resampled to the planned spacing), or z-scored as a
    whole (UA-MT's LA, which also cropped around the atrium). One scan in memory at a time, as float32."""
    if plan.preprocessing["rule"] == "minmax":
        image, header = read_nifti(path, with_header=True)
        if image.ndim not in (2, 3):
            raise DataError(f"{path}: a {image.ndim}D image of shape {image.shape}; --predict takes one 2D or 3D scan per file")
        check_finite(image, path)
        volume = normalize(image.astype(np.float64), path).reshape(-1, *image.shape[-2:])
        return volume, volume, None, header
    shown, spacing, _, header = read_scan_3d(path, "--predict")
    check_finite(shown, path)
    if plan.preprocessing["rule"] == "zscore":
        return shown, zscore(shown), None, header  # in place
    return (shown, preprocess_3d(shown, spacing, plan.preprocessing, path), scan_grid(shown.shape, spacing, plan.preprocessing),
            header)  # `shown` normalised in place


def check_finite(image, path):
    """Refuse an image with NaN or infinite voxels, naming the file and how many."""
    if not np.isfinite(image).all():
        raise DataError(f"{path}: {np.size(image) - np.isfinite(image).sum()} NaN or infinite voxels; "
                        f"fill or mask them before segmenting")


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


def target_spacing(spacing, planned):
    """The spacing a scan of `spacing` is resampled to: the planned one, but its own along an axis the plan
    leaves None (a 2D plan's slices: each scan keeps its own)."""
    return [float(own) if target is None else target for own, target in zip(spacing, planned)]


def scan_grid(shape, spacing, preprocessing):
    """A scan's own grid as segment and resample_argmax take it, from the planned one: (its shape, the steps)."""
    return tuple(shape), spacing_steps(target_spacing(spacing, preprocessing["spacing"]), spacing)


def preprocess_3d(image, spacing, preprocessing, path):
    """A scan (i, j, k) float32 normalised (in place), then resampled to exactly the target spacing
    (trilinear, resample_spacing) -> float32 array."""
    target = target_spacing(spacing, preprocessing["spacing"])
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
        """-> images (B, 1, *patch) float, labels (B, *patch) long on the device, for volume indices (B,). A 2D
        patch (your own 2D scans) crops one slice along the last axis: a crop one voxel deep."""
        flat = len(patch) == 2
        patch, images, labels = (*patch, 1) if flat else patch, [], []
        centred = augmentation.get("centred", torch.zeros(len(index), dtype=torch.bool)).tolist()
        picks = augmentation.get("location", torch.zeros(len(index), 2)).tolist()
        for i, k, axis, corner, centre, pick in zip(index.tolist(), *(augmentation[key].tolist() for key in ("k", "flip_axis", "corner")),
                                                     centred, picks):
            turned = turned_shape(self.images[i].shape, k)
            shortfall = [(p - s) // 2 + 3 if s <= p and p > 1 else 0 for s, p in zip(turned, patch)]  # a slice: none
            padded = [s + 2 * short for s, short in zip(turned, shortfall)]
            voxel = self.centre(i, pick) if centre else None
            if voxel is None:  # the authors' randint(0, s - p); a slice (p = 1) may be any of the s
                start = [int(f * (s - p + (p == 1))) for f, s, p in zip(corner, padded, patch)]
            else:  # the voxel moved with the rotation, flip and padding; the crop around it stays inside
                voxel, _ = rot90_flip_point(voxel, self.images[i].shape, k, axis)
                start = [min(max(v + short - p // 2, 0), s - p) for v, short, p, s in zip(voxel, shortfall, patch, padded)]
            corner_in_turned = [b - short for b, short in zip(start, shortfall)]
            images.append(turned_crop(self.images[i], k, axis, corner_in_turned, patch))
            labels.append(turned_crop(self.labels[i], k, axis, corner_in_turned, patch))
        images, labels = torch.stack(images).unsqueeze(1), torch.stack(labels).long()
        if flat:
            images, labels = images[..., 0], labels[..., 0]
        return images.to(self.device), labels.to(self.device)


# -----------------------------------------------------------------------------
# 5. Run files

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


