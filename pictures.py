"""
Pictures, written without an imaging library: a small PNG writer (zlib + numpy), label overlays and
montages, an SVG line plot; what train.py draws of a step and evaluate.py of a volume.
"""
import struct
import zlib

import numpy as np
import torch

import bcp
import data

CLASS_COLORS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 130, 240]], dtype=np.uint8)  # bg, RV, Myo, LV


def write_png(path, rgb):
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width, _ = rgb.shape

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)  # filter byte 0
    data.write_atomic(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
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
            region = bcp.surface(region)
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
    data.write_atomic(path, ("\n".join(parts + ["</svg>"]) + "\n").encode())


def save_step_picture(path, views, rows=4):
    """A few samples of the current step, one row each: the (mixed) input with the pasted box outlined
    in yellow, its (mixed) target, the student's prediction. 3D crops show their middle slice."""
    images, targets, logits = (torch.cat(parts) for parts in list(zip(*views))[:3])
    masks = torch.cat([(torch.ones(image.shape[2:], device=image.device) if mask is None else mask).expand(len(image), *image.shape[2:])
                       for image, _, _, mask in views])  # (B, *S)
    predictions = logits.argmax(1)
    if images.ndim == 5:  # (B, 1, D1, D2, D3): the middle of the third axis
        middle = images.shape[-1] // 2
        images, targets, predictions, masks = images[..., middle], targets[..., middle], predictions[..., middle], masks[..., middle]
    pick = torch.linspace(0, len(images) - 1, min(rows, len(images))).long()  # both halves of a selftrain batch
    size = max(images.shape[-1], 160)  # small patches are enlarged to be seen
    images, targets, predictions, holes = (data.resize_nearest(t.detach().float().cpu(), size, size).numpy()
                                           for t in (images[pick, 0], targets[pick], predictions[pick], masks[pick] == 0))
    tiles = []
    for image, target, prediction, hole in zip(images, targets, predictions, holes):
        picture = gray(image)
        framed = picture.copy()
        framed[bcp.surface(hole > 0)] = (255, 220, 0)
        tiles += [framed, paint_labels(picture, target), paint_labels(picture, prediction)]
    write_png(path, montage(tiles, columns=3))


def save_montage(path, image, label_maps, size=160, rows=8, slices_last=False):
    """One row per slice: the image, then the outlines of each label map (ground truth, prediction).
    A volume with its slices along the last axis (LA) shows `rows` of them spread over the first map's
    foreground."""
    if slices_last:
        image, label_maps = np.moveaxis(image, -1, 0), [np.moveaxis(m, -1, 0) for m in label_maps]
        occupied = np.flatnonzero(label_maps[0].any((1, 2))) if label_maps[0].any() else np.arange(len(image))
        pick = np.linspace(occupied[0], occupied[-1], rows).round().astype(int)
        image, label_maps = image[pick], [m[pick] for m in label_maps]
    tiles = []
    for image_slice, *map_slices in zip(image, *label_maps):
        resized = [data.resize_nearest(torch.from_numpy(np.ascontiguousarray(a)), size, size).numpy()
                   for a in (image_slice, *map_slices)]
        picture = gray(resized[0])
        tiles += [picture] + [paint_labels(picture, labels, outline=True) for labels in resized[1:]]
    write_png(path, montage(tiles, columns=1 + len(label_maps)))


