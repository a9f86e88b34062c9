"""Heatmaps on the original radiograph, and how well they point at fractures (torch-free).

Shared by ``fracture.explain`` (torch Grad-CAM) and ``fracture.predict``
(heatmap output of the ONNX graph), so overlays and scores are made one way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np

from fracture.boxes.detection import peak_label, to_pixels, yolo_to_boxes
from fracture.imaging.contract import Contract, geometry


def to_original(cam: np.ndarray, height: int, width: int, contract: Contract) -> np.ndarray:
    """Low-res map over the model input → map over the original image (undoes stretch or letterbox)."""
    size = contract.image_size
    full = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    g = geometry(height, width, contract)
    inner = full[g.top : g.top + g.inner_height, g.left : g.left + g.inner_width]
    return cv2.resize(inner, (width, height), interpolation=cv2.INTER_LINEAR)


def normalise(cam: np.ndarray) -> np.ndarray:
    """Scale to 0..1 by the image's own maximum (a map of where, not how much)."""
    cam = np.maximum(cam, 0)
    top = float(cam.max())
    return cam / top if top > 0 else cam


def draw_boxes(img: np.ndarray, boxes: list, colour: tuple[int, int, int], scores: bool = True) -> None:
    """Rectangles (x0, y0, x1, y1[, map peak]) in place, the map peak named above each."""
    scale = max(img.shape[:2]) / 600
    for b in boxes:
        p0, p1 = (int(round(b[0])), int(round(b[1]))), (int(round(b[2])) - 1, int(round(b[3])) - 1)
        cv2.rectangle(img, p0, p1, colour, max(1, int(2 * scale)), cv2.LINE_AA)
        if scores and len(b) > 4:
            cv2.putText(img, peak_label(b[4]), (p0[0], max(p0[1] - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, colour, max(1, int(scale)), cv2.LINE_AA)


def dashed_rectangle(img: np.ndarray, a: tuple[int, int], b: tuple[int, int], colour: tuple[int, int, int], thick: int) -> None:
    """A rectangle of dashes (OpenCV draws solid lines only), in place."""
    dash = max(4, 4 * thick)
    for (u0, v0), (u1, v1) in (((a[0], a[1]), (b[0], a[1])), ((b[0], a[1]), (b[0], b[1])), ((b[0], b[1]), (a[0], b[1])), ((a[0], b[1]), (a[0], a[1]))):
        n = max(1, int(np.hypot(u1 - u0, v1 - v0) // dash))
        for k in range(0, n, 2):
            s, e = k / n, min(1.0, (k + 1) / n)
            cv2.line(img, (int(u0 + (u1 - u0) * s), int(v0 + (v1 - v0) * s)), (int(u0 + (u1 - u0) * e), int(v0 + (v1 - v0) * e)), colour, thick)


def panel(image: np.ndarray, cam: np.ndarray | None, boxes: list | None = None, alpha: float = 0.4, truth: list | None = None,
          absolute: bool = False) -> np.ndarray:
    """One BGR picture: the radiograph, the heatmap blended over it when there is one, ``truth`` (green) and ``boxes`` (white).

    ``absolute``: ``cam`` is a probability per pixel (a fracture map); it is coloured on the fixed 0..1 scale and
    blended in proportion, so a map that is low everywhere leaves the radiograph nearly plain instead of
    painting its own maximum hot. Otherwise (Grad-CAM, no scale) it is scaled by its own maximum.
    """
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if cam is not None:
        level = np.clip(cam, 0, 1) if absolute else normalise(cam)
        colour = cv2.applyColorMap(np.rint(level * 255).astype(np.uint8), cv2.COLORMAP_JET)
        weight = (alpha * np.sqrt(level))[..., None] if absolute else alpha
        out = np.clip(np.rint(colour * weight + out * (1 - weight)), 0, 255).astype(np.uint8)
    draw_boxes(out, truth or [], (0, 200, 0), scores=False)
    draw_boxes(out, boxes or [], (255, 255, 255))
    return out


def overlay(image: np.ndarray, cam: np.ndarray, probability: float, alpha: float = 0.4, boxes: list | None = None, truth: list | None = None,
            absolute: bool = False) -> np.ndarray:
    """Side by side: the plain radiograph and the heatmap blended over it, probability in the corner (BGR).

    ``boxes`` (predicted, white) and ``truth`` (green) are drawn on the heatmap side.
    """
    gray = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    blend = panel(image, cam, boxes, alpha, truth, absolute)
    scale = max(image.shape) / 600
    text = f"p(fracture) = {probability:.3f}"
    for img in (blend,):
        cv2.putText(img, text, (int(10 * scale) + 2, int(30 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (0, 0, 0), max(2, int(3 * scale)), cv2.LINE_AA)
        cv2.putText(img, text, (int(10 * scale), int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
    return np.hstack([gray, blend])


def write_overlay(out_dir: str | os.PathLike, source: str, image: np.ndarray, cam_full: np.ndarray, probability: float, boxes: list | None = None,
                  absolute: bool = False) -> Path:
    # the stem alone would let two folders' IMG001.jpg overwrite each other: add a short hash of the full path
    tag = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:8]
    out = Path(out_dir) / f"{Path(source).stem}_{tag}_heatmap.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), overlay(image, cam_full, probability, boxes=boxes, absolute=absolute))
    return out


def read_yolo_boxes(label_file: str | os.PathLike, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """YOLO ``class cx cy w h`` (normalised) → pixel boxes (x0, y0, x1, y1); none when the file is absent or empty."""
    path = Path(label_file)
    if not path.is_file():
        return []
    return [tuple(int(round(v)) for v in b) for b in to_pixels(yolo_to_boxes(path.read_text()), height, width)]


def box_mask(boxes: list[tuple[int, int, int, int]], height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return mask


def pointing(cam_full: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Pointing-game hit (the map's maximum lies in a box) and the share of the map's mass inside boxes."""
    y, x = np.unravel_index(int(np.argmax(cam_full)), cam_full.shape)
    mass = np.maximum(cam_full, 0)
    total = float(mass.sum())
    return {"hit": float(mask[y, x]), "mass_in_boxes": float(mass[mask].sum() / total) if total > 0 else float("nan")}


def centre_map(height: int, width: int) -> np.ndarray:
    """The centre-point baseline: a Gaussian blob in the middle of the image."""
    yy, xx = np.mgrid[0:height, 0:width]
    sigma = 0.15 * max(height, width)
    return np.exp(-(((yy - height / 2) ** 2 + (xx - width / 2) ** 2) / (2 * sigma**2)))


def baselines(mask: np.ndarray) -> dict[str, dict[str, float]]:
    """Centre-point and random baselines for one image (random: expected values, exact)."""
    h, w = mask.shape
    share = float(mask.mean())
    return {"centre": pointing(centre_map(h, w), mask), "random": {"hit": share, "mass_in_boxes": share}}
