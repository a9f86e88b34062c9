"""The function an ONNX file computes, its export from torch and the checks before it ships.

:class:`Deployable` maps raw pixels to ``probability`` and ``logit`` (plus ``heatmap`` or ``map``);
:func:`to_onnx` exports it (dynamo, else TorchScript); :func:`check_parity` compares onnxruntime with
torch at batch 1 and N; the metadata is written under the ``fracture`` key and files are installed
atomically.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from fracture.data.synth import radiograph
from fracture.deploy import metadata  # the one writer: torch-side may import torch-free, not the reverse
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract, resize
from fracture.progress import progress
from fracture.train.cam import cam_from_features, normalise_cam
from fracture.train.combined import MirrorTTA, is_localise

PARITY_ATOL = 1e-5


class ExportError(Exception):
    """An export that must not be shipped; printed without a traceback."""


class Deployable(nn.Module):
    """Raw pixels → (probability, logit[, heatmap | map]): the function the ONNX file computes."""

    def __init__(self, net: nn.Module, heatmap: bool = False) -> None:
        super().__init__()
        self.localise = is_localise(net)
        if self.localise:
            heatmap = False  # its fracture map is the heatmap; no Grad-CAM needed
        if heatmap and isinstance(net, MirrorTTA):
            raise ExportError("--heatmap with test-time augmentation is not supported; export without one of them")
        self.net = net
        self.heatmap = heatmap

    @property
    def output_names(self) -> list[str]:
        return ["probability", "logit"] + (["heatmap"] if self.heatmap else []) + (["map"] if self.localise else [])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.localise:
            pooled, joint, maps = self.net.forward_maps(image)
            logit = self.net.fuse(pooled, joint)
            return torch.sigmoid(logit), logit, torch.sigmoid(maps)
        if not self.heatmap:
            logit = self.net(image)
            return torch.sigmoid(logit), logit
        logit, cam = cam_from_features(self.net, self.net.forward_features(image))
        return torch.sigmoid(logit), logit, normalise_cam(cam)


def to_onnx(module: Deployable, size: int, path: Path) -> str:
    """Export with the dynamo exporter, falling back to the legacy one; returns which one worked."""
    example = (torch.zeros(2, 1, size, size),)
    outputs = module.output_names
    names = {"input_names": ["image"], "output_names": outputs}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, example, dynamo=True, dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}}, optimize=True, verbose=False, **names
            )
        program.save(str(path))
        return "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back, and we say so
        print(f"dynamo exporter failed ({type(exc).__name__}: {str(exc)[:200]}); using the legacy TorchScript exporter", file=sys.stderr)
    torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17, dynamic_axes={n: {0: "batch"} for n in ["image", *outputs]}, **names)
    return "torchscript"


def parity_inputs(contract: Contract, images: list[str] | None = None, n: int = 8, seed: int = 0) -> np.ndarray:
    """Model inputs for the parity check: given image files, else synthetic radiographs."""
    if images:
        batch = [preprocess.load(p, contract) for p in images[:n]]
    else:
        rng = np.random.default_rng(seed)
        batch = [resize(np.rint(radiograph(rng, i % 2 == 1, "oblique") * 255).astype(np.uint8), contract) for i in range(n)]
    return preprocess.as_batch(batch)


def session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(onnx_path: Path, module: Deployable, inputs: np.ndarray) -> dict[str, float]:
    """Max |ONNX - torch| of probabilities (limit 1e-5) and heatmaps / maps (1e-4) at batch 1 and batch N."""
    sess = session(onnx_path)
    names = [n for n in module.output_names if n != "logit"]
    with torch.no_grad():
        out = dict(zip(module.output_names, module(torch.from_numpy(inputs))))
    expected = {n: out[n].numpy() for n in names}
    one = [sess.run(names, {"image": inputs[i : i + 1]}) for i in range(len(inputs))]
    full = sess.run(names, {"image": inputs})
    report, limits = {}, {"probability": PARITY_ATOL, "heatmap": 1e-4, "map": 1e-4}
    for k, name in enumerate(names):
        report[f"{name}_batch_1"] = float(np.abs(np.concatenate([o[k] for o in one]) - expected[name]).max())
        report[f"{name}_batch_{len(inputs)}"] = float(np.abs(full[k] - expected[name]).max())
    bad = {k: v for k, v in report.items() if not v <= limits[k.rsplit("_batch", 1)[0]]}  # NaN fails too
    if bad:
        raise ExportError(f"ONNX outputs differ from the checkpoint's by {bad} (limits {limits}); not shipping {onnx_path.name}")
    return report


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Set an exported file's metadata in place (the one writer, fracture.deploy.metadata), naming the producer."""
    metadata.write(path, path, meta, producer=True)


def install(tmp: Path, out: Path) -> None:
    """Atomic replace: a killed export leaves the old file or none, never half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)


def predict_probabilities(path: Path, paths: list[str], contract: Contract, batch: int = 32, desc: str = "check") -> np.ndarray:
    sess = session(path)
    out = []
    for i in progress(range(0, len(paths), batch), desc=desc):
        x = preprocess.load_batch(paths[i : i + batch], contract)
        out.append(sess.run(["probability"], {"image": x})[0])
    return np.concatenate(out)
