"""What eval-mode BatchNorm does to LA's whole-volume validation: the validation cases of a checkpoint
segmented as evaluate.py does (the authors' windows, the largest component), once with BatchNorm's
running statistics (eval mode, as evaluate.py) and once with each window batch's own statistics.
Usage: python measurements/la_4labeled_cpu_hour/bn_statistics.py data/LA runs/la4_cpu/selftrain/best.pt"""
import sys

import torch

import bcp
import data
import inference

root, checkpoint_path = sys.argv[1:3]
model, checkpoint = inference.load_model(checkpoint_path)
flags, plan = checkpoint["flags"], checkpoint["plan"]
dataset = data.Dataset(root)
volumes = dataset.volumes(dataset.split("val", flags), standardize=flags.get("standardize", False))
for mode in ("running statistics (eval)", "each batch's statistics"):
    model.eval()
    if mode.startswith("each"):
        for layer in model.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.train()
    scores = [bcp.dice_per_class(inference.segment(model, torch.from_numpy(image), plan, flags["patch_size"], flags["stride"],
                                                  flags["scale"], plan.classes_kept(flags["num_classes"])),
                                 torch.from_numpy(label), flags["num_classes"])[0].item()
              for _, image, label in volumes]
    print(f"{mode}: mean Dice {sum(scores) / len(scores):.4f} (" + " ".join(f"{s:.3f}" for s in scores) + ")")
