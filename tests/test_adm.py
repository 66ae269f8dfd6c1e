"""Behavioural tests for the ADM UNet, multi-head attention and the backbone registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from patch_diffusion.errors import UserError
from patch_diffusion.networks import ADM, BACKBONES, ADMConfig, Backbone, DDPMpp, get_backbone
from patch_diffusion.networks.layers import Attention, UNetBlock, positional_embedding

# Tiny: two levels, attention everywhere on a 16 canvas; 16- and 128-channel attention layers.
SMALL = ADMConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)
HEADS = ADMConfig(model_channels=16, channel_mult=(1, 8), num_blocks=1, attn_resolutions=(16, 8), dropout=0.0)


def _net(config: ADMConfig = SMALL, resolution: int = 16, label_dim: int = 0, seed: int = 0) -> ADM:
    torch.manual_seed(seed)
    return ADM(resolution, in_channels=5, out_channels=3, config=config, label_dim=label_dim)


def _perturb(net: torch.nn.Module, seed: int = 0) -> None:
    # Zero-initialised layers hide every signal path; randomise all weights.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _blocks(net: ADM) -> list[UNetBlock]:
    return [*net.encoder, *net.decoder]


def test_output_is_exactly_zero_at_init():
    net = _net(label_dim=4)
    x, t = torch.randn(2, 5, 16, 16), torch.randn(2)
    assert torch.equal(net(x, t), torch.zeros(2, 3, 16, 16))
    assert torch.equal(net(x, t, torch.eye(4)[:2]), torch.zeros(2, 3, 16, 16))


@pytest.mark.parametrize("size", [(16, 16), (8, 8), (2, 2), (8, 16), (4, 12), (32, 32)])
def test_output_shape_on_crops_full_canvas_and_non_square(size):
    net = _net()
    _perturb(net)
    out = net(torch.randn(2, 5, *size), torch.randn(2))
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_init_is_pytorch_default_and_residual_ends_are_zero():
    net = _net(HEADS, label_dim=10)
    ends = [b.conv1 for b in _blocks(net)] + [b.attn.proj for b in _blocks(net) if b.attn is not None]
    for layer in [*ends, net.conv_out]:
        assert not layer.weight.any() and not layer.bias.any()
    # Kaiming-uniform (a = sqrt(5)): weights and biases within 1 / sqrt(fan_in).
    qkv = net.encoder[0].attn.qkv
    for layer in (net.conv_in, net.map0, net.map1, net.encoder[0].conv0, net.encoder[0].affine, qkv):
        bound = 1 / math.sqrt(layer.weight[0].numel())
        assert bound * 0.9 < layer.weight.abs().max() <= bound
        assert 0 < layer.bias.abs().max() <= bound
    # Label map: no bias, N(0, 1) weights.
    assert net.map_label.bias is None
    assert 0.85 < net.map_label.weight.std().item() < 1.15
    assert all(b.norm0.eps == 1e-5 and b.skip_scale == 1.0 and b.adaptive_scale for b in _blocks(net))
    assert net.norm_out.eps == 1e-5


def test_parameter_names_and_heads():
    net = _net(HEADS, label_dim=10)
    names = {k: list(v.shape) for k, v in net.state_dict().items()}
    emb = 16 * 4
    assert names["map0.weight"] == [emb, 16]
    assert names["map1.weight"] == [emb, emb]
    assert names["map_label.weight"] == [emb, 10] and "map_label.bias" not in names
    assert names["conv_in.weight"] == [16, 5, 3, 3]
    assert names["encoder.0.affine.weight"] == [2 * 16, emb]  # scale and shift
    assert names["encoder.0.attn.qkv.weight"] == [3 * 16, 16, 1, 1]
    assert names["conv_out.weight"] == [3, 16, 3, 3]
    # Encoder: L0 block, L1 down, L1 block (16 -> 128 channels).
    down = net.encoder[1]
    assert down.resample == "down" and down.skip is None  # no 1x1 conv on an equal-width resampling skip
    assert not any(k.startswith("encoder.1.skip") for k in names)
    assert net.encoder[2].skip is not None  # 16 -> 128 needs a projection
    # 128 channels / 64 per head = 2 heads; 16 channels would give 0 under EDM's rule, we keep 1.
    assert net.encoder[2].attn.num_heads == 2
    assert net.encoder[0].attn.num_heads == 1
    assert net.decoder[0].attn.num_heads == 2 and net.decoder[1].attn is None  # middle: attn, none
    up = next(b for b in net.decoder if b.resample == "up")
    assert up.skip is None and up.in_channels == up.out_channels == 128


def test_attention_placement_by_canvas_not_input():
    # Canvas 16: level 0 is 16 wide (no attention), level 1 is 8 wide (attention).
    net = _net(SMALL, resolution=16)
    assert [b.attn is not None for b in net.encoder] == [False, False, True]
    # Decoder: middle (attn, none), both L1 blocks attend (not only the last), L0 up, L0 blocks.
    assert [b.attn is not None for b in net.decoder] == [True, False, True, True, False, False, False]
    # Canvas 8 puts level 0 at 8 wide: attention moves up a level, middle keeps its own.
    small_canvas = _net(SMALL, resolution=8)
    assert [b.attn is not None for b in small_canvas.encoder] == [True, False, False]
    assert [b.attn is not None for b in small_canvas.decoder] == [True, False, False, False, False, True, True]
    # The running input size does not move attention: same weights on crops and a larger input.
    _perturb(net)
    for size in (4, 8, 32):
        assert net(torch.randn(1, 5, size, size), torch.randn(1)).shape == (1, 3, size, size)
    assert [b.attn is not None for b in net.encoder] == [False, False, True]


def test_noise_embedding_is_cos_sin_without_endpoint():
    net = _net()
    seen = []
    net.map0.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    t = torch.tensor([0.0, 3.0])
    net(torch.randn(2, 5, 8, 8), t)
    assert seen[0][0].tolist() == [1.0] * 8 + [0.0] * 8
    freqs = torch.tensor([10000.0 ** (-k / 8) for k in range(8)])
    assert torch.allclose(seen[0][1], torch.cat([(3 * freqs).cos(), (3 * freqs).sin()]), atol=1e-6, rtol=0)
    assert torch.equal(seen[0], positional_embedding(t, 16, endpoint=False))


def test_multi_head_attention_matches_per_head_formula():
    torch.manual_seed(0)
    attn = Attention(8, 2, skip_scale=0.5, init_zero=lambda layer: None)  # keep a random proj
    x = torch.randn(2, 8, 3, 4)
    q, k, v = attn.qkv(attn.norm(x)).reshape(2, 3, 8, 12).unbind(1)  # [q | k | v], each [B, C, HW]
    heads = []
    for hd in range(2):
        sl = slice(4 * hd, 4 * hd + 4)
        w = torch.softmax(q[:, sl].transpose(1, 2) @ k[:, sl] / math.sqrt(4), dim=-1)  # [B, HWq, HWk]
        heads.append(v[:, sl] @ w.transpose(1, 2))
    expected = (x + attn.proj(torch.cat(heads, dim=1).reshape(2, 8, 3, 4))) * 0.5
    assert torch.allclose(attn(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="heads"):
        ADM(16, 5, 3, ADMConfig(model_channels=100, channel_mult=(2,), num_blocks=1, attn_resolutions=()))


def test_labels_all_zero_equal_none():
    net = _net(label_dim=4).eval()
    _perturb(net)
    x, t = torch.randn(2, 5, 8, 8), torch.randn(2)
    assert torch.equal(net(x, t, None), net(x, t, torch.zeros(2, 4)))
    assert not torch.allclose(net(x, t, torch.eye(4)[:2]), net(x, t, None), atol=1e-4)


def test_labels_change_output_after_training_steps():
    net = _net(label_dim=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, t = torch.randn(4, 5, 8, 8), torch.randn(4)
    labels = F.one_hot(torch.tensor([0, 1, 2, 3]), 4).float()
    target = torch.randn(4, 3, 8, 8)

    def step() -> None:
        opt.zero_grad()
        (net(x, t, labels) - target).square().mean().backward()
        opt.step()

    # Step 1: with the output conv at zero, only it gets a gradient, so the
    # output moves but cannot depend on the labels yet (residual ends are zero).
    step()
    with torch.no_grad():
        out, out_null = net(x, t, labels), net(x, t, None)
    assert out.abs().max() > 0
    assert torch.equal(out, out_null)
    # Step 2 reaches the residual branches, where the label embedding enters.
    step()
    with torch.no_grad():
        assert (net(x, t, labels) - net(x, t, None)).abs().max() > 1e-4


def test_gradients_reach_every_parameter():
    net = _net(HEADS, label_dim=3)
    _perturb(net)
    net(torch.randn(2, 5, 8, 8), torch.randn(2), torch.eye(3)[:2]).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("size", [(5, 8), (8, 3), (1, 1)])
def test_indivisible_size_raises(size):
    with pytest.raises(ValueError, match="not divisible by 2"):
        _net()(torch.randn(1, 5, *size), torch.randn(1))


def test_bad_inputs_raise():
    net = _net()
    with pytest.raises(ValueError, match="expected x of shape"):
        net(torch.randn(1, 3, 8, 8), torch.randn(1))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(1, 5, 8, 8), torch.randn(1), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="noise_labels"):
        net(torch.randn(2, 5, 8, 8), torch.randn(3))
    with pytest.raises(ValueError, match="class_labels must have shape"):
        _net(label_dim=4)(torch.randn(2, 5, 8, 8), torch.randn(2), torch.zeros(2, 3))


def test_config_validation():
    for bad in (dict(model_channels=15), dict(channel_mult=()), dict(channel_mult=(1, 0)), dict(num_blocks=0),
                dict(dropout=-0.1), dict(channels_per_head=0), dict(embedding_channels_mult=0),
                dict(attn_resolutions=(-8,))):
        with pytest.raises(ValueError):
            ADMConfig(**bad)
    assert ADMConfig(channel_mult=[1, 2], attn_resolutions=[8]) == ADMConfig(channel_mult=(1, 2), attn_resolutions=(8,))


def test_default_parameter_count_matches_the_paper():
    # EDM reports 295.90M parameters for its class-conditional ImageNet-64 ADM.
    with torch.device("meta"):
        net = ADM(64, 3, 3, ADMConfig(), label_dim=1000)
    assert round(net.num_parameters() / 1e6, 2) == 295.90


# ---------------------------------------------------------------- registry


def _tiny_config(backbone: Backbone):
    # The shared field names every backbone config accepts.
    return backbone.config(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_builds_every_backbone(name):
    backbone = get_backbone(name)
    assert backbone is BACKBONES[name] and backbone.description
    cfg = _tiny_config(backbone)
    assert backbone.size_multiple(cfg) == 2
    torch.manual_seed(0)
    net = backbone.build(cfg, (16, 16), 3 + 2, 3, 0)
    out = net(torch.randn(2, 3 + 2, 16, 16), torch.randn(2))
    assert out.shape == (2, 3, 16, 16)
    conditional = backbone.build(cfg, (16, 24), 5, 3, 10)
    assert conditional(torch.randn(2, 5, 16, 24), torch.randn(2), torch.eye(10)[:2]).shape == (2, 3, 16, 24)


def test_registry_builds_the_right_classes():
    assert isinstance(get_backbone("ddpmpp").build(_tiny_config(BACKBONES["ddpmpp"]), (16, 16), 5, 3, 0), DDPMpp)
    adm = get_backbone("adm").build(_tiny_config(BACKBONES["adm"]), (32, 16), 5, 3, 7)
    assert isinstance(adm, ADM) and adm.resolution == 16 and adm.label_dim == 7
    assert BACKBONES["adm"].size_multiple(ADMConfig()) == 8


def test_unknown_backbone_names_the_choices():
    with pytest.raises(UserError, match="unknown backbone 'resnet'") as info:
        get_backbone("resnet")
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in BACKBONES)
