"""A shipped model's answers, recorded when it is released and checked ever after (CI does it on every change).

    python -m fracture.release record exports/fracatlas-v2.onnx --out tests/release/fracatlas-v2.json
    python -m fracture.release check exports/fracatlas-v2.onnx tests/release/fracatlas-v2.json

The inputs are generated, not stored: synthetic radiographs (``fracture.synth``, seeded) written as 8-bit
and 16-bit PNG, JPEG (one carrying an EXIF orientation, one large enough for reduced decoding), TIFF, BMP
and DICOM (MONOCHROME1, 16-bit windowed, JPEG 2000), so every deployed decode path (decode, orientation,
resize, network, map decoding) is exercised. Any change to preprocessing or decoding that would
change a shipped model's answers beyond the stated tolerances fails ``check``. The tolerances cover what
differs between CPUs (INT8 kernels on AVX2 and AVX-512/VNNI machines sum in other orders; numpy and OpenCV
builds differ in the last bits): docs/release.md says how they were measured. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fracture.data.synth import radiograph
from fracture.deploy import metadata
from fracture.deploy.metadata import file_sha256 as sha256
from fracture.deploy.predictor import Predictor

TOLERANCE = {
    "probability": 0.02,  # absolute, per image
    "map": 0.05,  # absolute, per cell of the map mean-pooled to about 7 x 7
    "box_iou": 0.5,  # each recorded box above SHOWN must meet a current one at least this well
}
SHOWN = 0.5  # boxes scoring above this are compared (lower ones come and go with rounding)


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """A JPEG with an APP1 EXIF block holding only the orientation tag."""
    tiff = b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1, orientation) + struct.pack("<I", 0)
    app1 = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


KINDS = [("png8", True), ("png8", False), ("png16", True), ("jpeg", False), ("jpeg", True), ("exif6", True),
         # every other decode path (added to v1's record after its release; the first six are unchanged):
         ("jpeg-large", True), ("tiff", True), ("bmp", False), ("dcm-mono1", True), ("dcm-16bit-window", False), ("dcm-j2k", True)]
SUFFIX = {"png8": "png", "png16": "png", "tiff": "tiff", "bmp": "bmp"}
LARGE = (1800, 1500)  # a reduced-decode contract at 448 px takes libjpeg's 1/4 scale on this


def write_file(path: Path, img: np.ndarray, kind: str) -> None:
    """One picture (floats in 0..1) as one of the recorded file kinds."""
    pixels = np.rint(img * 255).astype(np.uint8)
    if kind == "png16":
        cv2.imwrite(str(path), np.rint(img * 65535).astype(np.uint16))
    elif kind in ("png8", "tiff", "bmp"):
        cv2.imwrite(str(path), pixels)
    elif kind.startswith("dcm"):
        from fracture.data.synth import dicom_bytes

        rows, cols = pixels.shape
        if kind == "dcm-mono1":
            data = dicom_bytes(rows, cols, (255 - pixels).tobytes(), "1.2.840.10008.1.2.1", bits=8, photometric="MONOCHROME1")
        elif kind == "dcm-16bit-window":  # stored 0..65535, shown through a window over 4096..61440
            stored = np.rint(4096 + img * 57344).astype(np.uint16)
            data = dicom_bytes(rows, cols, stored.tobytes(), "1.2.840.10008.1.2.1", WindowCenter=32768, WindowWidth=57345)
        else:
            jp2 = cv2.imencode(".jp2", pixels, [cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, 1000])[1].tobytes()
            data = dicom_bytes(rows, cols, jp2[jp2.index(b"\xff\x4f\xff\x51"):], "1.2.840.10008.1.2.4.90", bits=8, encapsulated=True)
        path.write_bytes(data)
    else:
        if kind == "exif6":  # stored turned a quarter left; the viewer (and preprocess) turns it back
            pixels = np.ascontiguousarray(np.rot90(pixels))
        data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        path.write_bytes(with_exif_orientation(data, 6) if kind == "exif6" else data)


def write_inputs(folder: Path, seed: int = 2026) -> list[str]:
    """The fixed set of generated radiographs the record is made on: fractured and not, every decode path
    (8- and 16-bit PNG, JPEG, EXIF-turned JPEG, a large JPEG through reduced decoding, TIFF, BMP, DICOM
    MONOCHROME1, 16-bit windowed and JPEG 2000)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (kind, fractured) in enumerate(KINDS):
        img = radiograph(rng, fractured, "oblique" if fractured else "", shape=LARGE if kind == "jpeg-large" else (460, 380))
        path = folder / f"{i}-{kind}.{SUFFIX.get(kind, 'dcm' if kind.startswith('dcm') else 'jpg')}"
        write_file(path, img, kind)
        paths.append(str(path))
    return paths


def pooled(prob_map: np.ndarray, cells: int = 7) -> np.ndarray:
    """The map mean-pooled to about ``cells`` x ``cells``: where it points, without single-cell rounding noise."""
    h, w = prob_map.shape
    return cv2.resize(prob_map.astype(np.float32), (cells, max(1, round(cells * h / w))), interpolation=cv2.INTER_AREA)


def answers(model: str | Path, paths: list[str]) -> list[dict[str, Any]]:
    """What the model says about each file: probability, pooled map and boxes (original pixels)."""
    out = []
    for row in Predictor(model).predict(paths, show_progress=False, keep_maps=True):
        if row.error:
            raise ValueError(f"{row.path}: {row.error}")
        item: dict[str, Any] = {"file": Path(row.path).name, "size": list(row.size), "probability": float(row.probability)}
        if row.raw_map is not None:
            item["map"] = np.round(pooled(row.raw_map), 5).tolist()
            item["boxes"] = [[round(float(v), 2) for v in b] for b in (row.boxes or [])]
        out.append(item)
    return out


def record(model: str | Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return {"model": Path(model).name, "sha256": sha256(model), "answers": answers(model, write_inputs(Path(tmp)))}


def _iou(a: list[float], b: list[float]) -> float:
    ix, iy = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def differences(recorded: dict[str, Any], now: list[dict[str, Any]], tol: dict[str, float] = TOLERANCE, shown: float = SHOWN) -> list[str]:
    """Every way ``now`` departs from ``recorded`` beyond the tolerances ``tol`` (empty: the same answers).

    The tolerances come from the code (or the test) that guards the record, never from the record itself. Boxes
    are matched both ways: a recorded box that is gone fails, and so does a new one."""
    problems = []
    if [a["file"] for a in recorded["answers"]] != [a["file"] for a in now]:
        return [f"the generated inputs changed: {[a['file'] for a in now]}"]
    for old, new in zip(recorded["answers"], now):
        name = old["file"]
        if old["size"] != new["size"]:
            problems.append(f"{name}: original size {new['size']}, recorded {old['size']} (decoding or orientation changed)")
            continue
        dp = abs(old["probability"] - new["probability"])
        if dp > tol["probability"]:
            problems.append(f"{name}: probability {new['probability']:.4f}, recorded {old['probability']:.4f} (|Δ| {dp:.4f} > {tol['probability']})")
        if "map" in old:
            a, b = np.asarray(old["map"]), np.asarray(new.get("map", np.zeros_like(old["map"])))
            dm = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
            if dm > tol["map"]:
                problems.append(f"{name}: the map moved (max |Δ| {dm:.4f} over the pooled cells > {tol['map']})")
            for mine, theirs, what in ((old["boxes"], new.get("boxes", []), "is gone"), (new.get("boxes", []), old["boxes"], "is new")):
                for box in (b for b in mine if b[4] > shown):
                    best = max((_iou(box, c) for c in theirs), default=0.0)
                    if best < tol["box_iou"]:
                        problems.append(f"{name}: box {box[:4]} (score {box[4]:.2f}) {what} (best IoU with the other side {best:.2f} < {tol['box_iou']})")
    return problems


def check(model: str | Path, recorded: dict[str, Any], tol: dict[str, float] = TOLERANCE) -> list[str]:
    if sha256(model) != recorded["sha256"]:
        return [f"{model}: sha256 {sha256(model)} is not the released file's {recorded['sha256']}"]
    with tempfile.TemporaryDirectory() as tmp:
        return differences(recorded, answers(model, write_inputs(Path(tmp))), tol)


def stamp(model: Path, out: Path, name: str, card: str, commit: str) -> dict[str, Any]:
    """A copy of ``model`` whose metadata names the release, its card and the commit that trained it."""
    release = {"name": name, "card": card, "training_commit": commit, "source_sha256": sha256(model)}
    metadata.write(model, out, Predictor(model).meta.replace(release=release))
    return release


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.release", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record a model's answers on the generated inputs (once, when it is released)")
    rec.add_argument("model", type=Path)
    rec.add_argument("--out", type=Path, required=True)
    st = sub.add_parser("stamp", help="write the release's name, card and training commit into a copy of the model's metadata")
    st.add_argument("model", type=Path)
    st.add_argument("--out", type=Path, required=True)
    st.add_argument("--name", required=True)
    st.add_argument("--card", required=True, help="the model card's path in the repository")
    st.add_argument("--commit", required=True, help="the commit whose code trained the model")
    chk = sub.add_parser("check", help="the model's answers now against the record; exit 1 on any difference beyond tolerance")
    chk.add_argument("model", type=Path)
    chk.add_argument("record", type=Path)
    ns = parser.parse_args(args)
    try:
        if ns.command == "stamp":
            print(f"{ns.out}: {stamp(ns.model, ns.out, ns.name, ns.card, ns.commit)}")
            return 0
        if ns.command == "record":
            ns.out.parent.mkdir(parents=True, exist_ok=True)
            ns.out.write_text(json.dumps(record(ns.model), indent=1) + "\n")
            print(f"recorded {ns.model} → {ns.out}")
            return 0
        problems = check(ns.model, json.loads(ns.record.read_text()))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    print(f"{ns.model}: {'differs from' if problems else 'matches'} {ns.record}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
