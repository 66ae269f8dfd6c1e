"""Tests for the diffusers UNet2DModel backbone adapter (tiny nets, CPU)."""

import dataclasses
import json
import sys

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402

from patch_diffusion.errors import UserError  # noqa: E402
from patch_diffusion.networks.unet2d import (  # noqa: E402
    UNet2DBackbone,
    UNet2DConfig,
    build_unet2d,
    unet2d_config_from_folder,
    unet2d_size_multiple,
)

# Three levels of widths 8/16/16: attention only at canvas level 8 of a 16 canvas.
SMALL = UNet2DConfig(model_channels=8, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,))


def _tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    kwargs.update(overrides)
    unet = UNet2DModel(**kwargs)
    # Perturb every weight so no path is trivially zero.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return unet.eval()


def _saved(tmp_path, name: str = "unet", **overrides):
    unet = _tiny_unet(**overrides)
    folder = tmp_path / name
    unet.save_pretrained(str(folder), safe_serialization=True)
    return unet, folder


def _inputs(batch: int = 3, size=(16, 16), channels: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=g)
    pos = torch.rand(batch, 2, *size, generator=g) * 2 - 1
    t = torch.randn(batch, generator=g)
    return x, pos, t


@pytest.mark.parametrize("label_dim", [0, 4])
def test_widened_pretrained_unet_reproduces_the_original(tmp_path, label_dim):
    unet, folder = _saved(tmp_path)
    config = dataclasses.replace(unet2d_config_from_folder(str(folder)), timestep_scale=2.5)
    assert config.pretrained == str(folder)
    net = build_unet2d(config, (16, 16), 5, 3, label_dim)
    net.load_pretrained(str(folder))
    net.eval()
    x, pos, t = _inputs()
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 1]), 4).float() if label_dim else None
    with torch.no_grad():
        got = net(torch.cat([x, pos], dim=1), t, labels)
        want = unet(x, t * 2.5).sample
    # Zero coordinate weights add exact zeros, but the widened conv_in reduces over
    # 45 instead of 27 terms, so a different kernel may sum in another order: allow
    # float32 rounding (it is bit-exact on this CPU). The zero-initialised class
    # embedding keeps a conditional net exact too.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(net.unet.conv_in.weight[:, 3:], torch.zeros_like(net.unet.conv_in.weight[:, 3:]))


def test_bin_only_missing_folder_and_missing_config_are_user_errors(tmp_path):
    unet = _tiny_unet()
    bin_folder = tmp_path / "bin"
    unet.save_pretrained(str(bin_folder), safe_serialization=False)
    assert not list(bin_folder.glob("*.safetensors"))
    with pytest.raises(UserError, match=r"\.bin"):
        unet2d_config_from_folder(str(bin_folder))
    with pytest.raises(UserError, match="does not exist"):
        unet2d_config_from_folder(str(tmp_path / "nowhere"))
    net = build_unet2d(SMALL, (16, 16), 5, 3, 0)
    with pytest.raises(UserError, match=r"\.bin"):
        net.load_pretrained(str(bin_folder))
    with pytest.raises(UserError, match="does not exist"):
        net.load_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        unet2d_config_from_folder(str(tmp_path / "empty"))


def test_class_conditional_pretrained_config_is_refused(tmp_path):
    _, folder = _saved(tmp_path, num_class_embeds=3)
    with pytest.raises(UserError, match="class embedding"):
        unet2d_config_from_folder(str(folder))
    verbatim = UNet2DConfig(unet=json.loads((folder / "config.json").read_text()))
    with pytest.raises(UserError, match="class embedding"):
        build_unet2d(verbatim, (16, 16), 5, 3, 0)


def test_verbatim_channel_mismatch_names_both_numbers(tmp_path):
    _, folder = _saved(tmp_path)
    config = unet2d_config_from_folder(str(folder))
    with pytest.raises(UserError, match=r"in_channels=3 and out_channels=3, but the images have C=1"):
        build_unet2d(config, (16, 16), 3, 1, 0)


@pytest.mark.parametrize("change, message", [
    (dict(time_embedding_type="fourier"), "positional"),
    (dict(down_block_types=["SkipDownBlock2D", "AttnSkipDownBlock2D"]), "Skip"),
])
def test_unsupported_verbatim_configs_are_user_errors(tmp_path, change, message):
    _, folder = _saved(tmp_path)
    config = unet2d_config_from_folder(str(folder))
    with pytest.raises(UserError, match=message):
        build_unet2d(UNet2DConfig(unet={**config.unet, **change}), (16, 16), 5, 3, 0)


def test_mismatched_architecture_is_a_user_error(tmp_path):
    _, folder = _saved(tmp_path)
    net = build_unet2d(SMALL, (16, 16), 5, 3, 0)
    with pytest.raises(UserError, match="does not match"):
        net.load_pretrained(str(folder))


def test_attention_blocks_follow_attn_resolutions():
    net = build_unet2d(SMALL, (16, 16), 5, 3, 0)
    cfg = net.unet.config
    assert list(cfg.down_block_types) == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert list(cfg.up_block_types) == ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert list(cfg.block_out_channels) == [8, 16, 16]
    assert cfg.layers_per_block == 1 and cfg.in_channels == 3 and cfg.out_channels == 3
    assert [type(b).__name__ for b in net.unet.down_blocks] == list(cfg.down_block_types)
    assert [type(b).__name__ for b in net.unet.up_blocks] == list(cfg.up_block_types)
    assert net.unet.conv_in.in_channels == 5
    # Non-square canvas: the nominal level width comes from the shorter side.
    wide = build_unet2d(SMALL, (16, 24), 5, 3, 0)
    assert list(wide.unet.config.down_block_types) == list(cfg.down_block_types)


def test_norm_groups_divide_every_width():
    config = UNet2DConfig(model_channels=12, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())
    net = build_unet2d(config, (8, 8), 3, 1, 0)
    assert net.unet.config.norm_num_groups == 12
    assert build_unet2d(SMALL, (16, 16), 5, 3, 0).unet.config.norm_num_groups == 8
    x, pos, t = _inputs(channels=1, size=(8, 8))
    assert net(torch.cat([x, pos], 1), t).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("canvas, size", [
    ((16, 16), (16, 16)),  # full canvas
    ((16, 16), (8, 8)),  # crops
    ((16, 16), (4, 12)),
    ((16, 24), (16, 24)),  # non-square canvas
    ((16, 24), (8, 16)),
])
def test_output_shapes(canvas, size):
    net = build_unet2d(SMALL, canvas, 5, 3, 0)
    x, pos, t = _inputs(batch=2, size=size)
    assert net(torch.cat([x, pos], 1), t).shape == (2, 3, *size)


def test_sides_not_divisible_by_the_multiple_raise():
    assert unet2d_size_multiple(SMALL) == 4
    assert unet2d_size_multiple(UNet2DConfig(channel_mult=(1, 2, 2, 2))) == 8
    assert unet2d_size_multiple(UNet2DConfig(unet={"down_block_types": ["DownBlock2D"] * 2})) == 2
    net = build_unet2d(SMALL, (16, 16), 5, 3, 0)
    assert net.size_multiple == 4
    x, pos, t = _inputs(batch=1, size=(6, 8))
    with pytest.raises(ValueError, match=r"6x8.*divisible by 4"):
        net(torch.cat([x, pos], 1), t)


def test_class_labels_separate_after_one_step_and_zero_row_is_null():
    torch.manual_seed(0)
    net = build_unet2d(SMALL, (16, 16), 5, 3, 3)
    assert net.unet.class_embedding.num_embeddings == 4  # 3 classes + null
    x, pos, t = _inputs(batch=1)
    inp = torch.cat([x, pos], 1)
    one_hot = torch.eye(3)

    def out(label):
        with torch.no_grad():
            return net(inp, t, label)

    # Zero-initialised embedding: all classes start as the unconditional net.
    assert torch.equal(out(one_hot[:1]), out(one_hot[1:2]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xb, posb, tb = _inputs(batch=4, seed=5)
    labels = one_hot[torch.tensor([0, 1, 2, 0])]
    loss = (net(torch.cat([xb, posb], 1), tb, labels) - torch.randn(4, 3, 16, 16)).square().mean()
    loss.backward()
    opt.step()
    assert (out(one_hot[:1]) - out(one_hot[1:2])).abs().max() > 1e-4
    assert torch.equal(out(torch.zeros(1, 3)), out(None))
    assert not torch.equal(out(torch.zeros(1, 3)), out(one_hot[:1]))


def test_unconditional_net_rejects_class_labels():
    net = build_unet2d(SMALL, (16, 16), 5, 3, 0)
    x, pos, t = _inputs(batch=1)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.cat([x, pos], 1), t, torch.ones(1, 3))


def test_missing_diffusers_says_how_to_install(monkeypatch, tmp_path):
    net = build_unet2d(SMALL, (16, 16), 5, 3, 0)
    _, folder = _saved(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes "import diffusers" fail
    with pytest.raises(UserError, match=r"pip install 'patch-diffusion\[diffusers\]'"):
        build_unet2d(SMALL, (16, 16), 5, 3, 0)
    with pytest.raises(UserError, match="needs the diffusers package"):
        net.load_pretrained(str(folder))


def test_config_validation_and_list_coercion():
    assert UNet2DConfig(channel_mult=[1, 2], attn_resolutions=[8]).channel_mult == (1, 2)
    for bad in [dict(model_channels=0), dict(channel_mult=()), dict(num_blocks=0), dict(dropout=1.0),
                dict(timestep_scale=0.0), dict(attn_resolutions=(0,)), dict(unet=[1]), dict(pretrained=3)]:
        with pytest.raises(ValueError):
            UNet2DConfig(**bad)
    with pytest.raises(ValueError, match="image channels"):
        build_unet2d(SMALL, (16, 16), 5, 4, 0)


def test_backbone_is_a_module_with_the_unet_inside():
    net = build_unet2d(SMALL, (16, 16), 5, 3, 0)
    assert isinstance(net, UNet2DBackbone) and isinstance(net.unet, UNet2DModel)
    assert net.num_parameters() == sum(p.numel() for p in net.unet.parameters())
