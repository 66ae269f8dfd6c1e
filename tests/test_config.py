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
