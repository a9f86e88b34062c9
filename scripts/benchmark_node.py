"""Load test of the DICOM node on loopback: several modalities send studies at once; every answer is counted.

    python scripts/benchmark_node.py MODEL.onnx [--senders 4] [--studies 25] [--images 2] [--size 1024] [--quiet 2]

Starts ``python -m fracture.node MODEL`` on a free loopback port with a counting Storage SCP as its
destination (the tests' own, ``tests/pacs.py``), then ``--senders`` threads each send ``--studies``
studies of ``--images`` synthetic 12-bit DX radiographs (``--size`` px on the long side), one association
per study, all at once (a burst: later studies queue behind earlier ones). Before the burst, ``--alone``
studies go one at a time, each answered before the next: the latency without a queue. Prints instances sent and acknowledged, result objects expected and received, **lost** (expected
but never received) and resent objects, and the latency from a study's last instance acknowledged to its
Structured Report stored at the destination (the SR is each answer's last object): p50 / p95, with and
without the ``--quiet`` wait the node keeps before answering; the node's peak memory (VmHWM) and the CPU.
``--json`` writes the figures. The senders and the destination share the CPU with the node.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pacs", REPO / "tests" / "pacs.py")
pacs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pacs)


def make_studies(n: int, images: int, size: int, seed: int, real: list[Path] | None = None, blob_mb: int = 0) -> list[list[bytes]]:
    """``n`` studies of ``images`` 12-bit DX each: synthetic pictures, or the next of ``real`` radiographs (read
    through the gate, as they are); each with a private blob of ``blob_mb`` MB when asked (as some modalities
    carry raw data or vendor previews in private tags)."""
    from pydicom.uid import generate_uid

    from fracture.data.synth import FRACTURE_TYPES, radiograph_and_boxes
    from fracture.imaging import preprocess

    rng = np.random.default_rng(seed)
    shape = (size, int(size * 0.8))
    out = []
    for s in range(n):
        uid = generate_uid()
        if real:
            pictures = [preprocess.read_image(real.pop(0)) for _ in range(images)]
        else:
            pictures = [np.rint(255 * radiograph_and_boxes(rng, bool(rng.random() < 0.5), str(rng.choice(FRACTURE_TYPES)), shape=shape)[0])
                        .astype(np.uint8) for _ in range(images)]
        out.append([with_blob(pacs.radiograph(p, uid, PatientID=f"bench{seed}-{s}"), blob_mb) for p in pictures])
    return out


def with_blob(data: bytes, mb: int) -> bytes:
    if not mb:
        return data
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.add_new((0x0009, 0x0010), "LO", "FRACTURE BENCH")
    ds.add_new((0x0009, 0x1001), "OB", bytes(mb << 20))
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dciodvfy_errors(datasets: list, folder: Path) -> list[str]:
    """Every error dicom3tools' validator reports on the objects received."""
    import subprocess

    errors = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors += [f"{ds.Modality}: {line}" for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    return errors


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/benchmark_node.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--studies", type=int, default=25, help="studies per sender")
    parser.add_argument("--images", type=int, default=2, help="images per study")
    parser.add_argument("--size", type=int, default=1024, help="long side of each synthetic radiograph in pixels")
    parser.add_argument("--quiet", type=float, default=2.0, help="the node's --quiet: seconds a study must be still before it is answered")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up waiting for answers after this many seconds")
    parser.add_argument("--alone", type=int, default=3, help="studies sent one at a time first, each answered before the next (latency without a queue)")
    parser.add_argument("--pictures", type=Path, help="a folder of real radiographs to send (as 12-bit DX) instead of synthetic ones")
    parser.add_argument("--blob-mb", type=int, default=0, help="a private blob of this many MB in each instance (memory under large files)")
    parser.add_argument("--validate", action="store_true", help="run dciodvfy (dicom3tools) on every object received and count its errors")
    parser.add_argument("--json", type=Path, help="write the figures here")
    ns = parser.parse_args(args)

    print(f"writing {ns.senders} x {ns.studies} studies of {ns.images} image(s) ...", file=sys.stderr)
    from fracture.imaging import preprocess

    real = sorted(p for p in ns.pictures.rglob("*") if preprocess.is_image_file(p)) if ns.pictures else None
    if real is not None:
        np.random.default_rng(0).shuffle(real)
        if len(real) < ns.senders * ns.studies * ns.images:
            parser.error(f"{ns.pictures} holds {len(real)} images; {ns.senders * ns.studies * ns.images} are needed")
    batches = [make_studies(ns.studies, ns.images, ns.size, seed, real, ns.blob_mb) for seed in range(ns.senders)]
    study_of = {}
    import io

    import pydicom

    for batch in batches:
        for files in batch:
            study_of[str(pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True).StudyInstanceUID)] = files
    expected = len(study_of) * (1 + 2 * ns.images)  # an SR per study, a GSPS and an SC per image

    destination = pacs.Destination()
    work = Path(tempfile.mkdtemp(prefix="bench-node-"))
    port = pacs.free_port()
    node = pacs.start_node(ns.model, work / "spool", f"DEST@127.0.0.1:{destination.port}", port, "--quiet", str(ns.quiet), log=work / "node.log")
    last_ack: dict[str, float] = {}
    statuses: list[int | None] = []
    lock = threading.Lock()

    alone = []  # first, studies one at a time, each answered before the next: latency without a queue
    for files in make_studies(ns.alone, ns.images, ns.size, seed=1000):
        assert pacs.send(files, port, calling="ALONE") == [0] * len(files)
        sent = time.monotonic()
        before = len(destination.counts)
        while len(destination.counts) < before + 1 + 2 * ns.images and time.monotonic() < sent + ns.timeout:
            time.sleep(0.02)
        alone.append(time.monotonic() - sent)
    destination.counts.clear()
    destination.received.clear()

    def sender(k: int) -> None:
        for files in batches[k]:
            got = pacs.send(files, port, calling=f"MODALITY{k}")
            study = str(pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True).StudyInstanceUID)
            with lock:
                statuses.extend(got)
                last_ack[study] = time.monotonic()

    started = time.monotonic()
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(ns.senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent_s = time.monotonic() - started
    end = time.monotonic() + ns.timeout
    while len(destination.counts) < expected and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(1.0)  # anything resent arrives now
    try:
        peak = next(int(line.split()[1]) for line in open(f"/proc/{node.pid}/status") if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        peak = float("nan")
    pacs.stop(node)
    destination.stop()
    total_s = time.monotonic() - started

    arrived = {str(d.StudyInstanceUID): destination.first_seen[str(d.SOPInstanceUID)] for d in destination.received if d.Modality == "SR"}
    latency = [arrived[s] - last_ack[s] for s in study_of if s in arrived and s in last_ack]
    errors = dciodvfy_errors(destination.received, work) if ns.validate else []
    from fracture.machine import cpu_name

    figures = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "model": ns.model.name, "senders": ns.senders, "studies": len(study_of), "images_per_study": ns.images,
        "size": ns.size, "quiet_s": ns.quiet, "instances_sent": len(statuses), "instances_acknowledged": sum(s == 0 for s in statuses),
        "objects_expected": expected, "objects_received": len(destination.counts), "lost": expected - len(destination.counts),
        "resent": sum(c - 1 for c in destination.counts.values()), "studies_answered": len(arrived),
        "latency_p50_s": percentile(latency, 50), "latency_p95_s": percentile(latency, 95),
        "latency_beyond_quiet_p50_s": percentile([v - ns.quiet for v in latency], 50),
        "latency_beyond_quiet_p95_s": percentile([v - ns.quiet for v in latency], 95),
        "alone_latency_p50_s": percentile(alone, 50), "alone_latency_max_s": max(alone) if alone else float("nan"),
        "burst_answered_s": (max(arrived.values()) - started) if arrived else float("nan"),
        "studies_per_s": len(arrived) / (max(arrived.values()) - started) if arrived else float("nan"), "sending_s": sent_s,
        "pictures": str(ns.pictures or "synthetic"), "dciodvfy_errors": len(errors) if ns.validate else None, "total_s": total_s, "node_peak_mb": peak,
    }
    print(f"CPU: {figures['cpu']}, {figures['cores']} cores; model {ns.model.name}; {ns.senders} senders x {ns.studies} studies x {ns.images} images "
          f"of {ns.pictures or f'{ns.size} px synthetic'}; --quiet {ns.quiet:g} s")
    print(f"instances: {figures['instances_sent']} sent, {figures['instances_acknowledged']} acknowledged in {sent_s:.1f} s")
    print(f"answers:   {figures['objects_received']} of {expected} objects received, {figures['lost']} lost, {figures['resent']} resent; "
          f"{len(arrived)} of {len(study_of)} studies answered")
    print(f"last instance acknowledged -> SR stored: p50 {figures['latency_p50_s']:.2f} s, p95 {figures['latency_p95_s']:.2f} s "
          f"(beyond the quiet wait: p50 {figures['latency_beyond_quiet_p50_s']:.2f} s, p95 {figures['latency_beyond_quiet_p95_s']:.2f} s)")
    if alone:
        print(f"one study at a time ({len(alone)}): p50 {figures['alone_latency_p50_s']:.2f} s, max {figures['alone_latency_max_s']:.2f} s "
              f"(beyond the quiet wait: p50 {figures['alone_latency_p50_s'] - ns.quiet:.2f} s)")
    print(f"node peak memory {peak:.0f} MB; burst answered in {figures['burst_answered_s']:.1f} s ({figures['studies_per_s']:.2f} studies/s); "
          f"{total_s:.1f} s in all")
    if ns.validate:
        print(f"dciodvfy: {len(errors)} error(s) over {len(destination.received)} objects" + "".join(f"\n  {e}" for e in sorted(set(errors))[:10]))
    if ns.json:
        ns.json.write_text(json.dumps(figures, indent=1))
    return 0 if figures["lost"] == 0 and figures["instances_acknowledged"] == figures["instances_sent"] and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
