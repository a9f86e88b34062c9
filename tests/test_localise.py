"""Localisation: boxes through import, augmentation and letterbox; the map head, its export and the predictor's boxes; scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from conftest import REPO, loc_fit_args
from test_predict import BLOCK_TRAINING_LIBS

from fracture.boxes import detection, heatmap
from fracture.data.synth import radiograph_and_boxes, write_dataset
from fracture.deploy.metadata import file_sha256
from fracture.export.export import export
from fracture.export.graph import Deployable
from fracture.export.quantize import quantize_int8
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract, geometry, resize
from fracture.report import evaluate
from fracture.scoring import compare, froc, selection
from fracture.train import fit
from fracture.train.checkpoint import CheckpointError, epochs_done, initialise_from, load_classifier, upgrade
from fracture.train.combined import MirrorTTA, WithClassifier
from fracture.train.data import FractureDataModule
from fracture.train.dataset import Augmentation, Transform
from fracture.train.losses import cell_cover, map_loss, pointing_loss
from fracture.train.model import build_network
from fracture.train.module import FractureClassifier
from fracture.train.networks import ResNet

NO_EXPOSURE = {"brightness": 0.0, "contrast": 0.0, "noise_std": 0.0}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --- scores against hand-computed cases ---------------------------------------------------------------------------

def test_froc_ap_and_pointing_on_a_hand_computed_case() -> None:
    truths = [[(10, 10, 20, 20)], [], [(30, 30, 40, 40)]]
    preds = [
        [(12, 12, 18, 18, 0.9), (50, 50, 60, 60, 0.8)],  # a hit (centre inside, IoU 0.36) and a false positive
        [(0, 0, 5, 5, 0.7)],  # a false positive on an image without fracture
        [(38, 38, 48, 48, 0.6)],  # centre outside, IoU 0.02: a miss and a false positive
    ]
    m = froc.detection_metrics(froc.score_detections(preds, truths))
    # FP scores 0.8, 0.7, 0.6 over 3 images. 0.5 FP/image allows 1 FP: threshold above 0.7 keeps the 0.9 hit -> 1 of 2 lesions
    assert m["froc_centre_sensitivity_at_0.5_fp"] == 0.5
    assert m["froc_centre_sensitivity_at_1_fp"] == 0.5 and m["froc_iou_sensitivity_at_2_fp"] == 0.5
    # AP@0.25: TP, FP, FP, FP with 2 lesions -> precision 1 up to recall 0.5 -> 0.5; AP@0.5: IoU 0.36 is no match -> 0
    assert m["ap_iou25"] == pytest.approx(0.5) and m["ap_iou50"] == 0.0
    # a lesion hit only by a low-scoring box needs more false positives
    later = froc.froc([froc.ImageScores([(0, 0, 4, 4, 0.95), (10, 10, 20, 20, 0.5)], [(10, 10, 20, 20)], "centre"),
                            froc.ImageScores([(0, 0, 4, 4, 0.9), (5, 5, 9, 9, 0.85)], [], "centre")])  # 3 FPs above it on 2 images
    assert later == {"sensitivity_at_0.5_fp": 0.0, "sensitivity_at_1_fp": 0.0, "sensitivity_at_2_fp": 1.0}
    cam = np.zeros((50, 50))
    cam[15, 15] = 1.0
    mask = heatmap.box_mask([(10, 10, 20, 20)], 50, 50)
    assert heatmap.pointing(cam, mask) == {"hit": 1.0, "mass_in_boxes": 1.0}



def test_one_box_finds_one_lesion_and_a_huge_box_finds_none() -> None:
    # two lesions side by side, one box over both: IoU 0.5 with each and its centre (20, 15) inside the second
    two = [(10, 10, 20, 20), (20, 10, 30, 20)]
    for crit in ("centre", "iou"):
        scores = froc.ImageScores([(10, 10, 30, 20, 0.9)], two, crit)
        assert int(np.isfinite(scores.lesion_scores).sum()) == 1 and scores.fp_scores.size == 0, crit
    # the same lesions, a box on each: both found; a second box on a found lesion is a false positive
    scores = froc.ImageScores([(10, 10, 20, 20, 0.9), (20, 10, 30, 20, 0.8), (11, 11, 19, 19, 0.7)], two, "centre")
    assert scores.lesion_scores.tolist() == [0.9, 0.8] and scores.fp_scores.tolist() == [0.7]
    # the higher-scoring box claims first; a lower one over the same lesion cannot take it away
    assert froc.match([(12, 12, 18, 18, 0.4), (10, 10, 20, 20, 0.9)], [(10, 10, 20, 20)], "centre") == [-1, 0]
    # centre hit needs a bounded box: 4x the true area (20x20 on a 10x10 lesion) hits, just over it does not
    truth = [(10, 10, 20, 20)]
    assert froc.hits((5, 5, 25, 25, 1.0), truth[0], "centre")
    assert not froc.hits((4.9, 4.9, 25.1, 25.1, 1.0), truth[0], "centre")
    huge = froc.detection_metrics(froc.score_detections([[(0, 0, 100, 100, 0.9)]], [truth]))
    assert huge["froc_centre_sensitivity_at_2_fp"] == 0.0 and huge["froc_iou_sensitivity_at_2_fp"] == 0.0

def test_pointing_by_subgroup_and_lesion_size_on_a_hand_computed_case() -> None:
    from fracture.scoring.localisation import LESION_SIZE, ImageResult, by_subgroup

    def image(side: float | None, hit: float = np.nan, mass: float = np.nan) -> ImageResult:
        truth = [(0.0, 0.0, side, side), (0.0, 0.0, 2 * side, 2 * side)] if side else []  # the smaller box sets the size
        return ImageResult(truth, [], [], {"hit": hit, "mass_in_boxes": mass} if side else {})

    results = [image(10, 1, 0.5), image(12, 0, 0.1), image(30, 1, 0.3), image(32, 1, 0.3), image(60, 0, 0.2), image(64, 0, 0.0), image(None)]
    region = np.array(["hand", "hand", "leg", "hand", "leg", "leg", "hand"])
    groups = np.array(["a", "a", "b", "c", "d", "e", "f"])
    rows = {(r["column"], r["value"]): r for r in by_subgroup(results, {"region": region}, groups, n_boot=200)}
    hand, leg = rows[("region", "hand")], rows[("region", "leg")]
    assert (hand["n"], hand["pointing_hit_rate"], hand["mass_in_boxes"]) == (3, pytest.approx(2 / 3), pytest.approx(0.3))  # not the unboxed one
    assert (leg["n"], leg["pointing_hit_rate"], leg["mass_in_boxes"]) == (3, pytest.approx(1 / 3), pytest.approx(0.5 / 3))
    sizes = sorted((r for r in rows.values() if r["column"] == LESION_SIZE), key=lambda r: r["pointing_hit_rate"])
    assert [r["n"] for r in sizes] == [2, 2, 2] and [r["pointing_hit_rate"] for r in sizes] == [0.0, 0.5, 1.0]
    assert [r["value"].split()[0] for r in sizes] == ["large", "small", "medium"]
    # hand's images a, a (one group, drawn together), c: every draw is {a, a}, {c} or a mix: rates 0.5, 1 or between
    lo, hi = hand["ci95"]["pointing_hit_rate"]
    assert 0.5 <= lo <= hand["pointing_hit_rate"] <= hi <= 1.0


def test_map_to_boxes_and_threshold_choice() -> None:
    m = np.zeros((40, 40), np.float32)
    m[5:10, 5:15] = 0.9  # the fracture
    m[30:32, 30:32] = 0.35  # a weak, small distractor
    boxes = detection.map_to_boxes(m, 0.5)
    assert boxes == [(5.0, 5.0, 15.0, 10.0, pytest.approx(0.9))]
    assert len(detection.map_to_boxes(m, 0.3)) == 2 and len(detection.map_to_boxes(m, 0.3, min_area=5)) == 1
    chosen = selection.choose_box_decoding([m, m * 0], [[(5, 5, 15, 10)], []], thresholds=(0.2, 0.5, 0.95))
    assert chosen["box_method"] == "regions" and chosen["box_threshold"] == 0.5 and chosen["froc_mean"] == 1.0  # peaks tie: regions kept


def _blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float, height: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (height * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))).astype(np.float32)


def test_peak_boxes_are_centred_on_local_maxima_with_suppression() -> None:
    m = np.maximum(_blob((60, 80), (20, 15), 4, 0.9), _blob((60, 80), (70, 50), 4, 0.6))
    m[15, 24] = max(m[15, 24], 0.88)  # a shoulder of the first peak: inside its box, so not a box of its own
    boxes = detection.peak_boxes(m, 10, 6, threshold=0.1, max_boxes=5, window=5)
    assert [b[4] for b in boxes] == pytest.approx([0.9, 0.6], abs=1e-6)
    assert boxes[0][:4] == pytest.approx((15.5, 12.5, 25.5, 18.5)) and boxes[1][:4] == pytest.approx((65.5, 47.5, 75.5, 53.5))
    assert len(detection.peak_boxes(m, 10, 6, threshold=0.7, max_boxes=5, window=5)) == 1
    assert len(detection.peak_boxes(m, 10, 6, threshold=0.1, max_boxes=1, window=5)) == 1
    corner = detection.peak_boxes(_blob((30, 30), (1, 1), 2, 1.0), 10, 10, 0.1, 1, 5)[0]
    assert corner[:4] == pytest.approx((0.0, 0.0, 6.5, 6.5))  # clipped to the map


def test_peaks_are_chosen_when_a_ridge_merges_the_fracture_with_its_surroundings() -> None:
    # the map is high along a ridge and peaks at the fracture's end: every threshold's region spans the ridge,
    # so its centre misses; a box on the peak hits
    maps, truths = [], []
    for k in range(6):
        m = np.zeros((64, 64), np.float32)
        m[30 + k % 3, 4:44] = 0.75
        m[29 + k % 3 : 32 + k % 3, 40:44] = 0.78
        maps.append(m)
        truths.append([(38.0, 26.0 + k % 3, 46.0, 34.0 + k % 3)])
    maps.append(np.zeros((64, 64), np.float32))
    truths.append([])
    chosen = selection.choose_box_decoding(maps, truths)
    assert chosen["box_method"] == "peaks" and chosen["froc_mean"] == 1.0 and chosen["max_boxes"] == 1
    assert chosen["box_size"] == pytest.approx([8 / 64, 8 / 64])
    regions_only = selection.choose_box_decoding(maps, truths, peak_thresholds=())
    assert regions_only["box_method"] == "regions" and regions_only["froc_mean"] == 0.0


def test_display_threshold_shows_at_most_one_false_box_per_validation_image() -> None:
    rng = np.random.default_rng(0)
    maps, truths = [], []
    for k in range(30):  # four blobs per map; on odd maps the last is the fracture
        m = np.zeros((64, 64), np.float32)
        for j in range(4):
            y, x = (int(v) for v in rng.integers(6, 58, 2))
            m[y - 2 : y + 2, x - 2 : x + 2] = rng.uniform(0.5, 0.95) if (j == 3 and k % 2) else rng.uniform(0.2, 0.9)
        maps.append(m)
        truths.append([(x - 4.0, y - 4.0, x + 4.0, y + 4.0)] if k % 2 else [])
    chosen = selection.choose_box_decoding(maps, truths)
    contract = Contract(image_size=64)
    candidates = [detection.find_boxes(m, chosen, 64, 64, contract, candidates=True) for m in maps]
    scored = [froc.ImageScores(c, t, "centre") for c, t in zip(candidates, truths)]
    shown = chosen["display_threshold"]
    assert shown > chosen["box_threshold"] and sum(map(len, candidates)) / len(maps) > 1.5  # the candidates are trimmed
    assert froc.at_threshold(scored, shown)["fp_per_image"] <= selection.DISPLAY_FP_RATE
    assert froc.at_threshold(scored, shown - 1e-6)["fp_per_image"] > selection.DISPLAY_FP_RATE  # the lowest such threshold
    for m, c in zip(maps, candidates):  # what a reader is shown: the candidates above it
        assert detection.find_boxes(m, chosen, 64, 64, contract) == [b for b in c if b[4] > shown]


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_stored_box_decoding_gives_boxes_in_original_pixels(resize: str) -> None:
    contract = Contract(image_size=64, resize=resize)
    h, w = 90, 140
    truth = detection.to_pixels([(0.6, 0.3, 0.7, 0.5)], h, w)[0]
    mask = detection.rasterize(detection.to_input([(0.6, 0.3, 0.7, 0.5)], h, w, contract), 64, 64)
    low = cv2.resize(mask.astype(np.float32) / 255, (8, 8), interpolation=cv2.INTER_AREA)
    full = heatmap.to_original(low, h, w, contract)
    g = geometry(h, w, contract)
    size = [(truth[2] - truth[0]) * g.inner_width / w / 64, (truth[3] - truth[1]) * g.inner_height / h / 64]  # the true box, as input fractions
    (box,) = detection.find_boxes(full, {"box_method": "peaks", "box_threshold": 0.2, "max_boxes": 1, "box_size": size}, h, w, contract)
    assert box[2] - box[0] == pytest.approx(truth[2] - truth[0], rel=0.05) and box[3] - box[1] == pytest.approx(truth[3] - truth[1], rel=0.05)
    assert froc.hits(box, truth, "centre") and detection.iou(box, truth) > 0.4
    old = {"box_threshold": 0.5, "min_area_fraction": 0.0}  # metadata from before box_method: regions
    assert detection.find_boxes(full, old, h, w, contract) == detection.map_to_boxes(full, 0.5)


def test_box_text_round_trip_and_refusals() -> None:
    boxes = [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 1.0)]
    assert np.allclose(detection.parse_boxes(detection.format_boxes(boxes)), boxes)
    assert detection.parse_boxes("") == [] and detection.parse_boxes(float("nan")) == []
    assert np.allclose(detection.yolo_to_boxes("0 0.5 0.5 0.2 0.4\n"), [(0.4, 0.3, 0.6, 0.7)])
    for bad in ("0.1 0.2 0.3", "0.5 0.5 0.4 0.9", "0 0 1.5 1"):
        with pytest.raises(ValueError):
            detection.parse_boxes(bad)


# --- geometry: boxes move with the pixels ------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_boxes_are_in_the_frame_a_viewer_shows_an_exif_rotated_image(tmp_path: Path, orientation: int) -> None:
    # FracAtlas's two boxed images with EXIF orientation (IMG0002628: 8, IMG0002588: 3) were boxed as a viewer shows
    # them (the box lands on the clavicle only in that frame): pixels and boxes both live in the EXIF-applied frame
    from fracture.deploy.release import with_exif_orientation

    viewer = np.full((120, 80), 20, np.uint8)
    box = (0.125, 0.5, 0.3125, 0.6667)  # x 10-25, y 60-80 in the viewer's frame
    viewer[60:80, 10:25] = 250
    raw = next(c for c in (np.rot90(viewer, k) for k in range(4)) if np.array_equal(preprocess.apply_orientation(c, orientation), viewer))
    path = tmp_path / "rotated.jpg"
    path.write_bytes(with_exif_orientation(cv2.imencode(".jpg", np.ascontiguousarray(raw), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(), orientation))
    contract = Contract(image_size=64, resize="letterbox")
    x, [(h, w)] = preprocess.load_batch_with_sizes([str(path)], contract)
    assert (h, w) == (120, 80)  # the size a viewer shows, which normalised boxes refer to
    bx0, by0, bx1, by1 = detection.to_input([box], h, w, contract)[0]
    inside = x[0, 0, int(np.ceil(by0)) : int(by1), int(np.ceil(bx0)) : int(bx1)]
    assert inside.size and inside.mean() > 200


@pytest.mark.parametrize("method", ["stretch", "letterbox"])
def test_boxes_land_on_the_fracture_after_resizing_and_come_back(method: str) -> None:
    original = np.zeros((90, 140), np.uint8)
    box = (0.2, 0.25, 0.55, 0.75)
    x0, y0, x1, y1 = detection.to_pixels([box], 90, 140)[0]
    original[int(y0) : int(y1), int(x0) : int(x1)] = 255
    contract = Contract(image_size=64, resize=method)
    resized = resize(original, contract)
    mask = detection.rasterize(detection.to_input([box], 90, 140, contract), 64, 64)
    assert _iou(resized > 127, mask > 0) > 0.85
    # a map over the model input at stride 8 (each cell: its share of box, as the map is trained) → boxes in original pixels
    low = cv2.resize(mask.astype(np.float32) / 255, (8, 8), interpolation=cv2.INTER_AREA)
    full = heatmap.to_original(low, 90, 140, contract)
    found = detection.map_to_boxes(full, 0.5)
    assert len(found) == 1 and detection.iou(found[0], (x0, y0, x1, y1)) > 0.6


@pytest.mark.parametrize("aug", [
    Augmentation(rotation=30, translate=0, scale_min=1, scale_max=1, hflip=0, **NO_EXPOSURE),
    Augmentation(rotation=0, translate=0.2, scale_min=1, scale_max=1, hflip=0, **NO_EXPOSURE),
    Augmentation(rotation=0, translate=0, scale_min=0.7, scale_max=1.3, hflip=0, **NO_EXPOSURE),
    Augmentation(rotation=0, translate=0, scale_min=1, scale_max=1, hflip=1.0, **NO_EXPOSURE),
    Augmentation(rotation=15, translate=0.1, scale_min=0.9, scale_max=1.1, hflip=0.5, **NO_EXPOSURE),
], ids=["rotation", "shift", "zoom", "flip", "all"])
def test_box_mask_moves_with_the_pixels(aug: Augmentation) -> None:
    torch.manual_seed(0)
    image = np.zeros((64, 64), np.uint8)
    image[12:22, 20:40] = 255  # asymmetric: a flip that forgot the mask would miss
    mask = detection.rasterize([(20, 12, 40, 22)], 64, 64)
    for crop in (None, 48):
        transform = Transform(aug, crop=crop, crop_on_box=1.0)
        for _ in range(10):
            x, m, y = transform(torch.from_numpy(image.copy()), torch.from_numpy(mask.copy()), 1.0, True)
            assert x.shape == m.shape == (1, crop or 64, crop or 64)
            assert y == 1.0 and _iou(x[0].numpy() > 127, m[0].numpy() > 0) > 0.75


def test_a_crop_without_the_fracture_is_a_negative_with_an_empty_mask() -> None:
    torch.manual_seed(0)
    image = np.zeros((64, 64), np.uint8)
    mask = detection.rasterize([(2, 2, 8, 8)], 64, 64)
    transform = Transform(None, crop=32, crop_on_box=0.0)
    outcomes = set()
    for _ in range(40):
        _, m, y = transform(torch.from_numpy(image), torch.from_numpy(mask), 1.0, True)
        assert (y == 1.0) == bool(m.sum() > 0)
        outcomes.add(y)
        _, m, y = transform(torch.from_numpy(image), torch.from_numpy(mask), 1.0, False)  # no boxes known: label kept
        assert y == 1.0
    assert outcomes == {0.0, 1.0}


def test_map_loss_targets_the_box_cells_and_skips_unknown_images() -> None:
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:16, 16:24] = 1.0  # exactly one 8x8 cell
    maps = torch.zeros(2, 4, 4, requires_grad=True)
    loss = map_loss(maps, cell_cover(maps, mask), torch.tensor([True, False]))
    loss.backward()
    assert maps.grad[1].abs().sum() == 0  # the unsupervised image does not pull its map
    assert maps.grad[0, 1, 2] < 0 and (maps.grad[0].flatten()[torch.arange(16) != 6] > 0).all()  # up in the box cell, down elsewhere


def test_focal_map_loss_on_a_hand_computed_case_and_fading_easy_background() -> None:
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:16, 16:24] = 1.0  # one fracture cell of 16
    supervised = torch.tensor([True, False])
    # all logits 0: every cell has p = 0.5, BCE ln 2, weight |0.5 - t|^2 = 1/4; 16 cells / 1 fracture cell
    cover = cell_cover(torch.zeros(2, 4, 4), mask)
    assert map_loss(torch.zeros(2, 4, 4), cover, supervised, "focal").item() == pytest.approx(16 * np.log(2) / 4, rel=1e-5)
    maps = torch.full((2, 4, 4), -6.0, requires_grad=True)  # easy background everywhere
    maps.data[0, 0, 0] = 2.0  # one hard negative
    map_loss(maps, cover, supervised, "focal").backward()
    grad = maps.grad[0]
    assert grad[1, 2] < 0 and grad[0, 0] > 0 and maps.grad[1].abs().sum() == 0
    easy = grad.flatten()[[i for i in range(16) if i not in (0, 6)]]
    assert (easy > 0).all() and easy.max() < grad[0, 0] / 1000  # the easy cells nearly drop out
    plain = torch.full((2, 4, 4), -6.0, requires_grad=True)
    plain.data[0, 0, 0] = 2.0
    map_loss(plain, cover, supervised, "bce_dice").backward()
    assert easy.max() / grad[0, 0] < plain.grad[0, 0, 1] / plain.grad[0, 0, 0] / 100  # unlike plain BCE


def test_pointing_loss_ranks_the_box_cells_above_the_rest_of_the_image() -> None:
    mask = torch.zeros(3, 1, 32, 32)
    mask[0, :, 8:16, 16:24] = 1.0  # one whole cell (row 1, column 2)
    mask[1, :, 8:16, 0:12] = 1.0  # a cell and half of its neighbour: weights 1 and 1/2
    # all logits 0: -log(sum of weights / 16); image 2 has no box in view and does not count
    expected = (np.log(16) + np.log(16 / 1.5)) / 2
    cover = cell_cover(torch.zeros(3, 4, 4), mask)
    loss, counted = pointing_loss(torch.zeros(3, 4, 4), cover)
    assert loss.item() == pytest.approx(expected, rel=1e-5) and counted == 2
    maps = torch.zeros(3, 4, 4, requires_grad=True)
    maps.data[0, 3, 3] = 3.0  # a distractor outranking the box
    maps.data[0, 0, 0] = 1.0  # a weaker one
    maps.data[2, 0, 0] = 5.0
    pointing_loss(maps, cover)[0].backward()
    grad = maps.grad[0]
    assert grad[1, 2] < 0 and grad[3, 3] > grad[0, 0] > grad[2, 2] > 0  # the higher a distractor, the harder it is pushed down
    assert maps.grad[2].abs().sum() == 0
    nothing, counted = pointing_loss(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))
    assert nothing.item() == 0.0 and counted == 0  # no box in view: no loss
    hit = torch.full((3, 4, 4), -5.0)
    hit[0, 1, 2] = hit[1, 1, 0] = 5.0
    assert pointing_loss(hit, cover)[0].item() < 1e-3  # the peak in the box: nothing left to learn


def test_init_from_starts_a_new_run_from_the_weights_and_refuses_leaks_and_other_networks(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, ckpt = loc_run
    hparams, _ = upgrade(torch.load(ckpt, map_location="cpu", weights_only=True))
    fresh = FractureClassifier(**hparams)
    splits = pd.read_csv(ckpt.parent / "splits.csv")
    same = {s: t["path"].tolist() for s, t in splits.groupby("split")}
    assert initialise_from(fresh, ckpt, same) == []
    source = load_classifier(ckpt).net.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in fresh.net.state_dict().items())
    leaked = {**same, "test": same["test"] + same["train"][:1]}
    with pytest.raises(CheckpointError, match="1 images of this run's validation/test split were in its training split"):
        initialise_from(fresh, ckpt, leaked)
    other = FractureClassifier(**{**hparams, "net": {**hparams["net"], "init_args": {**hparams["net"]["init_args"], "widths": [8, 16, 32]}}})
    with pytest.raises(CheckpointError, match="network"):
        initialise_from(other, ckpt, same)
    stretched = FractureClassifier(**{**hparams, "resize": "stretch"})
    with pytest.raises(CheckpointError, match="preprocessing"):
        initialise_from(stretched, ckpt, same)
    # a larger input alone is a fine-tune at a new size (the map head is fully convolutional): the same weights, said so
    bigger = FractureClassifier(**{**hparams, "image_size": 128})
    assert initialise_from(bigger, ckpt, same) == [f"{ckpt}: trained at 96 px, fine-tuned here at 128 px"]
    assert all(torch.equal(v, source[k]) for k, v in bigger.net.state_dict().items()) and bigger.contract.image_size == 128
    # end to end: a 1-epoch fine-tune with the focal map loss; resuming and initialising at once is refused
    args = loc_fit_args(root, tmp_path, "ft", "--init_from", str(ckpt), "--model.map_loss", "focal", "--model.point_weight", "0.5",
                        "--test_after_fit", "false", epochs=1)
    assert fit.main(args) == 0
    info = json.loads((tmp_path / "ft" / "run_info.json").read_text())
    tuned = load_classifier(next((tmp_path / "ft").glob("best-*.ckpt"))).hparams
    assert info["initialised_from"] == str(ckpt) and tuned.map_loss == "focal" and tuned.point_weight == 0.5
    logged = pd.read_csv(tmp_path / "ft" / "metrics.csv")
    assert np.isfinite(logged["train/point_loss"].dropna()).all() and len(logged["val/point_loss"].dropna()) == 1
    assert fit.main([*args, "--ckpt_path", str(ckpt)]) == 2


def test_a_rerun_stage_resumes_its_own_run_and_a_new_one_starts_from_init_from(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The release recipe reruns one command per stage (--ckpt_path auto): it resumes that named run, never the newest."""
    root, ckpt = loc_run
    stage = loc_fit_args(root, tmp_path, "stage", "--init_from", str(ckpt), "--ckpt_path", "auto", "--test_after_fit", "false", epochs=1)
    assert fit.main(stage) == 0
    first = json.loads((tmp_path / "stage" / "run_info.json").read_text())
    assert first["resumed_from"] is None and first["initialised_from"] == str(ckpt)
    assert epochs_done(tmp_path / "stage" / "last.ckpt") == 1
    assert fit.main(loc_fit_args(root, tmp_path, "newer", "--test_after_fit", "false", epochs=1)) == 0  # a newer run beside it
    assert fit.main([*stage, "--trainer.max_epochs", "2"]) == 0  # the same command, one more epoch: resumed
    again = json.loads((tmp_path / "stage" / "run_info.json").read_text())
    assert again["resumed_from"] == str(tmp_path / "stage" / "last.ckpt")
    assert epochs_done(tmp_path / "stage" / "last.ckpt") == 2 and epochs_done(tmp_path / "newer" / "last.ckpt") == 1
    logged = pd.read_csv(tmp_path / "stage" / "metrics.csv")
    assert sorted(logged["epoch"].dropna().astype(int).unique()) == [0, 1]  # epoch 0 not trained twice
    nameless = [a for a in stage if a not in ("--run_name", "stage")]
    assert fit.main(nameless) == 2  # auto without a run name would have to guess


def test_best_checkpoint_by_validation_froc(loc_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, ckpt = loc_run
    args = loc_fit_args(root, tmp_path, "froc", "--init_from", str(ckpt), "--model.recipe.lr", "0.01", "--best_by", "val/froc_mean",
                        "--test_after_fit", "false", epochs=3)
    assert fit.main(args) == 0
    (best,) = (tmp_path / "froc").glob("best-*.ckpt")
    logged = pd.read_csv(tmp_path / "froc" / "metrics.csv").dropna(subset=["val/froc_mean"])
    top = logged.loc[logged["val/froc_mean"].idxmax()]  # the first epoch with the highest score: later ties do not replace it
    assert best.name == f"best-epoch{int(top['epoch']):03d}-froc_mean{top['val/froc_mean']:.4f}.ckpt"
    classify = loc_fit_args(root, tmp_path, "cls", "--model.net.head", "classify", "--best_by", "val/froc_mean", epochs=1)
    assert fit.main(classify) == 2 and "needs a localise model" in capsys.readouterr().err



def copy_with_one_image_moved(ckpt: Path, folder: Path) -> Path:
    """The checkpoint in another run folder whose splits.csv has one image in another split."""
    folder.mkdir()
    copy = folder / ckpt.name
    copy.write_bytes(ckpt.read_bytes())
    splits = pd.read_csv(ckpt.parent / "splits.csv")
    splits.loc[splits.index[0], "split"] = "test" if splits.loc[splits.index[0], "split"] != "test" else "train"
    splits.to_csv(folder / "splits.csv", index=False)
    return copy


def test_ensemble_averages_its_members_rechooses_on_validation_and_exports(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    from fracture.train import ensemble

    root, ckpt = loc_run
    assert fit.main(loc_fit_args(root, tmp_path, "m2", "--init_from", str(ckpt), "--seed_everything", "1", "--test_after_fit", "false", epochs=1)) == 0
    second = next((tmp_path / "m2").glob("best-*.ckpt"))
    out = tmp_path / "ens" / "ensemble.ckpt"
    assert ensemble.main([str(ckpt), str(second), "--out", str(out), "--root", str(root)]) == 0
    ens, members = load_classifier(out), [load_classifier(c) for c in (ckpt, second)]
    assert ens.hparams.members == 2 and (out.parent / "splits.csv").read_bytes() == (ckpt.parent / "splits.csv").read_bytes()
    x = torch.from_numpy(preprocess.load_batch([str(p) for p in sorted((root / "test" / "images").glob("*.png"))[:6]], ens.contract))
    with torch.no_grad():
        got = ens.net.forward_maps(x)
        each = [m.net.forward_maps(x) for m in members]
        probs, maps = ens.probabilities_and_maps(x)
    for k in range(3):  # the mean of the members' logits: image (map-pooled, joint) and every map cell
        assert torch.allclose(got[k], (each[0][k] + each[1][k]) / 2, atol=1e-5)
    info = ens.deployment_info()
    loc = info["localisation"]
    assert loc["fusion"] == float(ens.net.fusion) in (0.0, 0.5, 1.0) and 0 <= loc["froc_mean"] <= 1
    cal = info["calibration"]  # Platt-scaled only when that lowers the calibration error out of sample
    assert cal["method"] in ("platt", "none") and (cal["method"] == "platt") == (cal["ece_platt_cross_fitted"] < cal["ece_uncalibrated"])
    assert (float(ens.net.scale), float(ens.net.shift)) == pytest.approx((cal["scale"], cal["shift"]))
    assert torch.allclose(probs, torch.sigmoid(cal["scale"] * (loc["fusion"] * got[0] + (1 - loc["fusion"]) * got[1]) + cal["shift"]), atol=1e-6)
    assert [m["sha256"] for m in info["ensemble_of"]] == [file_sha256(c) for c in (ckpt, second)]
    # parts are named by run folder and file, never by the building machine's absolute paths
    assert [m["checkpoint"] for m in info["ensemble_of"]] == [f"{c.parent.name}/{c.name}" for c in (ckpt, second)]
    assert str(tmp_path) not in str(torch.load(out, weights_only=False, map_location="cpu"))
    assert info["thresholds"]["screening"] <= info["thresholds"]["balanced"] and info["val_metrics"]["n"] == members[0].val_summary["n"]

    # one network twice is that network: validation re-made outside training reaches the choices training stored
    twin = tmp_path / "twin" / ckpt.name
    twin.parent.mkdir()
    for f in (ckpt, ckpt.parent / "splits.csv", ckpt.parent / "config.yaml"):
        twin.parent.joinpath(f.name).write_bytes(f.read_bytes())
    assert ensemble.main([str(ckpt), str(twin), "--out", str(tmp_path / "same.ckpt"), "--root", str(root), "--calibration", "none"]) == 0
    same, single = load_classifier(tmp_path / "same.ckpt").deployment_info(), members[0].deployment_info()
    for key in ("fusion", "box_method", "box_threshold", "froc_mean"):
        assert same["localisation"][key] == pytest.approx(single["localisation"][key], abs=1e-6), key
    assert same["thresholds"] == pytest.approx(single["thresholds"], abs=1e-6)

    # --tta: one run and its mirror, the flipped image's map flipped back before averaging; choices re-made
    mirrored = tmp_path / "tta" / "model.ckpt"
    assert ensemble.main([str(ckpt), "--tta", "--out", str(mirrored), "--root", str(root), "--calibration", "none"]) == 0
    tta = load_classifier(mirrored)
    assert tta.hparams.tta and tta.hparams.members == 1 and tta.deployment_info()["tta"] and not single["tta"]
    with torch.no_grad():
        plain, flipped = members[0].net.forward_maps(x), members[0].net.forward_maps(torch.flip(x, dims=[-1]))
        tta_probs, tta_maps = tta.probabilities_and_maps(x)
    fusion = tta.box_params["fusion"]
    assert torch.allclose(tta_maps, torch.sigmoid((plain[2] + torch.flip(flipped[2], dims=[-1])) / 2), atol=1e-5)
    assert torch.allclose(tta_probs, torch.sigmoid((fusion * (plain[0] + flipped[0]) + (1 - fusion) * (plain[1] + flipped[1])) / 2), atol=1e-5)

    meta = export(out, tmp_path / "ens.onnx")  # one file, both members; parity checked at batch 1 and N
    assert meta["outputs"] == ["probability", "logit", "map"] and len(meta["ensemble_of"]) == 2
    assert evaluate.main(["--ckpt", str(out), "--root", str(root), "--out", str(tmp_path / "report"), "--bootstrap", "20"]) == 0
    assert "localisation" in json.loads((tmp_path / "report" / "metrics.json").read_text())

    # refusals: other splits, one member, a classify model, an ensemble as a fine-tuning start
    other = copy_with_one_image_moved(ckpt, tmp_path / "other")
    with pytest.raises(CheckpointError, match="trained on other splits"):
        ensemble.build([ckpt, other], tmp_path / "x.ckpt", root)
    with pytest.raises(CheckpointError, match="at least two"):
        ensemble.build([ckpt], tmp_path / "x.ckpt", root)
    with pytest.raises(CheckpointError, match="named twice"):
        ensemble.build([ckpt, ckpt], tmp_path / "x.ckpt", root)
    with pytest.raises(CheckpointError, match="an ensemble of 2 networks"):
        initialise_from(FractureClassifier(**upgrade(torch.load(ckpt, map_location="cpu", weights_only=True))[0]), out, {})
    assert not (tmp_path / "x.ckpt").exists()


def test_a_classifier_beside_the_localiser_sees_its_input_pooled_and_the_fusion_is_chosen_on_validation(loc_run: tuple[Path, Path], tmp_path: Path,
                                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from fracture.train import ensemble
    from fracture.train.checkpoint import run_split
    from fracture.train.model import LocaliseNet

    root, ckpt = loc_run
    # a classify run on the localiser's preprocessing at half its size, on the same splits (same root, seed, val fraction)
    assert fit.main(loc_fit_args(root, tmp_path, "cls", "--model.net.head", "classify", "--data.image_size", "48", "--data.crop", "null",
                                 "--test_after_fit", "false", epochs=2)) == 0
    cls_ckpt = next((tmp_path / "cls").glob("best-*.ckpt"))
    out = tmp_path / "with" / "model.ckpt"
    seen: list[int] = []
    forward_maps = LocaliseNet.forward_maps
    monkeypatch.setattr(LocaliseNet, "forward_maps", lambda net, x: seen.append(len(x)) or forward_maps(net, x))
    assert ensemble.main([str(ckpt), "--classifier", str(cls_ckpt), "--out", str(out), "--root", str(root), "--calibration", "none"]) == 0
    monkeypatch.undo()
    assert sum(seen) == len(run_split(ckpt, "val")[0])  # one pass over validation makes the localiser's choices and the combined ones
    model, loc, cls = load_classifier(out), load_classifier(ckpt), load_classifier(cls_ckpt)
    paths = [str(p) for p in sorted((root / "test" / "images").glob("*.png"))[:6]]
    x = torch.from_numpy(preprocess.load_batch(paths, model.contract))
    small = torch.from_numpy(preprocess.load_batch(paths, cls.contract))
    with torch.no_grad():
        first, second, maps = model.net.forward_maps(x)
        pooled, joint, loc_maps = loc.net.forward_maps(x)
        probs, prob_maps = model.probabilities_and_maps(x)
        assert torch.allclose(first, loc.net.fuse(pooled, joint), atol=1e-5) and torch.allclose(maps, loc_maps, atol=1e-5)
        assert torch.allclose(second, cls.net(torch.nn.functional.avg_pool2d(x, 2)), atol=1e-5)
        # the pooled input is what the classifier's own contract makes from the file, to within half a pixel of
        # letterbox placement (0..255 grey levels; 1.9 on FracAtlas test images, 448 → 224 px)
        assert (torch.nn.functional.avg_pool2d(x, 2) - small).abs().mean() < 4.0
    info = model.deployment_info()
    fusion = info["localisation"]["fusion"]
    assert torch.allclose(probs, torch.sigmoid(fusion * first + (1 - fusion) * second), atol=1e-6)
    assert torch.allclose(prob_maps, torch.sigmoid(loc_maps), atol=1e-5)
    scores = {w: info["localisation"][f"val_auroc_{k}"] for k, w in (("localiser", 1.0), ("classifier", 0.0), ("mean", 0.5))}
    assert scores[fusion] == max(scores.values())  # the best of the three on validation, never on test
    side = info["classifier"]
    assert (side["factor"], side["input_size"], side["sha256"]) == (2, 48, file_sha256(cls_ckpt))
    assert side["localiser_fusion"] == loc.box_params["fusion"] and info["localisation"]["box_method"] == loc.box_params["box_method"]
    meta = export(out, tmp_path / "with.onnx")  # one input, one contract; parity of probability and map at batch 1 and N
    assert meta["outputs"] == ["probability", "logit", "map"] and meta["contract"]["image_size"] == 96 and meta["classifier"]["factor"] == 2

    # with --tta too, the localiser and the classifier both see the image and its mirror (the mirror's map flipped back)
    mirrored = tmp_path / "with-tta" / "model.ckpt"
    assert ensemble.main([str(ckpt), "--tta", "--classifier", str(cls_ckpt), "--out", str(mirrored), "--root", str(root), "--calibration", "none"]) == 0
    both = load_classifier(mirrored)
    with torch.no_grad():
        plain, flipped = both.net.forward_maps(x), both.net.forward_maps(torch.flip(x, dims=[-1]))
        tta_probs, tta_maps = both.probabilities_and_maps(x)
    both_info = both.deployment_info()
    fusion = both_info["localisation"]["fusion"]
    assert both_info["tta"] and both_info["classifier"]["factor"] == 2
    assert torch.allclose(tta_maps, torch.sigmoid((plain[2] + torch.flip(flipped[2], dims=[-1])) / 2), atol=1e-5)
    assert torch.allclose(tta_probs, torch.sigmoid((fusion * (plain[0] + flipped[0]) + (1 - fusion) * (plain[1] + flipped[1])) / 2), atol=1e-5)
    assert export(mirrored, tmp_path / "with-tta.onnx")["tta"]  # parity of probability and map, batch 1 and N

    # refusals: a classifier whose input one pooling cannot make, a localiser as classifier, other splits, fine-tuning from it
    for other in (FractureClassifier(image_size=64, resize="letterbox"), FractureClassifier(image_size=48, resize="stretch")):
        with pytest.raises(CheckpointError, match="integer fraction"):
            ensemble.classifier_factor(cls_ckpt, other, loc)
    with pytest.raises(CheckpointError, match="not a single classify network"):
        ensemble.classifier_factor(ckpt, loc, loc)
    with pytest.raises(CheckpointError, match="trained on other splits"):
        ensemble.build([ckpt], tmp_path / "x.ckpt", root, classifier=copy_with_one_image_moved(cls_ckpt, tmp_path / "moved"))
    with pytest.raises(CheckpointError, match="with a classifier"):
        initialise_from(loc, out, {})
    assert not (tmp_path / "x.ckpt").exists()


def test_ensemble_refuses_classify_models_and_is_never_trained(tiny_ckpt: Path, synth_root: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from fracture.train import ensemble
    from fracture.train.networks import SeedCNN

    copy = tmp_path / "copy" / tiny_ckpt.name
    copy.parent.mkdir()
    for f in (tiny_ckpt, tiny_ckpt.parent / "splits.csv"):
        copy.parent.joinpath(f.name).write_bytes(f.read_bytes())
    assert ensemble.main([str(tiny_ckpt), str(copy), "--out", str(tmp_path / "e.ckpt"), "--root", str(synth_root)]) == 2
    assert "not a single localise network" in capsys.readouterr().err and not (tmp_path / "e.ckpt").exists()
    with pytest.raises(ValueError, match="at least two localise networks"):
        FractureClassifier(members=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="is not trained"):
        trainer.fit(FractureClassifier(net=SeedCNN(head="localise"), members=2, image_size=64), FractureDataModule(root=str(synth_root), image_size=64, num_workers=0))

# --- data: synth, importers, dataset items ------------------------------------------------------------------------

def test_synthetic_boxes_are_off_centre_as_often_as_not(tmp_path: Path) -> None:
    central = []
    for seed in range(40):
        img, boxes = radiograph_and_boxes(np.random.default_rng(seed), True, "transverse")
        assert len(boxes) == 1
        x0, y0, x1, y1 = boxes[0]
        central.append(x0 <= 0.5 <= x1 and y0 <= 0.5 <= y1)
        assert radiograph_and_boxes(np.random.default_rng(seed), False)[1] == []
    assert 0.05 < np.mean(central) < 0.4  # the image centre is a weak guess
    write_dataset(tmp_path, n=20, seed=1)
    table = pd.read_csv(tmp_path / "train" / "annotations.csv", dtype=str, keep_default_na=False)
    assert ((table["boxes"] != "") == (table["fracture"] == "yes")).all()


def test_dataset_items_carry_masks_and_boxes_in_input_pixels(tmp_path: Path) -> None:
    write_dataset(tmp_path, n=30, seed=2)
    dm = FractureDataModule(root=str(tmp_path), image_size=64, resize="letterbox", num_workers=0, val_fraction=0.3)
    dm.setup("fit")
    ds = dm.datasets["val"]
    for i in range(len(ds)):
        x, y, m, boxes, has_boxes = ds[i]
        assert bool(has_boxes) == bool(y)
        kept = boxes[boxes[:, 0] >= 0]
        assert len(kept) == int(y) and (m.sum() > 0) == bool(y)
        if y:
            x0, y0, x1, y1 = kept[0].tolist()
            inside = m[0, int(np.ceil(y0)) : int(y1), int(np.ceil(x0)) : int(x1)]
            assert inside.mean() > 0.9 and m.sum() <= (x1 - x0 + 1) * (y1 - y0 + 1)


def test_annotation_boxes_are_validated(tmp_path: Path) -> None:
    from fracture.data.annotations import DatasetError, read_split

    write_dataset(tmp_path, n=12, seed=4)
    csv = tmp_path / "train" / "annotations.csv"
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table.loc[table["fracture"] == "no", "boxes"] = "0.1 0.1 0.2 0.2"
    table.to_csv(csv, index=False)
    with pytest.raises(DatasetError, match="not-fractured image with fracture boxes"):
        read_split(tmp_path / "train")


# --- the localise head: fit, fusion, export, predictor, evaluation ------------------------------------------------

def test_localise_fit_points_at_fractures_better_than_the_centre(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, ckpt = loc_run
    assert evaluate.main(["--ckpt", str(ckpt), "--root", str(root), "--out", str(tmp_path), "--bootstrap", "50"]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    loc = result["localisation"]
    assert loc["method"].startswith("fracture map") and loc["fractured_with_boxes"] > 10
    model, centre = loc["model"]["metrics"], loc["centre"]["metrics"]
    assert model["pointing_hit_rate"] > centre["pointing_hit_rate"] + 0.3
    assert model["froc_centre_sensitivity_at_1_fp"] > centre["froc_centre_sensitivity_at_1_fp"] + 0.2
    lo, hi = loc["model"]["ci95"]["pointing_hit_rate"]
    assert lo <= model["pointing_hit_rate"] <= hi
    assert 0 < loc["shown_boxes"] <= loc["predicted_boxes"] and {"display_sensitivity", "display_fp_per_image"} <= set(loc["model"]["ci95"])
    if model["display_fp_per_image"] <= 2:  # the boxes shown are among those the FROC counts at 2 FP/image
        assert model["display_sensitivity"] <= model["froc_centre_sensitivity_at_2_fp"] + 1e-9
    assert {"froc.png", "localisation_examples.png"} <= set(result["plots"])
    assert result["operating_points"]["default"]["metrics"]["auroc"] > 0.8
    thirds = [r for r in loc["subgroups"] if r["column"] == "lesion size"]
    assert sum(r["n"] for r in thirds) == loc["fractured_with_boxes"]  # every fractured image with boxes in one third
    assert sum(r["n"] * r["pointing_hit_rate"] for r in thirds) / loc["fractured_with_boxes"] == pytest.approx(model["pointing_hit_rate"])
    report = (tmp_path / "report.md").read_text()
    assert "## Where: localisation" in report and "shown to a reader" in report and "| lesion size | small (<" in report


def test_fusion_and_box_threshold_are_chosen_on_validation_and_stored(loc_run: tuple[Path, Path]) -> None:
    model = load_classifier(loc_run[1])
    info = model.deployment_info()
    loc = info["localisation"]
    assert info["head"] == "localise" and loc["stride"] == 8 and 0 < loc["box_threshold"] < 1
    assert loc["fusion"] in (0.0, 0.5, 1.0) and float(model.net.fusion) == loc["fusion"]
    best = max((loc[f"val_auroc_{k}"], w) for k, w in (("map", 1.0), ("joint", 0.0), ("mean", 0.5)))
    assert loc["fusion"] == best[1]


def test_onnx_map_parity_and_torch_free_boxes(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, ckpt = loc_run
    meta = export(ckpt, tmp_path / "loc.onnx")
    assert meta["outputs"] == ["probability", "logit", "map"] and meta["head"] == "localise"
    assert max(meta["parity_max_abs_diff"][k] for k in ("map_batch_1", "map_batch_8")) <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "loc.onnx"))
    x = np.stack([preprocess.load(p, Contract(image_size=96, resize="letterbox")) for p in sorted((root / "test" / "images").glob("*.png"))[:5]])[:, None].astype(np.float32)
    model = load_classifier(ckpt)
    with torch.no_grad():
        probs, maps = model.probabilities_and_maps(torch.from_numpy(x))
    p1, m1 = sess.run(["probability", "map"], {"image": x[:1]})
    pn, mn = sess.run(["probability", "map"], {"image": x})
    assert np.abs(mn - maps.numpy()).max() < 1e-4 and np.abs(m1 - maps.numpy()[:1]).max() < 1e-4 and np.abs(pn - probs.numpy()).max() < 1e-5

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "boxes.csv"
    images = root / "test" / "images"
    done = subprocess.run([sys.executable, "-c", BLOCK_TRAINING_LIBS, str(tmp_path / "loc.onnx"), str(images), "--out", str(out), "--quiet",
                           "--heatmaps", str(tmp_path / "overlays")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(out)
    assert {"box_x0", "box_y0", "box_x1", "box_y1", "box_map_peak"} <= set(rows.columns)
    assert rows["path"].nunique() == len(list(images.glob("*.png"))) and len(list((tmp_path / "overlays").glob("*.png"))) == rows["path"].nunique()
    truth = pd.read_csv(root / "test" / "annotations.csv", dtype=str, keep_default_na=False).set_index("image")["boxes"]
    hit = found = 0
    for _, r in rows.dropna(subset=["box_x0"]).iterrows():
        h, w = preprocess.read_image(r["path"]).shape
        assert 0 <= r["box_x0"] < r["box_x1"] <= w and 0 <= r["box_y0"] < r["box_y1"] <= h  # original-image pixels
        true = detection.to_pixels(detection.parse_boxes(truth[Path(r["path"]).name]), h, w)
        found += 1
        hit += any(froc.hits(tuple(r[["box_x0", "box_y0", "box_x1", "box_y1"]]), t, "centre") for t in true)
    assert found and hit / found > 0.5  # most boxes the predictor draws are on a fracture
    js = tmp_path / "boxes.json"
    subprocess.run([sys.executable, "-c", BLOCK_TRAINING_LIBS, str(tmp_path / "loc.onnx"), str(images), "--out", str(js), "--quiet"],
                   capture_output=True, text=True, env=env, timeout=120, check=True)
    records = json.loads(js.read_text())
    assert len(records) == rows["path"].nunique() and sum(len(r["boxes"]) for r in records) == found
    assert all(set(b) == {"x0", "y0", "x1", "y1", "map_peak"} for r in records for b in r["boxes"])


def test_onnx_evaluation_scores_the_same_map(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, ckpt = loc_run
    export(ckpt, tmp_path / "loc.onnx")
    for args, out in ((["--ckpt", str(ckpt)], tmp_path / "ckpt"), (["--onnx", str(tmp_path / "loc.onnx")], tmp_path / "onnx")):
        assert evaluate.main([*args, "--root", str(root), "--out", str(out), "--bootstrap", "20"]) == 0
    by_ckpt, by_onnx = (json.loads((tmp_path / d / "metrics.json").read_text())["localisation"]["model"]["metrics"] for d in ("ckpt", "onnx"))
    for key in ("pointing_hit_rate", "froc_centre_sensitivity_at_1_fp", "ap_iou25"):
        assert by_onnx[key] == pytest.approx(by_ckpt[key], abs=0.02)
    # predictions.csv carries what the report scored: fracture.compare re-scores it to the same figures, paired
    assert compare.main([str(tmp_path / "ckpt"), str(tmp_path / "onnx"), "--out", str(tmp_path / "cmp"), "--bootstrap", "50"]) == 0
    paired = json.loads((tmp_path / "cmp" / "compare.json").read_text())["measures"]
    report = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    for key in compare.MAP_MEASURES:
        assert paired[key]["a"] == pytest.approx(by_ckpt[key], abs=1e-9), key
    assert paired["auroc"]["a"] == pytest.approx(report["operating_points"]["default"]["metrics"]["auroc"], abs=1e-9)
    lo, hi = paired["froc_centre_sensitivity_at_1_fp"]["ci95"]
    assert abs(paired["froc_centre_sensitivity_at_1_fp"]["difference"]) <= 0.02 and hi - lo <= 0.05  # one model, two runtimes: a tight paired interval


def test_mirror_tta_map_is_flip_consistent_and_exports() -> None:
    torch.manual_seed(0)
    net = build_network(Contract(image_size=64), "resnet18", head="localise").eval()
    x = torch.rand(2, 1, 64, 64) * 255
    with torch.no_grad():
        _, _, maps = MirrorTTA(net).forward_maps(x)
        _, _, flipped = MirrorTTA(net).forward_maps(torch.flip(x, dims=[-1]))
    assert maps.shape == (2, 8, 8) and torch.allclose(torch.flip(flipped, dims=[-1]), maps, atol=1e-5)
    module = Deployable(MirrorTTA(net)).eval()
    assert module.output_names == ["probability", "logit", "map"]

    # with a classifier beside it: every part (map-pooled, joint, classifier logits; map) is the mean over both views
    both = MirrorTTA(WithClassifier(net, build_network(Contract(image_size=32), "seed_cnn"), 2)).eval()
    with torch.no_grad():
        parts, plain, mirror = both.forward_parts(x), both.net.forward_parts(x), both.net.forward_parts(torch.flip(x, dims=[-1]))
        fused = both.forward_maps(x)
    for k in range(3):
        assert torch.allclose(parts[k], (plain[k] + mirror[k]) / 2, atol=1e-5)
    assert torch.allclose(parts[3], (plain[3] + torch.flip(mirror[3], dims=[-1])) / 2, atol=1e-5) and torch.allclose(parts[3], fused[2])
    assert torch.allclose(fused[0], net.fuse(parts[0], parts[1]), atol=1e-5) and torch.allclose(fused[1], parts[2])


def test_int8_localise_is_checked_like_the_classifier(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, ckpt = loc_run
    export(ckpt, tmp_path / "loc.onnx")
    report = quantize_int8(tmp_path / "loc.onnx", tmp_path / "loc.int8.onnx", ckpt, root)  # on the run's validation split
    assert report["n"] > 0 and report["pointing_images"] > 0 and 0 <= report["pointing_int8"] <= 1
    lost = any(p["int8"]["sensitivity"] < p["fp32"]["sensitivity"] - 0.02 for p in report["operating_points"].values())
    assert report["kept"] == (report["auroc_drop"] <= 0.01 and report["pointing_drop"] <= 0.02 and not lost)
    if report["kept"]:
        outputs = [o.name for o in ort.InferenceSession(str(tmp_path / "loc.int8.onnx")).get_outputs()]
        assert "map" in outputs


def test_localise_refuses_archs_and_sizes_it_cannot_serve() -> None:
    from fracture.train.module import FractureClassifier

    with pytest.raises(ValueError, match="localise head is built for"):
        build_network(Contract(image_size=64), "densenet121", head="localise")
    with pytest.raises(ValueError, match="divisible by 32"):
        FractureClassifier(net=ResNet(18, head="localise"), image_size=80)


def test_compare_box_decoding_rechooses_on_validation_into_a_new_checkpoint(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, ckpt = loc_run
    before = ckpt.read_bytes()
    new = ckpt.parent / "redecoded-test.ckpt"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_box_decoding.py"), str(ckpt), "--root", str(root), "--store", str(new)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    try:
        assert done.returncode == 0, done.stderr
        assert ckpt.read_bytes() == before  # the original is left as it was
        printed = {line.split()[0]: float(line.split()[3]) for line in done.stdout.splitlines() if "mean FROC" in line}
        assert printed["chosen"] == max(printed["regions"], printed["peaks"])
        stored = load_classifier(new).deployment_info()["localisation"]
        assert stored["froc_mean"] == pytest.approx(printed["chosen"], abs=1e-3)
        assert stored["box_method"] == ("peaks" if printed["peaks"] > printed["regions"] else "regions")
        assert stored["fusion"] == load_classifier(ckpt).deployment_info()["localisation"]["fusion"]  # only the decoding changes
    finally:
        new.unlink(missing_ok=True)  # the run folder is shared by the session's other tests


def test_predictor_decodes_peaks_from_metadata_and_refuses_broken_decodings(loc_onnx: Path, loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    from test_predict import _with_metadata

    from fracture.deploy.predictor import ModelError, Predictor

    peaks = {"box_method": "peaks", "box_threshold": 0.05, "max_boxes": 2, "box_size": [0.25, 0.125], "display_threshold": 0.05}
    model = _with_metadata(loc_onnx, tmp_path / "peaks.onnx", lambda m: m["localisation"].update(peaks))
    predictor = Predictor(model)
    images = sorted((loc_run[0] / "test" / "images").glob("*.png"))[:12]
    rows = list(predictor.predict([str(p) for p in images], show_progress=False))
    assert all(not r.error and len(r.boxes) <= 2 for r in rows) and any(r.boxes for r in rows)
    cut = float(np.median([b[4] for r in rows for b in r.boxes]))  # a reader's operating point above some of them
    shown = _with_metadata(loc_onnx, tmp_path / "shown.onnx", lambda m: m["localisation"].update({**peaks, "display_threshold": cut}))
    kept = list(Predictor(shown).predict([str(p) for p in images], show_progress=False))
    assert [r.boxes for r in kept] == [[b for b in r.boxes if b[4] > cut] for r in rows] and sum(map(len, (r.boxes for r in kept))) < sum(len(r.boxes) for r in rows)
    for r in rows:
        h, w = preprocess.read_image(r.path).shape
        g = geometry(h, w, predictor.contract)
        for b in r.boxes:  # the stored size (input fractions) in original pixels, unless clipped at the border
            if 0 < b[0] and b[2] < w:
                assert b[2] - b[0] == pytest.approx(0.25 * 96 * w / g.inner_width, rel=1e-6)
            if 0 < b[1] and b[3] < h:
                assert b[3] - b[1] == pytest.approx(0.125 * 96 * h / g.inner_height, rel=1e-6)
    lacking = _with_metadata(loc_onnx, tmp_path / "lacking.onnx", lambda m: [m["localisation"].update({"box_method": "peaks"}),
                                                                          *(m["localisation"].pop(k, None) for k in ("max_boxes", "box_size"))])
    with pytest.raises(ModelError, match="lacks max_boxes, box_size"):
        Predictor(lacking)
    unknown = _with_metadata(loc_onnx, tmp_path / "unknown.onnx", lambda m: m["localisation"].update({"box_method": "blobs"}))
    with pytest.raises(ModelError, match="unknown localisation.box_method 'blobs'"):
        Predictor(unknown)
    for edit, key in (({"display_threshold": "high"}, "display_threshold"), ({**peaks, "max_boxes": 0}, "max_boxes"),
                      ({"box_threshold": 1.5}, "box_threshold"), ({**peaks, "box_size": [0.25]}, "box_size")):
        damaged = _with_metadata(loc_onnx, tmp_path / f"bad-{key}.onnx", lambda m: m["localisation"].update(edit))
        with pytest.raises(ModelError, match=f"localisation.{key} = .* is not valid"):
            Predictor(damaged)  # at load, not at the first box


def test_validation_holds_the_box_decoding_between_searches_and_logs_its_cost(loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The grid search over box decodings runs at the first validation, at a validation about to be the best, every
    N and at the last epoch; between, val/froc_mean scores the decoding held. perf/val_s and val/pointing each epoch."""
    import pandas as pd

    root, _ = loc_run
    assert fit.main(loc_fit_args(root, tmp_path, "sched", "--model.box_search_every", "3", "--best_by", "val/froc_mean", epochs=5)) == 0
    logs = pd.read_csv(tmp_path / "sched" / "metrics.csv")
    val = logs.dropna(subset=["val/froc_mean"]).set_index("epoch")
    assert list(val.index) == [0, 1, 2, 3, 4]
    searched = val["val/box_search"].astype(bool)
    assert searched[0] and searched[3] and searched[4] and not searched.all()  # first, every 3rd, last; not every one
    assert (val["perf/val_s"] > 0).all() and val["val/pointing"].between(0, 1).all()
    assert (logs.dropna(subset=["perf/train_epoch_s"])["perf/train_epoch_s"] > 0).all()
    last = load_classifier(tmp_path / "sched" / "last.ckpt")
    assert 0 <= last.box_params["froc_mean"] <= 1 and "box_method" in last.box_params


def test_region_peaks_and_the_device_pointing_game_match_their_plain_definitions() -> None:
    from fracture.boxes.detection import region_peaks
    from fracture.train.losses import pointing_hits

    rng = np.random.default_rng(3)
    for _ in range(50):
        m = rng.random((40, 30)).astype(np.float32)
        n, labels, _, _ = cv2.connectedComponentsWithStats((m > rng.uniform(0.4, 0.95)).astype(np.uint8), connectivity=8)
        want = np.full(n, -np.inf)
        np.maximum.at(want, labels.ravel(), m.ravel())
        assert np.array_equal(region_peaks(labels, m, n)[1:], want[1:])
    maps = torch.randn(16, 12, 12)
    boxes = torch.full((16, 3, 4), -1.0)
    for i in range(0, 16, 2):  # half the images have one or two boxes
        for j in range(1 + i % 4 // 2):
            x0, y0 = rng.uniform(0, 70, 2)
            boxes[i, j] = torch.tensor([x0, y0, x0 + rng.uniform(8, 40), y0 + rng.uniform(8, 40)])
    rate, counted = pointing_hits(maps, boxes, 8.0)
    hits = []
    for m, b in zip(maps.numpy(), boxes.numpy()):
        b = b[b[:, 0] >= 0]
        if len(b):
            r, c = np.unravel_index(m.argmax(), m.shape)
            cx, cy = (c + 0.5) * 8, (r + 0.5) * 8
            hits.append(any(x0 <= cx < x1 and y0 <= cy < y1 for x0, y0, x1, y1 in b))
    assert counted == len(hits) == 8 and float(rate) == pytest.approx(np.mean(hits))
