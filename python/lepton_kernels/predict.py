"""Classify image files with a model: ``python -m lepton_kernels predict MODEL IMAGE...``.

Images (PNG, JPEG, anything Pillow reads) are converted to the model's
channels (grayscale or RGB), resized to its input size (bilinear), scaled
to [0, 1], normalised with ``(x - mean) / std`` per channel and run in
batches. For each image the top-K classes are printed with their
probabilities (a softmax is applied when the model's outputs are not
already probabilities). Unreadable files are reported on stderr and
skipped; the exit code is non-zero only when no image could be classified.

The input geometry comes from the model (its input shape; ``layout`` is
NHWC for Keras models, NCHW otherwise), and the flags override it. A model
saved with ``lk.save_model(model, path, metadata={"labels": [...],
"mean": [...], "std": [...]})`` brings its class names and normalisation.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

__all__ = ["predict", "main", "add_arguments"]


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("predict needs Pillow to read images: pip install pillow "
                          "(or pip install lepton-kernels[predict])") from None
    return Image


def _progress(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar, same results
        return None
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)


def _meta_list(meta, key):
    v = meta.get(key)
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            v = [s.strip() for s in v.split(",")] if key == "labels" else None
    return v


def input_geometry(model, size=None, grayscale=False, layout=None):
    """(layout, channels, height, width) the images are turned into, from the model and the flags."""
    layout = layout or getattr(model, "layout", None) or "nchw"
    shape = getattr(model, "input_shape", None)
    C = H = W = None
    if shape is not None and len(shape) == 4:
        if layout == "nhwc":
            H, W, C = shape[1:]
        else:
            C, H, W = shape[1:]
    elif shape is not None and len(shape) == 3:  # unbatched (C, H, W) / (H, W, C)
        if layout == "nhwc":
            H, W, C = shape
        else:
            C, H, W = shape
    if size is not None:
        H, W = size
        if H < 1 or W < 1:
            raise ValueError(f"--size: height and width must be positive, got {H} {W}")
    if grayscale:
        if C not in (None, 1):
            raise ValueError(f"--grayscale: the model takes {C} channels")
        C = 1
    if C is None:
        C = 3
    if C not in (1, 3):
        raise ValueError(f"the model takes {C} channels per pixel; images give 1 (grayscale) or 3 (RGB)")
    if H is None or W is None:
        raise ValueError("the model does not fix its input size: give it with --size H W")
    return layout, C, int(H), int(W)


def load_image(path, channels, height, width, mean, std):
    """An (H, W, C) float32 array: converted, resized, scaled to [0, 1] and normalised."""
    Image = _pillow()
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (width, height):
            im = im.resize((width, height), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = a[:, :, None]
    return (a - mean) / std


def _channel_values(v, C, name, default):
    if v is None:
        return np.full(C, default, np.float32)
    v = np.asarray(v, np.float32).reshape(-1)
    if v.size == 1:
        return np.full(C, v[0], np.float32)
    if v.size != C:
        raise ValueError(f"{name}: expected 1 or {C} values (one per channel), got {v.size}")
    return v


def _probabilities(y):
    y = np.asarray(y, np.float64).reshape(y.shape[0], -1)
    if np.all(y >= 0) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3):
        return y
    e = np.exp(y - y.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(model, images, *, labels=None, top=5, size=None, grayscale=False, mean=None, std=None, batch_size=32,
            layout=None, errors=None):
    """Classify image files; a list of (path, [(label, probability), ...]) for the images that could be read.

    `model` is a model object or a path for ``lk.load_model``. Files that cannot be read are skipped and
    reported through `errors(path, message)` (default: to stderr).
    """
    from . import load_model
    if errors is None:
        def errors(path, msg):
            print(f"skipping {path}: {msg}", file=sys.stderr)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = load_model(model)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    if top < 1:
        raise ValueError(f"top: must be positive, got {top}")
    meta = getattr(model, "metadata", {}) or {}
    layout, C, H, W = input_geometry(model, size, grayscale, layout)
    mean = _channel_values(mean if mean is not None else _meta_list(meta, "mean"), C, "mean", 0.0)
    std = _channel_values(std if std is not None else _meta_list(meta, "std"), C, "std", 1.0)
    if np.any(std == 0):
        raise ValueError("std: values must be non-zero")
    names = labels if labels is not None else _meta_list(meta, "labels")
    shape = getattr(model, "input_shape", None)
    fixed = shape[0] if shape is not None and len(shape) == 4 and isinstance(shape[0], int) else None
    if fixed:  # the model takes exactly this many images per call: batches of that size, the last one padded
        batch_size = fixed
    _pillow()
    results = []
    bar = _progress(len(images), "predict")
    try:
        for start in range(0, len(images), batch_size):
            paths, arrays = [], []
            for p in images[start:start + batch_size]:
                try:
                    arrays.append(load_image(p, C, H, W, mean, std))
                    paths.append(p)
                except Exception as e:  # unreadable, truncated, not an image, missing: skip it
                    errors(p, f"{type(e).__name__}: {e}")
            if arrays:
                n = len(arrays)
                if fixed:
                    arrays += [arrays[-1]] * (fixed - n)
                x = np.stack(arrays)
                if layout != "nhwc":
                    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
                y = model(x)
                if isinstance(y, tuple):
                    y = y[0]
                probs = _probabilities(y)[:n]
                if names is not None and len(names) != probs.shape[1] and not results:
                    print(f"warning: {len(names)} labels for a model with {probs.shape[1]} classes",
                          file=sys.stderr)
                k = min(top, probs.shape[1])
                for p, row in zip(paths, probs):
                    order = np.argsort(-row, kind="stable")[:k]
                    results.append((p, [(names[i] if names is not None and i < len(names) else str(i),
                                         float(row[i])) for i in order]))
            if bar is not None:
                bar.update(min(batch_size, len(images) - start))
    finally:
        if bar is not None:
            bar.close()
    return results


def read_labels(path):
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("model", help="model file: ONNX (.onnx), Keras 3 (.keras) or lepton (.lk/.npz)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line, in the model's output order")
    p.add_argument("--top", type=int, default=5, metavar="K", help="classes shown per image (default 5)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input height and width "
                   "(default: the model's)")
    p.add_argument("--grayscale", action="store_true", help="one channel per pixel (default: the model's "
                   "channels, else RGB)")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean subtracted after scaling to [0, 1]")
    p.add_argument("--std", type=float, nargs="+", help="per-channel standard deviation divided by")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per model call (default 32)")
    p.add_argument("--layout", choices=("nchw", "nhwc"), help="how the model takes images (default: NHWC for "
                   "Keras models, else NCHW)")


def run(args) -> int:
    from . import load_model
    try:
        _pillow()
        labels = read_labels(args.labels) if args.labels else None
        model = load_model(args.model)
        results = predict(model, args.images, labels=labels, top=args.top, size=args.size,
                          grayscale=args.grayscale, mean=args.mean, std=args.std, batch_size=args.batch_size,
                          layout=args.layout)
    except (ImportError, ValueError, OSError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, classes in results:
        print(f"{path}: " + ", ".join(f"{name} ({p:.4f})" for name, p in classes))
    if not results:
        print("error: no image could be classified", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lepton_kernels predict", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
