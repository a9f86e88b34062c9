"""What an ONNX file carries beside its graph, as one typed, versioned object with one reader and one writer.

The ``fracture`` metadata entry holds the preprocessing contract, the operating points, the box decoding, how
images of a study become one answer, and the file's provenance (checkpoint, quantisation, release, calibrations).
Export and calibration write it only through :func:`write`; the predictor and everything above it read it only
through :meth:`ModelMetadata.read` / :meth:`ModelMetadata.from_json`, so a field has one spelling and one default.
The layout is versioned by ``metadata_version`` (``version`` is the package version that wrote the file): files
written before the field existed, fracatlas-v1 among them, read as version 0, which has the same fields.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fracture.imaging.contract import Contract

METADATA_KEY = "fracture"
METADATA_VERSION = 1
KNOWN_VERSIONS = (0, 1)  # 0: no metadata_version field (files exported up to 2026-12-07); 1: the same fields, versioned
DEFAULT_STUDY_AGGREGATION = {"method": "max", "chosen_on": "default: the validation split has no study keys"}


class MetadataError(ValueError):
    """The file's metadata is missing, malformed or of a layout this version cannot read."""


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MB blocks (model files are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelMetadata:
    """The typed fields every reader needs, and ``fields``: the whole entry (provenance included), as written.

    Args:
        contract: how a file becomes the model's input (:class:`fracture.imaging.contract.Contract`).
        thresholds: operating point name → probability threshold ("fractured when probability > threshold").
        localisation: the box decoding of a localiser's map (empty for a classifier).
        study_aggregation: how a study's image probabilities become one (``method``: max, mean, …).
        version: the layout version read (0 for files written before it was recorded).
        fields: every key of the entry; what is not typed above (provenance, quantisation, release) lives here.
    """

    contract: Contract
    thresholds: dict[str, float]
    localisation: dict[str, Any] = field(default_factory=dict)
    study_aggregation: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_STUDY_AGGREGATION))
    version: int = METADATA_VERSION
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def study_method(self) -> str:
        return str(self.study_aggregation.get("method", "max"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> "ModelMetadata":
        if not isinstance(entry, dict):
            raise MetadataError(f"the '{METADATA_KEY}' metadata is not a JSON object")
        version = entry.get("metadata_version", 0)
        if version not in KNOWN_VERSIONS:
            raise MetadataError(f"metadata_version {version!r} is newer than this fracture reads ({max(KNOWN_VERSIONS)}); "
                                f"upgrade fracture (pip install -U fracture) to use this file")
        try:
            contract = Contract.from_dict(entry["contract"])
            thresholds = {str(k): float(v) for k, v in entry["thresholds"].items()}
            localisation = dict(entry.get("localisation") or {})
            aggregation = dict(entry.get("study_aggregation") or DEFAULT_STUDY_AGGREGATION)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MetadataError(f"malformed '{METADATA_KEY}' metadata ({type(exc).__name__}: {exc})") from None
        return cls(contract, thresholds, localisation, aggregation, int(version), dict(entry))

    @classmethod
    def from_json(cls, text: str | None) -> "ModelMetadata":
        if text is None:
            raise MetadataError(f"no '{METADATA_KEY}' metadata; export models with `python -m fracture.export`")
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise MetadataError(f"malformed '{METADATA_KEY}' metadata (not JSON: {exc})") from None

    @classmethod
    def from_session(cls, session: Any) -> "ModelMetadata":
        """The metadata of a loaded onnxruntime session (the predictor's: the file is not read twice)."""
        return cls.from_json(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ModelMetadata":
        """The metadata of an ONNX file on disk (the graph's weights are not loaded)."""
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises protobuf's own types for broken files
            raise MetadataError(f"{path}: not a loadable ONNX file ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
        return cls.from_json({p.key: p.value for p in proto.metadata_props}.get(METADATA_KEY))

    def replace(self, **changes: Any) -> "ModelMetadata":
        """A copy with some entry keys set (typed fields re-read from them, so the two never disagree)."""
        return ModelMetadata.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The entry as written: every field, the typed ones as typed, at the current layout version."""
        typed = {"contract": self.contract.to_dict(), "thresholds": dict(self.thresholds), "study_aggregation": dict(self.study_aggregation)}
        if self.localisation:
            typed["localisation"] = dict(self.localisation)
        return {**self.fields, **typed, "metadata_version": METADATA_VERSION}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def write(src: str | os.PathLike, out: str | os.PathLike, meta: ModelMetadata | dict[str, Any], *, producer: bool = False) -> None:
    """``src`` with its ``fracture`` metadata set to ``meta`` (other metadata entries kept), checked by onnx's checker
    and installed at ``out`` atomically: a killed write leaves the old file or none. ``producer``: also name the
    producer and the graph's doc string (at export)."""
    import onnx

    meta = meta if isinstance(meta, ModelMetadata) else ModelMetadata.from_dict(meta)
    proto = onnx.load(str(src))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key=METADATA_KEY, value=meta.to_json())
    if producer:
        proto.producer_name = "fracture"
        proto.doc_string = "Bone-fracture classifier (fractured = positive). Research tool, not a medical device."
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
