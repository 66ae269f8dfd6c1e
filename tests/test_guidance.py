"""Classifier-free guidance and the labels a conditional model is sampled with."""

import numpy as np
import pytest
import torch
from torch import nn

from patch_diffusion.config import SamplerConfig
from patch_diffusion.generate import sample
from patch_diffusion.guidance import guided, seed_labels
from patch_diffusion.errors import UserError
from patch_diffusion.precond import EDMPrecond


class LabelSpy(nn.Module):
    """Output = input image channels + a per-class offset; records every label batch."""

    def __init__(self, channels, label_dim):
        super().__init__()
        self.channels = channels
        self.offset = torch.arange(1, label_dim + 1, dtype=torch.float32)
        self.seen = []

    def forward(self, x, noise_labels, class_labels):
        self.seen.append(class_labels.clone())
        shift = (class_labels @ self.offset).reshape(-1, 1, 1, 1)
        return x[:, : self.channels] + shift


def test_guidance_formula_and_its_special_weights():
    net = EDMPrecond(LabelSpy(1, 3), 1, label_dim=3)
    x, sigma = torch.randn(4, 1, 4, 4), torch.full((4,), 0.7)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    cond, null = net(x, sigma, labels), net(x, sigma, torch.zeros_like(labels))
    # w = 1 is the conditional model itself, in one pass
    calls = len(net.backbone.seen)
    assert torch.equal(guided(net, labels, 1.0)(x, sigma), cond)
    assert len(net.backbone.seen) == calls + 1
    # w = 0 is the unconditional (null-label) model
    torch.testing.assert_close(guided(net, labels, 0.0)(x, sigma), null)
    # otherwise null + w (cond - null), with both passes as one doubled batch
    torch.testing.assert_close(guided(net, labels, 2.5)(x, sigma), null + 2.5 * (cond - null))
    assert net.backbone.seen[-1].shape == (8, 3) and not net.backbone.seen[-1][4:].any()


def test_guidance_needs_a_conditional_model():
    net = EDMPrecond(LabelSpy(1, 1), 1)
    with pytest.raises(UserError, match="class-conditional"):
        guided(net, None, 2.0)


def test_conditional_models_are_sampled_with_real_labels():
    spy = LabelSpy(1, 5)
    net = EDMPrecond(spy, 1, label_dim=5)
    seeds = [3, 11, 42, 7]
    sample(net, seeds, SamplerConfig(num_steps=2), (4, 4), torch.device("cpu"))
    drawn = [int(np.random.default_rng(s).integers(5)) for s in seeds]
    for labels in spy.seen:  # every step: one-hot rows of the classes drawn from each seed
        assert torch.equal(labels.argmax(1), torch.tensor(drawn)) and torch.equal(labels.sum(1), torch.ones(4))
    spy.seen.clear()
    sample(net, seeds, SamplerConfig(num_steps=2), (4, 4), torch.device("cpu"), class_label=4)
    assert all(torch.equal(labels.argmax(1), torch.full((4,), 4)) for labels in spy.seen)


def test_seed_labels_depend_on_the_seed_alone():
    a = seed_labels([5, 6, 7], 10, None, "cpu")
    b = seed_labels([7], 10, None, "cpu")
    assert torch.equal(a[2], b[0])
    with pytest.raises(UserError, match="out of range"):
        seed_labels([0], 3, 3, "cpu")
