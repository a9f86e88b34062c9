"""Answers as DICOM (``predict --dicom-out``, the node's objects): the SR's and GSPS's coordinates are the
predictor's boxes, the patient and study are the source's (a non-ASCII name included), UIDs are the same on a
second run, and every object passes dicom3tools' ``dciodvfy`` (errors: none; warnings: only the listed ones)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pacs import CR, DX, SC, radiograph, require

from fracture.data.synth import FRACTURE_TYPES, radiograph_and_boxes
from fracture.deploy import predict
from fracture.deploy.pacs.source import out_of_scope

ALLOWED = Path(__file__).parent / "dciodvfy_allowed.txt"
NAME = "Müller^Jürgen"


@pytest.fixture(scope="module")
def study(loc_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict]:
    """One study of six DICOM variants of synthetic fractured radiographs (12-bit windowed DX, MONOCHROME1 CR, 8-bit
    SC, an out-of-scope DX, rescaled values, a VOI LUT table), a DICOM the gate refuses and a PNG; predicted once."""
    require()
    from pydicom.uid import generate_uid

    import cv2

    folder = tmp_path_factory.mktemp("dicomstudy")
    uid = generate_uid()
    pictures = [np.rint(255 * radiograph_and_boxes(np.random.default_rng(seed), True, FRACTURE_TYPES[seed % len(FRACTURE_TYPES)])[0]).astype(np.uint8) for seed in range(4)]
    variants = [dict(sop_class=DX, bits=12, PatientName=NAME, SpecificCharacterSet="ISO_IR 192", PatientAge="045Y"),
                dict(sop_class=CR, bits=8, photometric="MONOCHROME1", PatientName=NAME, SpecificCharacterSet="ISO_IR 192"),
                dict(sop_class=SC, bits=8, PatientName=NAME, SpecificCharacterSet="ISO_IR 192"),
                dict(sop_class=DX, bits=12, PatientName=NAME, SpecificCharacterSet="ISO_IR 192", BodyPartExamined="CHEST", PatientAge="012Y")]
    files = []
    for i, (picture, tags) in enumerate(zip(pictures, variants)):
        files.append(folder / f"image{i}.dcm")
        files[-1].write_bytes(radiograph(picture, uid, **tags))
    from pydicom.dataset import Dataset

    from fracture.data.synth import dicom_bytes

    more = np.rint(255 * radiograph_and_boxes(np.random.default_rng(4), True, "oblique")[0]).astype(np.uint16)
    lut = Dataset()  # a VOI LUT table, LUT Data read back as US values (highdicom wanted bytes: a crash, found here)
    lut.LUTDescriptor, lut.LUTData = [4096, 0, 16], [min(i // 16, 255) * 257 for i in range(4096)]
    lut["LUTData"].VR = "US"
    common = dict(StudyInstanceUID=uid, PatientName=NAME, SpecificCharacterSet="ISO_IR 192", bits_stored=12)
    for name, stored, tags in [("rescaled", more * 8 + 512, dict(RescaleSlope=2, RescaleIntercept=-1024, RescaleType="US", WindowCenter=2040.5,
                                                                  WindowWidth=4081)),
                               ("voilut", more * 16, dict(VOILUTSequence=[lut]))]:
        files.append(folder / f"{name}.dcm")
        files[-1].write_bytes(dicom_bytes(*stored.shape, stored.astype(np.uint16).tobytes(), "1.2.840.10008.1.2.1", **common, **tags))

    broken = folder / "broken.dcm"  # its header is fine, its pixel data 1,000 bytes short: listed in the SR as not read
    broken.write_bytes(dicom_bytes(256, 256, b"\0" * 1000, "1.2.840.10008.1.2.1", StudyInstanceUID=uid, PatientName=NAME,
                                   SpecificCharacterSet="ISO_IR 192"))
    png = folder / "plain.png"
    cv2.imwrite(str(png), pictures[0])
    out, preds = folder / "answer", folder / "preds.json"
    assert predict.main([str(loc_onnx), *map(str, files), str(broken), str(png), "--dicom-out", str(out), "--out", str(preds), "--quiet"]) == 1
    rows = {Path(r["path"]).name: r for r in json.loads(preds.read_text())}
    return out, files, rows


def _read(out: Path) -> dict[str, list]:
    import pydicom

    found: dict[str, list] = {"SR": [], "PR": [], "SC": []}
    for path in sorted(out.glob("*.dcm")):
        found[path.name[:2]].append(pydicom.dcmread(path))
    return found


def _scoords(item, found: list) -> list:
    """Every SCOORD in an SR content tree, with the SOP instance it refers to."""
    for child in item.get("ContentSequence", []):
        if child.ValueType == "SCOORD":
            ref = child.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            found.append((str(ref), np.array(child.GraphicData, float).reshape(-1, 2)))
        _scoords(child, found)
    return found


def _text(ds) -> str:
    """Every value in a dataset, nested sequences included, untruncated (``str(ds)`` shortens long values)."""
    return "\n".join(f"{e.keyword}={e.value}" for e in ds.iterall() if e.VR != "SQ")


def _box(points: np.ndarray) -> tuple[float, ...]:
    return (points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max())


def test_the_answer_is_an_sr_a_gsps_and_an_sc_per_image_of_the_source_study(study, loc_onnx: Path) -> None:
    import pydicom

    out, files, rows = study
    found = _read(out)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert (len(found["SR"]), len(found["PR"]), len(found["SC"])) == (1, 6, 6)
    every = [d for kind in found.values() for d in kind]
    assert {str(d.StudyInstanceUID) for d in every} == {str(sources[0].StudyInstanceUID)}
    assert len({str(d.SeriesInstanceUID) for d in every}) == 1
    assert {str(d.SeriesInstanceUID) for d in every}.isdisjoint({str(s.SeriesInstanceUID) for s in sources})
    assert {str(d.PatientName) for d in every} == {NAME}  # written and read back in ISO_IR 192
    sr = found["SR"][0]
    text = _text(sr)
    assert "125605004" in text and "Fracture of bone" in text and "Research tool, not for diagnosis" in text
    sha = predict.Predictor(loc_onnx).sha256
    assert sha in text  # TID 4019: the algorithm's version is the model file's sha256
    assert all(re.fullmatch(r"99[A-Z0-9]+|SCT|DCM|UCUM|RFC5646", str(v)) for v in re.findall(r"CodingSchemeDesignator=(.*)", text))
    assert all(str(s.SOPInstanceUID) in text for s in sources)
    assert "Image not read" in text and "pixel data of 1000 bytes is shorter" in text  # the reason, cut to a code meaning's 64 characters


def test_sr_and_gsps_coordinates_are_the_predictors_boxes(study) -> None:
    import pydicom

    out, files, rows = study
    found = _read(out)
    uid_of = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.name for f in files}
    boxes = {name: sorted(tuple(b[k] for k in ("x0", "y0", "x1", "y1")) for b in row["boxes"]) for name, row in rows.items() if name.endswith(".dcm")}
    assert sum(len(b) for b in boxes.values()) >= 2, "the tiny localiser should find boxes on these fractured pictures"
    in_sr: dict[str, list] = {}
    for ref, points in _scoords(found["SR"][0], []):
        assert np.allclose(points[0], points[-1])  # a closed rectangle
        in_sr.setdefault(uid_of[ref], []).append(_box(points))
    for name, expected in boxes.items():
        if name == "broken.dcm":
            continue
        assert np.allclose(sorted(in_sr.get(name, [])), expected, atol=1e-3) if expected else name not in in_sr
    screening = min(float(g.GraphicLayerDescription.split("threshold ")[1]) for g in found["PR"][0].GraphicLayerSequence
                    if g.GraphicLayer == "SCREENING")
    for gsps in found["PR"]:
        name = uid_of[str(gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)]
        assert {g.GraphicLayer for g in gsps.GraphicLayerSequence} == {"SCREENING", "BALANCED"}
        drawn = [_box(np.array(g.GraphicData, float).reshape(-1, 2)) for a in gsps.GraphicAnnotationSequence if a.GraphicLayer == "SCREENING"
                 for g in a.get("GraphicObjectSequence", [])]
        assert all(g.GraphicAnnotationUnits == "PIXEL" for a in gsps.GraphicAnnotationSequence for g in a.get("GraphicObjectSequence", []))
        labels = " ".join(t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence for t in a.TextObjectSequence)
        assert f"p={rows[name]['probability']:.2f}" in labels
        expected = boxes[name] if rows[name]["probability"] > screening else []
        assert np.allclose(sorted(drawn), expected, atol=1e-3)
        # a box's number is named as the map peak it is, never left bare beside the image's probability
        shown = rows[name]["boxes"] if expected else []
        screening_labels = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence if a.GraphicLayer == "SCREENING" for t in a.TextObjectSequence]
        assert sorted(t for t in screening_labels if "map peak" in t) == sorted(f"map peak {b['map_peak']:.2f}" for b in shown)


def test_monochrome1_keeps_its_inverse_presentation_and_scope_is_flagged(study) -> None:
    import pydicom

    out, files, rows = study
    found = _read(out)
    by_source = {str(g.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID): g for g in found["PR"]}
    mono1 = pydicom.dcmread(files[1], stop_before_pixels=True)
    assert by_source[str(mono1.SOPInstanceUID)].PresentationLUTShape == "INVERSE"
    assert by_source[str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)].PresentationLUTShape == "IDENTITY"
    assert out_of_scope(pydicom.dcmread(files[3], stop_before_pixels=True)) == ["body part CHEST", "patient under 18"]
    assert out_of_scope(pydicom.dcmread(files[0], stop_before_pixels=True)) == []
    assert _text(found["SR"][0]).count("Outside the model's scope") == 2
    for sc in found["SC"]:
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"


def test_the_same_inputs_give_the_same_uids_and_other_inputs_are_refused(study, loc_onnx: Path, tmp_path: Path, capsys) -> None:
    out, files, _ = study
    again = tmp_path / "again"
    broken = files[0].parent / "broken.dcm"
    assert predict.main([str(loc_onnx), *map(str, files), str(broken), "--dicom-out", str(again), "--quiet"]) == 1  # broken: one failed row
    assert sorted(p.name for p in again.glob("*.dcm")) == sorted(p.name for p in out.glob("*.dcm"))
    fewer = tmp_path / "fewer"  # another set of sources is another answer, in its own series: no UID in common
    assert predict.main([str(loc_onnx), *map(str, files), "--dicom-out", str(fewer), "--quiet"]) == 0
    assert len(list(fewer.glob("*.dcm"))) == 13 and not {p.name for p in fewer.glob("*.dcm")} & {p.name for p in out.glob("*.dcm")}
    plain = tmp_path / "plain"
    assert predict.main([str(loc_onnx), *map(str, files), "--dicom-out", str(plain), "--no-secondary-capture", "--quiet"]) == 0
    assert sorted(p.name[:2] for p in plain.glob("*.dcm")) == ["PR"] * 6 + ["SR"]
    png = files[0].parent / "plain.png"
    assert predict.main([str(loc_onnx), str(png), "--dicom-out", str(tmp_path / "none"), "--quiet"]) == 1
    assert "not DICOM; --dicom-out answers DICOM inputs only" in capsys.readouterr().err


def dciodvfy_problems(paths: list[Path]) -> list[str]:
    """Every dciodvfy error, and every warning not in the checked-in list (each entry there says why)."""
    allowed = [line.split(" #")[0].strip() for line in ALLOWED.read_text().splitlines() if line.strip() and not line.startswith("#")]
    problems = []
    for path in paths:
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        for line in (done.stdout + done.stderr).splitlines():
            if line.startswith("Error") or (line.startswith("Warning") and not any(a in line for a in allowed)):
                problems.append(f"{path.name}: {line}")
    return problems


def test_every_object_passes_dciodvfy(study) -> None:
    require("dciodvfy")
    out, _, _ = study
    paths = sorted(out.glob("*.dcm"))
    assert len(paths) == 13
    assert dciodvfy_problems(paths) == []


@pytest.mark.parametrize("tags", [dict(PatientSex="U"), dict(StudyDate="2023-01-01", StudyTime="12:00", PatientBirthDate="1990"),
                                  dict(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎"),
                                  dict(SpecificCharacterSet="ISO_IR 100", PatientName="José^Núñez"), dict(PatientOrientation=["AP", "F"]),
                                  dict(PatientAge="abc", PatientSize="NaN", PatientWeight="inf", AcquisitionDateTime="nonsense")],
                         ids=["sex U", "dates and times not in DICOM's form", "ISO 2022 Japanese name", "Latin-1 name", "orientation pair",
                              "age and numbers no reader parses"])
def test_headers_as_real_archives_hold_them_still_get_an_answer(loc_onnx: Path, tmp_path: Path, tags: dict) -> None:
    """Values highdicom would refuse to copy are emptied; names are decoded from the source's set and written in UTF-8."""
    require("dciodvfy")
    import pydicom

    source = tmp_path / "messy.dcm"
    picture = np.rint(255 * radiograph_and_boxes(np.random.default_rng(1), True, "oblique")[0]).astype(np.uint8)
    source.write_bytes(radiograph(picture, "1.2.826.0.1.3680043.10.999.1", **tags))
    assert predict.main([str(loc_onnx), str(source), "--dicom-out", str(tmp_path / "out"), "--quiet"]) == 0
    written = sorted((tmp_path / "out").glob("*.dcm"))
    assert [p.name[:2] for p in written] == ["PR", "SC", "SR"]
    name = str(pydicom.dcmread(source).get("PatientName", ""))
    assert {str(pydicom.dcmread(p).PatientName) for p in written} == {name}
    assert dciodvfy_problems(written) == []


def test_a_viewer_shows_the_source_through_the_presentation_state_as_the_model_saw_it(study, tmp_path: Path) -> None:
    """dcmtk's presentation-state renderer (``dcmp2pgm``: the library dcmtk's viewers use) applies each GSPS's
    windows and presentation LUT to its source: the picture equals the gate's, MONOCHROME1 within a grey level."""
    require("dcmp2pgm")
    import cv2
    import pydicom

    from fracture.imaging import preprocess

    out, files, _ = study
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    for gsps in sorted(out.glob("PR-*.dcm")):
        source = by_uid[str(pydicom.dcmread(gsps).ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)]
        shown = tmp_path / f"{source.stem}.pgm"
        done = subprocess.run(["dcmp2pgm", "-p", str(gsps), str(source), str(shown)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        difference = np.abs(cv2.imread(str(shown), cv2.IMREAD_UNCHANGED).astype(int) - preprocess.read_image(source).astype(int))
        assert difference.max() <= 1, (source.name, difference.max())


def test_a_colour_secondary_capture_is_answered_by_the_sr_and_sc_without_a_grayscale_state(loc_onnx: Path, tmp_path: Path) -> None:
    """A screenshot sent as an RGB Secondary Capture: no GSPS can refer to it (highdicom refuses, rightly)."""
    require("dciodvfy")
    from fracture.data.synth import dicom_bytes

    picture = np.rint(255 * radiograph_and_boxes(np.random.default_rng(2), True, "transverse")[0]).astype(np.uint8)
    rgb = np.repeat(picture[:, :, None], 3, axis=2)
    source = tmp_path / "screenshot.dcm"
    source.write_bytes(dicom_bytes(*picture.shape, rgb.tobytes(), "1.2.840.10008.1.2.1", samples=3, bits=8, photometric="RGB", sop_class=SC,
                                   Modality="OT", PatientName=NAME, SpecificCharacterSet="ISO_IR 192"))
    assert predict.main([str(loc_onnx), str(source), "--dicom-out", str(tmp_path / "out"), "--quiet"]) == 0
    written = sorted((tmp_path / "out").glob("*.dcm"))
    assert [p.name[:2] for p in written] == ["SC", "SR"]
    assert dciodvfy_problems(written) == []


def test_one_image_whose_objects_cannot_be_built_does_not_cost_the_study_its_answer(loc_onnx: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """A header a library refuses to copy into one image's presentation state or capture: that object is left out
    with a log line naming the exception's type only (its text may quote patient data); the study's SR and the
    other images' objects are still written."""
    from fracture.deploy.pacs.results import ResultWriter

    picture = np.rint(255 * radiograph_and_boxes(np.random.default_rng(3), True, "transverse")[0]).astype(np.uint8)
    files = [tmp_path / f"{i}.dcm" for i in range(2)]
    for i, f in enumerate(files):
        f.write_bytes(radiograph(picture, "1.2.826.0.1.3680043.10.999.2", sop_class=(DX, CR)[i], PatientName=NAME, SpecificCharacterSet="ISO_IR 192"))
    refused = str(__import__("pydicom").dcmread(files[1]).SOPInstanceUID)
    state, capture = ResultWriter.presentation_state, ResultWriter.capture

    def picky(build):
        def wrapped(self, r, *args):
            if str(r.header.SOPInstanceUID) == refused:
                raise ValueError(f"value {NAME} refused")  # as highdicom's and pydicom's messages do: they quote values
            return build(self, r, *args)
        return wrapped

    monkeypatch.setattr(ResultWriter, "presentation_state", picky(state))
    monkeypatch.setattr(ResultWriter, "capture", picky(capture))
    with caplog.at_level("WARNING", logger="fracture.dicom"):
        assert predict.main([str(loc_onnx), *map(str, files), "--dicom-out", str(tmp_path / "out"), "--quiet"]) == 0
    written = sorted((tmp_path / "out").glob("*.dcm"))
    assert [p.name[:2] for p in written] == ["PR", "SC", "SR"]
    assert "no presentation state (ValueError)" in caplog.text and "no secondary capture (ValueError)" in caplog.text
    assert NAME not in caplog.text
    sr = __import__("pydicom").dcmread(next(p for p in written if p.name.startswith("SR")))
    assert refused in json.dumps(sr.to_json_dict())  # the SR still answers for that image


def test_uids_an_answer_could_not_quote_are_refused_and_the_source_is_never_changed() -> None:
    """A StudyInstanceUID like "../../x" or of 202 digits once got answers that were not DICOM; a leading zero (old
    archives have them) still passes, since an answer must quote the source's UID as it is."""
    import pydicom

    from fracture.deploy.pacs.source import header_of

    picture = np.rint(255 * radiograph_and_boxes(np.random.default_rng(4), False, "")[0]).astype(np.uint8)
    for uid, ok in [("../../../tmp/evil", False), ("1." + "2" * 200, False), ("1.2.3 4", False), ("1.2.03.4", True), ("1.2.826.0.1.3680043.10.999.3", True)]:
        source = pydicom.dcmread(__import__("io").BytesIO(radiograph(picture, uid, PatientAge="abc", PatientSize="NaN")))
        if not ok:
            with pytest.raises(ValueError, match="StudyInstanceUID not a valid DICOM UID"):
                header_of(source)
            continue
        header = header_of(source)
        assert str(header.StudyInstanceUID) == uid
        assert header.PatientAge in (None, "") and header.PatientSize in (None, "")  # emptied in the copy ...
        assert str(source.PatientAge) == "abc" and str(source.PatientSize) == "NaN"  # ... never in the source
