"""Every measurement of the project: reconstruction metrics and codebook statistics of stage one, and the
sample-quality metrics of stage two, each reported beside the value that real slices get.

`reconstruction_metrics(model, images_u8, z, device)` (stage one's validation, `prestage_train.py
--eval-only` and the playground): SSIM, MS-SSIM and PSNR of deterministic reconstructions, and for a
VQ-VAE the fraction of codes used and the code perplexity over the whole split.

`evaluate_samples(images, z, data_path)` (called by `stable_diffusion.py evaluate` and
`pixelCNN.py evaluate`) returns a flat dict of floats:

- swd, swd/level_<res>: sliced Wasserstein distance between Laplacian-pyramid patch descriptors of the
  samples and of the real validate slices (Karras et al. 2018, appendix D), x1e3 as in the paper;
  swd_real: the same for as many real *train* slices (at the same z-indices), i.e. what a perfect
  generator would score with this many images.
- diversity_ms_ssim: mean MS-SSIM over random pairs of samples that share a z-index (lower = more
  diverse; 1.0 = mode collapse); diversity_ms_ssim_real: the same over real validate slices.
- z_mae: mean |requested z - z predicted by a small CNN trained on real train slices|;
  z_mae_real: that regressor's error on real validate slices. None (with z_mae_skipped) when the
  data carry no z-index.
- fd_zreg, fd_zreg_real: Frechet distance (x1e3) between the samples (the matched real train slices) and the
  real validate slices on the 64 hidden features of that z regressor: a feature-space distance like FID that needs
  no downloaded weights. None where there is no z regressor.
- nn_l2, nn_l2_real: mean distance (per-pixel RMSE) from each sample / each validate slice to its
  nearest training slice; nn_copy_fraction: fraction of samples closer to a training slice than
  the 1st percentile of validate slices is (memorised copies score ~0 distance).
- fid, fid_real: Frechet Inception distance where torchvision and its Inception v3 weights are
  already on this machine (never downloaded); otherwise fid None and fid_skipped saying why.

`consistency_metrics(stacks, data_path)` (`evaluate --subjects`) scores whole generated subjects
[S, 32, H, W], each key beside `<key>_real` for the real validate subjects:

- stack/adjacent_ssim, stack/adjacent_l1: mean SSIM and mean |difference| (in [0, 1] units) between
  slices z and z+1 of a subject (independent draws from different brains score lower / higher).
- stack/outline_jitter_sagittal, _coronal: mean |second difference| (pixels) across z of the brain's
  front/back (left/right) edge in the mid-sagittal (mid-coronal) reslice: jagged edges score high.
- stack/z_monotone: fraction of steps up the stack where the z regressor's prediction rises;
  stack/z_spacing: its rise per slice (the least-squares slope of prediction against slice number, mean
  over subjects; 1 for a perfect stack).

`segmentation_reference(data_path, size)` (`python evaluation.py --segmenter STEPS`): a small U-Net
(`SegNet`) trained from scratch on real image/tissue pairs (all train slices, and 2 train subjects), with its
Dice per tissue on the real test split (`dice_scores`): the real-trained side of train-on-synthetic /
test-on-real, for when samples come with tissue maps.

Commands (the real-vs-real baseline: real *test* slices scored as if they were samples):
    python evaluation.py                                   # embedded dataset, 64x64
    python evaluation.py --data /path/to/OASIS --size 128 --n 512 --out runs/baseline_128.json
    python evaluation.py --segmenter 400                   # plus the segmenter's Dice on real test slices
"""
import contextlib
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dataset
import util
from model_VAE import code_statistics
from util import UserError

CACHE_DIR = Path(__file__).resolve().parent / "runs" / "_cache"
ZREG_VERSION = 2
SWD_REAL_VERSION = 1  # of the cached real-vs-real SWD: raise when `swd` changes what it computes
SWD_PATCH = 7  # neighbourhood size of the SWD descriptors (Karras et al.)
SWD_MIN_RES = 16  # coarsest pyramid level
NN_MAX_RES = 64  # nearest-neighbour search runs at most at 64x64 (area-downsampled)


# ----------------------------------------------------------------------------------------------
# Stage one: reconstructions and codebook statistics


def reconstruct(model, images_u8, z, device):
    """Deterministic reconstructions in [-1, 1] (posterior mean / nearest codes) of uint8 slices, on the CPU."""
    return util.map_batches(lambda x, zz: model.reconstruct(util.to_float(x), zz).float().clamp(-1, 1),
                            (images_u8, z), device)


def code_counts(model, images_u8, z, device):
    """How often each VQ code occurs over every latent position of the slices, float [n_embed]."""
    # fp32 (amp=False): in bf16 the encoder could move a latent across a code boundary and change the count
    indices = util.map_batches(lambda x, zz: model.encode_indices(util.to_float(x), zz), (images_u8, z), device,
                               amp=False)
    return torch.bincount(indices.flatten(), minlength=model.n_embed).float()


def codebook_usage(counts, prefix="val"):
    """Fraction of codes used and code perplexity exp(H) of a code-count histogram."""
    stats = code_statistics(counts)
    return {f"{prefix}/codebook_usage": stats["usage"].item(), f"{prefix}/perplexity": stats["perplexity"].item()}


@torch.no_grad()
def reconstruction_metrics(model, images_u8, z, device, max_n=None, prefix="val"):
    """SSIM, MS-SSIM and PSNR of reconstructions of the first `max_n` slices (None or 0: all); the SWD per pyramid
    level between the reconstructions and the slices (`<prefix>/swd_<res>`: texture lost at each scale, 0 when
    none is; SSIM hardly sees it); codebook usage and perplexity for a VQ-VAE."""
    n = min(len(images_u8), max_n or len(images_u8))
    images_u8, z = images_u8[:n], z[:n]
    recon, x = reconstruct(model, images_u8, z, device), util.to_float(images_u8)
    metrics = {f"{prefix}/ssim": util.ssim(recon, x).mean().item(), f"{prefix}/psnr": util.psnr(recon, x).mean().item(),
               f"{prefix}/ms_ssim": util.ms_ssim(recon, x).mean().item()}
    if x.shape[-1] >= SWD_MIN_RES:
        levels = swd(recon, x, patches_per_image=64, n_proj=256)  # a quarter of the cost: ~0.7 s on 192 slices at 64
        metrics.update({f"{prefix}/swd_{key[6:]}": value for key, value in levels.items() if key != "mean"})
    if model.kind == "vqvae":
        metrics.update(codebook_usage(code_counts(model, images_u8, z, device), prefix))
    return metrics


def texture_gap(model, train, validate, device, n=192, seed=0):
    """Per pyramid level, the SWD between reconstructions of `n` random train slices and the validate slices, beside
    the SWD between those real train slices and validate (the sampling floor): {res: (recon, real, ratio)}.
    `train`, `validate`: (uint8 images, z). Ratio 1 means the reconstructions keep the texture of real slices."""
    images, z = train
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    recon = reconstruct(model, images[pick], z[pick], device)
    real, target = util.to_float(images[pick]), util.to_float(validate[0])
    ours, floor = swd(recon, target), swd(real, target)
    return {int(k[6:]): (ours[k], floor[k], ours[k] / max(floor[k], 1e-12)) for k in ours if k != "mean"}


# ----------------------------------------------------------------------------------------------
# Laplacian pyramid and sliced Wasserstein distance


def _binomial_kernel(device=None):
    """5x5 binomial (approximately Gaussian) low-pass filter, sum 1."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    k = k[:, None] * k[None, :]
    return (k / k.sum()).view(1, 1, 5, 5)


def _blur(x, kernel):
    """Per-channel 5x5 filter with reflected borders."""
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel.expand(c, 1, 5, 5), groups=c)


def pyr_down(x):
    """Blur, then keep every second pixel (one Gaussian-pyramid step)."""
    return _blur(x, _binomial_kernel(x.device))[:, :, ::2, ::2]


def pyr_up(x):
    """Insert zeros between pixels, then blur with 4x the kernel (keeps the mean brightness)."""
    n, c, h, w = x.shape
    up = torch.zeros(n, c, 2 * h, 2 * w, dtype=x.dtype, device=x.device)
    up[:, :, ::2, ::2] = x
    # Reflected padding of the zero-inserted image keeps the even/odd pattern at both borders.
    return _blur(up, 4 * _binomial_kernel(x.device))


def laplacian_pyramid(images, levels):
    """[finest band-pass, ..., coarsest low-pass] with sizes H, H/2, ..., H/2^(levels-1)."""
    pyramid, current = [], images.float()
    for _ in range(levels - 1):
        smaller = pyr_down(current)
        pyramid.append(current - pyr_up(smaller))
        current = smaller
    pyramid.append(current)
    return pyramid


def reconstruct_laplacian(pyramid):
    """Invert `laplacian_pyramid`: upsample from the coarsest level and add each band back."""
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = pyr_up(image) + band
    return image


def swd_levels_for(size, min_res=SWD_MIN_RES):
    """Pyramid resolutions used for an image size: size, size/2, ... down to min_res (at least one)."""
    resolutions = [size]
    while resolutions[-1] // 2 >= min_res:
        resolutions.append(resolutions[-1] // 2)
    return resolutions


def patch_descriptors(images, patches_per_image=128, seed=0, min_res=SWD_MIN_RES):
    """{res: [N * patches, C*7*7]} random 7x7 neighbourhoods of every pyramid level, normalised per channel.

    Positions depend only on (seed, N, res), not on the pixels, so identical sets give identical
    descriptors. Each set is normalised by its own per-channel mean and std, as in the paper.
    """
    resolutions = swd_levels_for(images.shape[-1], min_res)
    pyramid = laplacian_pyramid(images, len(resolutions))
    gen = torch.Generator().manual_seed(seed)
    half = SWD_PATCH // 2
    out = {}
    for res, level in zip(resolutions, pyramid):
        n, c, h, w = level.shape
        ys = torch.randint(half, h - half, (n, patches_per_image), generator=gen)
        xs = torch.randint(half, w - half, (n, patches_per_image), generator=gen)
        offsets = torch.arange(-half, half + 1)
        rows = (ys[..., None] + offsets)[..., :, None]  # [n, p, 7, 1]
        cols = (xs[..., None] + offsets)[..., None, :]  # [n, p, 1, 7]
        idx = torch.arange(n)[:, None, None, None]
        desc = level.permute(0, 2, 3, 1)[idx, rows, cols]  # [n, p, 7, 7, c]
        desc = desc.permute(0, 1, 4, 2, 3).reshape(n * patches_per_image, c, SWD_PATCH, SWD_PATCH)
        mean = desc.mean(dim=(0, 2, 3), keepdim=True)
        std = desc.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-8)
        out[res] = ((desc - mean) / std).reshape(desc.shape[0], -1)
    return out


def _quantiles(sorted_values, n):
    """Nearest-rank quantiles (n of them) along axis 1 of an already sorted [P, M] array."""
    m = sorted_values.shape[1]
    if m == n:
        return sorted_values
    idx = np.minimum(((np.arange(n) + 0.5) / n * m).astype(np.int64), m - 1)
    return sorted_values[:, idx]


def sliced_wasserstein(a, b, n_proj=512, seed=0, chunk=128):
    """Sliced Wasserstein-1 distance between point sets a [Na, D] and b [Nb, D].

    Mean over `n_proj` random unit directions of the 1-D Wasserstein distance of the projections
    (sorted values matched rank to rank; at nearest-rank quantiles when Na != Nb).
    """
    a = torch.as_tensor(a).float().flatten(1).numpy()
    b = torch.as_tensor(b).float().flatten(1).numpy()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"descriptor sizes differ: {a.shape[1]} vs {b.shape[1]}")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_proj, a.shape[1], generator=gen)
    dirs = (dirs / dirs.norm(dim=1, keepdim=True)).numpy()
    n = min(len(a), len(b))
    total = 0.0
    for start in range(0, n_proj, chunk):
        d = dirs[start:start + chunk]
        # [P, N] rows sorted by numpy: several times faster than torch.sort on CPU.
        pa = _quantiles(np.sort(d @ a.T, axis=1), n)
        pb = _quantiles(np.sort(d @ b.T, axis=1), n)
        total += float(np.abs(pa - pb).mean(axis=1, dtype=np.float64).sum())
    return total / n_proj


def swd(a, b, patches_per_image=128, n_proj=512, seed=0, min_res=SWD_MIN_RES):
    """{'level_<res>': SWD x 1e3 per pyramid level, 'mean': their average} between image sets a and b."""
    da = patch_descriptors(a, patches_per_image, seed, min_res)
    db = patch_descriptors(b, patches_per_image, seed, min_res)
    out = {f"level_{res}": sliced_wasserstein(da[res], db[res], n_proj, seed + res) * 1e3 for res in da}
    out["mean"] = float(np.mean(list(out.values())))
    return out


# ----------------------------------------------------------------------------------------------
# Diversity (MS-SSIM between pairs) and nearest neighbours


def random_pairs(n, pairs, seed=0, z=None):
    """[pairs, 2] index pairs i != j; pairs share a z-index when `z` is given and allows it.

    Slices at different positions differ by anatomy rather than by the model's variety, so with
    z-indices we pair within a z-index (a random slice i with at least one same-z partner, then a
    random partner j); without z, or where no z-index has two slices, pairs are drawn from all.
    """
    if n < 2:
        raise ValueError("need at least two images to form pairs")
    rng = np.random.default_rng(seed)
    if z is not None:
        z = np.asarray(z)
        groups = {v: np.flatnonzero(z == v) for v in np.unique(z) if v >= 0}
        groups = {v: idx for v, idx in groups.items() if len(idx) >= 2}
        if groups:
            members = np.concatenate(list(groups.values()))
            first = rng.choice(members, size=pairs)
            second = np.empty_like(first)
            for k, i in enumerate(first):
                partners = groups[z[i]]
                partners = partners[partners != i]
                second[k] = partners[rng.integers(len(partners))]
            return np.stack([first, second], axis=1)
    first = rng.integers(n, size=pairs)
    second = (first + rng.integers(1, n, size=pairs)) % n  # uniform over j != i
    return np.stack([first, second], axis=1)


@torch.no_grad()
def diversity(images, pairs=256, seed=0, z=None, batch_size=128):
    """Mean MS-SSIM (util.ms_ssim) over `pairs` random pairs of images: 1.0 for identical images, near 0
    for unrelated noise. With `z`, pairs share a z-index (see random_pairs)."""
    images = images.float()
    idx = torch.from_numpy(random_pairs(len(images), pairs, seed, z))
    values = [util.ms_ssim(images[idx[s:s + batch_size, 0]], images[idx[s:s + batch_size, 1]])
              for s in range(0, len(idx), batch_size)]
    return torch.cat(values).mean().item()


def _nn_resolution(images):
    """Area-downsample to at most NN_MAX_RES pixels a side (a copy stays a copy)."""
    images = images.float()
    if images.shape[-1] > NN_MAX_RES:
        images = F.adaptive_avg_pool2d(images, NN_MAX_RES)
    return images


def _as_float(images):
    """uint8 images -> float in [-1, 1]; float images unchanged (as float32)."""
    return util.to_float(images) if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def nearest_neighbour_rmse(a, b, chunk=512):
    """For each image of a: (per-pixel RMSE to its nearest image of b, index of that image), both [Na].

    `b` may be uint8 (converted chunk by chunk, so a large training set is never held as floats).
    The search uses fast matrix-product distances; the distance to the neighbour found is then
    recomputed directly, so that an exact copy reads 0 rather than float round-off.
    """
    a = _nn_resolution(a).flatten(1)
    best = torch.full((len(a),), float("inf"))
    best_idx = torch.zeros(len(a), dtype=torch.long)
    for start in range(0, len(b), chunk):
        part = _nn_resolution(_as_float(b[start:start + chunk])).flatten(1)
        dist, idx = torch.cdist(a, part).min(dim=1)
        better = dist < best
        best = torch.where(better, dist, best)
        best_idx = torch.where(better, idx + start, best_idx)
    nearest = _nn_resolution(_as_float(b[best_idx])).flatten(1)
    return ((a - nearest) ** 2).mean(dim=1).sqrt(), best_idx


def copy_fraction(sample_dist, real_dist, quantile=0.01):
    """Fraction of samples at most as far from the training set as the closest 1% of real held-out slices."""
    threshold = torch.quantile(real_dist.float(), quantile)
    return (sample_dist <= threshold).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Slice-position regressor


class ZRegressor(nn.Module):
    """Small CNN: image (any size, area-resized to 32x32) -> z-index as a float in [0, num_z - 1]."""

    def __init__(self, num_z, width=16):
        super().__init__()
        self.num_z = int(num_z)
        self.width = int(width)
        w = width
        # Three stride-2 convs straight from 32x32: cheap enough to train in seconds on a CPU.
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1), nn.ReLU(),  # 16x16
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Flatten(), nn.Linear(4 * w * 16, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        """Predicted z as a float; the head regresses z / (num_z - 1)."""
        x = F.adaptive_avg_pool2d(x.float(), 32)
        return self.net(x).squeeze(1) * max(self.num_z - 1, 1)

    @torch.no_grad()
    def features(self, x):
        """The 64 hidden units before the head: what the regressor learnt to see of anatomy, [B, 64]."""
        return self.net[:-1](F.adaptive_avg_pool2d(_as_float(x), 32))


def _augment(x, gen):
    """Random left-right flips, shifts of up to 2 px and gains of +-10%: the regressor must read anatomy,
    not one subject's exact placement or brightness."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    gain = 1 + 0.1 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    return ((x + 1) * gain - 1).clamp(-1, 1)


@contextlib.contextmanager
def _one_thread():
    """Run a block on one intra-op thread, then restore the setting.

    The regressor is so small that a second thread gains nothing, while on a loaded machine
    (other jobs on the same cores) two spinning threads made training 4-60x slower in our timings.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_z_regressor(images, z, num_z, steps=800, batch_size=64, lr=2e-3, seed=0):
    """Fit a ZRegressor on images (uint8 or float in [-1, 1], [N, 1, H, W]) with known z >= 0 (one thread)."""
    with _one_thread():
        return _fit_z_regressor(images, z, num_z, steps, batch_size, lr, seed)


def _fit_z_regressor(images, z, num_z, steps, batch_size, lr, seed):
    """The training loop of train_z_regressor: AdamW, one-cycle LR, smooth L1 on z / (num_z - 1)."""
    keep = z >= 0
    if int(keep.sum()) < 2:
        raise ValueError("need at least two slices with a known z-index to train the z regressor")
    images, z = images[keep], z[keep].float()
    # 32x32 is all the regressor looks at: downsample once instead of every step.
    x_all = F.adaptive_avg_pool2d(_as_float(images), 32)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG stream
        torch.manual_seed(seed)
        model = ZRegressor(num_z)
    scale = max(num_z - 1, 1)

    def loss():
        idx = torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=gen)
        return F.smooth_l1_loss(model(_augment(x_all[idx], gen)) / scale, z[idx] / scale, beta=0.02)
    return _fit(model, loss, steps, lr)


def _fit(model, loss, steps, lr):
    """The one training loop of this module's small networks: AdamW and a one-cycle LR over `steps` calls of
    loss() (which draws its own batch); returns the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict_z(model, images, batch_size=256):
    """Predicted z-indices (floats clamped to 0..num_z-1) for uint8 or float images."""
    preds = []
    for start in range(0, len(images), batch_size):
        preds.append(model(_as_float(images[start:start + batch_size])))
    return torch.cat(preds).clamp(0, model.num_z - 1)


def z_mae(model, images, z):
    """Mean |z - predicted z| over the images with a known z (>= 0)."""
    keep = z >= 0
    if not bool(keep.any()):
        return None
    return (predict_z(model, images[keep]) - z[keep].float()).abs().mean().item()


def _fingerprint(images, z):
    """Short hash of a split's pixels and z-indices: a cached regressor is reused only for the same data."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images.numpy()).tobytes())
    h.update(np.ascontiguousarray(z.numpy()).tobytes())
    return h.hexdigest()[:16]


def _cache_path(prefix, version, data_path, size, cache_dir=None, extra=""):
    """runs/_cache/<prefix>_<hash of resolved data path, size, version and extra>.<pt> (or under `cache_dir`)."""
    key = hashlib.sha256(f"{Path(data_path).resolve()}|{int(size)}|v{version}{extra}".encode()).hexdigest()[:16]
    return Path(cache_dir or CACHE_DIR) / f"{prefix}_{key}.pt"


def z_regressor_path(data_path, size, cache_dir=None):
    """runs/_cache/zreg_<hash of resolved data path and size>.pt (or under `cache_dir`)."""
    return _cache_path("zreg", ZREG_VERSION, data_path, size, cache_dir)


def z_regressor_for(data_path, size, cache_dir=None, steps=800, verbose=True, train=None):
    """The z regressor of a dataset at a size: loaded from the cache, or trained on its train split and cached.

    `train` may pass the already loaded train SliceSet. Raises UserError for data without z-indices.
    """
    train = train if train is not None else dataset.load_split(data_path, "train", size=size)
    if not train.conditional:
        raise UserError(f"{data_path}: slices carry no z-index, so there is no z regressor to train")
    images, z = train.tensors()
    fingerprint = _fingerprint(images, z)
    path = z_regressor_path(data_path, size, cache_dir)
    cached = _load_cached(path, ZREG_VERSION, fingerprint, lambda st: ZRegressor(st["num_z"], st["width"]))
    if cached is not None:
        return cached
    start = time.time()
    model = train_z_regressor(images, z, train.num_z, steps=steps)
    state = {"kind": "zreg", "num_z": train.num_z, "width": model.width}
    _save_cached(model, state, path, ZREG_VERSION, fingerprint, data_path, size, steps, time.time() - start,
                 f"z regressor: trained on {len(images)} train slices", verbose)
    return model


def _save_cached(model, state, path, version, fingerprint, data_path, size, steps, seconds, what, verbose):
    """Write a network of this module to its cache file, with what identifies the data it was trained on."""
    state = {**state, "version": version, "size": int(size), "data": str(Path(data_path).resolve()),
             "fingerprint": fingerprint, "steps": steps, "train_seconds": seconds, "model": model.state_dict()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        util.save_checkpoint(state, path)
        where = f"cached at {path}"
    except OSError as err:  # a read-only checkout still gets its metric, just no cache
        where = f"not cached ({path.parent}: {err.strerror or err})"
    if verbose:
        print(f"{what} in {seconds:.1f} s, {where}", flush=True)


def _load_cached(path, version, fingerprint, build):
    """A cached network (`build(state)` rebuilds it) for exactly this data, or None (missing, stale, corrupt:
    retrained)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if (state.get("version"), state.get("fingerprint")) != (version, fingerprint):
            return None
        model = build(state)
        model.load_state_dict(state["model"])
    except Exception:  # noqa: BLE001 - a broken cache file is rebuilt, never trusted
        return None
    return model.eval()


# ----------------------------------------------------------------------------------------------
# FID (only where Inception v3 weights are already on disk)


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) between two Gaussians (float64 numpy).

    Tr (C1 C2)^(1/2) is the sum of the square roots of the eigenvalues of C1^(1/2) C2 C1^(1/2), a symmetric PSD
    matrix with the same spectrum: exact, and unlike a general matrix square root of C1 C2 it stays finite and
    silent when the covariances are singular (a unit that is dead on every sample, fewer samples than features).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    trace_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ cov2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_covmean)


def inception_model():
    """(Inception v3 pool-feature model, None) from local weights, or (None, reason it is unavailable)."""
    try:
        import torchvision  # lazy: fails to import against some CPU torch builds
    except Exception as err:  # noqa: BLE001 - any import failure means: no FID here
        return None, f"torchvision cannot be imported ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    files = sorted(hub.glob("inception_v3_google-*.pth"))
    if not files:
        return None, f"no Inception v3 weights in {hub} (inception_v3_google-*.pth; nothing is downloaded)"
    try:
        model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        model.load_state_dict(torch.load(files[-1], map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001
        return None, f"could not load {files[-1]} ({str(err).splitlines()[0][:120]})"
    model.fc = nn.Identity()  # 2048-d pool features
    return model.eval(), None


@torch.no_grad()
def inception_features(model, images, batch_size=32):
    """2048-d pool features of images in [-1, 1] (grey replicated to RGB, 299x299, ImageNet normalisation)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats = []
    for start in range(0, len(images), batch_size):
        x = _as_float(images[start:start + batch_size])
        x = F.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        feats.append(model((x - mean) / std).double())
    return torch.cat(feats).numpy()


def feature_frechet(reg, a, b, batch_size=256):
    """Frechet distance between image sets a and b on the z regressor's hidden features (`ZRegressor.features`):
    a feature-space distance that needs no downloaded weights, since the regressor is trained here."""
    fa, fb = (torch.cat([reg.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()
              for x in (a, b))
    live = np.concatenate([fa, fb]).std(0) > 1e-9  # dead ReLU units carry nothing and make both covariances singular
    fa, fb = fa[:, live], fb[:, live]
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def fid(model, a, b):
    """FID between two image sets under `model`."""
    fa, fb = inception_features(model, a), inception_features(model, b)
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


# ----------------------------------------------------------------------------------------------
# Everything together


def _pick(n_total, n, rng):
    """n random distinct indices of n_total (all of them, in order, when n >= n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, size=n, replace=False))


def real_swd_for(train_f, val_f, data_path, patches, proj, seed, cache_dir=None):
    """`swd` of the real train slices matched to the samples' z-indices against the validate slices (the floor an
    evaluation reports beside the samples'), cached under runs/_cache by the slices' hash and the settings: every
    evaluation at one seed and set of z-indices draws the same two sets (both priors of `make demo`, a re-run), and
    the pair costs as much as the samples' own distance (4 s for 512 slices at 64x64 on 2 CPU cores)."""
    size = train_f.shape[-1]
    extra = f"|{_fingerprint(train_f, val_f)}|{patches}|{proj}|{seed}|{SWD_MIN_RES}"
    path = _cache_path("swdreal", SWD_REAL_VERSION, data_path, size, cache_dir, extra).with_suffix(".json")
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and "mean" in cached:
            return cached
    except (OSError, ValueError):  # missing or broken: computed again
        pass
    out = swd(train_f, val_f, patches, proj, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    except OSError:
        pass  # a read-only checkout computes it next time
    return out


def _matched_train(train_z, wanted_z, rng):
    """One random train slice per requested z-index (any slice for z = -1 or a z the split lacks)."""
    out = np.empty(len(wanted_z), dtype=np.int64)
    for k, v in enumerate(wanted_z):
        candidates = np.flatnonzero(train_z == v) if v >= 0 else np.empty(0, dtype=np.int64)
        out[k] = rng.choice(candidates) if len(candidates) else rng.integers(len(train_z))
    return out


def evaluate_samples(images, z, data_path, n_real=None, seed=0, cache_dir=None, pairs=256, swd_patches=128,
                     swd_proj=512, verbose=True):
    """Score samples [N, 1, H, W] in [-1, 1] generated for z-indices `z` [N] against the real data.

    `data_path` is the dataset the models were trained on (None: the embedded set). `n_real` caps the
    number of real validate slices used (default: all). See the module docstring for each key.
    """
    images = images.detach().float().cpu().clamp(-1, 1)
    z = torch.as_tensor(z).long().cpu().reshape(-1)
    if images.dim() != 4 or images.shape[1] != 1 or len(images) != len(z):
        raise ValueError(f"expected images [N, 1, H, W] and z [N], got {tuple(images.shape)} and {tuple(z.shape)}")
    if len(images) < 2:
        raise UserError("evaluation needs at least two samples")
    size = images.shape[-1]
    root = dataset.ensure_dataset(data_path, size)
    train = dataset.load_split(root, "train", size=size)
    val = dataset.load_split(root, "validate", size=size)
    train_u8, train_z = train.tensors()
    val_u8, val_z = val.tensors()
    rng = np.random.default_rng(seed)
    ref = _pick(len(val_u8), n_real, rng)
    val_f, val_z = util.to_float(val_u8[ref]), val_z[ref]
    matched = _matched_train(train_z.numpy(), z.numpy(), rng)
    train_f = util.to_float(train_u8[matched])
    timings = {}
    metrics = {"n_samples": len(images), "n_real_validate": len(val_f), "size": size, "data": str(root)}

    t = time.time()
    fake_swd = swd(images, val_f, swd_patches, swd_proj, seed)
    real_swd = real_swd_for(train_f, val_f, root, swd_patches, swd_proj, seed, cache_dir)
    metrics["swd"], metrics["swd_real"] = fake_swd.pop("mean"), real_swd.pop("mean")
    metrics.update({f"swd/{k}": v for k, v in fake_swd.items()})
    metrics.update({f"swd_real/{k}": v for k, v in real_swd.items()})
    timings["swd"] = time.time() - t

    t = time.time()
    use_z = train.conditional and bool((z >= 0).any())  # conditional data and samples asked for z-indices
    metrics["diversity_ms_ssim"] = diversity(images, pairs, seed, z.numpy() if use_z else None)
    metrics["diversity_ms_ssim_real"] = diversity(val_f, pairs, seed, val_z.numpy() if use_z else None)
    metrics["diversity_pairs"] = "same z-index" if use_z else "random"
    timings["diversity"] = time.time() - t

    t = time.time()
    if use_z:
        reg = z_regressor_for(root, size, cache_dir, verbose=verbose, train=train)
        metrics["z_mae"] = z_mae(reg, images, z)
        metrics["z_mae_real"] = z_mae(reg, val_f, val_z)
        metrics["fd_zreg"] = 1e3 * feature_frechet(reg, images, val_f)  # x1e3, as SWD: the features are small
        metrics["fd_zreg_real"] = 1e3 * feature_frechet(reg, train_f, val_f)
    else:
        metrics["z_mae"] = metrics["z_mae_real"] = metrics["fd_zreg"] = metrics["fd_zreg_real"] = None
        metrics["z_mae_skipped"] = ("the dataset has no z-indices (unconditional)" if not train.conditional
                                    else "the samples were generated without z-indices")
    timings["z_regressor"] = time.time() - t

    t = time.time()
    fake_nn, _ = nearest_neighbour_rmse(images, train_u8)
    real_nn, _ = nearest_neighbour_rmse(val_f, train_u8)
    metrics["nn_l2"], metrics["nn_l2_real"] = fake_nn.mean().item(), real_nn.mean().item()
    metrics["nn_copy_fraction"] = copy_fraction(fake_nn, real_nn)
    timings["nearest_neighbour"] = time.time() - t

    t = time.time()
    model, why = inception_model()
    if model is None:
        metrics["fid"] = metrics["fid_real"] = None
        metrics["fid_skipped"] = why
    else:
        metrics["fid"], metrics["fid_real"] = fid(model, images, val_f), fid(model, train_f, val_f)
    timings["fid"] = time.time() - t
    metrics.update({f"seconds/{k}": v for k, v in timings.items()})
    return metrics


# ----------------------------------------------------------------------------------------------
# Downstream use: a tissue segmenter trained from scratch here (the reference half of train-on-synthetic /
# test-on-real: the same network, steps and seed, trained on real pairs)


class SegNet(nn.Module):
    """A small U-Net (two poolings) from a slice [B, in_channels, H, W] to tissue logits [B, 4, H, W]
    (dataset.LABELS); in_channels > 1 where it also sees a stage-one latent (prestage_train's label head)."""

    def __init__(self, width=16, classes=len(dataset.LABELS), in_channels=1):
        super().__init__()
        self.width, self.in_channels = int(width), int(in_channels)

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                 nn.ReLU())
        w = self.width
        self.enc1, self.enc2, self.mid = block(self.in_channels, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), block(2 * w, w)
        self.out = nn.Conv2d(w, classes, 1)
        # channels-last: oneDNN's narrow convolutions run 1.47x faster a training step this way on CPU (no norm
        # layer here to pay for it, unlike stage one's GroupNorm; docs/RESULTS.md)
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        """Logits per tissue class; H and W must be divisible by 4."""
        e1 = self.enc1(x.float().contiguous(memory_format=torch.channels_last))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        return self.out(self.dec1(torch.cat([self.up1(d2), e1], dim=1)))


def train_segmenter(images, labels, steps=400, batch_size=32, lr=3e-3, seed=0, width=16):
    """Fit a SegNet on image/label pairs (images uint8 or float [N, C, H, W], labels long/uint8 [N, H, W] in
    0..3) with cross-entropy, AdamW and a one-cycle LR; left-right flips and small shifts, applied to both."""
    x_all, y_all = _as_float(images), torch.as_tensor(labels).long()
    if len(x_all) != len(y_all) or len(x_all) < 1:
        raise ValueError(f"need matching images and labels, got {len(x_all)} and {len(y_all)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SegNet(width, in_channels=x_all.shape[1])

    def loss():
        idx = torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=gen)
        x, y = x_all[idx], y_all[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None], y.flip(-1), y)
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        x, y = torch.roll(x, (dy, dx), dims=(-2, -1)), torch.roll(y, (dy, dx), dims=(-2, -1))
        return F.cross_entropy(model(x), y)
    return _fit(model, loss, steps, lr)


@torch.no_grad()
def segment(model, images, batch_size=128):
    """Predicted tissue classes long [N, H, W] of uint8 or float images [N, 1, H, W]."""
    return torch.cat([model(_as_float(images[i:i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)])


def dice_scores(pred, target):
    """Dice per tissue over a whole set of maps (2 |P and T| / (|P| + |T|) for each class but background, pixels
    of all slices pooled), and their mean: {'dice/CSF': ..., 'dice/grey matter': ..., 'dice_mean': ...}."""
    pred, target = torch.as_tensor(pred).long(), torch.as_tensor(target).long()
    out = {}
    for c, name in enumerate(dataset.LABELS[1:], start=1):
        p, t = pred == c, target == c
        total = int(p.sum() + t.sum())
        out[f"dice/{name}"] = 2 * int((p & t).sum()) / total if total else 1.0
    out["dice_mean"] = float(np.mean([out[f"dice/{name}"] for name in dataset.LABELS[1:]]))
    return out


SEG_VERSION = 1
SEG_STEPS = 400  # segmenter steps: the labeller of samples, and each train-on-synthetic row by default


def labelled_splits(data_path, size):
    """The labelled train and test SliceSets of a dataset; UserError where either has no tissue maps."""
    root = dataset.ensure_dataset(data_path, size)
    train = dataset.load_split(root, "train", size=size, labels=True)
    test = dataset.load_split(root, "test", size=size, labels=True)
    if train.labels is None or test.labels is None:
        raise UserError(f"{root}: has no tissue maps for the train and test splits ({dataset.LABEL_SOURCES})")
    return train, test


def _label_fingerprint(split):
    """`_fingerprint` of a labelled split, its tissue maps included."""
    images, z = split.tensors()
    return _fingerprint(torch.cat([images.flatten(1), torch.from_numpy(split.labels).flatten(1)], 1), z)


def segmenter_for(data_path, size, steps=None, seed=0, cache_dir=None, verbose=True, train=None):
    """The labeller of a dataset at a size: the segmenter trained on all its real train pairs (cached like the z
    regressor). It gives every generated slice its tissue map: on slices decoded by stage one it beat
    segmenters trained on decoded slices or on the latent (docs/RESULTS.md, "Tissue maps for samples")."""
    steps = steps or SEG_STEPS
    if train is None:  # the train split only: every sample call comes here
        train = dataset.load_split(dataset.ensure_dataset(data_path, size), "train", size=size, labels=True)
        if train.labels is None:
            raise UserError(f"{data_path}: has no tissue maps for its train split ({dataset.LABEL_SOURCES})")
    fingerprint = _label_fingerprint(train)
    path = _cache_path("seg", SEG_VERSION, data_path, size, cache_dir, f"|{steps}|{seed}")
    cached = _load_cached(path, SEG_VERSION, fingerprint, lambda st: SegNet(st["width"]))
    if cached is not None:
        return cached
    start = time.time()
    images, _ = train.tensors()
    model = train_segmenter(images, torch.from_numpy(train.labels), steps=steps, seed=seed)
    _save_cached(model, {"kind": "seg", "width": model.width}, path, SEG_VERSION, fingerprint, data_path, size,
                 steps, time.time() - start, f"tissue segmenter: trained on {len(images)} real train pairs", verbose)
    return model


def _test_dice(x, y, test, steps, seed):
    """Per-tissue Dice on the real test split of the segmenter trained on pairs (x, y)."""
    # unlike the z regressor, every thread pays here: 298 -> 152 ms a step from 1 to 2 threads at 64x64
    model = train_segmenter(x, y, steps=steps, seed=seed)
    test_images, _ = test.tensors()
    return dice_scores(segment(model, test_images), torch.from_numpy(test.labels))


def _two_subjects(train):
    """Rows of the first two real train subjects: the small real set synthetic pairs are added to."""
    return np.flatnonzero(np.isin(train.subjects, sorted(set(train.subjects))[:2]))


def segmentation_reference(data_path, size, n=None, steps=SEG_STEPS, seed=0, cache_dir=None, splits=None,
                           two_subjects=True):
    """Real-pair references of train-on-synthetic / test-on-real: the segmenter trained on n random real train
    pairs (default all), and (with `two_subjects`) on the first 2 real train subjects, each scored by Dice on the
    real test split. Cached per data, n, steps, seed and rows (the rows are the same for every prior)."""
    train, test = splits or labelled_splits(data_path, size)
    images, _ = train.tensors()
    pick = _pick(len(images), n, np.random.default_rng(seed))
    suffix = "" if two_subjects else "|real"
    path = _cache_path("segref", SEG_VERSION, data_path, size, cache_dir, f"|{len(pick)}|{steps}|{seed}{suffix}")
    fingerprint = _label_fingerprint(train) + _label_fingerprint(test)
    if path.with_suffix(".json").is_file():
        cached = json.loads(path.with_suffix(".json").read_text())
        if cached.get("fingerprint") == fingerprint:
            return cached["metrics"]
    two = _two_subjects(train)
    metrics = {"segmenter_steps": steps, "segmenter_train_pairs": len(pick), "segmenter_test_slices": len(test.images)}
    if two_subjects:
        metrics["segmenter_two_subject_pairs"] = len(two)
    for key, rows in [("real", pick)] + ([("real_2_subjects", two)] if two_subjects else []):
        scores = _test_dice(images[rows], torch.from_numpy(train.labels[rows]), test, steps, seed)
        metrics.update({f"segmenter_{key}/{k}": v for k, v in scores.items()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        util.save_json({"fingerprint": fingerprint, "metrics": metrics}, path.with_suffix(".json"))
    except OSError:
        pass  # a read-only checkout recomputes it next time
    return metrics


def train_on_synthetic(images, labels, data_path, steps=SEG_STEPS, seed=0, cache_dir=None, two_subjects=True):
    """Train-on-synthetic / test-on-real of generated pairs (images [N, 1, H, W] in [-1, 1], tissue classes
    [N, H, W]): Dice on the real test split of the segmenter trained on them alone, beside
    `segmentation_reference` for N real pairs (the same network, steps and seed on every row); with
    `two_subjects` also on the first 2 real train subjects plus them (half real, half synthetic), beside the 2
    subjects alone."""
    size = images.shape[-1]
    train, test = labelled_splits(data_path, size)
    metrics = segmentation_reference(data_path, size, len(images), steps, seed, cache_dir, (train, test), two_subjects)
    scores = _test_dice(images, labels, test, steps, seed)
    metrics.update({f"segmenter_synthetic/{k}": v for k, v in scores.items()})
    metrics["segmenter_synthetic_pairs"] = len(images)
    real = metrics["segmenter_real/dice_mean"]
    metrics["tstr_ratio"] = metrics["segmenter_synthetic/dice_mean"] / real if real > 0 else None
    if two_subjects:
        metrics.update(_two_subjects_plus(images, labels, train, test, steps, seed))
    return metrics


def _two_subjects_plus(images, labels, train, test, steps, seed):
    """Dice of the segmenter trained on the first 2 real train subjects plus the generated pairs."""
    two = _two_subjects(train)
    real_x, _ = train.tensors()
    # The real pairs repeated to about as many as the synthetic ones, so half of each batch is real: with 64 real
    # among 512 synthetic drawn uniformly, Dice fell 0.716 against 0.736 (docs/RESULTS.md).
    times = max(1, round(len(images) / len(two)))
    mixed_x = torch.cat([util.to_float(real_x[two]).repeat(times, 1, 1, 1), images.float().cpu()])
    mixed_y = torch.cat([torch.from_numpy(train.labels[two]).long().repeat(times, 1, 1),
                         torch.as_tensor(labels).long()])
    scores = _test_dice(mixed_x, mixed_y, test, steps, seed)
    return {f"segmenter_2_subjects_plus_synthetic/{k}": v for k, v in scores.items()}


# ----------------------------------------------------------------------------------------------
# Whole subjects: are the slices of a stack one brain?

OUTLINE_LEVEL = -0.8  # brain vs background threshold in [-1, 1] (the background is ~ -1)


def outline_jitter(reslices, level=OUTLINE_LEVEL):
    """Mean |second difference across z| (pixels) of the brain's two edges in reslices [S, K, L] (z by
    position along a line through the volume): a smooth outline scores ~0, slices from different brains
    jump. Rows with fewer than two brain pixels, and the steps next to them, are left out."""
    mask = reslices > level
    pos = torch.arange(reslices.shape[-1], dtype=torch.float32)
    present = mask.sum(-1) >= 2
    first = torch.where(mask, pos, float("inf")).amin(-1)
    last = torch.where(mask, pos, float("-inf")).amax(-1)
    jumps = []
    for edge in (first, last):
        second = edge[:, 2:] - 2 * edge[:, 1:-1] + edge[:, :-2]
        ok = present[:, 2:] & present[:, 1:-1] & present[:, :-2]
        jumps.append(second[ok].abs())
    jumps = torch.cat(jumps)
    return jumps.mean().item() if len(jumps) else None


def stack_consistency(stacks, reg=None):
    """Consistency of whole subjects, stacks [S, K, H, W] in [-1, 1] with slice k at z-index k (see the module
    docstring for the keys); `reg` is the dataset's z regressor (None: no z keys)."""
    stacks = stacks.detach().float().cpu().clamp(-1, 1)
    if stacks.dim() != 4 or stacks.shape[1] < 3:
        raise ValueError(f"expected stacks [S, K >= 3, H, W], got {tuple(stacks.shape)}")
    s, k, h, w = stacks.shape
    a, b = stacks[:, :-1].reshape(-1, 1, h, w), stacks[:, 1:].reshape(-1, 1, h, w)
    out = {"adjacent_ssim": util.ssim(a, b).mean().item(), "adjacent_l1": (a - b).abs().mean().item() / 2}
    # Mid-sagittal reslice: column w/2 of every slice, [S, K, H]; mid-coronal: row h/2, [S, K, W].
    out["outline_jitter_sagittal"] = outline_jitter(stacks[..., w // 2])
    out["outline_jitter_coronal"] = outline_jitter(stacks[:, :, h // 2, :])
    if reg is not None:
        pred = predict_z(reg, stacks.reshape(-1, 1, h, w)).reshape(s, k)
        steps = pred[:, 1:] - pred[:, :-1]
        out["z_monotone"] = (steps > 0).float().mean().item()
        # The least-squares slope of prediction against slice number: every slice counts, not just the ends.
        zc = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
        out["z_spacing"] = ((pred - pred.mean(1, keepdim=True)) @ zc / zc.pow(2).sum()).mean().item()
    return out


def consistency_metrics(stacks, data_path, cache_dir=None, verbose=True):
    """`stack_consistency` of generated subjects [S, K, H, W] in [-1, 1], each key beside `<key>_real`: the same
    for the real validate subjects (those with every z-index)."""
    size = stacks.shape[-1]
    root = dataset.ensure_dataset(data_path, size)
    train = dataset.load_split(root, "train", size=size)
    val = dataset.load_split(root, "validate", size=size)
    if not train.conditional:
        raise UserError(f"{root}: slices carry no z-index, so they form no stacks")
    if stacks.shape[1] != train.num_z:
        raise ValueError(f"stacks have {stacks.shape[1]} slices, the data {train.num_z} z-indices")
    reg = z_regressor_for(root, size, cache_dir, verbose=verbose, train=train)
    real, subjects = val.stacks()
    metrics = {"n_subjects": len(stacks)}
    metrics.update({f"stack/{key}": v for key, v in stack_consistency(stacks, reg).items()})
    if len(subjects):
        real_metrics = stack_consistency(util.to_float(torch.from_numpy(real)), reg)
        metrics.update({f"stack/{key}_real": v for key, v in real_metrics.items()})
    metrics["n_subjects_real"] = len(subjects)
    return metrics


def report(metrics, out=None):
    """Print the metrics as indented JSON; also write them to `out` when given."""
    print(json.dumps(metrics, indent=2, default=str))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        util.save_json(metrics, out)
        print(f"wrote {out}")


def parse_args(argv):
    """The real-vs-real baseline command line."""
    p = util.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=None, help="dataset root (default: the embedded set, built once)")
    p.add_argument("--size", type=int, choices=list(dataset.SIZES), default=64, help="image size")
    p.add_argument("--n", type=int, default=256, help="real test slices scored as if they were samples")
    p.add_argument("--seed", type=util.seed_arg, default=0, help="seed of the subsets, pairs, patches and projections")
    p.add_argument("--segmenter", type=int, default=0, metavar="STEPS",
                   help="also train the tissue segmenter for STEPS steps on all real train pairs and on 2 real "
                        "subjects, and report its Dice on the test split (the real reference of train-on-"
                        "synthetic; needs seg maps); 0: skip")
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    """Score real test slices as samples: the values a perfect generator would reach."""
    args = parse_args(argv)
    if args.n < 2:
        raise UserError(f"--n {args.n}: need at least 2 slices")
    if args.segmenter < 0:
        raise UserError(f"--segmenter {args.segmenter}: steps must be 0 (skip) or more")
    util.check_json_path(args.out, "--out")
    root = dataset.ensure_dataset(args.data, args.size)
    test = dataset.load_split(root, "test", size=args.size)
    images, z = test.tensors()
    pick = _pick(len(images), args.n, np.random.default_rng(args.seed + 1))
    metrics = evaluate_samples(util.to_float(images[pick]), z[pick], root, seed=args.seed)
    metrics["samples"] = f"{len(pick)} real test slices"
    if args.segmenter:
        metrics.update(segmentation_reference(root, args.size, steps=args.segmenter, seed=args.seed))
    report(metrics, args.out)
    return 0


if __name__ == "__main__":
    util.run_cli(main)
