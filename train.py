"""
Train BCP on ACDC, or the labeled-only U-Net it is compared with.

    python train.py --phase pretrain                 # 10k steps: labeled slices copy-pasted into each other
    python train.py --phase selftrain                # 30k steps: Mean-Teacher with bidirectional copy-paste
    python train.py --phase supervised               # the paper's U-Net rows: labeled slices, no mixing
    python train.py --phase selftrain --resume       # continue an interrupted phase from <out>/<phase>/last.pt

Defaults are the paper's ACDC settings with 7 labeled patients (10%); every one is a flag (-h).
Each phase writes <out>/<phase>/: best.pt, last.pt, metrics.jsonl, train.log, flags.json, pictures/.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import bcp

PHASE_ITERATIONS = {"supervised": 10000, "pretrain": 10000, "selftrain": 30000}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/ACDC", help="dataset folder in the SSL4MIS layout")
    p.add_argument("--out", default="runs/acdc_7", help="run folder; each phase writes <out>/<phase>/")
    p.add_argument("--phase", choices=list(PHASE_ITERATIONS), default="pretrain")
    p.add_argument("--labeled-patients", type=int, default=7, help="first N patients of train.list are labeled")
    p.add_argument("--iterations", type=int, help="steps (10000; 30000 for selftrain)")
    p.add_argument("--batch-size", type=int, default=24, help="slices per step (selftrain: labeled + unlabeled)")
    p.add_argument("--labeled-batch-size", type=int, default=12, help="labeled slices per step (pretrain, selftrain)")
    p.add_argument("--patch-size", type=int, default=256, help="slices are resized to patch x patch")
    p.add_argument("--num-classes", type=int, default=4, help="background + RV, Myo, LV")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (constant)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=2 / 3, help="the pasted crop is beta*H x beta*W")
    p.add_argument("--mask", choices=["random", "center"], default="random", help="where the crop sits")
    p.add_argument("--u-weight", type=float, default=0.5, help="alpha: loss weight of pseudo-labeled pixels")
    p.add_argument("--ema-decay", type=float, default=0.99, help="teacher = EMA of the student")
    p.add_argument("--val-every", type=int, default=200, help="validate (and checkpoint) every N steps")
    p.add_argument("--log-every", type=int, default=20, help="progress line and metrics row every N steps")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="bf16 autocast (default on CUDA) or plain float32 (default on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher forwards")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<phase>/last.pt")
    p.add_argument("--init", help="selftrain: start student and teacher from this checkpoint "
                                  "(default <out>/pretrain/best.pt)")
    args = p.parse_args(argv)
    args.iterations = args.iterations or PHASE_ITERATIONS[args.phase]
    args.precision = args.precision or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    half_batches = [args.labeled_batch_size] + ([args.batch_size - args.labeled_batch_size] if args.phase == "selftrain" else [])
    if args.phase != "supervised" and any(n < 2 or n % 2 for n in half_batches):
        p.error(f"--phase {args.phase} splits each half of the batch in two: got {half_batches} slices")
    return args


# ----------------------------------------------------------------------------- the three steps

def supervised_step(student, teacher, labeled, unlabeled, mask, args):
    """Plain U-Net: Dice + CE on the labeled slices (the whole image is one region)."""
    images, labels = labeled
    logits = student(images)
    everywhere = torch.ones_like(mask)
    return bcp.mixed_loss(logits, labels, everywhere, 1.0, 0.0), [(images, labels, logits)]


def pretrain_step(student, teacher, labeled, unlabeled, mask, args):
    """Labeled only: a crop of labeled image b pasted into labeled image a, and their labels alike."""
    (images_a, images_b), (labels_a, labels_b) = (t.chunk(2) for t in labeled)
    mixed = bcp.copy_paste(images_a, images_b, mask)
    target = bcp.copy_paste(labels_a, labels_b, mask)
    logits = student(mixed)
    return bcp.mixed_loss(logits, target, mask, 1.0, 1.0), [(mixed, target, logits)]


def selftrain_step(student, teacher, labeled, unlabeled, mask, args):
    """Bidirectional copy-paste: a labeled crop into an unlabeled image (inward, Eq. 1 and 3) and an
    unlabeled crop into a labeled image (outward, Eq. 2 and 4), targets from ground truth and the
    teacher's pseudo-labels; pseudo-labeled pixels weigh alpha (Eq. 6)."""
    (labeled_a, labeled_b), (gt_a, gt_b) = (t.chunk(2) for t in labeled)
    unlabeled_a, unlabeled_b = unlabeled[0].chunk(2)
    with torch.no_grad():  # two teacher forwards, as the authors run them (BN statistics per half)
        pseudo_a, pseudo_b = bcp.pseudo_label(torch.cat([teacher(unlabeled_a), teacher(unlabeled_b)])).chunk(2)
    x_in, y_in = bcp.copy_paste(unlabeled_a, labeled_a, mask), bcp.copy_paste(pseudo_a, gt_a, mask)
    x_out, y_out = bcp.copy_paste(labeled_b, unlabeled_b, mask), bcp.copy_paste(gt_b, pseudo_b, mask)
    logits_in, logits_out = student(x_in), student(x_out)
    alpha = args.u_weight
    loss = bcp.mixed_loss(logits_in, y_in, mask, alpha, 1.0) + bcp.mixed_loss(logits_out, y_out, mask, 1.0, alpha)
    return loss, [(x_in, y_in, logits_in), (x_out, y_out, logits_out)]


# Each step returns the loss and, for the pictures, one (input, target, logits) triple per student forward.
STEPS = {"supervised": supervised_step, "pretrain": pretrain_step, "selftrain": selftrain_step}


# ----------------------------------------------------------------------------- data streams

def step_generator(seed, *keys):
    """A torch generator that depends only on (seed, keys): batches and augmentation are a pure
    function of the step number, so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))


def shuffled_indices(n, step, count, seed, stream):
    """Indices step*count ... step*count + count - 1 of an endless run of shuffled epochs of range(n)."""
    picked = []
    while len(picked) < count:
        epoch, position = divmod(step * count + len(picked), n)
        order = torch.randperm(n, generator=step_generator(seed, stream, epoch))
        picked.extend(order[position:position + count - len(picked)].tolist())
    return torch.tensor(picked)


def draw_batch(bank, step, count, args, stream):
    """(images (B, 1, P, P), labels (B, P, P)) for one step, augmented, on the training device."""
    index = shuffled_indices(len(bank), step, count, args.seed, stream)
    augmentation = bank.random_augmentation(count, step_generator(args.seed, stream, 10**9 + step))
    return bank.batch(index, args.patch_size, augmentation)


# ----------------------------------------------------------------------------- validation and checkpoints

@torch.no_grad()
def validate(model, volumes, args, autocast):
    """Mean Dice over the validation volumes and the foreground classes (a class the model does not
    predict scores 0, as in the authors' evaluation)."""
    model.eval()
    with autocast:
        scores = [bcp.dice_per_class(bcp.predict_volume(model, image, args.patch_size), label, args.num_classes)
                  for image, label in volumes]
    model.train()
    return torch.stack(scores).mean().item()


def save_atomic(checkpoint, path):
    temporary = path.with_suffix(".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


def save_step_picture(path, views, mask, rows=4):
    """A few samples of the current step, one row each: the (mixed) input with the pasted rectangle
    outlined in yellow, its (mixed) target, the student's prediction."""
    images, targets, logits = (torch.cat(parts) for parts in zip(*views))
    pick = torch.linspace(0, len(images) - 1, min(rows, len(images))).long()  # both halves of a selftrain batch
    size = max(images.shape[-1], 160)  # small patches are enlarged to be seen
    images, targets, predictions, hole = (bcp.resize_nearest(t.detach().float().cpu(), size, size).numpy() for t in
                                          (images[pick, 0], targets[pick], logits[pick].argmax(1), mask == 0))
    hole = bcp.surface(hole > 0)
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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    compiled = torch.compile if args.compile else (lambda model: model)
    return device, autocast, memory_format, compiled


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.out) / args.phase
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(run_dir / "train.log", "a")

    def log(message):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    device, autocast, memory_format, compiled = runtime(args)
    torch.manual_seed(args.seed)

    # data: every slice and validation volume in memory on the training device
    labeled_names, unlabeled_names = bcp.training_slices(args.root, args.labeled_patients)
    labeled_bank = bcp.SliceBank(*bcp.load_slices(args.root, labeled_names), device)
    unlabeled_bank = bcp.SliceBank(*bcp.load_slices(args.root, unlabeled_names), device) if args.phase == "selftrain" else None
    if unlabeled_bank is not None and len(unlabeled_bank) == 0:
        raise bcp.DataError(f"{Path(args.root) / 'train.list'}: every patient is labeled; selftrain needs unlabeled slices")
    volumes = [(torch.from_numpy(image).to(device), torch.from_numpy(label).to(device))
               for _, image, label in bcp.load_volumes(args.root, "val")]
    log(f"{args.phase}: {len(labeled_names)} labeled slices ({args.labeled_patients} patients), "
        f"{len(unlabeled_names) if unlabeled_bank else 0} unlabeled, {len(volumes)} validation volumes, device {device}")
    if (Path(args.root) / "SYNTHETIC").exists():
        log(f"{args.root} holds SYNTHETIC phantoms, not ACDC (see prepare_acdc.py)")

    # models and optimizer
    student = bcp.UNet(num_classes=args.num_classes).to(device, memory_format=memory_format)
    teacher = bcp.UNet(num_classes=args.num_classes).to(device, memory_format=memory_format) if args.phase == "selftrain" else None
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start, best_dice, best_iteration, elapsed_before = 0, -1.0, 0, 0.0
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if args.resume and last_path.exists():
        checkpoint = bcp.load_checkpoint(last_path)
        student.load_state_dict(checkpoint["model"])
        if teacher is not None:
            teacher.load_state_dict(checkpoint["teacher"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:  # the flags of this invocation win over the saved ones
            group.update(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        start, best_dice, best_iteration = checkpoint["iteration"], checkpoint["best_dice"], checkpoint["best_iteration"]
        elapsed_before = checkpoint["elapsed"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        log(f"resumed from {last_path} at iteration {start} (best val Dice {best_dice:.4f} @ {best_iteration})")
    elif args.resume:
        log(f"--resume: no {last_path} yet, starting from the beginning")
    if teacher is not None and start == 0:
        init_path = Path(args.init or Path(args.out) / "pretrain" / "best.pt")
        init = bcp.load_checkpoint(init_path)["model"]
        student.load_state_dict(init)
        teacher.load_state_dict(init)
        log(f"student and teacher start from {init_path}")
    if teacher is not None:
        teacher.train()  # as the authors: the teacher predicts with dropout and batch statistics
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    picture_dir = run_dir / "pictures"
    picture_dir.mkdir(exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():  # keep only rows up to where this run starts (a resume restarts there)
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["iter"] <= start))
    metrics_file = open(metrics_path, "a")
    (run_dir / "flags.json").write_text(json.dumps(vars(args), indent=2) + "\n")

    def checkpoint_dict(iteration, elapsed):
        return {"model": student.state_dict(), "teacher": teacher.state_dict() if teacher is not None else None,
                "optimizer": optimizer.state_dict(), "iteration": iteration, "best_dice": best_dice,
                "best_iteration": best_iteration, "elapsed": elapsed, "flags": vars(args),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}

    step_fn = STEPS[args.phase]
    student_forward = compiled(student)
    teacher_forward = compiled(teacher) if teacher is not None else None
    labeled_count = args.batch_size if args.phase == "supervised" else args.labeled_batch_size
    unlabeled_count = args.batch_size - args.labeled_batch_size
    student.train()
    phase_start, window_start = time.time() - elapsed_before, time.time()
    loss_sum, window_steps, last_dice = torch.zeros((), device=device), 0, float("nan")
    for iteration in range(start + 1, args.iterations + 1):
        labeled = draw_batch(labeled_bank, iteration, labeled_count, args, stream=0)
        unlabeled = draw_batch(unlabeled_bank, iteration, unlabeled_count, args, stream=1) if unlabeled_bank is not None else None
        mask = bcp.paste_mask(args.patch_size, args.patch_size, args.beta, centered=args.mask == "center",
                              generator=step_generator(args.seed, 2, iteration), device=device)
        with autocast:
            loss, views = step_fn(student_forward, teacher_forward, labeled, unlabeled, mask, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if teacher is not None:
            bcp.ema_update(teacher, student, args.ema_decay)
        loss_sum += loss.detach()
        window_steps += 1

        validating = iteration % args.val_every == 0 or iteration == args.iterations
        if iteration % args.log_every == 0 or validating:  # never checkpoint weights whose loss was not checked
            mean_loss = loss_sum.item() / window_steps  # the one host sync every --log-every steps
            if not math.isfinite(mean_loss):
                log(f"stopping: the loss became {mean_loss} between iterations {iteration - window_steps + 1} "
                    f"and {iteration}; {last_path} and {best_path} keep the last good weights")
                sys.exit(1)
            now = time.time()
            speed = window_steps / (now - window_start)
            metrics_file.write(json.dumps({"iter": iteration, "loss": mean_loss, "lr": args.lr,
                                           "time": round(now - phase_start, 3)}) + "\n")
            metrics_file.flush()
            last_text = "-" if math.isnan(last_dice) else f"{last_dice:.4f}"
            validation = f"val Dice {last_text} (best {best_dice:.4f} @ {best_iteration})" if best_iteration else "val Dice -"
            log(f"iter {iteration}/{args.iterations} | loss {mean_loss:.4f} | {speed:.2f} it/s | "
                f"ETA {format_seconds((args.iterations - iteration) / speed)} | {validation}")
            loss_sum, window_steps, window_start = torch.zeros((), device=device), 0, now

        if validating:
            validation_start = time.time()
            save_step_picture(picture_dir / f"iter_{iteration:06d}.png", views, mask)
            last_dice = validate(student, volumes, args, autocast)
            metrics_file.write(json.dumps({"iter": iteration, "val_dice": last_dice}) + "\n")
            metrics_file.flush()
            if last_dice > best_dice:
                best_dice, best_iteration = last_dice, iteration
                save_atomic(checkpoint_dict(iteration, time.time() - phase_start), best_path)
            save_atomic(checkpoint_dict(iteration, time.time() - phase_start), last_path)
            log(f"iter {iteration} | val Dice {last_dice:.4f} | best {best_dice:.4f} @ {best_iteration}")
            window_start += time.time() - validation_start  # it/s counts training steps only
    log(f"done: best val Dice {best_dice:.4f} at iteration {best_iteration}; {best_path}")


if __name__ == "__main__":
    try:
        main()
    except bcp.DataError as error:
        sys.exit(f"error: {error}")
