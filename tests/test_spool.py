"""The node's spool on its own: what a restart cleans, what delivery removes, what pruning and sweeping keep."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from fracture.deploy.pacs.spool import Spool, digest


def test_a_restart_cleans_what_a_dead_process_left_half_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    study = spool.receive("1.2.3", "1.2.3.4", b"instance")
    (study.parent / ".x.dcm.tmp123").write_bytes(b"half")  # an atomic write cut short
    (spool.root / "receiving" / "tmpabc.dcm").write_bytes(b"arriving")  # an association cut short
    (spool.root / "outbox" / ".tmp-abc").mkdir()  # a result set half written
    (spool.root / "incoming" / "0123456789abcdef").mkdir()  # a study delivered whole
    Spool(spool.root)
    assert sorted(p.name for p in spool.root.rglob("*") if p.is_file()) == [f"{digest('1.2.3.4')}.dcm"]
    assert not (spool.root / "incoming" / "0123456789abcdef").exists()
    assert stat.S_IMODE(spool.root.stat().st_mode) == 0o700


def test_a_set_leaves_the_outbox_object_by_object_and_its_sources_with_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    study = digest("1.2.3")
    spool.receive("1.2.3", "1.2.3.4", b"a")
    spool.receive("1.2.3", "1.2.3.5", b"b")
    first = spool.write_set("key-1", study, [digest("1.2.3.4")], [("gsps", b"p"), ("sr", b"r")])
    time.sleep(0.01)
    second = spool.write_set("key-2", study, [digest("1.2.3.5")], [("sr", b"r2")])
    assert spool.outbox() == [first, second]  # oldest first
    assert spool.waiting_sources() == {digest("1.2.3.4"), digest("1.2.3.5")}
    for path in sorted(first.glob("[0-9]*.dcm")):
        spool.sent(path)
    assert json.loads((first / "manifest.json").read_text())["count"] == 2 and not list(first.glob("*.dcm"))
    spool.delivered(first)
    assert spool.outbox() == [second] and [p.stem for p in spool.pending()[study]] == [digest("1.2.3.5")]
    assert spool.has_set("key-2") and not spool.has_set("key-1")


def test_prune_forgets_old_answers_but_not_a_study_still_arriving_and_sweep_only_old_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    old, busy = digest("1.1"), digest("2.2")
    for study in (old, busy):
        spool.save_ledger(study, {"images": {}, "sets": []})
        long_ago = time.time() - 40 * 86400
        os.utime(spool.root / "reported" / f"{study}.json", (long_ago, long_ago))
    spool.receive("2.2", "2.2.1", b"late")  # a late image of the busy study is waiting
    spool.prune(days=30)
    assert not (spool.root / "reported" / f"{old}.json").exists() and (spool.root / "reported" / f"{busy}.json").exists()
    stale, fresh = spool.root / "receiving" / "stale.dcm", spool.root / "receiving" / "fresh.dcm"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    spool.sweep(older_than=600)
    assert not stale.exists() and fresh.exists()


def test_set_aside_and_undeliverable_keep_what_they_move(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.receive("3.3", "3.3.1", b"pixels")
    kept = spool.set_aside(digest("3.3"))
    assert [p.read_bytes() for p in kept.iterdir()] == [b"pixels"] and digest("3.3") not in spool.pending()
    folder = spool.write_set("k", digest("4.4"), [], [("gsps", b"state"), ("sr", b"report")])
    aside = spool.undeliverable(next(folder.glob("*-gsps.dcm")))
    assert (aside / "000-gsps.dcm").read_bytes() == b"state" and [p.name for p in folder.glob("*.dcm")] == ["001-sr.dcm"]
