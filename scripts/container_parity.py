"""Does a model's answer depend on the file container? The same pixels as PNG, JPEG q100, TIFF and DICOM.

    python scripts/container_parity.py MODEL.onnx IMAGES_DIR [--min-side 896] [--limit N]

Each image at least ``--min-side`` px on its longer side (where reduced decoding applies) is decoded once
through the gate, written in memory as the four containers and predicted from each; prints the largest
|Δp| between containers per image, then the maximum, 99th percentile and median over all images.
Needs the dicom extra for the DICOM container.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from fracture.data.synth import dicom_bytes
from fracture.deploy.predictor import Predictor
from fracture.imaging import preprocess
from fracture.progress import progress


def containers(img: np.ndarray) -> dict[str, bytes]:
    return {".png": cv2.imencode(".png", img)[1].tobytes(), ".jpg": cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes(),
            ".tiff": cv2.imencode(".tiff", img)[1].tobytes(), ".dcm": dicom_bytes(*img.shape, img.tobytes(), "1.2.840.10008.1.2.1", bits=8)}


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/container_parity.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--min-side", type=int, default=896)
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    ns = parser.parse_args(args)
    predictor = Predictor(ns.model)
    paths = sorted(p for p in ns.images.rglob("*") if preprocess.is_image_file(p))
    spreads, names = [], []
    for path in progress(paths, desc="containers"):
        try:
            img = preprocess.read_image(path)
        except preprocess.ImageError:
            continue
        if max(img.shape) < ns.min_side:
            continue
        inputs = [preprocess.load_bytes(data, f"x{suffix}", predictor.contract)[0] for suffix, data in containers(img).items()]
        probs = predictor.run(inputs, maps=False)[0]
        spreads.append(float(probs.max() - probs.min()))
        names.append(path.name)
        if ns.limit and len(spreads) >= ns.limit:
            break
    if not spreads:
        print("no image at least --min-side px")
        return 1
    s = np.array(spreads)
    worst = int(s.argmax())
    print(f"{len(s)} images >= {ns.min_side} px; max |Δp| between PNG, JPEG q100, TIFF and DICOM: {s.max():.4f} ({names[worst]}); "
          f"99th percentile {np.percentile(s, 99):.4f}; median {np.median(s):.4f}; over 0.02: {int((s > 0.02).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
