"""Where does the model see a fracture? Grad-CAM overlays, and how often they point into radiologists' boxes.

    python -m fracture.explain --ckpt CKPT IMAGES… --out DIR
    python -m fracture.explain --ckpt CKPT IMAGES… --out DIR --boxes YOLO_DIR

Grad-CAM of the fracture logit on the last convolution block (for a
``localise`` model: its own fracture map, with its boxes drawn), resized back
onto the original radiograph (undoing stretch or letterbox), blended with an
OpenCV colormap next to the plain image, probability in the corner. With
``--boxes`` (YOLO ``.txt`` files named like the images), fractured images are
scored: pointing-game hit rate (the heatmap's maximum inside a box) and share
of heatmap mass inside boxes, against a centre-point and a random baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fracture.boxes import detection, heatmap
from fracture.data.inputs import expand_inputs
from fracture.imaging import preprocess
from fracture.imaging.contract import resize
from fracture.progress import progress
from fracture.train.cam import normalise_cam
from fracture.train.checkpoint import CheckpointError, load_classifier
from fracture.train.model import FractureNet


def grad_cam(net: FractureNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, Grad-CAM normalised to 0..1 per image) by autograd: the reference the ONNX heatmap must match."""
    with torch.enable_grad():
        features = net.forward_features(x)
        logit = net.forward_head(features)
        grad = torch.autograd.grad(logit.sum(), features)[0]
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1)).detach()
    return torch.sigmoid(logit).detach(), normalise_cam(cam)


def explain(ckpt: Path, paths: list[str], out: Path, boxes: Path | None = None) -> dict:
    """Write overlays for ``paths``; score against boxes when given. Returns the summary."""
    model = load_classifier(ckpt)
    contract = model.contract
    scores: list[dict] = []
    failed: list[str] = []
    for path in progress(paths, desc="explain"):
        try:
            image = preprocess.read_image(path)
        except preprocess.ImageError as exc:
            failed.append(str(exc))
            continue
        x = torch.from_numpy(resize(image, contract)[None, None].astype(np.float32))
        found_boxes = None
        if model.localise:
            with torch.inference_mode():
                prob, cam = model.probabilities_and_maps(x)
        else:
            prob, cam = grad_cam(model.net.eval(), x)
        full = heatmap.to_original(cam[0].numpy(), image.shape[0], image.shape[1], contract)
        if model.localise:
            found_boxes = detection.find_boxes(full, model.box_params, image.shape[0], image.shape[1], contract)
        heatmap.write_overlay(out, path, image, full, float(prob[0]), found_boxes)
        if boxes is not None:
            found = heatmap.read_yolo_boxes(boxes / f"{Path(path).stem}.txt", *image.shape)
            if found:
                mask = heatmap.box_mask(found, *image.shape)
                scores.append({"path": path, "probability": float(prob[0]), "model": heatmap.pointing(full, mask), **heatmap.baselines(mask)})
    summary: dict = {"checkpoint": str(ckpt), "images": len(paths), "overlays": len(paths) - len(failed), "failed": failed}
    if boxes is not None:
        summary["boxed_images"] = len(scores)
        for who in ("model", "centre", "random"):
            summary[who] = {k: float(np.nanmean([s[who][k] for s in scores])) if scores else float("nan") for k in ("hit", "mass_in_boxes")}
        summary["per_image"] = scores
    (out / "explain.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint to explain")
    parser.add_argument("images", nargs="+", help="image files, folders, globs or a CSV with an image column")
    parser.add_argument("--out", type=Path, default=Path("reports/heatmaps"), help="folder for the overlays (default reports/heatmaps)")
    parser.add_argument("--boxes", type=Path, help="folder of YOLO box files to score the heatmaps against")
    parser.add_argument("--limit", type=int, help="explain at most this many images")
    ns = parser.parse_args(args)
    try:
        paths = expand_inputs(ns.images)[: ns.limit]
        ns.out.mkdir(parents=True, exist_ok=True)
        summary = explain(ns.ckpt, paths, ns.out, ns.boxes)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary['overlays']} overlays in {ns.out}" + (f"; {len(summary['failed'])} unreadable" if summary["failed"] else ""))
    if ns.boxes is not None:
        print(f"pointing at fracture boxes on {summary['boxed_images']} fractured images:")
        print(f"  {'':<10}{'hit rate':>10}{'mass in boxes':>16}")
        for who in ("model", "centre", "random"):
            print(f"  {who:<10}{summary[who]['hit']:>10.3f}{summary[who]['mass_in_boxes']:>16.3f}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
