"""The CPU measurements behind the speed defaults, each a median of repeated timings:

1. group norm + SiLU, forward and backward, per layout and dtype: PyTorch's kernel on
   bf16 channels-last input, against the NCHW copy that ``layers.GroupNorm`` makes;
2. Inception-v3 per image (batch 64): batch norms folded or not, and bf16 for reference
   (not used: it moves the features by about 3%);
3. one network evaluation of the fmnist-32 denoiser per image (batch 64), as sampling
   runs it: fp32 or bf16, NCHW or channels-last;
4. attention over the few tokens of a UNet's lowest level, forward and backward:
   PyTorch's fused kernel against two matrix products (``layers.attention``).

    PYTHONPATH=src python benchmarks/cpu_kernels.py

Needs nothing else running. Results and the machine are in BENCHMARKS.md ("CPU speed").
"""
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from patch_diffusion.config import get_preset
from patch_diffusion.metrics.inception import InceptionV3, _ConvBN, load_inception, preprocess
from patch_diffusion.model import build_denoiser
from patch_diffusion.networks.layers import GroupNorm

CL = torch.channels_last


def median_ms(fn, repeats: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def group_norms() -> None:
    print("group norm + SiLU, forward + backward, ms (median of 30)")
    print(f"{'shape':>18} {'dtype':>9} {'NCHW':>7} {'CL, PyTorch':>12} {'CL, via NCHW':>13}")
    for shape in [(32, 16, 32, 32), (32, 32, 16, 16), (32, 64, 8, 8), (128, 16, 8, 8)]:
        plain = torch.nn.GroupNorm(shape[1] // 4, shape[1], eps=1e-6)
        ours = GroupNorm(shape[1] // 4, shape[1], eps=1e-6)

        def run(norm, x):
            x = x.detach().requires_grad_()
            F.silu(norm(x)).sum().backward()

        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            x_cl = x.contiguous(memory_format=CL)
            print(f"{str(shape):>18} {str(dtype)[6:]:>9} {median_ms(lambda: run(plain, x)):>7.3f} "
                  f"{median_ms(lambda: run(plain, x_cl)):>12.3f} {median_ms(lambda: run(ours, x_cl)):>13.3f}")


def inception() -> None:
    net = load_inception(None, "cpu")  # folded, channels-last
    unfolded = InceptionV3()
    unfolded.load_state_dict(net.state_dict())
    unfolded = unfolded.eval().requires_grad_(False).to(memory_format=CL)
    x = preprocess(torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        ref = unfolded(x)
        print(f"\nInception, s/image at batch 64 (median of 5); folded features differ by at most "
              f"{(net(x) - ref).abs().max().item():.1e} (mean |feature| {ref.abs().mean().item():.3f})")
        print(f"  batch norm separate: {median_ms(lambda: unfolded(x), 5, 1) / 64000:.4f}")
        print(f"  batch norm folded:   {median_ms(lambda: net(x), 5, 1) / 64000:.4f}")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seconds = median_ms(lambda: net(x), 5, 1) / 64000
            error = ((net(x).float() - ref).norm() / ref.norm()).item()
        print(f"  bf16 (not used):     {seconds:.4f}, relative feature error {error:.3f}")
    assert all(m.folded_weight is not None for m in net.modules() if isinstance(m, _ConvBN))


def sampling() -> None:
    from patch_diffusion.config import replace
    config = get_preset("fmnist-32")
    model = replace(config.model, resolution=(32, 32), channels=1)
    base = build_denoiser(model).eval().requires_grad_(False)
    x = torch.randn(64, 1, 32, 32)
    sigma = torch.full((64,), 1.0)
    print("\none network evaluation of the fmnist-32 denoiser, ms/image at batch 64 (median of 10)")
    for layout in (torch.contiguous_format, CL):
        net = copy.deepcopy(base).to(memory_format=layout)
        for dtype in ("fp32", "bf16"):
            def call():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    net(x, sigma)
            name = "channels-last" if layout == CL else "NCHW"
            print(f"  {dtype} {name:<13} {median_ms(call, 10, 2) / 64:.3f}")


def attentions() -> None:
    print("\nattention, forward + backward, ms (median of 30): PyTorch's kernel / two matrix products")
    for batch, tokens in [(32, 64), (64, 16), (128, 4)]:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(batch, 1, tokens, 64, dtype=dtype, requires_grad=True) for _ in range(3))

            def fused():
                F.scaled_dot_product_attention(q, k, v).float().sum().backward()

            def products():
                weights = torch.softmax((q @ k.transpose(-1, -2)).float() * 64 ** -0.5, dim=-1)
                (weights.to(v.dtype) @ v).float().sum().backward()

            print(f"  batch {batch:>3}, {tokens:>2} tokens, {str(dtype)[6:]:>8}: "
                  f"{median_ms(fused):.3f} / {median_ms(products):.3f}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    group_norms()
    inception()
    sampling()
    attentions()
