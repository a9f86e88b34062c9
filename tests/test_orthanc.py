"""The node between a real modality and a real PACS: dcmtk's ``storescu`` sends a study of DICOM variants to the
node, the node's SR, presentation states and Secondary Captures arrive in Orthanc (checked through its REST
API); and Orthanc pushes a study to the node (``/modalities/{id}/store``) and gets its answer back."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
from pacs import CR, DX, J2K, JLS, RLE, SC, Orthanc, free_port, radiograph, require, start_node, stop

from fracture.data.synth import FRACTURE_TYPES, radiograph_and_boxes


def _study(folder: Path, uid: str, n: int, seed: int) -> list[Path]:
    variants = [dict(sop_class=DX, bits=12), dict(sop_class=CR, bits=8, photometric="MONOCHROME1", syntax=RLE), dict(sop_class=SC, bits=8),
                dict(sop_class=DX, bits=12, syntax=J2K), dict(sop_class=DX, bits=12, syntax=JLS)]
    files = []
    for i in range(n):
        picture = np.rint(255 * radiograph_and_boxes(np.random.default_rng(seed + i), True, FRACTURE_TYPES[i % 4])[0]).astype(np.uint8)
        files.append(folder / f"s{seed}-{i}.dcm")
        files[-1].write_bytes(radiograph(picture, uid, PatientName="Ünal^Zoë", SpecificCharacterSet="ISO_IR 192", **variants[i % len(variants)]))
    return files


def _answers(orthanc: Orthanc, study_uid: str, expected: int, timeout: float = 90.0) -> dict[str, list[dict]]:
    """Modality → the tags of each instance Orthanc holds for a study, once ``expected`` have arrived."""
    end = time.monotonic() + timeout
    while True:
        found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
        if len(found) >= expected or time.monotonic() > end:
            break
        time.sleep(0.5)
    tags: dict[str, list[dict]] = {}
    for instance in found:
        these = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        tags.setdefault(these.get("Modality", ""), []).append(these)
    return tags


def _counts(tags: dict[str, list]) -> dict[str, int]:
    return {k: len(v) for k, v in tags.items()}


def test_storescu_to_the_node_to_orthanc_and_an_orthanc_push_back(loc_onnx: Path, tmp_path: Path) -> None:
    require("Orthanc", "storescu")
    from pydicom.uid import generate_uid

    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc")
    node = None
    try:
        # --quiet 5: the five storescu runs below are one study, sent one after another; on a loaded machine they
        # must still land within one quiet period, or the study is (correctly) answered twice
        node = start_node(loc_onnx, tmp_path / "spool", f"ORTHANC@127.0.0.1:{orthanc.dicom}", port, "--quiet", "5")
        first = generate_uid()
        _study(tmp_path, first, 5, seed=0)  # explicit 12-bit, RLE MONOCHROME1, 8-bit SC, JPEG 2000, JPEG-LS
        # a modality sends in its own syntax: storescu proposes one compressed syntax (and the uncompressed ones) per run
        for flag, name in (("-xe", "s0-0"), ("-xr", "s0-1"), ("-xe", "s0-2"), ("-xv", "s0-3"), ("-xt", "s0-4")):
            done = subprocess.run(["storescu", flag, "-aet", "MODALITY", "-aec", "FRACTURE", "127.0.0.1", str(port), str(tmp_path / f"{name}.dcm")],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and "Failed" not in done.stderr, done.stderr
        log = (tmp_path / "node.log").read_text()
        for syntax in ("RLE Lossless", "JPEG 2000 Image Compression (Lossless Only)", "JPEG-LS Lossless Image Compression", "Explicit VR Little Endian"):
            assert syntax in log  # received as the modality compressed it, not converted on the way
        answers = _answers(orthanc, first, 11)
        assert _counts(answers) == {"SR": 1, "PR": 5, "OT": 5}
        assert {t["PatientName"] for kind in answers.values() for t in kind} == {"Ünal^Zoë"}
        assert answers["SR"][0]["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR

        second = generate_uid()  # a study already in the PACS, pushed to the node once it is registered there
        orthanc.put("/modalities/node", {"AET": "FRACTURE", "Host": "127.0.0.1", "Port": port})
        assert orthanc.post("/modalities/node/echo", {}) in ({}, None)
        ids = [orthanc.post("/instances", path.read_bytes())["ID"] for path in _study(tmp_path, second, 2, seed=20)]
        pushed = orthanc.post("/modalities/node/store", {"Resources": ids, "Synchronous": True})
        assert pushed["FailedInstancesCount"] == 0 and pushed["InstancesCount"] == 2
        assert _counts(_answers(orthanc, second, 2 + 5)) == {"DX": 1, "CR": 1, "SR": 1, "PR": 2, "OT": 2}
    finally:
        if node is not None:
            stop(node)
        orthanc.stop()
