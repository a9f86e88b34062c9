from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import REPO
from test_predict import BLOCK_TRAINING_LIBS

from fracture.boxes import heatmap
from fracture.export.export import export
from fracture.export.graph import parity_inputs
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract, resize
from fracture.train.cam import cam_from_features, normalise_cam
from fracture.train.checkpoint import load_classifier
from fracture.train.explain import explain, grad_cam
from fracture.train.model import build_network


def _line_images(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    x = rng.normal(80, 12, (n, 1, 32, 32)).clip(0, 255)
    y = rng.integers(0, 2, n)
    where = []
    for i in range(n):
        r, c = int(rng.integers(4, 26)), int(rng.integers(4, 22))
        where.append((r, c))
        if y[i]:
            x[i, 0, r, c : c + 7] = 250  # a short bright "fracture line"
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), where


def test_grad_cam_highlights_a_planted_line() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_network(Contract(image_size=32), widths=(8, 16), dense=(16,), dropout=0.0, dense_dropout=0.0, pool="max")
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(150):
        x, y, _ = _line_images(32, rng)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y, where = _line_images(64, rng)
    prob, cam = grad_cam(net, x)
    inside, outside = [], []
    for i in np.flatnonzero(y.numpy() == 1):
        full = cv2.resize(cam[i].numpy(), (32, 32), interpolation=cv2.INTER_LINEAR)
        r, c = where[i]
        mask = np.zeros((32, 32), bool)
        mask[max(r - 1, 0) : r + 2, c : c + 7] = True
        inside.append(full[mask].mean())
        outside.append(full[~mask].mean())
    assert float(prob[y == 1].mean()) > 0.8 > float(prob[y == 0].mean())  # the model learned the line
    assert np.mean(inside) > 3 * np.mean(outside)


@pytest.mark.parametrize("arch,pool", [("seed_cnn", "flatten"), ("seed_cnn", "max"), ("seed_cnn", "avg"), ("resnet18", None), ("densenet121", None),
                                       ("efficientnet_b0", None), ("convnext_tiny", None)])
def test_traceable_cam_equals_autograd_grad_cam(arch: str, pool: str | None) -> None:
    torch.manual_seed(1)
    kwargs = {"pool": pool, "widths": (8, 16, 16)} if arch == "seed_cnn" else {}
    net = build_network(Contract(image_size=64), arch, **kwargs).eval()
    x = torch.rand(3, 1, 64, 64) * 255
    _, expected = grad_cam(net, x)
    with torch.no_grad():
        logit, cam = cam_from_features(net, net.forward_features(x))
    torch.testing.assert_close(normalise_cam(cam), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logit, net(x).detach(), atol=1e-5, rtol=1e-5)


def test_onnx_heatmap_equals_torch_grad_cam(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "hm.onnx"
    meta = export(tiny_ckpt, path, heatmap=True)
    assert meta["outputs"] == ["probability", "logit", "heatmap"]
    model = load_classifier(tiny_ckpt)
    x = parity_inputs(model.contract, n=6, seed=11)
    _, expected = grad_cam(model.net.eval(), torch.from_numpy(x))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    full = sess.run(["heatmap"], {"image": x})[0]
    np.testing.assert_allclose(full, expected.numpy(), atol=1e-4, rtol=0)
    one = sess.run(["heatmap"], {"image": x[2:3]})[0]
    np.testing.assert_allclose(one[0], expected[2].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape,method", [((200, 100), "stretch"), ((100, 220), "stretch"), ((200, 100), "letterbox"), ((90, 240), "letterbox")])
def test_heatmap_lands_on_the_original_geometry(shape: tuple[int, int], method: str) -> None:
    h, w = shape
    contract = Contract(image_size=64, resize=method)
    point = (int(h * 0.7), int(w * 0.3))  # a spot in the original image
    marker = np.zeros(shape, np.uint8)
    cv2.circle(marker, (point[1], point[0]), max(h, w) // 25, 255, -1)
    cam = cv2.resize(resize(marker, contract).astype(np.float32), (16, 16), interpolation=cv2.INTER_AREA)
    full = heatmap.to_original(cam, h, w, contract)
    assert full.shape == shape
    r, c = np.unravel_index(np.argmax(full), full.shape)
    assert abs(r - point[0]) <= max(h, w) * 0.06 and abs(c - point[1]) <= max(h, w) * 0.06
    picture = heatmap.overlay(np.zeros(shape, np.uint8), full, 0.5)
    assert picture.shape == (h, 2 * w, 3)


def test_pointing_game_on_hand_made_boxes(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("0 0.25 0.25 0.5 0.5\n")  # top-left quarter of a 100x200 image
    boxes = heatmap.read_yolo_boxes(tmp_path / "a.txt", 100, 200)
    assert boxes == [(0, 0, 100, 50)]
    mask = heatmap.box_mask(boxes, 100, 200)
    cam = np.zeros((100, 200))
    cam[10, 10] = 3.0
    cam[90, 190] = 1.0
    assert heatmap.pointing(cam, mask) == {"hit": 1.0, "mass_in_boxes": 0.75}
    cam[90, 190] = 5.0
    assert heatmap.pointing(cam, mask)["hit"] == 0.0
    base = heatmap.baselines(mask)
    assert base["random"] == {"hit": 0.25, "mass_in_boxes": 0.25} and base["centre"]["hit"] == 0.0
    assert heatmap.read_yolo_boxes(tmp_path / "missing.txt", 10, 10) == []


def test_predictor_writes_heatmaps_without_torch(tiny_ckpt: Path, synth_root: Path, tmp_path: Path) -> None:
    model_path = tmp_path / "hm.onnx"
    export(tiny_ckpt, model_path, heatmap=True)
    images = sorted((synth_root / "test" / "images").glob("*.png"))[:3]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "maps"
    done = subprocess.run([sys.executable, "-c", BLOCK_TRAINING_LIBS, str(model_path), *map(str, images), "--heatmaps", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    for image in images:
        [written] = out.glob(f"{image.stem}_*_heatmap.png")
        picture = cv2.imread(str(written))
        original = preprocess.read_image(image)
        assert picture.shape == (original.shape[0], 2 * original.shape[1], 3)


def test_explain_scores_against_boxes(tiny_ckpt: Path, synth_root: Path, tmp_path: Path) -> None:
    images = sorted(str(p) for p in (synth_root / "test" / "images").glob("*.png"))[:4]
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    for p in images[:3]:
        (boxes / f"{Path(p).stem}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    summary = explain(tiny_ckpt, images, tmp_path / "out", boxes)
    assert summary["overlays"] == 4 and summary["boxed_images"] == 3
    assert summary["random"]["hit"] == pytest.approx(0.16, abs=0.01)
    assert summary["centre"]["hit"] == 1.0 and 0.0 <= summary["model"]["hit"] <= 1.0
    assert (tmp_path / "out" / "explain.json").is_file()


def test_fracture_maps_are_drawn_on_an_absolute_scale_and_grad_cam_on_its_own() -> None:
    image = np.full((40, 50), 120, np.uint8)
    low = np.full((40, 50), 0.02, np.float32)
    hot = low.copy()
    hot[10:20, 10:20] = 1.0
    quiet = heatmap.panel(image, low, absolute=True)
    assert np.abs(quiet.astype(int) - 120).max() <= 8  # a map that is low everywhere leaves the radiograph nearly plain
    marked = heatmap.panel(image, hot, absolute=True)
    assert int(marked[15, 15, 2]) - int(marked[15, 15, 0]) > 40 and np.abs(marked[30, 40].astype(int) - 120).max() <= 8  # red where p = 1
    relative = heatmap.panel(image, low)
    assert int(relative[30, 40, 2]) - int(relative[30, 40, 0]) > 40  # Grad-CAM has no scale: its own maximum is hot
    assert np.array_equal(heatmap.panel(image, None), np.dstack([image] * 3))
