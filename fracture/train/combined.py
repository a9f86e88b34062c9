"""Networks combined into one: mirror test-time augmentation, an ensemble of localisers, a classifier beside a localiser; each an ordinary network to the checkpoint and the export."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fracture.train.model import FractureNet, FusedLogits, LocaliseNet, Pyramid


class MirrorTTA(nn.Module):
    """Test-time augmentation as a wrapper: the mean of the network's outputs on the image and its mirror.

    A localise network's maps are flipped back before averaging. Not registered inside the training
    module (it holds no weights of its own); evaluation and export wrap the network when ``tta`` is on.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def fusion(self) -> torch.Tensor:
        return self.net.fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) + self.net(torch.flip(x, dims=[-1]))) / 2

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._both(self.net.forward_maps, x)  # type: ignore[return-value]

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._both(self.net.forward_parts, x)

    @staticmethod
    def _both(forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The mean of ``forward``'s outputs (logits..., map) on the image and its mirror, the mirror's map flipped back."""
        *logits, maps = forward(x)
        *flipped, m2 = forward(torch.flip(x, dims=[-1]))
        return *((a + b) / 2 for a, b in zip(logits, flipped)), (maps + torch.flip(m2, dims=[-1])) / 2

    def fuse(self, pooled: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
        return self.net.fuse(pooled, joint)


class Ensemble(FusedLogits):
    """Several localise networks of one architecture and contract as one: the mean of their logits.

    Image logits (map-pooled and joint) and map logits are averaged member by member; the
    fusion of the two image logits is the ensemble's own, chosen on validation like a single
    network's. Built from trained runs by ``python -m fracture.ensemble``, never trained.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2 or not all(isinstance(m, LocaliseNet) for m in members):
            raise ValueError("an ensemble needs at least two localise networks")
        self.members = nn.ModuleList(members)

    @property
    def pyramid(self) -> Pyramid:
        return self.members[0].pyramid

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = [m.forward_maps(x) for m in self.members]
        return tuple(torch.stack(parts).mean(0) for parts in zip(*outputs))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(*self.forward_maps(x)[:2])


class WithClassifier(FusedLogits):
    """A localise network (or ensemble) and a classify network on the same input at ``1/factor`` resolution.

    The two are complementary: the localiser's image heads learn from crops, the classifier from
    whole images. The image logit is a fusion of the localiser's (its own fusion inside) and the
    classifier's, chosen on validation like a localiser's (1 = localiser, 0 = classifier, 0.5 =
    the mean); the map is the localiser's. The classifier's input is the localiser's average-pooled
    by ``factor``: what its own contract at ``image_size / factor`` makes (``area`` interpolation) to
    within half a pixel where a letterbox pads by an odd number of pixels, so one input and one
    contract serve both; ``python -m fracture.ensemble`` reports its validation AUROC through this path.
    Built from trained runs by ``python -m fracture.ensemble --classifier``, never trained.
    """

    logit_names = ("localiser", "classifier")

    def __init__(self, localiser: nn.Module, classifier: FractureNet, factor: int) -> None:
        super().__init__()
        if not isinstance(localiser, (LocaliseNet, Ensemble)) or not isinstance(classifier, FractureNet):
            raise ValueError("WithClassifier takes a localise network (or ensemble) and a classify network")
        self.localiser, self.classifier, self.factor = localiser, classifier, int(factor)

    @property
    def pyramid(self) -> Pyramid:
        return self.localiser.pyramid

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(localiser's map-pooled and joint logits, classifier's logit, localiser's map logits): every choice's inputs at once."""
        pooled, joint, maps = self.localiser.forward_maps(x)
        small = nn.functional.avg_pool2d(x, self.factor) if self.factor > 1 else x
        return pooled, joint, self.classifier(small), maps

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(localiser's image logit, classifier's image logit, localiser's map logits)."""
        pooled, joint, side, maps = self.forward_parts(x)
        return self.localiser.fuse(pooled, joint), side, maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(*self.forward_maps(x)[:2])


def is_localise(net: nn.Module) -> bool:
    """A network (or its TTA wrapper, an ensemble, or either with a classifier) with a fracture map."""
    return isinstance(net.net if isinstance(net, MirrorTTA) else net, (LocaliseNet, Ensemble, WithClassifier))
