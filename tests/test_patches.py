import math

import pytest
import torch

from patch_diffusion.errors import UserError
from patch_diffusion.patches import (PatchConfig, PatchSchedule, coordinate_grid, crop,
                                     make_patches, random_offsets, steps_for_duration)


def test_full_grid_exact_values_square():
    grid = coordinate_grid(4, 4)
    steps = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    assert grid.shape == (1, 2, 4, 4)
    # channel 0 = x = column coordinate, channel 1 = y = row coordinate
    torch.testing.assert_close(grid[0, 0], steps.expand(4, 4), rtol=0, atol=1e-7)
    torch.testing.assert_close(grid[0, 1], steps[:, None].expand(4, 4), rtol=0, atol=1e-7)


def test_full_grid_exact_values_non_square():
    grid = coordinate_grid(3, 5)[0]
    torch.testing.assert_close(grid[0, 1], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), rtol=0, atol=0)
    torch.testing.assert_close(grid[1, :, 2], torch.tensor([-1.0, 0.0, 1.0]), rtol=0, atol=0)
    assert grid[0].min() == -1 and grid[0].max() == 1 and grid[1].min() == -1 and grid[1].max() == 1


def test_crop_coordinates_are_the_slice_of_the_canvas_grid():
    canvas = (8, 6)
    full = coordinate_grid(*canvas)[0]
    offsets = torch.tensor([[2, 3], [0, 0], [4, 3]])
    grid = coordinate_grid(4, 3, offsets=offsets, canvas=canvas)
    for b, (i, j) in enumerate(offsets.tolist()):
        torch.testing.assert_close(grid[b], full[:, i:i + 4, j:j + 3], rtol=0, atol=0)
    # a crop at (2, 3) of an 8x6 canvas: first column x = 3/5*2-1 = 0.2, first row y = 2/7*2-1
    assert grid[0, 0, 0, 0].item() == pytest.approx(0.2)
    assert grid[0, 1, 0, 0].item() == pytest.approx(2 / 7 * 2 - 1)


def test_crop_matches_slicing():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 12, 20, generator=g)
    offsets = random_offsets(5, (4, 5), (12, 20), g)
    crops = crop(images, offsets, (4, 5))
    for b, (i, j) in enumerate(offsets.tolist()):
        torch.testing.assert_close(crops[b], images[b, :, i:i + 4, j:j + 5], rtol=0, atol=0)


def test_offsets_stay_inside_and_cover_every_position():
    g = torch.Generator().manual_seed(1)
    offsets = random_offsets(20000, (8, 16), (32, 40), g)
    assert offsets[:, 0].min() == 0 and offsets[:, 0].max() == 32 - 8
    assert offsets[:, 1].min() == 0 and offsets[:, 1].max() == 40 - 16
    # uniform: each of the 25 row positions appears ~800 times
    counts = torch.bincount(offsets[:, 0], minlength=25).float()
    assert (counts - 800).abs().max() < 5 * math.sqrt(800)


def test_paper_default_schedule_probabilities_and_multiplier():
    sched = PatchSchedule(PatchConfig(), (32, 32))
    assert sched.divisors == (4, 2, 1)
    assert sched.probs == pytest.approx((0.2, 0.3, 0.5))
    assert sched.expected_multiplier == pytest.approx(1.9)
    assert [sched.patch_shape(d) for d in sched.divisors] == [(8, 8), (16, 16), (32, 32)]


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9])
def test_stochastic_frequencies_match_p(p):
    sched = PatchSchedule(PatchConfig(real_p=p), (64, 64))
    g = torch.Generator().manual_seed(123)
    n = 20000
    draws = [sched.draw(0.3, g) for _ in range(n)]
    for divisor, prob in zip(sched.divisors, sched.probs):
        freq = draws.count(divisor) / n
        bound = 4 * math.sqrt(max(prob * (1 - prob), 1e-12) / n) + 1e-12
        assert abs(freq - prob) <= bound, (divisor, freq, prob)


def test_progressive_boundaries():
    sched = PatchSchedule(PatchConfig(schedule="progressive", real_p=0.5), (32, 32))
    assert sched.draw(0.0, None) == 4
    assert sched.draw(0.199, None) == 4
    assert sched.draw(0.2, None) == 2
    assert sched.draw(0.499, None) == 2
    assert sched.draw(0.5, None) == 1
    assert sched.draw(0.99, None) == 1


def test_full_schedule_and_p_one_use_full_images_only():
    for cfg in (PatchConfig(schedule="full"), PatchConfig(real_p=1.0)):
        sched = PatchSchedule(cfg, (32, 32))
        assert sched.divisors == (1,) and sched.expected_multiplier == 1.0


def test_multiplier_from_size_ratio_for_any_canvas():
    # 8x8 patches of a 32x32 canvas: the table-based reference code breaks here
    sched = PatchSchedule(PatchConfig(patch_sizes=(8,)), (32, 32))
    assert sched.divisors == (4, 1) and sched.probs == pytest.approx((0.5, 0.5))
    assert sched.expected_multiplier == pytest.approx(2.5)
    for size in (128, 256, 512):
        sched = PatchSchedule(PatchConfig(), (size, size))
        assert sched.divisors == (4, 2, 1)
        assert sched.expected_multiplier == pytest.approx(1.9)


def test_non_square_canvas():
    sched = PatchSchedule(PatchConfig(patch_sizes=(8, 16)), (32, 64))
    assert [sched.patch_shape(d) for d in sched.divisors] == [(8, 16), (16, 32), (32, 64)]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 64) * 2 - 1
    batch = make_patches(images, None, 4, g)
    assert batch.images.shape == (6, 3, 8, 16) and batch.pos.shape == (6, 2, 8, 16)


def test_make_patches_pairs_each_crop_with_its_coordinates():
    g = torch.Generator().manual_seed(0)
    canvas = coordinate_grid(16, 16)
    # images whose pixels ARE their coordinates: crop and coordinates must agree
    images = canvas.expand(4, -1, -1, -1).clone()
    batch = make_patches(images, None, 2, g)
    torch.testing.assert_close(batch.images, batch.pos, rtol=0, atol=0)
    full = make_patches(images, None, 1, g)
    torch.testing.assert_close(full.pos, canvas.expand(4, -1, -1, -1), rtol=0, atol=0)


def test_custom_probabilities():
    sched = PatchSchedule(PatchConfig(real_p=0.2, patch_sizes=(4, 8, 16), probs=(1, 1, 2)), (32, 32))
    assert sched.divisors == (8, 4, 2, 1)
    assert sched.probs == pytest.approx((0.2, 0.2, 0.4, 0.2))


@pytest.mark.parametrize("cfg, match", [
    (PatchConfig(real_p=1.5), "real-p"),
    (PatchConfig(real_p=-0.1), "real-p"),
    (PatchConfig(patch_sizes=(12,)), "does not divide"),
    (PatchConfig(patch_sizes=(32,)), "does not divide"),
    (PatchConfig(patch_sizes=(8, 16), probs=(1.0,)), "patch-probs"),
])
def test_bad_schedule_options(cfg, match):
    with pytest.raises(UserError, match=match):
        PatchSchedule(cfg, (32, 32))


def test_steps_for_duration():
    assert steps_for_duration(1.0, 10, 2.0) == 50
    assert steps_for_duration(0.0001, 10, 1.0) == 1


def test_real_p_end_moves_p_linearly_and_averages_the_multiplier():
    sched = PatchSchedule(PatchConfig(real_p=1.0, real_p_end=0.0), (32, 32))
    assert sched.divisors == (4, 2, 1)  # p = 1 at the start still needs the patch sizes
    assert sched.probs_at(0.0) == pytest.approx((0.0, 0.0, 1.0))
    assert sched.probs_at(0.5) == pytest.approx((0.2, 0.3, 0.5))
    assert sched.probs_at(1.0) == pytest.approx((0.4, 0.6, 0.0))
    # E[d] over the run: d is linear in p, so it is E[d] at the mean p (0.5): 1.9
    assert sched.expected_multiplier == pytest.approx(1.9)
    g = torch.Generator().manual_seed(0)
    assert {sched.draw(0.0, g) for _ in range(200)} == {1}
    late = [sched.draw(0.99, g) for _ in range(2000)]
    assert late.count(1) / 2000 < 0.03 and late.count(2) / 2000 == pytest.approx(0.6, abs=0.05)


def test_real_p_end_only_for_the_stochastic_schedule():
    with pytest.raises(UserError, match="real-p-end"):
        PatchSchedule(PatchConfig(schedule="progressive", real_p_end=0.2), (32, 32))
    with pytest.raises(UserError, match="real-p-end"):
        PatchSchedule(PatchConfig(real_p_end=1.2), (32, 32))


def test_patch_until_ends_patch_steps_and_averages_the_multiplier():
    sched = PatchSchedule(PatchConfig(patch_until=0.5), (32, 32))
    assert sched.probs_at(0.2) == pytest.approx((0.2, 0.3, 0.5))  # the paper's, before
    assert sched.probs_at(0.5) == (0.0, 0.0, 1.0) and sched.probs_at(0.9) == (0.0, 0.0, 1.0)
    # half the run at E[d] = 1.9, half at 1
    assert sched.expected_multiplier == pytest.approx(0.5 * 1.9 + 0.5 * 1.0)
    g = torch.Generator().manual_seed(0)
    assert {sched.draw(0.7, g) for _ in range(200)} == {1}
    assert len({sched.draw(0.1, g) for _ in range(200)}) == 3
    with pytest.raises(UserError, match="patch-until"):
        PatchSchedule(PatchConfig(patch_until=0.0), (32, 32))
    with pytest.raises(UserError, match="patch-until"):
        PatchSchedule(PatchConfig(schedule="progressive", patch_until=0.5), (32, 32))
