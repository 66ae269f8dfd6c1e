import dataclasses

import pytest

from patch_diffusion.config import PRESETS, TrainConfig, from_dict, get_preset, to_dict
from patch_diffusion.errors import UserError


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json_form(name):
    config = get_preset(name)
    assert from_dict(TrainConfig, to_dict(config)) == config


def test_unknown_preset_lists_names():
    with pytest.raises(UserError, match="tiny"):
        get_preset("nope")


def test_foreign_config_is_rejected():
    with pytest.raises(UserError, match="unknown fields"):
        from_dict(TrainConfig, {"learning_rate": 1})


def test_step_lr_warms_up_and_scales_patch_steps():
    from patch_diffusion.step import step_lr
    config = TrainConfig(lr=1e-3, lr_warmup_kimg=1.0, patch_lr_scale=2.0)
    assert step_lr(config, 0, 100.0, 1) == pytest.approx(1e-4)  # 100 of 1000 warm-up images
    assert step_lr(config, 0, 100.0, 4) == pytest.approx(2e-4)
    assert step_lr(config, 50, 100.0, 1) == pytest.approx(1e-3)
    assert step_lr(config, 50, 100.0, 2) == pytest.approx(2e-3)


def version1_config():
    """A run config as version 0.1 wrote it: DDPM++ and EDM built in."""
    return {
        "preset": "tiny",
        "model": {"resolution": [16, 16], "channels": 3, "sigma_data": 0.5,
                  "network": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                              "attn_resolutions": [], "dropout": 0.1, "label_dim": 3,
                              "label_dropout": 0.2, "embedding_channels_mult": 4}},
        "loss": {"P_mean": -1.0, "P_std": 1.4, "sigma_data": 0.5, "reduction": "sum",
                 "patch_P_mean_shift": 0.0},
        "sampler": {"num_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0,
                    "S_churn": 0.0, "S_min": 0.0, "S_max": None, "S_noise": 1.0},
    }


def test_version1_configs_migrate():
    from patch_diffusion.networks import DDPMppConfig
    from patch_diffusion.precond import EDMConfig

    config = from_dict(TrainConfig, version1_config())
    model = config.model
    assert model.backbone == "ddpmpp" and model.precond == "edm"
    assert model.backbone_config == DDPMppConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                                 attn_resolutions=(), dropout=0.1,
                                                 adaptive_scale=True, init_zero=0.0)
    assert model.precond_config == EDMConfig(sigma_data=0.5, P_mean=-1.0, P_std=1.4)
    assert (model.label_dim, model.label_dropout) == (3, 0.2)
    assert config.loss.reduction == "sum" and config.sampler.name == "heun"
    assert config.version == 3 and config.data.subset_seed is None  # its first-N subsets


def test_version2_configs_keep_first_n_subsets_and_new_ones_draw_at_random():
    old = to_dict(TrainConfig())
    old["version"] = 2
    del old["data"]["subset_seed"]
    migrated = from_dict(TrainConfig, old)
    assert migrated.data.subset_seed is None and migrated.version == 3
    assert migrated == dataclasses.replace(TrainConfig(), data=dataclasses.replace(TrainConfig().data, subset_seed=None))
    assert TrainConfig().data.subset_seed == 0
    assert from_dict(TrainConfig, to_dict(TrainConfig())) == TrainConfig()  # today's configs untouched


def test_version1_checkpoint_loads_and_samples(tmp_path):
    import torch

    from patch_diffusion.checkpoint import prefixed, save_checkpoint
    from patch_diffusion.generate import load_denoiser, sample

    config = from_dict(TrainConfig, version1_config())
    from patch_diffusion.model import build_denoiser

    torch.manual_seed(0)
    old = build_denoiser(config.model)  # the scale-shift DDPM++ that 0.1 trained
    state = old.state_dict()
    ckpt = tmp_path / "checkpoint-00000001.safetensors"
    save_checkpoint(ckpt, {**prefixed("ema", state), **prefixed("net", {k: v.clone() for k, v in state.items()})},
                    {"config": version1_config(), "step": 1, "backbone": "ddpmpp"})
    net, loaded = load_denoiser(ckpt, torch.device("cpu"))
    assert loaded == config
    for key, value in state.items():
        assert torch.equal(net.state_dict()[key], value), key
    images = sample(net, [0, 1], loaded.sampler, (16, 16), torch.device("cpu"))
    assert images.shape == (2, 3, 16, 16)


def test_component_configs_round_trip_by_name():
    from patch_diffusion.config import with_backbone, with_precond

    base = get_preset("tiny")
    for backbone in ("ddpmpp", "adm", "unet2d"):
        for precond in ("edm", "vp", "ve"):
            model = with_precond(with_backbone(base.model, backbone), precond)
            config = TrainConfig(model=model)
            again = from_dict(TrainConfig, to_dict(config))
            assert again == config and type(again.model.backbone_config) is type(model.backbone_config)
            # the shared architecture options carry over when the backbone changes
            assert again.model.backbone_config.channel_mult == base.model.backbone_config.channel_mult


def test_mismatched_component_config_is_refused():
    from patch_diffusion.config import ModelConfig
    from patch_diffusion.networks import ADMConfig

    with pytest.raises(UserError, match="DDPMppConfig"):
        ModelConfig(backbone="ddpmpp", backbone_config=ADMConfig())


def test_emoji64_preset_fits_its_network_at_every_patch_size(tmp_path):
    from conftest import write_images
    from patch_diffusion.data import open_dataset
    from patch_diffusion.train import resolve_config

    config = get_preset("emoji-64")
    dataset = open_dataset(str(write_images(tmp_path / "emoji", count=2, size=(64, 64))))
    notes = []
    resolved = resolve_config(config, dataset, notes)
    assert resolved.model.resolution == (64, 64) and resolved.model.channels == 3
    assert notes == [] and resolved.patch.patch_sizes == ()  # the paper's 16 and 32 both fit
