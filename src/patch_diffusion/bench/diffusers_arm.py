"""The ``diffusers`` arm of the time-to-FID benchmark: what many users would train instead.

diffusers' own unconditional example (``examples/unconditional_image_generation/
train_unconditional.py``), scaled to our preset's size: ``UNet2DModel`` with plain
residual blocks, ``DDPMScheduler`` (1000 steps, linear betas, epsilon prediction, MSE
loss), AdamW (lr 1e-4, betas 0.95/0.999, weight decay 1e-6), gradient-norm clipping at
1, 500 warm-up steps then a cosine decay, and diffusers' ``EMAModel`` with warm-up
(inv_gamma 1, power 3/4, max decay 0.9999). Two deviations, both forced by a time
budget or by the comparison: the cosine runs over the arm's training *time* (the
number of steps is unknown in advance), and the batch is our preset's. Samples use
``DDIMScheduler`` with 50 steps (eta 0).

The arm runs in one process; an interrupted benchmark restarts this arm from scratch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import TrainConfig
from ..data import InfiniteBatches
from ..devices import autocast as precision_autocast
from ..errors import UserError
from ..generate import from_uint8, to_uint8
from ..samplers import SeededNoise
from ..train import advance, data_on_device, open_run_data, time_bar

DDIM_STEPS = 50
BLOCK_CHANNELS = (32, 32, 64)  # 0.76M parameters for 1 channel, about our fmnist-32 net's 0.75M


def import_diffusers() -> Any:
    try:
        import diffusers
        from diffusers.training_utils import EMAModel  # noqa: F401
    except ImportError:
        raise UserError("the diffusers arm needs the diffusers package: pip install "
                        "'patch-diffusion[bench]', or leave 'diffusers' out of --arms") from None
    return diffusers


def build_unet(channels: int, resolution: tuple[int, int]) -> torch.nn.Module:
    """A UNet2DModel as diffusers' example builds it, shrunk to about our preset's size."""
    diffusers = import_diffusers()
    levels = len(BLOCK_CHANNELS)
    return diffusers.UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=BLOCK_CHANNELS, norm_num_groups=8,
        down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels)


def run_diffusers_arm(
    config: TrainConfig,
    budgets: list[float],
    evaluate: Callable[[Callable[[list[int]], torch.Tensor]], float],
    device: torch.device,
    *,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Train for each cumulative training-time budget in ``budgets`` (seconds) and yield
    an evaluation point after each. ``evaluate`` receives a function from seeds to uint8
    images and returns the FID."""
    diffusers = import_diffusers()
    from diffusers.training_utils import EMAModel

    dataset = open_run_data(config.data)
    resolution = tuple(dataset.resolution)
    torch.manual_seed(config.seed)
    model = build_unet(dataset.channels, resolution).to(device).train()
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    ema.to(device)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    lr_max, warmup_steps = 1e-4, 500
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_max, betas=(0.95, 0.999),
                                  weight_decay=1e-6, eps=1e-8)
    gen = torch.Generator(device=device).manual_seed(config.seed + 2)
    # The same data path as the EDM arms, so the comparison stays fair on a GPU.
    loader = iter(InfiniteBatches(data_on_device(dataset, config, device), config.batch_size,
                                  seed=config.seed, num_workers=0, pin_memory=device.type == "cuda"))
    autocast = precision_autocast(config.precision, device)
    total = budgets[-1]
    seconds, step = 0.0, 0
    for budget in budgets:
        bar = time_bar(total, seconds, progress, desc="training (diffusers)")
        while seconds < budget:
            start = time.monotonic()
            images, _ = next(loader)
            clean = from_uint8(images, device)
            noise = torch.randn(clean.shape, device=device, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],),
                              device=device, generator=gen)
            noisy = scheduler.add_noise(clean, noise, t)
            warm = min(1.0, (step + 1) / warmup_steps)
            cosine = 0.5 * (1 + math.cos(math.pi * min(seconds / total, 1.0)))
            for group in optimizer.param_groups:
                group["lr"] = lr_max * (warm if warm < 1 else cosine)
            with autocast:
                predicted = model(noisy, t).sample
            loss = torch.nn.functional.mse_loss(predicted.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(model.parameters())
            step += 1
            elapsed = time.monotonic() - start
            seconds += elapsed
            advance(bar, elapsed)
            if step % 100 == 0:
                bar.set_postfix(step=step, loss=f"{loss.item():.4f}")
        bar.close()
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        model.eval()
        fid = evaluate(lambda seeds: ddim_sample(model, scheduler, seeds, dataset.channels,
                                                 resolution, device))
        ema.restore(model.parameters())
        model.train()
        images_seen = step * config.batch_size
        yield {"minutes": round(seconds / 60, 4), "steps": step, "kimg": round(images_seen / 1000, 3),
               "img_per_s": round(images_seen / max(seconds, 1e-9), 2), "fid": round(fid, 4)}


@torch.no_grad()
def ddim_sample(model: torch.nn.Module, ddpm: Any, seeds: list[int], channels: int,
                resolution: tuple[int, int], device: torch.device) -> torch.Tensor:
    """uint8 images from per-seed noise with DDIM (50 steps, eta 0), as uint8 [N, C, H, W]."""
    diffusers = import_diffusers()
    ddim = diffusers.DDIMScheduler.from_config(ddpm.config)
    ddim.set_timesteps(DDIM_STEPS)
    x = SeededNoise(seeds, device).randn((channels, *resolution))
    for t in ddim.timesteps:
        eps = model(x, t.to(device)).sample
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
    return to_uint8(x)
