import torch
from torch import nn

from patch_diffusion.patches import coordinate_grid
from patch_diffusion.precond import EDMPrecond


class Spy(nn.Module):
    """A backbone that records its input and returns a fixed bounded function of it."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.seen = None

    def forward(self, x, noise_labels, class_labels):
        self.seen = (x.clone(), noise_labels.clone())
        return torch.tanh(x[:, : self.channels] + noise_labels[:, None, None, None])


def test_scaling_identities():
    net = EDMPrecond(Spy(1), 1)
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = net.scalings(sigma)
    sd2 = 0.25
    # c_in normalises the input variance: c_in^2 (sigma^2 + sigma_data^2) = 1
    torch.testing.assert_close(c_in**2 * (sigma**2 + sd2), torch.ones_like(sigma))
    # c_skip + c_out^2 / sigma_data^2 = 1 (EDM, Appendix B.6)
    torch.testing.assert_close(c_skip + c_out**2 / sd2, torch.ones_like(sigma))
    # EDM's loss weight lambda(sigma) is exactly 1 / c_out^2
    weight = (sigma**2 + sd2) / (sigma**2 * sd2)
    torch.testing.assert_close(weight * c_out**2, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, sigma.log() / 4)


def test_denoiser_tends_to_identity_as_sigma_vanishes():
    net = EDMPrecond(Spy(3), 3)
    x = torch.randn(4, 3, 8, 8)
    for sigma, tol in ((1e-2, 3e-2), (1e-4, 3e-4), (1e-6, 3e-6)):
        assert (net(x, sigma) - x).abs().max() < tol


def test_coordinates_enter_after_c_in_unscaled():
    spy = Spy(2)
    net = EDMPrecond(spy, 2)
    x = torch.randn(3, 2, 4, 6)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    net(x, sigma)
    seen, noise = spy.seen
    assert seen.shape == (3, 4, 4, 6)
    c_in = (1 / (sigma**2 + 0.25).sqrt()).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen[:, :2], c_in * x)
    torch.testing.assert_close(seen[:, 2:], coordinate_grid(4, 6).expand(3, -1, -1, -1))
    torch.testing.assert_close(noise, sigma.log() / 4)
    # explicit crop coordinates pass through untouched
    pos = torch.rand(3, 2, 4, 6)
    net(x, sigma, pos=pos)
    torch.testing.assert_close(spy.seen[0][:, 2:], pos)


# --- VP and VE (EDM Table 1) and the registry -------------------------------------------

import math

import pytest

from patch_diffusion.errors import UserError
from patch_diffusion.precond import (PRECONDS, EDMConfig, VEConfig, VEPrecond, VPConfig, VPPrecond,
                                     build_precond, get_precond, log_sigma_shift)


def test_vp_scalings_and_sigma_schedule_are_table_1():
    net = VPPrecond(Spy(1), 1, VPConfig())
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    sigma = net.vp_sigma(t)
    # sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), checked at one point by hand
    assert float(net.vp_sigma(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(
        math.sqrt(math.exp(19.9 / 2 + 0.1) - 1))
    # sigma^-1 inverts it
    torch.testing.assert_close(net.vp_sigma_inv(sigma), t)
    c_skip, c_out, c_in, c_noise = net.scalings(sigma)
    torch.testing.assert_close(c_skip, torch.ones_like(sigma))
    torch.testing.assert_close(c_out, -sigma)
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 1).sqrt())
    torch.testing.assert_close(c_noise, 999 * t)  # DDPM's timestep scale
    # lambda = 1 / sigma^2 = 1 / c_out^2: the loss is the epsilon MSE
    torch.testing.assert_close(net.loss_weight(sigma) * c_out**2, torch.ones_like(sigma))


def test_ve_scalings_are_table_1():
    net = VEPrecond(Spy(1), 1, VEConfig())
    sigma = torch.logspace(-2, 2, 30, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = net.scalings(sigma)
    torch.testing.assert_close(c_skip, torch.ones_like(sigma))
    torch.testing.assert_close(c_out, sigma)
    torch.testing.assert_close(c_in, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, (sigma / 2).log())
    torch.testing.assert_close(net.loss_weight(sigma), sigma**-2)


@pytest.mark.parametrize("name", list(PRECONDS))
def test_every_precond_tends_to_identity_as_sigma_vanishes(name):
    net = build_precond(name, get_precond(name).config(), Spy(3), 3)
    x = torch.randn(4, 3, 8, 8)
    # c_skip -> 1 and c_out -> 0 as sigma -> 0, whatever the backbone says (|F| <= 1 here)
    for sigma, tol in ((1e-2, 3e-2), (1e-4, 3e-4), (1e-6, 3e-6)):
        assert (net(x, sigma) - x).abs().max() < tol


def test_training_sigma_distributions():
    gen = torch.Generator().manual_seed(0)
    n = 40000
    edm = build_precond("edm", EDMConfig(P_mean=-1.0, P_std=0.5), Spy(1), 1)
    log_sigma = edm.sample_sigma(n, gen, torch.device("cpu")).log()
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(0.5, abs=0.02)
    # VP: t = sigma^-1(sigma) uniform on [epsilon_t, 1]
    vp = build_precond("vp", VPConfig(), Spy(1), 1)
    t = vp.vp_sigma_inv(vp.sample_sigma(n, gen, torch.device("cpu")).double())
    assert t.min().item() >= 1e-5 - 1e-7 and t.max().item() <= 1 + 1e-6
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.003)
    # VE: ln(sigma) uniform on [ln 0.02, ln 100]
    ve = build_precond("ve", VEConfig(), Spy(1), 1)
    log_sigma = ve.sample_sigma(n, gen, torch.device("cpu")).log()
    lo, hi = math.log(0.02), math.log(100)
    assert lo - 1e-5 <= log_sigma.min().item() and log_sigma.max().item() <= hi + 1e-5
    assert log_sigma.mean().item() == pytest.approx((lo + hi) / 2, abs=0.05)


def test_sampling_ranges_follow_table_1():
    assert build_precond("edm", EDMConfig(), Spy(1), 1).sigma_range == (0.002, 80.0)
    assert build_precond("ve", VEConfig(), Spy(1), 1).sigma_range == (0.02, 100.0)
    lo, hi = build_precond("vp", VPConfig(), Spy(1), 1).sigma_range
    assert lo == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 1e-6 + 0.1 * 1e-3) - 1))
    assert hi == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1))


def test_registry_errors():
    with pytest.raises(UserError, match="edm, vp, ve"):
        get_precond("karras")
    with pytest.raises(ValueError, match="VPConfig"):
        build_precond("vp", EDMConfig(), Spy(1), 1)


def test_log_sigma_shift_per_halving():
    sigma = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(log_sigma_shift(sigma, 0.5, 4), sigma * math.exp(-1.0))
    assert log_sigma_shift(sigma, 0.5, 1) is sigma
