"""Checkpoints on disk: load one (today's layout or an older one) without unpickling code, find the latest.

Torch-side, below ``fracture.export``, ``fracture.evaluate`` and ``fracture.fit``, which all load checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fracture.train import networks
from fracture.train.module import FractureClassifier
from fracture.train.runio import newest


class CheckpointError(Exception):
    """A checkpoint that cannot be used; printed without a traceback."""


LEGACY_KEYS = ("arch", "weights", "head", "widths", "dense", "dropout", "dense_dropout", "pool")


RECIPE_KEYS = ("optimizer", "lr", "weight_decay", "scheduler", "warmup_epochs")


def upgrade(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hyperparameters, weights) of a checkpoint in today's form; older ones had flat network and recipe options
    and kept EMA weights as a submodule (``ema.module.*``, which is what they evaluated and exported)."""
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}  # LightningCLI's _instantiator
    state = dict(checkpoint["state_dict"])
    if "net" not in hparams:
        hparams["net"] = networks.from_legacy(hparams).config()
        hparams["recipe"] = {k: hparams[k] for k in RECIPE_KEYS if k in hparams}
        hparams = {k: v for k, v in hparams.items() if k not in LEGACY_KEYS + RECIPE_KEYS}
    if any(k.startswith("ema.module.") for k in state):
        state = {"net." + k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    state = {k: v for k, v in state.items() if not k.startswith("ema.") and k != "pos_weight"}
    return hparams, state


def load_classifier(ckpt: str | os.PathLike) -> FractureClassifier:
    """Load a checkpoint (today's or an older one) without unpickling arbitrary objects."""
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        hparams, state = upgrade(checkpoint)
        model = FractureClassifier(**hparams)  # a stored network config drops `weights`: the checkpoint holds them
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: checkpoint not found") from None
    except Exception as exc:  # a truncated or foreign file fails in many ways
        raise CheckpointError(f"{ckpt}: not a usable fracture checkpoint ({type(exc).__name__}: {exc})") from None
    return model.eval()


def initialise_from(model: FractureClassifier, ckpt: str | os.PathLike, splits: dict[str, list[str]]) -> list[str]:
    """Start ``model`` from the network weights of ``ckpt`` (fine-tuning: a new run, optimiser and schedule).

    Refused when the network or the preprocessing differ, or when an image this run validates or tests on
    was in the checkpoint's training split (that would leak it into the measurement). The input size alone may
    differ (progressive resizing: fine-tune at a larger size what was trained at a smaller one; the new size is
    this run's contract) when the weights do not depend on it. Returns warnings.
    """
    source = load_classifier(ckpt)
    if source.hparams.members != 1:
        raise CheckpointError(f"{ckpt}: an ensemble of {source.hparams.members} networks; start from one of its members")
    if source.hparams.get("classifier"):
        raise CheckpointError(f"{ckpt}: a localiser with a classifier beside it; start from the localiser's own run")
    if networks.architecture(source.spec.config()) != networks.architecture(model.spec.config()):  # the starting weights may differ
        raise CheckpointError(f"{ckpt}: its network {source.spec!r} differs from this run's {model.spec!r}")
    size = model.contract.image_size
    if replace(source.contract, train_crop=None, image_size=size) != replace(model.contract, train_crop=None):  # the crop is a training choice
        raise CheckpointError(f"{ckpt}: its preprocessing {source.contract} differs from this run's {model.contract}")
    trained = run_split(Path(ckpt), "train")
    if trained is None:
        warnings = [f"{ckpt}: no splits.csv beside it, so leakage into this run's validation/test split cannot be checked"]
    else:
        seen = {str(Path(p).resolve()) for p in trained[0]}
        leaked = [p for split in ("val", "test") for p in splits.get(split, []) if str(Path(p).resolve()) in seen]
        if leaked:
            raise CheckpointError(f"{ckpt}: {len(leaked)} images of this run's validation/test split were in its training split "
                                  f"(e.g. {leaked[0]}); fine-tune on the same split (same data.root, seed and val_fraction)")
        warnings = []
    try:
        model.net.load_state_dict(source.net.state_dict())
    except RuntimeError as exc:  # only a size-dependent head (pool: flatten) can fail here: the network config matched
        raise CheckpointError(f"{ckpt}: its weights fit {source.contract.image_size} px inputs, not this run's {size} px "
                              f"(a head sized by its input, e.g. pool: flatten): {str(exc).splitlines()[-1].strip()}") from None
    if source.contract.image_size != size:
        warnings.append(f"{ckpt}: trained at {source.contract.image_size} px, fine-tuned here at {size} px")
    return warnings


def latest_best(output_dir: str | os.PathLike = "checkpoints") -> Path:
    """The best checkpoint of the most recent run."""
    found = newest(output_dir, "best-*.ckpt")
    if found is None:
        raise CheckpointError(f"no best-*.ckpt under {output_dir}/; train first (python -m fracture.fit) or pass --ckpt")
    return found


def run_split(ckpt: Path, split: str, with_study: bool = False) -> tuple | None:
    """Paths and labels (and study keys, "" when none) of one split of the checkpoint's run, from its splits.csv."""
    table = ckpt.parent / "splits.csv"
    if not table.is_file():
        return None
    import pandas as pd

    rows = pd.read_csv(table, keep_default_na=False, dtype={"study": str})
    rows = rows[rows["split"] == split]
    if not len(rows):
        return None
    found = (rows["path"].tolist(), rows["label"].to_numpy().astype(int))
    return (*found, rows["study"].to_numpy() if "study" in rows.columns else np.full(len(rows), "")) if with_study else found


def narrow(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, int]:
    """A copy of a checkpoint to carry off a machine with a transfer cap: no optimiser or scheduler state, and
    conv/linear weights (tensors of 2+ dimensions) in fp16; normalisation statistics and biases stay fp32.
    ``load_classifier`` casts the weights back to fp32. Returns bytes before and after."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    for key in ("optimizer_states", "lr_schedulers"):
        checkpoint.pop(key, None)
    checkpoint["state_dict"] = {k: v.half() if v.is_floating_point() and v.dim() >= 2 else v for k, v in checkpoint["state_dict"].items()}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, dst)
    return {"before": os.path.getsize(src), "after": os.path.getsize(dst)}


def epochs_done(ckpt: str | os.PathLike) -> int:
    """How many training epochs a checkpoint's run has finished (what a multi-stage recipe checks before moving on)."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", checkpoint.get("epoch", -1) + 1))


def main(args: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m fracture.train.checkpoint", description="Checkpoint housekeeping.")
    sub = parser.add_subparsers(dest="command", required=True)
    small = sub.add_parser("narrow", help=narrow.__doc__.split(".")[0])
    small.add_argument("src")
    small.add_argument("dst")
    count = sub.add_parser("epochs", help="print how many training epochs a checkpoint's run has finished")
    count.add_argument("ckpt")
    ns = parser.parse_args(args)
    if ns.command == "epochs":
        try:
            print(epochs_done(ns.ckpt))
        except (OSError, RuntimeError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        sizes = narrow(ns.src, ns.dst)
        load_classifier(ns.dst)  # still loads
    except (OSError, CheckpointError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{ns.dst}: {sizes['before'] / 2**20:.1f} MiB -> {sizes['after'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
