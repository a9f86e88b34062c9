"""A localise run's validation items as training keeps them (label, logits, map, true boxes), so choices made on validation can be made again after training (ensembles, new box decodings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fracture.boxes import detection
from fracture.data.annotations import DatasetError, read_split, run_columns
from fracture.imaging import preprocess
from fracture.progress import progress


def validation_items(model: Any, ckpt: Path, root: Path, batch: int = 16, parts: bool = False) -> list[tuple]:
    """(label, (map-pooled, joint) logits, map, true boxes in input pixels) per validation image of a localise
    model's run, as training keeps them (``FractureClassifier.val_maps``), so its choices can be made again.

    ``parts``: the logits are every image logit the network's ``forward_parts`` gives (a localiser with a
    classifier: map-pooled, joint and the classifier's), so choices at two levels come from one pass."""
    import torch

    from fracture.train.checkpoint import CheckpointError, run_split

    found = run_split(ckpt, "val")
    if found is None:
        raise CheckpointError(f"{ckpt.parent / 'splits.csv'} is missing or lists no validation split")
    columns = run_columns(ckpt.parent)
    tables = [read_split(root / s, columns) for s in ("train", "val") if (root / s / "annotations.csv").is_file()]
    table = pd.concat(tables).set_index("path") if tables else pd.DataFrame()
    if "boxes" not in table.columns:
        raise DatasetError(f"{root}: no boxes column in its annotations: the box decoding is chosen on the validation boxes")
    paths, labels = found
    missing = [p for p in paths if p not in table.index]
    if missing:
        raise DatasetError(f"{len(missing)} validation images of the run are not in {root}'s annotations (e.g. {missing[0]}); pass the run's --root")
    net = model.evaluation_net
    items = []
    for i in progress(range(0, len(paths), batch), desc="validate"):
        chunk = paths[i : i + batch]
        x, chunk_sizes = preprocess.load_batch_with_sizes(chunk, model.contract)
        with torch.inference_mode():
            *logits, maps = (net.forward_parts if parts else net.forward_maps)(torch.from_numpy(x))
        for j, (path, (h, w)) in enumerate(zip(chunk, chunk_sizes)):
            truth = detection.to_input(detection.parse_boxes(table.loc[path, "boxes"]), h, w, model.contract)
            items.append((int(labels[i + j]), tuple(float(lg[j]) for lg in logits), torch.sigmoid(maps[j]).numpy(), truth))
    return items
