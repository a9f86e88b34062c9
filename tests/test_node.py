"""The DICOM node as a child process on loopback, a pynetdicom sender as the modality and a counting Storage SCP
as the PACS: studies are answered and delivered, refusals are clean and logged, a late image supersedes the
answer, and nothing is lost when the node is SIGKILLed or the destination is down."""

from __future__ import annotations

import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from pacs import CR, DX, SC, Destination, free_port, radiograph, require, send, start_node, stop

from fracture.data.synth import FRACTURE_TYPES, radiograph_and_boxes

SECRET = "PID-7731-SECRET"
NAME = "Østergård^Åse"


def pictures(n: int, seed: int = 0) -> list[np.ndarray]:
    return [np.rint(255 * radiograph_and_boxes(np.random.default_rng(seed + i), i % 2 == 0, FRACTURE_TYPES[i % 4] if i % 2 == 0 else "")[0])
            .astype(np.uint8) for i in range(n)]


def study_files(n: int, seed: int = 0, **tags) -> list[bytes]:
    from pydicom.uid import generate_uid

    uid = generate_uid()
    classes = [DX, CR, SC]
    tags = {"PatientID": SECRET, "PatientName": NAME, "SpecificCharacterSet": "ISO_IR 192", **tags}
    return [radiograph(p, uid, sop_class=classes[i % 3], bits=12 if classes[i % 3] == DX else 8, **tags) for i, p in enumerate(pictures(n, seed))]


def sop_uid(data: bytes) -> str:
    import io

    import pydicom

    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def of_study(received: list, data: bytes) -> list:
    import io

    import pydicom

    study = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID
    return [d for d in received if d.StudyInstanceUID == study]


@pytest.fixture()
def destination():
    require()
    dest = Destination()
    yield dest
    dest.stop()


def test_a_study_is_answered_in_dicom_and_the_spool_keeps_no_patient_data_in_sight(loc_onnx: Path, destination, tmp_path: Path) -> None:
    port, spool = free_port(), tmp_path / "spool"
    node = start_node(loc_onnx, spool, f"DEST@127.0.0.1:{destination.port}", port, "--quiet", "2")  # a study's images well within it
    try:
        # values libraries like to quote in warnings: a one-component name, a code string that is not one
        files = study_files(3) + study_files(1, seed=9, PatientName="Kowalski Jan", BodyPartExamined=f"hand {SECRET.lower()}")
        assert send(files[:3], port) == [0, 0, 0] and send(files[3:], port) == [0]
        got = [d for d in destination.wait(7 + 3) if d.PatientName == NAME]  # a GSPS and an SC per image, one SR per study
        time.sleep(0.5)
    finally:
        stop(node)
    kinds = sorted(str(d.Modality) for d in got)
    assert kinds == ["OT", "OT", "OT", "PR", "PR", "PR", "SR"]
    assert max(destination.counts.values()) == 1
    sr = next(d for d in got if d.Modality == "SR")
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence
                for i in r.ReferencedSOPSequence}
    assert evidence == {sop_uid(f) for f in files[:3]}
    assert {str(d.PatientName) for d in got} == {NAME} and {str(d.PatientID) for d in got} == {SECRET}
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    assert not list((spool / "incoming").rglob("*.dcm")) and not list((spool / "outbox").iterdir())  # emptied once delivered
    names = " ".join(str(p.relative_to(spool)) for p in spool.rglob("*"))
    log = (tmp_path / "node.log").read_text(encoding="utf-8")
    for secret in (SECRET, SECRET.lower(), NAME, "Østergård", "Kowalski", sop_uid(files[0])):
        assert secret not in log and secret not in names
    assert "answered study" in log and "delivered 7 object(s)" in log and "delivered 3 object(s)" in log


def test_refusals_are_clean_and_logged(loc_onnx: Path, destination, tmp_path: Path) -> None:
    port, spool = free_port(), tmp_path / "spool"
    node = start_node(loc_onnx, spool, f"DEST@127.0.0.1:{destination.port}", port, "--quiet", "0.5", "--allow", "MODALITY", "PROBE",
                      "--max-decode-mb", "8")
    try:
        good = study_files(1)
        assert send(good, port, calling="INTRUDER") == [None]  # association rejected: calling AE title not allowed
        ct = radiograph(pictures(1)[0], "1.2.3.4", sop_class="1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
        raw = radiograph(pictures(1)[0], "1.2.3.5", sop_class="1.2.840.10008.5.1.4.1.1.1.1.1")  # DX for processing
        assert send([ct], port) == [None] and send([raw], port) == [None]
        assert send(good, port, syntaxes=("1.2.840.10008.1.2.1.99",)) == [None]  # Deflated: not a syntax the gate decodes
        from fracture.data.synth import dicom_bytes

        short = dicom_bytes(512, 512, b"\0" * 1000, "1.2.840.10008.1.2.1", StudyInstanceUID="1.2.3.6")  # pixel data shorter than declared
        huge = dicom_bytes(20000, 20000, b"\0" * 64, "1.2.840.10008.1.2.1", StudyInstanceUID="1.2.3.7")
        costly = dicom_bytes(1500, 1500, b"\0" * 1500 * 1500 * 2, "1.2.840.10008.1.2.1", StudyInstanceUID="1.2.3.8")  # 4.5 MB: its decode is not
        bulky = dicom_bytes(2100, 2100, b"\0" * 2100 * 2100 * 2, "1.2.840.10008.1.2.1", StudyInstanceUID="1.2.3.9")  # 8.8 MB: the file is not
        statuses = send([short, huge, costly, bulky], port)
        assert statuses == [0xC000, 0xC000, 0xC000, 0xA700]
        endless = dicom_bytes(4000, 4000, b"\0" * 4000 * 4000 * 2, "1.2.840.10008.1.2.1", StudyInstanceUID="1.2.3.10")  # 32 MB
        assert send([endless], port) == [None]  # cut off while it arrives: the association is aborted
        time.sleep(0.5)
        assert not list((spool / "receiving").iterdir())  # and what had arrived is gone
        time.sleep(1.5)
    finally:
        stop(node)
    log = (tmp_path / "node.log").read_text()
    assert "refused an association from INTRUDER" in log
    assert "1.2.840.10008.5.1.4.1.1.2 (SOP class not a radiograph this model reads)" in log
    assert "DX for processing (raw detector data the model never saw)" in log
    assert "transfer syntax not decoded here" in log
    assert "shorter than the" in log and "over the 100 MP limit" in log and "over the 8 MB decode budget" in log
    assert "8.4 MB, over the 8 MB decode budget" in log
    assert "aborted an association from MODALITY: an instance over the 8 MB decode budget was still arriving" in log
    assert "Traceback" not in log
    assert not list((spool / "incoming").rglob("*.dcm")) and destination.counts == {}


def test_a_late_image_gets_a_new_answer_that_supersedes_the_first(loc_onnx: Path, destination, tmp_path: Path) -> None:
    port, spool = free_port(), tmp_path / "spool"
    node = start_node(loc_onnx, spool, f"DEST@127.0.0.1:{destination.port}", port, "--quiet", "0.5")
    try:
        files = study_files(2)
        assert send(files[:1], port) == [0]
        first = destination.wait(3)
        assert send(files[1:], port) == [0]
        every = destination.wait(7)  # the new answer: an SR, a GSPS for both images, an SC for the new one
        assert send(files[1:], port) == [0]  # the same instance again: already answered, nothing new
        time.sleep(2)
    finally:
        stop(node)
    assert len(destination.received) == 7 and max(destination.counts.values()) == 1
    sc = next(d for d in every if d.Modality == "OT")  # a routing rule sends the node its own Secondary Capture
    node = start_node(loc_onnx, spool, f"DEST@127.0.0.1:{destination.port}", port, "--quiet", "0.5")
    try:
        import io

        out = io.BytesIO()
        sc.save_as(out, enforce_file_format=True)
        assert send([out.getvalue()], port) == [0]  # acknowledged, not answered: answering it would answer forever
        time.sleep(2)
    finally:
        stop(node)
    assert len(destination.received) == 7 and "one of this node's own answers" in (tmp_path / "node.log").read_text()
    srs = [d for d in every if d.Modality == "SR"]
    assert len(srs) == 2
    old, new = (srs[0], srs[1]) if srs[0].SOPInstanceUID == next(d for d in first if d.Modality == "SR").SOPInstanceUID else (srs[1], srs[0])
    predecessor = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert predecessor == old.SOPInstanceUID
    assert len({str(i.ReferencedSOPInstanceUID) for s in new.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence
                for i in r.ReferencedSOPSequence}) == 2
    assert old.SeriesInstanceUID != new.SeriesInstanceUID
    in_new = [d for d in every if d.SeriesInstanceUID == new.SeriesInstanceUID]
    assert sorted(str(d.Modality) for d in in_new) == ["OT", "PR", "PR", "SR"]  # the whole study's states, the new image's SC
    states = {str(d.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID) for d in in_new if d.Modality == "PR"}
    assert states == {sop_uid(f) for f in files}


def test_nothing_is_lost_when_the_node_is_killed_and_the_destination_is_down(loc_onnx: Path, tmp_path: Path) -> None:
    require()
    port, spool, dest_port = free_port(), tmp_path / "spool", free_port()
    forward = f"DEST@127.0.0.1:{dest_port}"
    a, b = study_files(2, seed=0), study_files(2, seed=10)
    node = start_node(loc_onnx, spool, forward, port, "--quiet", "2", "--retry-max", "1")
    try:
        assert send(a, port) == [0, 0]  # study A: answered, but the destination is down
        end, log = time.monotonic() + 60, tmp_path / "node.log"
        while "could not deliver" not in log.read_text() and time.monotonic() < end:  # built, tried, failed: waiting to retry
            time.sleep(0.1)
        built = sorted(p.name for p in (spool / "outbox").glob("[!.]*/*.dcm"))
        assert len(built) == 5
        assert send(b[:1], port) == [0]  # study B half received ...
    finally:
        node.send_signal(signal.SIGKILL)  # ... when the node dies
        node.wait()
    import pydicom

    before = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (spool / "outbox").glob("[!.]*/*.dcm")}
    destination = Destination(dest_port)
    # a restarted node waits --quiet before answering what it holds, as it would for a study still arriving; 5 s
    # (not 0.5) so that study B's second image, sent at once, is in time on a loaded machine (else B is answered
    # twice, correctly: once alone, then superseded - 12 objects, not the 10 counted below; seen once in CI)
    node = start_node(loc_onnx, spool, forward, port, "--quiet", "5", "--retry-max", "1")
    try:
        assert send(b[1:], port) == [0]
        got = destination.wait(10)
        time.sleep(1)
    finally:
        stop(node)
        destination.stop()
    assert len(destination.counts) == 10 and max(destination.counts.values()) <= 2  # at most one resend per object
    assert {str(d.SOPInstanceUID) for d in of_study(got, a[0])} == before  # the same UIDs as built before the crash
    sr_b = next(d for d in of_study(got, b[0]) if d.Modality == "SR")
    assert {str(i.ReferencedSOPInstanceUID) for s in sr_b.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence
            for i in r.ReferencedSOPSequence} == {sop_uid(f) for f in b}
    assert not list((spool / "incoming").rglob("*.dcm"))


def test_idle_associations_and_silent_connections_cannot_block_a_real_sender(loc_onnx: Path, destination, tmp_path: Path) -> None:
    import socket

    from pynetdicom import AE

    port = free_port()
    node = start_node(loc_onnx, tmp_path / "spool", f"DEST@127.0.0.1:{destination.port}", port, "--quiet", "0.5", "--max-associations", "2",
                      "--timeout", "2")
    idle, silent = [], []
    try:
        for _ in range(2):  # associations that are opened and then say nothing
            ae = AE("IDLER")
            ae.add_requested_context("1.2.840.10008.1.1")
            ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
            end = time.monotonic() + 10
            while True:  # start_node's C-ECHO probe may still hold a slot for a moment (seen once in CI on a loaded machine)
                idle.append(ae.associate("127.0.0.1", port, ae_title="NODE"))
                if idle[-1].is_established or time.monotonic() > end:
                    break
                idle.pop()
                time.sleep(0.2)
            assert idle[-1].is_established
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # TCP connections that never associate
        files = study_files(1)
        started = time.monotonic()
        assert send(files, port) == [None]  # every slot taken: refused at once, not left hanging
        assert time.monotonic() - started < 2
        time.sleep(3)  # past --timeout: the node has closed the idle associations and the silent connections
        assert not any(a.is_established for a in idle)
        assert send(files, port) == [0]
        destination.wait(3)
    finally:
        for s in silent:
            s.close()
        for a in idle:
            a.abort() if a.is_established else None
        stop(node)


def test_a_pdu_declaring_gigabytes_or_trickling_in_is_cut_off(loc_onnx: Path, destination, tmp_path: Path) -> None:
    """pynetdicom reads a PDU whole, of any declared length, and waits as long as bytes trickle in: before the node
    bounded its reads, a 2 GB association request streamed at it grew the node by 600 MB, and two requests
    trickling a byte every 0.5 s held both slots of a cap of 2 for as long as they liked."""
    import socket
    import struct
    import threading

    from pacs import echo

    port = free_port()
    node = start_node(loc_onnx, tmp_path / "spool", f"DEST@127.0.0.1:{destination.port}", port, "--max-associations", "2", "--timeout", "2")
    trickling = []
    try:
        big = socket.create_connection(("127.0.0.1", port))
        big.sendall(struct.pack(">BBL", 1, 0, 2**31))  # A-ASSOCIATE-RQ, 2 GB long
        sent, chunk = 0, b"\0" * (1 << 20)
        with pytest.raises(OSError):  # the node closes the connection ...
            while sent < 256 << 20:
                big.sendall(chunk)
                sent += len(chunk)
        assert sent < 32 << 20  # ... long before it could have been read into memory
        big.close()
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(struct.pack(">BBL", 1, 0, 1000))
            trickling.append(s)

        def trickle(s: socket.socket) -> None:
            try:
                for _ in range(120):
                    s.sendall(b"\0")
                    time.sleep(0.5)
            except OSError:
                pass

        for s in trickling:
            threading.Thread(target=trickle, args=(s,), daemon=True).start()
        end = time.monotonic() + 20
        while not echo(port) and time.monotonic() < end:
            time.sleep(0.5)
        assert time.monotonic() < end, "two trickling requests still hold both slots"
        assert send(study_files(1, seed=80), port) == [0]
    finally:
        for s in trickling:
            s.close()
        stop(node)
    log = (tmp_path / "node.log").read_text()
    assert "a PDU of 2147483648 bytes, over the 1048576 this node reads" in log
    assert log.count("a PDU still arriving after 2 s") >= 2 and "Traceback" not in log


def test_the_node_benchmark_loses_nothing_at_two_senders_by_three_studies(loc_onnx: Path, tmp_path: Path) -> None:
    """CI's small run of ``scripts/benchmark_node.py`` (the full one is 4 x 25): every object arrives, once."""
    import json
    import subprocess
    import sys

    require()
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "scripts/benchmark_node.py", str(loc_onnx), "--senders", "2", "--studies", "3", "--size", "384",
                           "--quiet", "2", "--alone", "1", "--json", str(out)], cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert (figures["lost"], figures["objects_received"], figures["resent"], figures["studies_answered"]) == (0, 30, 0, 6)
    assert figures["instances_acknowledged"] == figures["instances_sent"] == 12
    assert 2 <= figures["latency_p50_s"] <= figures["latency_p95_s"]


def test_a_study_that_cannot_be_answered_is_set_aside_not_lost_and_does_not_hold_up_others(loc_onnx: Path, destination, tmp_path: Path) -> None:
    import io

    import pydicom

    from fracture.deploy.pacs.spool import digest

    port, spool = free_port(), tmp_path / "spool"
    node = start_node(loc_onnx, spool, f"DEST@127.0.0.1:{destination.port}", port, "--quiet", "0.3")
    try:
        bad, good = study_files(1, seed=30), study_files(1, seed=40)
        study = digest(str(pydicom.dcmread(io.BytesIO(bad[0]), stop_before_pixels=True).StudyInstanceUID))
        (spool / "reported" / f"{study}.json").write_text("{ damaged")  # its record of earlier answers is unreadable
        assert send(bad, port) == [0]
        log, end = tmp_path / "node.log", time.monotonic() + 60
        while "set aside after 3 attempts" not in log.read_text() and time.monotonic() < end:
            time.sleep(0.1)
        assert send(good, port) == [0]
        got = destination.wait(3)
    finally:
        stop(node)
    assert len(list(spool.glob(f"failed/{study}-*/*.dcm"))) == 1  # kept for a person to look at
    assert {str(d.StudyInstanceUID) for d in got} == {str(pydicom.dcmread(io.BytesIO(good[0]), stop_before_pixels=True).StudyInstanceUID)}
    assert log.read_text().count(f"could not answer study {study}") == 3


def test_a_refusing_or_limited_destination_holds_up_nothing(loc_onnx: Path, tmp_path: Path) -> None:
    """A destination that refuses one study's objects and does not take presentation states at all: the other
    study is delivered meanwhile, the refused one once it is accepted, the presentation states kept aside."""
    require()
    import io

    import pydicom

    a, b = study_files(1, seed=50), study_files(1, seed=60)
    refused_study = str(pydicom.dcmread(io.BytesIO(a[0]), stop_before_pixels=True).StudyInstanceUID)
    refusing = {"on": True}
    gsps = "1.2.840.10008.5.1.4.1.1.11.1"
    destination = Destination(refuse=lambda ds: 0xA700 if refusing["on"] and ds.StudyInstanceUID == refused_study else None, without=(gsps,))
    port, spool = free_port(), tmp_path / "spool"
    node = start_node(loc_onnx, spool, f"DEST@127.0.0.1:{destination.port}", port, "--quiet", "0.3", "--retry-max", "1")
    try:
        assert send(a, port) == [0]
        log, end = tmp_path / "node.log", time.monotonic() + 60
        while "refused" not in log.read_text().split("listening", 1)[1] and time.monotonic() < end:
            time.sleep(0.1)
        assert send(b, port) == [0]
        got = destination.wait(2)  # study B's SR and SC, while A's answer waits
        assert {str(d.StudyInstanceUID) for d in got} == {str(pydicom.dcmread(io.BytesIO(b[0]), stop_before_pixels=True).StudyInstanceUID)}
        refusing["on"] = False
        got = destination.wait(4)  # and A's, once the destination takes it
    finally:
        stop(node)
        destination.stop()
    assert sorted(str(d.Modality) for d in got) == ["OT", "OT", "SR", "SR"] and max(destination.counts.values()) == 1
    text = log.read_text()
    assert f"does not take SOP class {gsps}" in text and "(status 0xA700); that answer waits" in text
    assert len(list(spool.glob("undeliverable/*/*-gsps.dcm"))) == 2 and not list(spool.glob("outbox/*/*.dcm"))


def test_a_nearly_full_spool_disk_refuses_instances_and_a_full_one_never_sets_a_study_aside(loc_onnx: Path, destination, tmp_path: Path) -> None:
    """Out of disk, the sender keeps its image (status A700, it retries later) rather than the node acknowledging what
    it cannot keep; a full disk while answering is retried after the quiet wait, never counted against the study."""
    import errno

    from fracture.deploy.pacs.node import Node
    from fracture.deploy.predictor import Predictor

    port, spool = free_port(), tmp_path / "spool"
    node = start_node(loc_onnx, spool, f"DEST@127.0.0.1:{destination.port}", port, "--min-free-mb", str(2**40))  # more than any disk
    try:
        assert send(study_files(2, seed=70), port) == [0xA700, 0xA700]
        # what the gate refuses is refused for its own reason first: a rescale that is not a number, a UID no answer could quote
        from fracture.data.synth import dicom_bytes

        blank = dicom_bytes(256, 256, b"\0" * 256 * 256 * 2, "1.2.840.10008.1.2.1", RescaleSlope="NaN")
        unquotable = dicom_bytes(256, 256, b"\0" * 256 * 256 * 2, "1.2.840.10008.1.2.1", StudyInstanceUID="../../../tmp/x")
        assert send([blank, unquotable], port) == [0xC000, 0xC000]
    finally:
        stop(node)
    log = (tmp_path / "node.log").read_text()
    assert log.count("spool disk nearly full") == 2 and "Traceback" not in log
    assert "display values (window, LUT, padding, colour table) cannot be applied" in log and "StudyInstanceUID not a valid DICOM UID" in log
    assert not list((spool / "incoming").rglob("*.dcm"))

    inside = Node(Predictor(str(loc_onnx)), tmp_path / "spool2", ("DEST", "127.0.0.1", destination.port), quiet=0.0)

    def full(study: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    inside.answer = full
    for _ in range(5):
        inside.last_seen.pop("0123456789abcdef", None)
        inside.answer_or_set_aside("0123456789abcdef")
        assert "0123456789abcdef" in inside.last_seen  # due again after the quiet wait
    assert inside.attempts == {} and not (tmp_path / "spool2" / "failed").exists()
