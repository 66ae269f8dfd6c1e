import pytest
import torch

from patch_diffusion.devices import describe_machine, resolve_device, to_device
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


def test_machine_description_names_what_a_timing_depends_on():
    machine = describe_machine(torch.device("cpu"), "fp32")
    assert machine["device"] == "cpu" and machine["precision"] == "fp32"
    assert machine["name"] and machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] == torch.get_num_threads() and machine["torch"] == torch.__version__
    # 'auto' is recorded as what it resolved to
    assert describe_machine(torch.device("cpu"), "auto")["precision"] in ("fp32", "bf16")
