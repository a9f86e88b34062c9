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
from fracture.train.model import build_network

Head = Literal["classify", "localise"]


class Network:
    """A network recipe; :meth:`build` makes the module for inputs made under a contract."""

    name = "network"

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


REGISTRY = {cls.__name__: cls for cls in (SeedCNN, ResNet, Torchvision)}


def from_config(config: dict[str, Any], keep_weights: bool = False) -> Network:
    """``{"class_path", "init_args"}`` → the network; a stored config drops ``weights`` (the checkpoint has them)."""
    name = str(config.get("class_path", "")).rsplit(".", 1)[-1]
    if name not in REGISTRY:
        raise ValueError(f"unknown network {config.get('class_path')!r}; available: {', '.join(REGISTRY)}")
    args = dict(config.get("init_args") or {})
    if not keep_weights and "weights" in args:
        args["weights"] = None
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
