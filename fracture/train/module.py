"""FractureClassifier: the LightningModule that trains a network on fracture labels.

Training and evaluation logic only: the network comes from :mod:`fracture.networks`, the optimiser
from :mod:`fracture.recipe`, the losses from :mod:`fracture.losses`, weight averaging from Lightning's
``EMAWeightAveraging`` callback. Fractured is the positive class; operating points are chosen on
validation and stored in the checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, replace
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryAveragePrecision, BinaryF1Score, BinaryPrecision, BinaryRecall, BinarySpecificity

from fracture.imaging.contract import Contract
from fracture.scoring import metrics
from fracture.train import networks, recipe
from fracture.train.choices import ChosenOnValidation
from fracture.train.combined import Ensemble, MirrorTTA, WithClassifier
from fracture.train.losses import MapLoss, cell_cover, image_loss, map_loss, pointing_hits, pointing_loss
from fracture.train.networks import Network
from fracture.train.recipe import Recipe


class TrainingDiverged(Exception):
    """The loss stopped being a finite number; the last good checkpoint is kept."""


def _metric_collection(prefix: str) -> MetricCollection:
    names = {"accuracy": BinaryAccuracy, "precision": BinaryPrecision, "sensitivity": BinaryRecall, "specificity": BinarySpecificity,
             "f1": BinaryF1Score, "auroc": BinaryAUROC, "average_precision": BinaryAveragePrecision}
    return MetricCollection({k: cls() for k, cls in names.items()}, prefix=prefix)


class FractureClassifier(ChosenOnValidation, L.LightningModule):
    """Binary fracture classifier (fractured = positive).

    Args:
        net: the network and its own options (``SeedCNN``, ``ResNet``, ``Torchvision``); default the seed CNN.
        recipe: optimiser, learning-rate schedule and weight decay.
        ema_decay: keep an exponential moving average of the weights (e.g. 0.999) with Lightning's
            ``EMAWeightAveraging``; validation, checkpoints, test and export use it. ``null`` = off.
        tta: average the outputs of the image and its mirror at evaluation (and in the ONNX file).
        channels_last: train with NHWC memory layout; ``null`` = on when training in bf16 on a CPU (measured fastest there).
        pos_weight: weight of the fractured class in the loss; ``auto`` = negatives/positives of the train split.
        map_weight: weight of the per-cell map loss against the image losses (localise head).
        map_loss: ``bce_dice`` (mean BCE + soft Dice) or ``focal`` (focal BCE summed over cells / fracture
            cells); see :func:`fracture.losses.map_loss`.
        point_weight: weight of a spatial-softmax loss that ranks the box's cells above the rest of the same image
            (what the pointing game and the shown boxes measure); 0 = off. See :func:`fracture.losses.pointing_loss`.
        screening_sensitivity: sensitivity the ``screening`` operating point guarantees on validation.
        box_search_every: a localiser's box decoding is chosen by a grid search over the validation maps at the
            first validation, at every validation about to become the best checkpoint, every this many validations
            and at the last epoch; the validations between score the decoding held (``val/froc_mean``), one decode
            per image. 1 = search at every validation.
        image_size, resize, train_crop, reduced_decode: the preprocessing contract (linked from ``data.*``).
        mean, std: normalisation of the 0..1-scaled pixels.
        members: networks averaged as one (:class:`fracture.train.combined.Ensemble`); more than 1 only in checkpoints
            written by ``python -m fracture.ensemble`` from trained runs; never trained.
        classifier: ``{"net": a classify network's config, "factor": k}``: a classifier beside the localiser on
            the input average-pooled by ``k`` (:class:`fracture.train.combined.WithClassifier`); only in checkpoints
            written by ``python -m fracture.ensemble --classifier``; never trained.
    """

    def __init__(self, net: Network | None = None, recipe: Recipe | None = None, ema_decay: float | None = None, tta: bool = False, channels_last: bool | None = None,
                 pos_weight: float | Literal["auto"] | None = None, map_weight: float = 1.0, map_loss: MapLoss = "bce_dice",
                 point_weight: float = 0.0, screening_sensitivity: float = 0.95, box_search_every: int = 5,
                 image_size: int = 224, resize: Literal["stretch", "letterbox"] = "stretch", train_crop: int | None = None,
                 reduced_decode: bool = False, mean: float = 0.5, std: float = 0.25, members: int = 1,
                 classifier: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.spec = networks.from_config(net) if isinstance(net, dict) else net or networks.SeedCNN()
        self.recipe = Recipe(**recipe) if isinstance(recipe, dict) else recipe or Recipe()
        if self.spec.normalisation is not None and (mean, std) != self.spec.normalisation:
            if (mean, std) != (0.5, 0.25):
                raise ValueError(f"{self.spec.name}'s weights need mean {self.spec.normalisation[0]:.6f}, std {self.spec.normalisation[1]:.6f}; "
                                 f"got model.mean {mean}, model.std {std}: leave them unset")
            mean, std = self.spec.normalisation  # the network's own: its weights were trained on it
        self.save_hyperparameters(ignore=["net", "recipe"])
        self.hparams.update(net=self.spec.config(), recipe=asdict(self.recipe), mean=mean, std=std)  # plain data: checkpoints load with weights_only
        self.contract = Contract(image_size=image_size, resize=resize, mean=mean, std=std, train_crop=train_crop, reduced_decode=reduced_decode)
        self.net = Ensemble([self.spec.build(self.contract) for _ in range(members)]) if members > 1 else self.spec.build(self.contract)
        if classifier:
            factor = int(classifier["factor"])
            if factor < 1 or image_size % factor:
                raise ValueError(f"classifier factor {factor} does not divide image_size {image_size}")
            small = replace(self.contract, image_size=image_size // factor, train_crop=None)
            self.net = WithClassifier(self.net, networks.from_config(classifier["net"]).build(small), factor)
        self.localise = self.spec.head == "localise"
        self.size_multiple = 8 * 2 ** (len(self.net.pyramid.taps) - 1) if self.localise else 1
        if image_size % self.size_multiple:
            raise ValueError(f"the localise head on {self.spec.name} needs data.image_size divisible by {self.size_multiple}, got {image_size}")
        self.pos_weight = 1.0 if pos_weight in (None, "auto") else float(pos_weight)
        self.channels_last = bool(channels_last)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_metrics", _metric_collection(f"{stage}/"))
            if stage != "train":
                setattr(self, f"{stage}_outputs", nn.ModuleList([CatMetric(), CatMetric()]))  # probabilities, labels
        self.val_maps: list[tuple] = []  # (label, (map-pooled, joint) logits, map, true boxes) per validation image
        self.validations = 0  # validation ends seen in this process (the box search's schedule)
        self.box_searched = False  # whether the last validation searched the box decodings
        self.box_params: dict[str, Any] = {}
        self.thresholds: dict[str, float] = {"default": 0.5}
        self.val_summary: dict[str, float] = {}
        self.train_counts: dict[str, int] = {}
        self.ensemble_of: list[dict[str, Any]] = []  # the members' source checkpoints, for an ensemble
        self.classifier_of: dict[str, Any] = {}  # the classifier's source checkpoint, with one beside the localiser
        self.calibration: dict[str, Any] = {}  # the image logit's Platt recalibration, when fracture.ensemble chose one
        self.test_predictions: tuple[np.ndarray, np.ndarray] | None = None
        self.example_input_array = torch.zeros(2, 1, image_size, image_size)

    @property
    def evaluation_net(self) -> nn.Module:
        """What evaluation and export run: the network, wrapped in mirror TTA when asked for."""
        return MirrorTTA(self.net) if self.hparams.tta else self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels (0..255) → fracture logits."""
        return self.net(x) if self.training else self.evaluation_net(x)

    def setup(self, stage: str) -> None:
        auto = type(self.trainer.accelerator).__name__ == "CPUAccelerator" and str(self.trainer.precision).startswith("bf16")
        self.channels_last = auto if self.hparams.channels_last is None else self.hparams.channels_last
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def configure_callbacks(self) -> list[L.Callback]:
        if not self.hparams.ema_decay:
            return []
        from lightning.pytorch.callbacks import EMAWeightAveraging

        return [EMAWeightAveraging(decay=self.hparams.ema_decay)]  # the averaged copy lives there: out of the optimiser and DDP

    def configure_optimizers(self) -> Any:
        return recipe.configure(self.recipe, self.net, self.trainer.estimated_stepping_batches, self.trainer.max_epochs or 1)

    def on_fit_start(self) -> None:
        if self.hparams.members > 1 or self.hparams.get("classifier"):
            raise ValueError("an ensemble (or a localiser with a classifier) is not trained: fit its parts, then combine them with "
                             "python -m fracture.ensemble")
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        data = dm.contract
        if (data.image_size, data.resize, data.reduced_decode) != (self.contract.image_size, self.contract.resize, self.contract.reduced_decode):
            raise ValueError(f"data preprocessing {data} does not match the model's {self.contract}")
        self.train_counts = dm.class_counts
        crop = getattr(dm, "crop", None)
        if crop and not self.spec.takes_any_size():
            raise ValueError("data.crop needs a model that takes any input size: a localise head, or a SeedCNN with pool max/avg")
        if crop and crop % self.size_multiple:
            raise ValueError(f"data.crop must be divisible by {self.size_multiple} for this model, got {crop}")
        if self.hparams.pos_weight == "auto":
            self.pos_weight = self.train_counts["not_fractured"] / max(self.train_counts["fractured"], 1)

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[1]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            batch = (x, *batch[1:])
        # mixed precision trains; evaluation runs in fp32, as the ONNX file does, so thresholds fit what ships
        with torch.autocast(x.device.type, enabled=False) if stage != "train" else contextlib.nullcontext():
            if self.localise:
                logits, loss = self._localise_step(batch, stage)
            else:
                logits = self(x)
                loss = image_loss(logits, y, self.pos_weight)
        if stage == "train" and not torch.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}")
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=stage != "train")
        probs = torch.sigmoid(logits.detach().float())
        if stage != "val" or not self.localise:  # localise: validation scores are known once the fusion is chosen, at epoch end
            getattr(self, f"{stage}_metrics").update(probs, y.int())
        if stage != "train":
            for metric, value in zip(getattr(self, f"{stage}_outputs"), (probs, y)):
                metric.update(value)
        return loss, probs

    def _localise_step(self, batch: tuple[torch.Tensor, ...], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused logits and loss: BCE of both image logits + ``map_weight`` x map loss (+ ``point_weight`` x
        pointing loss); keeps validation maps."""
        x, y, mask, boxes, has_boxes = batch
        net = self.net if self.training else self.evaluation_net
        pooled, joint, maps = net.forward_maps(x)
        cover = cell_cover(maps, mask)
        pixel = map_loss(maps, cover, (y == 0) | has_boxes, self.hparams.map_loss)
        loss = image_loss(pooled, y, self.pos_weight) + image_loss(joint, y, self.pos_weight) + self.hparams.map_weight * pixel
        self.log(f"{stage}/map_loss", pixel, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=stage != "train")
        if self.hparams.point_weight:
            point, counted = pointing_loss(maps, cover)
            loss = loss + self.hparams.point_weight * point
            # weighted by the images it scores, so the epoch mean is theirs (logged on every rank even at 0, for the sync)
            self.log(f"{stage}/point_loss", point, on_step=False, on_epoch=True, batch_size=counted, sync_dist=stage != "train")
        if stage == "val" and self._trainer is not None and not self.trainer.sanity_checking:
            hits, counted = pointing_hits(maps, boxes, x.shape[-1] / maps.shape[-1])  # on the device, whole batch at once
            self.log("val/pointing", hits, on_step=False, on_epoch=True, batch_size=max(counted, 1), sync_dist=True)
            for label, p, j, m, b in zip(y.cpu().numpy(), pooled.float().cpu().numpy(), joint.float().cpu().numpy(), torch.sigmoid(maps.float()).cpu().numpy(), boxes.cpu().numpy()):
                self.val_maps.append((int(label), (float(p), float(j)), m, b[b[:, 0] >= 0]))
        return net.fuse(pooled, joint), loss

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", batch_idx)[0]

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_start(self) -> None:
        self.val_started = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        probs, labels = self._gathered("val")
        if self.localise:
            if self.trainer.sanity_checking:
                return
            items = self._gathered_maps()
            probs, labels = self.choose_localisation(items, search=False)  # the fusion, and the decoding held scored on these maps
            every, epochs = max(1, self.hparams.box_search_every), self.trainer.max_epochs or 0
            last = self.trainer.should_stop or (epochs > 0 and self.current_epoch + 1 >= epochs)
            search = not self.box_searched and (last or self.validations % every == 0 or self._improves_best(probs, labels))
            self.validations += 1
            if search:  # a checkpoint kept as the best, or the last, carries a decoding chosen on its own maps
                probs, labels = self.choose_localisation(items)
            self.log("val/froc_mean", self.box_params["froc_mean"])
            self.log("val/box_search", float(self.box_searched))
            self.log_dict({f"val/{k}": v for k, v in metrics.binary_metrics(probs, labels).items()})
        else:
            self._log_metrics("val")
        self.choose_operating_points(probs, labels)
        self.log_dict({f"val/threshold_{k}": v for k, v in self.thresholds.items() if k != "default"})
        if not self.trainer.sanity_checking:
            self.log("perf/val_s", time.perf_counter() - getattr(self, "val_started", time.perf_counter()), rank_zero_only=True)

    def _improves_best(self, probs: np.ndarray, labels: np.ndarray) -> bool:
        """Whether this validation's score beats the best checkpoint's so far (it is about to be saved as the best)."""
        callback = self.trainer.checkpoint_callback
        monitor = getattr(callback, "monitor", None)
        if not monitor:
            return False
        scores = {"val/froc_mean": self.box_params["froc_mean"], **{f"val/{k}": v for k, v in metrics.binary_metrics(probs, labels).items()}}
        best = callback.best_model_score
        return monitor in scores and (best is None or scores[monitor] > float(best))

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        self.test_predictions = self._gathered("test")

    def _log_metrics(self, stage: str) -> None:
        collection = getattr(self, f"{stage}_metrics")
        if not any(m.update_count for m in collection.values()):  # resumed from a save at validation: the epoch's batches ran before it
            return
        self.log_dict(collection.compute())
        collection.reset()

    def _gathered(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """All probabilities and labels of the epoch (across processes), then reset."""
        probs, labels = getattr(self, f"{stage}_outputs")
        p = probs.compute().cpu().numpy().ravel() if probs.update_count else np.zeros(0)
        y = labels.compute().cpu().numpy().ravel().astype(np.int64) if labels.update_count else np.zeros(0, np.int64)
        probs.reset()
        labels.reset()
        return p, y

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch[0] if isinstance(batch, (tuple, list)) else batch))

    def probabilities_and_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image probabilities, fracture probability maps) at evaluation, as the ONNX file computes them."""
        net = self.evaluation_net
        pooled, joint, maps = net.forward_maps(x)
        return torch.sigmoid(net.fuse(pooled, joint)), torch.sigmoid(maps)
