"""Behavioural tests for the DDPM++ UNet."""

import pytest
import torch

from patch_diffusion.networks import DDPMpp, DDPMppConfig

# Small enough to keep every test well under a second on 2 CPU cores.
SMALL = DDPMppConfig(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16,))


def _perturb(net: torch.nn.Module, seed: int = 0) -> None:
    # Zero-initialised layers make the output identically zero; randomise all
    # weights so the tests can see real signal paths.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _net(config: DDPMppConfig = SMALL, seed: int = 0) -> DDPMpp:
    torch.manual_seed(seed)
    return DDPMpp(resolution=32, in_channels=3, out_channels=1, config=config)


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (8, 8), (16, 32), (8, 24)])
def test_output_shape_for_canvas_crops_and_non_square(size):
    net = _net()
    x = torch.randn(2, 3, *size)
    out = net(x, torch.randn(2))
    assert out.shape == (2, 1, *size)


def test_output_is_exactly_zero_at_init_and_nonzero_after_perturbing():
    net = _net()
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    assert torch.equal(net(x, t), torch.zeros(2, 1, 16, 16))
    _perturb(net)
    assert net(x, t).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(10, 16), (16, 6), (3, 3)])
def test_indivisible_size_raises(size):
    net = _net()
    with pytest.raises(ValueError, match="not divisible by 4"):
        net(torch.randn(1, 3, *size), torch.randn(1))


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="expected x of shape"):
        _net()(torch.randn(1, 2, 8, 8), torch.randn(1))


def test_attention_placement_follows_canvas_not_input():
    net = _net()
    attn_res = [32 >> level for level, _ in enumerate(SMALL.channel_mult)]
    assert attn_res == [32, 16, 8]
    # Encoder order: L0 block, L1 down, L1 block, L2 down, L2 block; only the
    # non-resampling block at nominal 16 (level 1) attends.
    assert [b.attn is not None for b in net.encoder] == [False, False, True, False, False]
    # Bigger canvas with the same config moves attention down one level.
    big = DDPMpp(resolution=64, in_channels=3, out_channels=1, config=SMALL)
    assert [b.attn is not None for b in big.encoder] == [False, False, False, False, True]
    # Same weights still run on a small crop; attention stays where it was built.
    assert big(torch.randn(1, 3, 8, 8), torch.randn(1)).shape == (1, 1, 8, 8)


def test_noise_level_changes_output():
    net = _net()
    _perturb(net)
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([0.0])), net(x, torch.tensor([1.0])))


def test_label_dropout_one_equals_zero_labels_in_train_mode():
    cfg = DDPMppConfig(
        model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), label_dim=10, label_dropout=1.0
    )
    net = _net(cfg)
    _perturb(net)
    x, t = torch.randn(3, 3, 8, 8), torch.randn(3)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4, 7]), 10).float()
    zeros = torch.zeros_like(labels)

    net.train()
    dropped = net(x, t, labels)
    net.eval()
    assert torch.allclose(dropped, net(x, t, zeros), atol=1e-6)
    # None is the unconditional input, equal to all-zero labels.
    assert torch.allclose(net(x, t, None), net(x, t, zeros), atol=1e-6)
    # In eval mode labels are never dropped, so they matter.
    assert not torch.allclose(net(x, t, labels), net(x, t, zeros), atol=1e-4)


def test_label_dropout_zero_keeps_labels_in_train_mode():
    cfg = DDPMppConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), label_dim=4)
    net = _net(cfg)
    _perturb(net)
    x, t = torch.randn(2, 3, 8, 8), torch.randn(2)
    labels = torch.eye(4)[:2]
    net.train()
    assert not torch.allclose(net(x, t, labels), net(x, t, torch.zeros_like(labels)), atol=1e-4)


def test_unconditional_net_rejects_labels():
    with pytest.raises(ValueError, match="unconditional"):
        _net()(torch.randn(1, 3, 8, 8), torch.randn(1), torch.zeros(1, 10))


def test_output_independent_of_batch_composition():
    net = _net().eval()
    _perturb(net)
    x, t = torch.randn(4, 3, 16, 16), torch.randn(4)
    batched = net(x, t)
    alone = net(x[:1], t[:1])
    assert torch.allclose(alone, batched[:1], atol=1e-5)
    # A different batch partner must not change sample 0 either.
    other = net(torch.cat([x[:1], torch.randn(1, 3, 16, 16)]), torch.cat([t[:1], torch.randn(1)]))
    assert torch.allclose(other[:1], batched[:1], atol=1e-5)


def test_gradients_reach_every_parameter():
    cfg = DDPMppConfig(
        model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(32, 16), label_dim=3
    )
    net = _net(cfg)
    assert sum(b.attn is not None for b in [*net.encoder, *net.decoder]) >= 3
    _perturb(net)
    net.train()
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2), torch.eye(3)[:2])
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_bf16_autocast_runs():
    net = _net()
    _perturb(net)
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    assert out.shape == (2, 1, 16, 16)
    assert torch.isfinite(out).all()
    ref = net(x, t)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


def test_num_parameters_matches_sum():
    net = _net()
    assert net.num_parameters() == sum(p.numel() for p in net.parameters()) > 0


def test_groupnorm_handles_odd_concat_widths():
    # 48 + 96 = 144 channels is not a multiple of 32 groups.
    cfg = DDPMppConfig(model_channels=48, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    net = _net(cfg)
    assert net(torch.randn(1, 3, 8, 8), torch.randn(1)).shape == (1, 1, 8, 8)


def test_config_validation():
    with pytest.raises(ValueError):
        DDPMppConfig(channel_mult=())
    with pytest.raises(ValueError):
        DDPMppConfig(label_dropout=1.5)
