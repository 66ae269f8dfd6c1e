import pytest
import torch

from patch_diffusion.samplers import SeededNoise, euler, heun, karras_sigmas

MU, STD = 0.3, 0.5


def ideal_denoiser(x, sigma):
    """E[y | y + n] for y ~ N(MU, STD^2) per pixel and n ~ N(0, sigma^2): exact."""
    s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    return MU + STD**2 / (STD**2 + s**2) * (x - MU)


def test_karras_sigmas():
    sigmas = karras_sigmas(18)
    assert len(sigmas) == 19
    assert sigmas[0] == pytest.approx(80.0) and sigmas[17] == pytest.approx(0.002) and sigmas[18] == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # evenly spaced in sigma^(1/rho)
    root = sigmas[:-1] ** (1 / 7)
    diffs = root[1:] - root[:-1]
    torch.testing.assert_close(diffs, diffs[0].expand_as(diffs))


# The stochastic sampler's discretisation bias shrinks with steps (std 0.526 at 32
# steps with strong churn, 0.504 at 128), so churn is checked at 128 steps.
@pytest.mark.parametrize("churn, steps", [(0.0, 32), (40.0, 128)])
def test_heun_recovers_gaussian_data(churn, steps):
    noise = SeededNoise(list(range(2048)), "cpu")
    latents = noise.randn((1, 4, 4))
    out = heun(ideal_denoiser, latents, karras_sigmas(steps), randn_like=noise.randn_like,
               S_churn=churn, S_min=0.05, S_max=50, S_noise=1.0)
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(STD, abs=0.01)


def test_euler_recovers_gaussian_data_more_loosely():
    latents = torch.randn(2048, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = euler(ideal_denoiser, latents, karras_sigmas(64))
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(STD, abs=0.03)


def test_wrong_denoiser_is_detected():
    # sanity check of the test itself: a denoiser for other data gives other statistics
    latents = torch.randn(2048, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = heun(lambda x, s: ideal_denoiser(x, s) * 0 + 1.0, latents, karras_sigmas(18))
    assert abs(out.mean().item() - MU) > 0.5


def test_seeded_noise_does_not_depend_on_batch():
    a = SeededNoise([5, 6, 7], "cpu").randn((2, 3))
    b = SeededNoise([7], "cpu").randn((2, 3))
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
