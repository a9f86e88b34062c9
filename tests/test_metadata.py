"""The ONNX metadata object: one reader, one writer, versioned; files from before the version field still read."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from fracture.deploy.metadata import METADATA_KEY, METADATA_VERSION, MetadataError, ModelMetadata, write
from fracture.deploy.predictor import ModelError, Predictor

SHIPPED = Path(__file__).resolve().parents[1] / "exports" / "fracatlas-v2.onnx"


def small_model(path: Path) -> Path:
    """A 1x1x32x32 → probability graph (a mean and a sigmoid): enough for the checker and onnxruntime."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0), helper.make_node("Sigmoid", ["m"], ["probability"])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"other": "kept"})
    onnx.save(model, str(path))
    return path


def entry(**changes: object) -> dict:
    base = {
        "contract": {"channels": 1, "image_size": 32, "interpolation": "area", "mean": 0.5, "pixel_scale": 1 / 255,
                     "reduced_decode": False, "resize": "letterbox", "std": 0.25, "train_crop": None, "version": 3},
        "thresholds": {"default": 0.5, "balanced": 0.3},
        "localisation": {"box_method": "regions", "box_threshold": 0.3},
        "study_aggregation": {"method": "mean", "chosen_on": "validation"},
        "release": {"name": "x-v9", "card": "exports/x-v9.md"},
        "quantization": {"activations": "int8"},
        "version": "0.1.0",
    }
    base.update(changes)
    return base


def test_every_field_round_trips_through_the_one_writer_and_reader(tmp_path: Path) -> None:
    src = small_model(tmp_path / "m.onnx")
    write(src, tmp_path / "out.onnx", entry())
    read = ModelMetadata.read(tmp_path / "out.onnx")
    assert read.version == METADATA_VERSION and read.thresholds == {"default": 0.5, "balanced": 0.3}
    assert read.contract.image_size == 32 and read.contract.resize == "letterbox"
    assert read.localisation["box_method"] == "regions" and read.study_method == "mean"
    assert read.get("release") == {"name": "x-v9", "card": "exports/x-v9.md"} and read.get("version") == "0.1.0"
    assert ModelMetadata.from_json(read.to_json()) == read  # a second round trip changes nothing
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "out.onnx")).metadata_props}
    assert props["other"] == "kept" and json.loads(props[METADATA_KEY])["metadata_version"] == METADATA_VERSION
    changed = read.replace(thresholds={"default": 0.4})
    assert changed.thresholds == {"default": 0.4} and changed.get("thresholds") == {"default": 0.4}  # typed and raw agree
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write's temporary file is gone


def test_files_without_a_version_read_as_version_0_and_newer_ones_are_refused(tmp_path: Path) -> None:
    old = ModelMetadata.from_dict(entry())
    assert old.version == 0 and old.study_method == "mean"
    default = ModelMetadata.from_dict({k: v for k, v in entry().items() if k not in ("study_aggregation", "localisation")})
    assert default.study_method == "max" and default.localisation == {}
    with pytest.raises(MetadataError, match="metadata_version 99 is newer than this fracture reads"):
        ModelMetadata.from_dict(entry(metadata_version=99))
    for broken, reason in ((entry(thresholds={"default": "high"}), "malformed"), ({"thresholds": {}}, "malformed"),
                           ([], "not a JSON object")):
        with pytest.raises(MetadataError, match=reason):
            ModelMetadata.from_dict(broken)  # type: ignore[arg-type]
    with pytest.raises(MetadataError, match="not JSON"):
        ModelMetadata.from_json("{")
    with pytest.raises(MetadataError, match="no 'fracture' metadata"):
        ModelMetadata.read(small_model(tmp_path / "bare.onnx"))
    # the predictor says the same in its own error type, naming the file
    src = small_model(tmp_path / "m.onnx")
    proto = onnx.load(str(src))
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(entry(metadata_version=99)))
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(ModelError, match="future.onnx: metadata_version 99 is newer"):
        Predictor(tmp_path / "future.onnx")


def test_the_shipped_file_and_its_unversioned_twin_read_alike(tmp_path: Path) -> None:
    """fracatlas-v2 is written at version 1; the same entry without ``metadata_version`` (as every file exported
    before 2026-12-07 was, fracatlas-v1 among them: git keeps it) reads as version 0 with every field."""
    import onnx

    read = ModelMetadata.read(SHIPPED)
    assert read.version == METADATA_VERSION == 1 and read.contract.image_size == 448 and set(read.thresholds) == {"default", "balanced", "screening"}
    assert read.localisation["box_method"] == "peaks" and read.study_method == "max" and read.get("release")["name"] == "fracatlas-v2"
    assert read.get("calibration")["method"] == "platt"
    proto = onnx.load(str(SHIPPED))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    old = json.loads(entry.value)
    del old["metadata_version"]
    entry.value = json.dumps(old)
    onnx.save(proto, str(tmp_path / "v0.onnx"))
    unversioned = ModelMetadata.read(tmp_path / "v0.onnx")
    assert unversioned.version == 0 and unversioned.fields.keys() == read.fields.keys() - {"metadata_version"}
    assert (unversioned.contract, unversioned.thresholds, unversioned.localisation) == (read.contract, read.thresholds, read.localisation)
    predictor = Predictor(SHIPPED, threads=1)
    assert predictor.meta == read and predictor.thresholds == read.thresholds and predictor.localisation == read.localisation
