"""The picture in docs/deployment.md ("In a PACS"): what a viewer shows of the node's Secondary Capture.

    python scripts/node_picture.py MODEL.onnx OUT.png [--seed 3] [--size 1024]

Writes a synthetic fractured radiograph as a 12-bit DX (``fracture.data.synth``; no patient's image), answers
it with ``python -m fracture.predict MODEL --dicom-out`` exactly as the node does, and saves the Secondary
Capture's pixels as a PNG (scaled to at most 900 px). Needs ``fracture[pacs]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/node_picture.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    ns = parser.parse_args(args)
    import pydicom
    from pydicom.uid import generate_uid

    from fracture.data.synth import dicom_bytes, radiograph_and_boxes
    from fracture.deploy import predict

    picture = radiograph_and_boxes(np.random.default_rng(ns.seed), True, "displaced", shape=(ns.size, int(ns.size * 0.8)))[0]
    stored = np.rint(picture * 4095).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "synthetic.dcm"
        source.write_bytes(dicom_bytes(*stored.shape, stored.tobytes(), "1.2.840.10008.1.2.1", bits_stored=12, WindowCenter=2048, WindowWidth=4096,
                                       StudyInstanceUID=generate_uid(), PatientName="Synthetic^Example"))
        predict.main([str(ns.model), str(source), "--dicom-out", str(Path(tmp) / "answer"), "--quiet"])
        captures = sorted((Path(tmp) / "answer").glob("SC-*.dcm"))
        if not captures:
            print("error: no Secondary Capture was written", file=sys.stderr)
            return 1
        rgb = pydicom.dcmread(captures[0]).pixel_array
    scale = min(1.0, 900 / max(rgb.shape[:2]))
    shown = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(ns.out), cv2.cvtColor(shown, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {ns.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
