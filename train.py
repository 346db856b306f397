"""
Train BCP, or the labeled-only network it is compared with, on ACDC (2D, U-Net), the left atrium (LA, 3D,
V-Net) or your own scans (2D or 3D, as prepare_acdc.py planned them); the data set is read off --root.

    python train.py --phase pretrain                 # labeled images copy-pasted into each other
    python train.py --phase selftrain                # Mean-Teacher with bidirectional copy-paste
    python train.py --phase supervised               # the paper's labeled-only rows (U-Net, V-Net)
    python train.py --root data/LA --phase pretrain  # LA in UA-MT's layout: the authors' LA settings
    python train.py --phase selftrain --resume       # continue an interrupted phase from <out>/<phase>/last.pt
    python train.py --phase selftrain --time-limit 50    # stop cleanly within 50 minutes; --resume continues
    python train.py --phase pretrain --schedule cpu      # both phases fill an hour on this CPU (--budget 60)

Defaults are the authors' settings for the data set (ACDC: 7 labeled patients, 10%; LA: 8 labeled
cases, 10%); every one is a flag (-h).
Each phase writes <out>/<phase>/: best.pt, last.pt, metrics.jsonl, train.log, flags.json, pictures/.
A phase folder that holds a run is never started over unless --overwrite says so.
"""
import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import bcp
import data
import inference
import pictures

# The authors' values, the same in their ACDC and their LA script: the method's constants, SGD's, how
# often to validate, and the arithmetic. lr_decay "step" divides the lr by 10 every lr_step steps (each data
# set's plan in data.py: ACDC's lr_step 0, a constant lr; LA's 2,500 in self-training). A run's settings are
# these | its plan's (data.ACDC_PLAN, data.LA_PLAN, your own data's) | --schedule cpu's | the flags given
# (data.Plan.resolve).
METHOD = {
    "u_weight": 0.5,       # alpha (Eq. 6): the weight of the loss terms of a region whose target is a pseudo-label
                           # (ground truth's: 1); constant from the first step, not ramped up as in Mean Teacher
    "ema_decay": 0.99,     # teacher <- decay * teacher + (1 - decay) * student, after every self-train step
    "beta": 2 / 3,         # M's zero box is int(beta * s) along each axis of size s of the patch
    "lr": 0.01,            # SGD's learning rate, at the first step
    "momentum": 0.9, "weight_decay": 1e-4,  # SGD's
    "lr_decay": "step", "val_every": 200,   # the lr's rule (not poly's); validate and keep the best every 200 steps
    "precision": "fp32",   # TF32 convolutions on CUDA, as on the authors' RTX 3090
}

PHASES = ("supervised", "pretrain", "selftrain")
# Flags that define what a run trains: --resume refuses a value other than the checkpoint's.
RUN_FLAGS = ("phase", "labeled_patients", "batch_size", "labeled_batch_size", "patch_size", "num_classes",
             "beta", "mask", "u_weight", "ema_decay", "seed", "mix", "dice_loss", "pretrain_loss", "lr_step", "val_cases",
             "scale", "foreground_crops", "lr_decay", "standardize", "budget", "step_ratio")


def at_least(minimum, kind=int):
    """An argparse type: a number of `kind` no smaller than `minimum`."""
    def parse(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/ACDC", help="ACDC in the SSL4MIS layout, LA in UA-MT's layout, or your own "
                                                         "scans as prepare_acdc.py --raw wrote them")
    p.add_argument("--out", help="run folder; each phase writes <out>/<phase>/ (runs/<data set>_<labeled>)")
    p.add_argument("--phase", choices=PHASES, default="pretrain")
    p.add_argument("--schedule", choices=["paper", "cpu"], default="paper",
                   help="paper: the authors' settings (for a GPU); cpu: pre-train + self-train filling an hour on this "
                        "CPU (the plan's cpu_settings in data.py; flags given win; flags.json lists what it set)")
    p.add_argument("--labeled-patients", type=at_least(1),
                   help="ACDC: the first N patients of train.list are labeled, all their slices (7: 10%%; 3: 5%%); LA: "
                        "the first N cases, one volume each (8: 10%%; 4: 5%%); your own data: every labeled one")
    p.add_argument("--iterations", type=at_least(1), help="steps (ACDC 10000, 30000 for selftrain; LA 2000 pretrain, "
                                                          "15000 selftrain, 6000 supervised)")
    p.add_argument("--batch-size", type=at_least(1), help="images per step (selftrain: labeled + unlabeled; ACDC 24; LA 8, supervised 4)")
    p.add_argument("--labeled-batch-size", type=at_least(1), help="labeled images per step (ACDC 12, LA 4)")
    p.add_argument("--patch-size", type=at_least(16), nargs="+",
                   help="ACDC: each slice resized whole to P x P, not cropped (256); LA: random crops D1 D2 D3 of the "
                        "volume (112 112 80); your own scans: crops of a slice (2D) or of the volume (3D), as planned; "
                        "multiples of 16")
    p.add_argument("--num-classes", type=at_least(2), help="background included (ACDC 4, LA 2; your own data says)")
    p.add_argument("--lr", type=at_least(0.0, float), help=f"SGD learning rate ({METHOD['lr']})")
    p.add_argument("--lr-decay", choices=["step", "poly"], help="step: divided by 10 every --lr-step steps (the "
                   "authors'); poly: lr (1 - (t - 1) / T)^0.9 over the phase's T steps, as SSL4MIS (--schedule cpu)")
    p.add_argument("--lr-step", type=at_least(0), help="divide the lr by 10 every N steps, 0 never "
                                                       "(ACDC 0; LA 2500, pretrain 0)")
    p.add_argument("--momentum", type=at_least(0.0, float), help=f"SGD momentum ({METHOD['momentum']})")
    p.add_argument("--weight-decay", type=at_least(0.0, float), help=f"SGD weight decay ({METHOD['weight_decay']})")
    p.add_argument("--beta", type=float, help=f"the pasted box is beta times the patch along each axis, 0 < beta < 1 "
                                              f"({METHOD['beta']:.4g})")
    p.add_argument("--mask", choices=["random", "center"], default="random", help="where the box sits")
    p.add_argument("--u-weight", type=at_least(0.0, float),
                   help=f"alpha, on ACDC and LA alike: the weight of the loss terms of the region whose target is a "
                        f"pseudo-label (ground truth: 1), constant from the first step, not ramped up ({METHOD['u_weight']})")
    p.add_argument("--ema-decay", type=float, help=f"teacher = EMA of the student, 0 <= decay <= 1 ({METHOD['ema_decay']})")
    p.add_argument("--mix", choices=list(bcp.MIXES), default="bidirectional",
                   help="selftrain ablations: BCP (half a inward, half b outward), only inward (both halves: a labeled "
                        "crop in an unlabeled image), only outward (both halves: an unlabeled crop in a labeled image), "
                        "or none (no pasting: U_a with its pseudo-label and L_b with its ground truth, whole)")
    p.add_argument("--dice-loss", choices=list(bcp.DICE_LOSSES), help="the authors' ACDC Dice (batch sums, p squared) "
                                                                       "or their LA Dice (per crop, p)")
    p.add_argument("--pretrain-loss", choices=["regions", "whole"],
                   help="pretrain: one term per region of M, both weighted 1 (ACDC), or one term over the whole image (LA)")
    p.add_argument("--selftrain-sgd", choices=["pretrain", "fresh"],
                   help="selftrain starts SGD with the pre-training's momentum (ACDC) or fresh (LA)")
    p.add_argument("--val-cases", type=at_least(1),
                   help="LA and your own scans: the last N cases of train.list are held aside for validation (not in the "
                        "unlabeled pool; LA 8)")
    p.add_argument("--stride", type=at_least(1), nargs=2, metavar=("XY", "Z"),
                   help="LA: sliding-window strides of validation along the first two axes and the third "
                        "(the authors' 18 4, at most the patch)")
    p.add_argument("--scale", type=float,
                   help="LA: train on volumes resampled by this factor (0.5: a crop sees twice the field; for a CPU); "
                        "validation and evaluation segment at that scale and score at full resolution")
    p.add_argument("--foreground-crops", type=float, metavar="SHARE",
                   help="LA and your own scans: the share of labeled crops centred on a voxel of a foreground class, the rest uniform "
                        "(nnU-Net's oversampling; your own scans 0.33, LA 0 as the authors)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction,
                   help="LA: z-score each volume as loaded (UA-MT z-scored the whole scans before cropping them "
                        "around the atrium; --schedule cpu)")
    p.add_argument("--val-every", type=at_least(1), help=f"validate (and checkpoint) every N steps ({METHOD['val_every']})")
    p.add_argument("--log-every", type=at_least(1), default=20, help="progress line and metrics row every N steps")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], help=f"fp32 as the authors (TF32 convolutions on CUDA), or bf16 "
                   f"autocast (faster on a GPU, and on a CPU with bf16 instructions, where --schedule cpu takes it) "
                   f"({METHOD['precision']})")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher forwards")
    p.add_argument("--budget", type=at_least(1.0, float), metavar="MINUTES",
                   help="both phases, validations included, within this many minutes on this machine: each phase's steps "
                        "planned from the seconds a step and a validation measured here, planned again at each validation, "
                        "the poly lr decayed over them (--schedule cpu: 60, but for your own 3D scans); --iterations fixes "
                        "the steps instead; one process, pretrain and selftrain only")
    p.add_argument("--step-ratio", type=at_least(0.01, float), metavar="R",
                   help="--budget: self-training steps per pre-training step (ACDC 3, the paper's 30,000 : 10,000; LA 7.5, "
                        "under --schedule cpu 4.25)")
    p.add_argument("--time-limit", type=at_least(1.0, float), metavar="MINUTES",
                   help="stop before this much time has passed, with last.pt written; --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<phase>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start the phase again, replacing the run in <out>/<phase>/")
    p.add_argument("--init", help="selftrain: start student, teacher (and SGD state) from this checkpoint "
                                  "(default <out>/pretrain/best.pt)")
    args = p.parse_args(argv)
    iterations_given, processes = args.iterations is not None, int(os.environ.get("WORLD_SIZE", "1"))
    dataset = data.Dataset(args.root)  # the one description of --root and its plan, read by everything below
    plan = dataset.plan
    if args.schedule == "cpu" and args.phase == "supervised":
        p.error("--schedule cpu times pre-training and self-training; --phase supervised takes the paper's settings")
    refused = plan.refuse(vars(args), args.root)
    if refused:
        p.error(refused)
    bf16 = args.precision == "bf16" or (args.precision is None and args.schedule == "cpu"
                                        and torch.device(args.device).type == "cpu" and bool(cpu_bf16()))
    schedule, args.schedule_key = plan.schedule(args.schedule, bf16)
    try:
        settings, args.set_by_schedule = plan.resolve(METHOD, args.phase, schedule, vars(args))
    except ValueError as error:
        p.error(str(error))
    vars(args).update(settings)
    if args.budget and (iterations_given or processes > 1 or args.phase == "supervised"):
        if "budget" not in args.set_by_schedule:
            p.error("--budget plans pre-training's and self-training's steps in one process: give it without --iterations, "
                    "--phase supervised or torchrun")
        args.budget = None  # the schedule's steps, as given or fixed
        args.set_by_schedule.remove("budget")
    if args.budget and args.lr_decay != "poly":
        p.error("--budget decays the lr over the steps it plans: add --lr-decay poly (--schedule cpu sets it)")
    args.out = args.out or f"runs/{plan.name}_{args.labeled_patients}"
    if any(size % 16 for size in args.patch_size):
        p.error(f"--patch-size must be a multiple of 16 (the network halves it four times), got {list(args.patch_size)}")
    if not 0 < args.beta < 1:
        p.error(f"--beta must lie between 0 and 1, got {args.beta}")
    if not 0 <= args.ema_decay <= 1:
        p.error(f"--ema-decay must lie in [0, 1], got {args.ema_decay}")
    if args.foreground_crops is not None and not 0 <= args.foreground_crops <= 1:
        p.error(f"--foreground-crops must lie in [0, 1], got {args.foreground_crops}")
    if args.scale is not None and not 0 < args.scale <= 1:
        p.error(f"--scale must lie in (0, 1], got {args.scale}")
    if plan.dims == 3:
        try:
            args.stride = inference.checked_strides(args.stride, args.patch_size)
        except ValueError as error:
            p.error(str(error))
    if args.resume and args.overwrite:
        p.error("--resume continues a run and --overwrite replaces it: give one")
    try:
        inference.checked_device(args.device)
    except ValueError as error:
        p.error(str(error))
    half_batches = [args.labeled_batch_size] + ([args.batch_size - args.labeled_batch_size] if args.phase == "selftrain" else [])
    if args.phase != "supervised" and any(n < 2 or n % 2 for n in half_batches):
        p.error(f"--phase {args.phase} splits each half of the batch in two: got {half_batches} images")
    # torchrun: each process takes a share of every half
    shared = [("--batch-size", args.batch_size)] if args.phase == "supervised" else \
        [("--labeled-batch-size", args.labeled_batch_size // 2)] + \
        ([("--batch-size", (args.batch_size - args.labeled_batch_size) // 2)] if args.phase == "selftrain" else [])
    for flag, size in shared:
        if size % processes:
            p.error(f"{flag}: {size} images a {'step' if args.phase == 'supervised' else 'half-batch'} cannot be shared "
                    f"by {processes} processes")
    if processes > 1 and args.device == "cuda":
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process
    args.dataset = dataset  # the description and its plan, not a flag: saved_flags leaves it out (checkpoints keep the plan)
    return args


def saved_flags(args):
    """The flags as flags.json and the checkpoints keep them: everything but the data set's description."""
    return {key: value for key, value in vars(args).items() if key != "dataset"}


# ----------------------------------------------------------------------------- random streams
# A step's batches, augmentation and mask come from generators keyed by the seed, the phase, the stream and the
# step (the shuffle by the epoch), so self-training does not replay pre-training's batches and masks. Weights and
# dropout draw from torch's global generator, seeded once, whose state every checkpoint keeps: a resumed run
# draws exactly what an uninterrupted one would.

PHASE_STREAMS = {"supervised": 0, "pretrain": 1, "selftrain": 2}
LABELED, UNLABELED, MASK = 0, 1, 2  # the streams of a phase
AUGMENTATION_KEY = 10**9  # step t's augmentation is drawn with key AUGMENTATION_KEY + t, apart from epochs 0, 1, ...


def step_generator(*keys):
    """A torch generator seeded by a hash of integer keys."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def shuffled_indices(n, iteration, count, keys):
    """Indices iteration*count ... iteration*count + count - 1 of an endless run of shuffled epochs of range(n)."""
    picked = []
    while len(picked) < count:
        epoch, position = divmod(iteration * count + len(picked), n)
        order = torch.randperm(n, generator=step_generator(*keys, epoch))
        picked.extend(order[position:position + count - len(picked)].tolist())
    return torch.tensor(picked)


def draw_batch(bank, iteration, count, args, stream, parts=1):
    """(images (B, 1, *patch), labels (B, *patch)) for one step, on the training device: the step's `count`
    images from an endless run of shuffled epochs of the bank, each with the authors' random augmentation
    (bank.random_augmentation: ACDC rot90/flip or rotation, then the resize; LA rot90, flip, crop).
    Under torchrun of N processes every process draws the choices for all `count` images and builds only
    its share of each of the batch's `parts`: B = count / N."""
    keys = (args.seed, PHASE_STREAMS[args.phase], stream)
    index = shuffled_indices(len(bank), iteration, count, keys)
    augmentation = bank.random_augmentation(count, step_generator(*keys, AUGMENTATION_KEY + iteration))
    processes, rank = bcp.process_share()
    share = count // parts // processes
    kept = torch.cat([torch.arange(share) + part * (count // parts) + rank * share for part in range(parts)])
    return bank.batch(index[kept], args.patch_size, {key: choice[kept] for key, choice in augmentation.items()})


def draw_halves(bank, iteration, both_halves, args, stream):
    """One step's `both_halves` images of the bank (labeled or unlabeled), split into half-batches a and
    b of both_halves / 2 (under torchrun of N processes, each holds both_halves / 2 / N of each):
    ((images_a, images_b), (labels_a, labels_b))."""
    images, labels = draw_batch(bank, iteration, both_halves, args, stream, parts=2)
    return images.chunk(2), labels.chunk(2)


def draw_mask(iteration, args, device):
    """M (*patch) for one step, shared by the whole batch: 1 keeps the base image, 0 is where the crop goes."""
    generator = step_generator(args.seed, PHASE_STREAMS[args.phase], MASK, iteration)
    return bcp.keep_mask(args.patch_size, args.beta, args.mask == "center", generator, device)


# ----------------------------------------------------------------------------- the three steps
# A step draws its batch (and M, but for supervised), computes the loss, updates the student (and the
# teacher), and returns the loss, one (input, target, logits, M or None) view per student
# forward for the pictures, and the Dice of the pseudo-labels (selftrain, when the unlabeled images have
# labels) or None. train() sets the step's learning rate before it calls the step. main() builds `run`:
# run.student_forward and run.teacher_forward are the student and the teacher themselves (their
# torch.compile'd forwards with --compile), run.autocast bf16 autocast with --precision bf16 (else a
# nullcontext), run.labeled and run.unlabeled the data banks, run.dice_loss bcp.DICE_LOSSES[--dice-loss].

def sgd_update(run, loss):
    """One SGD step on the student. Under torchrun each process computes the loss L of the whole batch
    (bcp.sum_across_processes). The backward of that all-reduce sums dL/d(sum) over the N processes, so
    process r holds N times the gradient of L through its own share; average_gradients sums the shares'
    gradients and divides by N: every process steps with the gradient of L, as one process would."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(run.student)
    run.optimizer.step()


def average_gradients(model):
    """Under torchrun: each gradient averaged over the processes, as DistributedDataParallel averages
    them (DDP itself expects one forward per backward; the BCP step has two). Nothing in one process."""
    processes, _ = bcp.process_share()
    if processes == 1:
        return
    grads = [weight.grad for weight in model.parameters() if weight.grad is not None]
    flat = torch.cat([grad.flatten() for grad in grads])  # one all-reduce, as DDP's buckets
    torch.distributed.all_reduce(flat)
    for grad, average in zip(grads, (flat / processes).split([grad.numel() for grad in grads])):
        grad.copy_(average.view_as(grad))


def whole_image_loss(run, logits, target):
    """(Dice + CE) / 2 with the whole image one region."""
    everywhere = torch.ones(target.shape[1:], device=target.device)
    return bcp.mixed_loss(logits, target, mask=everywhere, weight_base=1.0, weight_pasted=0.0, dice_loss=run.dice_loss)


def supervised_step(run, iteration):
    """The paper's labeled-only rows: (Dice + CE) / 2 on labeled images, no mixing."""
    images, truth = draw_batch(run.labeled, iteration, run.args.batch_size, run.args, LABELED)
    with run.autocast:
        logits = run.student_forward(images)
        loss = whole_image_loss(run, logits, truth)
    sgd_update(run, loss)
    return loss, [(images, truth, logits, None)], None


def pretrain_step(run, iteration):
    """Labeled only: a crop of labeled image b pasted into labeled image a, their labels alike. The
    teacher's first pseudo-labels come from this model, so they must already be usable, and the student
    learns on the same kind of mixed image that self-training shows it."""
    args = run.args
    (labeled_a, labeled_b), (truth_a, truth_b) = draw_halves(run.labeled, iteration, args.labeled_batch_size, args, LABELED)
    mask = draw_mask(iteration, args, run.device)
    image = bcp.copy_paste(base=labeled_a, pasted=labeled_b, mask=mask)
    target = bcp.copy_paste(base=truth_a, pasted=truth_b, mask=mask)
    with run.autocast:
        logits = run.student_forward(image)
        if args.pretrain_loss == "regions":  # ACDC: one term per region of M, both ground truth
            loss = bcp.mixed_loss(logits, target, mask=mask, weight_base=1.0, weight_pasted=1.0, dice_loss=run.dice_loss)
        else:  # LA
            loss = whole_image_loss(run, logits, target)
    sgd_update(run, loss)
    return loss, [(image, target, logits, mask)], None


def selftrain_step(run, iteration):
    """One BCP step: the labeled half-batches L_a, L_b with ground truth G_a, G_b, the unlabeled
    half-batches U_a, U_b, one mask M; bcp.bcp_loss (the teacher's pseudo-labels, both mixes, Eq. 6);
    SGD on the student; the teacher becomes an EMA of the student."""
    args = run.args
    (labeled_a, labeled_b), (truth_a, truth_b) = draw_halves(run.labeled, iteration, args.labeled_batch_size, args, LABELED)
    (unlabeled_a, unlabeled_b), hidden_truth = draw_halves(run.unlabeled, iteration, args.batch_size - args.labeled_batch_size,
                                                           args, UNLABELED)  # the unlabeled images' labels: diagnostics only
    mask = draw_mask(iteration, args, run.device)
    with run.autocast:
        loss, views, pseudo = bcp.bcp_loss(run.student_forward, run.teacher_forward, labeled_a, truth_a, labeled_b, truth_b,
                                           unlabeled_a, unlabeled_b, mask, unlabeled_weight=args.u_weight,
                                           mix=bcp.MIXES[args.mix], dice_loss=run.dice_loss)
    sgd_update(run, loss)
    bcp.ema_update(run.teacher, run.student, args.ema_decay)
    # A diagnostic: P_a, P_b against the unlabeled images' hidden labels, from voxel counts summed over the
    # whole batch (under torchrun every process's share: rank 0 logs the one-process value).
    pseudo_dice = (bcp.dice_per_class(torch.cat(pseudo), torch.cat(hidden_truth), args.num_classes,
                                      total=bcp.sum_across_processes).mean() if run.unlabeled_truth else None)
    return loss, views, pseudo_dice


STEPS = {"supervised": supervised_step, "pretrain": pretrain_step, "selftrain": selftrain_step}


# ----------------------------------------------------------------------------- data, validation, checkpoints, pictures

def load_data(args, device):
    """The labeled and unlabeled banks (None before selftrain), the validation volumes (data.Case) at full
    resolution, as evaluated, all on the device, one line saying what was loaded, and whether the unlabeled
    images have true labels (ACDC's and LA's do; they never enter the loss, only the pseudo-label diagnostics)."""
    dataset, flags = args.dataset, vars(args)
    data.check_splits(dataset.root)
    labeled_names, unlabeled_names, val_names = dataset.cases(args.labeled_patients, args.val_cases)
    labeled = dataset.bank(labeled_names, device, flags, args.foreground_crops)  # centred crops need labels: labeled only
    unlabeled = None
    if args.phase == "selftrain":
        if not unlabeled_names:
            raise data.DataError(f"{dataset.root / 'train.list'}: every training case is labeled; selftrain needs unlabeled ones")
        unlabeled = dataset.bank(unlabeled_names, device, flags)
    if not val_names:
        raise data.DataError(f"{dataset.root / 'train.list'}: no validation cases to choose best.pt on (prepare it again "
                             f"with --val-fraction above 0)")
    cases = list(dataset.scored_cases(val_names, flags, device))
    held_aside = (f"{len(val_names)} validation cases held aside from train.list ({val_names[0]} ...)" if args.val_cases
                  else f"{len(val_names)} validation volumes")
    summary = (f"{args.phase}: {len(labeled_names)} labeled images ({args.labeled_patients} patients), "
               f"{len(unlabeled) if unlabeled else 0} unlabeled, {held_aside}, device {device}")
    return labeled, unlabeled, cases, summary, dataset.unlabeled_truth


@torch.no_grad()
def validate(model, cases, args, autocast):
    """Mean Dice over the validation volumes of each foreground class -> a list, one per class; where the plan
    chooses the post-processing (your own scans), the same with only the largest component of each class
    kept (else None); whether the model predicted no foreground at all on every volume whose label has
    some (a collapse); and the classes it never predicted on the volumes whose labels hold them. Each volume segmented as the plan says (inference.segment_and_score): ACDC's slices as
    one batch; LA's sliding windows and largest component of the evaluation (the authors' in-training LA
    validation skips the largest component); your own scans' nnU-Net windows (every half window, Gaussian
    weights). Scored as the plan scores: a class the model does not predict scores 0 (the paper), or a class
    absent from both prediction and truth is left out of the means (nnU-Net)."""
    plan, classes = args.dataset.plan, range(1, args.num_classes)
    chosen = plan.post_processing == "chosen"

    def score(case, prediction):
        dice = lambda labels: bcp.dice_per_class(labels, case.truth, args.num_classes, plan.scoring)
        largest_only = dice(bcp.keep_largest_components(prediction[None], classes)[0]) if chosen else None
        found = [(bool((case.truth == c).any()), bool((prediction == c).any())) for c in classes]
        return dice(prediction), largest_only, (not prediction.any()) if case.truth.any() else None, found

    model.eval()
    with autocast:
        scores = inference.segment_and_score(model, cases, plan, vars(args), args.stride, plan.classes_kept(args.num_classes), score)
    model.train()
    as_predicted, largest_only, empty, found = zip(*scores)
    mean = lambda per_case: torch.stack(per_case).nanmean(0).tolist()  # NaN: a class left out of every volume
    no_foreground = [empty_case for empty_case in empty if empty_case is not None]
    never_predicted = [c for c, in_class in zip(classes, zip(*found)) if not any(predicted for present, predicted in in_class if present)
                       and any(present for present, _ in in_class)]
    return mean(as_predicted), mean(largest_only) if chosen else None, bool(no_foreground) and all(no_foreground), never_predicted


def float_tensors(state):
    """Every float tensor in a (nested) state dict: weights, BN statistics, momentum buffers."""
    if torch.is_tensor(state):
        return [state] if state.is_floating_point() else []
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return [t for value in values for t in float_tensors(value)]


def all_finite(states):
    """True when every float tensor in the states is finite; one host sync."""
    return bool(torch.stack([t.isfinite().all() for t in float_tensors(states)]).all())


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- main

BF16_INSTRUCTIONS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags of bf16 arithmetic in hardware


def cpu_bf16():
    """The bf16 instruction sets this CPU has (Linux's /proc/cpuinfo flags): where there are none, bf16 autocast
    on the CPU is emulated."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in BF16_INSTRUCTIONS if flag in flags]


def precision_line(args, device):
    """One log line: the precision, and on a CPU whether it computes bf16 natively."""
    if device.type != "cpu":
        return f"precision {args.precision}"
    native = cpu_bf16()
    has = f"this CPU computes bf16 natively ({', '.join(native)})" if native else "this CPU has no bf16 instructions"
    return f"precision {args.precision}; {has}" + ("" if native or args.precision == "fp32" else ": bf16 is emulated, likely slower")


def checkpoint_to_resume(args, run_dir):
    """last.pt when --resume finds one, else None; refuses to start over a run without --overwrite,
    and a resume whose flags would change what the run trains."""
    last_path, existing = run_dir / "last.pt", [p.name for p in (run_dir / "last.pt", run_dir / "best.pt") if p.exists()]
    if existing and not args.overwrite and not (args.resume and last_path.exists()):
        raise data.DataError(f"{run_dir} already holds a run ({', '.join(existing)}): add --resume to continue it "
                            f"or --overwrite to start it again")
    if not (args.resume and last_path.exists()):
        return None
    checkpoint = inference.load_checkpoint(last_path, required=("model", "teacher", "optimizer", "iteration", "best_dice",
                                                          "best_iteration", "elapsed", "flags", "rng"))
    if args.budget and checkpoint.get("budget"):
        args.iterations = checkpoint["budget"]["steps"][args.phase]  # the steps the run planned
    elif args.budget:
        args.budget = None  # a run of fixed steps keeps them
    compared = RUN_FLAGS + (("iterations",) if args.lr_decay == "poly" else ())  # poly's lr depends on the steps
    as_tuple = lambda value: tuple(value) if isinstance(value, list) else value  # flags.json-style lists
    as_text = lambda value: " ".join(map(str, value)) if isinstance(value, tuple) else value  # --patch-size 32 32
    changed = [f"--{key.replace('_', '-')} {as_text(as_tuple(checkpoint['flags'][key]))} (now {as_text(getattr(args, key))})"
               for key in compared if key in checkpoint["flags"] and as_tuple(checkpoint["flags"][key]) != getattr(args, key)]
    if changed:
        raise data.DataError(f"{last_path}: trained with {', '.join(changed)}; resume with the same flags, "
                            f"or start a new run with another --out")
    return checkpoint


class RunFolder:
    """<out>/<phase>/: the log, the metrics rows, flags.json, the pictures and the checkpoints."""

    def __init__(self, args, resume_iteration):
        self.args, self.dir = args, Path(args.out) / args.phase
        self.dir.mkdir(parents=True, exist_ok=True)
        for torn in self.dir.glob("*.tmp"):  # a write cut short by a kill; the file it was meant to replace is intact
            torn.unlink()
        self.last_path, self.best_path, self.pictures = self.dir / "last.pt", self.dir / "best.pt", self.dir / "pictures"
        self.pictures.mkdir(exist_ok=True)
        if not resume_iteration:  # a new run (or --overwrite): nothing of an earlier run in this folder stays
            for old in (self.last_path, self.best_path, self.dir / "curves.svg", *self.pictures.glob("iter_*.png")):
                if not old.is_dir():  # a folder in a picture's way costs that picture only (save_picture)
                    old.unlink(missing_ok=True)
        self.log_file = open(self.dir / "train.log", "a" if resume_iteration else "w")
        metrics_path = self.dir / "metrics.jsonl"
        rows, torn = data.read_metrics(metrics_path)
        if torn:
            self.log(f"{metrics_path}: dropped {torn} unreadable line(s), a write cut short")
        data.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows if r["iter"] <= resume_iteration).encode())
        self.metrics_file = open(metrics_path, "a")
        self.write_flags()

    def write_flags(self):
        data.write_atomic(self.dir / "flags.json", (json.dumps(saved_flags(self.args), indent=2) + "\n").encode())

    def log(self, message):
        print(message, flush=True)
        self.log_file.write(message + "\n")
        self.log_file.flush()

    def write_metrics(self, row):
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()

    def stop(self, problem):
        """A NaN or infinite loss or weight ends the run; the checkpoints on disk hold the last good state."""
        kept = [str(p) for p in (self.last_path, self.best_path) if p.exists()]
        self.log(f"stopping: {problem}; " + (f"{' and '.join(kept)} keep the last good weights" if kept else
                                             "no checkpoint was written yet"))
        sys.exit(1)

    def save_checkpoint(self, path, run, progress):
        """One dict serves saving and resuming; only finite weights are ever written (a NaN step stops
        the run before its next checkpoint)."""
        state = {"model": run.student.state_dict(), "teacher": run.teacher.state_dict() if run.teacher is not None else None,
                 "optimizer": run.optimizer.state_dict()}
        if not all_finite(state):
            self.stop(f"the weights became NaN or infinite by iteration {progress['iteration']}")
        cuda = torch.cuda.get_rng_state() if run.device.type == "cuda" else None
        self.write_checkpoint(path, {**state, **progress, "flags": saved_flags(self.args), "plan": inference.saved_plan(self.args.dataset.plan),
                                     "rng": {"torch": torch.get_rng_state(), "cuda": cuda}})

    def write_checkpoint(self, path, state):
        data.write_atomic(path, lambda f: torch.save(state, f))

    def save_curves(self):
        """curves.svg: the validation Dice and, in selftrain, the pseudo-labels' Dice, against the step."""
        rows, _ = data.read_metrics(self.dir / "metrics.jsonl")
        curves = {name: ([r["iter"] for r in rows if key in r], [r[key] for r in rows if key in r], colour)
                  for name, key, colour in (("validation Dice", "val_dice", "#1f77b4"),
                                            ("pseudo-label Dice (unlabeled batch)", "pseudo_dice", "#d62728"))}
        try:
            pictures.write_line_plot(self.dir / "curves.svg", {n: c for n, c in curves.items() if c[0]},
                                f"{self.args.phase}: {self.dir}", "step", "Dice")
        except OSError as error:
            self.log(f"could not write curves.svg ({error}); training goes on")

    def save_picture(self, iteration, views):
        try:  # after the checkpoints: a picture that cannot be written costs nothing else
            pictures.save_step_picture(self.pictures / f"iter_{iteration:06d}.png", views)
        except OSError as error:
            self.log(f"could not write the step picture ({error}); training goes on")


class QuietFolder(RunFolder):
    """What the other processes under torchrun hold instead of the run folder: rank 0 alone writes.
    They check the weights before each checkpoint as rank 0 does, so that a NaN stops every process."""

    def __init__(self, args):
        self.args, self.dir = args, Path(args.out) / args.phase
        self.last_path, self.best_path = self.dir / "last.pt", self.dir / "best.pt"

    def log(self, message):
        pass

    def write_metrics(self, row):
        pass

    def write_checkpoint(self, path, state):
        pass

    def write_flags(self):
        pass

    def save_curves(self):
        pass

    def save_picture(self, iteration, views):
        pass


def init_path(args):
    """Where self-training starts from: --init, or the pre-training's best.pt."""
    return Path(args.init or Path(args.out) / "pretrain" / "best.pt")


def new_sgd(args, model):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def build_models(args, device, memory_format, checkpoint, folder):
    """Student, teacher (selftrain only) and SGD: from last.pt on --resume; self-training otherwise
    starts from the pre-training's best weights (and its SGD momentum with --selftrain-sgd pretrain).
    -> (student, teacher, optimizer, progress: iteration, best_dice, best_iteration, elapsed, and the best
    checkpoint's keep_largest, predicts_no_foreground and never_predicted)."""
    architecture = bcp.NETWORKS[args.dataset.plan.dims]
    # torchrun: each BatchNorm takes its training statistics over the whole batch, not this process's share
    whole_batch = bcp.whole_batch_norms if bcp.process_share()[0] > 1 else (lambda model: model)
    network = lambda: whole_batch(architecture(num_classes=args.num_classes)).to(device, memory_format=memory_format)
    student = network()
    teacher = network() if args.phase == "selftrain" else None
    optimizer = new_sgd(args, student)
    progress = {"iteration": 0, "best_dice": -1.0, "best_iteration": 0, "elapsed": 0.0, "keep_largest": None,
                "predicts_no_foreground": False, "never_predicted": [], "budget": None}
    if checkpoint is not None:
        inference.load_weights(student, checkpoint["model"], folder.last_path)
        if teacher is not None:
            inference.load_weights(teacher, checkpoint["teacher"], folder.last_path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        progress = {key: checkpoint.get(key, value) for key, value in progress.items()}
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        folder.log(f"resumed from {folder.last_path} at iteration {progress['iteration']} "
                   f"(best val Dice {progress['best_dice']:.4f} @ {progress['best_iteration']})")
    elif args.resume:
        folder.log(f"--resume: no {folder.last_path} yet, starting from the beginning")
    if teacher is not None and checkpoint is None:
        start = init_path(args)
        init = inference.load_checkpoint(start, required=("model",))
        inference.load_weights(student, init["model"], start)
        inference.load_weights(teacher, init["model"], start)
        if args.selftrain_sgd == "fresh":
            folder.log(f"student and teacher start from {init_path}; SGD starts fresh (--selftrain-sgd fresh)")
        elif init.get("optimizer"):  # the authors' load_net_opt: the SGD momentum buffers come along
            optimizer.load_state_dict(init["optimizer"])
            folder.log(f"student, teacher and SGD momentum start from {init_path}")
        else:
            folder.log(f"student and teacher start from {init_path}; it holds no SGD state (an fp16 export?), so SGD starts fresh")
    for group in optimizer.param_groups:  # the flags of this invocation win over the saved ones
        group.update(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if teacher is not None:
        teacher.train()  # as the authors: the teacher predicts with dropout and batch statistics
        teacher.requires_grad_(False)
    return student, teacher, optimizer, progress


def learning_rate(args, iteration):
    """The lr of step `iteration` (1-based): divided by 10 after every --lr-step steps, as the LA script,
    or decayed polynomially over the phase's T steps, lr (1 - (t - 1) / T)^0.9, as SSL4MIS (the last step's lr
    is small, not 0)."""
    if args.lr_decay == "poly":
        return args.lr * (1 - (iteration - 1) / args.iterations) ** 0.9
    return args.lr * 0.1 ** ((iteration - 1) // args.lr_step) if args.lr_step else args.lr


def later_phases_seconds(args, progress, seconds_per_step):
    """While pre-training under --budget or --schedule cpu: the self-training still to come, at this machine's
    pace (this phase's seconds a step, validations included, over what the budget planned for it, or over
    the ratio the plan's CPU schedules measured for the two phases)."""
    if args.phase != "pretrain" or not (progress["budget"] or args.schedule == "cpu"):
        return 0.0
    if progress["budget"]:
        steps, seconds = progress["budget"]["steps"], progress["budget"]["seconds"]
        planned = phase_seconds(steps["pretrain"], seconds["pretrain"], seconds["validation"], args.val_every) / steps["pretrain"]
        return phase_seconds(steps["selftrain"], seconds["selftrain"], seconds["validation"], args.val_every) * seconds_per_step / planned
    plan, key = args.dataset.plan, args.schedule_key
    return plan.cpu_settings[key]["iterations"]["selftrain"] * seconds_per_step * plan.selftrain_cost(key)


def schedule_minutes(args):
    """--schedule cpu with fixed steps: the minutes both phases take on the 2-core CPU that measured the plan's
    cpu_seconds."""
    plan, key = args.dataset.plan, args.schedule_key
    steps = plan.cpu_settings[key]["iterations"] | {args.phase: args.iterations}
    return sum(steps[phase] * seconds for phase, seconds in plan.cpu_seconds[key].items()) / 60


# ----------------------------------------------------------------------------- --budget: the steps that fill it here
# Under a time budget, train for the steps that fit it with the lr decayed over exactly those steps (Li, Yumer and
# Ramanan, "Budgeted training", ICLR 2020): a machine twice as fast trains twice the steps in the same hour.

CALIBRATION_STEPS = (3, 12)  # a budgeted phase first takes this many warm-up, then timed steps on copies of its models
BUDGET_MARGIN = 0.03  # of the budget left free: the processes' start and end, what a last replan cannot foresee


def budget_steps(seconds, step_seconds, validation_seconds, val_every, shares):
    """The steps of each phase in `shares` (its steps per unit: {"pretrain": 1, "selftrain": 3}) that fill
    `seconds` where a step of a phase takes step_seconds[phase] and a validation, every val_every steps and at
    each phase's end, validation_seconds. -> {phase: steps}, at least 1 each."""
    per_unit = sum(share * (step_seconds[phase] + validation_seconds / val_every) for phase, share in shares.items())
    units = (seconds - len(shares) * validation_seconds) / per_unit
    return {phase: max(1, int(share * units)) for phase, share in shares.items()}


def phase_seconds(steps, step_seconds, validation_seconds, val_every):
    """The seconds a phase of `steps` steps takes, with a validation every val_every steps and at its end."""
    return steps * step_seconds + math.ceil(steps / val_every) * validation_seconds


def measured_seconds(run, cases, compiled):
    """(Seconds a step of this phase, seconds a validation) on this machine: CALIBRATION_STEPS of the phase's
    own step on copies of the student, teacher and SGD, then a validation of the copy with what follows it
    (best.pt, last.pt and the step's picture, written to a scratch folder). The run's models, its draws
    (keyed by step) and its dropout (torch's generator, forked) stay as they were."""
    args, device = run.args, run.device
    trial = SimpleNamespace(**vars(run))
    trial.student, trial.teacher = copy.deepcopy(run.student), copy.deepcopy(run.teacher)
    trial.student_forward = compiled(trial.student)
    trial.teacher_forward = compiled(trial.teacher) if trial.teacher is not None else None
    trial.optimizer = new_sgd(args, trial.student)
    trial.optimizer.load_state_dict(copy.deepcopy(run.optimizer.state_dict()))  # load_state_dict alone would share the
    # momentum buffers, which the trial's steps would then advance
    warm_up, timed = CALIBRATION_STEPS
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for iteration in range(1, warm_up + timed + 1):
            if iteration == warm_up + 1:
                inference.synchronize(device)
                start = time.time()
            _, views, _ = STEPS[args.phase](trial, iteration)
        inference.synchronize(device)
        step = (time.time() - start) / timed
        start = time.time()
        validate(trial.student, cases, args, run.autocast)
        state = {"model": trial.student.state_dict(), "teacher": trial.teacher and trial.teacher.state_dict(),
                 "optimizer": trial.optimizer.state_dict()}
        with tempfile.TemporaryDirectory() as scratch:
            for name in ("best.pt", "last.pt"):
                data.write_atomic(Path(scratch) / name, lambda f: torch.save(state, f))
            pictures.save_step_picture(Path(scratch) / "step.png", views)
    return step, time.time() - start


def pretraining_seconds(args):
    """The seconds the budgeted pre-training that self-training starts from took, its start included (the
    pre-training's last.pt beside the --init checkpoint), or None when there is none that kept a budget."""
    path = init_path(args).with_name("last.pt")
    pretraining = inference.load_checkpoint(path, required=("model", "flags")) if path.is_file() else {}
    if not pretraining.get("budget") or pretraining["flags"].get("phase") != "pretrain":
        return None
    return pretraining["elapsed"] + pretraining["budget"]["setup"]


def plan_budget(run, cases, compiled, folder, started):
    """--budget: this phase's steps from the seconds a step and a validation take on this machine
    (measured_seconds), so that both phases, validations included, end within the budget. Pre-training plans
    both, --step-ratio self-training steps to one of its own, a self-training step about plan.selftrain_cost
    times its own, and leaves self-training a start as long as its own; self-training plans again from what
    pre-training left, at its own measured speed. Each validation plans the phase's steps again at the pace
    it has kept (replan_budget). -> the plan, with the seconds the phase is allotted, which the checkpoints keep
    (--resume continues it)."""
    args = run.args
    step, validation = measured_seconds(run, cases, compiled)
    setup = time.time() - started
    left = 60 * args.budget * (1 - BUDGET_MARGIN) - setup
    if args.phase == "pretrain":
        seconds = {"pretrain": step, "selftrain": step * args.dataset.plan.selftrain_cost(args.schedule_key)}
        steps = budget_steps(left - setup, seconds, validation, args.val_every, {"pretrain": 1, "selftrain": args.step_ratio})
        allotted = phase_seconds(steps["pretrain"], step, validation, args.val_every)
        said = (f"a pre-training step {step:.3f} s, a validation {validation:.1f} s, a self-training step about "
                f"{seconds['selftrain']:.3f} s (measured again when it starts)")
    else:
        spent = pretraining_seconds(args)
        seconds, allotted = {"selftrain": step}, left - (spent or 0)
        steps = budget_steps(allotted, seconds, validation, args.val_every, {"selftrain": 1})
        said = (f"pre-training took {spent / 60:.1f} minutes" if spent is not None else
                "no budgeted pre-training to count, self-training plans the whole budget") + \
               f"; a self-training step {step:.3f} s, a validation {validation:.1f} s"
    minutes = " + ".join(f"{phase} {count} steps ({phase_seconds(count, seconds[phase], validation, args.val_every) / 60:.1f} min)"
                         for phase, count in steps.items())
    folder.log(f"--budget {args.budget:g} minutes on this machine: {said}, measured here: {minutes}, the lr decayed over them")
    if allotted < phase_seconds(args.val_every, step, validation, args.val_every):
        folder.log(f"warning: the budget leaves this phase less than {args.val_every} steps (--val-every); give a larger --budget")
    return {"minutes": args.budget, "steps": steps, "seconds": seconds | {"validation": validation}, "setup": setup,
            "allotted": allotted}


REPLAN_LOGGED = 0.01  # a new plan that moves the phase's end by more than this share is said in the log


def replan_budget(args, progress, iteration, elapsed, folder):
    """At a validation of a budgeted phase, before it and its checkpoints: the steps that still fit the seconds
    the phase is allotted at the pace of its steps so far (`elapsed` seconds for `iteration` steps, less the
    validations before this one at their measured seconds), this validation and the rest included, the lr
    decayed over them from here on. A machine's speed wanders over an hour (by a third, seen on a shared 2-core
    CPU), more than a measurement of a few steps can foresee."""
    budget, validation = progress["budget"], progress["budget"]["seconds"]["validation"]
    pace = (elapsed - (iteration - 1) // args.val_every * validation) / iteration
    left = budget["allotted"] - elapsed - validation
    steps = iteration + (budget_steps(left, {args.phase: pace}, validation, args.val_every, {args.phase: 1})[args.phase]
                         if left > pace + validation else 0)
    if abs(steps - args.iterations) > REPLAN_LOGGED * args.iterations:
        folder.log(f"--budget: {steps} steps fit this phase at its pace so far ({pace:.3f} s a step; planned {args.iterations})")
    args.iterations = budget["steps"][args.phase] = steps
    folder.write_flags()


def train(run, cases, folder, progress):
    """The loop: a step, a progress line and metrics row every --log-every steps, validation and the
    checkpoints every --val-every steps, a clean stop before --time-limit."""
    args, device = run.args, run.device
    writer = not isinstance(folder, QuietFolder)  # rank 0 under torchrun validates and writes
    start = progress["iteration"]
    take_step = STEPS[args.phase]
    run.student.train()
    invocation_start = time.time()
    phase_start, window_start = invocation_start - progress["elapsed"], invocation_start
    deadline = run.started + 60 * args.time_limit if args.time_limit else math.inf  # from the process's start
    loss_sum, pseudo_sum, window_steps = torch.zeros((), device=device), torch.zeros((), device=device), 0
    last_dice, validation_seconds = float("nan"), 0.0

    def save(path, iteration):
        folder.save_checkpoint(path, run, {**progress, "iteration": iteration, "elapsed": time.time() - phase_start})

    iteration = start
    while iteration < args.iterations:  # a budget's validations may move the end (replan_budget)
        iteration += 1
        lr = learning_rate(args, iteration)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss, views, pseudo_dice = take_step(run, iteration)
        loss_sum += loss.detach()
        if pseudo_dice is not None:
            pseudo_sum += pseudo_dice
        window_steps += 1

        validating = iteration % args.val_every == 0 or iteration == args.iterations
        if validating and progress["budget"] and iteration < args.iterations:
            replan_budget(args, progress, iteration, time.time() - phase_start, folder)
        now = time.time()
        seconds_per_step = (now - invocation_start) / (iteration - start)  # validations included
        out_of_time = iteration < args.iterations and now + validating * validation_seconds + seconds_per_step > deadline
        if args.time_limit and bcp.process_share()[0] > 1:  # rank 0's clock decides for every process
            out_of_time = bool(bcp.sum_across_processes(torch.tensor(float(out_of_time and writer), device=device)) > 0)
        if iteration % args.log_every == 0 or validating or out_of_time:  # the loss is checked before every checkpoint
            mean_loss = loss_sum.item() / window_steps  # the one host sync every --log-every steps
            if not math.isfinite(mean_loss):
                folder.stop(f"the loss became {mean_loss} between iterations {iteration - window_steps + 1} and {iteration}")
            speed = window_steps / (now - window_start)
            row = {"iter": iteration, "loss": mean_loss, "lr": lr, "time": round(now - phase_start, 3)}
            if pseudo_dice is not None:  # the teacher's pseudo-labels against the unlabeled images' true labels
                row["pseudo_dice"] = pseudo_sum.item() / window_steps
            folder.write_metrics(row)
            last_text = "-" if math.isnan(last_dice) else f"{last_dice:.4f}"
            best = progress["best_iteration"]
            validation = f"val Dice {last_text} (best {progress['best_dice']:.4f} @ {best})" if best else "val Dice -"
            pseudo_text = f" | pseudo-label Dice {row['pseudo_dice']:.4f}" if "pseudo_dice" in row else ""
            seconds_left = (args.iterations - iteration) * seconds_per_step
            schedule_left = seconds_left + later_phases_seconds(args, progress, seconds_per_step)
            schedule_eta = f" (schedule {format_seconds(schedule_left)})" if args.schedule == "cpu" or args.budget else ""
            folder.log(f"iter {iteration}/{args.iterations} | loss {mean_loss:.4f}{pseudo_text} | {speed:.2f} it/s | "
                       f"ETA {format_seconds(seconds_left)}{schedule_eta} | {validation}")
            loss_sum, pseudo_sum, window_steps, window_start = torch.zeros((), device=device), torch.zeros((), device=device), 0, now

        if validating:
            validation_start = time.time()
            last_dice = validate_and_save(run, cases, folder, progress, iteration, views, save)
            validation_seconds = time.time() - validation_start
            window_start += validation_seconds  # it/s counts training steps only
        if out_of_time:
            if not validating:
                save(folder.last_path, iteration)
            folder.log(f"time limit: stopped at iteration {iteration} of {args.iterations}; continue with --resume")
            return False
    folder.log(f"done: best val Dice {progress['best_dice']:.4f} at iteration {progress['best_iteration']}; {folder.best_path}")
    if progress["predicts_no_foreground"]:
        folder.log(f"warning: {folder.best_path} predicts no foreground on any validation volume that has some. "
                   f"{no_foreground_advice(args.dataset.plan)}")
    elif progress["never_predicted"]:
        names = args.dataset.names_of_classes(args.num_classes)
        folder.log(f"warning: {folder.best_path} never predicts {', '.join(names[c - 1] for c in progress['never_predicted'])} "
                   f"on the validation volumes that hold it. {no_foreground_advice(args.dataset.plan)}")
    return True


def no_foreground_advice(plan):
    """What to try when a model predicts no foreground, or never a class."""
    centred = "foreground_crops" not in plan.unused_flags
    return ("Try more steps (--iterations), more labeled images a step (--labeled-batch-size)"
            + (", more of them centred on a class (--foreground-crops 0.67)" if centred else "")
            + (", or coarser voxels (prepare_acdc.py --spacing)." if plan.preprocessing["rule"] == "prepared" else "."))


def start_without_foreground(args):
    """Self-training starts from a pre-training's best weights: refuse one whose validation predicted no
    foreground on any volume that has some (the teacher's pseudo-labels would be empty: a collapse carried
    on), unless --init names it. -> that start's path when --init names such a model, else None."""
    start = init_path(args)
    if not (start.is_file() and inference.load_checkpoint(start, required=("model",)).get("predicts_no_foreground")):
        return None
    if not args.init:
        raise data.DataError(f"{start}: predicts no foreground on any validation volume that has some; self-training "
                             f"from it would learn empty pseudo-labels. {no_foreground_advice(args.dataset.plan)} (--init {start} starts "
                             f"from it anyway.)")
    return start


def class_list(classes):
    """[1, 3] -> "1, 3"; [] -> "none"."""
    return ", ".join(map(str, classes)) or "none"


def validate_and_save(run, cases, folder, progress, iteration, views, save):
    """Every --val-every steps: validate the student (rank 0), keep best.pt when it beats the best so far
    (your own scans: scored with the post-processing this validation chose, as evaluation will score it, and
    kept with that choice), write last.pt, the step's picture and the curves. -> the mean validation Dice
    (NaN on the other processes, which only check the weights)."""
    if isinstance(folder, QuietFolder):
        save(folder.last_path, iteration)  # checks the weights as rank 0 does; QuietFolder writes nothing
        return float("nan")
    as_predicted, largest_only, no_foreground, never_predicted = validate(run.student, cases, run.args, run.autocast)
    keep_largest, per_class = (None, as_predicted) if largest_only is None else inference.choose_post_processing(as_predicted, largest_only)
    dice = float(np.nan_to_num(np.nanmean(per_class)))  # the mean over classes, as evaluation scores it, picks the best checkpoint
    folder.write_metrics({"iter": iteration, "val_dice": dice, "val_dice_per_class": per_class})
    if dice > progress["best_dice"]:
        progress.update(best_dice=dice, best_iteration=iteration, keep_largest=keep_largest, predicts_no_foreground=no_foreground,
                        never_predicted=never_predicted)
        save(folder.best_path, iteration)
    save(folder.last_path, iteration)
    folder.save_picture(iteration, views)
    folder.save_curves()
    names = run.args.dataset.names_of_classes(run.args.num_classes)

    def per_class_line(scores):
        return ", ".join(f"{name} {d:.4f}" for name, d in zip(names, scores))

    classes = f" ({per_class_line(per_class)})" if len(per_class) > 1 else ""
    kept = "" if largest_only is None else (f" with the largest component kept for classes {class_list(keep_largest)} (as "
                                            f"predicted {per_class_line(as_predicted)}; only each class's largest "
                                            f"{per_class_line(largest_only)})")
    folder.log(f"iter {iteration} | val Dice {dice:.4f}{classes}{kept} | best {progress['best_dice']:.4f} @ {progress['best_iteration']}")
    return dice


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    checkpoint = checkpoint_to_resume(args, Path(args.out) / args.phase)
    device, autocast, memory_format, compiled = inference.runtime(args.device, args.precision, args.dataset.plan.dims, args.compile)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():  # under torchrun
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    torch.manual_seed(args.seed)
    labeled, unlabeled, cases, summary, unlabeled_truth = load_data(args, device)  # bad data stops here, before anything is written
    no_foreground = start_without_foreground(args) if args.phase == "selftrain" and checkpoint is None else None
    resume_iteration = checkpoint["iteration"] if checkpoint else 0
    folder = RunFolder(args, resume_iteration) if bcp.process_share()[1] == 0 else QuietFolder(args)
    folder.log(f"{summary}; {precision_line(args, device)}")
    if args.schedule == "cpu" and not args.budget:
        folder.log(f"--schedule cpu: both phases about {schedule_minutes(args):.0f} minutes on the 2-core CPU that "
                   f"measured it (validations included)")
    if no_foreground:
        folder.log(f"warning: {no_foreground} predicts no foreground on any validation volume that has some; starting from it (--init)")
    if args.dataset.synthetic:
        folder.log(f"{args.root} holds SYNTHETIC phantoms, not real scans (see prepare_acdc.py)")
    student, teacher, optimizer, progress = build_models(args, device, memory_format, checkpoint, folder)
    run = SimpleNamespace(args=args, device=device, autocast=autocast, optimizer=optimizer, student=student,
                          teacher=teacher, student_forward=compiled(student),
                          teacher_forward=compiled(teacher) if teacher is not None else None,
                          labeled=labeled, unlabeled=unlabeled, unlabeled_truth=unlabeled_truth,
                          dice_loss=bcp.DICE_LOSSES[args.dice_loss], started=started)
    if args.budget:
        progress["budget"] = progress["budget"] or plan_budget(run, cases, compiled, folder, started)
        args.iterations = progress["budget"]["steps"][args.phase]
        folder.write_flags()
    else:
        progress["budget"] = None  # --iterations fixes the steps of a run that had a budget
    if train(run, cases, folder, progress) and progress["keep_largest"] is not None:
        folder.log(f"post-processing, chosen on validation with best.pt (nnU-Net's rule): the largest component kept for "
                   f"classes {class_list(progress['keep_largest'])}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:
        sys.exit(f"error: {error}")
    except OSError as error:  # an output that cannot be written: read-only folder, disk full
        sys.exit(f"error: {error}")
