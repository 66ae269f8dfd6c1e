"""How much feeding a training loop costs on a GPU: ready batches against host batches
(pageable or pinned), fresh patches only, and data kept on the GPU.

Times 60 steps of the fmnist-32 preset (bf16, base batch 256) back to back for each way
of feeding it, three times, and prints medians; ``--compile`` compiles the network
first (about 45 s per patch size). Needs CUDA and the Fashion-MNIST files:

    PYTHONPATH=src python benchmarks/gpu_feed.py [--compile]

Results and the machine are in BENCHMARKS.md ("GPU speed").
"""
import copy
import statistics
import sys
import time
import warnings

import torch
from patch_diffusion.config import get_preset, replace, with_data
from patch_diffusion.data import InfiniteBatches, open_dataset
from patch_diffusion.devices import to_device
from patch_diffusion.loss import denoising_loss
from patch_diffusion.model import build_denoiser
from patch_diffusion.patches import PatchBatch, PatchSchedule, make_patches, crop, coordinate_grid
from patch_diffusion.devices import autocast as precision_autocast
from patch_diffusion.step import TrainState, compiled, make_optimizer, next_images, update_ema
from patch_diffusion.train import resolve_config

compile_ = "--compile" in sys.argv
device = torch.device("cuda")
config = replace(with_data(get_preset("fmnist-32"), "fashion-mnist"), batch_size=256, device="cuda",
                 precision="bf16", compile=compile_)
dataset = open_dataset(config.data.path, resolution=config.data.resolution, fit=config.data.fit)
config = resolve_config(config, dataset)
schedule = PatchSchedule(config.patch, config.model.resolution)
torch.manual_seed(0)
net = build_denoiser(config.model).to(device).train()
ema = copy.deepcopy(net).eval().requires_grad_(False)
step_net = compiled(net, config, device)
opt = make_optimizer(net, config, device)
autocast = precision_autocast(config.precision, device)
loader = iter(InfiniteBatches(dataset, 256, seed=0, pin_memory=True))
gen = torch.Generator().manual_seed(0)
ngen = torch.Generator(device=device).manual_seed(0)
state = TrainState()

def optimise(b):
    opt.zero_grad(set_to_none=True)
    with autocast:
        loss = denoising_loss(step_net, b.images, b.pos, None, config.loss, ngen, precond=net)
    loss.backward(); opt.step(); update_ema(ema, net, config, 1e6, 1.0)

def load_pinned(d):
    return to_device(next_images(loader, d, state)[0], device).to(torch.float32) / 127.5 - 1

def load_pageable(d):
    return next_images(loader, d, state)[0].to(device).to(torch.float32) / 127.5 - 1

def patches(x, d):
    return make_patches(x, None, d, gen)

def crops_at(x, d, off):
    canvas = tuple(x.shape[2:]); p = (canvas[0] // d, canvas[1] // d)
    return PatchBatch(crop(x, off, p) if d > 1 else x, coordinate_grid(*p, offsets=off, canvas=canvas, device=device), None, d)

def offset_range(x, d):
    return x.shape[2] - x.shape[2] // d + 1, x.shape[3] - x.shape[3] // d + 1

def patches_pageable(x, d):  # the code before pinned copies: offsets drawn on the host, plain .to()
    rows, cols = (torch.randint(0, n, (x.shape[0],), generator=gen) for n in offset_range(x, d))
    return crops_at(x, d, torch.stack([rows, cols], 1).to(device))

all_images = dataset.get_batch(torch.arange(len(dataset)))[0].to(device)
def load_resident(d):
    idx = torch.randint(0, all_images.shape[0], (256 * d,), device=device)
    return all_images[idx].to(torch.float32) / 127.5 - 1

def patches_device(x, d):  # offsets drawn on the GPU
    rows, cols = (torch.randint(0, n, (x.shape[0],), device=device) for n in offset_range(x, d))
    return crops_at(x, d, torch.stack([rows, cols], 1))

t = time.time()
cached_x, cached = {}, {}
for d in schedule.divisors:
    for _ in range(3):
        x = load_pinned(d); b = patches(x, d); optimise(b)
    cached_x[d], cached[d] = x, b
torch.cuda.synchronize(); print(f"warm-up (compile={compile_}): {time.time() - t:.1f} s", flush=True)

torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for d in schedule.divisors:
        optimise(patches(load_pinned(d), d))
    torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode(0)
syncs = [str(w.message)[:160] for w in caught if "synchron" in str(w.message).lower()]
print(f"synchronizing calls in one step per size (pinned path): {len(syncs)}")
for s in syncs[:8]: print("  ", s)

seq = [schedule.divisors[k] for k in torch.multinomial(torch.tensor(schedule.probs), 60, True, generator=gen).tolist()]
variants = {
    "cached batches": lambda d: cached[d],
    "fresh, pinned (new)": lambda d: patches(load_pinned(d), d),
    "fresh, pageable (old)": lambda d: patches_pageable(load_pageable(d), d),
    "fresh data only": lambda d: (load_pinned(d), cached[d])[1],
    "fresh patches only": lambda d: patches(cached_x[d], d),
    "GPU-resident data + device offsets": lambda d: patches_device(load_resident(d), d),
}
res = {k: [] for k in variants}
for _ in range(3):
    for name, make in variants.items():
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for d in seq:
            optimise(make(d))
        torch.cuda.synchronize(); res[name].append((time.perf_counter() - t0) / len(seq) * 1000)
base = statistics.median(res["cached batches"])
for name, v in res.items():
    m = statistics.median(v)
    print(f"{name:>36}: {m:7.2f} ms/step  (+{(m - base) / m:6.1%} over cached)  runs {', '.join(f'{x:.2f}' for x in v)}")
