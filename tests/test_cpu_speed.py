"""The CPU speed settings keep the math: precision and layout choice, the group norm's
bf16 path, fused Adam, the folded Inception, and sampling in the run's precision."""

import json

import pytest
import torch
import torch.nn.functional as F

from patch_diffusion import devices
from patch_diffusion.config import get_preset, read_config, replace, to_dict
from patch_diffusion.devices import autocast, memory_format, resolve_precision
from patch_diffusion.errors import UserError
from patch_diffusion.networks.layers import GroupNorm, attention, group_norm
from patch_diffusion.patches import PatchConfig
from patch_diffusion.step import Trainer

from test_cli import run

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_with_amx(monkeypatch, amx):
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: amx)
    assert resolve_precision("auto", CPU) == ("bf16" if amx else "fp32")
    assert resolve_precision("auto", CUDA) == "fp32"  # GPUs: unchanged unless asked
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CUDA) == "bf16"
    with autocast("auto", CPU):
        assert torch.is_autocast_enabled("cpu") == amx
    with autocast("fp32", CPU):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", CPU)


def test_memory_layout_defaults_to_channels_last_on_cpu_only():
    assert memory_format(None, CPU) == torch.channels_last
    assert memory_format(None, CUDA) == torch.contiguous_format
    assert memory_format(False, CPU) == torch.contiguous_format
    assert memory_format(True, CUDA) == torch.channels_last


def test_older_configs_keep_the_precision_and_layout_they_ran_with():
    config = get_preset("tiny")
    assert config.precision == "auto" and config.channels_last is None
    old = to_dict(config) | {"precision": "fp32", "channels_last": False}
    loaded = read_config(json.loads(json.dumps(old)), "config.json")
    assert loaded.precision == "fp32" and loaded.channels_last is False


def test_group_norm_bf16_channels_last_matches_the_plain_kernel():
    torch.manual_seed(0)
    norm = group_norm(32, eps=1e-6)
    assert isinstance(norm, GroupNorm) and norm.num_groups == 8
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 32, 8, 8).to(torch.bfloat16)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_nchw = x.clone().requires_grad_()
    y = norm(x_cl)
    expected = F.group_norm(x_nchw, 8, norm.weight, norm.bias, 1e-6)
    # the same kernel on the same values in NCHW order: equal, and handed back channels-last
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    assert torch.equal(x_cl.grad, x_nchw.grad)
    # float32 input of any layout goes straight to PyTorch's kernel
    x32 = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(norm(x32), F.group_norm(x32, 8, norm.weight, norm.bias, 1e-6))


def test_trainer_uses_fused_adam_and_the_device_layout():
    config = get_preset("tiny")
    model = replace(config.model, resolution=(16, 16), channels=3)
    trainer = Trainer(replace(config, model=model, device="cpu", patch=PatchConfig(schedule="full")), CPU)
    assert trainer.optimizer.defaults["fused"] is True
    conv = trainer.net.backbone.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    batch = trainer.patches(images, torch.zeros(8, dtype=torch.long), 1)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    before = [p.clone() for p in trainer.net.parameters()]
    assert trainer.optimise(batch) is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.net.parameters()))
    # fp32 master weights under bf16 autocast
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())


def test_fused_adam_takes_the_same_step_as_the_reference_loop():
    torch.manual_seed(0)
    params = [torch.randn(16, 8, 3, 3), torch.randn(16)]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for fused in (False, True):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.Adam(ps, lr=1e-3, fused=fused)
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        results.append(ps)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_folded_inception_matches_the_unfolded_network():
    from patch_diffusion.metrics.inception import InceptionV3, _ConvBN
    torch.manual_seed(0)
    net = InceptionV3().eval().requires_grad_(False)
    for m in net.modules():
        if isinstance(m, _ConvBN):  # random weights and batch statistics, so folding matters
            torch.nn.init.kaiming_normal_(m.weight)
            m.beta.uniform_(-0.2, 0.2)
            m.mean.uniform_(-0.1, 0.1)
            m.var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    plain = net(x)
    names = set(net.state_dict())
    for m in net.modules():
        if isinstance(m, _ConvBN):
            m.fold_batch_norm()
    assert set(net.state_dict()) == names  # the weights file format is unchanged
    torch.testing.assert_close(net(x), plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    # features stay float32 inside a caller's bf16 autocast
    from patch_diffusion.metrics.fid import compute_features
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = compute_features([images], net, CPU, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (compute_features([images], net, CPU, progress=False) == expected).all()


def test_sampling_runs_the_network_in_the_run_precision():
    from patch_diffusion.config import SamplerConfig
    from patch_diffusion.generate import sample
    from patch_diffusion.model import build_denoiser
    config = get_preset("tiny")
    model = replace(config.model, resolution=(16, 16), channels=1)
    net = build_denoiser(model).eval().requires_grad_(False)
    seen = []
    net.backbone.register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_enabled("cpu")))
    sampler = SamplerConfig(num_steps=4)
    images = {p: sample(net, [0, 1], sampler, (16, 16), CPU, precision=p) for p in ("fp32", "bf16")}
    assert seen == [False] * (len(seen) // 2) + [True] * (len(seen) // 2) and seen
    # bf16 moves pixels a little, not the picture
    diff = (images["fp32"].float() - images["bf16"].float()).abs()
    assert diff.mean() < 4 and images["fp32"].shape == images["bf16"].shape == (2, 1, 16, 16)


def test_throughput_profile_names_the_costly_operators(tiny_data):
    result = run("bench", "throughput", "--data", tiny_data, "--preset", "tiny", "--steps", "2",
                 "--warmup", "0", "--device", "cpu", "--profile", "5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["rows"][-1]["pixel_cost_vs_full"] == 1.0
    for row in data["rows"]:
        assert row["pixel_cost_vs_full"] == pytest.approx(
            row["sec_per_step"] / row["pixels"] * data["rows"][-1]["pixels"] / data["rows"][-1]["sec_per_step"])
        assert 0 < row["cpu_cores_busy"] <= torch.get_num_threads() + 1
        ops = row["operators"]
        assert len(ops) == 5
        assert [o["ms_per_step"] for o in ops] == sorted((o["ms_per_step"] for o in ops), reverse=True)
        assert 0 < sum(o["share"] for o in ops) <= 1 + 1e-9
    # a convolution is among the top operators of every training step of a UNet
    assert all(any("conv" in o["op"] for o in row["operators"]) for row in data["rows"])
    table = run("bench", "throughput", "--data", tiny_data, "--preset", "tiny", "--steps", "1",
                "--warmup", "0", "--device", "cpu", "--profile", "3")
    assert table.exit_code == 0 and "top operators by own time" in table.output


def test_resumed_adam_state_takes_the_layout_of_channels_last_weights():
    """Checkpoints store optimiser state contiguous; fused Adam pairs state and weights by
    storage order, so a channels-last weight must get its state back channels-last."""
    from patch_diffusion.checkpoint import optimizer_from_tensors, optimizer_to_tensors
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last) for _ in range(2)]

    def adam(p):
        return torch.optim.Adam([p], lr=0.1, fused=True)

    straight = weight.clone().requires_grad_()
    opt = adam(straight)
    for g in grads:
        straight.grad = g.clone()
        opt.step()
    first = weight.clone().requires_grad_()
    opt = adam(first)
    first.grad = grads[0].clone()
    opt.step()
    tensors, info = optimizer_to_tensors(opt)
    saved = {k: v.contiguous() for k, v in tensors.items()}  # as a checkpoint stores them
    resumed = first.detach().clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    opt = adam(resumed)
    optimizer_from_tensors(opt, saved, json.loads(json.dumps(info)))
    assert opt.state[resumed]["exp_avg"].stride() == resumed.stride()
    resumed.grad = grads[1].clone()
    opt.step()
    assert torch.equal(resumed, straight)


def test_bf16_cpu_attention_matches_the_fused_kernel():
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 16, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v), expected)  # fp32: PyTorch's kernel itself
    got = attention(*(t.to(torch.bfloat16) for t in (q, k, v)))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=0.05)
    # and gradients reach all three inputs through the bf16 path
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    attention(qb, kb, vb).float().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (qb, kb, vb))


def test_the_run_log_names_the_precision_and_layout_in_use(tiny_data, tmp_path):
    for flags, shown in [(["--precision", "bf16"], "device: cpu (bf16, channels-last)"),
                         (["--precision", "fp32", "--no-channels-last"], "device: cpu (fp32, NCHW)")]:
        result = run("train", "--data", tiny_data, "--preset", "tiny", "--device", "cpu", "--workers", "0",
                     "--duration", "0.01", "--outdir", tmp_path / flags[1], *flags)
        assert result.exit_code == 0, result.output
        assert shown in result.output
