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


def test_the_image_logits_recalibration_lives_in_the_network_and_old_checkpoints_load_uncalibrated() -> None:
    def localiser() -> torch.nn.Module:
        return build_network(Contract(image_size=64), head="localise", widths=(8, 16, 32, 64)).eval()

    net = localiser()
    old = {k: v for k, v in net.state_dict().items() if k not in ("scale", "shift")}  # a checkpoint from before the recalibration
    fresh = localiser()
    fresh.scale.fill_(3.0)
    fresh.load_state_dict(old)  # strict: the missing buffers read as "as trained"
    assert (float(fresh.scale), float(fresh.shift)) == (1.0, 0.0)
    first, second = torch.tensor([0.5, -2.0]), torch.tensor([1.5, 0.0])
    fresh.scale.fill_(1.75)
    fresh.shift.fill_(2.0)
    fused = fresh.fuse(first, second)
    assert torch.allclose(fused, 1.75 * (0.5 * first + 0.5 * second) + 2.0)
    again = localiser()
    again.load_state_dict(fresh.state_dict())  # a recalibrated checkpoint keeps its scale and shift
    assert (float(again.scale), float(again.shift)) == (1.75, 2.0)
