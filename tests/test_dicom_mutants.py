"""DICOM oddities give reasons, never tracebacks: the project's DICOM variants with their header fields rewritten
(zero, negative, empty, wrong-type and huge values, removed elements, cut pixel data, other transfer syntaxes) —
over 500 mutants through the gate in one child process within the byte budget's memory, and 20 through each
entry point (predict, serve, audit, fit)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, tiny_fit_args

pydicom = pytest.importorskip("pydicom")
from fracture.data.synth import dicom_bytes  # noqa: E402
spec = importlib.util.spec_from_file_location("dicom_variants", REPO / "scripts" / "dicom_variants.py")
dicom_variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dicom_variants)
hostile_spec = importlib.util.spec_from_file_location("hostile_inputs", REPO / "scripts" / "hostile_inputs.py")
hostile = importlib.util.module_from_spec(hostile_spec)
hostile_spec.loader.exec_module(hostile)

FIELDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
          "WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "PixelPaddingValue", "NumberOfFrames", "PlanarConfiguration",
          "VOILUTFunction", "PixelData"]
# (label, how): how(ds, keyword) rewrites one element
MUTATIONS = {
    "zero": lambda ds, k: _set(ds, k, 0),
    "negative": lambda ds, k: _set(ds, k, -1),
    "empty": lambda ds, k: _set(ds, k, None),
    "wrong-type": lambda ds, k: ds.add_new(ds.data_element(k).tag if k in ds else pydicom.datadict.tag_for_keyword(k), "LO", "abc"),
    "huge": lambda ds, k: _set(ds, k, 65535),
    "removed": lambda ds, k: delattr(ds, k) if k in ds else None,
}


def _set(ds, keyword: str, value) -> None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag)
    if keyword == "PixelData":
        ds.PixelData = b"" if value in (None, 0) else (ds.PixelData[: len(ds.PixelData) // 3] if value == -1 else ds.PixelData * 2)
        return
    if value is None:
        ds.add_new(tag, vr.split(" ")[0], None)
    elif vr in ("US", "US or SS", "UL", "US or OW") and value < 0:
        ds.add_new(tag, "SS", value)
    elif vr in ("CS", "LO", "SH"):
        ds.add_new(tag, vr, str(value))
    elif vr in ("DS", "IS"):
        ds.add_new(tag, vr, str(value))
    else:
        ds.add_new(tag, vr.split(" ")[0], value)


def variants(tmp: Path) -> dict[str, Path]:
    """The DICOM variants the project writes, plus RLE, an encapsulated JPEG and a colour one."""
    picture = (np.add.outer(np.arange(48), np.arange(40) * 3) % 256).astype(np.uint8)
    files = dicom_variants.write_variants(picture, tmp / "variants")
    import cv2

    more = {
        "rle": dicom_bytes(48, 40, hostile._rle_zeros(48 * 40, 1), "1.2.840.10008.1.2.5", bits=8, encapsulated=True),
        "jpeg": dicom_bytes(48, 40, cv2.imencode(".jpg", picture)[1].tobytes(), "1.2.840.10008.1.2.4.50", bits=8, encapsulated=True),
        "rgb": dicom_bytes(48, 40, np.dstack([picture] * 3).tobytes(), "1.2.840.10008.1.2.1", samples=3, bits=8, photometric="RGB"),
    }
    for name, data in more.items():
        (tmp / "variants" / f"{name}.dcm").write_bytes(data)
        files[name] = tmp / "variants" / f"{name}.dcm"
    return files


SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.100", "1.2.3.4"]


def mutants(tmp: Path) -> list[tuple[str, bytes]]:
    """(name, file bytes) for every variant x field x mutation, and every variant under the wrong transfer syntax."""
    out = []
    for vname, path in variants(tmp).items():
        for field in FIELDS:
            for label, how in MUTATIONS.items():
                ds = pydicom.dcmread(str(path))
                try:
                    how(ds, field)
                    buf = io.BytesIO()
                    ds.save_as(buf, enforce_file_format=False)
                except Exception:  # noqa: BLE001 - pydicom will not write this one: not a file anyone could send
                    continue
                out.append((f"{vname}-{field}-{label}", buf.getvalue()))
        for syntax in SYNTAXES:
            ds = pydicom.dcmread(str(path))
            ds.file_meta.TransferSyntaxUID = syntax
            buf = io.BytesIO()
            try:
                ds.save_as(buf, enforce_file_format=False)
            except Exception:  # noqa: BLE001
                continue
            out.append((f"{vname}-syntax-{syntax}", buf.getvalue()))
    return out


CHILD = """
import gc, json, sys, traceback
from pathlib import Path
from fracture.imaging import preprocess
def kb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
files = sorted(Path(sys.argv[1]).iterdir())
preprocess.read_image(sys.argv[2])
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
crashes, refused, read = [], 0, 0
for path in files:
    try:
        preprocess.read_image(path)
        read += 1
    except preprocess.ImageError as exc:
        refused += 1
        assert "Traceback" not in str(exc)
    except BaseException:
        crashes.append(path.name + ": " + traceback.format_exc().splitlines()[-1])
print(json.dumps({"crashes": crashes, "refused": refused, "read": read, "peak_mb": (kb("VmHWM") - base) / 1024}))
"""


def test_five_hundred_dicom_mutants_through_the_gate_give_reasons_not_tracebacks(tmp_path: Path) -> None:
    made = mutants(tmp_path)
    assert len(made) >= 500
    folder = tmp_path / "mutants"
    folder.mkdir()
    for name, data in made:
        (folder / f"{name}.dcm").write_bytes(data)
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path / "variants" / "mono2_8bit.dcm")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["crashes"] == [], result["crashes"][:20]
    assert result["refused"] >= 100 and result["read"] >= 100, result  # both kinds happen: mutations that matter and ones that do not
    assert result["peak_mb"] < 400, result


def _twenty(tmp: Path) -> list[Path]:
    """20 mutants that the gate refuses, one of each kind of trouble, written as files."""
    from fracture.imaging import preprocess

    chosen, kinds = [], set()
    for name, data in mutants(tmp):
        kind = name.split("-", 1)[1]
        if kind in kinds:
            continue
        try:
            preprocess.decode(data, "x.dcm")
        except preprocess.ImageError:
            kinds.add(kind)
            chosen.append((name, data))
        if len(chosen) == 20:
            break
    folder = tmp / "twenty"
    folder.mkdir()
    for name, data in chosen:
        (folder / f"{name}.dcm").write_bytes(data)
    return sorted(folder.iterdir())


def test_twenty_mutants_through_predict_and_serve(tmp_path: Path, tiny_onnx: Path) -> None:
    files = _twenty(tmp_path)
    out = tmp_path / "preds.csv"
    done = subprocess.run([sys.executable, "-m", "fracture.predict", str(tiny_onnx), *map(str, files), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "Traceback" not in done.stderr and done.returncode == 1, done.stderr[-2000:]
    rows = pd.read_csv(out, keep_default_na=False)
    assert len(rows) == 20 and (rows["error"] != "").all() and not rows["error"].str.contains("Error\\)|Traceback", regex=True).any()
    pytest.importorskip("uvicorn")
    from test_serve import serving

    with serving(tiny_onnx, tmp_path / "serve", "--max-files", "10") as server:
        for batch in (files[:10], files[10:]):
            status, _, body = server.post([(p.name, p.read_bytes()) for p in batch], query="?images=0")
            assert status == 422 and all(not r["ok"] and r["error"] for r in body["results"]), body
            assert not any(r["error"] == "cannot read this file" for r in body["results"])  # a reason, not the crash fallback
    assert "Traceback" not in (tmp_path / "serve" / "server.log").read_text()


def test_twenty_mutants_through_audit_and_fit(tmp_path: Path, synth_root: Path, capsys: pytest.CaptureFixture) -> None:
    from fracture.data import audit
    from fracture.train import fit

    files = _twenty(tmp_path)
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    table = pd.read_csv(root / "train" / "annotations.csv", dtype=str)
    rows = []
    for p in files:
        shutil.copy(p, root / "train" / "images" / p.name)
        rows.append({"image": p.name, "fracture": "no", "fracture_type": "none", "patient_id": p.stem, "view": "AP"})
    pd.concat([table, pd.DataFrame(rows)]).to_csv(root / "train" / "annotations.csv", index=False)
    report = audit.audit(root)
    defective = {Path(d["path"]).name for d in report["defective"]}
    assert {p.name for p in files} <= defective
    assert fit.main(tiny_fit_args(root, tmp_path / "out", "--data.val_fraction", "0.05")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "20 image(s) cannot be used" in err


def test_twenty_mutants_through_the_dicom_node(tmp_path: Path, tiny_onnx: Path) -> None:
    """Each is refused by its C-STORE status (or never gets past the sender's own encoder); none is spooled, no
    traceback, and the node still answers afterwards."""
    from pacs import Destination, echo, free_port, require, send, start_node, stop

    require()
    files = _twenty(tmp_path)
    destination, port = Destination(), free_port()
    node = start_node(tiny_onnx, tmp_path / "spool", f"DEST@127.0.0.1:{destination.port}", port, "--quiet", "0.5")
    try:
        statuses = []
        for path in files:
            try:
                statuses += send([path], port)
            except Exception:  # noqa: BLE001 - pydicom or pynetdicom on the sending side could not even read or encode it
                statuses.append(None)
        assert echo(port)  # still up
    finally:
        stop(node)
        destination.stop()
    assert 0 not in statuses and sum(s in (0xC000, 0xA700) for s in statuses) >= 10, statuses
    log = (tmp_path / "node.log").read_text()
    assert "Traceback" not in log and log.count("refused an instance") == sum(s in (0xC000, 0xA700) for s in statuses)
    assert not list((tmp_path / "spool" / "incoming").rglob("*.dcm")) and destination.counts == {}
