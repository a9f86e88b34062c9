"""fracture.scoring.compare: paired bootstrap of two reports' per-image predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fracture.scoring import compare, metrics


def _report(folder: Path, probs: np.ndarray, labels: np.ndarray, boxes: list[list] | None = None, truth: list[list] | None = None,
            hits: np.ndarray | None = None) -> Path:
    """A report folder as fracture.evaluate writes it (only predictions.csv matters here)."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"image": [f"images/img{i:03d}.png" for i in range(len(probs))], "path": [f"{folder}/img{i:03d}.png" for i in range(len(probs))], "label": labels, "group": [f"g{i}" for i in range(len(probs))],
                          "probability": probs})
    if boxes is not None:
        frame = frame.assign(truth=[json.dumps(t) for t in truth], boxes=[json.dumps(b) for b in boxes],
                             pointing_hit=hits, mass_in_boxes=np.where(np.isnan(hits), np.nan, 0.5 * hits))
    frame.to_csv(folder / "predictions.csv", index=False)
    return folder


@pytest.fixture
def pair_of_reports(tmp_path: Path) -> tuple[Path, Path]:
    """B ranks every fractured image first and boxes each fracture; A ranks at random and boxes the wrong corner."""
    rng = np.random.default_rng(0)
    labels = np.array([1] * 30 + [0] * 30)
    truth = [[[60.0, 60.0, 80.0, 80.0]] if y else [] for y in labels]
    good = [[[62.0, 62.0, 78.0, 78.0, 0.9]] if y else [[0.0, 0.0, 10.0, 10.0, 0.2]] for y in labels]
    bad = [[[0.0, 0.0, 10.0, 10.0, 0.8]] for _ in labels]
    hits_b = np.where(labels == 1, 1.0, np.nan)
    hits_a = np.where(labels == 1, (np.arange(60) % 5 == 0).astype(float), np.nan)
    a = _report(tmp_path / "a", rng.random(60), labels, bad, truth, hits_a)
    b = _report(tmp_path / "b", np.where(labels == 1, 0.6 + 0.3 * rng.random(60), 0.4 * rng.random(60)), labels, good, truth, hits_b)
    return a, b


def test_a_better_model_is_better_beyond_resampling_noise(pair_of_reports: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair_of_reports
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "ab"), "--bootstrap", "300"]) == 0
    result = json.loads((tmp_path / "ab" / "compare.json").read_text())
    m = result["measures"]
    assert result["images"] == 60 and result["with_boxes"] == 30 and result["bootstrap"]["unit"] == "image"
    assert m["auroc"]["b"] == 1.0 and m["auroc"]["a"] < 0.8
    assert m["pointing_hit_rate"]["a"] == pytest.approx(6 / 30) and m["pointing_hit_rate"]["b"] == 1.0
    assert m["froc_centre_sensitivity_at_1_fp"]["b"] == 1.0 and m["froc_centre_sensitivity_at_1_fp"]["a"] == 0.0
    for k in ("auroc", "pointing_hit_rate", "froc_centre_sensitivity_at_1_fp", "ap_iou25"):
        lo, hi = m[k]["ci95"]
        assert 0 < lo <= m[k]["difference"] <= hi and m[k]["p_not_better"] == 0.0, k
    assert (tmp_path / "ab" / "differences.png").stat().st_size > 0 and "| pointing_hit_rate |" in (tmp_path / "ab" / "compare.md").read_text()
    # the same pair the other way round: every difference flips sign, B is never better
    assert compare.main([str(b), str(a), "--out", str(tmp_path / "ba"), "--bootstrap", "300"]) == 0
    flipped = json.loads((tmp_path / "ba" / "compare.json").read_text())["measures"]
    for k in m:
        assert flipped[k]["difference"] == pytest.approx(-m[k]["difference"])
    assert flipped["auroc"]["p_not_better"] == 1.0


def test_the_paired_interval_is_narrower_than_the_two_unpaired_ones(tmp_path: Path) -> None:
    """Two models that share most of their errors: their own intervals overlap, the paired difference does not cross zero."""
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.3).astype(int)
    base = labels * 0.6 + rng.normal(0, 0.5, 400)
    a = _report(tmp_path / "a", 1 / (1 + np.exp(-base)), labels)
    b = _report(tmp_path / "b", 1 / (1 + np.exp(-(base + labels * 0.15))), labels)  # the same scores, fractures nudged up
    result = compare.compare(compare.read_predictions(a), compare.read_predictions(b), n_boot=400)
    auroc = result["measures"]["auroc"]
    lo, hi = auroc["ci95"]
    assert 0 < lo < auroc["difference"] < hi < 0.1 and set(result["measures"]) == set(compare.IMAGE_MEASURES)
    own = [metrics.bootstrap(pd.read_csv(r / "predictions.csv")["probability"].to_numpy(), labels, 0.5, None, 400, 0)["auroc"] for r in (a, b)]
    assert own[0][1] > own[1][0]  # unpaired, the two intervals overlap


def test_reports_that_cannot_be_paired_are_refused(pair_of_reports: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = pair_of_reports
    frame = pd.read_csv(b / "predictions.csv")
    frame.loc[3, "label"] = 1 - frame.loc[3, "label"]
    frame.to_csv(_report(tmp_path / "relabelled", np.zeros(1), np.zeros(1)) / "predictions.csv", index=False)
    frame = pd.read_csv(b / "predictions.csv").iloc[1:]
    frame.to_csv(_report(tmp_path / "fewer", np.zeros(1), np.zeros(1)) / "predictions.csv", index=False)
    frame = pd.read_csv(b / "predictions.csv")
    frame.loc[0, "truth"] = json.dumps([[1.0, 1.0, 5.0, 5.0]])
    frame.to_csv(_report(tmp_path / "moved", np.zeros(1), np.zeros(1)) / "predictions.csv", index=False)
    (tmp_path / "empty").mkdir()
    for other, says in (("relabelled", "different labels"), ("fewer", "different images: 1 only in A"), ("moved", "different true boxes"),
                        ("empty", "predictions.csv not found")):
        assert compare.main([str(a), str(tmp_path / other), "--out", str(tmp_path / "out")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_images_the_reference_trained_on_are_left_out_and_subgroups_are_paired(tmp_path: Path) -> None:
    """A release scored on images it trained on reads high; left out, the newer model's real lead shows, per subgroup too."""
    rng = np.random.default_rng(1)
    labels = np.tile([1, 0], 60)
    seen = np.arange(120) < 60  # the reference's own training images: it ranks them perfectly
    a_probs = np.where(seen, labels * 0.5 + 0.4 * rng.random(120), rng.random(120))
    b_probs = np.clip(labels * 0.35 + 0.6 * rng.random(120), 0, 1)
    region = np.where(np.arange(120) % 4 < 2, "hand", "leg")
    a, b = _report(tmp_path / "a", a_probs, labels), _report(tmp_path / "b", b_probs, labels)
    for folder in (a, b):
        frame = pd.read_csv(folder / "predictions.csv")
        frame.assign(by_region=region).to_csv(folder / "predictions.csv", index=False)
    trained = tmp_path / "a-training.txt"
    trained.write_text("".join(f"somewhere/else/img{i:03d}.png\n" for i in np.flatnonzero(seen)))  # matched by file name

    assert compare.main([str(a), str(b), "--out", str(tmp_path / "all"), "--bootstrap", "300"]) == 0
    overall = json.loads((tmp_path / "all" / "compare.json").read_text())["measures"]["auroc"]
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "unseen"), "--bootstrap", "300", "--exclude", str(trained), "--subgroups"]) == 0
    result = json.loads((tmp_path / "unseen" / "compare.json").read_text())
    fair = result["measures"]["auroc"]
    assert result["images"] == 60 and fair["difference"] > overall["difference"] and fair["ci95"][0] > 0
    expected = {v: metrics.auroc(b_probs[~seen & (region == v)], labels[~seen & (region == v)])
                - metrics.auroc(a_probs[~seen & (region == v)], labels[~seen & (region == v)]) for v in ("hand", "leg")}
    rows = {r["value"]: r for r in result["subgroups"]}
    assert set(rows) == {"hand", "leg"} and all(rows[v]["images"] == 30 and rows[v]["fractured"] == 15 for v in rows)
    for v, d in expected.items():
        assert rows[v]["auroc"]["difference"] == pytest.approx(d)
        assert rows[v]["auroc"]["ci95"][0] <= d <= rows[v]["auroc"]["ci95"][1]
    text = (tmp_path / "unseen" / "compare.md").read_text()
    assert "## Subgroups, paired" in text and "| region = hand | 30 (15) |" in text and "Left out" in text
    # a list that leaves nothing is refused, not reported as an empty comparison
    everything = tmp_path / "everything.csv"
    pd.DataFrame({"path": [f"x/img{i:03d}.png" for i in range(120)], "split": "train"}).to_csv(everything, index=False)
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "none"), "--exclude", str(everything)]) == 2
    # a run's splits.csv: only its training rows are what the model learnt from
    splits = tmp_path / "splits.csv"
    pd.DataFrame({"split": np.where(seen, "train", "val"), "path": [f"/data/img{i:03d}.png" for i in range(120)]}).to_csv(splits, index=False)
    assert compare.excluded_names(splits) == {f"img{i:03d}.png" for i in np.flatnonzero(seen)}
