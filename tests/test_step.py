"""One optimisation step's pieces: label dropout, the progressive clock, the Trainer."""

import pytest
import torch

from patch_diffusion.config import get_preset, replace
from patch_diffusion.patches import PatchConfig, PatchSchedule, steps_for_duration
from patch_diffusion.step import Trainer, drop_labels


def test_label_dropout_rates():
    labels = torch.nn.functional.one_hot(torch.arange(20000) % 4, 4).float()
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(drop_labels(labels, 0.0, gen), labels)
    assert not drop_labels(labels, 1.0, gen).any()  # p = 1: every row is the null label
    kept = drop_labels(labels, 0.1, gen).sum(1)
    assert set(kept.unique().tolist()) == {0.0, 1.0}
    assert (kept == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_progressive_phases_split_by_images_seen():
    """p = 0.5: R/4 gets 20% of the images, R/2 30%, full images 50% (not ~25% as a
    split by steps would give), and the step count matches the kimg budget."""
    schedule = PatchSchedule(PatchConfig(schedule="progressive", real_p=0.5), (32, 32))
    batch, kimg = 16, 200.0
    total = kimg * 1000
    images, steps, per_divisor = 0, 0, {1: 0, 2: 0, 4: 0}
    while images < total:
        d = schedule.draw(images / total, torch.Generator())
        images += batch * d
        per_divisor[d] += batch * d
        steps += 1
    shares = {d: n / images for d, n in per_divisor.items()}
    assert shares == pytest.approx({4: 0.2, 2: 0.3, 1: 0.5}, abs=0.002)
    assert schedule.expected_multiplier == pytest.approx(1 / (0.2 / 4 + 0.3 / 2 + 0.5))
    assert abs(steps - steps_for_duration(kimg, batch, schedule.expected_multiplier)) <= 1


def tiny_trainer(tmp_path, **model_changes):
    config = get_preset("tiny")
    model = replace(config.model, resolution=(16, 16), channels=3, **model_changes)
    return Trainer(replace(config, model=model, device="cpu", patch=PatchConfig(schedule="full")),
                   torch.device("cpu"))


def test_trainer_feeds_null_labels_under_full_dropout(tmp_path):
    trainer = tiny_trainer(tmp_path, label_dim=3, label_dropout=1.0)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    batch = trainer.patches(images, torch.tensor([0, 1, 2, 0, 1, 2]), 1)
    assert batch.labels.shape == (6, 3) and not batch.labels.any()
    # so class information never reaches the network: the label weights get no gradient
    label_weights = [p.clone() for n, p in trainer.net.named_parameters() if "map_label.weight" in n]
    assert label_weights
    for _ in range(3):
        trainer.optimise(trainer.patches(images, torch.tensor([0, 1, 2, 0, 1, 2]), 1))
    after = [p for n, p in trainer.net.named_parameters() if "map_label.weight" in n]
    assert all(torch.equal(a, b) for a, b in zip(label_weights, after))
    assert trainer.state.step == 3 and trainer.state.images == 18


def test_trainer_keeps_labels_without_dropout(tmp_path):
    trainer = tiny_trainer(tmp_path, label_dim=3)
    batch = trainer.patches(torch.zeros(3, 3, 16, 16), torch.tensor([2, 0, 1]), 1)
    assert torch.equal(batch.labels.argmax(1), torch.tensor([2, 0, 1]))
