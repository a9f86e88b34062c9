from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import REPO, tiny_fit_args

from fracture.imaging import preprocess
from fracture.scoring import metrics
from fracture.train import fit
from fracture.train.checkpoint import load_classifier
from fracture.train.module import FractureClassifier
from fracture.train.runio import AtomicCheckpointIO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _fit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fracture.fit", *args]


def _val_rows(run: Path) -> pd.DataFrame:
    logs = pd.read_csv(run / "metrics.csv")
    return logs.dropna(subset=["val/auroc"])


def test_sigkill_mid_epoch_then_resume_finishes_the_plan(synth_root: Path, tmp_path: Path) -> None:
    args = tiny_fit_args(synth_root, tmp_path, "--test_after_fit", "false", "--data.batch_size", "8", epochs=6)
    flag = tmp_path / "paused"
    pause = json.dumps([{"class_path": "hooks.PauseAt", "init_args": {"epoch": 2, "batch": 3, "flag": str(flag)}}])
    env = {**ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    proc = subprocess.Popen(_fit_cmd(*args, "--trainer.callbacks", pause), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "tiny" / "last.ckpt"
    deadline = time.time() + 300
    while not flag.exists():  # the run says where it is: mid-epoch 2, epochs 0 and 1 checkpointed
        assert time.time() < deadline and proc.poll() is None, "the run never reached the pause"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)
    assert killed_at["epoch"] == 1
    args = [*args, "--trainer.callbacks", pause]
    done = subprocess.run(_fit_cmd(*args, "--ckpt_path", "last"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["epoch"] == 5
    steps_per_epoch = killed_at["global_step"] // (killed_at["epoch"] + 1)
    assert final["global_step"] == 6 * steps_per_epoch
    adam_steps = {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert adam_steps == {final["global_step"]}  # optimizer state carried over, not restarted
    assert _val_rows(tmp_path / "tiny")["epoch"].tolist() == [0, 1, 2, 3, 4, 5]  # each epoch logged once


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, target)
    assert AtomicCheckpointIO().load_checkpoint(target)["epoch"] == 1

    def dies_halfway(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # what a kill looks like from inside the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
    monkeypatch.undo()
    assert AtomicCheckpointIO().load_checkpoint(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoints_load_without_unpickling_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "evil.ckpt", _use_new_zipfile_serialization=True)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")


EXPORT_PAUSED = """
import sys, time
from pathlib import Path
import fracture.export.export as export
stage, flag = sys.argv.pop(1), Path(sys.argv.pop(1))
def pause():
    flag.write_text(stage)
    time.sleep(3600)
if stage == "written":  # the new file complete in its temporary folder, not yet moved over the old one
    install = export.install
    export.install = lambda tmp, out: (pause(), install(tmp, out))
elif stage == "checking":  # the graph written, its parity check under way
    check = export.check_parity
    export.check_parity = lambda *a, **k: (pause(), check(*a, **k))[1]
sys.exit(export.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stage", ["checking", "written"])
def test_killed_export_leaves_the_old_file_and_no_debris(tiny_ckpt: Path, tmp_path: Path, stage: str) -> None:
    out, flag = tmp_path / "model.onnx", tmp_path / "paused"
    out.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_PAUSED, stage, str(flag), "--ckpt", str(tiny_ckpt), "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not flag.exists():  # killed exactly where the export says it is
        assert time.time() < deadline and proc.poll() is None, "the export never reached the pause"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == b"old"
    # a killed export's temporary folder is left for the next run to ignore; no other file appears beside the model
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".export-") and p != flag] == ["model.onnx"]
    # and the next export replaces it with a complete, checked file
    assert subprocess.run([sys.executable, "-m", "fracture.export", "--ckpt", str(tiny_ckpt), "--out", str(out)], env=ENV,
                          capture_output=True, timeout=300).returncode == 0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_last_good_checkpoint(synth_root: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    original = FractureClassifier.forward

    def poisoned(self, x):
        out = original(self, x)
        return out * float("nan") if self.training and self.current_epoch == 1 else out

    monkeypatch.setattr(FractureClassifier, "forward", poisoned)
    assert fit.main(tiny_fit_args(synth_root, tmp_path, epochs=3)) == 3
    err = capsys.readouterr().err
    assert "training loss became nan at epoch 1, batch 0" in err and "last good checkpoint" in err
    ckpt = torch.load(tmp_path / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_disk_full_and_unwritable_folder_give_clear_errors(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    def full(self, checkpoint, path, storage_options=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full)
    assert fit.main(tiny_fit_args(synth_root, tmp_path / "a", epochs=1)) == 4
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    assert fit.main(tiny_fit_args(synth_root, blocker / "runs", epochs=1)) == 4
    assert "cannot write" in capsys.readouterr().err


def test_deterministic_runs_repeat_exactly(synth_root: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert fit.main(tiny_fit_args(synth_root, tmp_path / name, "--trainer.deterministic", "true", epochs=2)) == 0
    a = torch.load(tmp_path / "a" / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "b" / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (tmp_path / "a" / "tiny" / "test_metrics.json").read_text().replace("/a/", "/b/") == (tmp_path / "b" / "tiny" / "test_metrics.json").read_text()
    info = __import__("json").loads((tmp_path / "a" / "tiny" / "run_info.json").read_text())
    assert info["seed"] == 42 and info["versions"]["torch"] == torch.__version__ and "git_commit" in info


def test_ddp_two_processes_count_every_validation_image_once(synth_root: Path, tmp_path: Path) -> None:
    from fracture.data.annotations import load_splits

    # an odd validation set: the default distributed sampler would pad it with a repeated image
    fraction = next(f for f in (0.15, 0.2, 0.25, 0.3, 0.35) if len(load_splits(synth_root, val_fraction=f)["val"]) % 2 == 1)
    args = tiny_fit_args(synth_root, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.val_fraction", str(fraction),
                         "--data.batch_size", "7", "--test_after_fit", "false", epochs=1)
    done = subprocess.run(_fit_cmd(*args), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "tiny"
    logged = float(_val_rows(run)["val/auroc"].iloc[0])
    model = load_classifier(run / "last.ckpt")
    val = pd.read_csv(run / "splits.csv").query("split == 'val'")
    x = np.stack([preprocess.load(p, model.contract) for p in val["path"]])[:, None].astype(np.float32)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    assert len(val) % 2 == 1
    assert logged == pytest.approx(metrics.auroc(probs, val["label"].to_numpy()), abs=1e-6)
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["fracture"]["val_metrics"]["n"] == len(val)


def test_last_checkpoint_follows_every_epoch_even_between_validations(synth_root: Path, tmp_path: Path) -> None:
    # validated at epoch 1 only: a run killed after epoch 2 must still find epoch 2 in last.ckpt (a lent GPU's run lost three)
    assert fit.main(tiny_fit_args(synth_root, tmp_path, "--test_after_fit", "false", "--trainer.check_val_every_n_epoch", "2", epochs=3)) == 0
    assert torch.load(tmp_path / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2


def test_a_run_resumes_from_a_checkpoint_written_at_validation(synth_root: Path, tmp_path: Path) -> None:
    # best-….ckpt is written when validation ends, before the epoch does: resuming it re-enters an epoch with no batches left
    assert fit.main(tiny_fit_args(synth_root, tmp_path, "--test_after_fit", "false", epochs=2)) == 0
    best = next((tmp_path / "tiny").glob("best-*.ckpt"))
    assert fit.main(tiny_fit_args(synth_root, tmp_path, "--test_after_fit", "false", "--ckpt_path", str(best), epochs=3)) == 0
    assert torch.load(tmp_path / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2
