"""What a model chooses on its validation split and carries into its checkpoint and ONNX metadata: operating
points, the image-logit fusion, the box decoding, and the deployment info built from them (torch)."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import torch

from fracture import __version__
from fracture.scoring import calibration, metrics, selection


class ChosenOnValidation:
    """Mixed into :class:`fracture.train.module.FractureClassifier`: the choices training makes at each validation
    end and the checkpoint hooks that keep them, apart from the training steps."""

    def choose_operating_points(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """Thresholds and the validation summary stored with the model, from its validation probabilities."""
        self.thresholds = metrics.operating_points(probs, labels, self.hparams.screening_sensitivity)
        self.val_summary = {k: v for k, v in metrics.binary_metrics(probs, labels).items() if not math.isnan(v)} | {"n": int(labels.size)}

    def choose_calibration(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Platt-recalibrate the image logit on validation when that lowers the calibration error out of sample
        (:func:`fracture.scoring.calibration.choose_calibration`); sets the network's ``scale`` and ``shift`` and returns
        the recalibrated probabilities (same order: AUROC unchanged; the thresholds must be chosen on these)."""
        p = np.clip(np.asarray(probs, np.float64), 1e-12, 1 - 1e-12)
        logits = np.log(p / (1 - p))
        self.calibration = calibration.choose_calibration(logits, labels)
        self.net.scale.fill_(self.calibration["scale"])
        self.net.shift.fill_(self.calibration["shift"])
        return 1 / (1 + np.exp(-(self.calibration["scale"] * logits + self.calibration["shift"])))

    def _gathered_maps(self) -> list[tuple]:
        """The epoch's validation maps from every process, then reset."""
        items, self.val_maps = self.val_maps, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, items)
            items = [it for part in gathered for it in part]
        return items

    def choose_localisation(self, items: list[tuple], boxes: dict[str, Any] | None = None, search: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The image-logit fusion and the box decoding, chosen on validation items (see ``val_maps``).

        ``boxes``: a box decoding already chosen on these items' maps (``box_decoding``), kept instead of choosing it again.
        ``search=False``: keep the decoding chosen before and score it on these maps (``froc_mean``), instead of the
        grid search over decodings (a validation between two searches). Returns the fused probabilities and the labels.
        """
        labels = np.array([it[0] for it in items], np.int64)
        logits = np.array([it[1] for it in items], np.float64).reshape(-1, 2)
        best, scores = selection.choose_fusion(labels, logits, self.net.logit_names)
        self.net.fusion.fill_(best)
        if boxes is None:
            size = self.contract.image_size
            maps = [cv2.resize(it[2], (size, size), interpolation=cv2.INTER_LINEAR) for it in items]
            truths = [[tuple(b) for b in it[3]] for it in items]
            self.box_searched = search or not self.box_decoding
            if self.box_searched:
                boxes = selection.choose_box_decoding(maps, truths)
            else:
                boxes = {**self.box_decoding, "froc_mean": selection.score_box_decoding(maps, truths, self.box_decoding)}
        self.box_params = {**boxes, "fusion": float(best), **{f"val_auroc_{k}": v for k, v in scores.items()}}
        return 1 / (1 + np.exp(-selection.fuse(best, logits))), labels

    @property
    def box_decoding(self) -> dict[str, Any]:
        """The box decoding ``choose_localisation`` chose (``box_params`` without the image-logit fusion and its scores)."""
        return {k: v for k, v in self.box_params.items() if k != "fusion" and not k.startswith("val_auroc_")}

    def deployment_info(self) -> dict[str, Any]:
        """What a deployer needs to know, kept in every checkpoint and later in the ONNX metadata."""
        return {"contract": self.contract.to_dict(), "thresholds": dict(self.thresholds), "train_counts": dict(self.train_counts),
                "val_metrics": dict(self.val_summary), "class_names": ["not_fractured", "fractured"], "positive_class": "fractured",
                "version": __version__, "screening_sensitivity": self.hparams.screening_sensitivity, "head": self.spec.head,
                "network": self.spec.name, "tta": bool(self.hparams.tta), **({"localisation": {**self.box_params, "stride": 8}} if self.localise else {}),
                **({"ensemble_of": list(self.ensemble_of)} if self.ensemble_of else {}),
                **({"classifier": dict(self.classifier_of)} if self.classifier_of else {}),
                **({"calibration": dict(self.calibration)} if self.calibration else {})}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fracture"] = self.deployment_info()
        checkpoint["training"] = {"pos_weight": self.pos_weight}
        if self.localise and "fusion" in self.box_params:  # a choice, not a weight: never an average of past choices
            checkpoint["state_dict"]["net.fusion"] = torch.tensor(self.box_params["fusion"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("fracture", {})
        self.thresholds = dict(info.get("thresholds", self.thresholds))
        self.train_counts = dict(info.get("train_counts", {}))
        self.val_summary = dict(info.get("val_metrics", {}))
        self.box_params = {k: v for k, v in info.get("localisation", {}).items() if k != "stride"}
        self.ensemble_of = list(info.get("ensemble_of", []))
        self.classifier_of = dict(info.get("classifier", {}))
        self.calibration = dict(info.get("calibration", {}))
