import pytest
import torch

from patch_diffusion.devices import resolve_device, to_device
from patch_diffusion.errors import UserError


def test_auto_device_is_usable_and_bad_names_fail_clearly():
    device = resolve_device("auto")
    assert torch.zeros(1, device=device).device.type == device.type
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_to_device_keeps_values_and_skips_needless_copies():
    t = torch.arange(6).reshape(2, 3)
    assert to_device(t, None) is t
    assert to_device(t, "cpu") is t  # already there: no copy
    if torch.cuda.is_available():
        moved = to_device(t, "cuda")
        assert moved.device.type == "cuda" and torch.equal(moved.cpu(), t)
