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
