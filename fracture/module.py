"""FractureClassifier: the LightningModule that trains a network on fracture labels.

Loss on logits (``BCEWithLogitsLoss``, stable form of sigmoid + BCE), Adam,
torchmetrics per stage with fractured as the positive class, and operating
points chosen on the validation split and stored in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
)

from fracture import __version__, detection, metrics
from fracture.model import LocaliseNet, build_network
from fracture.preprocess import Contract


def tta_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean logit of the image and its left-right mirror."""
    return (net(x) + net(torch.flip(x, dims=[-1]))) / 2


def localise_outputs(net: LocaliseNet, x: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map-pooled logit, joint logit, map logits); with ``tta`` averaged with the mirror's, its map flipped back."""
    pooled, joint, maps = net.forward_maps(x)
    if tta:
        p2, j2, m2 = net.forward_maps(torch.flip(x, dims=[-1]))
        pooled, joint, maps = (pooled + p2) / 2, (joint + j2) / 2, (maps + torch.flip(m2, dims=[-1])) / 2
    return pooled, joint, maps


def map_loss(maps: torch.Tensor, mask: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """Per-cell BCE against the box mask's cover of each cell, plus soft Dice on images with a fracture in view.

    Only images whose boxes are known count: negatives (empty map) and fractured images with boxes.
    """
    if not bool(supervised.any()):
        return maps.sum() * 0.0
    stride = mask.shape[-1] // maps.shape[-1]
    target = nn.functional.avg_pool2d(mask, stride).squeeze(1)[supervised]
    logits = maps[supervised].float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    positive = target.flatten(1).sum(1) > 0
    if not bool(positive.any()):
        return bce
    p, t = torch.sigmoid(logits[positive]).flatten(1), target[positive].flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


class TrainingDiverged(Exception):
    """The loss stopped being a finite number; the last good checkpoint is kept."""


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _metric_collection(prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "accuracy": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "sensitivity": BinaryRecall(),
            "specificity": BinarySpecificity(),
            "f1": BinaryF1Score(),
            "auroc": BinaryAUROC(),
            "average_precision": BinaryAveragePrecision(),
        },
        prefix=prefix,
    )


class FractureClassifier(L.LightningModule):
    """Binary fracture classifier (fractured = positive).

    Args:
        arch: ``seed_cnn`` (the Keras port) or a torchvision classifier adapted to one channel.
        head: ``classify`` (one logit per image) or ``localise`` (a fracture map at stride 8 trained on the
            box masks, and an image logit fused from the map and a global head; seed CNN and resnets).
        map_weight: weight of the per-cell map loss against the image-level losses (``localise``).
        weights: optional local torchvision state dict for ``arch`` (never downloaded).
        widths: filters per conv block of the seed CNN.
        dense: hidden dense layer widths of the seed CNN.
        dropout: dropout after each conv block.
        dense_dropout: dropout after each hidden dense layer.
        pool: seed CNN head: ``flatten`` (the Keras original) or global ``max``/``avg`` pooling.
        optimizer: ``adam`` or ``adamw``.
        lr: learning rate.
        weight_decay: weight decay (decoupled for ``adamw``).
        scheduler: ``none`` (constant lr) or ``cosine`` (linear warm-up, then cosine decay to 0, per step).
        warmup_epochs: warm-up length for ``cosine``.
        ema_decay: keep an exponential moving average of the weights (e.g. 0.999) and validate, test and
            export with it; ``null`` = off.
        tta: average the logits of the image and its horizontal mirror at evaluation (and in the ONNX file).
        pos_weight: weight of the fractured class in the loss; ``auto`` = negatives/positives of the train split.
        screening_sensitivity: sensitivity the ``screening`` operating point guarantees on validation.
        image_size: input side in pixels (linked from ``data.image_size``).
        resize: resize method (linked from ``data.resize``).
        train_crop: training crop side (linked from ``data.crop``; recorded in the contract).
        reduced_decode: JPEG DCT-scaled decoding (linked from ``data.reduced_decode``; off for checkpoints made before it).
        mean: normalisation mean of the 0..1-scaled pixels.
        std: normalisation standard deviation of the 0..1-scaled pixels.
    """

    def __init__(
        self,
        arch: Literal["seed_cnn", "resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny"] = "seed_cnn",
        weights: str | None = None,
        head: Literal["classify", "localise"] = "classify",
        map_weight: float = 1.0,
        widths: Sequence[int] = (32, 64, 128),
        dense: Sequence[int] = (256, 128),
        dropout: float = 0.25,
        dense_dropout: float = 0.5,
        pool: Literal["flatten", "max", "avg"] = "flatten",
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: Literal["none", "cosine"] = "none",
        warmup_epochs: float = 0.0,
        ema_decay: float | None = None,
        tta: bool = False,
        pos_weight: float | Literal["auto"] | None = None,
        screening_sensitivity: float = 0.95,
        image_size: int = 224,
        resize: Literal["stretch", "letterbox"] = "stretch",
        train_crop: int | None = None,
        reduced_decode: bool = False,
        mean: float = 0.5,
        std: float = 0.25,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.contract = Contract(image_size=image_size, resize=resize, mean=mean, std=std, train_crop=train_crop, reduced_decode=reduced_decode)
        seed = {"widths": tuple(widths), "dense": tuple(dense), "dropout": dropout, "dense_dropout": dense_dropout, "pool": pool} if arch == "seed_cnn" else {}
        self.net = build_network(self.contract, arch, weights, head, **seed)
        self.localise = head == "localise"
        self.size_multiple = 8 * 2 ** (len(self.net.pyramid.taps) - 1) if self.localise else 1
        if image_size % self.size_multiple:
            raise ValueError(f"the localise head on {arch} needs data.image_size divisible by {self.size_multiple}, got {image_size}")
        self.box_params: dict[str, float] = {}
        self.val_maps: list[tuple] = []  # (label, (map-pooled, joint) logits, map, true boxes) per validation image
        self.ema = None
        if ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        weight = 1.0 if pos_weight in (None, "auto") else float(pos_weight)
        self.register_buffer("pos_weight", torch.tensor(weight))
        self.train_metrics = _metric_collection("train/")
        self.val_metrics = _metric_collection("val/")
        self.test_metrics = _metric_collection("test/")
        self.val_probs, self.val_labels = CatMetric(), CatMetric()
        self.test_probs, self.test_labels = CatMetric(), CatMetric()
        self.thresholds: dict[str, float] = {"default": 0.5}
        self.val_summary: dict[str, float] = {}
        self.train_counts: dict[str, int] = {}
        self.test_predictions: tuple[np.ndarray, np.ndarray] | None = None
        self.example_input_array = torch.zeros(2, 1, image_size, image_size)

    @property
    def inference_net(self) -> nn.Module:
        """What evaluation and export run: the EMA weights when kept, else the trained ones."""
        return self.ema.module if self.ema is not None else self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels (0..255) → fracture logits (EMA weights and mirror TTA outside training)."""
        if self.training:
            return self.net(x)
        return tta_logits(self.inference_net, x) if self.hparams.tta else self.inference_net(x)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        data = dm.contract
        if (data.image_size, data.resize, data.reduced_decode) != (self.contract.image_size, self.contract.resize, self.contract.reduced_decode):
            raise ValueError(f"data preprocessing {data} does not match the model's {self.contract}")
        self.train_counts = dm.class_counts
        crop = getattr(dm, "crop", None)
        if crop and self.hparams.arch == "seed_cnn" and not self.localise and self.hparams.pool == "flatten":
            raise ValueError("data.crop needs a model that takes any input size: model.head localise, or model.pool max/avg")
        if crop and crop % self.size_multiple:
            raise ValueError(f"data.crop must be divisible by {self.size_multiple} for this model, got {crop}")
        if self.hparams.pos_weight == "auto":
            self.pos_weight.fill_(self.train_counts["not_fractured"] / max(self.train_counts["fractured"], 1))

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[1]
        if self.localise:
            logits, loss = self._localise_step(batch, stage)
        else:
            logits = self(x)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight)
        if stage == "train" and not torch.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}")
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=stage != "train")
        return loss, torch.sigmoid(logits.detach().float())

    def _localise_step(self, batch: tuple[torch.Tensor, ...], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused logits and loss: BCE of both image logits + ``map_weight`` x map loss; keeps validation maps."""
        x, y, mask, boxes, has_boxes = batch
        net = self.net if self.training else self.inference_net
        pooled, joint, maps = localise_outputs(net, x, bool(self.hparams.tta) and not self.training)
        bce = nn.functional.binary_cross_entropy_with_logits
        supervised = (y == 0) | has_boxes
        pixel = map_loss(maps, mask, supervised)
        loss = bce(pooled, y, pos_weight=self.pos_weight) + bce(joint, y, pos_weight=self.pos_weight) + self.hparams.map_weight * pixel
        self.log(f"{stage}/map_loss", pixel, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=stage != "train")
        if stage == "val" and not (self._trainer is not None and self.trainer.sanity_checking):
            for label, p, j, m, b in zip(y.cpu().numpy(), pooled.float().cpu().numpy(), joint.float().cpu().numpy(), torch.sigmoid(maps.float()).cpu().numpy(), boxes.cpu().numpy()):
                self.val_maps.append((int(label), (float(p), float(j)), m, b[b[:, 0] >= 0]))
        return net.fuse(pooled, joint), loss

    def _choose_fusion_and_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """On validation: the image-logit fusion with the best AUROC and the box threshold with the best FROC.

        Returns the fused validation probabilities and labels (every process's images).
        """
        items, self.val_maps = self.val_maps, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, items)
            items = [it for part in gathered for it in part]
        labels = np.array([it[0] for it in items], np.int64)
        logits = np.array([it[1] for it in items], np.float64).reshape(-1, 2)
        sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
        choices = {1.0: logits[:, 0], 0.0: logits[:, 1], 0.5: logits.mean(1)}
        scores = {w: metrics.auroc(sigmoid(v), labels) for w, v in choices.items()}
        best = max(scores, key=lambda w: (np.nan_to_num(scores[w], nan=-1), w))
        for net in {self.net, self.inference_net}:
            net.fusion.fill_(best)
        size = self.contract.image_size
        maps = [cv2.resize(it[2], (size, size), interpolation=cv2.INTER_LINEAR) for it in items]
        self.box_params = {**detection.choose_box_threshold(maps, [[tuple(b) for b in it[3]] for it in items]),
                           "fusion": float(best), **{f"val_auroc_{k}": scores[w] for k, w in (("map", 1.0), ("joint", 0.0), ("mean", 0.5))}}
        self.log("val/froc_mean", self.box_params["froc_mean"])
        return sigmoid(choices[best]), labels

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, probs = self._step(batch, "train", batch_idx)
        self.train_metrics.update(probs, batch[1].int())
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        _, probs = self._step(batch, "val")
        if not self.localise:  # localise: fused probabilities are known once the fusion is chosen, at epoch end
            self.val_metrics.update(probs, batch[1].int())
            self.val_probs.update(probs)
            self.val_labels.update(batch[1])

    def on_validation_epoch_end(self) -> None:
        if self.localise:
            if self.trainer.sanity_checking:
                return
            probs, labels = self._choose_fusion_and_boxes()
            self.log_dict({f"val/{k}": v for k, v in metrics.binary_metrics(probs, labels).items()})
        else:
            self.log_dict(self.val_metrics.compute(), prog_bar=False)
            self.val_metrics.reset()
            probs, labels = self._gathered(self.val_probs, self.val_labels)
        self.thresholds = metrics.operating_points(probs, labels, self.hparams.screening_sensitivity)
        self.val_summary = {k: v for k, v in metrics.binary_metrics(probs, labels).items() if not math.isnan(v)}
        self.val_summary["n"] = int(labels.size)
        for name, value in self.thresholds.items():
            if name != "default":
                self.log(f"val/threshold_{name}", value)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        _, probs = self._step(batch, "test")
        self.test_metrics.update(probs, batch[1].int())
        self.test_probs.update(probs)
        self.test_labels.update(batch[1])

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()
        self.test_predictions = self._gathered(self.test_probs, self.test_labels)

    @staticmethod
    def _gathered(probs: CatMetric, labels: CatMetric) -> tuple[np.ndarray, np.ndarray]:
        """All predictions of the epoch (across processes), then reset."""
        p = probs.compute().cpu().numpy().ravel() if probs.update_count else np.zeros(0)
        y = labels.compute().cpu().numpy().ravel().astype(np.int64) if labels.update_count else np.zeros(0, np.int64)
        probs.reset()
        labels.reset()
        return p, y

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.sigmoid(self(x))

    def probabilities_and_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image probabilities, fracture probability maps) at evaluation, as the ONNX file computes them."""
        pooled, joint, maps = localise_outputs(self.inference_net, x, bool(self.hparams.tta))
        return torch.sigmoid(self.inference_net.fuse(pooled, joint)), torch.sigmoid(maps)

    def configure_optimizers(self) -> Any:
        cls = torch.optim.AdamW if self.hparams.optimizer == "adamw" else torch.optim.Adam
        optimizer = cls(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "none":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(self.hparams.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def deployment_info(self) -> dict[str, Any]:
        """What a deployer needs to know, kept in every checkpoint and later in the ONNX metadata."""
        return {
            "contract": self.contract.to_dict(),
            "thresholds": dict(self.thresholds),
            "train_counts": dict(self.train_counts),
            "val_metrics": dict(self.val_summary),
            "class_names": ["not_fractured", "fractured"],
            "positive_class": "fractured",
            "version": __version__,
            "screening_sensitivity": self.hparams.screening_sensitivity,
            "head": self.hparams.get("head", "classify"),
            **({"localisation": {**self.box_params, "stride": 8}} if self.localise else {}),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fracture"] = self.deployment_info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("fracture", {})
        self.thresholds = dict(info.get("thresholds", self.thresholds))
        self.train_counts = dict(info.get("train_counts", {}))
        self.val_summary = dict(info.get("val_metrics", {}))
        self.box_params = {k: v for k, v in info.get("localisation", {}).items() if k != "stride"}
