from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fracture.deploy.metadata import file_sha256 as sha256
from fracture.export import export as export_mod
from fracture.export import graph
from fracture.export.export import export
from fracture.export.graph import Deployable, ExportError, parity_inputs
from fracture.export.quantize import quantize_int8
from fracture.imaging.contract import Contract
from fracture.train.checkpoint import load_classifier


def test_onnx_matches_checkpoint_at_batch_1_and_7(tiny_ckpt: Path, tiny_onnx: Path) -> None:
    model = load_classifier(tiny_ckpt)
    module = Deployable(model.net).eval()
    x = parity_inputs(model.contract, n=7, seed=5)
    with torch.no_grad():
        expected_p, expected_logit = (t.numpy() for t in module(torch.from_numpy(x)))
    sess = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    p7, logit7 = sess.run(["probability", "logit"], {"image": x})
    assert p7.shape == (7,) and logit7.shape == (7,)
    np.testing.assert_allclose(p7, expected_p, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logit7, expected_logit, atol=1e-4, rtol=1e-4)
    p1 = sess.run(["probability"], {"image": x[3:4]})[0]
    assert p1.shape == (1,) and abs(float(p1[0]) - float(expected_p[3])) < 1e-5


def test_metadata_carries_the_deployment_contract(tiny_ckpt: Path, tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["fracture"])
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["fracture"]
    assert meta["contract"] == ckpt["contract"] and meta["contract"]["image_size"] == 64
    assert meta["contract"]["reduced_decode"] is True  # data.reduced_decode (default on) reached the deployed contract
    assert meta["thresholds"] == ckpt["thresholds"] and {"default", "screening", "balanced"} <= set(meta["thresholds"])
    assert meta["class_names"] == ["not_fractured", "fractured"] and meta["positive_class"] == "fractured"
    assert meta["train_counts"]["fractured"] > 0 and "auroc" in meta["val_metrics"]
    assert meta["checkpoint_sha256"] == sha256(tiny_ckpt)
    assert meta["exporter"] in {"dynamo", "torchscript"} and meta["version"]
    assert max(meta["parity_max_abs_diff"].values()) <= 1e-5


def test_failed_parity_leaves_the_old_file_untouched(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(graph, "PARITY_ATOL", -1.0)
    with pytest.raises(ExportError, match="differ"):
        export(tiny_ckpt, out)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_cli_refuses_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert export_mod.main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_int8_runs_and_is_reported(synth_root: Path, tiny_ckpt: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.int8.onnx"
    with pytest.raises(ExportError, match="test split is scored once"):
        quantize_int8(tiny_onnx, out, tiny_ckpt, synth_root, eval_split=synth_root / "test")
    report = quantize_int8(tiny_onnx, out, tiny_ckpt, synth_root)  # checked on the run's validation split
    assert report["n"] > 0 and report["calibration_images"] > 0
    assert 0.0 <= report["max_abs_prob_diff"] < 1.0
    points = report["operating_points"]
    assert set(points) == {"default", "screening", "balanced"}
    lost = any(p["int8"]["sensitivity"] < p["fp32"]["sensitivity"] - 0.02 for p in points.values())
    assert report["kept"] == (report["auroc_fp32"] - report["auroc_int8"] <= 0.01 and not lost)
    if report["kept"]:
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        x = parity_inputs(Contract(image_size=64), n=3)
        assert sess.run(["probability"], {"image": x})[0].shape == (3,)
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        meta = json.loads(sess.get_modelmeta().custom_metadata_map["fracture"])
        assert meta["quantization"]["auroc_int8"] == report["auroc_int8"]
        assert meta["thresholds"] == {n: p["threshold_int8"] for n, p in points.items()}  # re-chosen with the INT8 model
        assert meta["thresholds_fp32"] == {n: p["threshold_fp32"] for n, p in points.items()}
    else:
        assert not out.exists()


def test_int8_operating_points_are_rechosen_for_the_int8_probabilities() -> None:
    from fracture.export.quantize import int8_operating_points
    from fracture.scoring import metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    p32 = np.clip(0.3 * labels + rng.uniform(0, 0.7, 400), 0, 1)
    p8 = np.clip(p32 - 0.1, 0, 1)  # quantization shifted every probability down
    thresholds = metrics.operating_points(p32, labels, 0.95)
    points, rechosen = int8_operating_points(p32, p8, labels, thresholds, 0.95)
    assert points["screening"]["int8_at_fp32_threshold"]["sensitivity"] < 0.95 <= points["screening"]["int8"]["sensitivity"]
    assert rechosen["screening"] == pytest.approx(thresholds["screening"] - 0.1, abs=0.02) and rechosen["default"] == 0.5
