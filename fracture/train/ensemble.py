"""Several trained localise runs → one checkpoint that averages them, its choices re-made on validation.

    python -m fracture.ensemble checkpoints/A/best-….ckpt checkpoints/B/best-….ckpt [...] --out checkpoints/ens/ensemble.ckpt
    python -m fracture.ensemble checkpoints/A/best-….ckpt [...] --tta --out checkpoints/a-tta/model.ckpt

Runs of one network and preprocessing contract, trained on the same splits (their ``splits.csv`` must
match, so no member has trained on an image the ensemble is validated or tested on), become one
:class:`fracture.train.combined.Ensemble`: the mean of the members' image and map logits. The image-logit
fusion, the box decoding and the operating points are chosen again for the ensemble on the runs'
validation split, exactly as training chooses them for one network; the test split is never read.
Then the image logit is Platt-recalibrated (``scale * logit + shift``, in the graph) when that lowers the
validation calibration error out of sample (5 cross-fitted folds); a loss such as focal loss leaves the
probabilities far from observed rates, and a reader takes 0.3 to mean 3 in 10.
The result is an ordinary checkpoint: ``fracture.evaluate``, ``fracture.export`` (one ONNX file
holding every member) and the predictor take it as they take any other. It costs one member's
inference time per member.

``--tta`` adds mirror test-time augmentation (each member also sees the image flipped, its map
flipped back; twice the inference time): the ensemble of a model and its mirror, so one run is
enough. Its choices are re-made on validation the same way.

``--classifier RUN/best-….ckpt`` puts a classify run beside the localiser (or ensemble), as
:class:`fracture.train.combined.WithClassifier`: it sees the same input average-pooled to its own input
size, so its contract must be the localiser's at an integer fraction of the size (e.g. 224 px
letterbox beside 448 px letterbox). The image probability is then a fusion of the localiser's and
the classifier's logits chosen on validation; the map and boxes stay the localiser's. One run is
enough here too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from fracture.boxes.detection import describe_boxes
from fracture.data.annotations import DatasetError
from fracture.deploy.metadata import file_sha256
from fracture.imaging import preprocess
from fracture.scoring import metrics, selection
from fracture.train.checkpoint import CheckpointError, load_classifier
from fracture.train.module import FractureClassifier
from fracture.train.runio import atomic_write
from fracture.train.validation import validation_items


def check_members(ckpts: list[Path], models: list[FractureClassifier], tta: bool = False, classifier: bool = False) -> None:
    """Refuse members that cannot be averaged or were trained on different splits."""
    if not ckpts or (len(ckpts) < 2 and not tta and not classifier):
        raise CheckpointError("an ensemble needs at least two checkpoints (or one with --tta: the model and its mirror, or with --classifier)")
    if len({p.resolve() for p in ckpts}) < len(ckpts):
        raise CheckpointError("the same checkpoint is named twice")
    first = models[0]
    for ckpt, model in zip(ckpts, models):
        if not model.localise or model.hparams.members != 1:
            raise CheckpointError(f"{ckpt}: not a single localise network (an ensemble averages fracture maps)")
        if model.spec.config() != first.spec.config():
            raise CheckpointError(f"{ckpt}: its network {model.spec!r} differs from {ckpts[0]}'s {first.spec!r}")
        if replace(model.contract, train_crop=None) != replace(first.contract, train_crop=None):
            raise CheckpointError(f"{ckpt}: its preprocessing {model.contract} differs from {ckpts[0]}'s {first.contract}")
        if model.hparams.tta != first.hparams.tta:
            raise CheckpointError(f"{ckpt}: mirror TTA {'on' if model.hparams.tta else 'off'}, unlike {ckpts[0]}")
    check_splits(ckpts)


def check_splits(ckpts: list[Path]) -> None:
    """Runs combined into one model must share their splits: none may have trained on an image the others validate or test on."""
    splits = []
    for ckpt in ckpts:
        table = ckpt.parent / "splits.csv"
        if not table.is_file():
            raise CheckpointError(f"{ckpt}: no splits.csv beside it, so its training images cannot be checked against the others' validation and test images")
        rows = pd.read_csv(table, keep_default_na=False)
        splits.append(set(zip(rows["path"].map(lambda p: str(Path(p).resolve())), rows["split"])))
    for ckpt, split in zip(ckpts[1:], splits[1:]):
        if split != splits[0]:
            raise CheckpointError(f"{ckpt}: trained on other splits than {ckpts[0]} ({len(split ^ splits[0])} image/split pairs differ); "
                                  "runs combined must share data.root, seed and val_fraction")


def classifier_factor(ckpt: Path, model: FractureClassifier, localiser: FractureClassifier) -> int:
    """How much smaller the classifier's input is than the localiser's; refuses contracts one input cannot serve."""
    if model.localise or model.hparams.members != 1 or model.hparams.get("classifier"):
        raise CheckpointError(f"{ckpt}: not a single classify network (--classifier takes a classify run)")
    if model.hparams.tta:
        raise CheckpointError(f"{ckpt}: mirror TTA is on for this classifier; give --tta to the combined model instead")
    mine, theirs = model.contract, localiser.contract
    factor = theirs.image_size // mine.image_size
    same = replace(mine, image_size=theirs.image_size, train_crop=None) == replace(theirs, train_crop=None)
    if not same or factor < 1 or factor * mine.image_size != theirs.image_size:
        raise CheckpointError(f"{ckpt}: its preprocessing {mine} is not the localiser's {theirs} at an integer fraction of its size; "
                              "train the classifier with the localiser's resize, normalisation and data.image_size divided by 1, 2, …")
    return factor


def part_name(ckpt: Path) -> str:
    """A part as the ensemble records it: its run folder and file name (with its sha256 beside it), never the
    absolute path of the machine that built it, which would travel into the checkpoint and the ONNX metadata."""
    ckpt = Path(ckpt).resolve()
    return f"{ckpt.parent.name}/{ckpt.name}"


def build(ckpts: list[Path], out: Path, root: Path | None = None, tta: bool = False, classifier: Path | None = None,
          recalibrate: bool = True) -> dict[str, Any]:
    """Write the ensemble checkpoint (with the first run's splits.csv and config.yaml beside it); returns its deployment info.

    ``tta`` turns mirror TTA on for the result (members trained with it keep it either way); ``classifier``
    puts that classify run beside the localiser(s); ``recalibrate``: Platt-scale the image logit where that
    helps out of sample (False: the probabilities as trained).
    """
    models = [load_classifier(c) for c in ckpts]
    check_members(ckpts, models, tta, classifier is not None)
    side = load_classifier(classifier) if classifier is not None else None
    if side is not None:
        factor = classifier_factor(classifier, side, models[0])
        check_splits([ckpts[0], classifier])
    ensemble = FractureClassifier(**{**models[0].hparams, "members": len(models), "tta": tta or models[0].hparams.tta}).eval()
    for member, model in zip(ensemble.net.members if len(models) > 1 else [ensemble.net], models):
        member.load_state_dict(model.net.state_dict())
    ensemble.train_counts = dict(models[0].train_counts)
    ensemble.ensemble_of = [{"checkpoint": part_name(c), "sha256": file_sha256(c), "val_metrics": m.val_summary,
                             "localisation": {k: m.box_params.get(k) for k in ("froc_mean", "fusion")}} for c, m in zip(ckpts, models)]
    config = ckpts[0].parent / "config.yaml"
    if root is None:
        if not config.is_file():
            raise CheckpointError(f"{config} not found: pass --root DATASET")
        root = Path(yaml.safe_load(config.read_text())["data"]["root"])
    if side is None:
        probs, labels = ensemble.choose_localisation(validation_items(ensemble, ckpts[0], root))
    else:  # one pass over validation gives both levels' choices: the localiser's own, then with the classifier beside it
        combined = FractureClassifier(**{**ensemble.hparams, "classifier": {"net": side.spec.config(), "factor": factor}}).eval()
        combined.net.localiser.load_state_dict(ensemble.net.state_dict())
        combined.net.classifier.load_state_dict(side.net.state_dict())
        items = validation_items(combined, ckpts[0], root, parts=True)  # logits: (map-pooled, joint, classifier)
        probs, labels = ensemble.choose_localisation([(y, logits[:2], *rest) for y, logits, *rest in items])
        own = ensemble.box_params["fusion"]
        combined.net.localiser.fusion.fill_(own)
        boxes = ensemble.box_decoding
        combined.train_counts, combined.ensemble_of = ensemble.train_counts, ensemble.ensemble_of
        combined.classifier_of = {"checkpoint": part_name(classifier), "sha256": file_sha256(classifier), "network": side.spec.name,
                                  "input_size": side.contract.image_size, "factor": factor, "val_metrics": side.val_summary,
                                  "localiser_fusion": own, "localiser_val_auroc": metrics.auroc(probs, labels)}
        ensemble = combined
        localiser = selection.fuse(own, np.array([logits[:2] for _, logits, *_ in items]))
        probs, labels = ensemble.choose_localisation([(y, (mine, logits[2]), *rest) for mine, (y, logits, *rest) in zip(localiser, items)], boxes)
    if recalibrate:
        probs = ensemble.choose_calibration(probs, labels)
    ensemble.choose_operating_points(probs, labels)
    checkpoint = {"hyper_parameters": dict(ensemble.hparams), "state_dict": {f"net.{k}": v for k, v in ensemble.net.state_dict().items()}}
    ensemble.on_save_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in ("splits.csv", "config.yaml"):
        if (ckpts[0].parent / name).is_file() and ckpts[0].parent.resolve() != out.parent.resolve():
            shutil.copyfile(ckpts[0].parent / name, out.parent / name)
    atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))
    return ensemble.deployment_info()


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fracture.ensemble", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", type=Path,
                        help="two or more localise checkpoints of one network, trained on the same splits (one with --tta or --classifier)")
    parser.add_argument("--out", type=Path, required=True, help="the ensemble checkpoint to write (e.g. checkpoints/ens/ensemble.ckpt)")
    parser.add_argument("--root", type=Path, help="dataset root of the runs (default: data.root of the first run's config.yaml)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation too: each member also sees the flipped image (2x inference time)")
    parser.add_argument("--classifier", type=Path, help="a classify run's checkpoint to put beside the localiser(s): same splits, and its "
                        "preprocessing the localiser's at an integer fraction of the input size")
    parser.add_argument("--calibration", choices=("auto", "none"), default="auto",
                        help="auto (default): Platt-scale the image logit on validation where that lowers the calibration error "
                        "out of sample (5 cross-fitted folds); none: keep the probabilities as trained")
    ns = parser.parse_args(args)
    if ns.out.exists():
        parser.error(f"{ns.out} exists: name a new file")
    try:
        info = build(ns.ckpts, ns.out, ns.root, ns.tta, ns.classifier, recalibrate=ns.calibration == "auto")
    except (CheckpointError, DatasetError, preprocess.ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    def scores(val: dict[str, Any], loc: dict[str, Any]) -> str:
        froc = loc.get("froc_mean")
        return f"{val.get('auroc', float('nan')):.4f} / {'n/a' if froc is None else f'{froc:.3f}'}"

    members = ", ".join(scores(m["val_metrics"], m["localisation"]) for m in info["ensemble_of"])
    print(f"wrote {ns.out}: {len(ns.ckpts)} member(s){', mirror TTA' if info['tta'] else ''}; validation AUROC / mean FROC {scores(info['val_metrics'], info['localisation'])} "
          f"(members: {members})")
    if "classifier" in info:
        side = info["classifier"]
        print(f"classifier {side['network']} at {side['input_size']} px (1/{side['factor']} of the input): validation AUROC "
              f"{side['val_metrics'].get('auroc', float('nan')):.4f} in its own run; the localiser's {side['localiser_val_auroc']:.4f}")
    weights = "1 = localiser, 0 = classifier" if "classifier" in info else "1 = map-pooled, 0 = joint head"
    print(f"fusion {info['localisation']['fusion']:g} ({weights}); boxes: {describe_boxes(info['localisation'])}")
    cal = info.get("calibration", {})
    if cal:
        print(f"calibration: {cal['method']} (validation ECE {cal['ece_uncalibrated']:.3f} as trained, {cal['ece_platt_cross_fitted']:.3f} "
              f"Platt-scaled out of sample over {cal['folds']} folds; scale {cal['scale']:.3f}, shift {cal['shift']:+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
