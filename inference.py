"""
Whole volumes through a trained model, and the checkpoints that hold it: what validation (train.py),
evaluate.py and benchmark.py share. A volume is segmented as its data set's plan says (data.Plan: slices,
the authors' windows or nnU-Net's, which post-processing, on which grid); bcp.py is the method and data.py
the data, and neither knows of this file.

  1. slice by slice (ACDC), sliding windows (3D, and 2D on your own scans), the probabilities back to a scan's grid
  2. segment, segment_and_score, and the post-processing chosen on validation
  3. checkpoints (with their plan) and devices
"""
import itertools
import math
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F

import bcp
import data
from data import DataError

# -----------------------------------------------------------------------------
# 1. Slice by slice, sliding windows, the probabilities back to a scan's grid

@torch.no_grad()
def segment_slices(model, image, patch):
    """ACDC: a volume slice by slice, as the authors: (S, H, W) float tensor -> (S, H, W) long labels.
    Each slice is resized to the (P, P) patch (nearest), segmented, and the argmax resized back."""
    slices = data.resize_nearest(image, *patch).unsqueeze(1)  # (S, 1, P, P)
    return data.resize_nearest(model(slices).argmax(1), *image.shape[-2:])


def window_starts(size, window, stride):
    """Corners of sliding windows along one axis, as UA-MT's test_single_case: every `stride`, the last
    flush with the end (ceil((size - window) / stride) + 1 windows). A stride larger than the window
    would leave voxels between windows uncovered: ValueError."""
    if stride < 1 or stride > window < size:
        raise ValueError(f"a sliding-window stride must lie in 1 .. the window ({window}), got {stride}")
    return [min(stride * i, size - window) for i in range(math.ceil((size - window) / stride) + 1)]


AUTHORS_STRIDE = (18, 4)  # UA-MT's and BCP's LA test strides (XY, Z) for a 112 x 112 x 80 window


def checked_strides(given, window):
    """--stride XY Z, or the authors' strides each at most the window's side where none is given: (XY, Z) for a
    (D1, D2, D3) window. A stride larger than the window would leave voxels between windows out: ValueError."""
    stride = list(given or (min(AUTHORS_STRIDE[0], *window[:2]), min(AUTHORS_STRIDE[1], window[2])))
    if stride[0] > min(window[:2]) or stride[1] > window[2]:
        raise ValueError(f"--stride {' '.join(map(str, stride))}: larger than the window {list(window)}; "
                         f"voxels between windows would be left out")
    return stride


def window_strides(stride):
    """--stride XY Z -> the strides along the three axes (XY, XY, Z)."""
    return (stride[0], stride[0], stride[1])


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
    depth = data.grid_positions(probabilities.shape[-1], size[2], steps[2], probabilities.device)
    rows, cols = (data.grid_positions(probabilities.shape[a], size[a - 1], steps[a - 1], probabilities.device) for a in (1, 2))
    labels = torch.empty(size, dtype=torch.uint8, device=probabilities.device)
    for start in range(0, size[2], slab):
        along_depth = data.interpolate_along(probabilities, 3, depth[start:start + slab])  # (C, D1, D2, s)
        in_plane = data.interpolate_along(data.interpolate_along(along_depth, 1, rows), 2, cols)
        labels[..., start:start + slab] = in_plane.argmax(0)
    return labels


# -----------------------------------------------------------------------------
# 2. A whole volume as its plan says, its scores, the post-processing chosen on validation

WINDOWS_A_BATCH = {2: 16, 3: 4}  # windows through the network at once


def slice_by_slice(model):
    """A 2D network as sliding_window_probabilities calls a 3D one: (B, 1, H, W, 1) -> (B, C, H, W, 1)."""
    return lambda windows: model(windows[..., 0])[..., None]


def segment(model, image, plan, patch, stride=None, scale=1.0, keep_largest=(), native=None):
    """A whole volume's labels, by the plan's windows: "slices", ACDC's slice by slice (segment_slices); "authors",
    sliding windows every `stride` (XY, Z; the authors' by default) with the probabilities averaged (their LA test); "gaussian",
    nnU-Net's, every half window weighted by gaussian_importance (a 2D model: 2D windows on each slice along the
    last axis, your own 2D scans'). A model trained at --scale segments the
    volume resampled alike and its probabilities come back. Then the argmax (two classes: foreground where
    p1 > 0.5), on the volume's grid or on `native`, (size, steps) of your own scan's own grid (resample_argmax;
    data.scan_grid gives them), and only the largest connected component of each class in keep_largest
    (Plan.classes_kept). The model must be in eval mode."""
    if plan.windows == "slices":
        return segment_slices(model, image, patch)
    if plan.dims == 2:  # your own 2D scans: (i, j, k) volumes, each slice along k a window one voxel deep
        model, patch = slice_by_slice(model), (*patch, 1)
    steps, weights = (([max(1, w // 2) for w in patch], gaussian_importance(patch, image.device)) if plan.windows == "gaussian"
                      else (window_strides(checked_strides(stride, patch)), None))
    resampled = data.resample(image, data.scaled_size(image.shape, scale)) if scale != 1 else image
    probabilities = sliding_window_probabilities(model, resampled, patch, steps, WINDOWS_A_BATCH[plan.dims], weights)
    if scale != 1:
        probabilities = data.resample(probabilities, image.shape)
    labels = probabilities.argmax(0) if native is None else resample_argmax(probabilities, *native)
    return bcp.keep_largest_components(labels[None], keep_largest)[0]


def segment_and_score(model, cases, plan, flags, stride, keep_largest, score):
    """Each data.Case segmented as the plan says (segment, with the run's patch and scale from `flags`, the
    windows' `stride` and the classes whose largest component is kept), then scored: [score(case, prediction)]
    over the cases. Validation, evaluate.py's splits and your own scans' scores all come from here."""
    return [score(case, segment(model, case.image, plan, flags["patch_size"], stride, flags.get("scale") or 1.0,
                                keep_largest, case.native)) for case in cases]


def choose_post_processing(as_predicted, largest_only):
    """nnU-Net's post-processing rule: keep only the largest connected component of a class where that
    raises the class's mean Dice over the validation cases. Both: the mean Dice of each foreground class,
    as predicted and with only its largest component. -> the classes (1 .. C-1) it helps, and each class's
    mean Dice with the rule applied (the larger of the two), the score evaluation will report."""
    keep_largest = [c for c, (before, after) in enumerate(zip(as_predicted, largest_only), start=1) if after > before]
    return keep_largest, [after if c in keep_largest else before for c, (before, after) in enumerate(zip(as_predicted, largest_only), start=1)]


# -----------------------------------------------------------------------------
# 3. Checkpoints and devices

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


def checkpoint_plan(checkpoint, path):
    """The data.Plan a checkpoint keeps. One written before plans were kept (up to commit 1a93707) gets its
    plan here, from its flags: your own 3D scans' where they hold the scans' preprocessing, else LA's for a
    3D patch and ACDC's for a 2D one (also for your own 2D data's of that time, ACDC's slices). A plan kept
    before the array order and the unused flags were (up to commit eb4e183) gets them from its intensity rule:
    SSL4MIS's min-max is ACDC's slices."""
    if "plan" in checkpoint:
        kept = dict(checkpoint["plan"])
        if "slices_last" not in kept:
            acdc = kept["preprocessing"]["rule"] == "minmax"
            kept |= {"slices_last": not acdc, "unused_flags": data.ACDC_PLAN.unused_flags if acdc else ()}
        try:
            return data.Plan(**kept)
        except (TypeError, KeyError) as error:
            raise DataError(f"{path}: its plan is not one this version reads ({error!r})") from None
    flags = checkpoint["flags"]
    if flags.get("preprocessing"):
        return data.own_3d_plan(flags["preprocessing"])
    return data.LA_PLAN if len(flags["patch_size"]) == 3 else data.ACDC_PLAN


def saved_plan(plan):
    """A Plan as checkpoints keep it: plain values that torch.load(weights_only=True) reads."""
    return asdict(plan)


def load_model(path, device="cpu", weights="model"):
    """(U-Net or V-Net, by the plan's dimension, with the weights of a train.py checkpoint or its fp16 export,
    on `device`; the checkpoint, its "plan" replaced by checkpoint_plan's data.Plan). weights "teacher": a self-training
    checkpoint's EMA teacher instead of its student ("model")."""
    checkpoint = load_checkpoint(path, required=(weights, "flags"))
    flags = checkpoint["flags"] if isinstance(checkpoint["flags"], dict) else {}
    num_classes, patch = flags.get("num_classes"), flags.get("patch_size")
    if not isinstance(num_classes, int):
        raise DataError(f"{path}: its flags do not say num_classes")
    if not (isinstance(patch, (list, tuple)) and len(patch) in bcp.NETWORKS):
        raise DataError(f"{path}: its flags do not give patch_size as 2 or 3 sizes (got {patch!r})")
    if checkpoint[weights] is None:
        raise DataError(f"{path}: holds no {weights} (a pre-training or supervised checkpoint has no teacher)")
    checkpoint["plan"] = checkpoint_plan(checkpoint, path)
    model = bcp.NETWORKS[checkpoint["plan"].dims](num_classes=num_classes).to(device)
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


def synchronize(device):
    """Wait for the device's queued work (CUDA); nothing on the CPU, which computes as it is asked."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runtime(device, precision, dims, compile=False):
    """(device, autocast context, memory format of models, the forward wrapper: torch.compile or nothing),
    resolved once (train.py and benchmark.py)."""
    device = torch.device(device)
    if device.type == "cuda":  # fp32 as the authors ran it on an RTX 3090: TF32 matrix and convolution math
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    # channels-last weights and activations: faster on CUDA and, measured on a 2-core CPU, 4-27 % there too
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    return device, autocast, memory_format, torch.compile if compile else (lambda model: model)
