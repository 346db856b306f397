"""
Rerunnable speed benchmarks (they print numbers; nothing here is a test).

    python benchmark.py steps --root data/ACDC      # seconds per train.py step of each phase vs the bare compute
    python benchmark.py metrics --root data/ACDC    # our Dice+Jaccard+HD95+ASD vs medpy (pip install medpy),
                                                    # on shifted, mirrored and noisy predictions
    python benchmark.py pseudo-labels --root data/ACDC --checkpoint runs/acdc_7/selftrain/best.pt
                                                    # the teacher's pseudo-labels (largest components) alone
    python benchmark.py steps --root data/ACDC --patch-size 256 --batch-size 24 --labeled-batch-size 12 --labeled-patients 7
                                                    # the paper's shapes (on a GPU; add --compile to try it)
    python benchmark.py steps --root data/LA --patch-size 64 64 32 --batch-size 8 --labeled-batch-size 4 --labeled-patients 4
                                                    # LA's 3D step (V-Net) at the CPU schedule's crop
    python benchmark.py pseudo-labels --root data/LA --patch-size 64 64 32 --batch-size 8 --labeled-batch-size 4 --checkpoint P
                                                    # 3D largest components on a trained teacher's predictions
    python benchmark.py sliding-window --root data/LA --checkpoint P --stride 18 4 --volumes 2
                                                    # LA evaluation: seconds per volume, network and components
                                                    # (--windows gaussian: nnU-Net's half-window steps)
    python benchmark.py memory --root data/LA       # peak memory of a 3D self-train step at the paper's crop and batch
    python benchmark.py torchrun --root data/ACDC --processes 2   # a step under torchrun (N processes, 1 thread
                                                    # each, gloo) beside one process of N threads; on N GPUs add --device cuda

`steps` runs train.py for a few steps per phase and reads the seconds per step from its
metrics.jsonl, beside the floor measured in this process with the settings of its flags.json: the convolutions the phase cannot
avoid (forwards, backward, SGD step, EMA) on random tensors of the same shapes.
"""
import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bcp
import data
import inference


def floor_seconds(flags, plan, steps):
    """Seconds per step of the bare compute of a phase on random tensors, with the settings train.py ran with
    (`flags`, its flags.json: device, precision, compile, the networks' shapes, SGD's)."""
    device, autocast, memory_format, compiled = inference.runtime(flags["device"], flags["precision"], plan.dims, flags["compile"])
    patch, labeled, network = flags["patch_size"], flags["labeled_batch_size"], bcp.NETWORKS[plan.dims]
    student = network(num_classes=flags["num_classes"]).to(device, memory_format=memory_format)
    teacher = network(num_classes=flags["num_classes"]).to(device, memory_format=memory_format).requires_grad_(False)
    student_forward, teacher_forward = compiled(student), compiled(teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=flags["lr"], momentum=flags["momentum"], weight_decay=flags["weight_decay"])
    if flags["phase"] == "supervised":
        student_batches = [flags["batch_size"]]
    elif flags["phase"] == "pretrain":
        student_batches = [labeled // 2]
    else:  # selftrain: X_in and X_out, each as many slices as one labeled half (a or b)
        student_batches = [labeled // 2] * 2
    teacher_batches = [(flags["batch_size"] - labeled) // 2] * 2 if flags["phase"] == "selftrain" else []
    inputs = [torch.randn(n, 1, *patch, device=device) for n in student_batches]
    targets = [torch.randint(flags["num_classes"], (n, *patch), device=device) for n in student_batches]
    teacher_inputs = [torch.randn(n, 1, *patch, device=device) for n in teacher_batches]

    def step():
        with autocast:
            with torch.no_grad():
                for x in teacher_inputs:
                    teacher_forward(x)
            loss = sum(F.cross_entropy(student_forward(x), y) for x, y in zip(inputs, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if teacher_inputs:
            bcp.ema_update(teacher, student, flags["ema_decay"])

    for _ in range(3):  # warm-up (and compilation)
        step()
    inference.synchronize(device)
    start = time.time()
    for _ in range(steps):
        step()
    inference.synchronize(device)
    return (time.time() - start) / steps


TRAIN = str(Path(__file__).with_name("train.py"))


def run_train(flags, env=None, launcher=(sys.executable,)):
    """train.py with these flags, in its own process (a script never imports a script); its log goes to its
    run folder, and what it says when it fails ends the benchmark."""
    result = subprocess.run([*launcher, TRAIN, *flags], capture_output=True, env=env)
    if result.returncode:
        raise SystemExit(f"train.py {' '.join(flags)} failed:\n{result.stderr.decode()[-2000:]}")


def logged_seconds(out, phase):
    """Seconds per step of train.py, from the `time` column of <out>/<phase>/metrics.jsonl (warm-up excluded)."""
    rows, _ = data.read_metrics(Path(out) / phase / "metrics.jsonl")
    loss_rows = [r for r in rows if "loss" in r]
    first, last = loss_rows[1], loss_rows[-1]  # the first window holds the warm-up
    return (last["time"] - first["time"]) / (last["iter"] - first["iter"])


def benchmark_patch(plan, patch_size):
    """--patch-size as the plan takes it; one line when it cannot."""
    try:
        return plan.patch(patch_size)
    except ValueError as error:
        raise SystemExit(f"benchmark.py: {error}") from None


def cheap_validation(plan, patch_size):
    """One validation case where the plan holds cases aside (ACDC validates on val.list); in 3D one window per
    window-sized block (the strides of the patch)."""
    if "val_cases" in plan.unused_flags:
        return []
    if plan.dims == 2:
        return ["--val-cases", "1"]
    patch = benchmark_patch(plan, patch_size)
    return ["--val-cases", "1", "--stride", str(min(patch[:2])), str(patch[2])]


def phase_flags(args, plan, phase, out):
    """train.py's flags for a few steps of a phase at the benchmark's shapes (self-training from the few
    pre-training steps by --init: they may predict nothing)."""
    return ["--root", args.root, "--out", out, "--phase", phase, "--iterations", str(args.steps),
            "--patch-size", *map(str, args.patch_size), "--batch-size", str(args.batch_size),
            "--labeled-batch-size", str(args.labeled_batch_size), "--labeled-patients", str(args.labeled_patients),
            "--log-every", str(max(1, args.steps // 8)), "--val-every", str(10 * args.steps),
            *cheap_validation(plan, args.patch_size), "--device", args.device,
            *(["--precision", args.precision] if args.precision else []), *(["--compile"] if args.compile else []),
            *(["--init", f"{out}/pretrain/best.pt"] if phase == "selftrain" else [])]


def bench_steps(args):
    plan, results = data.Dataset(args.root).plan, []
    with tempfile.TemporaryDirectory() as out:
        for phase in ("supervised", "pretrain", "selftrain"):
            run_train(phase_flags(args, plan, phase, out))
            flags = data.read_json(Path(out) / phase / "flags.json")
            if not results:
                print(f"device {flags['device']} ({torch.cuda.get_device_name() if 'cuda' in flags['device'] else 'CPU'}), "
                      f"{torch.get_num_threads()} threads, {flags['precision']}{', compiled' if args.compile else ''}, "
                      f"patch {args.patch_size}, batch {args.batch_size} ({args.labeled_batch_size} labeled), {args.steps} steps")
            results.append((phase, logged_seconds(out, phase), floor_seconds(flags, plan, args.steps)))
    print(f"{'phase':12s} {'train.py s/step':>16s} {'floor s/step':>13s} {'ratio':>6s}")
    for phase, seconds, floor in results:
        print(f"{phase:12s} {seconds:16.4f} {floor:13.4f} {seconds / floor:6.2f}")


def bench_torchrun(args):
    """Seconds per step of each phase: train.py under torchrun (--processes N, one thread each on the
    CPU, gloo; one GPU each with --device cuda) beside one process (N threads on the CPU), same flags."""
    plan, results = data.Dataset(args.root).plan, []
    with tempfile.TemporaryDirectory() as out:
        for phase in ("supervised", "pretrain", "selftrain"):
            seconds = []
            for launcher, threads, run in (([sys.executable], args.processes, "one"),
                                           ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             f"--nproc_per_node={args.processes}"], 1, "torchrun")):
                run_train(phase_flags(args, plan, phase, f"{out}/{run}"), {**os.environ, "OMP_NUM_THREADS": str(threads)}, launcher)
                seconds.append(logged_seconds(f"{out}/{run}", phase))
            results.append((phase, *seconds))
    print(f"device {args.device}, patch {args.patch_size}, batch {args.batch_size} ({args.labeled_batch_size} labeled), {args.steps} steps")
    print(f"{'phase':12s} {'1 process s/step':>17s} {f'torchrun x {args.processes} s/step':>20s} {'ratio':>6s}")
    for phase, one, shared in results:
        print(f"{phase:12s} {one:17.4f} {shared:20.4f} {shared / one:6.2f}")


def bench_pseudo_labels(args):
    """Milliseconds per bcp.pseudo_label on a trained teacher's logits for real unlabeled batches of
    --labeled-patients' unlabeled images at --patch-size, drawn with the authors' augmentation."""
    if not args.checkpoint:
        raise SystemExit("benchmark.py pseudo-labels: --checkpoint is required (the teacher)")
    teacher, checkpoint = inference.load_model(args.checkpoint, args.device)  # in train mode, as train.py's teacher
    flags, dataset = checkpoint["flags"], data.Dataset(args.root)
    patch = benchmark_patch(dataset.plan, args.patch_size)
    device, autocast, memory_format, _ = inference.runtime(args.device, args.precision or "fp32", dataset.plan.dims)
    teacher.to(memory_format=memory_format)
    bank = dataset.bank(dataset.cases(args.labeled_patients, flags.get("val_cases"))[1], device, flags)
    count, generator = args.batch_size - args.labeled_batch_size, torch.Generator().manual_seed(0)
    draw = lambda: bank.batch(torch.randint(len(bank), (count,), generator=generator), patch,
                              bank.random_augmentation(count, generator))[0]
    with torch.no_grad(), autocast:
        logits = [teacher(draw()) for _ in range(args.steps)]
    bcp.pseudo_label(logits[0])  # warm-up
    inference.synchronize(device)
    start = time.time()
    for batch in logits:
        bcp.pseudo_label(batch)
    inference.synchronize(device)
    size = " x ".join(map(str, patch))
    print(f"device {device}: {1000 * (time.time() - start) / len(logits):.1f} ms per pseudo-label of {count} images "
          f"at {size} ({args.checkpoint}, {args.steps} batches)")


def bench_sliding_window(args):
    """3D evaluation of a checkpoint: seconds per validation volume for inference.segment (resampling,
    windows, the plan's largest components), and for the largest component alone, at the given strides."""
    if not args.checkpoint:
        raise SystemExit("benchmark.py sliding-window: --checkpoint is required")
    model, checkpoint = inference.load_model(args.checkpoint, args.device)
    if checkpoint["plan"].dims == 2:
        raise SystemExit(f"benchmark.py sliding-window: {args.checkpoint} holds a 2D model; this benchmark times 3D windows")
    model.eval()
    flags, plan = checkpoint["flags"], replace(checkpoint["plan"], windows=args.windows)
    dataset, classes = data.Dataset(args.root), plan.classes_kept(flags["num_classes"], checkpoint.get("keep_largest"))
    names = dataset.split("val", flags)[:args.volumes]
    try:
        strides = ([w // 2 for w in flags["patch_size"]] if args.windows == "gaussian"
                   else inference.window_strides(inference.checked_strides(args.stride, flags["patch_size"])))
    except ValueError as error:
        raise SystemExit(f"benchmark.py sliding-window: {error}") from None
    segment_seconds, component_seconds = 0.0, 0.0
    for case in dataset.scored_cases(names, flags, args.device):
        start = time.perf_counter()
        labels = inference.segment(model, case.image, plan, flags["patch_size"], args.stride, flags.get("scale") or 1.0, classes)
        inference.synchronize(case.image.device)
        middle = time.perf_counter()
        bcp.keep_largest_components(labels[None], classes)
        inference.synchronize(case.image.device)
        segment_seconds, component_seconds = segment_seconds + middle - start, component_seconds + time.perf_counter() - middle
    size = data.scaled_size(case.image.shape, flags.get("scale") or 1.0)
    windows = math.prod(len(inference.window_starts(s, w, t)) for s, w, t in zip(size, flags["patch_size"], strides))
    print(f"device {args.device}, {torch.get_num_threads()} threads, window {flags['patch_size']}, {args.windows} windows, strides {strides}, "
          f"scale {flags.get('scale', 1.0)}: {segment_seconds / len(names):.2f} s per volume ({windows} windows on the last), "
          f"of which the largest component {component_seconds / len(names):.2f} s; {len(names)} volumes")


def bench_memory(args):
    """Peak resident memory of a train.py self-train process on LA at the paper's crop and batch
    (112 x 112 x 80, 4 labeled + 4 unlabeled), 2 steps from a 1-step pre-training, CPU."""
    with tempfile.TemporaryDirectory() as out:
        common = [sys.executable, TRAIN, "--root", args.root, "--out", out, "--device", "cpu",
                  *cheap_validation(data.Dataset(args.root).plan, [112, 112, 80]), "--labeled-patients", str(args.labeled_patients)]
        peaks = {}
        for phase, steps in (("pretrain", 1), ("selftrain", 2)):
            subprocess.run([*common, "--phase", phase, "--iterations", str(steps)], check=True, capture_output=True)
            peaks[phase] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB; max over children
        rows, _ = data.read_metrics(Path(out) / "selftrain" / "metrics.jsonl")
    loss_row = rows[0]  # logged at the last step, before its validation row
    names = data.read_list(args.root, "train.list")[:-1]
    volumes = sum(image.nbytes + label.nbytes for _, image, label in data.Dataset(args.root).volumes(names))
    print(f"peak resident memory of train.py at 112 x 112 x 80, batch 8 (CPU): pretrain {peaks['pretrain']:.2f} GiB, "
          f"selftrain {peaks['selftrain']:.2f} GiB, of which {volumes / 2**30:.2f} GiB are the {len(names)} training volumes; "
          f"{loss_row['time'] / loss_row['iter']:.1f} s per self-train step ({loss_row['iter']} steps, the first included)")


# Predictions a metric meets: a neat one, a wrong-sided one, and a weak model's scattered false positives.
PREDICTION_KINDS = {
    "shifted": lambda label, rng: np.roll(label, 2, axis=1),  # the truth moved down by 2 rows
    "mirrored": lambda label, rng: label[..., ::-1],  # left and right swapped
    "2% relabelled": lambda label, rng: np.where(rng.random(label.shape) < 0.02,
                                                 rng.integers(0, 4, label.shape), label),
}


def bench_metrics(args):
    """Ours (bcp.binary_metrics) against medpy's dc + jc + hd95 + asd on the validation volumes, for
    each kind of prediction: seconds per class-volume and the largest difference."""
    from medpy.metric import binary as medpy_binary  # a reference for the benchmark only

    dataset = data.Dataset(args.root)
    volumes = dataset.volumes(data.read_list(args.root, "val.list"))
    rng = np.random.default_rng(0)
    print(f"{len(volumes)} volumes x {args.num_classes - 1} classes; ms per class-volume")
    print(f"{'prediction':16s} {'ours':>8s} {'medpy':>8s} {'ours/medpy':>11s} {'largest difference':>19s}")
    for kind, predict in PREDICTION_KINDS.items():
        ours_total, medpy_total, worst, count = 0.0, 0.0, 0.0, 0
        for name, _, label in volumes:
            prediction = predict(label, rng)
            for c in range(1, args.num_classes):
                pred, gt = prediction == c, label == c
                if not pred.any() or not gt.any():
                    continue
                start = time.perf_counter()
                ours = bcp.binary_metrics(pred, gt)
                ours_total += time.perf_counter() - start
                start = time.perf_counter()
                reference = (medpy_binary.dc(pred, gt), medpy_binary.jc(pred, gt), medpy_binary.hd95(pred, gt),
                             medpy_binary.asd(pred, gt))
                medpy_total += time.perf_counter() - start
                worst = max(worst, *(abs(a - b) for a, b in zip(ours.values(), reference)))
                count += 1
        print(f"{kind:16s} {1000 * ours_total / count:8.1f} {1000 * medpy_total / count:8.1f} "
              f"{ours_total / medpy_total:11.2f} {worst:19.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=list(BENCHMARKS))
    p.add_argument("--root", default="data/ACDC")
    p.add_argument("--patch-size", type=int, nargs="+", default=[128], help="as train.py (LA: three numbers)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--labeled-batch-size", type=int, default=6)
    p.add_argument("--labeled-patients", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="steps per phase (at least 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="as train.py (its default; pseudo-labels: fp32)")
    p.add_argument("--compile", action="store_true", help="as train.py")
    p.add_argument("--checkpoint", help="pseudo-labels: the teacher; sliding-window: the model (train.py checkpoints)")
    p.add_argument("--stride", type=int, nargs=2, default=[18, 4], metavar=("XY", "Z"), help="sliding-window strides")
    p.add_argument("--volumes", type=int, default=2, help="sliding-window: how many validation volumes")
    p.add_argument("--processes", type=int, default=2, help="torchrun: processes (one thread, or one GPU, each)")
    p.add_argument("--windows", choices=["authors", "gaussian"], default="authors", help="sliding-window: as evaluate.py")
    args = p.parse_args()
    BENCHMARKS[args.what](args)


BENCHMARKS = {"steps": bench_steps, "pseudo-labels": bench_pseudo_labels, "metrics": bench_metrics,
              "sliding-window": bench_sliding_window, "memory": bench_memory, "torchrun": bench_torchrun}


if __name__ == "__main__":
    main()
