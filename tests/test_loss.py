
import pytest
import torch
from torch import nn

from patch_diffusion.loss import LossConfig, edm_loss
from patch_diffusion.precond import EDMConfig, EDMPrecond


class Recorder(EDMPrecond):
    """EDM's noise distribution and weight, with a denoiser that records its sigmas."""

    def __init__(self, output=None):
        super().__init__(nn.Identity(), 1, EDMConfig())
        self.output = output
        self.sigmas = []

    def forward(self, x, sigma, labels, pos=None):
        self.sigmas.append(sigma.clone())
        return torch.zeros_like(x) if self.output is None else self.output


def test_sigma_distribution_is_lognormal():
    rec = Recorder()
    images = torch.zeros(20000, 1, 2, 2)
    edm_loss(rec, images, torch.zeros(20000, 2, 2, 2), None, LossConfig(), torch.Generator().manual_seed(0))
    log_sigma = rec.sigmas[0].log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)


def test_perfect_denoiser_has_zero_loss():
    images = torch.rand(8, 3, 4, 4)
    loss = edm_loss(Recorder(images), images, torch.zeros(8, 2, 4, 4), None, LossConfig(),
                    torch.Generator().manual_seed(0))
    assert loss.item() == 0


def test_sum_reduction_is_pixels_times_mean():
    images = torch.rand(8, 3, 4, 5)
    args = (Recorder(), images, torch.zeros(8, 2, 4, 5), None)
    mean = edm_loss(*args, LossConfig(reduction="mean"), torch.Generator().manual_seed(1))
    total = edm_loss(*args, LossConfig(reduction="sum"), torch.Generator().manual_seed(1))
    assert total.item() == pytest.approx(mean.item() * 3 * 4 * 5, rel=1e-5)


def test_zero_output_loss_equals_weighted_target():
    # D = 0 everywhere: loss = mean(lambda(sigma) * y^2), computable by hand
    images = torch.full((4, 1, 2, 2), 0.5)
    rec = Recorder()
    loss = edm_loss(rec, images, torch.zeros(4, 2, 2, 2), None, LossConfig(), torch.Generator().manual_seed(2))
    sigma = rec.sigmas[0]
    expected = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2 * 0.25).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("divisor, shift, expected", [(1, 1.0, -1.2), (2, 1.0, -2.2), (4, 1.0, -3.2),
                                                      (4, 0.5, -2.2), (4, 0.0, -1.2)])
def test_patch_noise_shift_lowers_p_mean_per_halving(divisor, shift, expected):
    rec = Recorder()
    images = torch.zeros(20000, 1, 2, 2)
    edm_loss(rec, images, torch.zeros(20000, 2, 2, 2), None, LossConfig(patch_P_mean_shift=shift),
             torch.Generator().manual_seed(0), divisor=divisor)
    log_sigma = rec.sigmas[0].log()
    assert log_sigma.mean().item() == pytest.approx(expected, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.03)
