from __future__ import annotations

import pytest
import torch

from fracture.imaging.contract import Contract
from fracture.train.model import build_network


@pytest.mark.parametrize("size", [32, 64, 128, 224])
def test_one_logit_per_image_for_several_sizes(size: int) -> None:
    net = build_network(Contract(image_size=size)).eval()
    out = net(torch.rand(3, 1, size, size) * 255)
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_depth_and_widths_are_configurable() -> None:
    net = build_network(Contract(image_size=64), widths=(8, 16, 32, 64), dense=(32,))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64]
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2,)


def test_scaling_lives_inside_the_network() -> None:
    contract = Contract(image_size=32, mean=0.5, std=0.25)
    net = build_network(contract)
    x = torch.full((1, 1, 32, 32), 255.0)
    assert torch.allclose(net.scaling(x), torch.full_like(x, (1.0 - 0.5) / 0.25))
    assert torch.allclose(net.scaling(torch.zeros_like(x)), torch.full_like(x, -2.0))


def test_too_small_input_for_the_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_network(Contract(image_size=16), widths=(8, 8, 8, 8, 8))
