"""The README's Python example: wrap your own denoiser and train it with the same machinery."""

import pytest
import torch
from torch import nn

import patch_diffusion as pd
from patch_diffusion.checkpoint import list_checkpoints, load_checkpoint


class TinyBackbone(nn.Module):
    """Any module taking (image + 2 coordinate channels, noise level, labels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 2, channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None):
        return self.conv(x) * noise_labels.reshape(-1, 1, 1, 1).cos()


def test_custom_backbone_trains_saves_and_samples(tiny_data, tmp_path):
    config = pd.get_preset("tiny")
    config = pd.config.replace(config, data=pd.config.replace(config.data, path=str(tiny_data), num_workers=0),
                               device="cpu", duration_kimg=0.03)
    run_dir = pd.train(config, tmp_path / "runs", backbone=TinyBackbone(3), progress=False)
    ckpt = list_checkpoints(run_dir)[-1]
    with pytest.raises(pd.UserError, match="custom backbone"):
        pd.load_denoiser(ckpt, torch.device("cpu"))
    denoiser = pd.load_weights(pd.EDMPrecond(TinyBackbone(3), image_channels=3), ckpt)
    stored, _ = load_checkpoint(ckpt)
    assert torch.equal(denoiser.backbone.conv.weight, stored["ema.backbone.conv.weight"])
    images = pd.sample(denoiser.eval(), [0, 1], pd.SamplerConfig(num_steps=3), (16, 16), torch.device("cpu"))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8


def test_time_budget_progress_counts_training_seconds(tiny_data, tmp_path, capsys):
    config = pd.get_preset("tiny")
    config = pd.config.replace(config, data=pd.config.replace(config.data, path=str(tiny_data), num_workers=0),
                               device="cpu", duration_kimg=1e9, max_minutes=0.02,
                               checkpoint_kimg=1e9, sample_kimg=1e9)
    pd.train(config, tmp_path / "runs", backbone=TinyBackbone(3))
    err = capsys.readouterr().err
    # a time budget shows seconds of its 1.2, not a step total the run never reaches
    assert "/1 s of training" in err and "step=" in err and "%|" in err


def test_readme_extension_example_runs(tiny_data, tmp_path, monkeypatch):
    """The README's 'Add your own backbone or sampler' block, as written, on tiny data."""
    import re
    from pathlib import Path

    from patch_diffusion.networks import BACKBONES
    from patch_diffusion.samplers import SAMPLERS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Add your own backbone or sampler", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('DATA = "path/to/images"', f"DATA = {str(tiny_data)!r}")
    monkeypatch.chdir(tmp_path)
    before = (dict(BACKBONES), dict(SAMPLERS))
    scope: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        added = (set(BACKBONES) - set(before[0]), set(SAMPLERS) - set(before[1]))
        BACKBONES.clear()
        BACKBONES.update(before[0])
        SAMPLERS.clear()
        SAMPLERS.update(before[1])
    assert added == ({"two-conv"}, {"midpoint"})
    images, run_config = scope["images"], scope["run_config"]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert run_config.model.backbone == "two-conv" and run_config.sampler.name == "midpoint"
    assert list((tmp_path / "runs").glob("*/samples-*.png"))
