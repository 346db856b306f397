"""
Bidirectional Copy-Paste (BCP) for semi-supervised medical image segmentation, in one file.

Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation", CVPR 2023.
A Mean-Teacher in which the student never sees a plain image: a crop of a labeled image is pasted
into an unlabeled one and a crop of an unlabeled image into a labeled one, so that labeled and
unlabeled data learn from each other in both directions (inward and outward).

The same code runs on 2D slices (ACDC, U-Net) and 3D volumes (left atrium, V-Net): only the networks
and the data banks are per dimension. Read top to bottom, this file follows one training step:
  1. the networks: U-Net (2D, as in SSL4MIS) and V-Net (3D, as in UA-MT)
  2. the EMA teacher
  3. the copy-paste mask M and the mixing (Eq. 1-4)
  4. the mixed Dice + CE loss: one term per region of M, weighted alpha where the target is a
     pseudo-label and 1 where it is ground truth (Eq. 6)
  5. pseudo-labels: the teacher's argmax, largest connected component per class
  6. the BCP step: all of the above in the order it runs (bcp_loss)
then what serves it: 7. the connected-component algorithm behind the pseudo-labels, 8. metrics (Dice,
Jaccard, HD95, ASD on an exact Euclidean distance transform), 9. the data (ACDC slices, LA volumes),
their augmentation, checkpoints and whole-volume inference, 10. pictures, 11. more than one process
(torchrun: whole-batch sums and BatchNorm, the identity in one process).

Symbols, the same in the README and the code: L_a, L_b labeled images (labeled_a, labeled_b) with
ground truth G_a, G_b (truth_a, truth_b); U_a, U_b unlabeled images (unlabeled_a, unlabeled_b) with
the teacher's pseudo-labels P_a, P_b (pseudo_a, pseudo_b); M the mask (1 keeps the base image, 0 is
where the crop is pasted); alpha the weight of pseudo-labeled regions (unlabeled_weight, --u-weight).
Each of L_a, L_b, U_a, U_b is a half-batch (6 slices at the ACDC defaults, 2 crops on LA).

train.py runs it, evaluate.py scores it, test_bcp.py checks every piece on small hand-built examples.
"""
import itertools
import json
import math
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1a. U-Net (2D): encoder 16-32-64-128-256 with dropout, bilinear decoder (SSL4MIS `UNet`, 1.81 M params)

ENCODER_CHANNELS = (16, 32, 64, 128, 256)
ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class BatchDropout(nn.Module):
    """Dropout of each element (or, per_channel, of whole channels, as Dropout3d), its mask drawn for
    the step's whole batch: under torchrun each process keeps its share of the mask one process draws
    (section 11). The identity in eval mode."""

    def __init__(self, p, per_channel=False):
        super().__init__()
        self.p, self.per_channel = p, per_channel

    def forward(self, x):  # (B, C, *S)
        if not self.training or self.p == 0:
            return x
        processes, rank = process_share()
        shape = (len(x) * processes, x.shape[1], *(x.shape[2:] if not self.per_channel else [1] * (x.ndim - 2)))
        keep = torch.rand(shape, device=x.device)[rank * len(x):(rank + 1) * len(x)] >= self.p
        return x * keep / (1 - self.p)


class ConvBlock(nn.Sequential):
    """conv3x3-BN-LeakyReLU-Dropout-conv3x3-BN-LeakyReLU."""

    def __init__(self, in_channels, out_channels, dropout):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
            BatchDropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
        )


class UpBlock(nn.Module):
    """1x1 conv down to the skip's channels, bilinear x2, concatenate with the skip, ConvBlock."""

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, skip_channels, 1)
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, x, skip):
        x = F.interpolate(self.reduce(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=4):
        super().__init__()
        c, p = ENCODER_CHANNELS, ENCODER_DROPOUT
        self.encoder = nn.ModuleList([ConvBlock(in_channels, c[0], p[0])])
        self.encoder.extend(nn.Sequential(nn.MaxPool2d(2), ConvBlock(c[i - 1], c[i], p[i])) for i in range(1, len(c)))
        self.decoder = nn.ModuleList(UpBlock(c[i], c[i - 1], c[i - 1]) for i in reversed(range(1, len(c))))
        self.head = nn.Conv2d(c[0], num_classes, 3, padding=1)

    def forward(self, x):  # (B, in_channels, H, W) -> logits (B, num_classes, H, W); H, W divisible by 16
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.decoder:
            x = block(x, skips.pop())
        return self.head(x)


# -----------------------------------------------------------------------------
# 1b. V-Net (3D): UA-MT's `VNet` with 16 base filters and batch norm (9.45 M params)

VNET_CHANNELS = (16, 32, 64, 128, 256)
VNET_ENCODER_CONVS, VNET_DECODER_CONVS = (1, 2, 3, 3, 3), (3, 3, 2, 1)  # conv3x3x3 layers per stage
VNET_DROPOUT = 0.5  # Dropout3d on the bottleneck and the last decoder feature, in training mode only


def conv_stage(convs, in_channels, out_channels):
    """`convs` times conv3x3x3-BN-ReLU."""
    layers = []
    for i in range(convs):
        layers += [nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                   nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def resample_stage(conv, in_channels, out_channels):
    """A stride-2 2x2x2 convolution (down) or transposed convolution (up), BN, ReLU."""
    return nn.Sequential(conv(in_channels, out_channels, 2, stride=2), nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True))


class VNet(nn.Module):
    """Encoder stages of 1, 2, 3, 3, 3 convs, each but the last followed by a stride-2 conv that doubles
    the channels; decoder: a stride-2 transposed conv that halves them, *added* to the encoder feature of
    the same size, then 3, 3, 2, 1 convs; a 1x1x1 output conv."""

    def __init__(self, in_channels=1, num_classes=2):
        super().__init__()
        c = VNET_CHANNELS
        self.encoder = nn.ModuleList(conv_stage(n, in_channels if i == 0 else c[i], c[i])
                                     for i, n in enumerate(VNET_ENCODER_CONVS))
        self.down = nn.ModuleList(resample_stage(nn.Conv3d, c[i], c[i + 1]) for i in range(len(c) - 1))
        self.up = nn.ModuleList(resample_stage(nn.ConvTranspose3d, c[i], c[i - 1]) for i in reversed(range(1, len(c))))
        self.decoder = nn.ModuleList(conv_stage(n, c[i], c[i]) for n, i in zip(VNET_DECODER_CONVS, reversed(range(len(c) - 1))))
        self.dropout = BatchDropout(VNET_DROPOUT, per_channel=True)
        self.head = nn.Conv3d(c[0], num_classes, 1)

    def forward(self, x):  # (B, in_channels, D1, D2, D3) -> logits (B, num_classes, D1, D2, D3); sizes divisible by 16
        skips = [self.encoder[0](x)]
        for down, stage in zip(self.down, self.encoder[1:]):
            skips.append(stage(down(skips[-1])))
        x = self.dropout(skips.pop())
        for up, stage in zip(self.up, self.decoder):
            x = stage(up(x) + skips.pop())
        return self.head(self.dropout(x))


NETWORKS = {2: UNet, 3: VNet}  # by the number of spatial dimensions


# -----------------------------------------------------------------------------
# 2. Mean-Teacher: the teacher is an exponential moving average of the student

@torch.no_grad()
def ema_update(teacher, student, decay):
    """teacher <- decay * teacher + (1 - decay) * student over the whole state dict, BN running
    statistics included, as the authors' ACDC script averages it (their LA script averages the
    parameters only: the same teacher, since a teacher run in train mode never reads those statistics).
    decay 0 copies the student, decay 1 keeps the teacher."""
    pairs = [(t, s) for t, s in zip(teacher.state_dict().values(), student.state_dict().values())
             if t.is_floating_point()]  # skips BN's num_batches_tracked, unused with a set momentum
    teacher_tensors, student_tensors = zip(*pairs)
    torch._foreach_lerp_(list(teacher_tensors), list(student_tensors), 1.0 - decay)


# -----------------------------------------------------------------------------
# 3. Copy-paste: a mask M with one zero box, and the mixing (Eq. 1-4).
#    M = 1 keeps the base image, M = 0 is where the crop of the other image is pasted.

def keep_mask(size, beta=2 / 3, centered=False, generator=None, device="cpu"):
    """M of shape `size` ((H, W) or (D1, D2, D3)), float: 1 where the base image is kept, and a zero box
    of int(beta * s) along each axis of size s where the crop is pasted. One mask serves the whole batch
    of a step. The box's corner is drawn as the authors draw it, np.random.randint(0, s - box):
    0 .. s - box - 1 along each axis in turn (the last position is never drawn); or the box sits in the
    middle with centered=True."""
    box = [int(s * beta) for s in size]
    if centered:
        corner = [(s - b) // 2 for s, b in zip(size, box)]
    else:
        corner = [int(torch.randint(max(s - b, 1), (), generator=generator)) for s, b in zip(size, box)]
    mask = torch.ones(size, device=device)
    mask[tuple(slice(c, c + b) for c, b in zip(corner, box))] = 0
    return mask


def copy_paste(base, pasted, mask):
    """base * M + pasted * (1 - M): the crop of `pasted` where M = 0, pasted into `base`.
    Works alike for images (B, 1, *S), label maps (B, *S) and probability maps; mask is (*S)."""
    mask = mask.to(base.dtype)
    return base * mask + pasted * (1 - mask)


# -----------------------------------------------------------------------------
# 4. The mixed loss: (Dice + CE) / 2, each summed over the two regions of M (Eq. 6).
#    The authors' ACDC and LA scripts use two forms of soft Dice; both are here, picked by --dice-loss.
#    Under torchrun each of N processes holds an equal share of every half-batch: whole_batch_sum turns
#    a sum over this share into the whole batch's (an all-reduce, gradient included), so every process
#    computes the one-process loss; process_share() is (N, rank). Without torchrun: the sum, (1, 0).

ACDC_DICE_SMOOTH = 1e-10  # the authors' value; an empty region's Dice is then 1 (0/0), its loss 0
LA_DICE_SMOOTH = 1e-5


def acdc_dice_loss(probs, one_hot, region):
    """ACDC's (the authors' DiceLoss): per class, sums over the whole batch and the region,
    1 - (2 sum p g + eps) / (sum p^2 + sum g^2 + eps), averaged over classes (background included).
    probs, one_hot (B, C, *S); region (B, *S) of 0/1."""
    dims = (0, *range(2, probs.ndim))
    region = region.unsqueeze(1)
    intersection = whole_batch_sum((probs * one_hot * region).sum(dims))
    denominator = whole_batch_sum((probs * probs * region).sum(dims) + (one_hot * region).sum(dims))
    return (1 - (2 * intersection + ACDC_DICE_SMOOTH) / (denominator + ACDC_DICE_SMOOTH)).mean()


def la_dice_loss(probs, one_hot, region):
    """LA's (the authors' mask_DiceLoss): per crop and class, p not squared,
    1 - mean over crops and classes of (2 sum p g + eps) / (sum p + sum g + eps)."""
    dims = tuple(range(2, probs.ndim))
    region = region.unsqueeze(1)
    intersection = (probs * one_hot * region).sum(dims)  # (B, C)
    denominator = (probs * region).sum(dims) + (one_hot * region).sum(dims)
    dice = (2 * intersection + LA_DICE_SMOOTH) / (denominator + LA_DICE_SMOOTH)
    return 1 - whole_batch_sum(dice.sum()) / (dice.numel() * process_share()[0])  # equal shares: the mean


DICE_LOSSES = {"acdc": acdc_dice_loss, "la": la_dice_loss}


def region_ce_loss(logits, target, region):
    """Cross-entropy averaged over the voxels of a region. logits (B, C, *S); target, region (B, *S)."""
    ce = (F.cross_entropy(logits, target, reduction="none") * region).sum()
    return whole_batch_sum(ce) / whole_batch_sum(region.sum()).clamp_min(1e-16)


def mixed_loss(logits, target, regions, weight_base, weight_pasted, dice_loss=acdc_dice_loss):
    """Loss of a half-batch of copy-pasted images, X_in or X_out (Eq. 6): (Dice + CE) / 2, each the sum
    of a term for the base region (M = 1) and a term for the pasted region (M = 0), taken over all the
    images of the half-batch (CE: the mean over the region's voxels in every image; Dice: ACDC's pools
    the half-batch, LA's averages its crops). A region's terms are weighted alpha when its target is a
    pseudo-label and 1 when it is ground truth: a weight on the region's term, not on each voxel.
    logits (B, C, *S); target (B, *S) long, mixed with copy_paste like the input; regions (*S): M, or
    all ones for the whole image as one region (with weight_pasted 0: the plain (Dice + CE) / 2)."""
    logits = logits.float()
    probs = logits.softmax(1)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    loss = logits.new_zeros((), dtype=torch.float32)
    for region, weight in ((regions, weight_base), (1 - regions, weight_pasted)):
        region = region.expand_as(target)
        loss = loss + weight * (dice_loss(probs, one_hot, region) + region_ce_loss(logits, target, region))
    return loss / 2


# -----------------------------------------------------------------------------
# 5. Pseudo-labels: the teacher's argmax, keeping only the largest connected component of each class

def pseudo_label(logits):
    """(B, C, *S) teacher logits -> (B, *S) long labels: argmax, then per image the largest connected
    component of each foreground class (8-connected in 2D, 26 in 3D; the rest becomes background).
    The teacher that gives the logits runs in train mode, as in the authors' code (train.py's
    build_models sets it once; validation evaluates the student): BN normalises with the half-batch's
    own statistics, and dropout is on: section 1's BatchDropout (U-Net: p 0.05 to 0.5 in the five
    encoder blocks; V-Net: whole channels, p 0.5, at the bottleneck and before the head) draws a fresh
    mask at every forward, for the whole batch, so torchrun's processes drop what one process would.
    (On LA the authors take foreground where softmax p1 >= 0.5: argmax differs only where p1 is 0.5.)"""
    return largest_component_per_class(logits.argmax(1), logits.shape[1])


def largest_component_per_class(labels, num_classes):
    """(B, *S) label map -> the same with only the largest connected component of each foreground class
    in each item (other voxels of the class become background)."""
    classes = torch.arange(1, num_classes, device=labels.device).view(1, -1, *[1] * (labels.ndim - 1))
    per_class = (labels.unsqueeze(1) == classes).flatten(0, 1)  # (B * (C-1), *S)
    kept = largest_component(per_class).view(len(labels), num_classes - 1, *labels.shape[1:])
    return (kept * classes).sum(1)


# -----------------------------------------------------------------------------
# 6. The BCP step: pseudo-labels, both copy-pasted half-batches with their targets, the weighted losses

def inward(labeled, truth, unlabeled, pseudo, mask, unlabeled_weight):
    """Eq. 1, 3: a labeled crop pasted into an unlabeled image. The base's target is a pseudo-label
    (weight alpha), the pasted crop's is ground truth (weight 1).
    -> (image, target, regions: M, weight of the base region, weight of the pasted region)."""
    return (copy_paste(base=unlabeled, pasted=labeled, mask=mask), copy_paste(base=pseudo, pasted=truth, mask=mask),
            mask, unlabeled_weight, 1.0)


def outward(labeled, truth, unlabeled, pseudo, mask, unlabeled_weight):
    """Eq. 2, 4: an unlabeled crop pasted into a labeled image. The base's target is ground truth
    (weight 1), the pasted crop's a pseudo-label (weight alpha)."""
    return (copy_paste(base=labeled, pasted=unlabeled, mask=mask), copy_paste(base=truth, pasted=pseudo, mask=mask),
            mask, 1.0, unlabeled_weight)


def unlabeled_whole(labeled, truth, unlabeled, pseudo, mask, unlabeled_weight):
    """No copy-paste: the unlabeled image with its pseudo-label, one region (all ones) weighted alpha."""
    return unlabeled, pseudo, torch.ones_like(mask), unlabeled_weight, 0.0


def labeled_whole(labeled, truth, unlabeled, pseudo, mask, unlabeled_weight):
    """No copy-paste: the labeled image with its ground truth, one region (all ones) weighted 1."""
    return labeled, truth, torch.ones_like(mask), 1.0, 0.0


# --mix: what the student sees from each half-batch (a, b). BCP: half a inward, half b outward (the
# authors' ACDC script; their LA script swaps the halves, the same method since a and b are drawn
# alike). The ablations: one direction for both halves, or no pasting at all (U_a and L_b whole);
# every variant shows the student as many images.
MIXES = {"bidirectional": (inward, outward), "inward": (inward, inward), "outward": (outward, outward),
         "none": (unlabeled_whole, labeled_whole)}


def bcp_loss(student, teacher, labeled_a, truth_a, labeled_b, truth_b, unlabeled_a, unlabeled_b, mask,
             unlabeled_weight, mix=MIXES["bidirectional"], dice_loss=acdc_dice_loss):
    """The loss of one BCP self-training step (Fig. 2 of the paper), in the order it runs:
    1. the teacher's pseudo-labels P_a, P_b of U_a, U_b (one forward per half, as the authors);
    2. X_in = U_a * M + L_a * (1 - M) with target P_a * M + G_a * (1 - M)   (inward, Eq. 1, 3)
       X_out = L_b * M + U_b * (1 - M) with target G_b * M + P_b * (1 - M)  (outward, Eq. 2, 4);
    3. each half-batch through the student; (Dice + CE) / 2 per region of M, pseudo-labeled regions
       weighted alpha = unlabeled_weight, ground-truth regions 1 (Eq. 6); the step's loss is the sum of
       the two half-batches' losses.
    student, teacher: callables (B, 1, *S) -> logits; images (B, 1, *S), labels (B, *S) long; mask (*S).
    -> (loss, [(image, target, logits, regions)] of each mixed half-batch for pictures,
        (P_a, P_b) for diagnostics)."""
    with torch.no_grad():
        pseudo_a, pseudo_b = pseudo_label(teacher(unlabeled_a)), pseudo_label(teacher(unlabeled_b))
    loss, views = 0.0, []
    for mixing, labeled, truth, unlabeled, pseudo in zip(mix, (labeled_a, labeled_b), (truth_a, truth_b),
                                                         (unlabeled_a, unlabeled_b), (pseudo_a, pseudo_b)):
        image, target, regions, weight_base, weight_pasted = mixing(labeled, truth, unlabeled, pseudo, mask, unlabeled_weight)
        logits = student(image)
        loss = loss + mixed_loss(logits, target, regions, weight_base, weight_pasted, dice_loss)
        views.append((image, target, logits, regions))
    return loss, views, (pseudo_a, pseudo_b)


# -----------------------------------------------------------------------------
# 7. Connected components: the largest one of each item, fast on a GPU (used by pseudo_label)

def neighbourhood_min(labels, fill):
    """Smallest value in each 3x3 (3x3x3) neighbourhood of an (N, *S) tensor, `fill` outside the border."""
    for dim in range(1, labels.ndim):
        edge = torch.full_like(labels.narrow(dim, 0, 1), fill)
        padded, n = torch.cat([edge, labels, edge], dim), labels.shape[dim]
        labels = torch.minimum(torch.minimum(padded.narrow(dim, 0, n), padded.narrow(dim, 1, n)), padded.narrow(dim, 2, n))
    return labels


POINTER_JUMPS = 3  # per round of largest_component; fewest rounds and least time on ACDC teacher predictions


def largest_component(mask):
    """Keep the largest component of each item of a boolean (N, *S) tensor, 2D or 3D, connected through
    faces, edges and corners (8-connected in 2D, 26 in 3D): the same as skimage.measure.label (or
    scipy.ndimage.label with a full 3x3(x3) structure) followed by the component with the largest
    count, ties to the first in raster order, as the authors' code does (the tests pin this against
    scipy). Empty items stay empty.

    How: connected components by hooking and pointer jumping (as in Shiloach-Vishkin): every foreground
    voxel starts labelled by its own flat index, and a label is also a pointer to the voxel it names.
    Each round, every voxel sees the smallest label in its neighbourhood; the voxel its label points at
    (its root) takes the smallest label any voxel pointing at it saw, so a whole tree is hooked at once;
    then every voxel follows its pointer a few times. Labels only decrease and always name a voxel of
    the same component, so when a round changes nothing each component is labelled by the index of its
    first voxel in raster order, and a tie in size goes to the component met first. Few rounds are
    needed: a one-pixel-wide spiral or serpentine filling 256 x 256 takes 6 or 7 (spreading the
    smallest label from neighbour to neighbour takes over 250), a teacher's prediction on ACDC 4 or 5.
    The work runs inside the bounding box of all foreground voxels, which is what makes it cheap on a
    heart. On a GPU the host waits once for the box and once per round: the only waits in a step."""
    occupied = mask.any(0)  # (*S)
    bounds = []
    for axis in range(occupied.ndim):
        present = occupied.amax(dim=[a for a in range(occupied.ndim) if a != axis])
        bounds += [present.int().argmax(), len(present) - present.flip(0).int().argmax()]
    bounds = torch.stack(bounds).tolist()  # first and last + 1 along each axis; the whole item when empty
    box = (slice(None), *(slice(low, high) for low, high in zip(bounds[::2], bounds[1::2])))
    n, *size = mask[box].shape
    inside = mask[box].reshape(n, -1)  # (n, voxels) foreground inside the box
    outside = inside.shape[1]  # the label of background voxels, and the index of one extra entry they point at
    labels = F.pad(torch.where(inside, torch.arange(outside, device=mask.device), outside), (0, 1), value=outside)
    while True:
        seen = neighbourhood_min(labels[:, :-1].view(n, *size), outside).view(n, -1)  # (n, voxels + 1) like labels
        seen = F.pad(torch.where(inside, seen, outside), (0, 1), value=outside)
        new = torch.minimum(labels.scatter_reduce(1, labels, seen, "amin"), seen)  # hook roots, then voxels
        for _ in range(POINTER_JUMPS):
            new = new.gather(1, new)
        if torch.equal(new, labels):
            break
        labels = new
    counts = torch.zeros_like(labels).scatter_add_(1, labels, torch.ones_like(labels))
    largest = counts[:, :-1].argmax(1, keepdim=True)  # first (smallest) label among equal sizes
    kept = torch.zeros_like(mask)
    kept[box] = ((labels[:, :-1] == largest) & inside).view(n, *size)
    return kept


# -----------------------------------------------------------------------------
# 8. Metrics on boolean numpy arrays (2D or 3D), as medpy.metric.binary defines them

def _as_masks(pred, gt, spacing):
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)  # never written to
    if pred.shape != gt.shape or pred.ndim not in (2, 3):
        raise ValueError(f"pred and gt must be 2D or 3D arrays of one shape, got {pred.shape} and {gt.shape}")
    spacing = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    if spacing.shape != (pred.ndim,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must hold {pred.ndim} positive numbers, got {spacing.tolist()}")
    return pred, gt, spacing


def dice(pred, gt):
    """2|P & G| / (|P| + |G|) in [0, 1]; two empty masks give 1.0."""
    pred, gt, _ = _as_masks(pred, gt, None)
    total = pred.sum() + gt.sum()
    return 2.0 * np.logical_and(pred, gt).sum() / total if total else 1.0


def jaccard(pred, gt):
    """|P & G| / |P | G| in [0, 1]; two empty masks give 1.0."""
    pred, gt, _ = _as_masks(pred, gt, None)
    union = np.logical_or(pred, gt).sum()
    return np.logical_and(pred, gt).sum() / union if union else 1.0


def surface(mask):
    """The mask minus its erosion by the face-connected cross; pixels on the array border are surface."""
    padded = np.pad(mask, 1)
    core = [slice(1, -1)] * mask.ndim
    interior = mask.copy()
    for axis in range(mask.ndim):
        for shifted in (slice(None, -2), slice(2, None)):
            neighbour = list(core)
            neighbour[axis] = shifted
            interior &= padded[tuple(neighbour)]
    return mask & ~interior


def nearest_along_first_axis(features, first, outputs, step):
    """Squared distance along axis 0 to the nearest True of `features`, whose axis 0 starts at index
    `first`, at the indices `outputs` (a range): the nearest True before and after, by two scans."""
    low, high = min(first, outputs[0]), max(first + len(features), outputs[-1] + 1)
    marked = np.zeros((high - low, *features.shape[1:]), bool)
    marked[first - low:first - low + len(features)] = features
    index = np.arange(low, high, dtype=float).reshape(-1, *[1] * (features.ndim - 1))
    before = np.maximum.accumulate(np.where(marked, index, -np.inf), axis=0)
    after = np.minimum.accumulate(np.where(marked, index, np.inf)[::-1], axis=0)[::-1]
    return (step * np.minimum(index - before, after - index)[outputs - low]) ** 2


def parabola_envelope(heights, step):
    """The lower envelope of the parabolas y = (step * (x - j))^2 + heights[l, j] of every line l of
    heights (L, n) at once, parabolas of infinite height left out (Felzenszwalb and Huttenlocher,
    "Distance Transforms of Sampled Functions", 2012): O(n) per line, a loop over the n positions.
    -> vertex (L, n): the envelope's parabolas from left to right; start (L, n + 1): where each
    becomes the lowest (inf past the last); count (L,): how many there are."""
    lines, n = heights.shape
    position = np.arange(n) * step
    lifted = (heights + position ** 2).ravel()  # comparing parabolas needs only height + position^2
    vertex, start = np.zeros(lines * n, np.intp), np.full(lines * (n + 1), np.inf)  # flat, line by line
    count = np.zeros(lines, np.intp)
    finite = np.ascontiguousarray((heights < np.inf).T)  # (n, L): one position's lines side by side
    every_line, dense = np.arange(lines), finite.all(1)
    for j in range(n):
        active = every_line if dense[j] else np.flatnonzero(finite[j])
        top = count[active] - 1
        crossing = np.full(len(active), -np.inf)  # where parabola j undercuts the envelope
        stacked = np.flatnonzero(top >= 0)
        while len(stacked):  # drop the envelope's last parabola while j undercuts it from where it starts
            line, last = active[stacked], top[stacked]
            v = vertex[line * n + last]
            crossing[stacked] = (lifted[line * n + j] - lifted[line * n + v]) / (2 * (position[j] - position[v]))
            stacked = stacked[crossing[stacked] <= start[line * (n + 1) + last]]
            top[stacked] -= 1
            crossing[stacked] = -np.inf
            stacked = stacked[top[stacked] >= 0]
        top += 1
        vertex[active * n + top] = j
        start[active * (n + 1) + top] = crossing
        start[active * (n + 1) + top + 1] = np.inf
        count[active] = top + 1
    start = start.reshape(lines, n + 1)
    start[np.arange(n + 1) >= count[:, None]] = np.inf  # left over from envelopes that were longer
    return vertex.reshape(lines, n), start, count


def envelope_at(heights, step, envelope, lines, positions):
    """The envelope of parabola_envelope at (line, position) pairs: each position takes the parabola
    whose interval holds it, found by one search over all lines laid end to end."""
    vertex, start, count = envelope
    n = heights.shape[1]
    x = positions * step
    lowest, highest = min(x.min(), 0) - 1, max(x.max(), (n - 1) * step) + 1  # clip bounds to what is asked
    offsets = np.arange(len(start))[:, None] * (highest - lowest + 1)
    bounds = (np.clip(start, lowest, highest) + offsets).ravel()
    k = np.searchsorted(bounds, x + offsets[lines, 0], side="right") - 1 - lines * (n + 1)
    v = vertex[lines, np.clip(k, 0, n - 1)]
    return np.where(count[lines] > 0, heights[lines, v] + (x - v * step) ** 2, np.inf)


def squared_distances(features, points, spacing, radius):
    """Squared Euclidean distance from each point (k, ndim) to the nearest True voxel of `features`
    that lies within `radius` of the points' bounding box (along each axis), and whether that radius
    left any True voxel out. Separable, exact: along axis 0 by two scans, along each other axis by the
    lower envelope of parabolas; each pass runs from the positions that hold features (the features'
    box) to the positions asked for (the points' box), and the last axis only at the points."""
    corners = np.argwhere(features)
    box_low, box_high = corners.min(0), corners.max(0) + 1
    point_low, point_high = points.min(0), points.max(0) + 1
    reach = np.ceil(radius / np.asarray(spacing, dtype=float))  # inf: no limit
    low = np.maximum(box_low, point_low - reach).astype(np.intp)
    high = np.minimum(box_high, point_high + reach).astype(np.intp)
    left_out = bool(np.any(low > box_low) or np.any(high < box_high))
    if np.any(low >= high):
        return np.full(len(points), np.inf), left_out
    inside = features[tuple(slice(a, b) for a, b in zip(low, high))]
    squared = nearest_along_first_axis(inside, low[0], np.arange(point_low[0], point_high[0]), spacing[0])
    # squared: points' box along the axes done, features' box along the axes to do
    for axis in range(1, features.ndim):
        moved = np.moveaxis(squared, axis, -1)
        heights = moved.reshape(-1, moved.shape[-1])  # (lines, positions from low[axis])
        envelope = parabola_envelope(heights, spacing[axis])
        if axis < features.ndim - 1:
            outputs = np.arange(point_low[axis], point_high[axis]) - low[axis]
            values = envelope_at(heights, spacing[axis], envelope, np.repeat(np.arange(len(heights)), len(outputs)),
                                 np.tile(outputs, len(heights)))
            squared = np.moveaxis(values.reshape(*moved.shape[:-1], len(outputs)), -1, axis)
        else:
            lines = np.ravel_multi_index(tuple((points[:, :-1] - point_low[:-1]).T), moved.shape[:-1])
            return envelope_at(heights, spacing[axis], envelope, lines, points[:, -1] - low[axis]), left_out
    return squared[points[:, 0] - point_low[0]], left_out  # 1D


FIRST_SEARCH_RADIUS = 3  # voxels of the finest spacing: most surface voxels have a near neighbour surface


def nearest_distances(queries, features, spacing):
    """Euclidean distance from each True voxel of `queries` (np.argwhere order) to the nearest True
    voxel of `features`, exactly; both boolean arrays of one shape.
    First only features within a small radius of the queries' box are searched: every distance found
    that is no larger than the radius is exact, since the true nearest feature is then inside the
    searched box. Otherwise the search is repeated with the largest distance found as the radius,
    which is then exact for all. This keeps it cheap when a weak model scatters false positives."""
    points = np.argwhere(queries)
    radius = FIRST_SEARCH_RADIUS * min(spacing)
    squared, left_out = squared_distances(features, points, spacing, radius)
    if left_out and not squared.max() <= radius ** 2:
        squared, _ = squared_distances(features, points, spacing, np.sqrt(squared.max()))
    return np.sqrt(squared)


def surface_distances(pred, gt, spacing):
    """Distances pred surface -> gt surface and gt surface -> pred surface (1D arrays)."""
    for name, mask in (("prediction", pred), ("ground truth", gt)):
        if not mask.any():
            raise ValueError(f"the {name} mask is empty: surface distances are undefined")
    pred_surface, gt_surface = surface(pred), surface(gt)
    return nearest_distances(pred_surface, gt_surface, spacing), nearest_distances(gt_surface, pred_surface, spacing)


def hd95(pred, gt, spacing=None):
    """95th percentile of the surface distances of both directions pooled. Raises on an empty mask."""
    pred, gt, spacing = _as_masks(pred, gt, spacing)
    return float(np.percentile(np.concatenate(surface_distances(pred, gt, spacing)), 95))


def asd(pred, gt, spacing=None):
    """Mean distance from the prediction's surface to the ground truth's (one direction, as medpy)."""
    pred, gt, spacing = _as_masks(pred, gt, spacing)
    return float(surface_distances(pred, gt, spacing)[0].mean())


def binary_metrics(pred, gt, spacing=None):
    """Dice, Jaccard, HD95 and ASD from one pass (each distance transform computed once).
    Returns a dict of floats; raises ValueError if either mask is empty."""
    pred, gt, spacing = _as_masks(pred, gt, spacing)
    pred_to_gt, gt_to_pred = surface_distances(pred, gt, spacing)
    overlap, total, union = np.logical_and(pred, gt).sum(), pred.sum() + gt.sum(), np.logical_or(pred, gt).sum()
    return {"dice": 2.0 * overlap / total, "jaccard": overlap / union,
            "hd95": float(np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95)),
            "asd": float(pred_to_gt.mean())}


def dice_per_class(prediction, label, num_classes, scoring="paper", total=lambda counts: counts):
    """Dice of each foreground class 1..C-1 between two label volumes (torch, on their device) ->
    (C-1,) tensor. scoring "paper": a class absent from the prediction scores 0 (the authors'
    convention, on ACDC and LA); "nnunet": a class absent from both scores NaN, left out of the means
    (your own scans), and one absent from either alone scores 0. total: what the voxel counts pass
    through before the ratio; whole_batch_sum (train.py's pseudo-label Dice) makes it the Dice of the
    whole batch that torchrun's processes share."""
    classes = torch.arange(1, num_classes, device=prediction.device).view(-1, *[1] * prediction.ndim)
    predicted, truth = prediction.unsqueeze(0) == classes, label.unsqueeze(0) == classes
    overlap, predicted_size, truth_size = total(torch.stack([(predicted & truth).flatten(1).sum(1),
                                                             predicted.flatten(1).sum(1), truth.flatten(1).sum(1)]))
    dice = 2 * overlap / (predicted_size + truth_size)  # 0 / 0 = NaN where the class is absent from both
    return torch.where(predicted_size > 0, dice, 0.0) if scoring == "paper" else dice


# -----------------------------------------------------------------------------
# 9. Data: ACDC slices (SSL4MIS layout) and LA volumes (UA-MT layout), held in memory on the training device

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


def patient_of(name):
    return name.split("_")[0]


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


def checked_device(name):
    """torch.device(name); ValueError naming the problem for an unknown device or CUDA without a GPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


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
    (nearest, zeros outside); then a nearest resize to patch x patch. Here the whole chain is one
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

    def batch(self, index, patch_size, augmentation=None):
        """-> images (B, 1, P, P) float, labels (B, P, P) long for slice indices (B,), augmented with
        the choices of random_augmentation (none if not given)."""
        device = self.images.device
        index = to_device(index, device)
        aug = augmentation or self.no_augmentation(len(index))
        aug = {key: to_device(value, device).view(-1, 1, 1) for key, value in aug.items()}
        h, w = self.heights[index].view(-1, 1, 1), self.widths[index].view(-1, 1, 1)
        k = torch.where(aug["rot_flip"], aug["k"], 0)
        h_out, w_out = torch.where(k % 2 == 1, w, h), torch.where(k % 2 == 1, h, w)  # odd rot90 swaps H, W
        r = zoom_index(h_out.view(-1), patch_size).view(-1, patch_size, 1)  # rows in the augmented slice
        c = zoom_index(w_out.view(-1), patch_size).view(-1, 1, patch_size)
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


def load_slices(root, names, num_classes):
    root = Path(root)
    pairs = [read_h5(root / "data" / "slices" / f"{name}.h5", 2, num_classes) for name in names]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def load_volumes(root, split, num_classes):
    """[(name, image (S, H, W) float32, label (S, H, W) uint8)] for the volumes of <split>.list."""
    root = Path(root)
    return [(name, *read_h5(root / "data" / f"{name}.h5", 3, num_classes)) for name in read_list(root, f"{split}.list")]


def dataset_info(root):
    """ROOT/dataset.json, which prepare_acdc.py writes for your own data: 'num_classes', 'class_names',
    and 'unlabeled', the training volumes that have no labels. {} for ACDC and the synthetic set."""
    path = Path(root) / "dataset.json"
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(info, dict) or not isinstance(info.get("num_classes"), int):
        raise DataError(f"{path}: needs an integer 'num_classes'")
    return info


def labeled_patients(root):
    """The patients of train.list that have labels, in train.list order (the labeling order)."""
    unlabeled = set(dataset_info(root).get("unlabeled", []))
    return list(dict.fromkeys(patient_of(v) for v in read_list(root, "train.list") if v not in unlabeled))


def training_slices(root, labeled_patients_count):
    """Slice names of train_slices.list split into (labeled, unlabeled): the labeled set is every
    slice of the first `labeled_patients_count` labeled patients in train.list order (3 -> 68, 7 -> 136
    on ACDC); every other slice, those of volumes without labels included, is unlabeled."""
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


LA_FOLDER = "2018LA_Seg_Training Set"  # UA-MT's layout: ROOT/<LA_FOLDER>/<case>/mri_norm2.h5, ROOT/train.list, test.list


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


def standardize(image, mean, std):
    """(image - mean) / std in place (float32)."""
    image -= np.float32(mean)
    image /= np.float32(std)
    return image


def zscore(image):
    """A float32 scan z-scored over all its voxels, in place."""
    return standardize(image, image.mean(dtype=np.float64), max(float(image.std(dtype=np.float64)), 1e-8))


def load_la_volumes(root, names, num_classes=2, scale=1.0, standardize=False):
    """[(case, image (D1, D2, D3) float32, label uint8)] from UA-MT's layout, resampled by `scale`;
    standardize: each image z-scored over its own voxels."""
    volumes = [(name, *read_h5(Path(root) / LA_FOLDER / name / "mri_norm2.h5", 3, num_classes)) for name in names]
    if standardize:
        volumes = [(name, zscore(image), label) for name, image, label in volumes]
    return [(name, *rescale(image, label, scale)) for name, image, label in volumes]


def scaled_size(shape, scale):
    return [max(1, round(s * scale)) for s in shape]


def rescale(image, label, scale):
    """A volume resampled by `scale` along every axis: the image trilinearly, the label by nearest
    neighbour (as scipy.ndimage.zoom, order 0). scale 1 returns both as they are."""
    if scale == 1:
        return image, label
    size = scaled_size(image.shape, scale)
    image = F.interpolate(torch.from_numpy(image)[None, None], size=size, mode="trilinear")[0, 0].numpy()
    return image, resample_labels(torch.from_numpy(label), size).numpy()


def resample_image(image, size):
    """A (D1, D2, D3) float tensor resampled to `size`, trilinear, corner voxels aligned (the grid
    resample_labels uses)."""
    return F.interpolate(image[None, None].float(), size=list(size), mode="trilinear", align_corners=True)[0, 0]


def resample_labels(labels, size):
    """A (D1, D2, D3) label tensor resampled to `size` by nearest neighbour, as scipy.ndimage.zoom
    (order 0): equal sizes return it unchanged."""
    rows, cols, slices = (zoom_index(s, n, labels.device) for s, n in zip(labels.shape, size))
    return labels[rows[:, None, None], cols[None, :, None], slices[None, None, :]]


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


class VolumeBank:
    """Training volumes of different sizes in host memory (on a GPU when they all fit in a quarter of
    its free memory); batches of random crops with the authors' LA augmentation (UA-MT's RandomRotFlip,
    RandomCrop), per volume: rot90 by k in 0..3 over the first two axes, a flip along axis 0 or 1
    (always), then a random crop of the patch, its corner drawn as np.random.randint(0, size - patch).
    A volume no larger than the patch along an axis is first zero-padded by (patch - size) // 2 + 3 on
    each side of that axis. (The authors' rule, once any axis is that small, pads every axis by
    max((patch - size) // 2 + 3, 0), so also an axis up to 4 voxels larger than the patch; real LA
    volumes are all larger than the crop, where the two agree.) Only the batch's crops go to `device`.

    foreground (nnU-Net's oversampling, for whole scans where most random crops miss the organ): each
    crop is, with this probability, centred on a voxel of a foreground class present in its volume
    (class and voxel chosen at random among class_locations) instead of placed uniformly, clipped to
    the volume. 0 (the authors' LA crops) draws exactly the choices it drew before."""

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
        With foreground crops, also whether each is centred and where (class, voxel) as fractions,
        drawn after the authors' choices so that those stay as they were."""
        choices = {"k": torch.randint(4, (batch_size,), generator=generator),
                   "flip_axis": torch.randint(2, (batch_size,), generator=generator),
                   "corner": torch.rand(batch_size, 3, generator=generator)}
        if self.foreground:
            choices |= {"centred": torch.rand(batch_size, generator=generator) < self.foreground,
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

    def batch(self, index, patch_size, augmentation):
        """-> images (B, 1, *patch) float, labels (B, *patch) long on the device, for volume indices (B,)."""
        images, labels = [], []
        centred = augmentation.get("centred", torch.zeros(len(index), dtype=torch.bool)).tolist()
        picks = augmentation.get("location", torch.zeros(len(index), 2)).tolist()
        for i, k, axis, corner, centre, pick in zip(index.tolist(), *(augmentation[key].tolist() for key in ("k", "flip_axis", "corner")),
                                                     centred, picks):
            image, label = (torch.rot90(t, k, (0, 1)).flip(axis) for t in (self.images[i], self.labels[i]))
            shortfall = [(p - s) // 2 + 3 if s <= p else 0 for s, p in zip(image.shape, patch_size)]
            padding = [side for short in reversed(shortfall) for side in (short, short)]
            image, label = F.pad(image, padding), F.pad(label, padding)
            voxel = self.centre(i, pick) if centre else None
            if voxel is None:
                start = [int(f * (s - p)) for f, s, p in zip(corner, image.shape, patch_size)]
            else:  # the voxel moved with the rotation, flip and padding; the crop around it stays inside
                voxel, _ = rot90_flip_point(voxel, self.images[i].shape, k, axis)
                start = [min(max(v + short - p // 2, 0), s - p) for v, short, p, s in zip(voxel, shortfall, patch_size, image.shape)]
            box = tuple(slice(b, b + p) for b, p in zip(start, patch_size))
            images.append(image[box])
            labels.append(label[box])
        return torch.stack(images).unsqueeze(1).to(self.device), torch.stack(labels).long().to(self.device)


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
        raise DataError(f"{path}: the weights do not fit this {'U-Net' if isinstance(model, UNet) else 'V-Net'} "
                        f"({' '.join(str(error).split())[:300]})") from None


def patch_shape(patch_size):
    """The patch of a run's flags: an int (ACDC: square slices) or a list of 3 ints (LA crops) -> tuple."""
    return (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)


def load_model(path, device="cpu"):
    """(U-Net or V-Net, by the run's patch, with the weights of a train.py checkpoint or its fp16
    export, on `device`; the checkpoint)."""
    checkpoint = load_checkpoint(path)
    flags = checkpoint["flags"] if isinstance(checkpoint["flags"], dict) else {}
    num_classes, patch_size = flags.get("num_classes"), flags.get("patch_size")
    if not isinstance(num_classes, int):
        raise DataError(f"{path}: its flags do not say num_classes")
    if not (isinstance(patch_size, int) or isinstance(patch_size, list) and len(patch_size) == 3):
        raise DataError(f"{path}: its flags do not say patch_size")
    model = NETWORKS[len(patch_shape(patch_size))](num_classes=num_classes).to(device)
    load_weights(model, checkpoint["model"], path)
    return model, checkpoint


@torch.no_grad()
def predict_volume(model, image, patch_size):
    """ACDC: slice-wise inference on a volume: (S, H, W) float tensor -> (S, H, W) long labels.
    Each slice is resized to patch x patch (nearest), segmented, and the argmax resized back."""
    slices = resize_nearest(image, patch_size, patch_size).unsqueeze(1)  # (S, 1, P, P)
    prediction = model(slices).argmax(1)
    return resize_nearest(prediction, *image.shape[-2:])


def window_starts(size, window, stride):
    """Corners of sliding windows along one axis, as UA-MT's test_single_case: every `stride`, the last
    flush with the end (ceil((size - window) / stride) + 1 windows). A stride larger than the window
    would leave voxels between windows uncovered: ValueError."""
    if stride < 1 or stride > window < size:
        raise ValueError(f"a sliding-window stride must lie in 1 .. the window ({window}), got {stride}")
    return [min(stride * i, size - window) for i in range(math.ceil((size - window) / stride) + 1)]


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


def resample_argmax(probabilities, size, slab=8):
    """(C, D1, D2, D3) probabilities -> (size) uint8 labels: resampled trilinearly to `size` (corners
    aligned, as resample_image), then the argmax, `slab` output slices along the last axis at a time,
    so the probabilities are never held at full size (trilinear = linear along the last axis, then
    bilinear in-plane). A thin structure survives that nearest-neighbour labels would cut."""
    depth = probabilities.shape[-1]
    positions = torch.linspace(0, depth - 1, size[2], device=probabilities.device)
    labels = torch.empty(size, dtype=torch.uint8, device=probabilities.device)
    for start in range(0, size[2], slab):
        position = positions[start:start + slab]
        below = position.floor().long()
        above, fraction = (below + 1).clamp_max(depth - 1), position - below
        along_depth = probabilities[..., below] * (1 - fraction) + probabilities[..., above] * fraction  # (C, D1, D2, s)
        in_plane = F.interpolate(along_depth.permute(3, 0, 1, 2), size=list(size[:2]), mode="bilinear", align_corners=True)
        labels[..., start:start + len(position)] = in_plane.argmax(1).permute(1, 2, 0)
    return labels


def keep_largest_component(labels, classes):
    """A label map with only the largest connected component of each class in `classes` (the rest of
    that class becomes background; one largest_component call for them all); other classes as they are."""
    if not len(classes):
        return labels
    per_class = labels.unsqueeze(0) == torch.tensor(list(classes), device=labels.device).view(-1, *[1] * labels.ndim)
    return torch.where((per_class & ~largest_component(per_class)).any(0), 0, labels)


AUTHORS_STRIDE = (18, 4)  # UA-MT's and BCP's LA test strides (XY, Z) for a 112 x 112 x 80 window


def window_strides(stride):
    """--stride XY Z -> the strides along the three axes (XY, XY, Z)."""
    return (stride[0], stride[0], stride[1])


def default_stride(window):
    """The authors' strides, each at most the window's side: (XY, Z) for a (D1, D2, D3) window."""
    return [min(AUTHORS_STRIDE[0], *window[:2]), min(AUTHORS_STRIDE[1], window[2])]


def segment(model, image, patch_size, stride, scale=1.0, gaussian=False, keep_largest=None, size=None):
    """A whole volume's labels. ACDC (an int patch): slice by slice, as the authors. 3D (a patch of
    three): sliding windows, every --stride XY Z with the probabilities averaged (the authors' LA test),
    or with gaussian nnU-Net's, every half window weighted by gaussian_importance; a model trained at
    --scale segments the volume resampled alike and its probabilities come back (trilinear). Then the
    argmax (two classes: foreground where p1 > 0.5), on the volume's grid or resampled to `size` (your
    own scans: each scan's own grid, resample_argmax), and the largest connected component of each
    class in keep_largest (None: every class, the authors' LA protocol; your own scans: those that
    validation chose). The model must be in eval mode."""
    if isinstance(patch_size, int):
        return predict_volume(model, image, patch_size)
    window = tuple(patch_size)
    strides, weights = (([w // 2 for w in window], gaussian_importance(window, image.device)) if gaussian
                        else (window_strides(stride), None))
    resampled = F.interpolate(image[None, None], size=scaled_size(image.shape, scale), mode="trilinear")[0, 0] \
        if scale != 1 else image
    probabilities = sliding_window_probabilities(model, resampled, window, strides, weights=weights)
    if scale != 1:
        probabilities = F.interpolate(probabilities[None], size=image.shape, mode="trilinear")[0]
    labels = probabilities.argmax(0) if size is None else resample_argmax(probabilities, size)
    return keep_largest_component(labels, range(1, len(probabilities)) if keep_largest is None else keep_largest)


# -----------------------------------------------------------------------------
# 10. Pictures: a tiny PNG writer (zlib + numpy) and label overlays

CLASS_COLORS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 130, 240]], dtype=np.uint8)  # bg, RV, Myo, LV


def write_png(path, rgb):
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width, _ = rgb.shape

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)  # filter byte 0
    write_atomic(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def gray(image):
    """(H, W) float image -> (H, W, 3) uint8, stretched to its own range."""
    image = np.asarray(image, dtype=np.float32)
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=2)


def paint_labels(rgb, labels, outline=False, opacity=0.45):
    """Colour each class of an (H, W) label map onto an RGB picture: filled (blended) or as outlines."""
    rgb = rgb.astype(np.float32)
    for c in range(1, len(CLASS_COLORS)):
        region = labels == c
        if outline:
            region = surface(region)
        weight = 1.0 if outline else opacity
        rgb[region] = (1 - weight) * rgb[region] + weight * CLASS_COLORS[c]
    return rgb.astype(np.uint8)


def montage(tiles, columns):
    """Lay (H, W, 3) tiles of one size out in a grid, row by row, with 2-pixel white gaps."""
    h, w, _ = tiles[0].shape
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (h + 2) - 2, columns * (w + 2) - 2, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = tile
    return sheet


def write_line_plot(path, curves, title, x_label, y_label, width=640, height=360, margin=50):
    """A small SVG line plot of {name: (xs, ys, colour)}; the y axis starts at 0."""
    xs = np.concatenate([np.asarray(x, float) for x, _, _ in curves.values()])
    left, right = xs.min(), max(xs.max(), xs.min() + 1e-9)
    top = max(max(np.max(y) for _, y, _ in curves.values()) * 1.1, 1e-9)
    x = lambda v: margin + (v - left) / (right - left) * (width - 2 * margin)
    y = lambda v: height - margin - v / top * (height - 2 * margin)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle">{title}</text>',
             f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>',
             f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">{x_label}</text>',
             f'<text x="15" y="{height / 2}" text-anchor="middle" transform="rotate(-90 15 {height / 2})">{y_label}</text>',
             f'<text x="{margin - 5}" y="{margin + 4}" text-anchor="end">{top:.3g}</text>',
             f'<text x="{margin - 5}" y="{height - margin + 4}" text-anchor="end">0</text>',
             f'<text x="{margin}" y="{height - margin + 16}" text-anchor="middle">{left:g}</text>',
             f'<text x="{width - margin}" y="{height - margin + 16}" text-anchor="middle">{right:g}</text>']
    for i, (name, (xs, ys, colour)) in enumerate(curves.items()):
        points = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xs, ys))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{width - margin - 200}" y="{margin + 18 * i}" fill="{colour}">{name}</text>')
    write_atomic(path, ("\n".join(parts + ["</svg>"]) + "\n").encode())


# -----------------------------------------------------------------------------
# 11. More than one process (torchrun): each process holds a share of every half-batch, and the step's
#     loss, gradients, update and pseudo-label Dice are those of one process holding the whole batch.
#     These are the identity in a single process.

def process_share():
    """(processes sharing each batch, this one's rank): (1, 0) without torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class AllReduceSum(torch.autograd.Function):
    """Sum over the processes; its gradient is the sum of theirs, so that with the gradients then
    averaged (train.average_gradients) every weight gets the single-process gradient."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


def whole_batch_sum(tensor):
    """A sum over this process's share of the batch -> the sum over the whole batch, gradients
    included (each process's loss is then the single-process loss); the identity in one process."""
    return tensor if process_share()[0] == 1 else AllReduceSum.apply(tensor)


class WholeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole batch the processes share, from
    summed moments (torch's SyncBatchNorm refuses CPU tensors, so ours serves CPU and GPU alike); the
    running statistics are updated as BatchNorm updates them. Plain BatchNorm in one process."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):  # (B, C, *S)
        if not self.training or process_share()[0] == 1:
            return super().forward(x)
        dims, view = [0, *range(2, x.ndim)], (1, -1, *[1] * (x.ndim - 2))
        count = x.numel() // x.shape[1] * process_share()[0]  # every process holds an equal share
        mean = whole_batch_sum(x.sum(dims)) / count
        variance = whole_batch_sum(((x - mean.view(view)) ** 2).sum(dims)) / count
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(variance * count / (count - 1), self.momentum)
            self.num_batches_tracked += 1
        return (x - mean.view(view)) / torch.sqrt(variance.view(view) + self.eps) * self.weight.view(view) + self.bias.view(view)


def whole_batch_norms(model):
    """Every BatchNorm of the model replaced by a WholeBatchNorm with its weights and statistics."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                shared = WholeBatchNorm(child.num_features, child.eps, child.momentum).to(child.weight.device)
                shared.load_state_dict(child.state_dict())
                setattr(module, child_name, shared)
    return model
