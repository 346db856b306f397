"""
Tests for BCP: each checks one idea against a value worked out by hand or a trusted reference.
The file follows the code's order, a section each:
    method       bcp.py: the U-Net and V-Net, WholeBatchDropout, the EMA teacher, the mask and copy-paste,
                 the losses, pseudo-labels, and the BCP step's formulas
    components   bcp.py: largest_component, keep_largest_components
    metrics      bcp.py: Dice, Jaccard, surfaces, nearest distances, HD95, ASD, dice_per_class, score_volume
    data         data.py: lists and Dataset, h5 files, resampling, SliceBank and VolumeBank, checkpoints
    scans        NIfTI files (data.py) and prepare_acdc.py: the official download, synthetic sets, --check, your own scans
    inference    data.py: whole volumes, sliding windows, segment, post-processing; pictures.py
    training     train.py: flags, schedules, random streams, steps, runs, resume, stops; benchmark.py
    evaluation   evaluate.py: a split's scores, json, --predict, --kde, exports; the README's route
    torchrun     more than one process
    cuda         on a GPU against the CPU (skipped without CUDA)
Run them:
    python -m pytest -q -m "not slow" test_bcp.py   # the unit tests alone
    python -m pytest -q test_bcp.py                 # everything, the end-to-end runs included
    python -m pytest -q -k cuda test_bcp.py         # on a GPU: CUDA against the CPU
"slow" marks the end-to-end tests: those that train, evaluate a trained model, or start processes.
scipy and nibabel serve only as references here (medpy's metric definitions rebuilt on
scipy.ndimage; NIfTI headers as nibabel reads them); the product imports neither.
"""
import copy
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import h5py
import nibabel
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils._python_dispatch import TorchDispatchMode

import bcp
import benchmark
import data
import evaluate
import inference
import pictures
import prepare_acdc
import train


# The end-to-end tests carry @pytest.mark.slow. The project has no pytest ini file to declare the marker
# in, so it is registered here, on the running pytest's configuration, before its first use below: no
# PytestUnknownMarkWarning, and --strict-markers passes.
running_config = getattr(pytest.mark, "_config", None)  # pytest's own, private; None outside a pytest run
if running_config is not None:
    running_config.addinivalue_line("markers", "slow: an end-to-end test (trains, evaluates a trained model, "
                                               "or starts processes); deselect with -m 'not slow'")


# ----------------------------------------------------------------------------- shared fixtures and helpers

def random_blobs(shape, seed, threshold=0.55):
    noise = np.random.default_rng(seed).random(shape)
    return ndimage.uniform_filter(noise, 3) > threshold


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "ACDC"
    assert prepare_acdc.main(["--out", str(root), "--patients", "10"]) == 0
    return root


@pytest.fixture(scope="module")
def la_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("la") / "LA"
    assert prepare_acdc.main(["--la", "--out", str(root), "--patients", "10"]) == 0
    return root


TINY = ["--patch-size", "32", "--batch-size", "4", "--labeled-batch-size", "2", "--labeled-patients", "2",
        "--val-every", "2", "--log-every", "1"]


LA_TINY = ["--patch-size", "32", "32", "16", "--batch-size", "4", "--labeled-batch-size", "2", "--labeled-patients", "2",
           "--val-cases", "2", "--stride", "16", "16", "--val-every", "2", "--log-every", "1"]


# ----------------------------------------------------------------------------- method: bcp.py's networks, EMA, copy-paste, losses, pseudo-labels, and the BCP step's formulas

def test_unet_shape_and_parameter_count():
    model = bcp.UNet(in_channels=1, num_classes=4)
    assert sum(p.numel() for p in model.parameters()) == 1_813_764
    assert model(torch.randn(2, 1, 32, 48)).shape == (2, 4, 32, 48)


def test_vnet_shapes_and_parameter_count():
    """UA-MT's V-Net, counted by hand: a conv with its BN has in * out * k^3 + out weights and 2 * out
    BN parameters; a transposed conv the same. Encoder 1, 2, 3, 3, 3 convs, decoder 3, 3, 2, 1."""
    def conv(i, o, k=3):
        return i * o * k ** 3 + o + 2 * o
    encoder = conv(1, 16) + 2 * conv(32, 32) + 3 * conv(64, 64) + 3 * conv(128, 128) + 3 * conv(256, 256)
    resample = sum(conv(c, 2 * c, 2) + conv(2 * c, c, 2) for c in (16, 32, 64, 128))  # down and up
    decoder = 3 * conv(128, 128) + 3 * conv(64, 64) + 2 * conv(32, 32) + conv(16, 16)
    head = 16 * 2 + 2
    model = bcp.VNet(num_classes=2)
    assert sum(p.numel() for p in model.parameters()) == encoder + resample + decoder + head == 9_448_866
    assert model(torch.randn(2, 1, 32, 16, 48)).shape == (2, 2, 32, 16, 48)


def test_vnet_dropout_only_in_training_mode():
    model = bcp.VNet().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.equal(first, model(x))


def test_ema_decay_zero_copies_and_one_keeps():
    torch.manual_seed(0)
    student, teacher = bcp.UNet(), bcp.UNet()
    student(torch.randn(2, 1, 16, 16))  # move the student's BN running statistics away from init
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    bcp.ema_update(teacher, student, decay=1.0)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    bcp.ema_update(teacher, student, decay=0.0)
    for key, value in teacher.state_dict().items():
        if value.is_floating_point():  # weights and BN running statistics; not the batch counter
            assert torch.equal(value, student.state_dict()[key]), key


def test_ema_averages_parameters():
    """decay 0.99: teacher = 0.99 * teacher + 0.01 * student."""
    student, teacher = bcp.UNet(), bcp.UNet()
    expected = 0.99 * teacher.head.weight.detach() + 0.01 * student.head.weight.detach()
    bcp.ema_update(teacher, student, decay=0.99)
    torch.testing.assert_close(teacher.head.weight.detach(), expected)


@pytest.mark.parametrize("centered", [False, True])
def test_mask_area(centered):
    """beta = 2/3 on 12 x 15: a zero rectangle of 8 x 10, ones elsewhere."""
    mask = bcp.keep_mask((12, 15), beta=2 / 3, centered=centered, generator=torch.Generator().manual_seed(3))
    zeros = torch.nonzero(mask == 0)
    assert set(mask.unique().tolist()) == {0.0, 1.0} and len(zeros) == 8 * 10
    assert (zeros.max(0).values - zeros.min(0).values + 1).tolist() == [8, 10]


def test_centered_mask_position():
    """beta = 0.5 on 12 x 12: the 6 x 6 hole spans rows and columns 3..8."""
    mask = bcp.keep_mask((12, 12), beta=0.5, centered=True)
    assert (mask[3:9, 3:9] == 0).all() and mask.sum() == 144 - 36


def test_random_mask_position_as_the_authors_draw_it():
    """The authors draw the corner with np.random.randint(0, H - h), upper end excluded. At 256 px with
    beta = 2/3 the crop is 170 px, so rows and columns 0..85 (never 86); a 2 x 2 hole in 4 x 4 sits at
    rows and columns 0..1 (never 2)."""
    generator = torch.Generator().manual_seed(0)
    corners = torch.tensor([torch.nonzero(bcp.keep_mask((256, 256), 2 / 3, generator=generator) == 0)[0].tolist()
                            for _ in range(3000)])
    assert corners.min().item() == 0 and corners.max(0).values.tolist() == [85, 85]
    small = {tuple(torch.nonzero(bcp.keep_mask((4, 4), 0.5, generator=generator) == 0)[0].tolist()) for _ in range(300)}
    assert small == {(r, c) for r in range(2) for c in range(2)}


def test_la_mask_box_and_corners_as_the_authors_draw_them():
    """112 x 112 x 80 with beta 2/3: a zero box of 74 x 74 x 53 at randint(0, 38), randint(0, 38),
    randint(0, 27): corners 0..37, 0..37, 0..26."""
    generator = torch.Generator().manual_seed(0)
    corners = []
    for _ in range(600):
        mask = bcp.keep_mask((112, 112, 80), generator=generator)
        zero = mask == 0
        assert zero.sum() == 74 * 74 * 53
        corners.append([int(zero.any(dim=[a for a in range(3) if a != axis]).int().argmax()) for axis in range(3)])
    corners = torch.tensor(corners)
    assert corners.min().item() == 0 and corners.max(0).values.tolist() == [37, 37, 26]


def test_bidirectional_copy_paste_eq_1_to_4():
    """On 1 x 2 x 2 images with M = [[1, 0], [1, 1]]: the inward image keeps the unlabeled pixels
    where M = 1 and takes the labeled pixel where M = 0, the outward image the other way round.
    The mixed targets follow the same rule and stay integer; M + (1 - M) = 1 everywhere."""
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    labeled, unlabeled = torch.full((1, 1, 2, 2), 7.0), torch.full((1, 1, 2, 2), 3.0)
    x_in = bcp.copy_paste(unlabeled, labeled, mask)  # Eq. 1
    x_out = bcp.copy_paste(labeled, unlabeled, mask)  # Eq. 2
    assert x_in.flatten().tolist() == [3, 7, 3, 3] and x_out.flatten().tolist() == [7, 3, 7, 7]
    gt, pseudo = torch.tensor([[[1, 2], [3, 1]]]), torch.tensor([[[0, 3], [2, 2]]])
    y_in = bcp.copy_paste(pseudo, gt, mask)  # Eq. 3
    y_out = bcp.copy_paste(gt, pseudo, mask)  # Eq. 4
    assert y_in.dtype == torch.long and y_in.tolist() == [[[0, 2], [2, 2]]] and y_out.tolist() == [[[1, 3], [3, 1]]]
    assert torch.equal(x_in + x_out, labeled + unlabeled)


def test_mixed_loss_by_hand():
    """2 classes, logits 0 (p = 1/2 everywhere), target [[0, 1], [1, 1]], M = [[1, 1], [0, 0]],
    weight 1 on the top row (M = 1) and alpha = 0.5 on the bottom row (M = 0).
    Top row: CE = ln 2; Dice class 0 = 1 - 2*0.5/(0.5 + 1) = 1/3, class 1 the same: mean 1/3.
    Bottom row: CE = ln 2; Dice class 0 = 1 - eps/(0.5 + eps) ~ 1, class 1 = 1 - 2*1/(0.5 + 2) = 0.2: mean 0.6.
    Loss = (1/3 + ln 2 + 0.5 * (0.6 + ln 2)) / 2."""
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [1, 1]]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss = bcp.mixed_loss(logits, target, mask, weight_base=1.0, weight_pasted=0.5)
    expected = (1 / 3 + math.log(2) + 0.5 * (0.6 + math.log(2))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_perfect_prediction_has_near_zero_loss():
    target = torch.randint(4, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    logits = 50.0 * torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    mask = bcp.keep_mask((8, 8), centered=True)
    assert bcp.mixed_loss(logits, target, mask, 1.0, 0.5).item() < 1e-6


def test_zero_weight_region_gets_no_gradient():
    """With weight 0 on the pasted region (M = 0), its logits receive no gradient, the rest do."""
    logits = torch.randn(1, 4, 6, 6, requires_grad=True)
    mask = bcp.keep_mask((6, 6), beta=0.5, centered=True)
    bcp.mixed_loss(logits, torch.randint(4, (1, 6, 6)), mask, weight_base=1.0, weight_pasted=0.0).backward()
    grad = logits.grad.abs().sum(1)[0]
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] > 0).all()


def test_la_and_acdc_dice_losses_by_hand():
    """Two crops of 1 x 1 x 2 voxels, logits 0 (p = 1/2), targets [1, 1] and [0, 1], the whole crop.
    LA (per crop and class, p): crop 1 class 0 ~ 0, class 1 2/3; crop 2 both classes 1/2:
    loss 1 - (0 + 2/3 + 1/2 + 1/2) / 4. ACDC (sums over the batch, p^2): class 0 2 * 0.5 / (1 + 1),
    class 1 2 * 1.5 / (1 + 3): loss 1 - (0.5 + 0.75) / 2. CE is ln 2 either way."""
    logits, target = torch.zeros(2, 2, 1, 1, 2), torch.tensor([[[[1, 1]]], [[[0, 1]]]])
    everywhere = torch.ones(1, 1, 2)
    la = bcp.mixed_loss(logits, target, everywhere, 1.0, 0.0, dice_loss=bcp.la_dice_loss)
    acdc = bcp.mixed_loss(logits, target, everywhere, 1.0, 0.0, dice_loss=bcp.acdc_dice_loss)
    assert la.item() == pytest.approx((1 - (2 / 3 + 1 / 2 + 1 / 2) / 4 + math.log(2)) / 2, abs=1e-5)
    assert acdc.item() == pytest.approx((1 - (0.5 + 0.75) / 2 + math.log(2)) / 2, abs=1e-6)


def test_la_dice_in_a_region_by_hand():
    """One crop of 1 x 1 x 3, p1 = (0.2, 0.6, 0.9), target (0, 1, 1), region (1, 1, 0): only the
    first two voxels count. Class 1: (2 * 0.6) / (0.8 + 1); class 0: (2 * 0.8) / (1.2 + 1).
    CE in the region: mean of -ln 0.8 and -ln 0.6."""
    p1 = torch.tensor([0.2, 0.6, 0.9])
    logits = torch.stack([torch.zeros(3), torch.log(p1 / (1 - p1))]).view(1, 2, 1, 1, 3)
    target, region = torch.tensor([0, 1, 1]).view(1, 1, 1, 3), torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 3)
    loss = bcp.mixed_loss(logits, target, region, weight_base=1.0, weight_pasted=0.0, dice_loss=bcp.la_dice_loss)
    dice = (2 * 0.6 / 1.8 + 2 * 0.8 / 2.2) / 2
    assert loss.item() == pytest.approx((1 - dice - (math.log(0.8) + math.log(0.6)) / 2) / 2, abs=1e-5)


def test_pseudo_label_per_class():
    """Class 1 wins on two separate blobs (3 px and 1 px), class 2 on one: the 1-px blob of class 1
    becomes background, everything else keeps its argmax."""
    prediction = torch.tensor([[[1, 1, 0, 2],
                                [1, 0, 0, 2],
                                [0, 0, 0, 0],
                                [0, 0, 0, 1]]])
    logits = torch.nn.functional.one_hot(prediction, 4).permute(0, 3, 1, 2).float()
    expected = prediction.clone()
    expected[0, 3, 3] = 0
    assert torch.equal(bcp.pseudo_label(logits), expected)


def test_pseudo_label_3d_joins_through_corners():
    """Voxels (0, 0, 0), (1, 1, 1), (2, 2, 2) touch only at corners: one component of 3 in 26-connectivity,
    kept; a block of 2 voxels elsewhere is dropped."""
    prediction = torch.zeros(1, 5, 5, 5, dtype=torch.long)
    for i in range(3):
        prediction[0, i, i, i] = 1
    prediction[0, 4, 0, 3:5] = 1
    logits = torch.nn.functional.one_hot(prediction, 2).movedim(-1, 1).float()
    expected = prediction.clone()
    expected[0, 4, 0, 3:5] = 0
    assert torch.equal(bcp.pseudo_label(logits), expected)


def tiny_run(flags, labeled, unlabeled, device="cpu"):
    """What train.main hands a step: flags, models, SGD and the two slice banks."""
    args = train.parse_args(flags)
    student, teacher = bcp.UNet().to(device), bcp.UNet().to(device).requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=args.momentum)
    return SimpleNamespace(args=args, device=torch.device(device), autocast=nullcontext(), optimizer=optimizer,
                           student=student, teacher=teacher, student_forward=student, teacher_forward=teacher,
                           labeled=labeled, unlabeled=unlabeled, unlabeled_truth=True, dice_loss=bcp.DICE_LOSSES[args.dice_loss])


def selftrain_run(synthetic_root, mix="bidirectional"):
    """What a self-train step gets, student and teacher fresh (seed 0) and in eval mode (no dropout), so
    that every --mix sees the same outputs."""
    banks = [data.Dataset(synthetic_root).bank(names, "cpu") for names in data.Dataset(synthetic_root).cases(2)[:2]]
    torch.manual_seed(0)
    run = tiny_run([*TINY, "--phase", "selftrain", "--mix", mix], *banks)
    run.student.eval(), run.teacher.eval()
    return run


def step_draws(run, step):
    """A step's L_a, L_b, their ground truth G_a, G_b, U_a, U_b, the teacher's P_a, P_b, and M."""
    args = run.args
    (l_a, l_b), (g_a, g_b) = train.draw_halves(run.labeled, step, args.labeled_batch_size, args, train.LABELED)
    (u_a, u_b), _ = train.draw_halves(run.unlabeled, step, args.batch_size - args.labeled_batch_size, args, train.UNLABELED)
    with torch.no_grad():
        p_a, p_b = bcp.pseudo_label(torch.cat([run.teacher(u_a), run.teacher(u_b)])).chunk(2)
    return l_a, l_b, g_a, g_b, u_a, u_b, p_a, p_b, train.draw_mask(step, args, "cpu")


@pytest.mark.slow
def test_bidirectional_loss_is_the_papers(synthetic_root):
    """The default's loss equals Eq. 1-4 and 6 written out on the step's own draws: X_in with alpha on
    its pseudo-labeled base region, X_out with alpha on its pseudo-labeled pasted region."""
    run = selftrain_run(synthetic_root)
    l_a, l_b, g_a, g_b, u_a, u_b, p_a, p_b, m = step_draws(run, 3)
    with torch.no_grad():
        inward = bcp.mixed_loss(run.student(u_a * m + l_a * (1 - m)), p_a * m.long() + g_a * (1 - m.long()), m, 0.5, 1.0)
        outward = bcp.mixed_loss(run.student(l_b * m + u_b * (1 - m)), g_b * m.long() + p_b * (1 - m.long()), m, 1.0, 0.5)
    assert train.selftrain_step(run, 3)[0].item() == pytest.approx((inward + outward).item(), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["inward", "outward"])
def test_one_way_variants_mix_both_halves_their_way(synthetic_root, mix):
    """A one-way --mix shows the student as many images a step as BCP (half a and half b, 1 + 1 here),
    each half mixed in the one direction: inward U * M + L * (1 - M) with target P * M + G * (1 - M),
    alpha on the base; outward L * M + U * (1 - M) with target G * M + P * (1 - M), alpha on the crop."""
    def images_seen(run):
        seen, student = [], run.student_forward
        run.student_forward = lambda x: seen.append(len(x)) or student(x)
        return seen

    default = selftrain_run(synthetic_root)
    default_seen = images_seen(default)
    train.selftrain_step(default, 3)
    run = selftrain_run(synthetic_root, mix)
    l_a, l_b, g_a, g_b, u_a, u_b, p_a, p_b, m = step_draws(run, 3)
    expected = 0.0
    with torch.no_grad():
        for l, g, u, p in ((l_a, g_a, u_a, p_a), (l_b, g_b, u_b, p_b)):
            if mix == "inward":
                expected += bcp.mixed_loss(run.student(u * m + l * (1 - m)), p * m.long() + g * (1 - m.long()), m, 0.5, 1.0)
            else:
                expected += bcp.mixed_loss(run.student(l * m + u * (1 - m)), g * m.long() + p * (1 - m.long()), m, 1.0, 0.5)
    seen = images_seen(run)
    assert train.selftrain_step(run, 3)[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert seen == default_seen == [1, 1]


@pytest.mark.slow
def test_no_mixing_loss_by_hand(synthetic_root):
    """--mix none: the student sees U_a with its pseudo-label (weight alpha) and L_b with its ground
    truth (weight 1), whole images: alpha * (Dice + CE)(U_a) / 2 + (Dice + CE)(L_b) / 2, with Dice over
    the 4 classes of the whole batch and CE the mean over pixels."""
    run = selftrain_run(synthetic_root, "none")
    _, l_b, _, g_b, u_a, _, p_a, _, _ = step_draws(run, 3)

    def dice_plus_ce(logits, target):
        probs, one_hot = logits.softmax(1), torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
        dice = 1 - (2 * (probs * one_hot).sum((0, 2, 3)) + 1e-10) / ((probs ** 2).sum((0, 2, 3)) + one_hot.sum((0, 2, 3)) + 1e-10)
        return dice.mean() + torch.nn.functional.cross_entropy(logits, target)

    with torch.no_grad():
        expected = 0.5 * dice_plus_ce(run.student(u_a), p_a) / 2 + dice_plus_ce(run.student(l_b), g_b) / 2
    assert train.selftrain_step(run, 3)[0].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_pseudo_label_dice_is_against_the_unlabeled_images_true_labels(synthetic_root):
    """The step's diagnostic: per foreground class, 2 |P & T| / (|P| + |T|) over the step's unlabeled
    images (P the teacher's pseudo-labels, T the labels the loss never sees; 0 for a class P misses),
    averaged over classes. Without true labels (your own unlabeled scans) there is none."""
    run = selftrain_run(synthetic_root)
    args = run.args
    (u_a, u_b), (t_a, t_b) = train.draw_halves(run.unlabeled, 3, args.batch_size - args.labeled_batch_size, args, train.UNLABELED)
    with torch.no_grad():
        pseudo = torch.cat([bcp.pseudo_label(run.teacher(u_a)), bcp.pseudo_label(run.teacher(u_b))])
    truth = torch.cat([t_a, t_b])
    by_hand = [2 * ((pseudo == c) & (truth == c)).sum().item() / ((pseudo == c).sum() + (truth == c).sum()).item()
               if (pseudo == c).any() else 0.0 for c in (1, 2, 3)]
    assert train.selftrain_step(run, 3)[2].item() == pytest.approx(sum(by_hand) / 3, abs=1e-6)
    run.unlabeled_truth = False
    assert train.selftrain_step(run, 4)[2] is None


def step_setup(root, flags, phase, out, device="cpu"):
    """What train.main builds for a phase, from the data on disk: flags, banks, and models from
    build_models (self-training from a pre-training checkpoint of seed-0 weights written here). The
    teacher is then moved off the student (noise drawn on the CPU), so that the EMA's two sides differ."""
    device = torch.device(device)
    args = train.parse_args(["--root", str(root), *flags, "--phase", phase, "--out", str(out), "--device", str(device)])
    labeled, unlabeled, _, _, _ = train.load_data(args, device)
    torch.manual_seed(0)
    network = bcp.NETWORKS[args.dataset.plan.dims]
    (out / "pretrain").mkdir(parents=True, exist_ok=True)
    torch.save({"model": network(num_classes=args.num_classes).state_dict()}, out / "pretrain" / "best.pt")
    folder = SimpleNamespace(log=lambda message: None, last_path=out / phase / "last.pt")
    student, teacher, optimizer, _ = train.build_models(args, device, torch.preserve_format, None, folder)
    if teacher is not None:
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for weight in teacher.parameters():
                weight.add_(0.01 * torch.randn(weight.shape, generator=noise).to(device))
    return SimpleNamespace(args=args, device=device, autocast=nullcontext(), optimizer=optimizer,
                           student=student, teacher=teacher, student_forward=student, teacher_forward=teacher,
                           labeled=labeled, unlabeled=unlabeled, unlabeled_truth=True,
                           dice_loss=bcp.DICE_LOSSES[args.dice_loss])


def sgd_step_copy(run):
    """A copy of the student and of its SGD (same state), to take the reference step with."""
    student = copy.deepcopy(run.student)
    optimizer = torch.optim.SGD(student.parameters(), lr=run.args.lr, momentum=run.args.momentum,
                                weight_decay=run.args.weight_decay)
    optimizer.load_state_dict(run.optimizer.state_dict())
    return student, optimizer


def assert_same_weights(model, expected, rtol=1e-6):
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[key], rtol=rtol, atol=1e-7, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["acdc", "la"])
def test_a_selftrain_step_is_one_sgd_step_on_the_papers_loss_then_one_ema_update(layout, synthetic_root, la_root, tmp_path):
    """From known weights: build_models leaves the teacher in train mode (dropout on, batch statistics,
    as the authors); then one step. Recomputed here from the step's draws with the same dropout draws:
    P_a, P_b = the teacher's pseudo-labels; X_in = U_a * M + L_a * (1 - M) against P_a * M + G_a * (1 - M),
    alpha on M; X_out = L_b * M + U_b * (1 - M) against G_b * M + P_b * (1 - M), alpha on 1 - M (Eq. 1-4,
    6); one SGD step on their sum; then every float tensor of the teacher = 0.99 * (the teacher after its
    forwards, whose BN statistics moved) + 0.01 * the new student."""
    root, flags = (synthetic_root, TINY) if layout == "acdc" else (la_root, LA_TINY)
    run = step_setup(root, flags, "selftrain", tmp_path)
    assert all(module.training for module in run.teacher.modules())
    assert not any(weight.requires_grad for weight in run.teacher.parameters())
    student, optimizer = sgd_step_copy(run)
    teacher = copy.deepcopy(run.teacher)
    args, alpha = run.args, run.args.u_weight

    torch.manual_seed(5)
    loss = train.selftrain_step(run, 3)[0]

    torch.manual_seed(5)
    (l_a, l_b), (g_a, g_b) = train.draw_halves(run.labeled, 3, args.labeled_batch_size, args, train.LABELED)
    (u_a, u_b), _ = train.draw_halves(run.unlabeled, 3, args.batch_size - args.labeled_batch_size, args, train.UNLABELED)
    m = train.draw_mask(3, args, "cpu")
    with torch.no_grad():
        p_a, p_b = bcp.pseudo_label(teacher(u_a)), bcp.pseudo_label(teacher(u_b))
    expected = (bcp.mixed_loss(student(u_a * m + l_a * (1 - m)), p_a * m.long() + g_a * (1 - m.long()), m, alpha, 1.0, run.dice_loss)
                + bcp.mixed_loss(student(l_b * m + u_b * (1 - m)), g_b * m.long() + p_b * (1 - m.long()), m, 1.0, alpha, run.dice_loss))
    optimizer.zero_grad()
    expected.backward()
    optimizer.step()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert_same_weights(run.student, student.state_dict())
    new_student = student.state_dict()
    assert_same_weights(run.teacher, {key: 0.99 * value + 0.01 * new_student[key] if value.is_floating_point() else value
                                      for key, value in teacher.state_dict().items()})
    assert all(module.training for module in run.teacher.modules())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["acdc", "la"])
@pytest.mark.parametrize("phase", ["pretrain", "supervised"])
def test_pretrain_and_supervised_losses_by_formula(layout, phase, synthetic_root, la_root, tmp_path):
    """Recomputed from the step's draws with the same dropout draws. Pre-training: the student on
    L_a * M + L_b * (1 - M) against G_a * M + G_b * (1 - M), ACDC one term per region of M (both weighted
    1), LA the whole crop one region; supervised: the labeled batch whole. Then one SGD step on it."""
    root, flags = (synthetic_root, TINY) if layout == "acdc" else (la_root, LA_TINY)
    run = step_setup(root, flags, phase, tmp_path)
    student, optimizer = sgd_step_copy(run)
    args = run.args
    torch.manual_seed(5)
    loss = train.STEPS[phase](run, 3)[0]
    torch.manual_seed(5)
    if phase == "pretrain":
        (l_a, l_b), (g_a, g_b) = train.draw_halves(run.labeled, 3, args.labeled_batch_size, args, train.LABELED)
        m = train.draw_mask(3, args, "cpu")
        images, target = l_a * m + l_b * (1 - m), g_a * m.long() + g_b * (1 - m.long())
    else:
        images, target = train.draw_batch(run.labeled, 3, args.batch_size, args, train.LABELED)
    everywhere = torch.ones(target.shape[1:])
    if phase == "pretrain" and layout == "acdc":
        expected = bcp.mixed_loss(student(images), target, m, 1.0, 1.0, bcp.acdc_dice_loss)
    else:
        expected = bcp.mixed_loss(student(images), target, everywhere, 1.0, 0.0, run.dice_loss)
    optimizer.zero_grad()
    expected.backward()
    optimizer.step()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert_same_weights(run.student, student.state_dict())


# ----------------------------------------------------------------------------- components: bcp.largest_component and keep_largest_components

def test_largest_component_hand_drawn():
    """Blob A (3 pixels, top left), blob B (2 x 2 square plus a pixel touching it diagonally = 5
    pixels, 8-connectivity), and a lone pixel. Only B survives."""
    drawing = ["##...",
               "#..##",
               "...##",
               "..#..",
               "#...."]
    mask = torch.tensor([[ch == "#" for ch in row] for row in drawing])
    expected = torch.zeros_like(mask)
    expected[1:3, 3:5], expected[3, 2] = True, True
    assert torch.equal(bcp.largest_component(mask[None])[0], expected)


def test_largest_component_tie_goes_to_first_in_raster_order():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 3, 0:2], mask[0, 0, 2:4] = True, True  # two blobs of 2: the one in row 0 comes first
    kept = bcp.largest_component(mask)[0]
    assert kept[0, 2:4].all() and kept.sum() == 2


def test_largest_component_matches_scipy_label():
    masks = np.stack([random_blobs((24, 31), seed, threshold=0.5) for seed in range(8)])
    masks[0] = False  # an empty slice stays empty
    kept = bcp.largest_component(torch.from_numpy(masks)).numpy()
    for mask, ours in zip(masks, kept):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        expected = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1) if count else mask
        np.testing.assert_array_equal(ours, expected)


def test_largest_component_3d_matches_scipy_label():
    """26-connected components of random 3D masks near the percolation threshold, as scipy.ndimage.label
    with a full 3 x 3 x 3 structure, the largest kept; an empty volume stays empty."""
    masks = np.random.default_rng(5).random((4, 18, 15, 12)) < 0.2
    masks[1] = False
    kept = bcp.largest_component(torch.from_numpy(masks)).numpy()
    for mask, ours in zip(masks, kept):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        expected = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1) if count else mask
        np.testing.assert_array_equal(ours, expected)


def test_largest_component_matches_scipy_near_the_percolation_threshold():
    """Random pixels at density 0.45 on 96 x 96: hundreds of tangled components per slice."""
    masks = np.random.default_rng(3).random((4, 96, 96)) < 0.45
    kept = bcp.largest_component(torch.from_numpy(masks)).numpy()
    for mask, ours in zip(masks, kept):
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
        np.testing.assert_array_equal(ours, labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def serpentine(size):
    """A one-pixel-wide path snaking down a size x size slice: rows 0, 2, 4, ... joined at alternate ends."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[::2, :] = True
    for row in range(1, size - 1, 2):
        mask[row, size - 1 if row % 4 == 1 else 0] = True
    return mask


def test_largest_component_of_a_long_snake():
    """A serpentine through a 21 x 21 slice (one component of 231 pixels) must be found whole, also
    with a pixel that joins two of its rows in the middle."""
    mask = serpentine(21)[None]
    assert torch.equal(bcp.largest_component(mask), mask)
    mask[0, 1, 5] = True  # touches rows 0 and 2: still one component
    assert torch.equal(bcp.largest_component(mask), mask)


@pytest.mark.parametrize("turn", ["none", "flip", "transpose", "both"])
def test_components_take_few_rounds_on_a_long_snake(turn, monkeypatch):
    """A 256 x 256 serpentine is one path of 33,000 pixels. Spreading the smallest label from neighbour
    to neighbour needs hundreds of rounds on it (262 for the unturned one); hooking whole trees with
    pointer jumping needs a handful, whichever way the path runs through raster order."""
    mask = serpentine(256)
    mask = {"none": mask, "flip": mask.flip(1), "transpose": mask.T, "both": mask.T.flip(0)}[turn].contiguous()
    rounds = []
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: rounds.append(1) or equal(a, b))  # one check per round
    kept = bcp.largest_component(mask[None])[0]
    assert 1 <= len(rounds) <= 12 and equal(kept, mask)


# ----------------------------------------------------------------------------- metrics: Dice, Jaccard, surfaces, distances, HD95, ASD, and a volume's scores

def square(shape=(20, 20), top=5, left=5, size=8):
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_dice_and_jaccard_by_hand():
    """P = 8x8 square, G = the same square 2 rows lower: overlap 6*8 = 48, |P| = |G| = 64.
    Dice = 96 / 128 = 0.75, Jaccard = 48 / 80 = 0.6."""
    pred, gt = square(top=5), square(top=7)
    assert bcp.dice(pred, gt) == pytest.approx(0.75)
    assert bcp.jaccard(pred, gt) == pytest.approx(0.6)


def test_empty_masks_dice_jaccard():
    """Two empty masks agree perfectly (1.0); an empty prediction of a non-empty target scores 0."""
    empty = np.zeros((4, 4), dtype=bool)
    assert bcp.dice(empty, empty) == 1.0 and bcp.jaccard(empty, empty) == 1.0
    assert bcp.dice(empty, square((4, 4), 0, 0, 2)) == 0.0


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\)"):
        bcp.dice(np.zeros((3, 4)), np.zeros((3, 5)))


def test_surface_counts_the_array_border():
    """A mask filling a 5x5 array: the 16 border pixels are surface, the 9 inner ones are not."""
    full = np.ones((5, 5), dtype=bool)
    assert bcp.surface(full).sum() == 16 and not bcp.surface(full)[1:-1, 1:-1].any()


@pytest.mark.parametrize("shape", [(1,), (37,), (1, 1), (13, 9), (30, 41), (1, 6, 5), (7, 30, 26), (9, 23, 17)])
@pytest.mark.parametrize("density", [0.002, 0.05, 0.5, 1.0])
def test_nearest_distances_equal_scipy_edt(shape, density):
    """Distances from every voxel, and from a random subset, to random features of several densities,
    with and without spacing: equal to scipy.ndimage.distance_transform_edt."""
    rng = np.random.default_rng(len(shape) * 100 + int(density * 1000))
    features = rng.random(shape) < density
    features.flat[rng.integers(features.size)] = True
    for spacing in ((1.0,) * len(shape), tuple(rng.uniform(0.4, 3.0, len(shape)))):
        expected = ndimage.distance_transform_edt(~features, sampling=spacing)
        everywhere = np.ones(shape, bool)
        np.testing.assert_allclose(bcp.nearest_distances(everywhere, features, spacing), expected.ravel(), atol=1e-9)
        some = rng.random(shape) < 0.1
        some.flat[0] = True
        np.testing.assert_allclose(bcp.nearest_distances(some, features, spacing), expected[some], atol=1e-9)


@pytest.mark.parametrize("name,features", [
    ("one voxel in a corner", lambda: np.pad(np.ones((1, 1, 1), bool), ((0, 8), (0, 40), (0, 33)))),
    ("full mask", lambda: np.ones((5, 20, 21), bool)),
    ("a one-voxel line", lambda: np.pad(np.ones((1, 60, 1), bool), ((2, 3), (0, 0), (17, 30)))),
    ("a diagonal", lambda: np.eye(64, dtype=bool)[None].repeat(3, 0)),
    ("a far pair", lambda: np.pad(np.ones((1, 1, 1), bool), ((0, 5), (0, 70), (0, 70))) | np.pad(np.ones((1, 1, 1), bool), ((5, 0), (70, 0), (70, 0)))),
])
def test_nearest_distances_on_special_shapes(name, features):
    """A single feature voxel, a full mask, long thin shapes and two far-apart voxels, with queries
    everywhere: equal to scipy."""
    features = features()
    for spacing in ((1.0, 1.0, 1.0), (5.0, 1.25, 0.7)):
        expected = ndimage.distance_transform_edt(~features, sampling=spacing) if not features.all() else np.zeros(features.shape)
        ours = bcp.nearest_distances(np.ones(features.shape, bool), features, spacing)
        np.testing.assert_allclose(ours, expected.ravel(), atol=1e-9, err_msg=name)


def test_nearest_distances_second_search_is_exact(monkeypatch):
    """Queries along a 12-voxel bar, one feature just past its end and one far away. The first search
    (3 voxels around the queries' box) leaves the far feature out and finds distances up to 12 for the
    bar's other end, above its radius: the second search, with that distance as the radius, must run
    and give scipy's distances."""
    queries = np.zeros((6, 50, 50), bool)
    queries[0:2, 0:12, 0:2] = True  # a 2 x 12 x 2 bar
    features = np.zeros_like(queries)
    features[0, 13, 0] = True  # 1 voxel past the bar's end, 12 from its other end
    features[5, 49, 49] = True  # far outside the first search's box
    calls = []
    search = bcp.squared_distances
    monkeypatch.setattr(bcp, "squared_distances", lambda *args: calls.append(args[3]) or search(*args))
    ours = bcp.nearest_distances(queries, features, (1.0, 1.0, 1.0))
    expected = ndimage.distance_transform_edt(~features)[queries]
    assert len(calls) == 2 and calls[1] > calls[0]
    np.testing.assert_allclose(ours, expected, atol=1e-9)


def test_hd95_of_a_shifted_square_is_the_shift():
    """Shifting a square by 2 pixels moves the top and bottom edges by exactly 2 and no surface
    point further: the largest distance is 2 and more than 5% of the distances equal it."""
    assert bcp.hd95(square(top=5), square(top=7)) == pytest.approx(2.0)


def test_single_points_distance_by_hand():
    """One voxel at (0, 0), one at (3, 4): every distance is 5; with spacing (2, 1) it is sqrt(36 + 16)."""
    pred, gt = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    pred[0, 0], gt[3, 4] = True, True
    assert bcp.hd95(pred, gt) == pytest.approx(5.0)
    assert bcp.asd(pred, gt) == pytest.approx(5.0)
    assert bcp.hd95(pred, gt, spacing=(2, 1)) == pytest.approx(math.sqrt(52))


def test_asd_is_one_directional():
    """A 1-voxel prediction inside a big square: its distance to the square's surface is 3 (one
    direction only), while the square's surface is further from the single voxel on average."""
    gt = square(size=7, top=2, left=2)  # rows/cols 2..8, centre (5, 5)
    pred = np.zeros_like(gt)
    pred[5, 5] = True
    assert bcp.asd(pred, gt) == pytest.approx(3.0)
    assert bcp.asd(gt, pred) > 3.0


def test_empty_side_raises_naming_it():
    empty, mask = np.zeros((5, 5), bool), square((5, 5), 1, 1, 2)
    with pytest.raises(ValueError, match="prediction"):
        bcp.hd95(empty, mask)
    with pytest.raises(ValueError, match="ground truth"):
        bcp.asd(mask, empty)


def reference_surface_distances(pred, gt, spacing=None):
    """medpy.metric.binary.__surface_distances, on scipy."""
    cross = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_border = pred ^ ndimage.binary_erosion(pred, structure=cross, iterations=1)
    gt_border = gt ^ ndimage.binary_erosion(gt, structure=cross, iterations=1)
    return ndimage.distance_transform_edt(~gt_border, sampling=spacing)[pred_border]


def reference_metrics(pred, gt, spacing=None):
    pred_to_gt = reference_surface_distances(pred, gt, spacing)
    gt_to_pred = reference_surface_distances(gt, pred, spacing)
    overlap = np.logical_and(pred, gt).sum()
    return {"dice": 2 * overlap / (pred.sum() + gt.sum()), "jaccard": overlap / np.logical_or(pred, gt).sum(),
            "hd95": np.percentile(np.hstack([pred_to_gt, gt_to_pred]), 95), "asd": pred_to_gt.mean()}


@pytest.mark.parametrize("shape,spacing", [((40, 36), None), ((40, 36), (1.5, 0.7)),
                                           ((7, 30, 26), None), ((7, 30, 26), (5.0, 1.25, 1.25))])
def test_metrics_match_scipy_reference(shape, spacing):
    """Random blobs in 2D and 3D, with and without voxel spacing: equal to medpy's definitions to 1e-6."""
    for seed in range(3):
        pred, gt = random_blobs(shape, seed), random_blobs(shape, seed + 100)
        ours, reference = bcp.binary_metrics(pred, gt, spacing), reference_metrics(pred, gt, spacing)
        for name in reference:
            assert ours[name] == pytest.approx(reference[name], abs=1e-6), name
        assert bcp.hd95(pred, gt, spacing) == pytest.approx(reference["hd95"], abs=1e-6)
        assert bcp.asd(pred, gt, spacing) == pytest.approx(reference["asd"], abs=1e-6)


@pytest.mark.parametrize("spacing", [None, (5.0, 1.25, 1.25)])
def test_metrics_of_scattered_false_positives_match_the_reference(spacing):
    """A weak model: a blob volume with 2% of its voxels flipped at random, against the blob. The
    false positives spread the surfaces over the whole volume; HD95 and ASD still equal medpy's
    definitions."""
    rng = np.random.default_rng(5)
    gt = random_blobs((8, 48, 44), 11, threshold=0.6)
    pred = gt ^ (rng.random(gt.shape) < 0.02)
    ours, reference = bcp.binary_metrics(pred, gt, spacing), reference_metrics(pred, gt, spacing)
    for name in reference:
        assert ours[name] == pytest.approx(reference[name], abs=1e-9), name


def test_metrics_do_not_modify_inputs():
    pred = random_blobs((12, 12), 1).astype(np.uint8) * 3  # non-boolean input too
    gt = random_blobs((12, 12), 2)
    pred_copy, gt_copy = pred.copy(), gt.copy()
    bcp.binary_metrics(pred, gt, spacing=(2, 1))
    bcp.dice(pred, gt), bcp.jaccard(pred, gt), bcp.hd95(pred, gt), bcp.asd(pred, gt)
    np.testing.assert_array_equal(pred, pred_copy)
    np.testing.assert_array_equal(gt, gt_copy)


NAN = float("nan")


def test_dice_per_class_by_scoring():
    """Validation's Dice: a class in neither volume is 0 (paper) or NaN (nnU-Net, left out); one in the
    reference alone, or in the prediction alone, is 0 under both."""
    label, prediction = torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)
    label[:2, :2], prediction[:2, :1] = 1, 1  # class 1: Dice 2 * 2 / (4 + 2)
    label[3, 3], prediction[0, 3] = 2, 3  # class 2 in the reference alone, 3 in the prediction alone, 4 in neither
    torch.testing.assert_close(bcp.dice_per_class(prediction, label, 5), torch.tensor([2 / 3, 0, 0, 0]))
    torch.testing.assert_close(bcp.dice_per_class(prediction, label, 5, "nnunet"), torch.tensor([2 / 3, 0, 0, NAN]), equal_nan=True)


@pytest.mark.parametrize("scoring", ["paper", "nnunet"])
def test_score_volume_by_hand_with_missing_classes(scoring):
    """Class 1 predicted exactly; class 2 missed: the paper's convention scores 0 on all four, nnU-Net's
    Dice and Jaccard 0 with HD95 and ASD undefined (NaN); class 3 predicted where the reference has none:
    Dice 0, HD95 and ASD undefined, under both, and no error; class 4 in neither: 0 (paper) or left out
    (nnU-Net: NaN on all four)."""
    label = np.zeros((2, 6, 6), np.uint8)
    label[:, 1:3, 1:3], label[:, 4:, 4:] = 1, 2
    prediction = label.copy()
    prediction[label == 2] = 0
    prediction[0, 0, 5] = 3
    scores = bcp.score_volume(prediction, label, 5, scoring=scoring)
    assert scores[0] == {"dice": 100.0, "jaccard": 100.0, "hd95": 0.0, "asd": 0.0, "case": "scored"}
    paper = scoring == "paper"
    expected = [{"dice": 0.0, "jaccard": 0.0, "hd95": 0.0 if paper else NAN, "asd": 0.0 if paper else NAN, "case": "empty prediction"},
                {"dice": 0.0, "jaccard": 0.0, "hd95": NAN, "asd": NAN, "case": "empty reference"},
                {**dict.fromkeys(bcp.METRICS, 0.0 if paper else NAN), "case": "empty prediction" if paper else "absent from both"}]
    for score, wanted in zip(scores[1:], expected):
        assert score["case"] == wanted["case"]
        np.testing.assert_array_equal([score[m] for m in bcp.METRICS], [wanted[m] for m in bcp.METRICS])


# ----------------------------------------------------------------------------- data: data.py's lists, h5 files, resampling, the training banks, checkpoints

def test_dataset_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = np.zeros((4, 4), np.float32), np.zeros((4, 5), np.uint8)
    with pytest.raises(data.DataError, match=r"bad\.h5.*\(4, 4\) and \(4, 5\)"):
        data.read_h5(path, 2, 4)
    with pytest.raises(data.DataError, match="train.list: missing"):
        data.read_list(tmp_path, "train.list")


def test_labeled_patients_without_slices_are_named(synthetic_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    first = (copy / "train.list").read_text().split()[0].split("_")[0]
    slices = (copy / "train_slices.list").read_text().split()
    (copy / "train_slices.list").write_text("".join(s + "\n" for s in slices if not s.startswith(first)))
    with pytest.raises(data.DataError, match=f"train_slices.list: no slices of the labeled patients \\['{first}'\\]"):
        data.Dataset(copy).cases(1)


def test_a_root_in_neither_layout_is_named_with_what_was_looked_for(la_root):
    """--root at the LA cases' folder (what UA-MT's scripts take): not an ACDC root with 3 patch numbers."""
    with pytest.raises(data.DataError, match=re.escape(f"{la_root / data.LA_FOLDER}: neither the ACDC layout (train.list, data/) "
                                                      f"nor the LA layout") + f".*its parent is an LA root: --root {re.escape(str(la_root))}"):
        train.parse_args(["--root", str(la_root / data.LA_FOLDER), "--patch-size", "32", "32", "16"])


@pytest.mark.slow
def test_a_case_listed_twice_or_in_two_splits_is_refused(la_root, synthetic_root, tmp_path):
    """A labeled LA case listed again among the last (validation) cases, a test case that is also a
    training case, an ACDC validation volume of a training patient: one line naming the list and the
    case, before anything is written."""
    la = tmp_path / "LA"
    shutil.copytree(la_root, la)
    cases = data.read_list(la, "train.list")
    (la / "train.list").write_text("\n".join(cases[:-1] + [cases[0]]) + "\n")
    with pytest.raises(data.DataError, match=re.escape(f"{la / 'train.list'}: {cases[0]} is listed twice")):
        train.main(["--root", str(la), *LA_TINY, "--out", str(tmp_path / "run"), "--phase", "pretrain", "--iterations", "1"])
    (la / "train.list").write_text("\n".join(cases) + "\n")
    (la / "test.list").write_text((la / "test.list").read_text() + cases[3] + "\n")
    with pytest.raises(data.DataError, match=re.escape(f"{la / 'test.list'}: {cases[3]} is also a training case")):
        train.main(["--root", str(la), *LA_TINY, "--out", str(tmp_path / "run"), "--phase", "pretrain", "--iterations", "1"])
    torch.save({"model": bcp.VNet().state_dict(), "flags": {"num_classes": 2, "patch_size": [32, 32, 16]}}, tmp_path / "v.pt")
    with pytest.raises(data.DataError, match="is also a training case"):
        evaluate.main(["--root", str(la), "--checkpoint", str(tmp_path / "v.pt")])
    acdc = tmp_path / "ACDC"
    shutil.copytree(synthetic_root, acdc)
    trained = data.read_list(acdc, "train.list")[2].replace("frame01", "frame02")
    (acdc / "val.list").write_text((acdc / "val.list").read_text() + trained + "\n")
    with pytest.raises(data.DataError, match=re.escape(f"{acdc / 'val.list'}: {trained} is also a training case")):
        train.main(["--root", str(acdc), *TINY, "--out", str(tmp_path / "run"), "--phase", "pretrain", "--iterations", "1"])
    assert prepare_acdc.check(acdc)[-1].endswith(f"{trained} is also a training case ({acdc / 'train.list'})")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_la_bad_input_is_named_and_nothing_is_written(la_root, tmp_path):
    broken = tmp_path / "LA"
    shutil.copytree(la_root, broken)
    (broken / "train.list").unlink()
    with pytest.raises(data.DataError, match=re.escape(str(broken / "train.list")) + ": missing list file"):
        train.main(["--root", str(broken), *LA_TINY, "--out", str(tmp_path / "run"), "--phase", "pretrain"])
    shutil.copy(la_root / "train.list", broken / "train.list")
    case = data.read_list(broken, "train.list")[1]
    path = broken / data.LA_FOLDER / case / "mri_norm2.h5"
    with h5py.File(path, "r+") as f:
        label = f["label"][()]
        del f["label"]
        f["label"] = label[:-1]
    with pytest.raises(data.DataError, match=re.escape(str(path)) + ": expected 3D image and label of one shape"):
        train.main(["--root", str(broken), *LA_TINY, "--out", str(tmp_path / "run"), "--phase", "pretrain"])
    assert not (tmp_path / "run").exists()
    with pytest.raises(data.DataError, match="5 labeled and 4 validation cases are more than its 8"):
        data.la_cases(la_root, 5, 4)


def write_h5(path, image, label):
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label


@pytest.mark.parametrize("image,label,message", [
    (np.array([[0.5, np.nan], [0.1, 0.2]], np.float32), np.zeros((2, 2), np.uint8), "1 NaN or infinite"),
    (np.ones((2, 2), np.float32), np.array([[0, 2.5], [1, 1]]), "whole numbers"),
    (np.ones((2, 2), np.float32), np.array([[0, 3], [1, 1]], np.uint8), r"0\.\.2 \(--num-classes 3\), got 0\.\.3"),
    (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.uint8), "empty image"),
    (np.array([[b"a", b"b"]]), np.zeros((1, 2), np.uint8), "must hold numbers"),
])
def test_read_h5_rejects_bad_arrays_naming_the_file(tmp_path, image, label, message):
    write_h5(tmp_path / "slice.h5", image, label)
    with pytest.raises(data.DataError, match=rf"slice\.h5: .*{message}"):
        data.read_h5(tmp_path / "slice.h5", 2, num_classes=3)


def test_read_h5_rejects_a_group_where_the_image_should_be(tmp_path):
    with h5py.File(tmp_path / "slice.h5", "w") as f:
        f.create_group("image")
        f["label"] = np.zeros((2, 2), np.uint8)
    with pytest.raises(data.DataError, match=r"slice\.h5: no 'image' array"):
        data.read_h5(tmp_path / "slice.h5", 2, 4)


def test_resize_nearest_matches_scipy_zoom():
    volume = np.random.default_rng(1).random((3, 19, 27)).astype(np.float32)
    ours = data.resize_nearest(torch.from_numpy(volume), 32, 32).numpy()
    np.testing.assert_array_equal(ours, ndimage.zoom(volume, (1, 32 / 19, 32 / 27), order=0))
    back = data.resize_nearest(torch.from_numpy(ours), 19, 27).numpy()
    np.testing.assert_array_equal(back, ndimage.zoom(ours, (1, 19 / 32, 27 / 32), order=0))


def test_rescaled_labels_are_scipy_zoom_order_0():
    """--scale 0.5 on an 11 x 9 x 8 label map: 6 x 4 x 4 (Python's round, as scipy's output shape), the
    voxels scipy.ndimage.zoom picks with order 0."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, (11, 9, 8)).astype(np.uint8)
    image, small = data.rescale(rng.random((11, 9, 8)).astype(np.float32), label, 0.5)
    assert image.shape == small.shape == (6, 4, 4)
    np.testing.assert_array_equal(small, ndimage.zoom(label, [n / s for n, s in zip(small.shape, label.shape)], order=0))


def test_resampled_labels_keep_their_values_at_equal_size_and_their_geometry_there_and_back():
    """Nearest neighbour as scipy's zoom (order 0), the identity at equal size; a ball and a smaller one
    beside it, resampled coarser and back, keep their place (Dice > 0.8 against the original)."""
    rng = np.random.default_rng(0)
    grid = np.indices((30, 26, 14))
    label = torch.from_numpy((((grid - np.array([14, 12, 7])[:, None, None, None]) ** 2).sum(0) < 36).astype(np.uint8))
    label[(((grid - np.array([4, 20, 7])[:, None, None, None]) ** 2).sum(0) < 9)] = 2
    assert torch.equal(data.resample_labels(label, label.shape), label)
    coarse = data.resample_labels(label, (24, 21, 11))
    np.testing.assert_array_equal(coarse.numpy(), ndimage.zoom(label.numpy(), [24 / 30, 21 / 26, 11 / 14], order=0))
    back = data.resample_labels(coarse, label.shape)
    assert back.shape == label.shape
    for c in (1, 2):
        assert bcp.dice(back.numpy() == c, label.numpy() == c) > 0.8


def test_own_scans_are_resampled_to_exactly_the_planned_spacing():
    """A scan of 0.7 x 1.1 x 2.5 mm voxels whose intensity is each voxel centre's position in mm along
    its axis: resampled to 1.5 mm, each voxel lies where the grids' edges starting together put it (as
    nnU-Net's), exactly 1.5 mm from the next, but for a voxel clamped at either end of the scan. Linear and nearest equal
    scipy's map_coordinates (order 1 and 0) at (o + 1/2) step - 1/2; the equal grid is the identity."""
    spacing, target, shape = (0.7, 1.1, 2.5), (1.5, 1.5, 1.5), (37, 23, 9)
    size, steps = data.resampled_size(shape, spacing, target), data.spacing_steps(spacing, target)
    assert size == [17, 17, 15]
    for axis in range(3):
        millimetres = torch.arange(shape[axis], dtype=torch.float64) * spacing[axis]
        ramp = millimetres.view(*[-1 if a == axis else 1 for a in range(3)]).expand(shape).contiguous()
        along = data.resample_spacing(ramp, size, steps).movedim(axis, 0)[:, 0, 0].numpy()
        centres = (np.arange(size[axis]) + 0.5) * target[axis] - 0.5 * spacing[axis]  # in mm, edges starting together
        inside = (centres >= 0) & (centres <= millimetres[-1].item())
        assert inside.sum() >= size[axis] - 2
        np.testing.assert_allclose(along[inside], centres[inside], atol=1e-5)
        np.testing.assert_allclose(np.diff(along[inside]), target[axis], atol=1e-5)  # the first voxel: half a voxel in from the edge
    image = torch.from_numpy(np.random.default_rng(0).random(shape))
    coordinates = np.meshgrid(*[((np.arange(n) + 0.5) * step - 0.5).clip(0, length - 1)
                                for n, step, length in zip(size, steps, shape)], indexing="ij")
    for order, nearest in ((1, False), (0, True)):
        expected = ndimage.map_coordinates(image.numpy(), coordinates, order=order)
        np.testing.assert_allclose(data.resample_spacing(image, size, steps, nearest).numpy(), expected, atol=1e-5)
    torch.testing.assert_close(data.resample_spacing(image, shape, (1, 1, 1)), image)


def test_standardize_z_scores_each_la_volume(la_root, tmp_path):
    case = data.read_list(la_root, "train.list")[0]
    _, image, label = data.Dataset(la_root).volumes([case])[0]
    (tmp_path / data.LA_FOLDER / case).mkdir(parents=True)
    prepare_acdc.write_h5(tmp_path / data.LA_FOLDER / case / "mri_norm2.h5", 3 * image + 5, label)
    _, raw, _ = data.Dataset(tmp_path).volumes([case])[0]
    _, standardized, same_label = data.Dataset(tmp_path).volumes([case], standardize=True)[0]
    assert raw.mean() == pytest.approx(3 * image.mean() + 5, abs=1e-3) and (label == same_label).all()
    assert abs(standardized.mean()) < 1e-4 and standardized.std() == pytest.approx(1, abs=1e-4)
    assert np.corrcoef(raw.ravel(), standardized.ravel())[0, 1] == pytest.approx(1)


def two_slice_bank():
    rng = np.random.default_rng(0)
    images = [rng.random((37, 29)).astype(np.float32) + 1, rng.random((20, 41)).astype(np.float32) + 1]
    labels = [(image * 2).astype(np.uint8) for image in images]
    return data.SliceBank(images, labels, "cpu"), images


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("axis", range(2))
def test_rot_flip_augmentation_matches_numpy(k, axis):
    """rot90 by k, flip on axis, nearest zoom to 32 x 32: exactly np.rot90 + np.flip + scipy zoom."""
    bank, images = two_slice_bank()
    aug = bank.no_augmentation(2)
    aug["rot_flip"][:], aug["k"][:], aug["flip_axis"][:] = True, k, axis
    batch, labels = bank.batch(torch.tensor([0, 1]), (32, 32), aug)
    for image, ours, our_labels in zip(images, batch[:, 0].numpy(), labels.numpy()):
        turned = np.flip(np.rot90(image, k), axis)
        expected = ndimage.zoom(turned, (32 / turned.shape[0], 32 / turned.shape[1]), order=0)
        np.testing.assert_array_equal(ours, expected)
        np.testing.assert_array_equal(our_labels, (expected * 2).astype(np.uint8))


@pytest.mark.parametrize("angle", [-20, -7, 13, 19])
def test_rotation_augmentation_matches_scipy(angle):
    bank, images = two_slice_bank()
    aug = bank.no_augmentation(2)
    aug["rotate"][:], aug["angle"][:] = True, angle
    batch, _ = bank.batch(torch.tensor([0, 1]), (32, 32), aug)
    for image, ours in zip(images, batch[:, 0].numpy()):
        turned = ndimage.rotate(image, angle, order=0, reshape=False, mode="constant", cval=0)
        expected = ndimage.zoom(turned, (32 / turned.shape[0], 32 / turned.shape[1]), order=0)
        np.testing.assert_array_equal(ours, expected)


def test_random_augmentation_draws_the_authors_mix():
    """p(rot90+flip) = 1/2, p(rotation) = 1/2 * 1/2, angles in [-20, 20)."""
    aug = data.SliceBank.random_augmentation(20000, torch.Generator().manual_seed(0))
    assert aug["rot_flip"].float().mean() == pytest.approx(0.5, abs=0.02)
    assert aug["rotate"].float().mean() == pytest.approx(0.25, abs=0.02)
    assert not (aug["rot_flip"] & aug["rotate"]).any()
    assert aug["angle"].min() == -20 and aug["angle"].max() == 19


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("axis", range(2))
def test_volume_bank_crops_like_the_authors(k, axis):
    """np.rot90(k) over axes 0, 1, np.flip(axis), then UA-MT's RandomCrop to 8 x 8 x 8: an axis no larger
    than 8 is padded by (8 - size) // 2 + 3 on each side, the corner is randint(0, size - 8)."""
    rng = np.random.default_rng(0)
    image = rng.random((11, 8, 6)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    bank = data.VolumeBank([image], [label], "cpu")
    corner = torch.tensor([[0.0, 0.5, 0.99]])
    images, labels = bank.batch(torch.tensor([0]), (8, 8, 8), {"k": torch.tensor([k]), "flip_axis": torch.tensor([axis]),
                                                               "corner": corner})
    for ours, array in ((images[0, 0], image), (labels[0], label)):
        turned = np.flip(np.rot90(array, k), axis)
        padded = np.pad(turned, [((8 - s) // 2 + 3,) * 2 if s <= 8 else (0, 0) for s in turned.shape])
        start = [int(f * (s - 8)) for f, s in zip(corner[0].tolist(), padded.shape)]
        np.testing.assert_array_equal(ours.numpy(), padded[tuple(slice(c, c + 8) for c in start)])


def test_a_crop_of_the_turned_volume_is_cut_without_turning_it():
    """turned_crop against torch.rot90, flip, zero padding by 3 on every side, then the box: every k,
    axis and corner, boxes reaching into the padding included, on a volume whose sides all differ."""
    volume = torch.arange(5 * 7 * 3, dtype=torch.float32).view(5, 7, 3) + 1
    for k, axis in itertools.product(range(4), range(2)):
        padded = F.pad(torch.rot90(volume, k, (0, 1)).flip(axis), [3] * 6)
        for corner in itertools.product(range(0, padded.shape[0] - 4, 2), range(0, padded.shape[1] - 4, 3), range(0, 5, 2)):
            box = tuple(slice(c, c + p) for c, p in zip(corner, (4, 4, 4)))
            crop = data.turned_crop(volume, k, axis, [c - 3 for c in corner], (4, 4, 4))
            assert torch.equal(crop, padded[box]), (k, axis, corner)


def test_rotated_and_flipped_points_follow_the_volume():
    """rot90_flip_point against torch.rot90 then flip on a volume with one marked voxel."""
    shape = (5, 7, 3)
    for k, axis, point in itertools.product(range(4), range(2), [(0, 0, 0), (4, 6, 2), (1, 5, 1), (3, 2, 0)]):
        volume = torch.zeros(shape)
        volume[point] = 1
        moved = torch.rot90(volume, k, (0, 1)).flip(axis)
        where, new_shape = data.rot90_flip_point(point, shape, k, axis)
        assert list(moved.shape) == new_shape and moved[tuple(where)] == 1, (k, axis, point)


def test_foreground_crops_find_an_organ_at_one_percent():
    """An organ of 1 % of a 128 x 128 x 64 volume, crops of 32 x 32 x 16: uniform crops hold some of it
    in about 3 of 10 (the small class included); with foreground 1/3, a third of the crops are centred on a voxel of a class (the
    organ or a small second class, at the crop's centre after rotation and flip), so the share holding
    foreground is measured, not assumed."""
    label = np.zeros((128, 128, 64), np.uint8)
    label[60:82, 50:72, 20:42] = 1  # 22^3 voxels, 1.0 %
    label[20:26, 90:100, 40:46] = 2  # a second, small class
    image = label.astype(np.float32)
    uniform = data.VolumeBank([image], [label], "cpu")
    centred = data.VolumeBank([image], [label], "cpu", foreground=1 / 3, num_classes=3)
    shares = {}
    for name, bank in (("uniform", uniform), ("centred", centred)):
        generator = torch.Generator().manual_seed(0)
        augmentation = bank.random_augmentation(600, generator)
        _, labels = bank.batch(torch.zeros(600, dtype=torch.long), (32, 32, 16), augmentation)
        shares[name] = (labels.flatten(1) > 0).any(1).float().mean().item()
        if name == "centred":
            forced = augmentation["centred"]
            assert 0.28 < forced.float().mean() < 0.39
            assert (labels[forced].flatten(1) > 0).any(1).all()  # every centred crop holds the organ
            assert (labels[forced][:, 15:17, 15:17, 7:9] > 0).flatten(1).any(1).float().mean() > 0.9  # near its centre
    assert shares["uniform"] < 0.35 and shares["centred"] > shares["uniform"] + 0.2, shares  # measured: 0.31, 0.56


def test_foreground_crops_are_the_steps_draws(monkeypatch):
    """The centred crops come from the step's keyed generator: the same step draws the same batch, and
    the shares of two processes put together are the one process's batch (resume and torchrun exact)."""
    label = np.zeros((40, 40, 24), np.uint8)
    label[30:36, 4:10, 4:10] = 1
    image = np.random.default_rng(0).random(label.shape).astype(np.float32)
    bank = data.VolumeBank([image, image[::-1].copy()], [label, label[::-1].copy()], "cpu", foreground=0.5)
    args = SimpleNamespace(seed=3, phase="pretrain", patch_size=(16, 16, 8))
    whole = train.draw_batch(bank, 5, 8, args, train.LABELED, parts=2)
    again = train.draw_batch(bank, 5, 8, args, train.LABELED, parts=2)
    torch.testing.assert_close(whole, again)
    shares = []
    for rank in range(2):
        monkeypatch.setattr(bcp, "process_share", lambda rank=rank: (2, rank))
        shares.append(train.draw_batch(bank, 5, 8, args, train.LABELED, parts=2))
    for part in range(2):  # each half: rank 0's share, then rank 1's
        joined = torch.cat([shares[0][0][2 * part:2 * part + 2], shares[1][0][2 * part:2 * part + 2]])
        torch.testing.assert_close(joined, whole[0][4 * part:4 * part + 4])


@pytest.mark.parametrize("batch,share,centred", [(2, 1 / 3, [1]), (4, 1 / 3, [3]), (8, 1 / 3, [2, 4, 7]),
                                                (4, 0.5, [1, 3]), (3, 1.0, [0, 1, 2]), (4, 0.1, [3])])
def test_foreground_crops_are_a_fixed_share_of_every_batch(batch, share, centred):
    """nnU-Net's sampler, not a coin per crop: max(1, round(share * batch)) crops of every batch are
    centred on the organ, spread evenly with the last among them (worked out by hand), and the bank draws
    exactly those in every batch, whatever its generator."""
    assert torch.nonzero(data.foreground_crops(batch, share)).flatten().tolist() == centred
    label = np.zeros((20, 20, 12), np.uint8)
    label[5:9, 5:9, 3:6] = 1
    bank = data.VolumeBank([label.astype(np.float32)], [label], "cpu", foreground=share)
    for seed in range(3):
        drawn = bank.random_augmentation(batch, torch.Generator().manual_seed(seed))["centred"]
        assert torch.nonzero(drawn).flatten().tolist() == centred


def test_a_checkpoint_weights_only_refuses_is_one_line(tmp_path):
    torch.save({"model": SimpleNamespace(weights=1), "flags": {}}, tmp_path / "pickled.pt")
    with pytest.raises(data.DataError) as error:
        inference.load_checkpoint(tmp_path / "pickled.pt")
    assert str(error.value).startswith(f"{tmp_path / 'pickled.pt'}: not a readable checkpoint") and "\n" not in str(error.value)


# What train.py resolved at commit 1a93707, before the plans, for each kind of data: the plan must give the same.
# (labeled_patients, batch_size, labeled_batch_size, patch_size, num_classes, iterations, lr_decay, lr_step, val_every,
#  precision, dice_loss, pretrain_loss, selftrain_sgd, val_cases, scale, foreground_crops, standardize, stride,
#  schedule_key, set_by_schedule) by (data, phase, flags, whether the CPU computes bf16)
PLAN_KEYS = ("labeled_patients", "batch_size", "labeled_batch_size", "patch_size", "num_classes", "iterations", "lr_decay",
             "lr_step", "val_every", "precision", "dice_loss", "pretrain_loss", "selftrain_sgd", "val_cases", "scale",
             "foreground_crops", "standardize", "stride", "schedule_key", "set_by_schedule")
CPU_ACDC = ["batch_size", "budget", "iterations", "labeled_batch_size", "lr_decay", "patch_size", "val_every"]  # + the budget of
CPU_LA = ["batch_size", "budget", "iterations", "labeled_batch_size", "lr_decay", "lr_step", "patch_size", "scale",  # issue 55
          "standardize", "step_ratio", "val_every"]
SETTINGS_AT_1A93707 = {
    ("acdc", "selftrain", (), False): [7, 24, 12, (256, 256), 4, 30000, "step", 0, 200, "fp32", "acdc", "regions", "pretrain",
                                       None, None, None, None, None, None, []],
    ("acdc", "pretrain", ("--schedule", "cpu"), True): [7, 12, 6, (160, 160), 4, 2500, "poly", 0, 500, "bf16", "acdc", "regions",
                                                        "pretrain", None, None, None, None, None, "acdc_bf16", sorted(CPU_ACDC + ["precision"])],
    ("acdc", "selftrain", ("--schedule", "cpu"), False): [7, 12, 6, (160, 160), 4, 4000, "poly", 0, 500, "fp32", "acdc", "regions",
                                                          "pretrain", None, None, None, None, None, "acdc", CPU_ACDC],
    ("la", "supervised", (), False): [8, 4, 4, (112, 112, 80), 2, 6000, "step", 2500, 200, "fp32", "la", "whole", "fresh", 8, 1.0,
                                      0.0, False, [18, 4], None, []],
    ("la", "selftrain", (), False): [8, 8, 4, (112, 112, 80), 2, 15000, "step", 2500, 200, "fp32", "la", "whole", "fresh", 8, 1.0,
                                     0.0, False, [18, 4], None, []],
    ("la", "pretrain", ("--schedule", "cpu"), True): [8, 8, 4, (64, 64, 32), 2, 800, "poly", 0, 200, "bf16", "la", "whole", "fresh",
                                                      8, 0.5, 0.0, True, [18, 4], "la_bf16", sorted(CPU_LA + ["precision"])],
    ("la", "selftrain", ("--schedule", "cpu"), False): [8, 8, 4, (64, 64, 32), 2, 2000, "poly", 0, 200, "fp32", "la", "whole",
                                                        "fresh", 8, 0.5, 0.0, True, [18, 4], "la", CPU_LA],
    # your own 2D scans since issue 54: the slices a step and crop the plan made (no ACDC-sized stretch), a third of them
    # centred on a class, a validation case held aside
    ("own2d", "pretrain", ("--schedule", "cpu"), True): [4, 12, 6, (48, 48), 4, 2500, "poly", 0, 500, "bf16", "acdc", "regions",
                                                         "pretrain", 1, None, 1 / 3, None, None, "own2d_bf16",
                                                         ["budget", "iterations", "lr_decay", "precision", "val_every"]],
    ("own2d", "selftrain", ("--val-cases", "1"), False): [4, 12, 6, (48, 48), 4, 30000, "step", 0, 200, "fp32", "acdc",
                                                          "regions", "pretrain", 1, None, 1 / 3, None, None, None, []],
    ("own3d", "selftrain", (), False): [3, 16, 8, (48, 32, 16), 3, 15000, "step", 2500, 200, "fp32", "la", "whole", "fresh", 1,
                                        1.0, 1 / 3, False, [18, 4], None, []],
    ("own3d", "pretrain", ("--schedule", "cpu"), True): [3, 8, 8, (48, 32, 16), 3, 600, "poly", 0, 100, "fp32", "la", "whole",
                                                         "fresh", 1, 1.0, 1 / 3, False, [18, 4], "own3d",
                                                         ["iterations", "lr_decay", "lr_step", "val_every"]],
    ("own3d", "selftrain", ("--patch-size", "64", "--iterations", "7"), False): [3, 16, 8, (48, 32, 16), 3, 7, "step", 2500, 200,
                                                                                 "fp32", "la", "whole", "fresh", 1, 1.0, 1 / 3,
                                                                                 False, [18, 4], None, []],
}


@pytest.fixture(scope="module")
def own_roots(tmp_path_factory):
    """Your own data of both kinds, prepared: 2D slices (own_data_folder) and 3D volumes (own_3d_folder)."""
    folder = tmp_path_factory.mktemp("own")
    own_data_folder(folder / "raw2d")
    own_3d_folder(folder / "raw3d")
    assert prepare_acdc.main(["--raw", str(folder / "raw2d"), "--out", str(folder / "own2d")]) == 0
    assert prepare_acdc.main(["--raw", str(folder / "raw3d"), "--3d", "--out", str(folder / "own3d")]) == 0
    return {"own2d": folder / "own2d", "own3d": folder / "own3d"}


@pytest.mark.parametrize("kind,phase,flags,native_bf16", list(SETTINGS_AT_1A93707))
def test_each_kinds_plan_resolves_the_settings_it_replaced(kind, phase, flags, native_bf16, synthetic_root, la_root, own_roots,
                                                           monkeypatch):
    """ACDC's, LA's, your own 2D and 3D data's plans, under the paper's schedule and --schedule cpu, with and
    without native bf16, with flags given: train.py resolves exactly what it did before the plans (and --schedule
    cpu sets its budget, and on LA its share of steps)."""
    monkeypatch.setattr(train, "cpu_bf16", lambda: ["avx512_bf16"] if native_bf16 else [])
    root = {"acdc": synthetic_root, "la": la_root, **own_roots}[kind]
    args = train.parse_args(["--root", str(root), "--phase", phase, *flags, "--device", "cpu"])
    assert args.dataset.plan.name == kind
    assert [getattr(args, key) for key in PLAN_KEYS] == SETTINGS_AT_1A93707[kind, phase, flags, native_bf16]


def test_each_kind_of_data_has_its_plan(synthetic_root, la_root, own_roots):
    """What each plan decides beyond the flags: the paper's protocols for ACDC and LA, nnU-Net's scoring for your
    own data, and in 3D its windows, post-processing, grid and preprocessing."""
    plans = {kind: data.Dataset(root).plan for kind, root in (("acdc", synthetic_root), ("la", la_root), *own_roots.items())}
    assert {kind: (plan.dims, plan.windows, plan.post_processing, plan.scoring, plan.grid, plan.preprocessing["rule"])
            for kind, plan in plans.items()} == {
        "acdc": (2, "slices", "none", "paper", "stored", "minmax"), "la": (3, "authors", "largest", "paper", "stored", "zscore"),
        "own2d": (2, "gaussian", "chosen", "nnunet", "native", "prepared"), "own3d": (3, "gaussian", "chosen", "nnunet", "native", "prepared")}
    assert plans["own2d"].preprocessing["spacing"] == [1.5, 1.5, None]  # in plane; each scan keeps its slices
    assert plans["own3d"].preprocessing["spacing"] == data.Dataset(own_roots["own3d"]).own["preprocessing"]["spacing"]
    assert [plans["la"].classes_kept(3), plans["acdc"].classes_kept(4), plans["own3d"].classes_kept(3, [2]),
            plans["own3d"].classes_kept(3)] == [[1, 2], [], [2], []]


def test_a_checkpoint_from_before_the_plans_gets_its_plan_on_reading():
    """Checkpoints written up to commit 1a93707 hold flags and no plan: a 2D one is ACDC's, a 3D one LA's, and one
    whose flags hold your own scans' preprocessing your own 3D scans' (nnU-Net's windows, post-processing chosen,
    --predict resampling as prepared). A plan the checkpoint keeps is read back as written."""
    for path in sorted(Path(__file__).parent.glob("measurements/**/best_fp16.pt")):
        assert inference.load_model(path)[1]["plan"] == data.ACDC_PLAN, path
    old = lambda **flags: inference.checkpoint_plan({"flags": {"num_classes": 2} | flags}, "old.pt")
    assert old(patch_size=[64, 64, 32]) == data.LA_PLAN and old(patch_size=[160, 160]) == data.ACDC_PLAN
    preprocessing = {"spacing": [3.0, 3.0, 3.0], "modality": "MRI", "grid": data.EXACT_GRID}
    own = old(patch_size=[48, 32, 16], preprocessing=preprocessing)
    assert (own.windows, own.post_processing, own.preprocessing) == ("gaussian", "chosen", {"rule": "prepared"} | preprocessing)
    assert inference.checkpoint_plan({"plan": inference.saved_plan(own), "flags": {}}, "new.pt") == own
    for plan in (data.ACDC_PLAN, data.LA_PLAN, own):  # kept before slices_last and unused_flags (up to eb4e183)
        kept = {key: value for key, value in inference.saved_plan(plan).items() if key not in ("slices_last", "unused_flags")}
        assert inference.checkpoint_plan({"plan": kept, "flags": {}}, "kept.pt") == plan


def test_committed_checkpoints_load_on_the_cpu():
    """The fp16 weights under measurements/ (README's results) load into the U-Net their flags describe."""
    paths = sorted(Path(__file__).parent.glob("measurements/**/best_fp16.pt"))
    assert len(paths) >= 3
    for path in paths:
        assert (path.parent / "flags.json").exists() and (path.parent / "metrics.jsonl").exists()
        model, _ = inference.load_model(path)
        assert torch.isfinite(model.eval()(torch.rand(1, 1, 64, 64))).all(), path


def test_the_teacher_of_a_selftrain_checkpoint_loads_on_request(tmp_path):
    """evaluate.py --weights teacher: the EMA teacher's weights, not the student's; a checkpoint without a
    teacher (pre-training) is named in one line."""
    student, teacher = bcp.UNet(), bcp.UNet()
    flags = {"num_classes": 4, "patch_size": [32, 32]}
    torch.save({"model": student.state_dict(), "teacher": teacher.state_dict(), "flags": flags}, tmp_path / "self.pt")
    torch.save({"model": student.state_dict(), "teacher": None, "flags": flags}, tmp_path / "pre.pt")
    loaded, _ = inference.load_model(tmp_path / "self.pt", weights="teacher")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    assert not torch.equal(loaded.head.weight, student.head.weight)
    with pytest.raises(data.DataError, match=r"pre\.pt: holds no teacher"):
        inference.load_model(tmp_path / "pre.pt", weights="teacher")


@pytest.mark.slow
def test_checkpoints_that_do_not_fit_are_named(synthetic_root, tmp_path):
    """A file without 'flags', weights of another shape, and an --init that is not a checkpoint: one
    line each, naming the file."""
    torch.save({"model": bcp.UNet().state_dict()}, tmp_path / "no_flags.pt")
    with pytest.raises(data.DataError, match=r"no_flags\.pt: not a train\.py checkpoint \(no 'flags'\)"):
        evaluate.main(["--root", str(synthetic_root), "--checkpoint", str(tmp_path / "no_flags.pt")])
    torch.save({"model": bcp.UNet(num_classes=3).state_dict(), "flags": {"num_classes": 4, "patch_size": [32, 32]}},
               tmp_path / "three.pt")
    with pytest.raises(data.DataError, match=r"three\.pt: the weights do not fit this UNet \(.*size mismatch"):
        evaluate.main(["--root", str(synthetic_root), "--checkpoint", str(tmp_path / "three.pt")])
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(data.DataError, match=r"junk\.pt: not a readable checkpoint"):
        train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path / "run"), "--phase", "selftrain",
                    "--iterations", "1", "--init", str(tmp_path / "junk.pt")])


@pytest.mark.slow
def test_leftover_temporary_checkpoints_are_removed(synthetic_root, tmp_path):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "last.pt.tmp").write_bytes(b"half a checkpoint")
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "1"])
    assert not (tmp_path / "pretrain" / "last.pt.tmp").exists()


# ----------------------------------------------------------------------------- scans: prepare_acdc.py's NIfTI reading, the official download, synthetic sets, --check, your own scans

NIFTI_CODES = {"u1": 2, "i2": 4, "f4": 16}


def write_nifti(path, array, endian="<", slope=0.0, inter=0.0):
    """A minimal NIfTI-1 writer for the tests: array indexed (i, j, k), stored in Fortran order."""
    header = bytearray(352)
    struct.pack_into(endian + "i", header, 0, 348)
    struct.pack_into(endian + "8h", header, 40, array.ndim, *array.shape, *[1] * (7 - array.ndim))
    struct.pack_into(endian + "2h", header, 70, NIFTI_CODES[array.dtype.str[1:]], array.dtype.itemsize * 8)
    struct.pack_into(endian + "8f", header, 76, *[1.0] * 8)
    struct.pack_into(endian + "3f", header, 108, 352.0, slope, inter)
    header[344:348] = b"n+1\0"
    payload = bytes(header) + array.astype(array.dtype.newbyteorder(endian)).tobytes(order="F")
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(payload)


def test_read_nifti_orders_axes_like_simpleitk_and_scales(tmp_path):
    """Element (i, j, k) of the NIfTI lands at [k, j, i]; big-endian files read alike; slope/inter apply."""
    array = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    for endian, name in (("<", "a.nii.gz"), (">", "b.nii")):
        write_nifti(tmp_path / name, array, endian)
        np.testing.assert_array_equal(data.read_nifti(tmp_path / name), array.transpose(2, 1, 0))
    write_nifti(tmp_path / "c.nii.gz", array, slope=2.0, inter=-1.0)
    np.testing.assert_allclose(data.read_nifti(tmp_path / "c.nii.gz"), array.transpose(2, 1, 0) * 2.0 - 1.0)


def rotated_affine(spacing, angle, offset=(-40.0, 12.5, 30.0)):
    """A NIfTI affine: voxel spacing (mm) along i, j, k, rotated by `angle` about the k axis."""
    cos, sin = math.cos(angle), math.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]]) * spacing
    affine[:3, 3] = offset
    return affine


def test_nifti_geometry_matches_nibabel(tmp_path):
    """Our reading of the spacing and the affine (sform, else qform, else nibabel's fallback: the pixdim
    scaling with i flipped and the centre voxel at the origin) against nibabel's."""
    affine = rotated_affine((0.8, 1.1, 3.0), 0.7)
    for qform, sform in ((1, 2), (1, 0), (0, 0)):
        scan = nibabel.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
        scan.set_qform(affine, code=qform)
        scan.set_sform(affine, code=sform)
        nibabel.save(scan, tmp_path / "scan.nii.gz")
        loaded = nibabel.load(tmp_path / "scan.nii.gz")
        spacing, ours = data.nifti_geometry(data.read_nifti(tmp_path / "scan.nii.gz", with_header=True)[1], "scan")
        np.testing.assert_allclose(spacing, loaded.header.get_zooms(), rtol=1e-6)
        np.testing.assert_allclose(ours, loaded.affine, atol=1e-5)


def fake_official_download(root, patients=(99, 38, 28, 1, 101)):
    """patientXXX folders with Info.cfg (ED 1, ES 3) and image/label NIfTI files of shape (i, j, k) = (12, 10, 3)."""
    rng = np.random.default_rng(0)
    truth = {}
    for patient in patients:
        folder = root / "training" / f"patient{patient:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 3\nGroup: NOR\n")
        for frame in (1, 3):
            image = rng.integers(0, 900, (12, 10, 3)).astype(np.int16)
            label = rng.integers(0, 4, (12, 10, 3)).astype(np.uint8)
            write_nifti(folder / f"patient{patient:03d}_frame{frame:02d}.nii.gz", image)
            write_nifti(folder / f"patient{patient:03d}_frame{frame:02d}_gt.nii.gz", label)
            truth[patient, frame] = (image.transpose(2, 1, 0), label.transpose(2, 1, 0))
    return truth


def test_prepare_official_download_volume_by_volume(tmp_path, capsys):
    truth = fake_official_download(tmp_path / "raw")
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "ACDC")]) == 0
    root = tmp_path / "ACDC"
    assert (root / "train.list").read_text().split() == ["patient099_frame01", "patient099_frame02",
                                                         "patient038_frame01", "patient038_frame02"]
    assert (root / "val.list").read_text().split() == ["patient028_frame01", "patient028_frame02"]
    assert (root / "test.list").read_text().split() == ["patient001_frame01", "patient001_frame02"]
    assert len((root / "train_slices.list").read_text().split()) == 2 * 2 * 3
    assert "patient101" in capsys.readouterr().out  # skipped, and said so
    for (patient, frame), (image, label) in truth.items():
        if patient == 101:
            continue
        name = f"patient{patient:03d}_frame{'01' if frame == 1 else '02'}"
        with h5py.File(root / "data" / f"{name}.h5") as f:
            assert f["image"].dtype == np.float32 and f["image"].compression == "gzip"
            expected = (image - image.min()) / (image.max() - image.min())
            np.testing.assert_allclose(f["image"][()], expected, atol=1e-6)
            np.testing.assert_array_equal(f["label"][()], label)
        if patient in (99, 38):
            with h5py.File(root / "data" / "slices" / f"{name}_slice_3.h5") as f:
                np.testing.assert_array_equal(f["label"][()], label[2])
    assert prepare_acdc.check(root) == []


@pytest.mark.parametrize("damage,message", [
    (lambda folder: (folder / "Info.cfg").unlink(), "Info.cfg: missing"),
    (lambda folder: write_nifti(folder / "patient038_frame03_gt.nii.gz", np.full((12, 10, 3), 5, np.uint8)), "label values"),
    (lambda folder: write_nifti(folder / "patient038_frame03_gt.nii.gz", np.zeros((12, 10, 2), np.uint8)), "does not match"),
    (lambda folder: (folder / "patient038_frame01.nii.gz").write_bytes(b"not a nifti"), "patient038_frame01.nii.gz"),
])
def test_prepare_bad_download_names_the_file_and_writes_nothing(tmp_path, capsys, damage, message):
    fake_official_download(tmp_path / "raw")
    damage(tmp_path / "raw" / "training" / "patient038")
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "ACDC")]) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no output, no leftover staging folder


def test_synthetic_set_layout(synthetic_root, capsys):
    assert (synthetic_root / "SYNTHETIC").exists()
    assert prepare_acdc.main(["--out", str(synthetic_root), "--patients", "10"]) == 0  # a rerun has nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert prepare_acdc.main(["--out", str(synthetic_root), "--patients", "12"]) == 1  # another set: refuses
    assert prepare_acdc.check(synthetic_root) == []
    volumes = data.Dataset(synthetic_root).volumes(data.read_list(synthetic_root, "val.list"))
    assert len(volumes) == 2 and all(set(np.unique(label)) == {0, 1, 2, 3} for _, _, label in volumes)
    labeled, unlabeled, _ = data.Dataset(synthetic_root).cases(2)
    assert {data.patient_of(s) for s in labeled} == set(list(dict.fromkeys(
        data.patient_of(v) for v in (synthetic_root / "train.list").read_text().split()))[:2])
    assert not {data.patient_of(s) for s in labeled} & {data.patient_of(s) for s in unlabeled}


def test_check_finds_a_corrupted_copy(synthetic_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    slice_name = (copy / "train_slices.list").read_text().split()[0]
    with h5py.File(copy / "data" / "slices" / f"{slice_name}.h5", "r+") as f:
        f["label"][0, 0] = 7
    volume = (copy / "val.list").read_text().split()[0]
    (copy / "data" / f"{volume}.h5").unlink()
    problems = prepare_acdc.check(copy)
    assert any(slice_name in p and "label values" in p for p in problems)
    assert any(volume in p and "missing" in p for p in problems)
    assert prepare_acdc.main(["--check", str(copy)]) == 1


def test_check_requires_every_list(synthetic_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    (copy / "test.list").unlink()
    assert any("test.list: missing" in p for p in prepare_acdc.check(copy))


def test_check_verifies_an_la_root(la_root, tmp_path, capsys):
    """--check on UA-MT's layout: a fresh set is OK; a case whose h5 is gone, and a label holding 2, are
    named."""
    assert prepare_acdc.check(la_root) == []
    assert "LA layout: 8 train.list cases, 2 test.list cases" in capsys.readouterr().out
    broken = tmp_path / "LA"
    shutil.copytree(la_root, broken)
    gone, bad = data.read_list(broken, "train.list")[:2]
    (broken / data.LA_FOLDER / gone / "mri_norm2.h5").unlink()
    path = broken / data.LA_FOLDER / bad / "mri_norm2.h5"
    with h5py.File(path, "r+") as f:
        f["label"][0, 0, 0] = 2
    assert prepare_acdc.check(broken) == [f"{broken / data.LA_FOLDER / gone / 'mri_norm2.h5'}: listed but missing",
                                          f"{path}: label values must lie in 0..1 (--num-classes 2), got 0..2"]


def own_data_folder(root, labeled=5, unlabeled=2, extra_unlabeled=1, test=2, dataset_json=True, spacing=(1.5, 1.5, 8.0)):
    """A tiny nnU-Net-layout folder of thick-slice phantom scans (56 x 48 pixels of 1.5 mm, 4 slices 8 mm apart,
    three classes): imagesTr with and without labelsTr, imagesUnlabeled, imagesTs with labelsTs, and
    dataset.json (nnU-Net v2 labels)."""
    rng = np.random.default_rng(0)
    for folder in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    cases = ([("imagesTr", "labelsTr", f"heart_{i:03d}") for i in range(labeled)]
             + [("imagesTr", None, f"heart_{i:03d}") for i in range(labeled, labeled + unlabeled)]
             + [("imagesUnlabeled", None, f"extra_{i:03d}") for i in range(extra_unlabeled)]
             + [("imagesTs", "labelsTs", f"test_{i:03d}") for i in range(test)])
    affine = np.diag([*spacing, 1.0])
    for images, labels, case in cases:
        anatomy = prepare_acdc.random_anatomy(rng, (56, 48))
        image, label = prepare_acdc.phantom_frame(rng, (56, 48), 4, anatomy, systole=False)  # (k, j, i)
        save_scan(root / images / f"{case}_0000.nii.gz", (image * 1000).astype(np.int16).transpose(2, 1, 0), affine)
        if labels:
            save_scan(root / labels / f"{case}.nii.gz", label.astype(np.uint8).transpose(2, 1, 0), affine)
    if dataset_json:
        (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "RV": 1, "Myo": 2, "LV": 3},
                                                       "channel_names": {"0": "MRI"}}))


@pytest.mark.slow
def test_own_scans_end_to_end(tmp_path, capsys, monkeypatch):
    """Thick-slice scans: prepare (nnU-Net layout; the plan chooses 2D) -> pretrain -> selftrain -> evaluate ->
    predict on the CPU. The labeled set defaults to every labeled case, the unlabeled ones only feed
    self-training, the crops are 2D slices at the planned spacing, and --predict on a test scan gives exactly
    what evaluate.py predicts on its h5 copy, back on the scan's grid (same model, same preprocessing). A model
    that never predicts a class is named by that class's name."""
    own_data_folder(tmp_path / "raw")
    root, run = tmp_path / "mine", tmp_path / "run"
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--out", str(root)]) == 0
    assert "plan (dataset.json; flags override it): 2D: slices 8 mm apart are 5.3 times the 1.5 mm pixels" in capsys.readouterr().out
    dataset = data.Dataset(root)
    assert dataset.num_classes == 4 and dataset.class_names == ("RV", "Myo", "LV") and dataset.plan.name == "own2d"
    assert sorted(dataset.own["unlabeled"]) == ["extra-000", "heart-005", "heart-006"]
    assert dataset.own["val_cases"] == 1 and len(data.read_list(root, "test.list")) == 2
    assert prepare_acdc.check(root) == []
    labeled, unlabeled, val = dataset.cases(dataset.labeled_count(), dataset.own["val_cases"])
    assert (len(labeled), len(unlabeled), len(val)) == (4, 3, 1)
    bank = dataset.bank(labeled, "cpu", foreground=1 / 3)
    augmentation = bank.random_augmentation(6, torch.Generator().manual_seed(0))
    images, labels = bank.batch(torch.arange(6) % 4, (32, 32), augmentation)
    assert images.shape == (6, 1, 32, 32) and labels.shape == (6, 32, 32) and augmentation["centred"].sum() == 2
    assert (labels[augmentation["centred"]].flatten(1) > 0).any(1).all()  # slices that hold a class
    at = TINY.index("--labeled-patients")
    tiny = TINY[:at] + TINY[at + 2:]  # the default: every labeled case
    monkeypatch.setattr(inference, "segment", lambda *a, **k: never_lv(*a, **k))
    for phase in ("pretrain", "selftrain"):
        train.main(["--root", str(root), *tiny, "--out", str(run), "--phase", phase, "--iterations", "4"])
    assert re.search(r"warning: .*best\.pt never predicts LV on the validation volumes that hold it", capsys.readouterr().out)
    monkeypatch.undo()
    acdc_model = sorted(Path(__file__).parent.glob("measurements/**/best_fp16.pt"))[0]
    with pytest.raises(data.DataError, match=r"a 2D model of acdc data cannot segment the 2D volumes of .* \(own2d\)"):
        evaluate.main(["--root", str(root), "--checkpoint", str(acdc_model)])
    flags = inference.load_checkpoint(run / "selftrain" / "best.pt")["flags"]
    assert flags["labeled_patients"] == 4 and flags["num_classes"] == 4
    evaluate.main(["--root", str(root), "--checkpoint", str(run / "selftrain" / "best.pt"), "--json", str(tmp_path / "s.json"),
                   "--split", "test"])
    assert set(json.loads((tmp_path / "s.json").read_text())["per_class"]) == {"RV", "Myo", "LV"}
    evaluate.main(["--checkpoint", str(run / "selftrain" / "best.pt"), "--predict", str(tmp_path / "raw" / "imagesTs"),
                   "--out", str(tmp_path / "labels"), "--save-png", str(tmp_path / "pictures")])
    model, checkpoint = inference.load_model(run / "selftrain" / "best.pt")
    for case in dataset.scored_cases(data.read_list(root, "test.list"), flags, "cpu", "native"):
        expected = inference.segment(model.eval(), case.image, checkpoint["plan"], flags["patch_size"],
                                     keep_largest=checkpoint["plan"].classes_kept(4, checkpoint["keep_largest"]), native=case.native)
        written = data.read_nifti(tmp_path / "labels" / f"{case.name.replace('-', '_')}.nii.gz")  # labelsTr's names
        np.testing.assert_array_equal(written, expected.numpy().transpose(2, 1, 0))
        assert written.shape == (4, 56, 48)  # the scan's own grid (k, j, i)
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 2


REAL_SEGMENT = inference.segment


def never_lv(model, image, *args, **kwargs):
    """inference.segment's labels replaced by RV and Myo in turn: class 3 (LV) never predicted."""
    labels = REAL_SEGMENT(model, image, *args, **kwargs)
    return torch.arange(labels.numel()).view(labels.shape) % 2 + 1


@pytest.mark.parametrize("damage,message", [
    (lambda raw: (raw / "imagesTr" / "heart_001_0000.nii.gz").unlink(), "heart_001.nii.gz: a label without an image"),
    (lambda raw: write_nifti(raw / "labelsTr" / "heart_002.nii.gz", np.zeros((56, 48, 3), np.uint8)),
     r"heart_002.nii.gz: shape \(56, 48, 3\) and affine .* differ from the scan's \(48, 56, 4\)"),
    (lambda raw: write_nifti(raw / "labelsTr" / "heart_003.nii.gz", np.full((48, 56, 4), 5, np.uint8)), "heart_003.nii.gz: holds class 5, which no other label has"),
])
def test_own_layout_problems_name_the_file(tmp_path, capsys, damage, message):
    own_data_folder(tmp_path / "raw", dataset_json=False)
    damage(tmp_path / "raw")
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "mine")]) == 1
    error = capsys.readouterr().err
    assert re.search(message, error) and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def save_scan(path, array, affine):
    """Written by nibabel with the qform and the sform set, as scanners' converters write them."""
    scan = nibabel.Nifti1Image(array, affine)
    scan.set_qform(affine, code=1)
    scan.set_sform(affine, code=2)
    nibabel.save(scan, path)


OWN_3D_CASES = [("imagesTr", "labelsTr", f"atrium_{i:03d}") for i in range(4)] + [
    ("imagesTr", None, "atrium_004"), ("imagesUnlabeled", None, "extra_000"),
    ("imagesTs", "labelsTs", "atrium_005"), ("imagesTs", "labelsTs", "atrium_006")]


def own_3d_folder(root, modality="MRI"):
    """A tiny nnU-Net folder of 3D phantom scans with three classes (background, atrium, its roof):
    4 labeled, 2 unlabeled (imagesTr without a label, imagesUnlabeled), 2 test; rotated affines, and
    every other scan with 2 mm slices (half the slices, the same field) instead of 1 mm."""
    for folder in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, (images, labels, case) in enumerate(OWN_3D_CASES):
        image, atrium = prepare_acdc.la_phantom(rng, (48, 44, 32))
        label = atrium.copy()
        label[(atrium == 1) & (np.arange(48)[:, None, None] < np.flatnonzero(atrium.any((1, 2))).mean())] = 2
        thick = index % 2 == 1
        if thick:
            image, label = image[:, :, ::2], label[:, :, ::2]
        scale = 400.0 if modality == "CT" else 100.0  # CT in Hounsfield-like units
        affine = rotated_affine((1.0, 1.0, 2.0 if thick else 1.0), 0.2 * index)
        save_scan(root / images / f"{case}_0000.nii.gz", (image * scale).astype(np.float32), affine)
        if labels:
            save_scan(root / labels / f"{case}.nii.gz", label.astype(np.uint8), affine)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "atrium": 1, "roof": 2},
                                                   "channel_names": {"0": modality}}))


@pytest.mark.parametrize("modality", ["MRI", "CT"])
def test_own_3d_intensities_and_geometry_by_hand(modality, tmp_path):
    """--3d at the 1 mm scans' own spacing: their arrays in NIfTI index order (i, j, k), unresampled, the
    label exactly the scan's; MRI z-scored over each scan; CT clipped to the 0.5 and 99.5 percentiles of
    the foreground of the labeled training (not validation) scans, then their clipped mean and std.
    The 2 mm scans are resampled to twice their slices; dataset.json keeps each scan's geometry."""
    own_3d_folder(tmp_path / "raw", modality)
    root = tmp_path / "mine"
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--3d", "--spacing", "1", "1", "1", "--out", str(root),
                              "--val-fraction", "0.25"]) == 0
    info = data.read_dataset_json(root, "la")
    assert prepare_acdc.check(root) == []
    train_list = data.read_list(root, "train.list")
    assert info["val_cases"] == 1 and sorted(train_list[-3:-1]) == ["atrium-004", "extra-000"] == sorted(info["unlabeled"])
    assert data.read_list(root, "test.list") == ["atrium-005", "atrium-006"]
    raw = {case.replace("_", "-"): (images, labels, case) for images, labels, case in OWN_3D_CASES}
    training = train_list[:3]  # the labeled training cases: 4 labeled, 1 of them for validation
    scans = {name: nibabel.load(tmp_path / "raw" / raw[name][0] / f"{raw[name][2]}_0000.nii.gz").get_fdata() for name in raw}
    truth = {name: np.asarray(nibabel.load(tmp_path / "raw" / raw[name][1] / f"{raw[name][2]}.nii.gz").dataobj)
             for name in raw if raw[name][1]}
    if modality == "CT":
        foreground = np.concatenate([scans[n][truth[n] > 0] for n in training])
        low, high = np.percentile(foreground, [0.5, 99.5])
        clipped = np.clip(foreground, low, high)
        expected = {n: (np.clip(s, low, high) - clipped.mean()) / clipped.std() for n, s in scans.items()}
        assert info["preprocessing"]["window"] == pytest.approx([low, high])
    else:
        expected = {n: (s - s.mean()) / s.std() for n, s in scans.items()}
    for name in raw:
        image, label = data.read_h5(root / data.LA_FOLDER / name / "mri_norm2.h5", 3, 3)
        if scans[name].shape[2] == 32:  # 1 mm: as it is
            np.testing.assert_allclose(image, expected[name], atol=1e-4)
            if name in truth:
                np.testing.assert_array_equal(label, truth[name])
        else:  # 2 mm: resampled to 1 mm, round(16 * 2 / 1) slices as nnU-Net counts them
            assert image.shape == (48, 44, 32)
        assert info["cases"][name]["shape"] == list(scans[name].shape)
        affine = nibabel.load(tmp_path / "raw" / raw[name][0] / f"{raw[name][2]}_0000.nii.gz").affine
        np.testing.assert_allclose(info["cases"][name]["affine"], affine, atol=1e-5)


@pytest.mark.slow
def test_own_3d_scans_end_to_end(tmp_path, capsys, monkeypatch):
    """The README's commands as written (crops 32 x 32 x 16 here): prepare --3d at 1.25 mm, pretrain,
    selftrain with three classes (post-processing chosen on validation after each, stored in best.pt),
    evaluate the test split on the scans' own grids (one reference without class 2: no error, counted),
    --predict their NIfTI files: each label map has its scan's shape and affine, and its Dice against
    labelsTs (a class absent from both left out) is what evaluate.py reported."""
    own_3d_folder(tmp_path / "raw")
    no_roof = tmp_path / "raw" / "labelsTs" / "atrium_006.nii.gz"
    reference = nibabel.load(no_roof)
    save_scan(no_roof, np.minimum(np.asarray(reference.dataobj), 1).astype(np.uint8), reference.affine)
    root, run = tmp_path / "mine", tmp_path / "run"
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--3d", "--spacing", "1.25", "1.25", "1.25", "--out", str(root)]) == 0
    assert "  spacing 1.25 x 1.25 x 1.25 mm (median scan" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.parse_args(["--root", str(root), "--standardize"])
    assert "prepare_acdc.py already normalised the intensities" in capsys.readouterr().err
    monkeypatch.setattr(train, "cpu_bf16", lambda: ["amx_bf16"])  # no bf16 schedule for your scans: fp32 on any CPU
    scheduled = train.parse_args(["--root", str(root), "--schedule", "cpu"])  # your scans keep prepare's spacing and intensities
    assert (scheduled.scale, scheduled.standardize, scheduled.lr_decay, scheduled.precision) == (1.0, False, "poly", "fp32")
    assert "scale" not in scheduled.set_by_schedule
    assert (scheduled.iterations, scheduled.labeled_batch_size, scheduled.batch_size) == (600, 8, 8)  # the plan's crops
    assert train.schedule_minutes(scheduled) < 25
    capsys.readouterr()
    flags = ["--root", str(root), "--out", str(run), "--patch-size", "48", "32", "16", "--batch-size", "4",
             "--labeled-batch-size", "2", "--iterations", "2", "--val-every", "2"]
    for phase in ("pretrain", "selftrain"):
        train.main([*flags, "--phase", phase])
    assert "crops of 32 x 32 x 16" in capsys.readouterr().out  # the 48 is cut to the smallest resampled volume
    checkpoint = inference.load_checkpoint(run / "selftrain" / "best.pt")
    assert checkpoint["flags"]["patch_size"] == (32, 32, 16) and checkpoint["flags"]["num_classes"] == 3
    assert set(checkpoint["keep_largest"]) <= {1, 2}
    log = (run / "selftrain" / "train.log").read_text()
    assert "with the largest component kept for classes" in log and "only each class's largest" in log
    assert f"chosen on validation with best.pt (nnU-Net's rule): the largest component kept for classes {train.class_list(checkpoint['keep_largest'])}" in log
    assert checkpoint["flags"]["labeled_patients"] == 3 and checkpoint["flags"]["val_cases"] == 1
    rows, _ = data.read_metrics(run / "selftrain" / "metrics.jsonl")
    assert len([r for r in rows if "val_dice_per_class" in r][-1]["val_dice_per_class"]) == 2
    assert "pseudo_dice" not in rows[0]  # the unlabeled scans have no labels
    evaluate.main(["--root", str(root), "--checkpoint", str(run / "selftrain" / "best.pt"), "--json", str(tmp_path / "s.json")])
    scores = json.loads((tmp_path / "s.json").read_text())
    assert list(scores["per_class"]) == ["atrium", "roof"] and scores["volumes"] == 2
    printed = capsys.readouterr().out
    assert "HD95 and ASD in mm" in printed and "class-volumes (4), as nnU-Net counts them" in printed
    evaluate.main(["--checkpoint", str(run / "selftrain" / "best.pt"), "--predict", str(tmp_path / "raw" / "imagesTs"),
                   "--out", str(tmp_path / "labels")])
    dice = {c: [] for c in (1, 2)}
    for case in ("atrium_005", "atrium_006"):
        scan = nibabel.load(tmp_path / "raw" / "imagesTs" / f"{case}_0000.nii.gz")
        written = nibabel.load(tmp_path / "labels" / f"{case}.nii.gz")  # labelsTr's names
        assert written.shape == scan.shape
        np.testing.assert_allclose(written.affine, scan.affine, atol=1e-5)
        predicted = np.asarray(written.dataobj)
        truth = np.asarray(nibabel.load(tmp_path / "raw" / "labelsTs" / f"{case}.nii.gz").dataobj)
        for c in dice:
            if (predicted == c).any() or (truth == c).any():  # nnU-Net's rule: a class absent from both is left out
                dice[c].append(100 * bcp.dice(predicted == c, truth == c))
    for c, name in ((1, "atrium"), (2, "roof")):
        assert np.mean(dice[c]) == pytest.approx(scores["per_class"][name]["dice"], abs=1e-6)


@pytest.mark.parametrize("damage,message", [
    (lambda raw: save_scan(raw / "imagesTr" / "atrium_000_0000.nii.gz", np.zeros((8, 8, 4, 2), np.float32), np.eye(4)),
     r"atrium_000_0000.nii.gz: a 4D image of shape \(2, 4, 8, 8\); prepare_acdc.py --raw takes one 2D or 3D scan per file"),
    (lambda raw: save_scan(raw / "imagesTr" / "atrium_000_0000.nii.gz", np.zeros((8, 8), np.float32), np.eye(4)),
     r"atrium_000.nii.gz: shape \(48, 44, 32\) and affine .* differ from the scan's \(8, 8, 1\)"),  # a 2D scan: one slice
    (lambda raw: save_scan(raw / "imagesTr" / "atrium_002_0000.nii.gz", np.zeros((48, 44, 3), np.float32),
                           rotated_affine((1.0, 1.0, 20.0), 0.4)), r"atrium_002_0000.nii.gz: spacing \[1.0, 1.0, 20.0\] mm is more than 16 times"),
    (lambda raw: save_scan(raw / "labelsTr" / "atrium_001.nii.gz", np.zeros((48, 44, 16), np.uint8), np.eye(4)),
     r"atrium_001.nii.gz: shape \(48, 44, 16\) and affine .* differ from the scan's"),
    (lambda raw: save_scan(raw / "labelsTr" / "atrium_000.nii.gz", np.zeros((48, 44, 32), np.uint8), np.eye(4)),
     r"atrium_000.nii.gz: shape \(48, 44, 32\) and affine .* differ"),
    (lambda raw: [p.unlink() for p in (raw / "labelsTr").iterdir()], "no labeled training cases"),
])
def test_own_3d_bad_input_is_named_and_nothing_is_written(tmp_path, capsys, damage, message):
    own_3d_folder(tmp_path / "raw")
    damage(tmp_path / "raw")
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--3d", "--spacing", "1", "1", "1", "--out", str(tmp_path / "mine")]) == 1
    error = capsys.readouterr().err
    assert re.search(message, error) and error.count("\n") == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_a_ct_window_must_be_low_then_high(tmp_path, capsys):
    own_3d_folder(tmp_path / "raw", "CT")
    with pytest.raises(SystemExit) as stop:
        prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--3d", "--ct-window", "400", "-100", "--out", str(tmp_path / "mine")])
    assert stop.value.code == 2 and "--ct-window LO HI needs LO < HI, got 400 -100" in capsys.readouterr().err


def test_a_second_channel_is_refused_in_one_line(tmp_path, capsys):
    own_3d_folder(tmp_path / "raw")
    shutil.copy(tmp_path / "raw" / "imagesTr" / "atrium_000_0000.nii.gz", tmp_path / "raw" / "imagesTr" / "atrium_000_0001.nii.gz")
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--3d", "--out", str(tmp_path / "out")]) == 1
    assert "atrium_000_0001.nii.gz: not channel 0 (<case>_0000); one channel per case is supported" in capsys.readouterr().err


def test_own_3d_val_cases_beyond_the_labeled_ones_are_refused(tmp_path, capsys):
    own_3d_folder(tmp_path / "raw")
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--3d", "--out", str(tmp_path / "mine")]) == 0
    with pytest.raises(SystemExit):
        train.parse_args(["--root", str(tmp_path / "mine"), "--val-cases", "3"])
    assert f"--val-cases 3: {tmp_path / 'mine'} holds 1 labeled validation cases" in capsys.readouterr().err


def decathlon_folder(root, count=6, unlabeled=3):
    """A Medical Segmentation Decathlon task as its tar unpacks: imagesTr/<case>.nii.gz (no _0000) with
    labelsTr/<case>.nii.gz stored as uint8, int64 and float32 (nibabel's get_fdata) in turn, imagesTs/
    without labels, macOS '._' files beside them, and dataset.json with 'modality', 'labels' by number,
    'training' and 'test'. The organ is about 1 % of each whole-field scan."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(1)
    training, tests = [], []
    for index in range(count + unlabeled):
        case = f"la_{index:03d}"
        atrium_image, atrium = prepare_acdc.la_phantom(rng, (24, 24, 16))
        image = rng.normal(0, 0.3, (64, 56, 24)).astype(np.float32)  # a whole field of view around the atrium
        corner = rng.integers(0, [40, 32, 8])
        box = tuple(slice(c, c + n) for c, n in zip(corner, atrium.shape))
        image[box] = atrium_image
        label = np.zeros(image.shape, np.uint8)
        label[box] = atrium
        affine = rotated_affine((1.5, 1.5, 2.0), 0.1 * index)
        if index < count:
            save_scan(root / "imagesTr" / f"{case}.nii.gz", 100 * image, affine)
            dtype = (np.uint8, np.int64, np.float32)[index % 3]
            labels = nibabel.Nifti1Image(label.astype(dtype), affine, dtype=dtype)
            nibabel.save(labels, root / "labelsTr" / f"{case}.nii.gz")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        else:
            save_scan(root / "imagesTs" / f"{case}.nii.gz", 100 * image, affine)
            tests.append(f"./imagesTs/{case}.nii.gz")
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder / "._la_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "dataset.json").write_text(json.dumps({
        "name": "LeftAtrium", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "numTraining": count, "numTest": unlabeled, "training": training, "test": tests}))


@pytest.mark.parametrize("kind", [[], ["--2d"]])
def test_a_decathlon_task_prepares_as_downloaded(tmp_path, capsys, kind):
    """Names without _0000, labels as uint8, int64 and float32, dotfiles, 'modality' and 'labels' by
    number: all read; the imagesTs scans (the Decathlon withholds their labels) join the unlabeled
    training scans, in 3D (the plan's choice for 1.5 x 1.5 x 2 mm voxels) and in 2D; each label map arrives
    whole."""
    decathlon_folder(tmp_path / "Task02_Heart")
    out = tmp_path / "heart"
    assert prepare_acdc.main(["--raw", str(tmp_path / "Task02_Heart"), "--out", str(out), "--val-fraction", "0.34", *kind]) == 0
    said = capsys.readouterr().out
    assert "3 imagesTs scans have no labelsTs: they join the unlabeled scans" in said
    assert ("plan (dataset.json; flags override it): 2D as --2d asks; the scans alone would have chosen 3D: median voxels "
            "1.5 x 1.5 x 2 mm, no axis over 3 times another" if kind else "it): 3D: median voxels 1.5 x 1.5 x 2 mm") in said
    info = data.Dataset(out).own
    assert sorted(info["unlabeled"]) == ["la-006", "la-007", "la-008"] and info["class_names"] == ["left atrium"]
    train_list = data.read_list(out, "train.list")
    assert not any(name.startswith(".") for name in train_list)
    for index in range(6):
        name = f"la-{index:03d}"
        truth = np.asarray(nibabel.load(tmp_path / "Task02_Heart" / "labelsTr" / f"la_{index:03d}.nii.gz").dataobj)
        assert name in train_list
        _, label = data.read_h5(out / data.LA_FOLDER / name / "mri_norm2.h5", 3, 2)
        if kind:  # 2D at the scans' own 1.5 mm pixels: nothing resampled
            np.testing.assert_array_equal(label, truth)
        else:
            assert label.sum() == pytest.approx(truth.sum(), rel=0.15)  # resampled from 1.5 x 1.5 x 2 mm


def test_scans_of_a_folder_skip_dotfiles_and_labels_take_labelsTr_names(tmp_path):
    """The one reader of a folder's scans, for prepare_acdc.py and --predict alike: macOS '._' files are not
    scans; a label map is named as labelsTr names it, without nnU-Net's channel suffix _0000."""
    for name in ("la_001.nii.gz", "._la_001.nii.gz", "heart_002_0000.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in data.nifti_scans(tmp_path)] == ["heart_002_0000.nii.gz", "la_001.nii.gz"]
    assert [data.label_name(p) for p in data.nifti_scans(tmp_path)] == ["heart_002.nii.gz", "la_001.nii.gz"]


def test_the_plan_of_own_scans_by_hand():
    """nnU-Net's planning, for a CPU. 3D: 100^3 voxels of 1 mm: 10^6 voxels, over PLANNED_VOXELS (200,000), so
    the spacing grows by 5 % steps to 1.05^11 = 1.71 mm, the first where round(100 / s)^3 = 58^3 = 195,112 fits;
    the crop is CPU_PATCH cut to 58 in multiples of 16: 48 x 48 x 32. Thick slices (0.8 x 0.8 x 4-6 mm): the
    third axis takes the 10th percentile of its spacings, 4.4 mm, and only the fine axes are coarsened, to
    0.88 mm (91 x 91 x 23 voxels = 190,463). --spacing is taken as given. 2D: 300 x 300 pixels of 1.5 mm, over
    160 x 160, coarsened to 1.5 * 1.05^13 = 2.83 mm (159 x 159 = 25,281 pixels), cropped 144 x 144; the slices
    keep each scan's own spacing (None)."""
    cube = prepare_acdc.plan_grid([(1.0, 1.0, 1.0)] * 3, [(100, 100, 100)] * 3, 3)
    assert (cube["spacing"], cube["median_shape"], cube["patch_size"]) == ([1.71] * 3, [58] * 3, [48, 48, 32])
    thick = prepare_acdc.plan_grid([(0.8, 0.8, z) for z in (4, 5, 6, 5, 5)], [(100, 100, 20)] * 5, 3)
    assert (thick["spacing"], thick["median_shape"], thick["patch_size"]) == ([0.88, 0.88, 4.4], [91, 91, 23], [64, 64, 16])
    given = prepare_acdc.plan_grid([(1.0, 1.0, 1.0)] * 3, [(100, 100, 100)] * 3, 3, spacing=(2.0, 2.0, 2.0))
    assert given["spacing"] == [2.0, 2.0, 2.0] and given["patch_size"] == [48, 48, 32]
    assert (cube["labeled_batch_size"], cube["batch_size"]) == (8, 16)
    slices = prepare_acdc.plan_grid([(1.5, 1.5, z) for z in (5, 10, 8)], [(300, 300, 10)] * 3, 2)
    assert (slices["spacing"], slices["median_shape"], slices["patch_size"]) == ([2.83, 2.83, None], [159, 159], [144, 144])
    assert (slices["dims"], slices["labeled_batch_size"], slices["batch_size"]) == (2, 6, 12)


@pytest.mark.parametrize("spacings,dims,reason", [
    ([(1.5, 1.5, 8.0), (1.4, 1.4, 10.0), (1.7, 1.7, 5.0)], 2, "2D: slices 8 mm apart are 5.3 times the 1.5 mm pixels"),
    ([(1.25, 1.25, 1.37)] * 3, 3, "3D: median voxels 1.25 x 1.25 x 1.37 mm, no axis over 3 times another"),
    ([(0.8, 0.8, 2.4)] * 3, 3, "3D: median voxels 0.8 x 0.8 x 2.4 mm, no axis over 3 times another"),  # 3 times: not over
    ([(0.8, 0.8, 2.5)] * 3, 2, "2D: slices 2.5 mm apart are 3.1 times the 0.8 mm pixels"),
    ([(4.0, 1.0, 1.0)] * 3, 3, "thick along axis i (a 2D plan takes slices along k)"),
    ([(0.5, 0.5, 1.0)] * 3, 2, "2D: the scans are single slices"),  # nibabel's 2D files: pixdim 1 along k
])
def test_the_plan_chooses_2d_for_thick_slices_and_says_why(spacings, dims, reason):
    shapes = [(100, 100, 1 if "single" in reason else 12)] * len(spacings)
    assert prepare_acdc.choose_dims(spacings, shapes) == (dims, prepare_acdc.choose_dims(spacings, shapes)[1])
    assert reason in prepare_acdc.choose_dims(spacings, shapes)[1]


def disc_scan(pixels, radius=15.0, field=60.0):
    """A disc of `radius` mm at the centre of a `field` mm square slice of (x, y) mm pixels, 3 slices 8 mm apart:
    (image (i, j, k) float32, label uint8, affine)."""
    shape = [round(field / p) for p in pixels]
    i, j = np.meshgrid(*[(np.arange(n) + 0.5) * p - field / 2 for n, p in zip(shape, pixels)], indexing="ij")
    label = np.repeat(((i ** 2 + j ** 2) <= radius ** 2)[..., None], 3, axis=2).astype(np.uint8)
    return (100 + 400.0 * label).astype(np.float32), label, np.diag([*pixels, 8.0, 1.0])


def test_2d_slices_are_resampled_to_the_planned_pixels_not_stretched(tmp_path):
    """Thick-slice scans of 1, 1.5 and 2 mm pixels (labeled) and 1 x 2 mm pixels (a test scan), a 30 mm disc in
    each: the plan takes their median, 1.5 mm, in plane, and every stored slice shows the disc 20 pixels wide along
    both axes, give or take the nearest neighbour's pixel at each edge (a circle stays a circle; stretched to one
    slice size, the 1 x 2 mm scan's would be 30 x 15), the three slices kept."""
    raw = tmp_path / "raw"
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (raw / folder).mkdir(parents=True)
    scans = {"imagesTr": [(1.0, 1.0), (1.5, 1.5), (2.0, 2.0)], "imagesTs": [(1.0, 2.0)]}
    for images, pixel_list in scans.items():
        for index, pixels in enumerate(pixel_list):
            image, label, affine = disc_scan(pixels)
            save_scan(raw / images / f"disc_{images[-2:]}{index}_0000.nii.gz", image, affine)
            save_scan(raw / images.replace("images", "labels") / f"disc_{images[-2:]}{index}.nii.gz", label, affine)
    assert prepare_acdc.main(["--raw", str(raw), "--out", str(tmp_path / "out"), "--val-fraction", "0"]) == 0
    dataset = data.Dataset(tmp_path / "out")
    assert dataset.own["plan"]["spacing"] == [1.5, 1.5, None] and dataset.plan.dims == 2
    for name in data.read_list(dataset.root, "train.list") + data.read_list(dataset.root, "test.list"):
        _, label = data.read_h5(dataset.path(name), 3, 2)
        widths = [np.flatnonzero(label.any(axis=(1 - axis, 2))).size for axis in (0, 1)]
        assert label.shape == (40, 40, 3) and 18 <= min(widths) <= max(widths) <= 21, (name, widths)
        assert label[..., 0].sum() == pytest.approx(np.pi * 10 ** 2, rel=0.1)  # the disc's area, in 1.5 mm pixels


def test_validation_is_held_aside_by_patient_when_names_say_so(tmp_path, capsys):
    """Cases named patientNNN_frameMM (nnU-Net's ACDC): both frames of a patient fall on one side of the split,
    said in prepare's summary; other names are split by case."""
    assert [prepare_acdc.subject_of(name) for name in ("patient001-frame01", "patient001-frame12", "sub-01-ses-2",
                                                       "case12-ED", "heart-007", "la-003")] == \
        ["patient001", "patient001", "sub-01", "case12", "heart-007", "la-003"]
    own_data_folder(tmp_path / "raw", labeled=10, unlabeled=0, extra_unlabeled=1, test=0)
    for folder in ("imagesTr", "labelsTr"):  # heart_00N -> patient00{N // 2}_frame0{N % 2 + 1}
        for path in (tmp_path / "raw" / folder).iterdir():
            number = int(path.name[6:9])
            path.rename(path.with_name(f"patient{number // 2:03d}_frame{number % 2 + 1:02d}" + path.name[9:]))
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--val-fraction", "0.4"]) == 0
    assert "validation: 4 cases held aside by patient (2 of 5: each patient's labeled cases on one side)" in capsys.readouterr().out
    dataset = data.Dataset(tmp_path / "out")
    _, _, val = dataset.cases(dataset.labeled_count(), dataset.own["val_cases"])
    labeled = dataset.cases(dataset.labeled_count(), dataset.own["val_cases"])[0]
    val_patients = {prepare_acdc.subject_of(name) for name in val}
    assert len(val) == 4 and len(val_patients) == 2 and not val_patients & {prepare_acdc.subject_of(n) for n in labeled}
    own_data_folder(tmp_path / "raw2", labeled=10, unlabeled=0, test=0)
    assert prepare_acdc.main(["--raw", str(tmp_path / "raw2"), "--out", str(tmp_path / "out2"), "--val-fraction", "0.4"]) == 0
    assert "validation: 4 cases held aside by case (4 of 10)" in capsys.readouterr().out


class Threshold(torch.nn.Module):
    """A 2D 'network': class 1 where the pixel is above 0.5, each slice alone."""

    def forward(self, x):  # (B, 1, H, W) -> (B, 2, H, W)
        assert x.ndim == 4
        return torch.cat([0.5 - x, x - 0.5], 1)


def test_a_2d_model_segments_each_slice_of_your_own_volumes_in_windows():
    """Your own 2D scans: a (i, j, k) volume is segmented slice by slice along k, in (i, j) windows every half
    window; a square on slice 1 only comes back where it is, on a volume larger than the window and on one
    smaller (padded)."""
    plan = data.own_2d_plan({"spacing": [1.0, 1.0, None]})
    for shape in ((40, 28, 3), (12, 10, 3)):
        volume = torch.zeros(shape)
        volume[3:9, 2:7, 1] = 1
        labels = inference.segment(Threshold(), volume, plan, (16, 16))
        assert torch.equal(labels, volume.long()), shape


def test_uniform_2d_crops_reach_every_slice_and_a_single_slice_is_never_padded():
    """Uniform crops one slice deep land on every slice, the last included; a volume of one slice gives that
    slice every time (no padding along k, as a thinner-than-the-crop axis of a 3D crop would get)."""
    stack = np.broadcast_to(np.arange(4, dtype=np.float32), (20, 20, 4)).copy()  # slice k holds the value k
    single = np.ones((20, 20, 1), np.float32)
    bank = data.VolumeBank([stack, single], [np.zeros((20, 20, 4), np.uint8), np.ones((20, 20, 1), np.uint8)], "cpu")
    augmentation = bank.random_augmentation(200, torch.Generator().manual_seed(0))
    images, labels = bank.batch(torch.arange(200) % 2, (16, 16), augmentation)
    assert set(images[0::2].flatten(1)[:, 0].tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert (labels[1::2] == 1).all()


def test_a_2d_crop_is_centred_on_a_class_only_where_the_volume_holds_it():
    """Centred 2D crops (every crop, foreground 1) of a volume whose slice 0 holds class 1 and slice 2 class 2
    (slice 1 neither): each crop is a slice holding the class it was centred on, the two classes drawn about
    equally often; a volume with class 2 alone gets only class 2 crops, and a volume with no foreground
    uniform ones."""
    label = np.zeros((24, 20, 3), np.uint8)
    label[4:10, 4:10, 0], label[12:20, 10:16, 2] = 1, 2
    only_two = np.where(label == 2, 2, 0).astype(np.uint8)
    volumes = [label, only_two, np.zeros_like(label)]
    bank = data.VolumeBank([v.astype(np.float32) for v in volumes], volumes, "cpu", foreground=1.0, num_classes=3)
    augmentation = bank.random_augmentation(300, torch.Generator().manual_seed(0))
    index = torch.arange(300) % 3
    images, labels = bank.batch(index, (16, 16), augmentation)
    assert images.shape == (300, 1, 16, 16) and augmentation["centred"].all()
    classes = [set(crop.unique().tolist()) - {0} for crop in labels]
    both = [found for found, i in zip(classes, index) if i == 0]
    assert all(len(found) == 1 for found in both) and 0.4 < sum(found == {1} for found in both) / len(both) < 0.6
    assert all(found == {2} for found, i in zip(classes, index) if i == 1)
    assert all(not found for found, i in zip(classes, index) if i == 2)


def test_mri_with_a_large_empty_margin_is_z_scored_inside_its_nonzero_region():
    """nnU-Net's rule: zeros stay zero, the rest has mean 0 and standard deviation 1."""
    image = np.zeros((10, 10, 4), np.float32)
    image[2:5, 2:5] = np.arange(36, dtype=np.float32).reshape(3, 3, 4)
    normalised = data.normalize_3d(image.copy(), {"modality": "MRI", "nonzero_only": True})
    inside = image != 0
    assert (normalised[~inside] == 0).all()
    assert abs(normalised[inside].mean()) < 1e-6 and abs(normalised[inside].std() - 1) < 1e-5


def test_a_dataset_json_that_is_not_json_is_one_line(tmp_path, capsys):
    decathlon_folder(tmp_path / "Task02_Heart")
    (tmp_path / "Task02_Heart" / "dataset.json").write_text('{"labels": {"0": "background", "1": "left atrium"},')
    assert prepare_acdc.main(["--raw", str(tmp_path / "Task02_Heart"), "--3d", "--out", str(tmp_path / "heart")]) == 1
    error = capsys.readouterr().err
    assert "dataset.json: not readable JSON" in error and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task02_Heart"]


def test_scans_prepared_on_the_earlier_corner_aligned_grid_are_refused(tmp_path):
    """A dataset.json from before scans were resampled to exactly the planned spacing (no preprocessing
    'grid'): one line saying to prepare again, not predictions stretched back onto the scans."""
    own = {"num_classes": 2, "unlabeled": [], "val_cases": 1, "cases": {}, "preprocessing": {"spacing": [3.0, 3.0, 3.0]}}
    (tmp_path / "dataset.json").write_text(json.dumps(own))
    with pytest.raises(data.DataError, match="corner-aligned grid.*prepare it again with prepare_acdc.py --raw"):
        data.read_dataset_json(tmp_path, "la")
    own["preprocessing"]["grid"] = data.EXACT_GRID
    (tmp_path / "dataset.json").write_text(json.dumps(own))
    assert data.read_dataset_json(tmp_path, "la") == own


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_a_header_that_declares_more_than_its_file_holds_is_refused_naming_it(tmp_path, name):
    """A damaged header declaring 2000^3 float32 voxels (30 GiB) in a file of a few bytes: one line naming
    the file, before any memory is taken (gzip cannot hold more than 1032 times its size)."""
    write_nifti(tmp_path / name, np.zeros((4, 4, 4), np.float32))
    raw = bytearray(gzip.decompress((tmp_path / name).read_bytes()) if name.endswith(".gz") else (tmp_path / name).read_bytes())
    struct.pack_into("<4h", raw, 40, 3, 2000, 2000, 2000)
    (tmp_path / name).write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    with pytest.raises(data.DataError, match=rf"{name}: its header declares a 2000 x 2000 x 2000 float32 image \(29.8 GiB\)"):
        data.read_nifti(tmp_path / name)


def test_training_labels_that_are_all_empty_are_refused(tmp_path, capsys):
    decathlon_folder(tmp_path / "Task02_Heart")
    for path in (tmp_path / "Task02_Heart" / "labelsTr").glob("la_*.nii.gz"):
        scan = nibabel.load(path)
        nibabel.save(nibabel.Nifti1Image(np.zeros(scan.shape, np.uint8), scan.affine), path)
    assert prepare_acdc.main(["--raw", str(tmp_path / "Task02_Heart"), "--3d", "--out", str(tmp_path / "heart")]) == 1
    assert "labelsTr: every training label map is empty (background only)" in capsys.readouterr().err


@pytest.mark.parametrize("values,message", [
    (np.full((8, 8, 4), 0.5, np.float32), "label values must be whole numbers from 0"),
    (np.full((8, 8, 4), -1, np.int16), "label values must be whole numbers from 0"),
])
def test_labels_that_are_not_classes_are_refused_by_name(tmp_path, capsys, values, message):
    decathlon_folder(tmp_path / "Task", count=2, unlabeled=0)
    labels = nibabel.Nifti1Image(np.pad(values, ((0, 56), (0, 48), (0, 20))), rotated_affine((1.5, 1.5, 2.0), 0.1))
    nibabel.save(labels, tmp_path / "Task" / "labelsTr" / "la_001.nii.gz")
    assert prepare_acdc.main(["--raw", str(tmp_path / "Task"), "--3d", "--out", str(tmp_path / "out")]) == 1
    assert re.search(f"labelsTr/la_001.nii.gz: {message}", capsys.readouterr().err)


def dataset_names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_force_never_replaces_the_current_folder_or_a_foreign_one(tmp_path, monkeypatch, capsys):
    """`--out . --force` once deleted a whole clone: now a folder that holds the current directory,
    or that is not a data set this script wrote, survives --force with its files."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "sentinel.txt").write_text("keep me")
    monkeypatch.chdir(project)
    for name in ("train", "val", "test", "train_slices"):  # even when it looks like a data set
        (project / f"{name}.list").write_text("x\n")
    assert prepare_acdc.main(["--out", ".", "--force", "--patients", "3"]) == 1
    assert "current directory" in capsys.readouterr().err
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_text("keep me too")
    assert prepare_acdc.main(["--out", str(foreign), "--force", "--patients", "3"]) == 1
    assert "not a data set" in capsys.readouterr().err
    assert (project / "sentinel.txt").read_text() == "keep me" and (foreign / "holiday.jpg").exists()
    assert dataset_names(tmp_path) == ["photos", "project"]  # no staging folder left behind


def test_forced_replace_is_atomic_and_leftovers_are_cleaned(tmp_path):
    """A forced replace swaps the folders by renames: the new set is complete and nothing is left
    beside it. A kill between the two renames leaves the old set renamed aside; the next run puts it
    back before it starts. A staging folder of a killed run is deleted, and the set is not private."""
    out = tmp_path / "ACDC"
    assert prepare_acdc.main(["--out", str(out), "--patients", "3"]) == 0
    assert (out.stat().st_mode & 0o777) != 0o700
    assert prepare_acdc.main(["--out", str(out), "--patients", "4", "--force"]) == 0
    assert "--patients 4" in (out / "SYNTHETIC").read_text() and dataset_names(tmp_path) == ["ACDC"]
    out.rename(tmp_path / ".ACDC.old-999")  # killed between "old aside" and "new in"
    (tmp_path / ".ACDC.staging-abc").mkdir()  # killed while building
    prepare_acdc.clean_leftovers(out)
    assert dataset_names(tmp_path) == ["ACDC"] and prepare_acdc.check(out) == []


# ----------------------------------------------------------------------------- inference: whole volumes, sliding windows, segment, post-processing, pictures

def test_segment_slices_is_slice_by_slice_resize_argmax_resize_back():
    """Each slice resized to 32 x 32 as scipy.ndimage.zoom(order=0), segmented, the argmax zoomed back."""
    torch.manual_seed(0)
    model = bcp.UNet().eval()
    volume = torch.rand(3, 21, 30)
    prediction = inference.segment_slices(model, volume, (32, 32))
    resized = ndimage.zoom(volume.numpy(), (1, 32 / 21, 32 / 30), order=0)
    with torch.no_grad():
        labels = model(torch.from_numpy(resized)[:, None]).argmax(1).numpy()
    assert prediction.shape == (3, 21, 30) and prediction.dtype == torch.long
    np.testing.assert_array_equal(prediction.numpy(), ndimage.zoom(labels, (1, 21 / 32, 30 / 32), order=0))


def test_window_starts_by_hand():
    """UA-MT: ceil((size - window) / stride) + 1 windows, the last flush with the end."""
    assert inference.window_starts(100, 64, 18) == [0, 18, 36]
    assert inference.window_starts(101, 64, 18) == [0, 18, 36, 37]
    assert inference.window_starts(64, 64, 18) == [0]


class WindowModel(torch.nn.Module):
    """A stand-in network for sliding windows: a fixed 3D convolution of the window plus a ramp along
    each axis of the window, so that two windows covering one voxel give it different probabilities."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):  # (B, 1, D1, D2, D3) -> (B, 2, D1, D2, D3)
        ramps = [torch.linspace(-2, 2, n).view(-1, *[1] * (2 - axis)) * (axis + 1) for axis, n in enumerate(x.shape[2:])]
        return self.conv(x) + torch.stack([sum(ramps), -sum(ramps)]).unsqueeze(0) * 0.5


def test_strides_cover_every_voxel_or_are_refused(la_root, tmp_path, capsys):
    """A stride larger than the window would leave voxels no window covers: refused by evaluate.py and
    train.py in one line; the default (the authors' 18, 4) is cut to a smaller patch; the library raises."""
    torch.save({"model": bcp.VNet().state_dict(), "flags": {"num_classes": 2, "patch_size": [32, 32, 16]}}, tmp_path / "v.pt")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--root", str(la_root), "--checkpoint", str(tmp_path / "v.pt"), "--stride", "60", "30"])
    assert stop.value.code == 2 and "--stride 60 30: larger than the window [32, 32, 16]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--root", str(la_root), "--patch-size", "32", "32", "16", "--stride", "16", "20"])
    assert "--stride 16 20: larger than the window [32, 32, 16]" in capsys.readouterr().err
    assert train.parse_args(["--root", str(la_root), "--patch-size", "16", "32", "16"]).stride == [16, 4]
    assert train.parse_args(["--root", str(la_root), "--patch-size", "32", "32", "16"]).stride == [18, 4]
    with pytest.raises(ValueError, match="stride must lie in 1 .. the window"):
        inference.window_starts(100, 32, 40)
    probabilities = inference.sliding_window_probabilities(WindowModel().eval(), torch.randn(40, 40, 20), (16, 16, 16),
                                                     inference.window_strides(inference.checked_strides(None, [16, 16, 16])))
    assert torch.isfinite(probabilities).all()


def test_sliding_window_is_the_direct_forward_when_the_volume_is_the_window():
    model = bcp.VNet().eval()
    image = torch.randn(32, 16, 16)
    with torch.no_grad():
        direct = model(image[None, None]).softmax(1)[0]
    torch.testing.assert_close(inference.sliding_window_probabilities(model, image, (32, 16, 16), (18, 18, 4)), direct)


def test_sliding_window_pads_a_volume_smaller_than_the_window():
    """A 32 x 12 x 16 volume under a 32 x 16 x 16 window: zero-padded by 2 on each side of axis 1 (UA-MT
    pads evenly), one window, the result cropped back to 32 x 12 x 16."""
    model = bcp.VNet().eval()
    image = torch.randn(32, 12, 16)
    with torch.no_grad():
        expected = model(torch.nn.functional.pad(image, (0, 0, 2, 2))[None, None]).softmax(1)[0, :, :, 2:14]
    probabilities = inference.sliding_window_probabilities(model, image, (32, 16, 16), (18, 18, 4))
    assert probabilities.shape == (2, 32, 12, 16)
    torch.testing.assert_close(probabilities, expected)


def test_overlapping_windows_average_the_probabilities():
    """Windows overlapping on a 48-long axis (starts 0, 16, 32 for a 16 window, stride 16... and 8): each
    voxel's probability is the mean over the windows that cover it, computed here window by window."""
    model = bcp.VNet().eval()
    image = torch.randn(48, 16, 16)
    with torch.no_grad():
        windows = {start: model(image[start:start + 32][None, None]).softmax(1)[0] for start in (0, 8, 16)}
    total, count = torch.zeros(2, 48, 16, 16), torch.zeros(48, 1, 1)
    for start, probs in windows.items():
        total[:, start:start + 32] += probs
        count[start:start + 32] += 1
    torch.testing.assert_close(inference.sliding_window_probabilities(model, image, (32, 16, 16), (8, 8, 8)), total / count)


def authors_sliding_window(model, image, patch, stride_xy, stride_z):
    """UA-MT's test_single_case (the BCP authors' LA test), in numpy: windows every stride along each
    axis (xy, xy, z), the last flush with the end, softmax summed and divided by the count; argmax."""
    ww, hh, dd = image.shape
    starts = [[min(stride * i, size - p) for i in range(math.ceil((size - p) / stride) + 1)]
              for size, p, stride in zip((ww, hh, dd), patch, (stride_xy, stride_xy, stride_z))]
    score_map, count = np.zeros((2, ww, hh, dd)), np.zeros((ww, hh, dd))
    for xs in starts[0]:
        for ys in starts[1]:
            for zs in starts[2]:
                window = image[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]]
                with torch.no_grad():
                    y = model(torch.from_numpy(np.ascontiguousarray(window))[None, None]).softmax(1)[0].numpy()
                score_map[:, xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += y
                count[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += 1
    return score_map / count


def largest_connected_component(mask):
    """The authors' getLargestCC, on scipy: the largest 26-connected component (ties to the first label)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1 if count else mask


def test_sliding_window_with_unequal_strides_matches_the_authors_loop():
    """A 45 x 38 x 29 volume, a 20 x 16 x 12 window, strides 7, 5, 3 (5 x 6 x 7 = 210 windows, in batches
    of 4, overlapping along every axis): the probabilities equal a window-by-window loop; then --stride
    XY Z = 5 3 through segment equals the authors' loop with stride_xy 5, stride_z 3, and its largest
    component."""
    model = WindowModel().eval()
    image = np.random.default_rng(0).normal(size=(45, 38, 29)).astype(np.float32)

    def loop(strides):
        starts = [inference.window_starts(s, w, t) for s, w, t in zip(image.shape, (20, 16, 12), strides)]
        total, count = np.zeros((2, *image.shape)), np.zeros(image.shape)
        for corner in itertools.product(*starts):
            box = tuple(slice(c, c + w) for c, w in zip(corner, (20, 16, 12)))
            with torch.no_grad():
                total[(slice(None), *box)] += model(torch.from_numpy(np.ascontiguousarray(image[box]))[None, None]).softmax(1)[0].numpy()
            count[box] += 1
        return total / count

    assert [len(inference.window_starts(s, w, t)) for s, w, t in zip(image.shape, (20, 16, 12), (7, 5, 3))] == [5, 6, 7]
    ours = inference.sliding_window_probabilities(model, torch.from_numpy(image), (20, 16, 12), (7, 5, 3)).numpy()
    np.testing.assert_allclose(ours, loop((7, 5, 3)), atol=1e-6)
    authors = authors_sliding_window(model, image, (20, 16, 12), 5, 3)
    np.testing.assert_allclose(inference.sliding_window_probabilities(model, torch.from_numpy(image), (20, 16, 12),
                                                                inference.window_strides((5, 3))).numpy(), authors, atol=1e-6)
    labels = inference.segment(model, torch.from_numpy(image), data.LA_PLAN, [20, 16, 12], (5, 3), keep_largest=[1]).numpy()
    np.testing.assert_array_equal(labels, largest_connected_component(authors.argmax(0) == 1))


def test_probabilities_resampled_back_keep_a_thin_structure_that_nearest_labels_lose():
    """A thin class between two others, under-resolved on the coarse grid: no coarse voxel has it as
    the argmax, so nearest-neighbour labels lose it; the probabilities resampled (trilinear), then the
    argmax, find it between the two. Along each axis; and resample_argmax equals a whole-volume
    trilinear resampling then the argmax, slab by slab."""
    for axis in range(3):
        probabilities = torch.tensor([[0.45, 0.15], [0.40, 0.40], [0.15, 0.45]]).view(3, *[2 if a == axis else 1 for a in range(3)])
        size = [3 if a == axis else 1 for a in range(3)]
        nearest = data.resample_labels(probabilities.argmax(0), size)
        assert (nearest == 1).sum() == 0
        resampled = inference.resample_argmax(probabilities, size, [2 / 3] * 3)
        assert resampled.flatten().tolist() == [0, 1, 2]
    probabilities = torch.rand(4, 9, 7, 11).softmax(0)
    steps = (9 / 13, 1.3, 0.6)
    whole = data.resample_spacing(probabilities, (13, 5, 17), steps).argmax(0)
    torch.testing.assert_close(inference.resample_argmax(probabilities, (13, 5, 17), steps, slab=4).long(), whole)


def test_segment_takes_the_probabilities_back_to_the_scans_grid():
    """segment(native=...) resamples the window probabilities, not the labels: a 1 x 1 x 1 convolution
    turns intensities 0 and 1 into the two columns of the thin-structure case above, and the scan's
    grid, one voxel finer, finds the thin class between them."""
    probabilities = torch.tensor([[0.45, 0.40, 0.15], [0.15, 0.40, 0.45]]).log()  # at intensity 0, at 1
    model = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():
        model.weight.copy_((probabilities[1] - probabilities[0]).view(3, 1, 1, 1, 1))
        model.bias.copy_(probabilities[0])
    image = torch.tensor([0.0, 1.0]).view(1, 1, 2)
    labels = inference.segment(model, image, data.LA_PLAN, [1, 1, 2], (1, 1), native=((1, 1, 3), (1, 1, 2 / 3)))
    assert labels.flatten().tolist() == [0, 1, 2]


def test_a_rescaled_model_segments_at_full_resolution():
    """scale 0.5: the 32^3 volume is segmented at 16^3 and the probabilities resampled back (trilinear)
    before the argmax and the largest component, so the labels have the volume's full size."""
    model = bcp.VNet().eval()
    image = torch.randn(32, 32, 32)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(image[None, None], size=[16, 16, 16], mode="trilinear")
        probabilities = torch.nn.functional.interpolate(model(small).softmax(1), size=[32, 32, 32], mode="trilinear")[0]
    expected = bcp.keep_largest_components(probabilities.argmax(0)[None], [1])[0]
    labels = inference.segment(model, image, data.LA_PLAN, [16, 16, 16], (16, 16), scale=0.5, keep_largest=[1])
    assert labels.shape == (32, 32, 32) and torch.equal(labels, expected)


def test_largest_component_is_kept_only_where_validation_gains():
    """nnU-Net's rule on hand-built validation cases: class 1 is two true components, both predicted,
    so keeping its largest costs Dice (not kept); class 2 is one component with a spurious predicted
    blob, so keeping the largest gains (kept)."""
    label = torch.zeros(20, 20, 6, dtype=torch.long)
    label[1:6, 1:6, 1:4], label[12:15, 12:15, 1:4] = 1, 1
    label[1:6, 12:18, 1:5] = 2
    prediction = label.clone()
    prediction[15:18, 1:3, 1:3] = 2  # spurious
    largest = bcp.keep_largest_components(prediction[None], [1, 2])[0]
    as_predicted, largest_only = (bcp.dice_per_class(p, label, 3, "nnunet").tolist() for p in (prediction, largest))
    assert as_predicted[0] == 1.0 > largest_only[0] and as_predicted[1] < 1.0 == largest_only[1]
    classes, post_processed = inference.choose_post_processing(as_predicted, largest_only)
    assert classes == [2] and post_processed == [1.0, 1.0]
    kept = bcp.keep_largest_components(prediction[None], classes)[0]
    assert torch.equal(kept, label)  # both components of class 1 stay


def test_the_best_checkpoint_is_the_best_after_its_post_processing(monkeypatch):
    """Your own scans: each validation is scored as evaluation will score it, with the post-processing it
    chose. A later step whose largest-component Dice (0.8) beats the earlier step's as-predicted Dice (0.6)
    is kept as best.pt, with class 1 kept to its largest component, though as predicted it scores less."""
    validations = iter([([0.6], [0.55], False, []), ([0.5], [0.8], False, []), ([0.7], [0.4], False, [])])
    monkeypatch.setattr(train, "validate", lambda *_: next(validations))
    saved, logged = [], []
    folder = SimpleNamespace(best_path="best", last_path="last", log=logged.append, write_metrics=lambda row: None,
                             save_picture=lambda *_: None, save_curves=lambda: None)
    progress = {"best_dice": -1.0, "best_iteration": 0}
    run = SimpleNamespace(student=None, args=SimpleNamespace(dataset=SimpleNamespace(names_of_classes=lambda _: ("LA",)), num_classes=2),
                          autocast=None)
    for iteration in (100, 200, 300):
        train.validate_and_save(run, [], folder, progress, iteration, None, lambda path, step: saved.append((path, step)))
    assert [step for path, step in saved if path == "best"] == [100, 200]
    assert (progress["best_dice"], progress["best_iteration"], progress["keep_largest"]) == (0.8, 200, [1])
    assert "iter 200 | val Dice 0.8000 with the largest component kept for classes 1 (as predicted LA 0.5000" in logged[1]


def test_png_writer_round_trip(tmp_path):
    """Decode our PNG with zlib by hand: the pixels come back unchanged."""
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pictures.write_png(tmp_path / "a.png", rgb)
    png = (tmp_path / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (7, 5)
    idat = png.index(b"IDAT")
    length = struct.unpack(">I", png[idat - 4:idat])[0]
    rows = np.frombuffer(zlib.decompress(png[idat + 4:idat + 4 + length]), np.uint8).reshape(5, 1 + 7 * 3)
    assert (rows[:, 0] == 0).all()
    np.testing.assert_array_equal(rows[:, 1:].reshape(5, 7, 3), rgb)


# ----------------------------------------------------------------------------- training: train.py's flags, schedules, random streams, steps, runs, resume, stops; benchmark.py

@pytest.mark.parametrize("flags,message", [
    (["--iterations", "0"], "--iterations: must be at least 1"),
    (["--iterations", "-5"], "--iterations: must be at least 1"),
    (["--val-every", "0"], "--val-every: must be at least 1"),
    (["--log-every", "0"], "--log-every: must be at least 1"),
    (["--time-limit", "0.5"], "--time-limit: must be at least 1.0"),
    (["--phase", "supervised", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--patch-size", "40"], "--patch-size must be a multiple of 16"),
    (["--device", "banana"], "--device banana: not a device"),
    (["--beta", "1.5"], "--beta must lie between 0 and 1"),
    (["--resume", "--overwrite"], "give one"),
    (["--scale", "0.5"], "--scale applies to 3D volumes only"),
    (["--stride", "16", "8"], "--stride applies to 3D volumes only"),
    (["--val-cases", "3"], "--val-cases applies to cases held aside from train.list only"),
    (["--foreground-crops", "0.5"], "--foreground-crops applies to crops of whole volumes only"),
    (["--standardize"], "--standardize applies to 3D volumes only"),
    (["--schedule", "cpu", "--phase", "supervised"], "--schedule cpu times pre-training and self-training"),
])
def test_bad_flags_get_one_line_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(flags)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and message in error


@pytest.mark.parametrize("flags,precision,line", [
    (["avx512_bf16"], "bf16", "precision bf16; this CPU computes bf16 natively (avx512_bf16)"),
    ([], "bf16", "precision bf16; this CPU has no bf16 instructions: bf16 is emulated, likely slower"),
    ([], "fp32", "precision fp32; this CPU has no bf16 instructions")])
def test_the_log_says_whether_the_cpu_computes_bf16(flags, precision, line, monkeypatch):
    monkeypatch.setattr(train, "cpu_bf16", lambda: flags)
    assert train.precision_line(SimpleNamespace(precision=precision), torch.device("cpu")) == line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_la_defaults_are_the_authors_la_script(la_root):
    args = train.parse_args(["--root", str(la_root), "--phase", "selftrain"])
    assert (args.patch_size, args.batch_size, args.labeled_batch_size, args.iterations, args.lr_step) == ((112, 112, 80), 8, 4, 15000, 2500)
    assert (args.dice_loss, args.selftrain_sgd, args.num_classes, args.labeled_patients) == ("la", "fresh", 2, 8)
    assert train.parse_args(["--root", str(la_root), "--phase", "pretrain"]).pretrain_loss == "whole"
    assert [train.learning_rate(args, t) for t in (1, 2500, 2501, 5001)] == pytest.approx([0.01, 0.01, 0.001, 0.0001])


def test_cpu_schedule_sets_its_values_flags_win_and_paper_stays(synthetic_root, la_root, monkeypatch):
    monkeypatch.setattr(train, "cpu_bf16", lambda: [])  # a CPU without bf16 instructions
    acdc = train.parse_args(["--root", str(synthetic_root), "--phase", "selftrain", "--schedule", "cpu", "--batch-size", "8"])
    assert (acdc.patch_size, acdc.iterations, acdc.labeled_batch_size, acdc.lr_decay) == ((160, 160), 4000, 6, "poly")
    assert acdc.batch_size == 8 and "batch_size" not in acdc.set_by_schedule and "patch_size" in acdc.set_by_schedule
    paper = train.parse_args(["--root", str(synthetic_root), "--phase", "selftrain"])
    assert (paper.patch_size, paper.iterations, paper.batch_size, paper.lr_decay, paper.val_every) == ((256, 256), 30000, 24, "step", 200)
    assert paper.set_by_schedule == []
    la = train.parse_args(["--root", str(la_root), "--phase", "pretrain", "--schedule", "cpu"])
    assert (la.patch_size, la.scale, la.standardize, la.iterations) == ((64, 64, 32), 0.5, True, 800)
    assert train.parse_args(["--root", str(la_root), "--schedule", "cpu", "--no-standardize"]).standardize is False


def test_cpu_schedule_trains_in_bf16_with_more_steps_where_the_cpu_computes_bf16(synthetic_root, la_root, monkeypatch):
    def parse(*flags, root=synthetic_root):
        return train.parse_args(["--root", str(root), "--phase", "selftrain", *flags])
    monkeypatch.setattr(train, "cpu_bf16", lambda: ["avx512_bf16"])
    native = parse("--schedule", "cpu")
    assert (native.schedule_key, native.precision, native.iterations) == ("acdc_bf16", "bf16", 7500) and "precision" in native.set_by_schedule
    la_native = parse("--schedule", "cpu", root=la_root)
    assert (la_native.schedule_key, la_native.precision, la_native.iterations) == ("la_bf16", "bf16", 3400)
    assert (parse("--schedule", "cpu", "--precision", "fp32").iterations, parse().precision, parse().schedule_key) == (4000, "fp32", None)
    monkeypatch.setattr(train, "cpu_bf16", lambda: [])
    assert (parse("--schedule", "cpu").precision, parse("--schedule", "cpu", "--precision", "bf16").iterations) == ("fp32", 7500)


# Commit 1a93707, before the plans, with these flags: a hash of each phase's 20 first steps' draws (labeled halves
# and their labels, M; unlabeled halves and their labels), and the losses it logged for those steps.
FIRST_STEPS_FLAGS = {"acdc": ["--patch-size", "32", "--batch-size", "4", "--labeled-batch-size", "2", "--labeled-patients", "2"],
                     "la": ["--patch-size", "32", "32", "16", "--batch-size", "4", "--labeled-batch-size", "2",
                            "--labeled-patients", "2", "--val-cases", "2", "--stride", "16", "16"]}
DRAWS_AT_1A93707 = {("acdc", "pretrain"): "b3016e346a5f1808", ("acdc", "selftrain"): "004cfbab10e632c8",
                    ("la", "pretrain"): "844037e971624e88", ("la", "selftrain"): "eda901223d87c631"}
LOSSES_AT_1A93707 = {
    ("acdc", "pretrain"): [2.35998, 2.18333, 1.90861, 1.6194, 1.28681, 1.10927, 1.05986, 1.04786, 0.87302, 0.87143, 0.84825,
                           0.79564, 0.86631, 0.76518, 0.83038, 0.87557, 0.93896, 0.75862, 0.7895, 0.79086],
    ("acdc", "selftrain"): [1.24137, 1.24241, 1.31542, 1.30777, 1.25556, 1.20528, 1.20503, 1.18859, 1.21683, 1.21908, 1.28287,
                            1.18111, 1.24382, 1.31871, 1.44057, 1.1976, 1.20555, 1.28024, 1.18951, 1.19428],
    ("la", "pretrain"): [0.64471, 0.51796, 0.62279, 0.5266, 0.52927, 0.42741, 0.55966, 0.49413, 0.52911, 0.38684, 0.35824,
                         0.40495, 0.47625, 0.4117, 0.38838, 0.32947, 0.34172, 0.30165, 0.31065, 0.29174],
    ("la", "selftrain"): [0.99269, 1.06143, 0.97691, 1.07003, 1.11929, 0.77108, 1.11391, 1.37254, 0.64958, 0.87429, 0.72982,
                          0.91289, 0.92324, 1.08632, 1.35863, 0.7405, 0.60971, 0.89379, 0.86925, 1.60484],
}


def first_steps_digest(args):
    """The hash of a phase's draws in its 20 first steps, as recorded in DRAWS_AT_1A93707."""
    def digest(*tensors):
        hashed = hashlib.sha256()
        for tensor in tensors:
            hashed.update(tensor.contiguous().numpy().tobytes())
        return hashed.hexdigest()[:16]
    labeled, unlabeled, *_ = train.load_data(args, torch.device("cpu"))
    steps = []
    for step in range(1, 21):
        (l_a, l_b), (g_a, g_b) = train.draw_halves(labeled, step, args.labeled_batch_size, args, train.LABELED)
        parts = [l_a, l_b, g_a, g_b, train.draw_mask(step, args, "cpu")]
        if args.phase == "selftrain":
            (u_a, u_b), (h_a, h_b) = train.draw_halves(unlabeled, step, args.batch_size - args.labeled_batch_size, args, train.UNLABELED)
            parts += [u_a, u_b, h_a, h_b]
        steps.append(digest(*parts))
    return hashlib.sha256("".join(steps).encode()).hexdigest()[:16]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["acdc", "la"])
def test_the_first_steps_draw_and_lose_what_they_did_before_the_plans(kind, synthetic_root, la_root, tmp_path):
    """With the same flags, each phase draws bitwise the batches, augmentation and masks of its 20 first steps
    that commit 1a93707 drew, and logs its losses (to 1 %: another CPU's convolutions round differently)."""
    root = {"acdc": synthetic_root, "la": la_root}[kind]
    for phase in ("pretrain", "selftrain"):
        flags = ["--root", str(root), *FIRST_STEPS_FLAGS[kind], "--phase", phase, "--out", str(tmp_path), "--device", "cpu"]
        assert first_steps_digest(train.parse_args(flags)) == DRAWS_AT_1A93707[kind, phase]
        train.main([*flags, "--iterations", "20", "--log-every", "1", "--val-every", "10",
                    *(["--init", str(tmp_path / "pretrain" / "best.pt")] if phase == "selftrain" else [])])
        rows, _ = data.read_metrics(tmp_path / phase / "metrics.jsonl")
        assert [row["loss"] for row in rows if "loss" in row] == pytest.approx(LOSSES_AT_1A93707[kind, phase], rel=0.01)


def test_poly_learning_rate_falls_to_zero_over_the_phase(synthetic_root):
    args = train.parse_args(["--root", str(synthetic_root), "--schedule", "cpu", "--iterations", "100", "--lr", "0.02"])
    rates = [train.learning_rate(args, t) for t in range(1, 101)]
    assert rates[0] == 0.02 and rates[50] == pytest.approx(0.02 * 0.5 ** 0.9) and rates[-1] == pytest.approx(0.02 * 0.01 ** 0.9)
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_hour_eta_adds_the_self_training_to_come_only_while_pretraining(synthetic_root, monkeypatch):
    monkeypatch.setattr(train, "cpu_bf16", lambda: [])
    pretrain = train.parse_args(["--root", str(synthetic_root), "--schedule", "cpu", "--phase", "pretrain"])
    measured, steps = data.ACDC_PLAN.cpu_seconds["acdc"], data.ACDC_PLAN.cpu_settings["acdc"]["iterations"]["selftrain"]
    fixed = {"budget": None}
    assert train.later_phases_seconds(pretrain, fixed, 2 * measured["pretrain"]) == pytest.approx(2 * steps * measured["selftrain"])
    selftrain = train.parse_args(["--root", str(synthetic_root), "--schedule", "cpu", "--phase", "selftrain"])
    assert train.later_phases_seconds(selftrain, fixed, 1.0) == 0
    budget = {"steps": {"pretrain": 100, "selftrain": 300}, "seconds": {"pretrain": 0.1, "selftrain": 0.3, "validation": 5.0}}
    planned = (100 * 0.1 + 5.0) / 100  # a pre-training step with its share of the validations
    assert train.later_phases_seconds(pretrain, {"budget": budget}, 2 * planned) == pytest.approx(2 * (300 * 0.3 + 5.0))


@pytest.mark.parametrize("pretrain,selftrain,validation", [(0.14, 0.36, 4.0), (0.07, 0.18, 2.0), (0.5, 1.3, 12.0)])
def test_budget_steps_fill_the_budget_on_slow_and_fast_machines(pretrain, selftrain, validation):
    """Steps at the paper's 1 : 3 share, validations every 500 and at each end: the hour holds both phases and
    not one unit of steps more; a machine twice as fast plans twice the steps; self-training alone fills what
    pre-training left."""
    hour, step_seconds = 3600, {"pretrain": pretrain, "selftrain": selftrain}
    steps = train.budget_steps(hour, step_seconds, validation, 500, {"pretrain": 1, "selftrain": 3})
    assert steps["selftrain"] in (3 * steps["pretrain"], 3 * steps["pretrain"] + 1, 3 * steps["pretrain"] + 2)
    spent = {phase: train.phase_seconds(count, step_seconds[phase], validation, 500) for phase, count in steps.items()}
    unit = pretrain + 3 * selftrain + 4 * validation / 500
    assert hour - unit - 2 * validation <= sum(spent.values()) <= hour
    faster = train.budget_steps(hour, {phase: seconds / 2 for phase, seconds in step_seconds.items()}, validation / 2, 500,
                                {"pretrain": 1, "selftrain": 3})
    assert 2 * steps["pretrain"] <= faster["pretrain"] <= 2.01 * steps["pretrain"]
    left = train.budget_steps(hour - spent["pretrain"], {"selftrain": selftrain}, validation, 500, {"selftrain": 1})
    assert hour - spent["pretrain"] - selftrain - validation <= train.phase_seconds(left["selftrain"], selftrain, validation, 500) + spent["pretrain"] <= hour
    assert left["selftrain"] >= steps["selftrain"]


@pytest.mark.slow
def test_a_budget_plans_both_phases_before_their_first_step_and_resume_keeps_the_plan(synthetic_root, tmp_path, monkeypatch,
                                                                                    capsys):
    """--budget: pre-training measures a step and a validation (here: given), plans both phases and trains its
    planned steps with the lr decayed over them; flags.json and the checkpoints keep the plan, and --resume
    trains on it without measuring again; self-training plans again from what pre-training left."""
    measured = {"pretrain": (0.1, 0.5), "selftrain": (0.26, 0.5)}  # seconds a step, a validation
    monkeypatch.setattr(train, "measured_seconds", lambda run, cases, compiled: measured[run.args.phase])
    common = ["--root", str(synthetic_root), *TINY, "--val-every", "1000", "--out", str(tmp_path), "--schedule", "cpu",
              "--precision", "fp32", "--budget", "1"]
    train.main([*common, "--phase", "pretrain"])
    planned = inference.load_checkpoint(tmp_path / "pretrain" / "last.pt")["budget"]
    steps = planned["steps"]
    assert steps["selftrain"] in (3 * steps["pretrain"], 3 * steps["pretrain"] + 1, 3 * steps["pretrain"] + 2)
    assert 30 < steps["pretrain"] < 60 * 0.97 / (0.1 + 3 * 0.1 * data.ACDC_PLAN.selftrain_cost("acdc"))
    assert json.loads((tmp_path / "pretrain" / "flags.json").read_text())["iterations"] == steps["pretrain"]
    rows, _ = data.read_metrics(tmp_path / "pretrain" / "metrics.jsonl")
    assert rows[-1]["iter"] == steps["pretrain"] and rows[-2]["lr"] < 0.01 * (1 / steps["pretrain"]) ** 0.9 * 1.01
    assert f"pretrain {steps['pretrain']} steps" in capsys.readouterr().out
    monkeypatch.setattr(train, "measured_seconds", lambda *_: pytest.fail("a resumed run measured again"))
    train.main([*common, "--phase", "pretrain", "--resume"])
    assert inference.load_checkpoint(tmp_path / "pretrain" / "last.pt")["budget"] == planned
    monkeypatch.setattr(train, "measured_seconds", lambda run, cases, compiled: measured[run.args.phase])
    train.main([*common, "--phase", "selftrain", "--init", str(tmp_path / "pretrain" / "best.pt")])
    assert "pre-training took" in capsys.readouterr().out  # a few seconds, faster than planned: more steps are left
    replanned = inference.load_checkpoint(tmp_path / "selftrain" / "last.pt")["budget"]["steps"]["selftrain"]
    assert steps["selftrain"] <= replanned <= 60 / 0.26


def test_a_budget_goes_with_planned_steps_in_one_process_and_a_decaying_lr(synthetic_root, monkeypatch, capsys):
    """--budget plans the steps: given with --iterations, or under torchrun, it is refused in one line, and with a
    constant lr; under --schedule cpu those turn the schedule's budget off (fixed steps) instead."""
    def parse(*flags):
        return train.parse_args(["--root", str(synthetic_root), "--phase", "pretrain", *flags])
    for flags, message in ((("--budget", "30", "--iterations", "100"), "--budget plans"),
                           (("--budget", "30"), "--budget decays the lr over the steps it plans: add --lr-decay poly")):
        with pytest.raises(SystemExit):
            parse(*flags)
        assert message in capsys.readouterr().err
    assert parse("--budget", "30", "--lr-decay", "poly").budget == 30
    fixed = parse("--schedule", "cpu", "--iterations", "100")
    assert (fixed.budget, fixed.iterations, "budget" in fixed.set_by_schedule) == (None, 100, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse("--schedule", "cpu", "--labeled-batch-size", "8").budget is None


@pytest.mark.slow
def test_timing_a_budgeted_phase_leaves_the_run_as_it_was(synthetic_root, tmp_path):
    """measured_seconds steps copies of the models and SGD: the student, the teacher, SGD's momentum (carried
    from a step already taken) and torch's generator are bitwise what they were, and the times are positive."""
    run = step_setup(synthetic_root, TINY, "selftrain", tmp_path)
    train.selftrain_step(run, 1)  # momentum buffers to carry
    _, _, cases, _, _ = train.load_data(run.args, run.device)
    before = copy.deepcopy((run.student.state_dict(), run.teacher.state_dict(), run.optimizer.state_dict()))
    rng = torch.get_rng_state()
    step, validation = train.measured_seconds(run, cases, lambda model: model)
    assert step > 0 and validation > 0 and torch.equal(torch.get_rng_state(), rng)
    after = (run.student.state_dict(), run.teacher.state_dict(), run.optimizer.state_dict())
    for old, new in zip(before[:2], after[:2]):
        assert all(torch.equal(old[key], new[key]) for key in old)
    momentum = [(before[2]["state"][k]["momentum_buffer"], after[2]["state"][k]["momentum_buffer"]) for k in before[2]["state"]]
    assert momentum and all(torch.equal(old, new) for old, new in momentum)


def test_each_validation_of_a_budgeted_phase_plans_the_steps_that_still_fit():
    """100 s allotted, a validation 1 s every 10 steps: after 50 steps in 44 s (4 validations before this one: 0.8 s
    a step) the 56 s left hold this validation and 55 s, 60 more steps with their 6 validations (54 s); after 50 in
    84 s (1.6 s a step) 15 s hold 8 more (13.8 s); after 50 in 100 s none. The plan and flags.json follow."""
    for elapsed, steps in ((44.0, 110), (84.0, 58), (100.0, 50)):
        budget = {"steps": {"pretrain": 100}, "seconds": {"validation": 1.0}, "allotted": 100.0}
        args, said = SimpleNamespace(iterations=100, phase="pretrain", val_every=10), []
        folder = SimpleNamespace(log=said.append, write_flags=lambda: said.append("flags"))
        train.replan_budget(args, {"budget": budget}, 50, elapsed, folder)
        assert args.iterations == budget["steps"]["pretrain"] == steps and said[-1] == "flags"
        assert f"{steps} steps fit this phase" in said[0]


@pytest.mark.slow
def test_a_budgeted_phase_ends_where_its_validations_plan_it(synthetic_root, tmp_path, monkeypatch):
    """The loop follows the plan a validation makes: a phase planned for many steps that its first
    validation (step 10) cuts to 15 ends at step 15, validated there, its lr decayed to the new end."""
    monkeypatch.setattr(train, "measured_seconds", lambda run, cases, compiled: (0.1, 0.5))
    def cut(args, progress, iteration, elapsed, folder):
        args.iterations = progress["budget"]["steps"][args.phase] = iteration + 5
    monkeypatch.setattr(train, "replan_budget", cut)
    train.main(["--root", str(synthetic_root), *TINY, "--val-every", "10", "--out", str(tmp_path), "--schedule", "cpu",
                "--precision", "fp32", "--budget", "1", "--phase", "pretrain"])
    rows, _ = data.read_metrics(tmp_path / "pretrain" / "metrics.jsonl")
    assert [row["iter"] for row in rows if "val_dice" in row] == [10, 15]
    assert rows[-2]["lr"] == pytest.approx(0.01 * (1 / 15) ** 0.9)
    assert inference.load_checkpoint(tmp_path / "pretrain" / "last.pt")["budget"]["steps"]["pretrain"] == 15


def test_each_phase_draws_its_own_batches_and_masks(synthetic_root):
    """Self-training's step t must not replay pre-training's step t (same labeled slices, same mask)."""
    bank = data.Dataset(synthetic_root).bank(data.Dataset(synthetic_root).cases(2)[0], "cpu")
    args = {phase: train.parse_args(["--phase", phase, *TINY]) for phase in ("pretrain", "selftrain")}
    for step in (1, 2, 3):
        assert not torch.equal(*[train.draw_batch(bank, step, 2, args[phase], train.LABELED)[0] for phase in args])
    assert any(not torch.equal(*[train.draw_mask(step, args[phase], "cpu") for phase in args]) for step in range(1, 6))


class BlockingCopies(TorchDispatchMode):
    """Records each host -> device copy that makes the host wait for the device (non_blocking=False)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            source, target, blocking = args[0].device, kwargs.get("device", args[0].device), not kwargs.get("non_blocking")
        elif func is torch.ops.aten.copy_.default:
            source, target, blocking = args[1].device, args[0].device, not (args[2:] or [kwargs.get("non_blocking")])[0]
        else:
            return func(*args, **kwargs)
        if source.type == "cpu" and target.type != "cpu" and blocking:
            self.seen.append(func)
        return func(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["pretrain", "selftrain"])
def test_a_step_never_waits_for_the_device(phase, monkeypatch):
    """Batches, augmentation, mask, step, SGD and EMA on the meta device, which stands in for a GPU: it
    holds no data, so any op that must read values on the host fails there, and every host -> device
    copy is seen by the dispatcher. The teacher's connected components are the one part that reads
    values (bcp.largest_component); here the pseudo-label is the plain argmax."""
    monkeypatch.setattr(bcp, "pseudo_label", lambda logits: logits.argmax(1))
    device = torch.device("meta")
    rng = np.random.default_rng(0)
    images = [rng.random(shape).astype(np.float32) for shape in [(37, 29), (20, 41), (32, 32), (30, 30)]]
    bank = data.SliceBank(images, [(image * 4).astype(np.uint8) for image in images], device)
    run = tiny_run(["--phase", phase, *TINY], bank, bank, device)
    with BlockingCopies() as copies:
        loss, _, _ = train.STEPS[phase](run, 7)
    assert loss.device == device and copies.seen == []


def test_models_run_channels_last_on_the_cpu_with_the_same_logits(synthetic_root, la_root):
    for root, network, image, expected in ((synthetic_root, bcp.UNet, torch.rand(2, 1, 32, 32), torch.channels_last),
                                           (la_root, bcp.VNet, torch.rand(2, 1, 32, 32, 16), torch.channels_last_3d)):
        _, _, memory_format, _ = inference.runtime("cpu", "fp32", data.Dataset(root).plan.dims)
        assert memory_format == expected
        torch.manual_seed(0)
        model = network(num_classes=2).eval()
        contiguous = model(image)
        model.to(memory_format=memory_format)
        assert next(w for w in model.parameters() if w.dim() == image.dim()).is_contiguous(memory_format=expected)
        assert torch.allclose(model(image), contiguous, atol=1e-5)


def final_weights(run, phase):
    return inference.load_checkpoint(run / phase / "last.pt")["model"]


@pytest.mark.slow
def test_resumed_training_ends_with_the_same_weights(synthetic_root, tmp_path):
    """Pre-train 4 steps straight vs 2 steps + resume to 4; then self-train the same way. On the CPU
    with one seed both runs must end with identical student weights (and teacher for self-training)."""
    common = ["--root", str(synthetic_root), *TINY]
    for phase in ("pretrain", "selftrain"):
        train.main([*common, "--out", str(tmp_path / "straight"), "--phase", phase, "--iterations", "4"])
        train.main([*common, "--out", str(tmp_path / "resumed"), "--phase", phase, "--iterations", "2"])
        train.main([*common, "--out", str(tmp_path / "resumed"), "--phase", phase, "--iterations", "4", "--resume"])
        straight, resumed = (inference.load_checkpoint(tmp_path / run / phase / "last.pt") for run in ("straight", "resumed"))
        assert resumed["iteration"] == 4
        for part in ("model", "teacher") if phase == "selftrain" else ("model",):
            for key, value in straight[part].items():
                assert torch.equal(value, resumed[part][key]), (phase, part, key)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "selftrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(r["time"] >= 0 and r["lr"] == 0.01 for r in rows if "loss" in r)
    assert [r["iter"] for r in rows if "val_dice" in r] == [2, 4]


@pytest.mark.slow
def test_resume_survives_a_torn_metrics_line_and_refuses_other_flags(synthetic_root, tmp_path):
    command = ["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "2"]
    train.main(command)
    metrics = tmp_path / "pretrain" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"iter": 3, "lo')  # killed in the middle of a write
    with pytest.raises(data.DataError, match=r"last\.pt: trained with --patch-size 32 32 \(now 64 64\)"):
        train.main([*command[:-1], "4", "--resume", "--patch-size", "64"])
    with pytest.raises(data.DataError, match=r"--labeled-patients 2 \(now 3\)"):
        train.main([*command[:-1], "4", "--resume", "--labeled-patients", "3"])
    train.main([*command[:-1], "4", "--resume"])
    rows, torn = data.read_metrics(metrics)
    assert torn == 0 and [r["iter"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert not list((tmp_path / "pretrain").glob("*.tmp"))


@pytest.mark.slow
def test_rerun_without_resume_leaves_the_run_untouched(synthetic_root, tmp_path):
    """The same command again without --resume once overwrote best.pt and cut metrics.jsonl; now it
    refuses, naming the folder, and every file is byte-identical. --overwrite starts again: a new log,
    nothing of the old run's lines."""
    command = ["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "4"]
    train.main(command)
    run = tmp_path / "pretrain"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(data.DataError, match="already holds a run.*--resume.*--overwrite"):
        train.main([*command[:-1], "2"])
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    train.main([*command[:-1], "2", "--overwrite"])
    assert inference.load_checkpoint(run / "last.pt")["iteration"] == 2
    assert "iter 4" not in (run / "train.log").read_text() and "iter 2" in (run / "train.log").read_text()


@pytest.mark.slow
def test_time_limit_stops_cleanly_and_resume_ends_identical(synthetic_root, tmp_path, monkeypatch, capsys):
    """A clock that advances 4 s at every reading and a 1-minute limit cut an 8-step pre-train
    mid-way: last.pt is written, one line says where, the run returns normally. --resume then
    ends with weights identical to an uninterrupted run."""
    common = ["--root", str(synthetic_root), *TINY, "--phase", "pretrain", "--iterations", "8"]
    train.main([*common, "--out", str(tmp_path / "straight")])
    clock = iter(range(0, 10**6, 4))
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: float(next(clock))))
    train.main([*common, "--out", str(tmp_path / "cut"), "--time-limit", "1"])
    stopped = inference.load_checkpoint(tmp_path / "cut" / "pretrain" / "last.pt")["iteration"]
    assert 1 <= stopped < 8
    assert f"time limit: stopped at iteration {stopped} of 8; continue with --resume" in capsys.readouterr().out
    monkeypatch.undo()
    train.main([*common, "--out", str(tmp_path / "cut"), "--resume"])
    straight, resumed = (inference.load_checkpoint(tmp_path / run / "pretrain" / "last.pt") for run in ("straight", "cut"))
    assert resumed["iteration"] == 8
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.slow
def test_selftrain_carries_the_pretrain_momentum(synthetic_root, tmp_path, capsys):
    """From pretrain/best.pt the SGD momentum buffers come along (the authors' load_net_opt); from the
    same weights without SGD state they start fresh. After one identical step the buffers differ by
    exactly momentum * the pre-train's buffers (SGD: buffer = momentum * buffer + gradient)."""
    common = ["--root", str(synthetic_root), *TINY]
    train.main([*common, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "2"])
    pretrained = inference.load_checkpoint(tmp_path / "pretrain" / "best.pt")
    torch.save({"model": pretrained["model"], "flags": pretrained["flags"]}, tmp_path / "weights_only.pt")
    for run, init in (("with", tmp_path / "pretrain" / "best.pt"), ("without", tmp_path / "weights_only.pt")):
        train.main([*common, "--out", str(tmp_path / run), "--phase", "selftrain", "--iterations", "1",
                    "--val-every", "1", "--init", str(init)])
    assert "holds no SGD state" in capsys.readouterr().out
    carried, fresh = (inference.load_checkpoint(tmp_path / run / "selftrain" / "last.pt")["optimizer"]["state"]
                      for run in ("with", "without"))
    for index, state in pretrained["optimizer"]["state"].items():
        torch.testing.assert_close(carried[index]["momentum_buffer"] - fresh[index]["momentum_buffer"],
                                   0.9 * state["momentum_buffer"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("log_every", ["1", "5"])  # 5: the loss must still be checked before each checkpoint
def test_nan_loss_stops_and_keeps_checkpoints(synthetic_root, tmp_path, capsys, log_every):
    """A learning rate of 1e30 blows the loss up: the run stops with a message, last.pt stays loadable."""
    args = ["--root", str(synthetic_root), *TINY, "--log-every", log_every, "--out", str(tmp_path), "--phase", "pretrain",
            "--iterations", "2"]
    train.main(args)
    with pytest.raises(SystemExit):
        train.main([*args[:-1], "6", "--resume", "--lr", "1e30"])
    assert "stopping: the loss became" in capsys.readouterr().out
    checkpoint = inference.load_checkpoint(tmp_path / "pretrain" / "last.pt")
    assert checkpoint["iteration"] == 2 and all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nan_weights_never_reach_a_checkpoint(synthetic_root, tmp_path):
    """--lr 1e9 with a validation every step: the weights turn non-finite a step before the loss
    does. The run stops, and whatever checkpoint exists holds only finite numbers."""
    with pytest.raises(SystemExit):
        train.main(["--root", str(synthetic_root), *TINY, "--val-every", "1", "--lr", "1e9", "--out", str(tmp_path),
                    "--phase", "pretrain", "--iterations", "8"])
    checkpoints = list((tmp_path / "pretrain").glob("*.pt"))
    assert checkpoints
    for path in checkpoints:
        assert train.all_finite(inference.load_checkpoint(path)), path
    assert "stopping" in (tmp_path / "pretrain" / "train.log").read_text()


@pytest.mark.slow
def test_a_picture_that_cannot_be_written_costs_nothing_else(synthetic_root, tmp_path, monkeypatch, capsys):
    def fail(path, *args):
        raise OSError(f"[Errno 28] No space left on device: '{path}'")
    monkeypatch.setattr(pictures, "save_step_picture", fail)
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "4"])
    assert inference.load_checkpoint(tmp_path / "pretrain" / "last.pt")["iteration"] == 4
    assert "could not write the step picture" in capsys.readouterr().out


@pytest.mark.slow
def test_a_folder_in_a_pictures_way_costs_that_picture_only(synthetic_root, tmp_path, capsys):
    """A new run in a folder where a step picture's name is taken by a folder: the run trains to its end."""
    (tmp_path / "pretrain" / "pictures" / "iter_000002.png").mkdir(parents=True)
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "4"])
    assert inference.load_checkpoint(tmp_path / "pretrain" / "last.pt")["iteration"] == 4
    assert "could not write the step picture" in capsys.readouterr().out


class Background(torch.nn.Module):
    """A 2D model that predicts background (class 0) everywhere, or class 1 with foreground=True."""

    def __init__(self, foreground=False):
        super().__init__()
        self.foreground = foreground

    def forward(self, x):  # (B, 1, H, W) -> (B, 4, H, W)
        logits = torch.zeros(len(x), 4, *x.shape[2:])
        logits[:, int(self.foreground)] = 1
        return logits


def test_validation_notices_a_model_that_predicts_no_foreground(synthetic_root):
    args = train.parse_args(["--root", str(synthetic_root), *TINY, "--phase", "pretrain"])
    _, _, volumes, _, _ = train.load_data(args, torch.device("cpu"))
    assert train.validate(Background(), volumes, args, nullcontext())[2] is True
    assert train.validate(Background(foreground=True), volumes, args, nullcontext())[2] is False


@pytest.mark.slow
def test_selftrain_refuses_a_pretraining_that_predicts_no_foreground(synthetic_root, tmp_path, capsys):
    """A pre-training whose best checkpoint predicted no foreground on any validation volume: the phase ends
    with a warning that says what to try, and self-training refuses to start from it unless --init names it."""
    flags = ["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--iterations", "2"]
    train.main([*flags, "--phase", "pretrain"])
    best = tmp_path / "pretrain" / "best.pt"
    torch.save({**inference.load_checkpoint(best), "predicts_no_foreground": True}, best)  # as a collapsed run leaves it
    with pytest.raises(data.DataError, match=r"best\.pt: predicts no foreground on any validation volume that has some.*--labeled-batch-size"):
        train.main([*flags, "--phase", "selftrain"])
    assert not (tmp_path / "selftrain").exists()
    train.main([*flags, "--phase", "selftrain", "--init", str(best)])
    assert "predicts no foreground on any validation volume that has some; starting from it (--init)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_fully_supervised_la_row_trains_and_selftrain_asks_for_unlabeled_cases(la_root, tmp_path):
    """Every non-validation case labeled (6 + 2 of the 8 here, as 72 + 8 of LA's 80): --phase supervised
    trains; self-training says it has no unlabeled case."""
    flags = ["--root", str(la_root), *LA_TINY, "--labeled-patients", "6", "--out", str(tmp_path)]
    train.main([*flags, "--phase", "supervised", "--iterations", "1", "--batch-size", "2"])
    assert inference.load_checkpoint(tmp_path / "supervised" / "last.pt")["iteration"] == 1
    with pytest.raises(data.DataError, match="every training case is labeled; selftrain needs unlabeled ones"):
        train.main([*flags, "--phase", "selftrain", "--iterations", "1"])


@pytest.mark.slow
def test_bf16_autocast_path_trains(synthetic_root, tmp_path):
    """The GPU default (bf16 autocast) also runs on the CPU: two steps give a finite checkpoint whose
    weights differ from the same two steps in fp32 (bf16 was used), though not by much."""
    for precision in ("bf16", "fp32"):
        train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path / precision), "--phase", "pretrain",
                    "--iterations", "2", "--precision", precision])
    bf16, fp32 = (inference.load_checkpoint(tmp_path / p / "pretrain" / "last.pt") for p in ("bf16", "fp32"))
    assert bf16["flags"]["precision"] == "bf16"
    weights = [(bf16["model"][k], v) for k, v in fp32["model"].items() if v.is_floating_point()]
    assert all(torch.isfinite(a).all() for a, _ in weights)
    assert max((a - b).abs().max().item() for a, b in weights) > 0
    assert all(torch.allclose(a, b, atol=0.05) for a, b in weights)


@pytest.mark.slow
def test_command_line_errors_are_one_line(synthetic_root, tmp_path):
    """As a user runs them: an --out that cannot be written (under a file), a --root without lists, a
    checkpoint that does not exist: exit status 1 and one line, no traceback."""
    (tmp_path / "a_file").write_text("")
    for command in (["train.py", "--root", str(synthetic_root), *TINY, "--out", str(tmp_path / "a_file" / "run")],
                    ["train.py", "--root", str(tmp_path), *TINY, "--out", str(tmp_path / "run")],
                    ["evaluate.py", "--root", str(synthetic_root), "--checkpoint", str(tmp_path / "missing.pt")]):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=Path(__file__).parent)
        assert done.returncode == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.slow
def test_step_benchmark_runs_every_phase(synthetic_root, monkeypatch, capsys):
    """benchmark.py steps end to end on the tiny set: one row per phase, positive times."""
    monkeypatch.setattr("sys.argv", ["benchmark.py", "steps", "--root", str(synthetic_root), "--patch-size", "32",
                                     "--batch-size", "4", "--labeled-batch-size", "2", "--labeled-patients", "2", "--steps", "16"])
    benchmark.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[-3:]]
    assert [row[0] for row in rows] == ["supervised", "pretrain", "selftrain"]
    assert all(float(value) > 0 for row in rows for value in row[1:])


@pytest.mark.slow
def test_pseudo_label_benchmark_runs(synthetic_root, tmp_path, monkeypatch, capsys):
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "1"])
    monkeypatch.setattr("sys.argv", ["benchmark.py", "pseudo-labels", "--root", str(synthetic_root), "--patch-size", "32",
                                     "--checkpoint", str(tmp_path / "pretrain" / "best.pt"), "--steps", "3"])
    benchmark.main()
    assert "ms per pseudo-label of 6 images at 32 x 32" in capsys.readouterr().out


@pytest.mark.slow
def test_sliding_window_benchmark_runs(la_root, tmp_path, monkeypatch, capsys):
    train.main(["--root", str(la_root), *LA_TINY, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "1"])
    monkeypatch.setattr("sys.argv", ["benchmark.py", "sliding-window", "--root", str(la_root), "--checkpoint",
                                     str(tmp_path / "pretrain" / "best.pt"), "--stride", "16", "16", "--volumes", "1"])
    benchmark.main()
    assert re.search(r"strides \(16, 16, 16\), scale 1.0: [0-9.]+ s per volume \([0-9]+ windows", capsys.readouterr().out)


# ----------------------------------------------------------------------------- evaluation: evaluate.py's scores, json, --predict, --kde, exports; the README's reading route

@pytest.mark.slow
def test_supervised_phase_and_evaluation_json(synthetic_root, tmp_path, capsys):
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "supervised", "--iterations", "2"])
    scores_path = tmp_path / "scores.json"
    evaluate.main(["--root", str(synthetic_root), "--checkpoint", str(tmp_path / "supervised" / "best.pt"),
                   "--json", str(scores_path), "--save-png", str(tmp_path / "pictures"), "--kde", str(tmp_path / "kde")])
    scores = json.loads(scores_path.read_text())
    evaluate.main(["--root", str(synthetic_root), "--checkpoint", str(tmp_path / "supervised" / "best.pt"),
                   "--export", str(tmp_path / "small.pt")])
    evaluate.main(["--root", str(synthetic_root), "--checkpoint", str(tmp_path / "small.pt"), "--json", str(tmp_path / "small.json")])
    small = json.loads((tmp_path / "small.json").read_text())
    full, half = (inference.load_model(path)[0].eval() for path in (tmp_path / "supervised" / "best.pt", tmp_path / "small.pt"))
    slices = torch.cat([data.resize_nearest(torch.from_numpy(image), 32, 32) for _, image, _ in data.Dataset(synthetic_root).volumes(data.read_list(synthetic_root, "test.list"))])
    with torch.no_grad():  # fp16 weights, cast back to float32, give the same probabilities to rounding
        probabilities = [model(slices[:, None]).softmax(1) for model in (full, half)]
    assert (probabilities[0] - probabilities[1]).abs().max() < 1e-2
    assert not all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), half.state_dict().values()))
    assert small["mean"]["dice"] == pytest.approx(scores["mean"]["dice"], abs=1.0)
    assert scores["volumes"] == 4 and scores["split"] == "test"
    assert set(scores["per_class"]) == {"RV", "Myo", "LV"} and set(scores["mean"]) == {"dice", "jaccard", "hd95", "asd"}
    assert 0 <= scores["empty_predictions"] <= 12 and 0 <= scores["mean"]["dice"] <= 100
    assert "do not apply" in capsys.readouterr().out
    assert len(list((tmp_path / "pictures").glob("*.png"))) == 4
    assert (tmp_path / "kde" / "kde.csv").read_text().splitlines()[0] == "x,labeled,unlabeled"
    assert (tmp_path / "kde" / "kde.svg").read_text().count("<polyline") == 2
    assert len(list((tmp_path / "supervised" / "pictures").glob("iter_*.png"))) == 1


@pytest.mark.slow
def test_la_end_to_end_on_synthetic_phantoms(la_root, tmp_path, capsys):
    """pretrain -> selftrain -> evaluate (test.list and the held-aside val cases) -> --predict on a NIfTI
    copy of a case, whose label map matches the evaluation's segmentation of the h5 copy."""
    common = ["--root", str(la_root), *LA_TINY, "--out", str(tmp_path)]
    train.main([*common, "--phase", "pretrain", "--iterations", "2"])
    train.main([*common, "--phase", "selftrain", "--iterations", "2"])
    log = (tmp_path / "selftrain" / "train.log").read_text()
    assert "2 labeled images (2 patients), 4 unlabeled, 2 validation cases held aside" in log
    rows = [json.loads(line) for line in (tmp_path / "selftrain" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["pseudo_dice"] <= 1 for r in rows if "loss" in r) and len(rows) == 3
    assert "pseudo-label Dice" in (tmp_path / "selftrain" / "curves.svg").read_text()
    checkpoint = tmp_path / "selftrain" / "best.pt"
    evaluate.main(["--root", str(la_root), "--checkpoint", str(checkpoint), "--stride", "16", "16",
                   "--json", str(tmp_path / "test.json"), "--save-png", str(tmp_path / "png")])
    scores = json.loads((tmp_path / "test.json").read_text())
    assert scores["volumes"] == 2 and list(scores["per_class"]) == ["LA"] and 0 <= scores["mean"]["dice"] <= 100
    assert sorted(p.stem for p in (tmp_path / "png").iterdir()) == data.read_list(la_root, "test.list")
    evaluate.main(["--root", str(la_root), "--split", "val", "--checkpoint", str(checkpoint), "--stride", "16", "16"])
    assert "on " + str(la_root) + " val: 2 volumes" in capsys.readouterr().out

    case = data.read_list(la_root, "train.list")[0]
    _, image, _ = data.Dataset(la_root).volumes([case])[0]
    nibabel.save(nibabel.Nifti1Image(image, np.diag([0.625, 0.625, 0.625, 1])), tmp_path / f"{case}.nii.gz")
    evaluate.main(["--checkpoint", str(checkpoint), "--predict", str(tmp_path / f"{case}.nii.gz"),
                   "--out", str(tmp_path / "labels"), "--stride", "16", "16", "--windows", "authors"])
    predicted = np.asarray(nibabel.load(tmp_path / "labels" / f"{case}.nii.gz").dataobj)
    model, _ = inference.load_model(checkpoint)
    expected = largest_connected_component(authors_sliding_window(model.eval(), image, (32, 32, 16), 16, 16).argmax(0) == 1)
    assert predicted.shape == image.shape and expected.any() and (predicted != expected).mean() < 1e-3


@pytest.mark.slow
@pytest.mark.slow
def test_evaluate_segments_as_the_plan_in_the_checkpoint_says(la_root, tmp_path, monkeypatch):
    """evaluate.py takes the plan from the checkpoint and never works it out again: an LA model segments with
    the authors' windows and every class's largest component; the same checkpoint with those two plan fields
    changed by hand segments with nnU-Net's windows and no post-processing, on a split and with --predict."""
    train.main(["--root", str(la_root), *LA_TINY, "--out", str(tmp_path), "--phase", "supervised", "--iterations", "1"])
    checkpoint = torch.load(tmp_path / "supervised" / "best.pt", weights_only=True)
    checkpoint["plan"] |= {"windows": "gaussian", "post_processing": "none"}
    torch.save(checkpoint, tmp_path / "changed.pt")
    scan = tmp_path / "scans" / "case.nii.gz"
    scan.parent.mkdir()
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).random((40, 36, 20), dtype=np.float32), np.eye(4)), scan)
    seen, segment = [], inference.segment
    def spy(model, image, plan, patch, stride, scale, keep_largest, native):
        seen.append((plan.windows, list(keep_largest)))
        return segment(model, image, plan, patch, stride, scale, keep_largest, native)
    monkeypatch.setattr(inference, "segment", spy)
    for name, expected in (("supervised/best.pt", ("authors", [1])), ("changed.pt", ("gaussian", []))):
        evaluate.main(["--root", str(la_root), "--split", "val", "--checkpoint", str(tmp_path / name)])
        evaluate.main(["--checkpoint", str(tmp_path / name), "--predict", str(scan), "--out", str(tmp_path / "labels")])
        assert seen == [expected] * 3  # the two validation cases, the scan
        seen.clear()


def test_nan_in_a_test_volume_stops_evaluation_naming_it(synthetic_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    volume = (copy / "test.list").read_text().split()[0]
    with h5py.File(copy / "data" / f"{volume}.h5", "r+") as f:
        f["image"][0, :4, :4] = np.nan
    run = tmp_path / "run"
    train.main(["--root", str(copy), *TINY, "--out", str(run), "--phase", "supervised", "--iterations", "1"])
    with pytest.raises(data.DataError, match=f"{volume}.h5: the image holds 16 NaN"):
        evaluate.main(["--root", str(copy), "--checkpoint", str(run / "supervised" / "best.pt")])


@pytest.mark.parametrize("flags,message", [
    (["--windows", "gaussian"], "--stride and --windows apply to 3D models"),
    (["--stride", "16", "4"], "--stride and --windows apply to 3D models"),
    (["--predict", "scans", "--out", "labels", "--json", "s.json"], "--json and --kde score a split; --predict writes label maps only"),
])
def test_evaluate_refuses_flags_it_would_ignore(flags, message, tmp_path, capsys):
    torch.save({"model": bcp.UNet().state_dict(), "flags": {"num_classes": 4, "patch_size": [32, 32]}}, tmp_path / "u.pt")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--checkpoint", str(tmp_path / "u.pt"), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_labels_beyond_num_classes_are_named(synthetic_root):
    """--num-classes 2 on ACDC's four classes: one line naming a slice file, before any training."""
    args = train.parse_args(["--root", str(synthetic_root), *TINY, "--num-classes", "2"])
    with pytest.raises(data.DataError, match=r"\.h5: label values must lie in 0\.\.1 \(--num-classes 2\)"):
        train.load_data(args, torch.device("cpu"))


@pytest.mark.slow
def test_unwritable_outputs_fail_before_the_evaluation(synthetic_root, tmp_path, capsys):
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "supervised", "--iterations", "1"])
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    with pytest.raises(OSError, match="a_file"):
        evaluate.main(["--root", str(synthetic_root), "--checkpoint", str(tmp_path / "supervised" / "best.pt"),
                       "--json", str(tmp_path / "a_file" / "scores.json")])
    assert capsys.readouterr().out == ""  # nothing was evaluated


@pytest.mark.slow
def test_predicted_nifti_keeps_the_scans_geometry(synthetic_root, tmp_path):
    """A scan with a rotated, anisotropic affine (qform and sform) written by nibabel: the label map
    read back by nibabel has the scan's shape, affine, pixdim, qform/sform codes, and our labels."""
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "supervised", "--iterations", "1"])
    angle = 0.3
    affine = np.array([[1.4 * math.cos(angle), -1.4 * math.sin(angle), 0, -80.5],
                       [1.4 * math.sin(angle), 1.4 * math.cos(angle), 0, 20.0],
                       [0, 0, 8.0, -33.0], [0, 0, 0, 1]])
    array = np.random.default_rng(0).random((40, 36, 5)).astype(np.float32) * 300
    scan = nibabel.Nifti1Image(array, affine)
    scan.set_qform(affine, code=1)
    scan.set_sform(affine, code=2)
    nibabel.save(scan, tmp_path / "scan.nii.gz")
    scan = nibabel.load(tmp_path / "scan.nii.gz")
    evaluate.main(["--checkpoint", str(tmp_path / "supervised" / "best.pt"), "--predict", str(tmp_path / "scan.nii.gz"),
                   "--out", str(tmp_path / "labels")])
    labels = nibabel.load(tmp_path / "labels" / "scan.nii.gz")
    assert labels.shape == scan.shape and labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, scan.affine, atol=1e-5)
    for field in ("pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                  "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z"):
        np.testing.assert_array_equal(labels.header[field], scan.header[field], err_msg=field)
    ours = data.read_nifti(tmp_path / "labels" / "scan.nii.gz")
    np.testing.assert_array_equal(np.asarray(labels.dataobj), ours.transpose(2, 1, 0))


@pytest.mark.slow
@pytest.mark.parametrize("kind,message", [("4d", "a 4D image"), ("complex", "complex-valued"), ("text", "not a NIfTI-1 file")])
def test_predict_refuses_what_it_cannot_segment(synthetic_root, tmp_path, kind, message):
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "supervised", "--iterations", "1"])
    scan = tmp_path / "scans" / "bad.nii.gz"
    scan.parent.mkdir()
    if kind == "text":
        scan.write_bytes(gzip.compress(b"hello" * 100))
    else:
        array = np.ones((8, 8, 3, 2), np.float32) if kind == "4d" else np.ones((8, 8, 3), np.complex64)
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), scan)
    with pytest.raises(data.DataError, match=f"bad.nii.gz: .*{message}"):
        evaluate.main(["--checkpoint", str(tmp_path / "supervised" / "best.pt"), "--predict", str(scan.parent),
                       "--out", str(tmp_path / "labels")])
    assert list((tmp_path / "labels").iterdir()) == []  # nothing written, not even half a file


@pytest.mark.slow
def test_predict_refuses_a_scan_with_nan_voxels(synthetic_root, tmp_path):
    train.main(["--root", str(synthetic_root), *TINY, "--out", str(tmp_path), "--phase", "pretrain", "--iterations", "1"])
    scan = np.ones((4, 32, 32), np.float32)
    scan[1, 2, 3] = np.nan
    nibabel.save(nibabel.Nifti1Image(scan, np.eye(4)), tmp_path / "scan.nii.gz")
    with pytest.raises(data.DataError, match=re.escape(str(tmp_path / "scan.nii.gz")) + ": 1 NaN or infinite voxels"):
        evaluate.main(["--checkpoint", str(tmp_path / "pretrain" / "best.pt"), "--predict", str(tmp_path / "scan.nii.gz"),
                       "--out", str(tmp_path / "labels")])
    assert not any((tmp_path / "labels").iterdir())


def test_gaussian_kde_matches_scipy():
    from scipy.stats import gaussian_kde
    samples, grid = np.random.default_rng(0).normal(size=50), np.linspace(-3, 3, 41)
    np.testing.assert_allclose(evaluate.gaussian_kde(samples, grid), gaussian_kde(samples)(grid), rtol=1e-10)


def test_readme_reading_route_points_at_whole_blocks_of_code():
    """Each "`file.py` lines A–B" of the README's reading route starts at a top-level line after a blank
    or a section rule, ends before a blank line, and holds the first name the route gives for it."""
    readme = (Path(__file__).parent / "README.md").read_text()
    route = re.findall(r"`(\w+\.py)` lines (\d+)–(\d+)[,:]? [^`]*`(\w+)`", readme)
    assert len(route) >= 4
    for file, start, end, name in route:
        lines = (Path(__file__).parent / file).read_text().splitlines()
        start, end = int(start), int(end)
        block = "\n".join(lines[start - 1:end])
        assert lines[start - 1][:1] not in ("", " ") and (lines[start - 2] == "" or lines[start - 2].startswith("# ---")), (file, start)
        assert lines[end] == "", (file, end)
        assert f"def {name}(" in block or f"{name} = " in block, (file, start, end, name)


# ----------------------------------------------------------------------------- torchrun: more than one process

TORCHRUN = ["--batch-size", "8", "--labeled-batch-size", "4", "--patch-size", "32", "--labeled-patients", "2",
            "--log-every", "1", "--device", "cpu"]


def torchrun(arguments, processes=2, cwd=Path(__file__).parent, env=None):
    """train.py under torchrun on the CPU (gloo), one thread a process; the exit status is checked."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "train.py", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_runs(one, two, phase, parts=("model",)):
    """Losses and (selftrain) the pseudo-labels' Dice row by row, and the last weights, within 1e-5
    (relative; float sums in another order)."""
    rows = [data.read_metrics(run / phase / "metrics.jsonl")[0] for run in (one, two)]
    for key in ("loss", "pseudo_dice") if phase == "selftrain" else ("loss",):
        logged = [[r[key] for r in run_rows if key in r] for run_rows in rows]
        assert len(logged[0]) == len(logged[1]) > 0, key
        np.testing.assert_allclose(logged[1], logged[0], rtol=1e-5, err_msg=key)
    first, second = (inference.load_checkpoint(run / phase / "last.pt") for run in (one, two))
    for part in parts:
        for key, value in first[part].items():
            if value.is_floating_point():
                torch.testing.assert_close(second[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{phase} {part} {key}")


@pytest.mark.slow
def test_two_processes_under_torchrun_train_as_one(synthetic_root, tmp_path):
    """Pre-train then self-train 3 steps, by one process and by two under torchrun (gloo), the same
    flags: each half-batch shared, BN statistics and the loss's sums over the whole batch, dropout masks
    drawn for the whole batch, gradients averaged. The same losses, pseudo-label Dice (the whole batch's,
    not rank 0's share) and weights, and one run folder: the same files as the single process's, each
    log line once."""
    common = ["--root", str(synthetic_root), *TORCHRUN, "--iterations", "3", "--val-every", "3"]
    for phase in ("pretrain", "selftrain"):
        train.main([*common, "--out", str(tmp_path / "one"), "--phase", phase])
        torchrun([*common, "--out", str(tmp_path / "two"), "--phase", phase])
        assert_same_runs(tmp_path / "one", tmp_path / "two", phase, ("model", "teacher") if phase == "selftrain" else ("model",))
        files = [sorted(str(p.relative_to(run)) for p in (run / phase).rglob("*")) for run in (tmp_path / "one", tmp_path / "two")]
        assert files[0] == files[1]
        log = (tmp_path / "two" / phase / "train.log").read_text().splitlines()
        assert len(log) == len(set(log)) and sum(line.startswith("iter 3 | val Dice") for line in log) == 1


@pytest.mark.slow
def test_a_run_cut_by_the_time_limit_under_torchrun_resumes_to_the_straight_runs_weights(synthetic_root, tmp_path):
    """A clock that advances 10 s at each reading (in the worker processes) and a 1-minute limit cut an
    8-step pre-training under torchrun: every process stops at the step rank 0 chose. Resumed under
    torchrun, it ends with the losses and weights of an uninterrupted torchrun run. (Against one
    process, float sums in another order grow past 1e-5 by step 8 at these 2-image BN batches; after
    3 steps they are within 1e-7, as the test above checks at 1e-5.)"""
    clock = tmp_path / "clock" / "sitecustomize.py"
    clock.parent.mkdir()
    clock.write_text("import itertools, os, time\n"
                     "if os.environ.get('LOCAL_RANK') is not None and os.environ.get('FAKE_CLOCK'):\n"
                     "    ticks = itertools.count(0, 10)\n"
                     "    time.time = lambda: float(next(ticks))\n")
    common = ["--root", str(synthetic_root), *TORCHRUN, "--phase", "pretrain", "--iterations", "8", "--val-every", "4"]
    torchrun([*common, "--out", str(tmp_path / "straight")])
    cut = torchrun([*common, "--out", str(tmp_path / "cut"), "--time-limit", "1"],
                   env={"PYTHONPATH": f"{clock.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FAKE_CLOCK": "1"})
    stopped = inference.load_checkpoint(tmp_path / "cut" / "pretrain" / "last.pt")["iteration"]
    assert 1 <= stopped < 8 and f"time limit: stopped at iteration {stopped} of 8" in cut.stdout
    torchrun([*common, "--out", str(tmp_path / "cut"), "--resume"])
    assert inference.load_checkpoint(tmp_path / "cut" / "pretrain" / "last.pt")["iteration"] == 8
    assert_same_runs(tmp_path / "straight", tmp_path / "cut", "pretrain")


@pytest.mark.parametrize("phase,flags,message", [
    ("pretrain", ["--labeled-batch-size", "6"], "--labeled-batch-size: 3 images a half-batch cannot be shared by 2 processes"),
    ("selftrain", ["--batch-size", "10", "--labeled-batch-size", "4"], "--batch-size: 3 images a half-batch cannot be shared"),
    ("supervised", ["--batch-size", "5"], "--batch-size: 5 images a step cannot be shared by 2 processes"),
])
def test_a_batch_that_the_processes_cannot_share_is_refused(phase, flags, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.parse_args(["--phase", phase, *flags])
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- cuda: on a GPU against the CPU (python -m pytest -q -k cuda test_bcp.py)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.slow
@needs_cuda
def test_cuda_selftrain_step_in_bf16_matches_the_cpu_in_fp32(synthetic_root):
    """One self-train step from the same weights and draws, models in eval mode (dropout would draw
    different masks on the two devices): the CUDA bf16 loss is within 0.05 of the CPU fp32 loss (bf16
    keeps 8 bits of mantissa, and a few pseudo-label pixels may flip)."""
    names = data.Dataset(synthetic_root).cases(2)[:2]
    losses = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
        banks = [data.Dataset(synthetic_root).bank(n, device) for n in names]
        torch.manual_seed(0)
        run = tiny_run([*TINY, "--phase", "selftrain", "--device", device, "--precision", precision], *banks, device)
        run.autocast = inference.runtime(device, precision, 2)[1]
        run.student.eval(), run.teacher.eval()
        losses[device] = train.selftrain_step(run, 3)[0].item()
    assert losses["cuda"] == pytest.approx(losses["cpu"], abs=0.05)


@needs_cuda
def test_cuda_pseudo_labels_equal_the_cpu():
    """The connected components on the GPU, 2D slices and 3D crops, and the 2D pseudo-labels: equal."""
    for shape in ((64, 80), (24, 30, 20)):
        masks = torch.from_numpy(np.stack([random_blobs(shape, seed, threshold=0.5) for seed in range(6)]))
        assert torch.equal(bcp.largest_component(masks.cuda()).cpu(), bcp.largest_component(masks)), shape
    logits = torch.nn.functional.avg_pool2d(torch.randn(6, 4, 64, 80, generator=torch.Generator().manual_seed(0)), 5, 1, 2)
    assert torch.equal(bcp.pseudo_label(logits.cuda()).cpu(), bcp.pseudo_label(logits))


# TF32 convolutions (cuDNN's default, and train.py's on CUDA, as the authors) round their inputs to 10
# bits of mantissa: probabilities may move by up to this much, and a label only where the CPU's two
# most likely classes are closer than CUDA_LABEL_MARGIN.
CUDA_PROBABILITY_TOLERANCE, CUDA_LABEL_MARGIN = 0.02, 0.05


@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("layout", ["acdc", "la"])
def test_cuda_evaluation_matches_the_cpu_voxel_by_voxel(layout, synthetic_root, la_root, tmp_path):
    """A trained model's probabilities on the validation volumes (ACDC: the resized slices; LA: the
    sliding window's average) on CUDA within CUDA_PROBABILITY_TOLERANCE of the CPU's, and evaluate.py's
    labels equal wherever the CPU's margin is larger than CUDA_LABEL_MARGIN."""
    root, flags = (synthetic_root, TINY) if layout == "acdc" else (la_root, LA_TINY)
    train.main(["--root", str(root), *flags, "--out", str(tmp_path), "--phase", "supervised", "--iterations", "8"])
    args = train.parse_args(["--root", str(root), *flags, "--phase", "supervised"])
    _, _, volumes, _, _ = train.load_data(args, torch.device("cpu"))
    models = {device: inference.load_model(tmp_path / "supervised" / "best.pt", device)[0].eval() for device in ("cpu", "cuda")}
    for image in (case.image for case in volumes):
        probabilities, labels = {}, {}
        for device, model in models.items():
            with torch.no_grad():
                if layout == "acdc":
                    probabilities[device] = model(data.resize_nearest(image.to(device), 32, 32)[:, None]).softmax(1).cpu()
                else:
                    probabilities[device] = inference.sliding_window_probabilities(model, image.to(device), (32, 32, 16), (16, 16, 16)).cpu()
                labels[device] = inference.segment(model, image.to(device), args.dataset.plan, args.patch_size, args.stride,
                                                   keep_largest=args.dataset.plan.classes_kept(args.num_classes)).cpu()
        assert (probabilities["cuda"] - probabilities["cpu"]).abs().max() < CUDA_PROBABILITY_TOLERANCE
        top2 = probabilities["cpu"].topk(2, dim=1 if layout == "acdc" else 0).values
        clear = (top2.select(1 if layout == "acdc" else 0, 0) - top2.select(1 if layout == "acdc" else 0, 1)) > CUDA_LABEL_MARGIN
        if layout == "acdc":  # the margin on the 32 x 32 grid, taken back to the slice's grid as the labels are
            clear = data.resize_nearest(clear, *image.shape[-2:])
        assert torch.equal(labels["cuda"][clear], labels["cpu"][clear])


@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("layout", ["acdc", "la"])
def test_cuda_selftrain_step_in_train_mode_matches_the_cpu(layout, synthetic_root, la_root, tmp_path, monkeypatch):
    """One self-train step from the same weights and draws, the teacher in train mode (batch
    statistics) as in training, fp32 without TF32, dropout at p = 0 (the devices draw other masks):
    after the pseudo-labels, SGD and the EMA, CUDA's student and teacher (BN statistics included) equal
    the CPU's within 1e-4 (float sums in another order)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    root, flags = (synthetic_root, TINY) if layout == "acdc" else (la_root, LA_TINY)
    states = {}
    for device in ("cpu", "cuda"):
        run = step_setup(root, flags, "selftrain", tmp_path / device, device)
        for module in [*run.student.modules(), *run.teacher.modules()]:
            if isinstance(module, bcp.WholeBatchDropout):
                module.p = 0.0
        assert run.teacher.training
        train.selftrain_step(run, 3)
        states[device] = {part: {k: v.cpu() for k, v in model.state_dict().items() if v.is_floating_point()}
                          for part, model in (("student", run.student), ("teacher", run.teacher))}
    for part in ("student", "teacher"):
        for key, value in states["cpu"][part].items():
            torch.testing.assert_close(states["cuda"][part][key], value, atol=1e-4, rtol=1e-3, msg=f"{part} {key}")


@pytest.mark.slow
@needs_cuda
def test_cuda_compiled_run_cut_by_the_time_limit_resumes_to_the_straight_runs_weights(synthetic_root, tmp_path, monkeypatch):
    """--compile on CUDA: 12 pre-train steps straight, and cut by a 1-minute limit on a clock that
    advances 4 s a reading, then resumed: the same weights within 1e-5 (cuDNN's backward may sum in
    another order from run to run)."""
    common = ["--root", str(synthetic_root), *TINY, "--device", "cuda", "--phase", "pretrain", "--iterations", "12", "--compile"]
    train.main([*common, "--out", str(tmp_path / "straight")])
    clock = iter(range(0, 10**6, 4))
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: float(next(clock))))
    train.main([*common, "--out", str(tmp_path / "cut"), "--time-limit", "1"])
    assert inference.load_checkpoint(tmp_path / "cut" / "pretrain" / "last.pt")["iteration"] < 12
    monkeypatch.undo()
    train.main([*common, "--out", str(tmp_path / "cut"), "--resume"])
    straight, resumed = (inference.load_checkpoint(tmp_path / run / "pretrain" / "last.pt") for run in ("straight", "cut"))
    assert resumed["iteration"] == 12 and train.all_finite(resumed["model"])
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, atol=1e-5, rtol=1e-4, msg=key)
