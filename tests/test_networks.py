"""Behavioural tests for the shared layers and the DDPM++ UNet."""

import math

import pytest
import torch
import torch.nn.functional as F

from patch_diffusion.networks import DDPMpp, DDPMppConfig
from patch_diffusion.networks.layers import (
    UNetBlock,
    group_norm,
    positional_embedding,
    resample,
    xavier_init,
)

# Small enough to keep every test well under a second on 2 CPU cores.
SMALL = DDPMppConfig(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16,))
# This project's earlier network: scale-shift conditioning, exactly-zero residual ends.
LEGACY = DDPMppConfig(
    model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16,), adaptive_scale=True, init_zero=0.0
)


def _perturb(net: torch.nn.Module, seed: int = 0) -> None:
    # (Near-)zero-initialised layers make the output (nearly) zero; randomise all
    # weights so the tests can see real signal paths.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _net(config: DDPMppConfig = SMALL, seed: int = 0, label_dim: int = 0) -> DDPMpp:
    torch.manual_seed(seed)
    return DDPMpp(resolution=32, in_channels=3, out_channels=1, config=config, label_dim=label_dim)


def _blocks(net: DDPMpp) -> list[UNetBlock]:
    return [*net.encoder, *net.decoder]


# ---------------------------------------------------------------- layers


def test_positional_embedding_exact_values():
    t = torch.tensor([0.0, 1.0])
    # endpoint=True: 4 frequencies 10000 ** (-k / 3); endpoint=False: 10000 ** (-k / 4).
    for endpoint, denom in ((True, 3), (False, 4)):
        freqs = [10000.0 ** (-k / denom) for k in range(4)]
        cos_sin = positional_embedding(t, 8, endpoint=endpoint)
        sin_cos = positional_embedding(t, 8, endpoint=endpoint, sin_first=True)
        # t = 0 is exact: cos 0 = 1, sin 0 = 0.
        assert cos_sin[0].tolist() == [1.0] * 4 + [0.0] * 4
        assert sin_cos[0].tolist() == [0.0] * 4 + [1.0] * 4
        expected = torch.tensor([math.cos(f) for f in freqs] + [math.sin(f) for f in freqs])
        assert torch.allclose(cos_sin[1], expected, atol=1e-7, rtol=0)
        assert torch.equal(sin_cos, torch.cat([cos_sin[:, 4:], cos_sin[:, :4]], dim=1))


def test_resample_is_average_pool_and_nearest():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert resample(x, "down").tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]
    assert resample(resample(x, "down"), "up")[0, 0, :2, :2].tolist() == [[2.5, 2.5], [2.5, 2.5]]
    assert resample(x, None) is x


def test_group_norm_groups():
    assert group_norm(256).num_groups == 32
    assert group_norm(16).num_groups == 4
    assert group_norm(144).num_groups == 24  # 32 does not divide 144
    assert group_norm(2).num_groups == 1
    assert group_norm(8, eps=1e-6).eps == 1e-6


def _manual_block(block: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    # The block's maths written out step by step.
    h = block.conv0(resample(F.silu(block.norm0(x)), block.resample))
    params = block.affine(emb)[:, :, None, None]
    if block.adaptive_scale:
        scale, shift = params.chunk(2, dim=1)
        h = F.silu(shift + block.norm1(h) * (scale + 1))
    else:
        h = F.silu(block.norm1(h + params))
    skip = resample(x, block.resample)
    if block.skip is not None:
        skip = block.skip(skip)
    return (block.conv1(h) + skip) * block.skip_scale


@pytest.mark.parametrize("adaptive_scale", [True, False])
@pytest.mark.parametrize("resample_mode", [None, "down", "up"])
def test_unet_block_matches_its_formula(adaptive_scale, resample_mode):
    torch.manual_seed(0)
    block = UNetBlock(8, 12, 5, resample=resample_mode, skip_scale=0.5, adaptive_scale=adaptive_scale,
                      init_zero=xavier_init(1.0)).eval()
    assert block.affine.out_features == (24 if adaptive_scale else 12)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 5)
    assert torch.allclose(block(x, emb), _manual_block(block, x, emb), atol=1e-5)


def test_resample_proj_decides_the_skip_conv():
    for mode in ("down", "up"):
        assert UNetBlock(8, 8, 4, resample=mode, resample_proj=False).skip is None
        assert UNetBlock(8, 8, 4, resample=mode, resample_proj=True).skip is not None
    assert UNetBlock(8, 8, 4).skip is None
    assert UNetBlock(8, 4, 4).skip is not None  # width change always projects
    # With the residual branch zeroed (default init_zero) and no projection,
    # the block is exactly the resampled input.
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(UNetBlock(8, 8, 4, resample="down")(x, torch.randn(1, 4)), F.avg_pool2d(x, 2))


# ---------------------------------------------------------------- DDPM++


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (8, 8), (16, 32), (8, 24)])
def test_output_shape_for_canvas_crops_and_non_square(size):
    net = _net()
    x = torch.randn(2, 3, *size)
    out = net(x, torch.randn(2))
    assert out.shape == (2, 1, *size)


def test_legacy_output_is_exactly_zero_at_init_and_nonzero_after_perturbing():
    net = _net(LEGACY)
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2)
    assert torch.equal(net(x, t), torch.zeros(2, 1, 16, 16))
    _perturb(net)
    assert net(x, t).abs().max() > 1e-3


def test_edm_output_is_tiny_but_nonzero_at_init():
    net = _net()
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2))
    assert out.abs().max() < 1e-3
    assert out.abs().max() > 0


def _xavier_bound(layer: torch.nn.Module) -> float:
    w = layer.weight
    receptive = w[0, 0].numel() if w.ndim == 4 else 1
    return math.sqrt(6.0 / ((w.shape[0] + w.shape[1]) * receptive))


def test_edm_init_of_residual_ends():
    net = _net(label_dim=3)
    ends = [b.conv1 for b in _blocks(net)] + [b.attn.proj for b in _blocks(net) if b.attn is not None]
    ends.append(net.conv_out)
    assert len(ends) > 10
    for layer in ends:
        w = layer.weight.abs().max().item()
        assert 0 < w <= 1e-5 * _xavier_bound(layer)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    # qkv: Xavier with gain sqrt(0.2); ordinary layers: plain Xavier, zero bias.
    qkv = next(b.attn.qkv for b in _blocks(net) if b.attn is not None)
    assert qkv.weight.abs().max() <= math.sqrt(0.2) * _xavier_bound(qkv)
    assert qkv.weight.abs().max() > 0.5 * math.sqrt(0.2) * _xavier_bound(qkv)
    for layer in (net.conv_in, net.map0, net.map1, net.map_label, net.encoder[0].conv0, net.encoder[0].affine):
        assert layer.weight.abs().max() <= _xavier_bound(layer)
        assert layer.weight.abs().max() > 0.5 * _xavier_bound(layer)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_legacy_residual_ends_are_exactly_zero():
    net = _net(LEGACY)
    ends = [b.conv1 for b in _blocks(net)] + [b.attn.proj for b in _blocks(net) if b.attn is not None]
    for layer in [*ends, net.conv_out]:
        assert not layer.weight.any() and not layer.bias.any()


def test_affine_width_follows_adaptive_scale():
    edm, legacy = _net(), _net(LEGACY)
    for b_edm, b_old in zip(_blocks(edm), _blocks(legacy)):
        assert b_edm.affine.out_features == b_edm.out_channels
        assert b_old.affine.out_features == 2 * b_old.out_channels


def _map0_input(net: DDPMpp, t: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = net.map0.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    net(torch.randn(len(t), 3, 8, 8), t)
    handle.remove()
    return seen[0]


def test_noise_embedding_order():
    t = torch.tensor([0.0, 2.0])
    # EDM's DDPM++ feeds [sin, cos]; the legacy net keeps [cos, sin] for its checkpoints.
    edm = _map0_input(_net(), t)
    assert edm[0].tolist() == [0.0] * 8 + [1.0] * 8
    assert torch.equal(edm, positional_embedding(t, 16, endpoint=True, sin_first=True))
    legacy = _map0_input(_net(LEGACY), t)
    assert legacy[0].tolist() == [1.0] * 8 + [0.0] * 8
    assert torch.equal(legacy, positional_embedding(t, 16, endpoint=True))


def _legacy_block_keys(prefix: str, cin: int, cout: int, resample_mode: str | None, attn: bool, emb: int) -> dict:
    # Parameter names and shapes of a residual block as the network had them before layers.py.
    keys = {
        "norm0.weight": [cin], "norm0.bias": [cin],
        "conv0.weight": [cout, cin, 3, 3], "conv0.bias": [cout],
        "affine.weight": [2 * cout, emb], "affine.bias": [2 * cout],
        "norm1.weight": [cout], "norm1.bias": [cout],
        "conv1.weight": [cout, cout, 3, 3], "conv1.bias": [cout],
    }
    if cin != cout or resample_mode is not None:
        keys |= {"skip.weight": [cout, cin, 1, 1], "skip.bias": [cout]}
    if attn:
        keys |= {
            "attn.norm.weight": [cout], "attn.norm.bias": [cout],
            "attn.qkv.weight": [3 * cout, cout, 1, 1], "attn.qkv.bias": [3 * cout],
            "attn.proj.weight": [cout, cout, 1, 1], "attn.proj.bias": [cout],
        }
    return {f"{prefix}.{k}": v for k, v in keys.items()}


def test_state_dict_keys_and_shapes_match_the_old_network():
    cfg = DDPMppConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                       adaptive_scale=True, init_zero=0.0)
    net = DDPMpp(16, 3, 1, cfg, label_dim=2)
    # (in, out, resample, attention) of each block, written out for this config.
    encoder = [(8, 8, None, False), (8, 8, "down", False), (8, 16, None, True)]
    decoder = [(16, 16, None, True), (16, 16, None, False), (32, 16, None, False), (24, 16, None, True),
               (16, 16, "up", False), (24, 8, None, False), (16, 8, None, False)]
    expected = {
        "map_label.weight": [8, 2], "map_label.bias": [8],
        "map0.weight": [32, 8], "map0.bias": [32],
        "map1.weight": [32, 32], "map1.bias": [32],
        "conv_in.weight": [8, 3, 3, 3], "conv_in.bias": [8],
    }
    for name, blocks in (("encoder", encoder), ("decoder", decoder)):
        for i, spec in enumerate(blocks):
            expected |= _legacy_block_keys(f"{name}.{i}", *spec, emb=32)
    expected |= {"norm_out.weight": [8], "norm_out.bias": [8], "conv_out.weight": [1, 8, 3, 3], "conv_out.bias": [1]}

    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    # The EDM setting has the same keys; only the affine layers are half as wide.
    edm = DDPMpp(16, 3, 1, DDPMppConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,)),
                 label_dim=2)
    edm_shapes = {k: list(v.shape) for k, v in edm.state_dict().items()}
    assert list(edm_shapes) == list(expected)
    for k, shape in expected.items():
        if ".affine." in k:
            shape = [shape[0] // 2, *shape[1:]]
        assert edm_shapes[k] == shape, k


def test_edm_parameter_count_matches_the_paper():
    # EDM reports 55.73M parameters for its CIFAR-10 DDPM++ (meta device: no memory, no init cost).
    cfg = DDPMppConfig(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,))
    with torch.device("meta"):
        net = DDPMpp(32, 3, 3, cfg)
    assert round(net.num_parameters() / 1e6, 2) == 55.73


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
    # Decoder: middle (attn, none), L2 x2, L1 up, L1 x2 (last attends), L0 up, L0 x2.
    assert [b.attn is not None for b in net.decoder] == [True, False, False, False, False, False, True,
                                                         False, False, False]
    assert all(b.attn.num_heads == 1 for b in _blocks(net) if b.attn is not None)
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


@pytest.mark.parametrize("config", [SMALL, LEGACY])
def test_labels_matter_and_none_equals_zero_labels(config):
    net = _net(config, label_dim=10).eval()
    _perturb(net)
    x, t = torch.randn(3, 3, 8, 8), torch.randn(3)
    labels = F.one_hot(torch.tensor([1, 4, 7]), 10).float()
    zeros = torch.zeros_like(labels)
    # None is the unconditional input, equal to all-zero labels.
    assert torch.equal(net(x, t, None), net(x, t, zeros))
    assert not torch.allclose(net(x, t, labels), net(x, t, zeros), atol=1e-4)
    # No label dropout inside the network: train mode uses the labels as given.
    net.train()
    assert not torch.allclose(net(x, t, labels), net(x, t, zeros), atol=1e-4)


def test_unconditional_net_rejects_labels():
    with pytest.raises(ValueError, match="unconditional"):
        _net()(torch.randn(1, 3, 8, 8), torch.randn(1), torch.zeros(1, 10))


def test_wrong_label_shape_raises():
    with pytest.raises(ValueError, match="class_labels must have shape"):
        _net(label_dim=4)(torch.randn(2, 3, 8, 8), torch.randn(2), torch.zeros(2, 5))


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


@pytest.mark.parametrize("config", [SMALL, LEGACY])
def test_gradients_reach_every_parameter(config):
    cfg = DDPMppConfig(
        model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(32, 16),
        adaptive_scale=config.adaptive_scale, init_zero=config.init_zero,
    )
    net = _net(cfg, label_dim=3)
    assert sum(b.attn is not None for b in _blocks(net)) >= 3
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
    for bad in (dict(channel_mult=()), dict(model_channels=6 + 1), dict(num_blocks=0), dict(dropout=1.0),
                dict(init_zero=-1e-5), dict(init_zero=float("nan")), dict(attn_resolutions=(0,)),
                dict(embedding_channels_mult=0)):
        with pytest.raises(ValueError):
            DDPMppConfig(**bad)
    # Lists (as read from JSON) become tuples.
    assert DDPMppConfig(channel_mult=[1, 2], attn_resolutions=[8]).channel_mult == (1, 2)
    assert not hasattr(DDPMppConfig(), "label_dim") and not hasattr(DDPMppConfig(), "label_dropout")
    with pytest.raises(ValueError, match="label_dim"):
        DDPMpp(16, 3, 1, SMALL, label_dim=-1)
