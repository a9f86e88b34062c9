"""Backbones and recipe switches: each builds, trains, exports with parity, and does what it claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import torchvision
from conftest import tiny_fit_args, val_auroc_of

from fracture.deploy.predictor import Predictor
from fracture.export.export import export, export_model
from fracture.imaging import preprocess
from fracture.imaging.contract import Contract
from fracture.train import fit
from fracture.train.checkpoint import load_classifier
from fracture.train.data import FractureDataModule
from fracture.train.model import build_network
from fracture.train.module import FractureClassifier
from fracture.train.networks import ResNet, SeedCNN, Torchvision
from fracture.train.recipe import lr_factor

NETWORKS = [SeedCNN(), ResNet(18), ResNet(34), ResNet(50), Torchvision("densenet121"), Torchvision("efficientnet_b0"), Torchvision("convnext_tiny")]


@pytest.mark.parametrize("spec", NETWORKS, ids=lambda n: n.name)
def test_backbone_trains_a_step_and_exports_with_parity(spec, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FractureClassifier(net=spec, image_size=64)
    first = next(model.net.backbone.parameters())
    assert first.shape[1] == 1  # one input channel
    before = first.detach().clone()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(4, 1, 64, 64) * 255, torch.tensor([0.0, 1.0, 0.0, 1.0])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, first.detach())
    meta = export_model(model.eval(), tmp_path / f"{spec.name}.onnx")  # raises unless parity holds
    assert max(meta["parity_max_abs_diff"].values()) <= 1e-5


def test_local_weights_fold_rgb_and_refuse_mismatches(tmp_path: Path) -> None:
    rgb = torchvision.models.resnet18(weights=None)
    torch.save(rgb.state_dict(), tmp_path / "resnet18.pth")
    net = build_network(Contract(image_size=64), "resnet18", str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(net.backbone.features[0].weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(net.backbone.features[7][1].conv2.weight, rgb.layer4[1].conv2.weight)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="wrong architecture"):
        build_network(Contract(image_size=64), "resnet18", str(tmp_path / "resnet34.pth"))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_network(Contract(image_size=64), "resnet18", str(tmp_path / "absent.pth"))


def test_warmup_cosine_schedule_values() -> None:
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0) and lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_schedule_and_ema_in_a_real_run(synth_root: Path, tmp_path: Path) -> None:
    args = tiny_fit_args(synth_root, tmp_path, "--model.recipe.scheduler", "cosine", "--model.recipe.warmup_epochs", "1", "--model.ema_decay", "0.9",
                         "--test_after_fit", "false", epochs=2)
    assert fit.main(args) == 0
    ckpt = torch.load(tmp_path / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["lr_schedulers"][0]["_last_lr"][0] < 1e-4  # decayed to ~0 at the last step
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]  # Lightning's EMAWeightAveraging layout
    assert not any(k.startswith("ema.") for k in averaged) and set(averaged) == set(current)
    assert not torch.equal(averaged["net.backbone.features.0.weight"], current["net.backbone.features.0.weight"])
    # validation ran with the averaged weights: the checkpoint's weights reproduce the logged AUROC of that epoch
    logs = pd.read_csv(tmp_path / "tiny" / "metrics.csv")
    assert val_auroc_of(tmp_path / "tiny" / "last.ckpt", synth_root) == pytest.approx(logs["val/auroc"].dropna().iloc[-1], abs=1e-6)
    assert logs["val/auroc"].notna().sum() == 2


def test_optimizer_holds_exactly_the_network_and_norms_and_biases_never_decay() -> None:
    from fracture.train.recipe import Recipe, configure

    model = FractureClassifier(net=ResNet(18), image_size=64, recipe=Recipe(optimizer="adamw", weight_decay=0.05))
    optimizer = configure(model.recipe, model.net, total_steps=10, max_epochs=1)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) and {id(p) for p in held} == {id(p) for p in model.parameters()} == {id(p) for p in model.net.parameters()}
    decayed, kept = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    norms = {id(m.weight) for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    biases = {id(m.bias) for m in model.net.modules() if getattr(m, "bias", None) is not None}
    assert norms | biases == {id(p) for p in kept["params"]} and all(p.ndim == 4 or p.ndim == 2 for p in decayed["params"])


def test_a_seed_cnn_option_under_a_resnet_is_refused_by_the_parser(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = tiny_fit_args(synth_root, tmp_path, "--model.net", "ResNet", "--model.net.init_args.widths", "[8, 16]", epochs=1)
    with pytest.raises(SystemExit) as exit_:
        fit.main(args)
    assert exit_.value.code != 0 and "Option 'widths' is not accepted" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_checkpoints_from_before_the_registry_still_load(tmp_path: Path) -> None:
    """A checkpoint with flat network options and an ``ema`` submodule (the earlier layout) loads its EMA weights."""
    torch.manual_seed(0)
    model = FractureClassifier(net=SeedCNN(widths=(8, 16), dense=(16,), pool="max"), image_size=64)
    ema = {f"ema.module.{k[len('net.'):]}": v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items() if k.startswith("net.")}
    old = {"hyper_parameters": {"arch": "seed_cnn", "widths": [8, 16], "dense": [16], "pool": "max", "optimizer": "adamw", "lr": 0.01,
                                "ema_decay": 0.9, "image_size": 64, "tta": False},
           "state_dict": {**model.state_dict(), **ema, "ema.n_averaged": torch.tensor(3), "pos_weight": torch.tensor(1.0)},
           "fracture": {"thresholds": {"default": 0.5, "screening": 0.2}}}
    torch.save(old, tmp_path / "old.ckpt")
    loaded = load_classifier(tmp_path / "old.ckpt")
    assert isinstance(loaded.spec, SeedCNN) and loaded.spec.args["widths"] == [8, 16] and loaded.recipe.lr == 0.01
    weight = loaded.net.backbone.features[0].weight
    assert torch.equal(weight, model.net.backbone.features[0].weight + 1.0) and loaded.thresholds["screening"] == 0.2


def test_tta_averages_mirrored_predictions_and_travels_into_onnx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FractureClassifier(net=SeedCNN(pool="max"), image_size=64, tta=True).eval()
    x = torch.rand(3, 1, 64, 64) * 255
    with torch.no_grad():
        expected = (model.net(x) + model.net(torch.flip(x, dims=[-1]))) / 2
        assert torch.allclose(model(x), expected) and not torch.allclose(model(x), model.net(x))
    export_model(model, tmp_path / "tta.onnx")
    sess = ort.InferenceSession(str(tmp_path / "tta.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logit"], {"image": x.numpy()})[0], expected.numpy(), atol=1e-4)


def test_balanced_sampler_draws_classes_equally(tmp_path: Path, synth_root: Path) -> None:
    root = tmp_path / "ds"
    import shutil

    shutil.copytree(synth_root, root)
    table = pd.read_csv(root / "train" / "annotations.csv", dtype=str)
    keep = pd.concat([table[table.fracture == "no"], table[table.fracture == "yes"].head(6)])
    keep.to_csv(root / "train" / "annotations.csv", index=False)
    torch.manual_seed(0)
    drawn = []
    for sampler in ("shuffle", "balanced"):
        dm = FractureDataModule(root=str(root), image_size=32, num_workers=0, batch_size=8, sampler=sampler, val_fraction=0.2)
        dm.setup("fit")
        labels = torch.cat([batch[1] for _ in range(20) for batch in dm.train_dataloader()])
        drawn.append(float(labels.mean()))
    assert drawn[0] < 0.2 and abs(drawn[1] - 0.5) < 0.08


def test_letterbox_is_the_same_in_training_and_the_predictor(synth_root: Path, tmp_path: Path) -> None:
    assert fit.main(tiny_fit_args(synth_root, tmp_path, "--data.resize", "letterbox", "--test_after_fit", "false", epochs=1)) == 0
    ckpt = next((tmp_path / "tiny").glob("best-*.ckpt"))
    model = load_classifier(ckpt)
    assert model.contract.resize == "letterbox"
    dm = FractureDataModule(root=str(synth_root), image_size=64, resize="letterbox", num_workers=0)
    dm.setup("fit")
    x = dm.datasets["val"][0][0]
    path = dm.datasets["val"].paths[0]
    direct = preprocess.load(path, model.contract)
    assert torch.equal(x[0], torch.from_numpy(direct).float()) and (direct[:, :2] == 0).all()  # padded columns
    export(ckpt, tmp_path / "lb.onnx")
    predictor = Predictor(tmp_path / "lb.onnx")
    assert predictor.contract == model.contract
    p = next(predictor.predict([path], show_progress=False)).probability
    with torch.no_grad():
        expected = torch.sigmoid(model(x[None])).item()
    assert p == pytest.approx(expected, abs=1e-5)
    assert json.loads(ort.InferenceSession(str(tmp_path / "lb.onnx")).get_modelmeta().custom_metadata_map["fracture"])["contract"]["resize"] == "letterbox"
