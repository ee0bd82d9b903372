"""Tests of evaluation.py: Laplacian pyramid, SWD, MS-SSIM diversity, nearest neighbours, the z regressor,
FID's skip, and evaluate_samples end to end on a tiny synthetic dataset written in the OASIS layout.

Run: .venv/bin/python -m pytest -q tests/test_evaluation.py
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import evaluation as ev
import util

NUM_Z = 32  # the z-indices per subject of the conftest `disc_slices` (its default num_z)


@pytest.fixture(scope="module")
def disc_data(tmp_path_factory, write_disc_dataset):
    """(dataset root, z-regressor cache dir with a regressor already trained for size 32)."""
    root = write_disc_dataset(tmp_path_factory.mktemp("discs"))
    cache = tmp_path_factory.mktemp("cache")
    ev.z_regressor_for(root, 32, cache_dir=cache, steps=150, verbose=False)
    return root, cache


def smooth_fields(n, size=32, seed=0):
    """Random smooth images in [-1, 1] (blurred noise), a stand-in for a distribution of slices."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=gen)
    for _ in range(3):
        x = ev.pyr_up(ev.pyr_down(x))
    return (x / x.abs().amax(dim=(1, 2, 3), keepdim=True)).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Laplacian pyramid and SWD


def test_laplacian_pyramid_shapes_and_reconstruction():
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    pyramid = ev.laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyramid] == [64, 32, 16]
    assert (ev.reconstruct_laplacian(pyramid) - x).abs().max() < 1e-5
    # The band-pass levels of a flat image are zero: up- and down-sampling keep the mean brightness.
    flat = ev.laplacian_pyramid(torch.full((1, 1, 32, 32), 0.3), 2)
    assert flat[0].abs().max() < 1e-6 and (flat[1] - 0.3).abs().max() < 1e-6
    assert ev.swd_levels_for(64) == [64, 32, 16] and ev.swd_levels_for(256)[-1] == 16 and ev.swd_levels_for(32) == [32, 16]


def test_sliced_wasserstein_of_known_shifts():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 1, generator=gen)
    # In 1-D every direction is +-1: the distance of a set to its shifted copy is the shift.
    assert ev.sliced_wasserstein(a, a + 0.5, n_proj=8) == pytest.approx(0.5, abs=1e-5)
    # In 3-D a shift by v gives |v| * E|cos(angle)| = |v| / 2 (uniform directions on the sphere).
    b = torch.randn(2000, 3, generator=gen)
    v = torch.tensor([0.6, 0.0, 0.8])
    assert ev.sliced_wasserstein(b, b + v, n_proj=4096) == pytest.approx(0.5, rel=0.03)
    assert ev.sliced_wasserstein(b, b, n_proj=64) == 0.0
    # Unequal set sizes are compared at matching quantiles.
    assert ev.sliced_wasserstein(a[:500], a + 0.5, n_proj=8) == pytest.approx(0.5, abs=0.1)


def test_swd_is_zero_for_identical_sets_and_grows_with_shift(disc_slices):
    real = util.to_float(disc_slices(2, seed=0)[0])
    other = util.to_float(disc_slices(2, seed=1)[0])  # the same distribution, other subjects
    gen = torch.Generator().manual_seed(2)
    noisy = (other + 0.2 * torch.randn(other.shape, generator=gen)).clamp(-1, 1)
    blurred = ev.pyr_up(ev.pyr_down(other))
    kw = dict(patches_per_image=64, n_proj=128)
    same = ev.swd(real, real, **kw)
    assert all(v == 0.0 for v in same.values()) and set(same) == {"level_32", "level_16", "mean"}
    base = ev.swd(real, other, **kw)
    assert base["mean"] > 0
    # Noise and blur change the fine band-pass level most; the average grows too.
    for shifted in (noisy, blurred):
        out = ev.swd(real, shifted, **kw)
        assert out["level_32"] > 2 * base["level_32"], (out, base)
        assert out["mean"] > 1.3 * base["mean"], (out, base)


class _Blur(torch.nn.Module):
    """A stand-in autoencoder whose reconstruction is the input (blur=False) or its pyramid blur."""

    kind = "vae"

    def __init__(self, blur):
        super().__init__()
        self.blur = blur

    def reconstruct(self, x, z):
        return ev.pyr_up(ev.pyr_down(x)) if self.blur else x


def test_reconstruction_metrics_report_the_swd_per_level(disc_slices):
    images, z, _ = disc_slices(2)
    exact = ev.reconstruction_metrics(_Blur(False), images, z, torch.device("cpu"))
    assert exact["val/swd_32"] == exact["val/swd_16"] == 0.0 and exact["val/ssim"] == pytest.approx(1.0)
    soft = ev.reconstruction_metrics(_Blur(True), images, z, torch.device("cpu"), prefix="test")
    x = util.to_float(images)
    levels = ev.swd(ev.pyr_up(ev.pyr_down(x)).clamp(-1, 1), x, patches_per_image=64, n_proj=256)
    assert soft["test/swd_32"] == pytest.approx(levels["level_32"]) and soft["test/swd_16"] == pytest.approx(
        levels["level_16"])
    assert soft["test/swd_32"] > 3 * soft["test/swd_16"] > 0  # a blur loses the finest band most


# ----------------------------------------------------------------------------------------------
# MS-SSIM and diversity


def _msssim_pair(size, seed):
    """Two related test images (a smooth pattern plus independent noise) from a fixed numpy seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.sin(6 * xx) * np.cos(4 * yy)
    a = np.clip(base + 0.2 * rng.standard_normal((size, size)), -1, 1)
    b = np.clip(0.8 * base + 0.3 * rng.standard_normal((size, size)), -1, 1)
    return torch.from_numpy(a).float()[None, None], torch.from_numpy(b).float()[None, None]


@pytest.mark.parametrize("size,seed,reference", [
    # pytorch-msssim 1.0.0, installed outside .venv with `pip install --target /tmp/msssim --no-deps
    # pytorch-msssim`: ms_ssim(a, b, data_range=2.0, size_average=False) on _msssim_pair(size, seed).
    (192, 0, 0.4856534004211426),
    (256, 1, 0.45265787839889526),
])
def test_ms_ssim_matches_pytorch_msssim(size, seed, reference):
    a, b = _msssim_pair(size, seed)
    assert util.ms_ssim(a, b).item() == pytest.approx(reference, abs=1e-4)


def test_diversity_identical_vs_independent_images(disc_slices):
    one = smooth_fields(1, size=64, seed=3)
    assert ev.diversity(one.repeat(6, 1, 1, 1), pairs=16) == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(16, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ev.diversity(noise, pairs=32) < 0.1
    # Slices of different subjects: alike at the same z-index, less alike across z-indices.
    images, z, _ = disc_slices(4, size=64)
    images = util.to_float(images)
    same_z, any_z = ev.diversity(images, 64, z=z.numpy()), ev.diversity(images, 64)
    assert 0.1 < any_z < same_z < 0.99, (any_z, same_z)


def test_random_pairs_share_z_and_never_pair_an_image_with_itself():
    z = np.array([0, 0, 0, 1, 1, 2, 5, 5])
    pairs = ev.random_pairs(len(z), 200, seed=0, z=z)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert (z[pairs[:, 0]] == z[pairs[:, 1]]).all()
    assert 5 not in pairs  # z=2 has no partner
    free = ev.random_pairs(5, 200, seed=0)
    assert (free[:, 0] != free[:, 1]).all() and set(free.ravel()) == set(range(5))


# ----------------------------------------------------------------------------------------------
# Nearest neighbours


def test_nearest_neighbour_copy_has_zero_distance_and_counts_as_copy(disc_slices):
    train, _, _ = disc_slices(3)
    copies = util.to_float(train[[5, 40]])
    fresh = util.to_float(disc_slices(2, seed=9)[0])
    dist, idx = ev.nearest_neighbour_rmse(torch.cat([copies, fresh]), train)
    assert dist[0] == pytest.approx(0.0, abs=1e-5) and dist[1] == pytest.approx(0.0, abs=1e-5)
    assert idx[:2].tolist() == [5, 40]
    assert (dist[2:] > 0.02).all()
    real_dist = dist[2:]
    assert ev.copy_fraction(dist[:2], real_dist) == 1.0
    assert ev.copy_fraction(real_dist[real_dist > torch.quantile(real_dist, 0.5)], real_dist) == 0.0
    # RMSE per pixel: a flat 0.5 image is 0.5 away from a flat 0 image.
    d, _ = ev.nearest_neighbour_rmse(torch.full((1, 1, 8, 8), 0.5), torch.zeros(3, 1, 8, 8))
    assert d.item() == pytest.approx(0.5, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# z regressor


def test_z_regressor_reads_slice_position_and_not_shuffled_labels(disc_slices):
    train, z, _ = disc_slices(12, seed=0)
    val, val_z, _ = disc_slices(4, seed=1)
    model = ev.train_z_regressor(train, z, NUM_Z, steps=150, batch_size=32)
    good = ev.z_mae(model, val, val_z)
    shuffled = ev.train_z_regressor(train, z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))],
                                    NUM_Z, steps=150, batch_size=32)
    bad = ev.z_mae(shuffled, val, val_z)
    assert good < 1.5, good  # within about one slice of 32
    assert bad > 4.0 and bad > 3 * good, (good, bad)
    preds = ev.predict_z(model, val)
    assert preds.min() >= 0 and preds.max() <= NUM_Z - 1


def test_z_regressor_is_cached_and_rebuilt_when_broken(disc_data, tmp_path, monkeypatch):
    root, cache = disc_data
    path = ev.z_regressor_path(root, 32, cache)
    assert path.is_file() and path.name.startswith("zreg_")
    assert ev.z_regressor_path(root, 64, cache) != path  # one per size

    def no_training(*args, **kwargs):
        raise AssertionError("the cached regressor should have been used")

    monkeypatch.setattr(ev, "train_z_regressor", no_training)
    model = ev.z_regressor_for(root, 32, cache_dir=cache)
    state = torch.load(path, weights_only=True)
    assert state["kind"] == "zreg" and state["num_z"] == NUM_Z
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    monkeypatch.undo()
    # A truncated cache file is retrained, not trusted.
    broken = tmp_path / "cache"
    broken.mkdir()
    bad = ev.z_regressor_path(root, 32, broken)
    bad.write_bytes(path.read_bytes()[:100])
    ev.z_regressor_for(root, 32, cache_dir=broken, steps=5, verbose=False)
    assert torch.load(bad, weights_only=True)["kind"] == "zreg"


def test_z_regressor_refuses_unconditional_data(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((32, 32), i * 20, np.uint8)).save(folder / f"img{i}.png")
    with pytest.raises(util.UserError, match="no z-index"):
        ev.z_regressor_for(folder, 32, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# FID


def test_fid_is_skipped_with_a_reason_without_local_inception_weights():
    model, why = ev.inception_model()
    if model is not None:
        pytest.skip("torchvision and local Inception v3 weights are available on this machine")
    assert isinstance(why, str) and ("torchvision" in why or "Inception" in why)


def test_frechet_distance_of_gaussians_matches_closed_form():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2.
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 3.0])
    s1, s2 = np.array([1.0, 4.0]), np.array([4.0, 1.0])
    expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2
    assert ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-6)
    assert ev.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_scipy_and_is_silent_on_singular_covariances():
    import warnings

    from scipy import linalg
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)) + 1
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert ev.frechet_distance(a.mean(0), c1, b.mean(0), c2) == pytest.approx(expected, rel=1e-8)
    # 4 samples of 6 features, one of them dead: both covariances singular, as with a few samples of a ReLU net
    a[:, 2] = 0.0
    c1, c2 = np.cov(a[:4], rowvar=False), np.cov(b[:4], rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's sqrtm warns "Matrix is singular" here
        fd = ev.frechet_distance(a[:4].mean(0), c1, b[:4].mean(0), c2)
    # The same distance from the eigenvalues of C1 C2 directly (real and >= 0 for PSD matrices)
    direct = np.sqrt(np.linalg.eigvals(c1 @ c2).real.clip(min=0)).sum()
    assert fd == pytest.approx(((a[:4].mean(0) - b[:4].mean(0)) ** 2).sum() + np.trace(c1 + c2) - 2 * direct, rel=1e-6)


def test_real_swd_is_cached_by_its_slices_and_settings(tmp_path, monkeypatch):
    a, b = smooth_fields(24, seed=1), smooth_fields(20, seed=2)
    args = (tmp_path / "data", 32, 64)
    first = ev.real_swd_for(a, b, *args, 0, cache_dir=tmp_path)
    assert first == ev.swd(a, b, 32, 64, 0)
    (written,) = tmp_path.glob("swdreal_*.json")
    calls = []
    monkeypatch.setattr(ev, "swd", lambda *xs: calls.append(xs) or {"level_32": 1.0, "mean": 1.0})
    assert ev.real_swd_for(a, b, *args, 0, cache_dir=tmp_path) == first and not calls  # read back
    ev.real_swd_for(a, b, *args, 1, cache_dir=tmp_path)  # another seed
    ev.real_swd_for(a, b[:-1], *args, 0, cache_dir=tmp_path)  # other slices
    ev.real_swd_for(a, b, tmp_path / "data", 16, 64, 0, cache_dir=tmp_path)  # other patches per image
    assert len(calls) == 3
    written.write_text("{not json")
    assert ev.real_swd_for(a, b, *args, 0, cache_dir=tmp_path) == {"level_32": 1.0, "mean": 1.0}  # recomputed
    assert json.loads(written.read_text()) == {"level_32": 1.0, "mean": 1.0}


# ----------------------------------------------------------------------------------------------
# evaluate_samples end to end


def test_evaluate_samples_real_copies_and_noise(disc_data, capsys, tmp_path):
    root, cache = disc_data
    kw = dict(cache_dir=cache, pairs=64, swd_patches=32, swd_proj=64, verbose=False)
    test = dataset.load_split(root, "test", size=32)
    images, z = test.tensors()
    perfect = ev.evaluate_samples(util.to_float(images), z, root, **kw)
    for key in ("swd", "swd_real", "swd/level_32", "swd/level_16", "diversity_ms_ssim", "diversity_ms_ssim_real",
                "z_mae", "z_mae_real", "nn_l2", "nn_l2_real", "nn_copy_fraction"):
        assert isinstance(perfect[key], float) and np.isfinite(perfect[key]), key
    assert perfect["fid"] is None or isinstance(perfect["fid"], float)
    if perfect["fid"] is None:
        assert perfect["fid_skipped"]
    assert perfect["diversity_pairs"] == "same z-index"
    assert perfect["z_mae"] < 1.5 and perfect["z_mae_real"] < 1.5
    assert perfect["swd"] < 2 * perfect["swd_real"] + 1
    assert perfect["nn_copy_fraction"] < 0.2

    # Memorised training slices: distance 0, all counted as copies.
    train_u8, train_z = dataset.load_split(root, "train", size=32).tensors()
    copies = ev.evaluate_samples(util.to_float(train_u8[:64]), train_z[:64], root, **kw)
    assert copies["nn_l2"] == pytest.approx(0.0, abs=1e-5) and copies["nn_copy_fraction"] == 1.0
    assert copies["nn_l2_real"] > 0.01

    # Noise: far from the real slices in SWD and more diverse than they are.
    noise = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = ev.evaluate_samples(noise, z[:64], root, **kw)
    assert bad["swd"] > 5 * bad["swd_real"]
    assert bad["diversity_ms_ssim"] < bad["diversity_ms_ssim_real"]
    assert bad["fd_zreg"] > 5 * bad["fd_zreg_real"] and perfect["fd_zreg"] < 2 * perfect["fd_zreg_real"] + 1e-3

    # Real slices labelled with the mirrored z-index: a model that ignores its condition.
    ignored = ev.evaluate_samples(util.to_float(images), NUM_Z - 1 - z, root, **kw)
    assert ignored["z_mae"] > 5 * ignored["z_mae_real"] and ignored["z_mae"] > 8

    ev.report(bad, tmp_path / "m.json")
    printed = capsys.readouterr().out
    assert '"swd"' in printed
    assert json.loads((tmp_path / "m.json").read_text())["swd"] == pytest.approx(bad["swd"])


def test_evaluate_samples_on_unconditional_data_skips_z(tmp_path):
    folder = tmp_path / "plain"
    for split in ("train", "validate", "test"):
        (folder / split).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((32, 32), 30 * i + 10, np.uint8)).save(folder / split / f"{split}{i}.png")
    out = ev.evaluate_samples(torch.zeros(4, 1, 32, 32), torch.full((4,), -1), folder, cache_dir=tmp_path,
                              pairs=8, swd_patches=16, swd_proj=16, verbose=False)
    assert out["z_mae"] is None and "unconditional" in out["z_mae_skipped"] and out["fd_zreg"] is None
    assert out["diversity_pairs"] == "random"


def test_feature_frechet_is_zero_for_one_set_and_matches_gaussian_formula():
    reg = ev.ZRegressor(32)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 1, 32, 32, generator=g) * 2 - 1
    b = (a * 0.8 + 0.1 + 0.1 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert abs(ev.feature_frechet(reg, a, a)) < 1e-6
    fa, fb = reg.features(a).double().numpy(), reg.features(b).double().numpy()
    assert fa.shape == (200, 64)
    live = np.concatenate([fa, fb]).std(0) > 1e-9  # units dead on both sets are left out
    fa, fb = fa[:, live], fb[:, live]
    from scipy import linalg  # the textbook formula, independently of frechet_distance
    c1, c2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    expected = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert ev.feature_frechet(reg, a, b) == pytest.approx(expected, rel=1e-4) and expected > 0


def test_cli_reports_bad_arguments_in_one_line(cli):
    proc = cli.run("evaluation.py", "--n", "1", timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: --n 1") and "Traceback" not in proc.stderr


def test_unconditional_samples_on_conditional_data_skip_z_and_pair_randomly(disc_data):
    root, cache = disc_data
    images = util.to_float(dataset.load_split(root, "test", size=32).tensors()[0][:40])
    out = ev.evaluate_samples(images, torch.full((40,), -1), root, cache_dir=cache, pairs=16, swd_patches=16,
                              swd_proj=16, verbose=False)
    assert out["z_mae"] is None and "without z-indices" in out["z_mae_skipped"]
    assert out["diversity_pairs"] == "random"
