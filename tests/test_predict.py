"""``python -m lepton_kernels predict``: images in, top-K classes out.

The model is built and saved in the test; images are small generated PNG
and JPEG files. Expected probabilities come from preprocessing each image
independently (Pillow, float64) and running the model on it.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import lepton_kernels as lk
from lepton_kernels.__main__ import main
from lepton_kernels.models import Node, TensorInfo

Image = pytest.importorskip("PIL.Image")

H = W = 8
CLASSES = 4


def make_model(rng, channels=1, layout="nchw", hw=(H, W), softmax=True, batch=None):
    """conv 3x3 (pad 1) + relu -> flatten -> linear -> [softmax]; NHWC models transpose first."""
    C = channels
    w = rng.standard_normal((2, C, 3, 3)).astype(np.float32)
    nf = 2 * hw[0] * hw[1] if hw[0] else 2
    wl = (rng.standard_normal((CLASSES, nf)) * 0.5).astype(np.float32)
    x = "x"
    nodes = []
    if layout == "nhwc":
        nodes.append(Node("Transpose", ["x"], ["t"], {"perm": [0, 3, 1, 2]}))
        x = "t"
    nodes += [Node("Conv", [x, "w"], ["c"], {"pads": [1, 1, 1, 1], "activation": "relu"})]
    if hw[0] is None:
        nodes.append(Node("GlobalAveragePool", ["c"], ["c2"]))
        nodes.append(Node("Flatten", ["c2"], ["f"], {"axis": 1}))
    else:
        nodes.append(Node("Flatten", ["c"], ["f"], {"axis": 1}))
    nodes.append(Node("Linear", ["f", "wl"], ["l" if softmax else "y"]))
    if softmax:
        nodes.append(Node("Softmax", ["l"], ["y"], {"axis": 1}))
    shape = (batch, C) + tuple(hw) if layout == "nchw" else (batch,) + tuple(hw) + (C,)
    return lk.Graph(nodes, [TensorInfo("x", shape, np.dtype(np.float32))], ["y"], {"w": w, "wl": wl},
                    metadata={"layout": layout})


def write_images(tmp_path, rng, n, mode="L"):
    paths = []
    for i in range(n):
        size = (int(rng.integers(5, 20)), int(rng.integers(5, 20)))
        data = rng.integers(0, 256, (size[1], size[0]) + (() if mode == "L" else (3,)), dtype=np.uint8)
        ext = "png" if i % 2 == 0 else "jpg"
        p = tmp_path / f"img{i}.{ext}"
        Image.fromarray(data, mode).save(p)
        paths.append(p)
    return paths


def expected(model, path, channels, mean, std, layout="nchw", hw=(H, W), softmax_needed=False):
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB").resize((hw[1], hw[0]), Image.BILINEAR)
        a = np.asarray(im, np.float64) / 255.0
    if a.ndim == 2:
        a = a[:, :, None]
    a = (a - np.asarray(mean)) / np.asarray(std)
    x = a[None].astype(np.float32)
    if layout == "nchw":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    y = model(x)[0].astype(np.float64)
    if softmax_needed:
        y = np.exp(y - y.max())
        y /= y.sum()
    return y


def parse(out):
    res = {}
    for line in out.strip().splitlines():
        path, rest = line.rsplit(": ", 1) if ": " in line else (line, "")
        res[path] = [(m.group(1), float(m.group(2))) for m in re.finditer(r"(\S+) \(([0-9.]+)\)", rest)]
    return res


def test_predict_cli(tmp_path, rng, capsys):
    model = make_model(rng)
    path = tmp_path / "model.lk"
    lk.save_model(model, path)
    images = write_images(tmp_path, rng, 5)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    missing = tmp_path / "missing.jpg"
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\ntwo\nthree\n\n")
    argv = ["predict", str(path), str(images[0]), str(bad), *map(str, images[1:3]), str(missing),
            *map(str, images[3:]), "--labels", str(labels), "--top", "3", "--batch-size", "2",
            "--mean", "0.5", "--std", "0.25"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "broken.png" in err and "missing.jpg" in err
    got = parse(out)
    assert list(got) == [str(p) for p in images]  # in the order given, unreadable ones skipped
    names = ["zero", "one", "two", "three"]
    for p in images:
        probs = expected(model, p, 1, [0.5], [0.25])
        top = np.argsort(-probs, kind="stable")[:3]
        assert [n for n, _ in got[str(p)]] == [names[i] for i in top]
        np.testing.assert_allclose([v for _, v in got[str(p)]], probs[top], atol=6e-5)


def test_nhwc_rgb_logits_and_metadata(tmp_path, rng, capsys):
    """A Keras-like NHWC model that outputs logits; labels, mean and std from the model's metadata."""
    model = make_model(rng, channels=3, layout="nhwc", softmax=False)
    path = tmp_path / "m.lk"
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    lk.save_model(model, path, metadata={"labels": ["a", "b", "c", "d"], "mean": mean, "std": std})
    images = write_images(tmp_path, rng, 3, mode="RGB")
    assert main(["predict", str(path), *map(str, images), "--top", "10"]) == 0
    got = parse(capsys.readouterr().out)
    for p in images:
        probs = expected(model, p, 3, mean, std, layout="nhwc", softmax_needed=True)
        assert len(got[str(p)]) == CLASSES  # --top larger than the classes: all of them
        np.testing.assert_allclose(sorted(v for _, v in got[str(p)]), sorted(probs), atol=6e-5)
        assert got[str(p)][0][0] == "abcd"[int(np.argmax(probs))]


def test_size_flag_for_models_without_fixed_size(tmp_path, rng, capsys):
    model = make_model(rng, channels=1, hw=(None, None))
    path = tmp_path / "m.lk"
    lk.save_model(model, path)
    images = write_images(tmp_path, rng, 2)
    assert main(["predict", str(path), *map(str, images)]) == 2
    assert "--size" in capsys.readouterr().err
    assert main(["predict", str(path), *map(str, images), "--size", "6", "7", "--grayscale"]) == 0
    got = parse(capsys.readouterr().out)
    for p in images:
        probs = expected(model, p, 1, [0.0], [1.0], hw=(6, 7))
        assert got[str(p)][0][1] == pytest.approx(probs.max(), abs=6e-5)


def test_model_with_fixed_batch_size(tmp_path, rng, capsys):
    """A model exported for batches of exactly 2 still classifies 3 images (the last batch padded)."""
    model = make_model(rng, batch=2)
    path = tmp_path / "m.lk"
    lk.save_model(model, path)
    images = write_images(tmp_path, rng, 3)
    assert main(["predict", str(path), *map(str, images), "--batch-size", "16", "--top", "1"]) == 0
    got = parse(capsys.readouterr().out)
    assert list(got) == [str(p) for p in images]
    for p in images:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L").resize((W, H), Image.BILINEAR), np.float32) / 255.0
        probs = model(np.stack([a[None], a[None]]))[0]
        assert got[str(p)][0][1] == pytest.approx(float(probs.max()), abs=6e-5)


def test_failures(tmp_path, rng, capsys):
    model = make_model(rng)
    path = tmp_path / "m.lk"
    lk.save_model(model, path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert main(["predict", str(path), str(bad), str(tmp_path / "none.png")]) == 1
    err = capsys.readouterr().err
    assert "bad.jpg" in err and "none.png" in err and "no image" in err
    images = write_images(tmp_path, rng, 1)
    assert main(["predict", str(path), str(images[0]), "--mean", "0.1", "0.2"]) == 2
    assert "mean" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nomodel.onnx"), str(images[0])]) == 2
    assert "nomodel.onnx" in capsys.readouterr().err
    model3 = make_model(rng, channels=3)
    lk.save_model(model3, tmp_path / "rgb.lk")
    assert main(["predict", str(tmp_path / "rgb.lk"), str(images[0]), "--grayscale"]) == 2
    assert "--grayscale" in capsys.readouterr().err
    assert main(["predict", str(path), str(images[0]), "--size", "0", "5"]) == 2
    assert "--size" in capsys.readouterr().err


def test_label_count_mismatch_warns(tmp_path, rng, capsys):
    model = make_model(rng)
    path = tmp_path / "m.lk"
    lk.save_model(model, path)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(7)))
    images = write_images(tmp_path, rng, 2)
    assert main(["predict", str(path), *map(str, images), "--labels", str(labels)]) == 0
    assert "7 labels for a model with 4 classes" in capsys.readouterr().err


def test_module_entry_point(tmp_path, rng):
    model = make_model(rng)
    path = tmp_path / "m.lk"
    lk.save_model(model, path)
    images = write_images(tmp_path, rng, 2)
    r = subprocess.run([sys.executable, "-m", "lepton_kernels", "predict", str(path), *map(str, images),
                        "--top", "1"], capture_output=True, text=True, check=True)
    assert len(r.stdout.strip().splitlines()) == 2
    r = subprocess.run([sys.executable, "-m", "lepton_kernels", "--help"], capture_output=True, text=True,
                       check=True)
    assert "predict" in r.stdout and "demo" in r.stdout
