"""
Train BCP on ACDC, or the labeled-only U-Net it is compared with.

    python train.py --phase pretrain                 # 10k steps: labeled slices copy-pasted into each other
    python train.py --phase selftrain                # 30k steps: Mean-Teacher with bidirectional copy-paste
    python train.py --phase supervised               # the paper's U-Net rows: labeled slices, no mixing
    python train.py --phase selftrain --resume       # continue an interrupted phase from <out>/<phase>/last.pt
    python train.py --phase selftrain --time-limit 50    # stop cleanly within 50 minutes; --resume continues

Defaults are the paper's ACDC settings with 7 labeled patients (10%); every one is a flag (-h).
Each phase writes <out>/<phase>/: best.pt, last.pt, metrics.jsonl, train.log, flags.json, pictures/.
A phase folder that holds a run is never started over unless --overwrite says so.
"""
import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import bcp

PHASE_ITERATIONS = {"supervised": 10000, "pretrain": 10000, "selftrain": 30000}
# --mix: which copy-pasted images of a self-train step enter the loss ("none": M = 1, no pasting)
MIX_DIRECTIONS = {"bidirectional": ("inward", "outward"), "inward": ("inward",), "outward": ("outward",),
                  "none": ("inward", "outward")}
# Flags that define what a run trains: --resume refuses a value other than the checkpoint's.
RUN_FLAGS = ("phase", "labeled_patients", "batch_size", "labeled_batch_size", "patch_size", "num_classes",
             "beta", "mask", "u_weight", "ema_decay", "seed", "mix", "legacy_dice_mask")


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
    p.add_argument("--root", default="data/ACDC", help="dataset folder in the SSL4MIS layout")
    p.add_argument("--out", default="runs/acdc_7", help="run folder; each phase writes <out>/<phase>/")
    p.add_argument("--phase", choices=list(PHASE_ITERATIONS), default="pretrain")
    p.add_argument("--labeled-patients", type=at_least(1),
                   help="the first N patients of train.list are labeled (7 on ACDC; every labeled one on your own data)")
    p.add_argument("--iterations", type=at_least(1), help="steps (10000; 30000 for selftrain)")
    p.add_argument("--batch-size", type=at_least(1), default=24, help="slices per step (selftrain: labeled + unlabeled)")
    p.add_argument("--labeled-batch-size", type=at_least(1), default=12, help="labeled slices per step (pretrain, selftrain)")
    p.add_argument("--patch-size", type=at_least(16), default=256, help="slices are resized to patch x patch (a multiple of 16)")
    p.add_argument("--num-classes", type=at_least(2), help="background + RV, Myo, LV on ACDC; your own data says")
    p.add_argument("--lr", type=at_least(0.0, float), default=0.01, help="SGD learning rate (constant)")
    p.add_argument("--momentum", type=at_least(0.0, float), default=0.9)
    p.add_argument("--weight-decay", type=at_least(0.0, float), default=1e-4)
    p.add_argument("--beta", type=float, default=2 / 3, help="the pasted crop is beta*H x beta*W, 0 < beta < 1")
    p.add_argument("--mask", choices=["random", "center"], default="random", help="where the crop sits")
    p.add_argument("--u-weight", type=at_least(0.0, float), default=0.5,
                   help="alpha: weight of the loss terms of the region whose target is a pseudo-label (1 for ground truth)")
    p.add_argument("--ema-decay", type=float, default=0.99, help="teacher = EMA of the student, 0 <= decay <= 1")
    p.add_argument("--mix", choices=list(MIX_DIRECTIONS), default="bidirectional",
                   help="selftrain ablations: both copy-pasted images (BCP), only inward (a labeled crop in an "
                        "unlabeled image), only outward (an unlabeled crop in a labeled image), or none "
                        "(M = 1: an unlabeled image with its pseudo-label and a labeled one with its ground truth)")
    p.add_argument("--legacy-dice-mask", action="store_true",
                   help="the authors' Dice loss before their 2023-10-29 fix (background Dice over the whole image), "
                        "with which the paper's table was trained")
    p.add_argument("--val-every", type=at_least(1), default=200, help="validate (and checkpoint) every N steps")
    p.add_argument("--log-every", type=at_least(1), default=20, help="progress line and metrics row every N steps")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 as the authors (TF32 convolutions on CUDA), or bf16 autocast (faster on a GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher forwards")
    p.add_argument("--time-limit", type=at_least(1.0, float), metavar="MINUTES",
                   help="stop before this much time has passed, with last.pt written; --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<phase>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start the phase again, replacing the run in <out>/<phase>/")
    p.add_argument("--init", help="selftrain: start student, teacher and SGD state from this checkpoint "
                                  "(default <out>/pretrain/best.pt)")
    args = p.parse_args(argv)
    args.iterations = args.iterations or PHASE_ITERATIONS[args.phase]
    own_data = bcp.dataset_info(args.root)  # written by prepare_acdc.py --raw for your own scans
    args.num_classes = args.num_classes or own_data.get("num_classes", 4)
    args.labeled_patients = args.labeled_patients or (len(bcp.labeled_patients(args.root)) if own_data else 7)
    if args.patch_size % 16:
        p.error(f"--patch-size must be a multiple of 16 (the U-Net halves it four times), got {args.patch_size}")
    if not 0 < args.beta < 1:
        p.error(f"--beta must lie between 0 and 1, got {args.beta}")
    if not 0 <= args.ema_decay <= 1:
        p.error(f"--ema-decay must lie in [0, 1], got {args.ema_decay}")
    if args.resume and args.overwrite:
        p.error("--resume continues a run and --overwrite replaces it: give one")
    try:
        bcp.checked_device(args.device)
    except ValueError as error:
        p.error(str(error))
    half_batches = [args.labeled_batch_size] + ([args.batch_size - args.labeled_batch_size] if args.phase == "selftrain" else [])
    if args.phase != "supervised" and any(n < 2 or n % 2 for n in half_batches):
        p.error(f"--phase {args.phase} splits each half of the batch in two: got {half_batches} slices")
    return args


# ----------------------------------------------------------------------------- random streams
# Every draw is a pure function of (seed, phase, stream, step): a resumed run draws exactly what an
# uninterrupted one would, and self-training does not replay pre-training's batches and masks.

PHASE_STREAMS = {"supervised": 0, "pretrain": 1, "selftrain": 2}
LABELED, UNLABELED, MASK = 0, 1, 2  # the streams of a phase
AUGMENTATION_KEY = 10**9  # step t's augmentation is drawn with key AUGMENTATION_KEY + t, apart from epochs 0, 1, ...


def step_generator(*keys):
    """A torch generator seeded by a hash of integer keys."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def shuffled_indices(n, step, count, keys):
    """Indices step*count ... step*count + count - 1 of an endless run of shuffled epochs of range(n)."""
    picked = []
    while len(picked) < count:
        epoch, position = divmod(step * count + len(picked), n)
        order = torch.randperm(n, generator=step_generator(*keys, epoch))
        picked.extend(order[position:position + count - len(picked)].tolist())
    return torch.tensor(picked)


def draw_batch(bank, step, count, args, stream):
    """(images (B, 1, P, P), labels (B, P, P)) for one step, augmented, on the training device."""
    keys = (args.seed, PHASE_STREAMS[args.phase], stream)
    index = shuffled_indices(len(bank), step, count, keys)
    augmentation = bank.random_augmentation(count, step_generator(*keys, AUGMENTATION_KEY + step))
    return bank.batch(index, args.patch_size, augmentation)


def draw_halves(bank, step, count, args, stream):
    """One step's batch split into its halves a and b: ((images_a, images_b), (labels_a, labels_b))."""
    images, labels = draw_batch(bank, step, count, args, stream)
    return images.chunk(2), labels.chunk(2)


def draw_mask(step, args, device):
    """M (P, P) for one step, shared by the whole batch: 1 keeps the base image, 0 is where the crop goes."""
    generator = step_generator(args.seed, PHASE_STREAMS[args.phase], MASK, step)
    return bcp.paste_mask(args.patch_size, args.patch_size, args.beta, args.mask == "center", generator, device)


# ----------------------------------------------------------------------------- the three steps
# A step draws its batch, computes the loss, updates the student (and the teacher), and returns the
# loss, one (input, target, logits) triple per student forward, and M (None without mixing), for the pictures.

def sgd_update(run, loss):
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()


def supervised_step(run, step):
    """The paper's U-Net rows: Dice + CE on labeled slices, the whole image one region."""
    images, truth = draw_batch(run.labeled, step, run.args.batch_size, run.args, LABELED)
    with run.autocast:
        logits = run.student_forward(images)
    everywhere = torch.ones(images.shape[-2:], device=images.device)
    loss = bcp.mixed_loss(logits, truth, everywhere, weight_base=1.0, weight_pasted=0.0)
    sgd_update(run, loss)
    return loss, [(images, truth, logits)], None


def pretrain_step(run, step):
    """Labeled only: a crop of labeled image b pasted into labeled image a, their labels alike, both
    regions weighted 1. The teacher's first pseudo-labels come from this model, so they must already
    be usable, and the student learns on the same kind of mixed image that self-training shows it."""
    args = run.args
    (images_a, images_b), (truth_a, truth_b) = draw_halves(run.labeled, step, args.labeled_batch_size, args, LABELED)
    mask = draw_mask(step, args, run.device)
    mixed_image, mixed_target = bcp.copy_paste(images_a, images_b, mask), bcp.copy_paste(truth_a, truth_b, mask)
    with run.autocast:
        logits = run.student_forward(mixed_image)
    loss = bcp.mixed_loss(logits, mixed_target, mask, weight_base=1.0, weight_pasted=1.0,
                          legacy_dice_mask=args.legacy_dice_mask)
    sgd_update(run, loss)
    return loss, [(mixed_image, mixed_target, logits)], mask


def selftrain_step(run, step):
    """One BCP step, in the order of the paper's Fig. 2:
    1. labeled slices L_a, L_b with ground truth G_a, G_b; unlabeled slices U_a, U_b;
    2. the teacher's pseudo-labels P_a, P_b of U_a, U_b (argmax, largest component per class);
    3. one mask M for the batch;
    4. inward:  X_in  = U_a * M + L_a * (1 - M), target P_a * M + G_a * (1 - M)   (Eq. 1, 3)
       outward: X_out = L_b * M + U_b * (1 - M), target G_b * M + P_b * (1 - M)   (Eq. 2, 4);
    5. the loss of each (Eq. 6): the terms of the region whose target is a pseudo-label weighted
       alpha, those of the ground-truth region 1;
    6. SGD on the student; 7. the teacher becomes an EMA of the student.
    --mix inward or outward keeps one of the two images; --mix none sets M = 1 (no pasting)."""
    args = run.args
    (labeled_a, labeled_b), (truth_a, truth_b) = draw_halves(run.labeled, step, args.labeled_batch_size, args, LABELED)
    (unlabeled_a, unlabeled_b), _ = draw_halves(run.unlabeled, step, args.batch_size - args.labeled_batch_size, args, UNLABELED)
    with torch.no_grad(), run.autocast:  # two teacher forwards, as the authors run them (BN statistics per half)
        teacher_logits = torch.cat([run.teacher_forward(unlabeled_a), run.teacher_forward(unlabeled_b)])
    pseudo_a, pseudo_b = bcp.pseudo_label(teacher_logits).chunk(2)
    mask = draw_mask(step, args, run.device)
    if args.mix == "none":
        mask = torch.ones_like(mask)
    alpha = args.u_weight
    mixed = {"inward": (bcp.copy_paste(unlabeled_a, labeled_a, mask), bcp.copy_paste(pseudo_a, truth_a, mask), alpha, 1.0),
             "outward": (bcp.copy_paste(labeled_b, unlabeled_b, mask), bcp.copy_paste(truth_b, pseudo_b, mask), 1.0, alpha)}
    loss, views = 0.0, []
    for direction in MIX_DIRECTIONS[args.mix]:
        image, target, weight_base, weight_pasted = mixed[direction]
        with run.autocast:
            logits = run.student_forward(image)
        loss = loss + bcp.mixed_loss(logits, target, mask, weight_base=weight_base, weight_pasted=weight_pasted,
                                     legacy_dice_mask=args.legacy_dice_mask)
        views.append((image, target, logits))
    sgd_update(run, loss)
    bcp.ema_update(run.teacher, run.student, args.ema_decay)
    return loss, views, mask


STEPS = {"supervised": supervised_step, "pretrain": pretrain_step, "selftrain": selftrain_step}


# ----------------------------------------------------------------------------- validation, checkpoints, pictures

@torch.no_grad()
def validate(model, volumes, args, autocast):
    """Mean Dice over the validation volumes and the foreground classes (a class the model does not
    predict scores 0, as in the authors' evaluation). Each volume's slices go through as one batch."""
    model.eval()
    with autocast:
        scores = [bcp.dice_per_class(bcp.predict_volume(model, image, args.patch_size), label, args.num_classes)
                  for image, label in volumes]
    model.train()
    return torch.stack(scores).mean().item()


def float_tensors(state):
    """Every float tensor in a (nested) state dict: weights, BN statistics, momentum buffers."""
    if torch.is_tensor(state):
        return [state] if state.is_floating_point() else []
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return [t for value in values for t in float_tensors(value)]


def all_finite(states):
    """True when every float tensor in the states is finite; one host sync."""
    return bool(torch.stack([t.isfinite().all() for t in float_tensors(states)]).all())


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


def save_step_picture(path, views, mask, rows=4):
    """A few samples of the current step, one row each: the (mixed) input with the pasted rectangle
    outlined in yellow, its (mixed) target, the student's prediction."""
    images, targets, logits = (torch.cat(parts) for parts in zip(*views))
    pick = torch.linspace(0, len(images) - 1, min(rows, len(images))).long()  # both halves of a selftrain batch
    size = max(images.shape[-1], 160)  # small patches are enlarged to be seen
    images, targets, predictions = (bcp.resize_nearest(t.detach().float().cpu(), size, size).numpy()
                                    for t in (images[pick, 0], targets[pick], logits[pick].argmax(1)))
    hole = np.zeros((size, size), bool) if mask is None else bcp.surface(
        bcp.resize_nearest((mask == 0).cpu(), size, size).numpy())
    tiles = []
    for image, target, prediction in zip(images, targets, predictions):
        picture = bcp.gray(image)
        framed = picture.copy()
        framed[hole] = (255, 220, 0)
        tiles += [framed, bcp.paint_labels(picture, target), bcp.paint_labels(picture, prediction)]
    bcp.write_png(path, bcp.montage(tiles, columns=3))


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- main

def runtime(args):
    """Device, autocast context, memory format of models and batches, and the forward wrapper
    (torch.compile or nothing), resolved once from the flags (benchmark.py measures with the same)."""
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 as the authors ran it on an RTX 3090: TF32 matrix and convolution math
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    compiled = torch.compile if args.compile else (lambda model: model)
    return device, autocast, memory_format, compiled


def checkpoint_to_resume(args, run_dir):
    """last.pt when --resume finds one, else None; refuses to start over a run without --overwrite,
    and a resume whose flags would change what the run trains."""
    last_path, existing = run_dir / "last.pt", [p.name for p in (run_dir / "last.pt", run_dir / "best.pt") if p.exists()]
    if existing and not args.overwrite and not (args.resume and last_path.exists()):
        raise bcp.DataError(f"{run_dir} already holds a run ({', '.join(existing)}): add --resume to continue it "
                            f"or --overwrite to start it again")
    if not (args.resume and last_path.exists()):
        return None
    checkpoint = bcp.load_checkpoint(last_path, required=("model", "teacher", "optimizer", "iteration", "best_dice",
                                                          "best_iteration", "elapsed", "flags", "rng"))
    changed = [f"--{key.replace('_', '-')} {checkpoint['flags'][key]} (now {getattr(args, key)})"
               for key in RUN_FLAGS if key in checkpoint["flags"] and checkpoint["flags"][key] != getattr(args, key)]
    if changed:
        raise bcp.DataError(f"{last_path}: trained with {', '.join(changed)}; resume with the same flags, "
                            f"or start a new run with another --out")
    return checkpoint


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.out) / args.phase
    checkpoint = checkpoint_to_resume(args, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for torn in run_dir.glob("*.tmp"):  # a write cut short by a kill; the file it was meant to replace is intact
        torn.unlink()
    log_file = open(run_dir / "train.log", "a")

    def log(message):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    device, autocast, memory_format, compiled = runtime(args)
    torch.manual_seed(args.seed)

    # data: every slice and validation volume in memory on the training device
    labeled_names, unlabeled_names = bcp.training_slices(args.root, args.labeled_patients)
    labeled_bank = bcp.SliceBank(*bcp.load_slices(args.root, labeled_names, args.num_classes), device)
    unlabeled_bank = None
    if args.phase == "selftrain":
        if not unlabeled_names:
            raise bcp.DataError(f"{Path(args.root) / 'train.list'}: every patient is labeled; selftrain needs unlabeled slices")
        unlabeled_bank = bcp.SliceBank(*bcp.load_slices(args.root, unlabeled_names, args.num_classes), device)
    volumes = [(torch.from_numpy(image).to(device), torch.from_numpy(label).to(device))
               for _, image, label in bcp.load_volumes(args.root, "val", args.num_classes)]
    log(f"{args.phase}: {len(labeled_names)} labeled slices ({args.labeled_patients} patients), "
        f"{len(unlabeled_bank) if unlabeled_bank else 0} unlabeled, {len(volumes)} validation volumes, device {device}")
    if (Path(args.root) / "SYNTHETIC").exists():
        log(f"{args.root} holds SYNTHETIC phantoms, not ACDC (see prepare_acdc.py)")

    # models and optimizer: from last.pt on --resume; self-training starts from the pre-training
    student = bcp.UNet(num_classes=args.num_classes).to(device, memory_format=memory_format)
    teacher = bcp.UNet(num_classes=args.num_classes).to(device, memory_format=memory_format) if args.phase == "selftrain" else None
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start, best_dice, best_iteration, elapsed_before = 0, -1.0, 0, 0.0
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if checkpoint is not None:
        bcp.load_weights(student, checkpoint["model"], last_path)
        if teacher is not None:
            bcp.load_weights(teacher, checkpoint["teacher"], last_path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        start, best_dice, best_iteration = checkpoint["iteration"], checkpoint["best_dice"], checkpoint["best_iteration"]
        elapsed_before = checkpoint["elapsed"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        log(f"resumed from {last_path} at iteration {start} (best val Dice {best_dice:.4f} @ {best_iteration})")
    elif args.resume:
        log(f"--resume: no {last_path} yet, starting from the beginning")
    if teacher is not None and checkpoint is None:
        init_path = Path(args.init or Path(args.out) / "pretrain" / "best.pt")
        init = bcp.load_checkpoint(init_path, required=("model",))
        bcp.load_weights(student, init["model"], init_path)
        bcp.load_weights(teacher, init["model"], init_path)
        if init.get("optimizer"):  # the authors' load_net_opt: the SGD momentum buffers come along
            optimizer.load_state_dict(init["optimizer"])
            log(f"student, teacher and SGD momentum start from {init_path}")
        else:
            log(f"student and teacher start from {init_path}; it holds no SGD state (an fp16 export?), so SGD starts fresh")
    for group in optimizer.param_groups:  # the flags of this invocation win over the saved ones
        group.update(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if teacher is not None:
        teacher.train()  # as the authors: the teacher predicts with dropout and batch statistics
        teacher.requires_grad_(False)

    metrics_path = run_dir / "metrics.jsonl"
    rows, torn = read_metrics(metrics_path)
    if torn:
        log(f"{metrics_path}: dropped {torn} unreadable line(s), a write cut short")
    bcp.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows if r["iter"] <= start).encode())
    metrics_file = open(metrics_path, "a")
    bcp.write_atomic(run_dir / "flags.json", (json.dumps(vars(args), indent=2) + "\n").encode())
    picture_dir = run_dir / "pictures"
    picture_dir.mkdir(exist_ok=True)

    def write_metrics(row):
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()

    def stop(problem):
        """A NaN or infinite loss or weight ends the run; the checkpoints on disk hold the last good state."""
        kept = [str(p) for p in (last_path, best_path) if p.exists()]
        log(f"stopping: {problem}; " + (f"{' and '.join(kept)} keep the last good weights" if kept else
                                        "no checkpoint was written yet"))
        sys.exit(1)

    def save_checkpoint(path, iteration):
        """Only finite weights are ever written (a NaN step stops the run before its next checkpoint)."""
        state = {"model": student.state_dict(), "teacher": teacher.state_dict() if teacher is not None else None,
                 "optimizer": optimizer.state_dict()}
        if not all_finite(state):
            stop(f"the weights became NaN or infinite by iteration {iteration}")
        bcp.write_atomic(path, lambda f: torch.save({
            **state, "iteration": iteration, "best_dice": best_dice,
            "best_iteration": best_iteration, "elapsed": time.time() - phase_start, "flags": vars(args),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        }, f))

    step = STEPS[args.phase]
    run = SimpleNamespace(args=args, device=device, autocast=autocast, optimizer=optimizer, student=student,
                          teacher=teacher, student_forward=compiled(student),
                          teacher_forward=compiled(teacher) if teacher is not None else None,
                          labeled=labeled_bank, unlabeled=unlabeled_bank)
    student.train()
    invocation_start = time.time()
    phase_start, window_start = invocation_start - elapsed_before, invocation_start
    deadline = invocation_start + 60 * args.time_limit if args.time_limit else math.inf
    loss_sum, window_steps, last_dice, validation_seconds = torch.zeros((), device=device), 0, float("nan"), 0.0
    for iteration in range(start + 1, args.iterations + 1):
        loss, views, mask = step(run, iteration)
        loss_sum += loss.detach()
        window_steps += 1

        validating = iteration % args.val_every == 0 or iteration == args.iterations
        now = time.time()
        seconds_per_step = (now - invocation_start) / (iteration - start)  # validations included
        out_of_time = iteration < args.iterations and now + validating * validation_seconds + seconds_per_step > deadline
        if iteration % args.log_every == 0 or validating or out_of_time:  # the loss is checked before every checkpoint
            mean_loss = loss_sum.item() / window_steps  # the one host sync every --log-every steps
            if not math.isfinite(mean_loss):
                stop(f"the loss became {mean_loss} between iterations {iteration - window_steps + 1} and {iteration}")
            speed = window_steps / (now - window_start)
            write_metrics({"iter": iteration, "loss": mean_loss, "lr": args.lr, "time": round(now - phase_start, 3)})
            last_text = "-" if math.isnan(last_dice) else f"{last_dice:.4f}"
            validation = f"val Dice {last_text} (best {best_dice:.4f} @ {best_iteration})" if best_iteration else "val Dice -"
            log(f"iter {iteration}/{args.iterations} | loss {mean_loss:.4f} | {speed:.2f} it/s | "
                f"ETA {format_seconds((args.iterations - iteration) / speed)} | {validation}")
            loss_sum, window_steps, window_start = torch.zeros((), device=device), 0, now

        if validating:
            validation_start = time.time()
            last_dice = validate(student, volumes, args, autocast)
            write_metrics({"iter": iteration, "val_dice": last_dice})
            if last_dice > best_dice:
                best_dice, best_iteration = last_dice, iteration
                save_checkpoint(best_path, iteration)
            save_checkpoint(last_path, iteration)
            try:  # after the checkpoints: a picture that cannot be written costs nothing else
                save_step_picture(picture_dir / f"iter_{iteration:06d}.png", views, mask)
            except OSError as error:
                log(f"could not write the step picture ({error}); training goes on")
            log(f"iter {iteration} | val Dice {last_dice:.4f} | best {best_dice:.4f} @ {best_iteration}")
            validation_seconds = time.time() - validation_start
            window_start += validation_seconds  # it/s counts training steps only
        if out_of_time:
            if not validating:
                save_checkpoint(last_path, iteration)
            log(f"time limit: stopped at iteration {iteration} of {args.iterations}; continue with --resume")
            return
    log(f"done: best val Dice {best_dice:.4f} at iteration {best_iteration}; {best_path}")


if __name__ == "__main__":
    try:
        main()
    except bcp.DataError as error:
        sys.exit(f"error: {error}")
    except OSError as error:  # an output that cannot be written: read-only folder, disk full
        sys.exit(f"error: {error}")
