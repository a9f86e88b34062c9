"""Procedural radiographs in the dataset format, so everything runs with no download.

Each image shows soft tissue and one or two long bones (bright cortex, darker
medullary canal) under varying exposure, blur, quantum-like noise, rotation and
position. Fractured images carry a fracture of a recorded type (transverse,
oblique, comminuted, displaced) and its true box (the ``boxes`` column); half
the fractures sit near the bone's middle, half far along the shaft, so the
image centre is a weak guess of where. The fracture is a thin local structure,
so global intensity statistics barely separate the classes (tested) while a
CNN learns the task. Torch-free and deterministic for a seed.

    python -m fracture.synth --out data/synthetic --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fracture.boxes.detection import Box, format_boxes
from fracture.progress import progress

FRACTURE_TYPES = ("transverse", "oblique", "comminuted", "displaced")


@dataclass
class Bone:
    cx: float
    cy: float
    angle: float  # radians, bone axis direction
    length: float
    width: float
    cortex: float


def _bone_frame(shape: tuple[int, int], bone: Bone) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates along (u) and across (v) the bone axis."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dx, dy = xx - bone.cx, yy - bone.cy
    c, s = np.cos(bone.angle), np.sin(bone.angle)
    return dx * c + dy * s, -dx * s + dy * c


def _draw_bone(u: np.ndarray, v: np.ndarray, bone: Bone, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation of one bone and its mask; the ends flare like metaphyses."""
    half = bone.length / 2
    t = np.clip(np.abs(u) / half, 0, 1.5)
    flare = 1.0 + 0.35 * np.clip((t - 0.75) / 0.25, 0, 1) ** 2
    radius = bone.width / 2 * flare * (1 + 0.04 * np.sin(u / bone.length * rng.uniform(4, 9)))
    inside = (np.abs(v) <= radius) & (np.abs(u) <= half)
    canal = np.abs(v) <= radius - bone.cortex * (1.0 - 0.5 * np.clip(t - 0.7, 0, 1))
    att = np.where(inside, 1.0, 0.0) * np.where(canal, rng.uniform(0.50, 0.62), 1.0)
    # rounded ends
    end = (np.abs(u) > half - bone.width * 0.3) & inside
    att = np.where(end, att * np.clip((half - np.abs(u)) / (bone.width * 0.3) * 0.5 + 0.5, 0.4, 1.0), att)
    return att.astype(np.float32), inside


def _line_mask(u: np.ndarray, v: np.ndarray, u0: float, slope: float, width: float, jag: np.ndarray) -> np.ndarray:
    """Soft mask of a jagged fracture line u = u0 + slope * v across the bone."""
    wiggle = np.interp(v, np.linspace(v.min(), v.max(), jag.size), jag)
    dist = np.abs(u - (u0 + slope * v + wiggle)) / np.sqrt(1 + slope**2)
    return np.clip(1.0 - (dist - width / 2), 0.0, 1.0)


def _fracture(u: np.ndarray, v: np.ndarray, bone: Bone, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gap mask, u-shift, v-shift) of a fracture of ``kind`` in bone coordinates."""
    near_middle = rng.random() < 0.5
    u0 = rng.choice([-1, 1]) * (rng.uniform(0.0, 0.08) if near_middle else rng.uniform(0.15, 0.36)) * bone.length
    width = rng.uniform(3.5, 6.0)
    jag = rng.normal(0, 0.8, 12)
    slopes = {
        "transverse": [rng.normal(0, 0.15)],
        "oblique": [rng.choice([-1, 1]) * rng.uniform(0.7, 1.6)],
        "displaced": [rng.normal(0, 0.5)],
        "comminuted": [rng.uniform(-1.2, 1.2), rng.uniform(-1.2, 1.2), rng.normal(0, 0.3)],
    }[kind]
    gap = np.zeros_like(u)
    for k, slope in enumerate(slopes):
        offset = u0 + k * rng.uniform(-0.6, 0.6) * bone.width
        gap = np.maximum(gap, _line_mask(u, v, offset, slope, width, jag + rng.normal(0, 0.6, 12)))
    du = np.zeros_like(u)
    dv = np.zeros_like(u)
    if kind == "displaced":
        beyond = u > u0 + slopes[0] * v
        dv = np.where(beyond, rng.choice([-1, 1]) * rng.uniform(0.2, 0.45) * bone.width, 0.0)
        du = np.where(beyond, rng.uniform(1.0, 3.0), 0.0)
    return gap.astype(np.float32), du.astype(np.float32), dv.astype(np.float32)


def radiograph(rng: np.random.Generator, fractured: bool, kind: str = "", shape: tuple[int, int] | None = None, anatomy: dict | None = None) -> np.ndarray:
    """One synthetic radiograph as a float image in [0, 1]; ``anatomy`` fixes a patient's bones across views."""
    return radiograph_and_boxes(rng, fractured, kind, shape, anatomy)[0]


def radiograph_and_boxes(rng: np.random.Generator, fractured: bool, kind: str = "", shape: tuple[int, int] | None = None,
                         anatomy: dict | None = None) -> tuple[np.ndarray, list[Box]]:
    """A synthetic radiograph and the normalised box around its fracture (none when not fractured)."""
    if shape is None:
        shape = (int(rng.integers(280, 360)), int(rng.integers(240, 330)))
    h, w = shape
    anatomy = anatomy or {"n_bones": int(rng.choice([1, 2], p=[0.6, 0.4])), "width": rng.uniform(0.10, 0.16), "tissue": rng.uniform(0.45, 0.7)}
    base_angle = np.pi / 2 + rng.normal(0, 0.35)
    # soft tissue: a blurred band around the limb axis
    limb = Bone(w / 2 + rng.normal(0, 0.06 * w), h / 2 + rng.normal(0, 0.05 * h), base_angle, 2.2 * h, anatomy["tissue"] * w, 1.0)
    u, v = _bone_frame(shape, limb)
    tissue = np.clip(1.0 - (np.abs(v) / (limb.width / 2)) ** 4, 0, 1) * rng.uniform(0.25, 0.4)
    density = tissue.astype(np.float32)
    bones: list[Bone] = []
    for i in range(anatomy["n_bones"]):
        offset = (i - (anatomy["n_bones"] - 1) / 2) * anatomy["width"] * w * rng.uniform(1.3, 1.8)
        bw = anatomy["width"] * w * (1.0 if i == 0 else rng.uniform(0.6, 0.85))
        bones.append(
            Bone(
                limb.cx + offset * np.cos(base_angle + np.pi / 2),
                limb.cy + offset * np.sin(base_angle + np.pi / 2) + rng.normal(0, 0.05 * h),
                base_angle + rng.normal(0, 0.05),
                rng.uniform(0.65, 1.1) * h,
                bw,
                bw * rng.uniform(0.18, 0.3),
            )
        )
    broken = int(rng.integers(len(bones))) if fractured else -1
    boxes: list[Box] = []
    for i, bone in enumerate(bones):
        u, v = _bone_frame(shape, bone)
        gap = None
        if i == broken:
            gap, du, dv = _fracture(u, v, bone, kind, rng)
            u, v = u - du, v - dv
        att, inside = _draw_bone(u, v, bone, rng)
        if gap is not None:
            att = att * (1.0 - rng.uniform(0.85, 1.0) * gap)
            ys, xs = np.nonzero((gap > 0.5) & inside)
            if xs.size:
                pad = 3.0
                boxes.append((max(xs.min() - pad, 0) / w, max(ys.min() - pad, 0) / h, min(xs.max() + 1 + pad, w) / w, min(ys.max() + 1 + pad, h) / h))
        density += att * rng.uniform(0.55, 0.75)
    # skin folds and a side marker: dark/bright structures unrelated to the label
    for _ in range(int(rng.integers(0, 3))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        fold = np.zeros(shape, np.float32)
        cv2.line(fold, p1, p2, 1.0, int(rng.integers(1, 3)), cv2.LINE_AA)
        density -= fold * tissue * rng.uniform(0.2, 0.5)
    if rng.random() < 0.5:
        x0, y0 = int(rng.integers(5, w - 30)), int(rng.integers(5, h - 30))
        marker = np.zeros(shape, np.uint8)
        cv2.putText(marker, "LR"[int(rng.integers(2))], (x0, y0 + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 255, 2)
        density = np.maximum(density, marker.astype(np.float32) / 255 * 1.2)
    # exposure: heel-effect gradient, gain, gamma, blur, quantum noise
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    density *= 1.0 + rng.uniform(-0.15, 0.15) * yy
    img = 0.04 + rng.uniform(0.55, 0.85) * density
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.1))
    photons = rng.uniform(150, 600)
    img = rng.poisson(np.clip(img, 0, 1) * photons) / photons
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    return np.clip(img, 0, 1).astype(np.float32), boxes


def dicom_bytes(rows: int, cols: int, pixel_data: bytes, syntax: str, samples: int = 1, bits: int = 16,
                photometric: str = "MONOCHROME2", encapsulated: bool = False, sop_class: str = "1.2.840.10008.5.1.4.1.1.1.1",
                bits_stored: int | None = None, **tags: object) -> bytes:
    """A DICOM radiograph (DX for presentation unless ``sop_class`` says) with the given pixel data (encapsulated:
    one frame, one fragment): the one writer of generated DICOM for tests, hostile inputs, release records and
    the node's benchmark. Needs pydicom (the dicom extra)."""
    import io

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "DX", "anon", generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, samples, photometric
    stored = bits_stored or bits
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = encapsulate([pixel_data]) if encapsulated else pixel_data
    if encapsulated:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_dataset(out: str | Path, n: int = 1000, seed: int = 0, test_fraction: float = 0.2, positive_fraction: float = 0.5) -> dict[str, int]:
    """Write ``n`` images as ``out/{train,test}/images`` + ``annotations.csv``; returns images per split.

    Patients get one or two views sharing anatomy and label; a patient never
    straddles train and test. About one image in six is a 16-bit PNG.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    patient = 0
    made = 0
    bar = iter(progress(range(n), total=n, desc="synth"))
    while made < n:
        split = "test" if rng.random() < test_fraction else "train"
        fractured = bool(rng.random() < positive_fraction)
        kind = str(rng.choice(FRACTURE_TYPES)) if fractured else ""
        anatomy = {"n_bones": int(rng.choice([1, 2], p=[0.6, 0.4])), "width": rng.uniform(0.10, 0.16), "tissue": rng.uniform(0.45, 0.7)}
        views = min(int(rng.choice([1, 2])), n - made)
        view_seed = int(rng.integers(2**31))
        for view in range(views):
            img, boxes = radiograph_and_boxes(np.random.default_rng([view_seed, view]), fractured, kind, anatomy=anatomy)
            folder = out / split / "images"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"p{patient:05d}_v{view}.png"
            if rng.random() < 1 / 6:
                cv2.imwrite(str(folder / name), np.rint(img * 65535).astype(np.uint16))
            else:
                cv2.imwrite(str(folder / name), np.rint(img * 255).astype(np.uint8))
            rows[split].append(
                {"image": name, "fracture": "yes" if fractured else "no", "fracture_type": kind or "none", "patient_id": f"p{patient:05d}",
                 "study_id": f"s{patient:05d}", "view": "AP" if view == 0 else "lateral", "boxes": format_boxes(boxes)}
            )
            made += 1
            next(bar, None)
        patient += 1
    for _ in bar:
        pass
    for split, split_rows in rows.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        with open(out / split / "annotations.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "fracture", "fracture_type", "patient_id", "study_id", "view", "boxes"])
            writer.writeheader()
            writer.writerows(split_rows)
    return {split: len(r) for split, r in rows.items()}


def write_jpegs(folder: str | Path, n: int, shape: tuple[int, int] | None = None, seed: int = 0) -> list[str]:
    """``n`` radiographs as JPEG files for benchmarks: ``shape`` (height, width), or about 450x400 px each when None."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        size = shape or (int(rng.integers(430, 470)), int(rng.integers(380, 420)))
        img = radiograph(rng, i % 2 == 1, "transverse", shape=size)
        path = folder / f"img{i:04d}.jpg"
        cv2.imwrite(str(path), np.rint(img * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 92])
        paths.append(str(path))
    return paths


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="dataset root to write (default: data/synthetic)")
    parser.add_argument("--n", type=int, default=1000, help="number of images (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same images (default: 0)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in test/ (default: 0.2)")
    parser.add_argument("--positive-fraction", type=float, default=0.5, help="share of fractured patients (default: 0.5)")
    ns = parser.parse_args(args)
    if ns.n < 4:
        parser.error("--n must be at least 4")
    counts = write_dataset(ns.out, ns.n, ns.seed, ns.test_fraction, ns.positive_fraction)
    print(f"wrote {sum(counts.values())} synthetic radiographs to {ns.out} ({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
