"""
Bidirectional Copy-Paste (BCP) for semi-supervised medical image segmentation, in one file.

Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation", CVPR 2023.
A Mean-Teacher in which the student never sees a plain image: a crop of a labeled image is pasted
into an unlabeled one and a crop of an unlabeled image into a labeled one, so that labeled and
unlabeled data learn from each other in both directions (inward and outward).

The same code runs on 2D slices (ACDC, U-Net) and 3D volumes (left atrium, V-Net): only the networks
are per dimension. Read top to bottom, this file follows one training step:
  1. the networks: U-Net (2D, as in SSL4MIS) and V-Net (3D, as in UA-MT)
  2. the EMA teacher
  3. the copy-paste mask M and the mixing (Eq. 1-4)
  4. the mixed Dice + CE loss: one term per region of M, weighted alpha where the target is a
     pseudo-label and 1 where it is ground truth (Eq. 6)
  5. pseudo-labels: the teacher's argmax, largest connected component per class
  6. the BCP step: all of the above in the order it runs (bcp_loss)
then what serves it: 7. the connected-component algorithm behind the pseudo-labels, 8. metrics (Dice,
Jaccard, HD95, ASD on an exact Euclidean distance transform) and the paper's scoring of a volume,
9. more than one process (torchrun: whole-batch sums and BatchNorm, the identity in one process).
This file knows nothing of files, data sets or devices: data.py holds those.

Symbols, the same in the README and the code: L_a, L_b labeled images (labeled_a, labeled_b) with
ground truth G_a, G_b (truth_a, truth_b); U_a, U_b unlabeled images (unlabeled_a, unlabeled_b) with
the teacher's pseudo-labels P_a, P_b (pseudo_a, pseudo_b); M the mask (mask, drawn by keep_mask: 1 keeps
the base image, 0 is where the crop is pasted); alpha the weight of pseudo-labeled regions (unlabeled_weight,
the authors' u_weight, --u-weight). Each of L_a, L_b, U_a, U_b is a half-batch (6 slices at the ACDC
defaults, 2 crops on LA).

train.py runs it, evaluate.py scores it, test_bcp.py checks every piece on small hand-built examples.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1a. U-Net (2D): encoder 16-32-64-128-256 with dropout, bilinear decoder (SSL4MIS `UNet`, 1.81 M params)

ENCODER_CHANNELS = (16, 32, 64, 128, 256)
ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class WholeBatchDropout(nn.Module):
    """Dropout (per_channel: of whole channels, as Dropout3d) whose mask is drawn for the step's whole
    batch, as WholeBatchNorm's statistics are the whole batch's: under torchrun every process seeds torch
    alike (train.py sets --seed), draws the mask for the whole batch and keeps its own share of it, so the
    masks are those one process would draw (section 9). In one process it is dropout as nn.Dropout's
    (its own mask draw). The identity in eval mode."""

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
            WholeBatchDropout(dropout),
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
        self.dropout = WholeBatchDropout(VNET_DROPOUT, per_channel=True)
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
    parameters only: the same pseudo-labels, since the teacher predicts in train mode, from batch
    statistics, and training never reads its running statistics, which its own forwards also update;
    a teacher run in eval mode, as evaluate.py --weights teacher runs it, reads them). decay 0 copies
    the student, decay 1 keeps the teacher."""
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
#    Under torchrun each of N processes holds an equal share of every half-batch: sum_across_processes turns
#    a sum over this share into the whole batch's (an all-reduce, gradient included), so every process
#    computes the one-process loss; process_share() is (N, rank). Without torchrun: the sum, (1, 0).

ACDC_DICE_SMOOTH = 1e-10  # the authors' value; a class absent from a region's target adds a loss term of
                          # 1 - 1e-10 / (sum p^2 + 1e-10): near 1 while the student gives it any probability there,
                          # 0 only where sum p^2 is far below 1e-10 (an empty region, or confidently absent)
LA_DICE_SMOOTH = 1e-5


def acdc_dice_loss(probs, one_hot, region):
    """ACDC's (the authors' DiceLoss): per class, sums over the whole batch and the region,
    1 - (2 sum p g + eps) / (sum p^2 + sum g^2 + eps), averaged over classes (background included).
    probs, one_hot (B, C, *S); region (B, *S) of 0/1."""
    dims = (0, *range(2, probs.ndim))
    region = region.unsqueeze(1)
    intersection = sum_across_processes((probs * one_hot * region).sum(dims))
    denominator = sum_across_processes((probs * probs * region).sum(dims) + (one_hot * region).sum(dims))
    return (1 - (2 * intersection + ACDC_DICE_SMOOTH) / (denominator + ACDC_DICE_SMOOTH)).mean()


def la_dice_loss(probs, one_hot, region):
    """LA's (the authors' mask_DiceLoss): per crop and class, p not squared,
    1 - mean over crops and classes of (2 sum p g + eps) / (sum p + sum g + eps)."""
    dims = tuple(range(2, probs.ndim))
    region = region.unsqueeze(1)
    intersection = (probs * one_hot * region).sum(dims)  # (B, C)
    denominator = (probs * region).sum(dims) + (one_hot * region).sum(dims)
    dice = (2 * intersection + LA_DICE_SMOOTH) / (denominator + LA_DICE_SMOOTH)
    return 1 - sum_across_processes(dice.sum()) / (dice.numel() * process_share()[0])  # equal shares: the mean


DICE_LOSSES = {"acdc": acdc_dice_loss, "la": la_dice_loss}


def region_ce_loss(logits, target, region):
    """Cross-entropy averaged over the voxels of a region. logits (B, C, *S); target, region (B, *S)."""
    ce = (F.cross_entropy(logits, target, reduction="none") * region).sum()
    return sum_across_processes(ce) / sum_across_processes(region.sum()).clamp_min(1e-16)


def mixed_loss(logits, target, mask, weight_base, weight_pasted, dice_loss=acdc_dice_loss):
    """Loss of a half-batch of copy-pasted images, X_in or X_out (Eq. 6): (Dice + CE) / 2, each the sum
    of a term for the base region (M = 1) and a term for the pasted region (M = 0), taken over all the
    images of the half-batch (CE: the mean over the region's voxels in every image; Dice: ACDC's pools
    the half-batch, LA's averages its crops). A region's terms are weighted alpha when its target is a
    pseudo-label and 1 when it is ground truth: a weight on the region's term, not on each voxel.
    logits (B, C, *S); target (B, *S) long, mixed with copy_paste like the input; mask (*S): M, or
    all ones for the whole image as one region (with weight_pasted 0: the plain (Dice + CE) / 2)."""
    logits = logits.float()
    probs = logits.softmax(1)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    loss = logits.new_zeros((), dtype=torch.float32)
    for region, weight in ((mask, weight_base), (1 - mask, weight_pasted)):
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
    own statistics, and dropout is on: section 1's WholeBatchDropout (U-Net: p 0.05 to 0.5 in the five
    encoder blocks; V-Net: whole channels, p 0.5, at the bottleneck and before the head) draws a fresh
    mask at every forward, for the whole batch, so torchrun's processes drop what one process would.
    (On LA the authors take foreground where softmax p1 >= 0.5: argmax differs only where p1 is 0.5.)"""
    return keep_largest_components(logits.argmax(1), range(1, logits.shape[1]))


def keep_largest_components(labels, classes):
    """(N, *S) label maps -> the same with, in each item, only the largest connected component of each
    class in `classes` (the rest of that class becomes background); other classes as they are. One
    largest_component call serves all items and classes at once."""
    classes = torch.tensor(list(classes), dtype=labels.dtype, device=labels.device)
    if not len(classes):
        return labels
    per_class = labels.unsqueeze(1) == classes.view(1, -1, *[1] * (labels.ndim - 1))  # (N, K, *S)
    kept = largest_component(per_class.flatten(0, 1)).view(per_class.shape)
    return torch.where((per_class & ~kept).any(1), 0, labels)


# -----------------------------------------------------------------------------
# 6. The BCP step: pseudo-labels, both copy-pasted half-batches with their targets, the weighted losses

def inward(labeled, truth, unlabeled, pseudo, mask, unlabeled_weight):
    """Eq. 1, 3: a labeled crop pasted into an unlabeled image. The base's target is a pseudo-label
    (weight alpha), the pasted crop's is ground truth (weight 1).
    -> (image, target, M for the loss's regions, weight of the base region, weight of the pasted region)."""
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
    -> (loss, [(image, target, logits, M)] of each mixed half-batch for pictures,
        (P_a, P_b) for diagnostics)."""
    with torch.no_grad():
        pseudo_a, pseudo_b = pseudo_label(teacher(unlabeled_a)), pseudo_label(teacher(unlabeled_b))
    loss, views = 0.0, []
    for mixing, labeled, truth, unlabeled, pseudo in zip(mix, (labeled_a, labeled_b), (truth_a, truth_b),
                                                         (unlabeled_a, unlabeled_b), (pseudo_a, pseudo_b)):
        image, target, loss_mask, weight_base, weight_pasted = mixing(labeled, truth, unlabeled, pseudo, mask, unlabeled_weight)
        logits = student(image)
        loss = loss + mixed_loss(logits, target, loss_mask, weight_base, weight_pasted, dice_loss)
        views.append((image, target, logits, loss_mask))
    return loss, views, (pseudo_a, pseudo_b)


# -----------------------------------------------------------------------------
# 7. Connected components: the largest one of each item, fast on a GPU (pseudo-labels, post-processing)

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
    return binary_metrics(pred, gt, spacing)["hd95"]


def asd(pred, gt, spacing=None):
    """Mean distance from the prediction's surface to the ground truth's (one direction, as medpy)."""
    return binary_metrics(pred, gt, spacing)["asd"]


def binary_metrics(pred, gt, spacing=None):
    """Dice, Jaccard, HD95 and ASD, the surface distances computed once. Returns a dict of floats;
    raises ValueError if either mask is empty."""
    pred, gt, spacing = _as_masks(pred, gt, spacing)
    pred_to_gt, gt_to_pred = surface_distances(pred, gt, spacing)
    return {"dice": dice(pred, gt), "jaccard": jaccard(pred, gt),
            "hd95": float(np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95)), "asd": float(pred_to_gt.mean())}


def dice_per_class(prediction, label, num_classes, scoring="paper", total=lambda counts: counts):
    """Dice of each foreground class 1..C-1 between two label volumes (torch, on their device) ->
    (C-1,) tensor. scoring "paper": a class absent from the prediction scores 0 (the authors'
    convention, on ACDC and LA); "nnunet": a class absent from both scores NaN, left out of the means
    (your own scans), and one absent from either alone scores 0. total: what the voxel counts pass
    through before the ratio; sum_across_processes (train.py's pseudo-label Dice) makes it the Dice of the
    whole batch that torchrun's processes share."""
    classes = torch.arange(1, num_classes, device=prediction.device).view(-1, *[1] * prediction.ndim)
    predicted, truth = prediction.unsqueeze(0) == classes, label.unsqueeze(0) == classes
    overlap, predicted_size, truth_size = total(torch.stack([(predicted & truth).flatten(1).sum(1),
                                                             predicted.flatten(1).sum(1), truth.flatten(1).sum(1)]))
    dice = 2 * overlap / (predicted_size + truth_size)  # 0 / 0 = NaN where the class is absent from both
    return torch.where(predicted_size > 0, dice, 0.0) if scoring == "paper" else dice


METRICS = ("dice", "jaccard", "hd95", "asd")  # what score_volume gives for each class of a volume


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
            metrics = binary_metrics(predicted, truth, spacing)
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


# -----------------------------------------------------------------------------
# 9. More than one process (torchrun): each process holds a share of every half-batch, and the step's
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


def sum_across_processes(tensor):
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
        mean = sum_across_processes(x.sum(dims)) / count
        variance = sum_across_processes(((x - mean.view(view)) ** 2).sum(dims)) / count
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
