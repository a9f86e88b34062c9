"""The DICOM node's spool: what it has received, answered and still has to deliver, on disk, so that nothing is
lost when the process dies (SIGKILL included).

Every write is atomic (a temporary file in the same folder, fsync, rename, fsync of the folder): a file is
there whole or not at all. The folder is its owner's only (0700) and its names are digests of UIDs, never
patient data::

    incoming/<study>/<instance>.dcm   received and acknowledged; removed once its answer is delivered
    reported/<study>.json             per study: each answered instance's header and answer, the result sets made
    outbox/<set>/NN-kind.dcm          a built result set; each file removed once the destination acknowledged it
    receiving/                        pynetdicom's temporary files while an instance arrives (emptied at start)
    failed/<study>-<time>/            a study that could not be answered three times in a row, kept for a person
    undeliverable/<set>/              objects of a SOP class the destination will not negotiate, kept for a person
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path


def digest(text: str) -> str:
    """The name of a study or instance in the spool and in the logs: 16 hex digits of its UID's sha256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all, on disk before this returns."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Spool:
    """The node's files. ``receive`` is called from the association threads and touches only ``incoming/``; the
    answering thread writes ``reported/`` and whole sets into ``outbox/``; the delivering thread empties ``outbox/``
    and, once a set is delivered, its sources in ``incoming/``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        for name in ("incoming", "reported", "outbox", "receiving"):
            (self.root / name).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        for leftover in (self.root / "receiving").iterdir():  # half-received instances of a process that died
            leftover.unlink(missing_ok=True)
        for leftover in [*self.root.glob("incoming/*/.*.tmp*"), *self.root.glob("reported/.*.tmp*"), *self.root.glob("outbox/*/.*.tmp*")]:
            leftover.unlink(missing_ok=True)
        for leftover in self.root.glob("outbox/.tmp-*"):  # a result set half written
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in (self.root / "incoming").iterdir():  # studies delivered whole
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def sweep(self, older_than: float) -> None:
        """Remove files in ``receiving/`` not written to for ``older_than`` seconds (an aborted association's)."""
        for path in (self.root / "receiving").iterdir():
            try:
                if time.time() - path.stat().st_mtime > older_than:
                    path.unlink()
            except FileNotFoundError:
                pass

    # --- received instances ---------------------------------------------------------------------------------------
    def receive(self, study_uid: str, instance_uid: str, data: bytes) -> Path:
        folder = self.root / "incoming" / digest(study_uid)
        folder.mkdir(exist_ok=True, mode=0o700)
        path = folder / f"{digest(instance_uid)}.dcm"
        write_atomic(path, data)
        return path

    def pending(self) -> dict[str, list[Path]]:
        """Study → its received instance files (answered or not)."""
        found = {d.name: sorted(d.glob("[!.]*.dcm")) for d in sorted((self.root / "incoming").iterdir()) if d.is_dir()}
        return {study: files for study, files in found.items() if files}

    def forget(self, study: str, instances: list[str]) -> None:
        """Remove delivered instances (their pixels): the header and answer stay in ``reported/``."""
        folder = self.root / "incoming" / study
        for name in instances:
            (folder / f"{name}.dcm").unlink(missing_ok=True)
        if folder.is_dir():  # the empty folder stays until the next start: an instance may be arriving into it now
            _fsync_dir(folder)

    def set_aside(self, study: str) -> Path:
        """A study that cannot be answered: its instances move to ``failed/<study>/`` (kept for a person to look at)."""
        target = self.root / "failed" / f"{study}-{int(time.time())}"
        target.parent.mkdir(exist_ok=True, mode=0o700)
        os.replace(self.root / "incoming" / study, target)
        _fsync_dir(target.parent)
        return target

    # --- what each study has been answered --------------------------------------------------------------------
    def ledger(self, study: str) -> dict:
        path = self.root / "reported" / f"{study}.json"
        return json.loads(path.read_text()) if path.is_file() else {"images": {}, "sets": []}

    def save_ledger(self, study: str, ledger: dict) -> None:
        ledger["updated"] = time.time()
        write_atomic(self.root / "reported" / f"{study}.json", json.dumps(ledger).encode())

    def prune(self, days: float) -> int:
        """Forget studies answered more than ``days`` ago (a later instance then starts a fresh answer)."""
        old = [p for p in (self.root / "reported").glob("[!.]*.json") if time.time() - p.stat().st_mtime > days * 86400]
        for path in old:
            if not (self.root / "incoming" / path.stem).exists():
                path.unlink()
        return len(old)

    # --- result sets waiting for the destination ----------------------------------------------------------------
    def has_set(self, key: str) -> bool:
        return (self.root / "outbox" / digest(key)).is_dir()

    def write_set(self, key: str, study: str, sources: list[str], objects: list[tuple[str, bytes]]) -> Path:
        """A built result set into the outbox in one rename (a crash leaves all of it or nothing)."""
        final = self.root / "outbox" / digest(key)
        tmp = self.root / "outbox" / f".tmp-{digest(key)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        for i, (kind, data) in enumerate(objects):
            with open(tmp / f"{i:03d}-{kind}.dcm", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        manifest = {"study": study, "sources": sources, "created": time.time(), "count": len(objects)}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    def _manifests(self) -> list[tuple[Path, dict]]:
        found = []
        for folder in (self.root / "outbox").iterdir():
            try:
                if not folder.name.startswith("."):
                    found.append((folder, json.loads((folder / "manifest.json").read_text())))
            except (FileNotFoundError, NotADirectoryError):  # delivered and removed meanwhile by the other thread
                pass
        return sorted(found, key=lambda item: item[1]["created"])

    def outbox(self) -> list[Path]:
        """Result sets not yet delivered, oldest first."""
        return [folder for folder, _ in self._manifests()]

    def waiting_sources(self) -> set[str]:
        """The instances whose answer waits in the outbox (their pixels stay until it is delivered)."""
        return {name for _, manifest in self._manifests() for name in manifest["sources"]}

    def sent(self, path: Path) -> None:
        """One object acknowledged by the destination: it is not sent again (a crash before this: once more)."""
        path.unlink()
        _fsync_dir(path.parent)

    def undeliverable(self, path: Path) -> Path:
        """An object the destination will not take at all: kept in ``undeliverable/<set>/``, out of the outbox."""
        target = self.root / "undeliverable" / path.parent.name
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(path, target / path.name)
        _fsync_dir(path.parent)
        return target

    def delivered(self, folder: Path) -> dict:
        """A whole set acknowledged: its sources' pixels go, the set's folder goes; returns its manifest."""
        manifest = json.loads((folder / "manifest.json").read_text())
        self.forget(manifest["study"], manifest["sources"])
        shutil.rmtree(folder)
        _fsync_dir(folder.parent)
        return manifest
