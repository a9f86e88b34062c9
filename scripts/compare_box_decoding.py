"""Which box decoding suits a localise checkpoint? Scores both on its run's validation split.

    python scripts/compare_box_decoding.py checkpoints/RUN/best-….ckpt [--root DATA] [--store NEW.ckpt]

Prints the best ``regions`` decoding, the best ``peaks`` decoding and the one training would store
(``fracture.selection.choose_box_decoding``), each with its mean FROC sensitivity (centre hit) at
0.5 / 1 / 2 false positives per image. Validation only: the test split is never looked at.
``--store`` writes a copy of the checkpoint carrying the chosen decoding (for checkpoints trained
before ``peaks`` existed); the original is left as it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import yaml

from fracture.boxes import detection
from fracture.data.annotations import DatasetError
from fracture.scoring import selection
from fracture.train.checkpoint import CheckpointError, load_classifier
from fracture.train.validation import validation_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--root", type=Path, help="dataset root (default: data.root of the run's config.yaml)")
    parser.add_argument("--store", type=Path, help="write a copy of the checkpoint with the chosen decoding here")
    ns = parser.parse_args()
    if ns.store and ns.store.resolve() == ns.ckpt.resolve():
        parser.error("--store must name a new file: the original checkpoint is kept as it was")
    root = ns.root or Path(yaml.safe_load((ns.ckpt.parent / "config.yaml").read_text())["data"]["root"])
    model = load_classifier(ns.ckpt)
    try:
        items = validation_items(model, ns.ckpt, root)
    except (CheckpointError, DatasetError) as exc:
        parser.error(str(exc))
    size = model.contract.image_size
    inputs = [cv2.resize(it[2], (size, size), interpolation=cv2.INTER_LINEAR) for it in items]
    truths = [it[3] for it in items]
    regions = selection.choose_box_decoding(inputs, truths, peak_thresholds=())
    stored = selection.choose_box_decoding(inputs, truths)
    peaks = selection.choose_box_decoding(inputs, truths, thresholds=(), min_areas=())
    print(f"validation: {len(items)} images, {sum(map(bool, truths))} with boxes ({sum(map(len, truths))} boxes)")
    for name, chosen in (("regions", regions), ("peaks", peaks), ("chosen", stored)):
        print(f"{name:8s} mean FROC {chosen['froc_mean']:.3f}  {chosen}")
    if ns.store:
        import torch

        checkpoint = torch.load(ns.ckpt, map_location="cpu", weights_only=False)
        kept = {k: v for k, v in checkpoint["fracture"]["localisation"].items() if k not in (*detection.DECODING_KEYS, "froc_mean")}
        checkpoint["fracture"]["localisation"] = {**kept, **stored}
        torch.save(checkpoint, ns.store)
        print(f"wrote {ns.store}")


if __name__ == "__main__":
    main()
