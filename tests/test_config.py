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
