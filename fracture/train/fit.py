"""Train a fracture classifier and checkpoint it; the test split is scored only when asked (``--test_after_fit true``).

    python -m fracture.fit --config configs/default.yaml [--trainer.max_epochs 5] [--data.batch_size 64]
    python -m fracture.fit --config configs/default.yaml --ckpt_path last      # resume the latest run
    python -m fracture.fit --config configs/default.yaml --init_from RUN/best-….ckpt   # fine-tune: a new run from its weights
    python -m fracture.fit … --run_name STAGE --ckpt_path auto [--init_from …]   # resume STAGE if it has a last.ckpt, else start it

Everything a run makes lands in ``<output_dir>/<run_name>/``: ``best-….ckpt``
(by validation AUROC, or ``--best_by``), ``last.ckpt``, ``config.yaml`` (the resolved config),
``metrics.csv`` (per-epoch logs), ``splits.csv``, ``run_info.json`` (seed, versions, commit, any leakage
allowed, whether test was scored) and, with ``--test_after_fit true``, ``test_metrics.json``.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger

from fracture import __version__
from fracture.data.annotations import DatasetError
from fracture.machine import native_bf16
from fracture.scoring import metrics
from fracture.train.checkpoint import CheckpointError, initialise_from, load_classifier
from fracture.train.data import FractureDataModule, write_splits
from fracture.train.module import FractureClassifier, TrainingDiverged
from fracture.train.runio import AtomicCheckpointIO, ResumableCSVLogger, newest, trim_log

RUN_ENV = "FRACTURE_RUN_NAME"  # shared with DDP child processes so every rank writes to one run folder


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def default_precision(accelerator: str) -> str:
    """``trainer.precision`` when a config leaves it unset: bf16-mixed on a CPU with native bf16, else 32-bit."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return "bf16-mixed" if on_cpu and native_bf16() else "32-true"


class Throughput(Callback):
    """Per epoch's training part: wall time, images/s over all processes and, on a GPU, peak memory (logged as ``perf/*``)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.images = time.perf_counter(), 0
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.images += len(batch[0])

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The epoch's training part ends where its validation starts."""
        self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Epochs without validation (``trainer.check_val_every_n_epoch`` > 1) end here."""
        self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not getattr(self, "images", 0):
            return
        seconds = time.perf_counter() - self.start
        values = {"perf/train_epoch_s": seconds, "perf/images_per_s": self.images * trainer.world_size / max(seconds, 1e-9)}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            values["perf/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pl_module.log_dict(values, rank_zero_only=True)
        self.images = 0  # once per epoch


class EpochSummary(Callback):
    """One line per epoch when there is no progress bar (batch jobs, logs)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.progress_bar_callback is not None or not trainer.is_global_zero:
            return
        shown = ("val/loss", "val/auroc", "val/sensitivity", "val/specificity", "perf/train_epoch_s", "perf/images_per_s", "perf/peak_gpu_mem_gib")
        values = {k: float(trainer.callback_metrics[k]) for k in shown if k in trainer.callback_metrics}
        print(f"epoch {trainer.current_epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)


class FractureCLI(LightningCLI):
    """LightningCLI with run folders, checkpointing and the preprocessing contract linked data → model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.resize", "model.resize")
        parser.link_arguments("data.crop", "model.train_crop")
        parser.link_arguments("data.reduced_decode", "model.reduced_decode")
        parser.add_argument("--run_name", type=str | None, default=None, help="run folder name (default: config name + time)")
        parser.add_argument("--output_dir", type=str, default="checkpoints", help="where run folders go")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from a .ckpt; 'last': the newest run's last.ckpt; 'auto' (needs --run_name): that run's "
                                 "last.ckpt if it has one, else a new run (with --init_from's weights if given) — a rerun of the "
                                 "same command resumes it, which a multi-stage recipe needs")
        parser.add_argument("--init_from", type=str | None, default=None,
                            help="start a new run from a checkpoint's network weights (same network, preprocessing and split; "
                                 "fresh optimiser, schedule and epochs; the input size may change unless the head depends on it)")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="score the best checkpoint on the test split after training (default off: the test split is for a "
                                 "release's final figure, scored once; compare recipes on validation or --data.folds)")
        parser.add_argument("--best_by", type=Literal["val/auroc", "val/average_precision", "val/froc_mean"], default="val/auroc",
                            help="the validation score that picks best-….ckpt (val/froc_mean: mean FROC sensitivity at 0.5/1/2 FP "
                                 "per image, localise models only)")

    def _resolve_run(self) -> tuple[str, str | None]:
        cfg = self.config
        ckpt = cfg["ckpt_path"]
        # a DDP child process (LOCAL_RANK > 0) joins the run folder its parent chose
        name = cfg["run_name"] or (os.environ.get(RUN_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None)
        if ckpt == "auto":
            if not cfg["run_name"]:
                raise DatasetError("--ckpt_path auto resumes the run --run_name names: give --run_name")
            last = Path(cfg["output_dir"]) / name / "last.ckpt"
            ckpt = str(last) if last.is_file() else None
        if ckpt == "last" and not name:
            last = newest(cfg["output_dir"], "last.ckpt")
            if last is None:
                raise DatasetError(f"--ckpt_path last: no run with a last.ckpt under {cfg['output_dir']}/")
            name = last.parent.name
        if ckpt and ckpt != "last" and not name:
            name = Path(ckpt).resolve().parent.name
        if not name:
            configs = cfg.get("config") or []
            stem = Path(str(configs[-1])).stem if configs else "run"
            name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.environ[RUN_ENV] = name
        return name, ckpt

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        self.run_name, self.resume = self._resolve_run()
        self.run_dir = Path(self.config["output_dir"]) / self.run_name
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        best_by = self.config["best_by"]
        if best_by == "val/froc_mean" and not self.model.localise:
            raise DatasetError("--best_by val/froc_mean scores the fracture map's boxes: it needs a localise model (model.net.head: localise)")
        checkpoint = ModelCheckpoint(
            dirpath=self.run_dir,
            filename=f"best-epoch{{epoch:03d}}-{best_by.split('/')[1]}{{{best_by}:.4f}}",
            auto_insert_metric_name=False,
            monitor=best_by,
            mode="max",
            save_top_k=1,
        )
        # Lightning's save_last only refreshes last.ckpt when the best one changed; a run killed later would lose epochs
        # and with check_val_every_n_epoch > 1 it would only be written at validation: saved at every epoch's end instead
        latest = ModelCheckpoint(dirpath=self.run_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
                                 save_on_train_epoch_end=True)
        kwargs["callbacks"] = [*(trainer_cfg.get("callbacks") or []), checkpoint, latest, Throughput(), EpochSummary()]
        if trainer_cfg.get("precision") is None:
            kwargs["precision"] = default_precision(str(trainer_cfg.get("accelerator") or "auto"))
            if trainer_is_first():
                print(f"trainer.precision unset: {kwargs['precision']} (the fastest measured for this hardware; set it to choose)", file=sys.stderr)
        plugins = trainer_cfg.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]
        if trainer_cfg.get("logger") is not False:
            loggers: list[Logger] = [ResumableCSVLogger(save_dir=self.config["output_dir"], name=self.run_name)]
            if importlib.util.find_spec("tensorboard") is not None:
                from lightning.pytorch.loggers import TensorBoardLogger

                loggers.append(TensorBoardLogger(save_dir=self.config["output_dir"], name=self.run_name, version="tensorboard"))
            kwargs["logger"] = loggers
        return super().instantiate_trainer(**kwargs)


def trainer_is_first() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def run_info(cli: FractureCLI, tables: dict[str, Any]) -> dict[str, Any]:
    """Seed, versions and commit: what it takes to reproduce this run; leakage it was told to allow; whether it scored test."""
    return {
        "run_name": cli.run_name,
        "seed": cli.config.get("seed_everything"),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": _git_commit(),
        "versions": {
            "fracture": __version__,
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
        },
        "resumed_from": cli.resume,
        "initialised_from": cli.config.get("init_from"),
        "leakage_allowed": tables["train"].attrs.get("leakage", []),
        "test_split_scored": bool(cli.config["test_after_fit"]),
    }


def report_on_test(model: FractureClassifier, best: str) -> dict[str, Any]:
    """Test-split metrics at every operating point chosen on validation, plus confusion counts."""
    probs, labels = model.test_predictions
    report: dict[str, Any] = {"checkpoint": best, "n": int(labels.size), "positives": int(labels.sum()), "operating_points": {}}
    for name, threshold in model.thresholds.items():
        report["operating_points"][name] = {
            "threshold": threshold,
            **metrics.binary_metrics(probs, labels, threshold),
            "confusion": metrics.confusion(probs, labels, threshold),
        }
    if labels.size and labels.min() == labels.max():
        report["warning"] = "the test split holds one class only: AUROC and average precision are undefined"
    return report


def format_report(report: dict[str, Any]) -> str:
    points = report["operating_points"]
    names = list(points)
    lines = [f"test split: {report['n']} images, {report['positives']} fractured (positive class)"]
    lines.append(f"{'metric':<18}" + "".join(f"{n:>12}" for n in names))
    lines.append(f"{'threshold':<18}" + "".join(f"{points[n]['threshold']:>12.4f}" for n in names))
    for metric in metrics.METRIC_NAMES:
        cells = "".join(f"{points[n][metric]:>12.4f}" if not np.isnan(points[n][metric]) else f"{'undefined':>12}" for n in names)
        lines.append(f"{metric:<18}{cells}")
    for key in ("tp", "fp", "tn", "fn"):
        lines.append(f"{key:<18}" + "".join(f"{points[n]['confusion'][key]:>12d}" for n in names))
    if "warning" in report:
        lines.append(f"warning: {report['warning']}")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` so tests can call it in-process."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    try:
        cli = FractureCLI(
            FractureClassifier,
            FractureDataModule,
            run=False,
            args=args,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "python -m fracture.fit", "description": __doc__, "default_env": False},
        )
        dm: FractureDataModule = cli.datamodule
        tables = dm.check()
        similar = tables["train"].attrs.get("similar_across_splits", [])
        if similar and trainer_is_first():
            print(f"warning: {len(similar)} look-alike pair(s) across splits (thumbnails alike, outlines not: another exposure, "
                  f"perhaps of one patient; not refused), e.g. {similar[0]}", file=sys.stderr)
        trainer = cli.trainer
        resume = cli.resume
        if resume == "last":
            resume = str(cli.run_dir / "last.ckpt")
        if cli.config["init_from"] and resume and cli.config["ckpt_path"] != "auto":
            raise DatasetError("--init_from starts a new run from a checkpoint's weights, --ckpt_path resumes a run: give one "
                               "(or --ckpt_path auto: resume the named run if it has a last.ckpt, else start it from --init_from)")
        if cli.config["init_from"] and not resume:
            for warning in initialise_from(cli.model, cli.config["init_from"], {s: t["path"].tolist() for s, t in tables.items()}):
                print(f"warning: {warning}", file=sys.stderr)
        if trainer.is_global_zero:
            cli.run_dir.mkdir(parents=True, exist_ok=True)
            write_splits(tables, cli.run_dir / "splits.csv")
            (cli.run_dir / "run_info.json").write_text(json.dumps(run_info(cli, tables), indent=2))
            if resume:
                if not Path(resume).is_file():
                    raise DatasetError(f"--ckpt_path: {resume} not found")
                trim_log(cli.run_dir / "metrics.csv", torch.load(resume, map_location="cpu", weights_only=True)["global_step"])
        trainer.fit(cli.model, datamodule=dm, ckpt_path=resume)
        if trainer.interrupted or not cli.config["test_after_fit"]:
            return 0
        best = trainer.checkpoint_callback.best_model_path or str(cli.run_dir / "last.ckpt")
        tested = load_classifier(best)  # its state_dict holds the averaged weights when EMA is on
        trainer.test(tested, datamodule=dm)
        if trainer.is_global_zero:
            report = report_on_test(tested, best)
            out = cli.run_dir / "test_metrics.json"
            out.write_text(json.dumps(report, indent=2))
            print(format_report(report))
            print(f"\nrun folder: {cli.run_dir}\nbest checkpoint: {best}\ntest metrics: {out}")
    except (DatasetError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        last = cli.run_dir / "last.ckpt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written before it"
        print(f"error: {exc}; stopped, {kept}. Lower model.lr, set trainer.gradient_clip_val, or check the data.", file=sys.stderr)
        return 3
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST):
            raise
        print(f"error: cannot write {exc.filename or 'the run folder'}: {exc.strerror}. Free disk space or choose another --output_dir.", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
