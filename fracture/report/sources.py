"""Where an evaluation's predictions and images come from: a checkpoint or an ONNX file; a split folder, or the validation split a run carved from train."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fracture.data.annotations import Columns, DatasetError, read_split
from fracture.imaging import preprocess
from fracture.progress import progress

Maps = list[tuple[np.ndarray, tuple[int, int]]] | None  # each image's low-res map and its original (height, width)


def predict_checkpoint(ckpt: Path, paths: list[str], batch: int = 32, maps: bool = False) -> tuple[np.ndarray, dict[str, Any], Maps]:
    """Probabilities from a checkpoint (torch, eval mode), its deployment info, and with ``maps`` its low-res maps (with sizes).

    The maps are a ``localise`` model's fracture map, or a ``classify`` model's Grad-CAM.
    """
    import torch

    from fracture.deploy.predictor import ModelError
    from fracture.train.checkpoint import CheckpointError, load_classifier
    from fracture.train.explain import grad_cam

    try:
        model = load_classifier(ckpt)
    except CheckpointError as exc:  # answered like an unusable ONNX file, so the report side needs no torch to catch it
        raise ModelError(str(exc)) from None
    out, found, sizes = [], [], []
    for i in progress(range(0, len(paths), batch), desc="predict"):
        x, chunk_sizes = preprocess.load_batch_with_sizes(paths[i : i + batch], model.contract)
        x = torch.from_numpy(x)
        sizes += chunk_sizes
        if model.localise:
            with torch.inference_mode():
                p, m = model.probabilities_and_maps(x)
        elif maps:
            p, m = grad_cam(model.net, x)
            with torch.inference_mode():
                p = torch.sigmoid(model(x))  # with mirror TTA when the model uses it
        else:
            with torch.inference_mode():
                p, m = torch.sigmoid(model(x)), None
        out.append(p.numpy())
        if m is not None:
            found += list(m.numpy())
    info = model.deployment_info() | {"arch": model.spec.name, "source": str(ckpt)}
    return np.concatenate(out).astype(np.float64), info, list(zip(found, sizes)) if maps else None


def predict_onnx(path: Path, paths: list[str], maps: bool = False) -> tuple[np.ndarray, dict[str, Any], Maps]:
    from fracture.deploy.predictor import Predictor

    predictor = Predictor(path)
    want = maps and predictor.has_heatmap
    rows = list(predictor.predict(paths, keep_maps=want))
    failed = [r for r in rows if r.error]
    if failed:
        raise DatasetError(f"{len(failed)} image(s) could not be read, e.g. {failed[0].error}")
    return np.array([r.probability for r in rows]), predictor.metadata | {"source": str(path)}, [(r.raw_map, r.size) for r in rows] if want else None


def split_table(root: Path, split: str, columns: Columns | None, splits: Path | None) -> pd.DataFrame:
    """The annotations of ``root/split``; a split with no folder (validation carved from train) is read from
    train's (and val's) annotations, restricted to the rows ``splits`` (a run's splits.csv) lists for it."""
    if (root / split / "annotations.csv").is_file() or splits is None or not splits.is_file():
        return read_split(root / split, columns)
    listed = pd.read_csv(splits, keep_default_na=False)
    wanted = listed.loc[listed["split"] == split, "path"].map(os.path.abspath).tolist()
    tables = [read_split(root / s, columns) for s in ("train", "val") if (root / s / "annotations.csv").is_file()]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path"])
    table = table.set_index(table["path"].map(os.path.abspath))
    missing = [p for p in wanted if p not in table.index]
    if not wanted or missing:
        raise DatasetError(f"{splits}: {len(missing) if wanted else 'no'} {split} image(s) not in {root}'s annotations"
                           + (f" (e.g. {missing[0]})" if missing else ""))
    return table.loc[wanted].reset_index(drop=True)
