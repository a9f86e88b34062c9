"""The torch-free predictor: one ONNX file, its metadata (contract, thresholds, box decoding) and its answers for image files or decoded inputs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fracture.boxes import detection, heatmap
from fracture.deploy.metadata import MetadataError, ModelMetadata, file_sha256
from fracture.imaging import preprocess
from fracture.imaging.budget import DEFAULT_MAX_DECODE_MB
from fracture.progress import progress


class ModelError(Exception):
    """A model file the predictor refuses; printed without a traceback."""


@dataclass
class Prediction:
    path: str
    probability: float | None = None
    fractured: bool | None = None
    threshold: float | None = None
    threshold_name: str = ""
    error: str = ""
    boxes: list[tuple[float, float, float, float, float]] | None = None  # original-image pixels + score; None = no map
    raw_map: np.ndarray | None = None  # the model's low-resolution map or heatmap, when asked for (evaluation)
    size: tuple[int, int] | None = None  # the original image's (height, width): what boxes and maps map back onto


class Predictor:
    """One onnxruntime session plus the preprocessing contract stored in the model.

    Args:
        model_path: an ONNX file written by ``python -m fracture.export``.
        threads: onnxruntime intra-op threads and decode threads (default: all cores).
        max_decode_mb: what one file's decode may hold, worked out from its header before decoding
            (:mod:`fracture.imaging.budget`); over it a file is refused with its reason.
    """

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None, max_decode_mb: float = DEFAULT_MAX_DECODE_MB) -> None:
        self.max_bytes = int(max_decode_mb * 2**20)
        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for broken files
            raise ModelError(f"{path}: not a loadable ONNX model, truncated or corrupt? ({str(exc).splitlines()[0][:200]})") from None
        try:
            self.meta = ModelMetadata.from_session(self.session)
        except MetadataError as exc:
            raise ModelError(f"{path}: {exc}") from None
        self.metadata = self.meta.fields  # the whole entry as written (provenance, quantisation, release), read-only by convention
        self.contract = self.meta.contract
        self.thresholds = dict(self.meta.thresholds)
        self._check_graph(path)
        self.threads = threads or os.cpu_count() or 1
        self.sha256 = file_sha256(path)

    def _check_graph(self, path: Path) -> None:
        """The graph's input must be what the metadata promises (catches edited or mismatched files)."""
        inputs = self.session.get_inputs()
        outputs = {o.name for o in self.session.get_outputs()}
        if len(inputs) != 1 or inputs[0].name != "image" or "probability" not in outputs:
            raise ModelError(f"{path}: expected one input 'image' and an output 'probability'")
        self.has_map = "map" in outputs
        self.has_heatmap = "heatmap" in outputs or self.has_map
        self.localisation = self.meta.localisation if self.has_map else {}
        problems = detection.decoding_problems(self.localisation) if self.has_map else []
        if problems:
            raise ModelError(f"{path}: " + "; ".join(problems))
        shape = inputs[0].shape
        size = self.contract.image_size
        if len(shape) != 4 or list(shape[1:]) != [self.contract.channels, size, size]:
            raise ModelError(f"{path}: metadata promises {self.contract.channels}x{size}x{size} inputs but the graph takes {shape[1:]}; the file was altered or mixed up")

    def threshold(self, value: float | None = None, operating_point: str | None = None) -> tuple[str, float]:
        """Pick a threshold by value or by the name of an operating point stored in the model."""
        if value is not None:
            if not 0.0 <= value <= 1.0:
                raise ModelError(f"threshold must be within 0..1, got {value}")
            return "custom", float(value)
        name = operating_point or "default"
        if name not in self.thresholds:
            raise ModelError(f"operating point {name!r} is not in this model; it has {', '.join(self.thresholds)}")
        return name, self.thresholds[name]

    def boxes(self, prob_map: np.ndarray, height: int, width: int) -> tuple[np.ndarray, list[tuple[float, float, float, float, float]]]:
        """A map output → (the map over the original image, boxes there as the stored ``localisation`` says)."""
        full = heatmap.to_original(prob_map, height, width, self.contract)
        return full, detection.find_boxes(full, self.localisation, height, width, self.contract)

    def run(self, inputs: list[np.ndarray], maps: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Model inputs → (probabilities, low-resolution maps or None).

        A fracture map comes whenever the model has one (boxes need it); a heatmap output only when asked for.
        """
        outputs = ["probability"] + (["map"] if self.has_map else ["heatmap"] if maps and self.has_heatmap else [])
        results = self.session.run(outputs, {"image": preprocess.as_batch(inputs)})
        return results[0], (results[1] if len(results) > 1 else None)

    def _load(self, path: str, keep_original: bool = False) -> tuple[np.ndarray, np.ndarray | tuple[int, int]] | str:
        """(model input, original image when kept else its shape), or the reason it cannot be read."""
        try:
            x, shape = preprocess.load_with_size(path, self.contract, max_bytes=self.max_bytes)
            return x, preprocess.read_image(path, max_bytes=self.max_bytes) if keep_original else shape
        except preprocess.ImageError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a decoder crash on one file must not stop the run
            return f"{path}: cannot read ({type(exc).__name__}: {exc})"

    def predict(self, paths: list[str], batch_size: int = 32, threshold: tuple[str, float] = ("default", 0.5), show_progress: bool = True,
                heatmap_dir: str | os.PathLike | None = None, keep_maps: bool = False) -> Iterator[Prediction]:
        """Predictions in input order; decoding of the next batch overlaps inference of this one.

        With ``heatmap_dir`` (models exported with ``--heatmap``, or with a fracture map), an overlay per
        image is written there. Models with a map give each prediction its boxes.
        """
        if heatmap_dir is not None and not self.has_heatmap:
            raise ModelError("this model has no heatmap output; export it with `python -m fracture.export --heatmap`")
        name, value = threshold
        want_maps = heatmap_dir is not None or keep_maps
        load = (lambda c: [self._load(p, heatmap_dir is not None) for p in c])
        chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            pending = [pool.submit(load, c) for c in chunks[:1]]
            bar = progress(range(len(paths)), desc="predict") if show_progress else iter(range(len(paths)))
            for k, chunk in enumerate(chunks):
                if k + 1 < len(chunks):
                    pending.append(pool.submit(load, chunks[k + 1]))
                loaded = pending.pop(0).result()
                good = [i for i, item in enumerate(loaded) if not isinstance(item, str)]
                probs, maps = self.run([loaded[i][0] for i in good], want_maps) if good else ([], None)
                by_index = {i: j for j, i in enumerate(good)}
                for i, path in enumerate(chunk):
                    next(bar, None)
                    if i not in by_index:
                        yield Prediction(path, error=str(loaded[i]))
                        continue
                    p = float(probs[by_index[i]])
                    original = loaded[i][1]
                    h, w = original.shape[:2] if isinstance(original, np.ndarray) else original
                    raw = maps[by_index[i]] if maps is not None else None
                    boxes = None
                    if self.has_map:
                        full, boxes = self.boxes(raw, h, w)
                    elif heatmap_dir is not None:
                        full = heatmap.to_original(raw, h, w, self.contract)
                    if heatmap_dir is not None:
                        heatmap.write_overlay(heatmap_dir, path, original, full, p, boxes, absolute=self.has_map)
                    raw = raw if keep_maps else None
                    yield Prediction(path, p, p > value, value, name, boxes=boxes, raw_map=raw, size=(int(h), int(w)))
            for _ in bar:
                pass
