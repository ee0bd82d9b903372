"""Adversarial and perceptual parts of the stage-one objective (VQGAN / LDM style).

- `PatchDiscriminator`: pix2pix PatchGAN (4x4 convs, LeakyReLU 0.2) with GroupNorm, optionally told the
  slice z-index through a sinusoidal embedding added to every hidden feature map; with highpass=True it sees
  only each image's finest band (`high_frequencies`), so it judges texture and cannot settle on anatomy.
- GAN losses: hinge and non-saturating (softplus) for the discriminator and the generator.
- `adaptive_gan_weight`: VQGAN's balance between reconstruction and adversarial gradients.
- `feature_matching_loss`: pix2pixHD's L1 between the discriminator's features of real and fake images.
- Discriminator regularisers: `r1_penalty` (Mescheder et al. 2018, the gradient norm on real images) and
  `LeCamAnchors` (Tseng et al. 2021, pulls the logits towards moving averages of the other side's).
- `focal_frequency_loss`: a spectral distance that needs no pretrained network (Jiang et al. 2021).
- `build_perceptual_loss`: an LPIPS-style VGG16 feature distance when torchvision and cached ImageNet
  weights are available locally (nothing is ever downloaded), else 1 - MS-SSIM, or nothing.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from module import ConditionEmbedding, all_reduce_sum, group_norm
from util import UserError, ms_ssim, ssim


# ----------------------------------------------------------------------------------------------
# PatchGAN discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN: images [B, C, H, W] -> patch logits [B, 1, h, w], each judging a ~70px receptive field.

    GroupNorm replaces pix2pix's BatchNorm: real and fake batches go through separately and batches
    are small, so batch statistics would differ between the two passes (and between DDP replicas)
    and leak batch composition into the judgement; GroupNorm is per-sample and identical in train/eval.
    """

    def __init__(self, in_channels=1, ch=64, n_layers=3, conditional=False, num_z=32, highpass=False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.config = dict(in_channels=in_channels, ch=ch, n_layers=n_layers, conditional=bool(conditional),
                           num_z=num_z, highpass=bool(highpass))
        self.conditional = bool(conditional)
        self.highpass = bool(highpass)
        widths = [ch * min(2**i, 8) for i in range(n_layers + 1)]
        # n_layers stride-2 convs, then one stride-1 conv, as in pix2pix
        strides = [2] * n_layers + [1]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        prev = in_channels
        for i, (width, stride) in enumerate(zip(widths, strides)):
            # the first layer has no norm (pix2pix): normalising raw pixels throws away contrast
            self.convs.append(nn.Conv2d(prev, width, 4, stride, 1, bias=i == 0))
            self.norms.append(nn.Identity() if i == 0 else group_norm(width))
            prev = width
        self.head = nn.Conv2d(prev, 1, 4, 1, 1)
        cond_dim = 4 * ch
        self.z_embed = ConditionEmbedding(cond_dim, null_token=True) if self.conditional else None
        self.z_proj = nn.ModuleList([nn.Linear(cond_dim, w) for w in widths]) if self.conditional else None
        self.apply(_pix2pix_init)

    @staticmethod
    def logits_size(size, n_layers):
        """Side of the patch-logit map for a size x size image: each stride-2 layer (4x4, padding 1) halves it
        (rounding down), the stride-1 layer and the head take one off each; below 1 the network does not run."""
        for _ in range(n_layers):
            size //= 2
        return size - 2

    def forward(self, x, z=None, features=False):
        """Patch logits; with features=True, (logits, [the activation after each hidden layer])."""
        cond = self._condition(z, x) if self.conditional else None
        h, taps = (high_frequencies(x) if self.highpass else x), []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            if cond is not None:
                h = h + self.z_proj[i](cond)[:, :, None, None]
            h = F.leaky_relu(h, 0.2)
            taps.append(h)
        return (self.head(h), taps) if features else self.head(h)

    def _condition(self, z, x):
        """Embedding [B, 4*ch] of z-indices (None/int/tensor; -1 = unknown)."""
        if z is None:
            z = -1
        if not torch.is_tensor(z):
            z = torch.full((x.shape[0],), int(z), dtype=torch.long)
        z = z.to(device=x.device, dtype=torch.long).reshape(-1).expand(x.shape[0])
        return F.silu(self.z_embed(z))


def high_frequencies(x):
    """The finest band of x: x minus its 3x3 local mean (edges averaged over the pixels inside), so a constant
    image maps to zero. A discriminator that sees only this judges texture, not anatomy."""
    return x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _pix2pix_init(module):
    """N(0, 0.02) convolutions and N(1, 0.02) norm scales, as in pix2pix/VQGAN discriminators."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# GAN losses (means over all patch logits)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def nonsaturating_d_loss(logits_real, logits_fake):
    """Discriminator cross-entropy 0.5 * (mean softplus(-D(real)) + mean softplus(D(fake)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake, kind="hinge"):
    """Generator's adversarial loss: -mean D(fake) ('hinge') or mean softplus(-D(fake)) ('nonsat')."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "nonsat":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected 'hinge' or 'nonsat'")


D_LOSSES = {"hinge": hinge_d_loss, "nonsat": nonsaturating_d_loss}


def d_loss(kind, logits_real, logits_fake):
    """Discriminator loss of the given kind ('hinge' or 'nonsat') on real and fake logits."""
    if kind not in D_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; expected one of {sorted(D_LOSSES)}")
    return D_LOSSES[kind](logits_real, logits_fake)


def feature_matching_loss(fake_features, real_features):
    """pix2pixHD's discriminator feature matching: the mean over layers of the L1 distance between the
    discriminator's activations on fakes and on (detached) real images."""
    return torch.stack([(f - r.detach()).abs().mean() for f, r in zip(fake_features, real_features)]).mean()


def r1_penalty(real_logits, real_images):
    """R1 (Mescheder et al. 2018): the mean over the batch of ||d D(x) / d x||^2 on real images, where D(x) is
    each image's mean patch logit (the scale the GAN losses see; a penalty on the summed logits, as StyleGAN's,
    would be (h w)^2 times larger, so its gamma values do not carry over). real_images must require grad and
    real_logits come from them; the graph is kept so that the penalty trains the discriminator."""
    grad, = torch.autograd.grad(real_logits.mean(dim=(1, 2, 3)).sum(), real_images, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


class LeCamAnchors(nn.Module):
    """LeCam regulariser (Tseng et al. 2021) and its anchors: moving averages of the discriminator's mean logit
    on real and on fake images (decay 0.99 as the authors'; zero-debiased, where their code instead averages with
    decay 0 for its first steps). The penalty
    mean relu(D(real) - anchor_fake)^2 + mean relu(anchor_real - D(fake))^2 keeps the two sides' logits from
    drifting apart, which is how a discriminator overfits a small training set. A module so that the anchors
    are saved with the run and a resumed run goes on from them."""

    def __init__(self, decay=0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("sums", torch.zeros(2))  # biased averages of (real, fake)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, real_logits, fake_logits):
        means = torch.stack([real_logits.mean(), fake_logits.mean()]).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank keeps the same anchors
            means = all_reduce_sum(means) / torch.distributed.get_world_size()
        self.sums.mul_(self.decay).add_(means, alpha=1 - self.decay)
        self.count += 1

    def anchors(self):
        """(real, fake) averages, divided by 1 - decay^count so that the first steps are not pulled to 0 (zero
        before any update); on the device, with no host sync."""
        debias = 1 - torch.full_like(self.sums, self.decay).pow(self.count)
        return torch.where(self.count > 0, self.sums / debias.clamp_min(1e-12), torch.zeros_like(self.sums))

    def forward(self, real_logits, fake_logits):
        """Update the anchors with this batch, then the penalty on it."""
        self.update(real_logits.detach(), fake_logits.detach())
        anchor_real, anchor_fake = self.anchors()
        return F.relu(real_logits - anchor_fake).square().mean() + F.relu(anchor_real - fake_logits).square().mean()


def adaptive_gan_weight(rec_loss, g_loss, last_layer, max_weight=1e4, eps=1e-4):
    """VQGAN's ||d rec_loss / d W|| / (||d g_loss / d W|| + eps) at the decoder's last layer W, clamped, detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------
# Spectral loss


def focal_frequency_loss(recon, target, alpha=1.0):
    """Focal frequency loss (Jiang et al. 2021) per sample [B].

    With D = FFT2(recon) - FFT2(target) (orthonormal, per channel), the loss is the mean over frequencies
    of w * |D|^2, where w = |D|^alpha scaled by its maximum over each image's spectrum and detached: the
    frequencies reconstructed worst weigh most. With alpha = 0 (w = 1) it equals the pixel MSE (Parseval).
    """
    diff = torch.fft.fft2(recon.float(), norm="ortho") - torch.fft.fft2(target.float(), norm="ortho")
    dist = diff.real.square() + diff.imag.square()
    weight = dist.sqrt().pow(alpha).detach()
    weight = weight / weight.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12)
    return (weight * dist).mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Perceptual losses: both map images in [-1, 1] to a per-sample loss [B] (average it yourself)


class PerceptualUnavailable(RuntimeError):
    """The LPIPS-style loss cannot be built on this machine (no torchvision or no cached weights)."""


VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 file name in the hub cache
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_vgg16_features():
    """torchvision's VGG16 `features` with ImageNet weights from the local hub cache; (module, weights path)."""
    try:
        import torchvision  # lazily: on some CPU builds its import raises
    except Exception as err:  # noqa: BLE001 - any import failure means "not available here"
        message = str(err).strip().splitlines()
        raise PerceptualUnavailable(f"torchvision import failed: {type(err).__name__}: "
                                    f"{message[-1] if message else ''}") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_WEIGHTS_FILE
    if not path.is_file():
        raise PerceptualUnavailable(f"VGG16 ImageNet weights not in the local torch hub cache ({path}); "
                                    f"nothing is downloaded")
    vgg = torchvision.models.vgg16(weights=None)
    try:
        vgg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - a corrupt cache file is also "not available"
        raise PerceptualUnavailable(f"cannot load VGG16 weights {path}: {err}") from None
    return vgg.features, path


class VGGFeatureDistance(nn.Module):
    """LPIPS-style distance without LPIPS's learned calibration: per-sample [B].

    Features are taken at the ReLU before each max-pool (relu1_2 ... relu5_3 for VGG16), unit-normalised
    over channels; squared differences are summed over channels, averaged over positions, then averaged
    over the layers. The VGG weights are frozen.
    """

    def __init__(self, features):
        super().__init__()
        self.features = features.eval().requires_grad_(False)
        layers = list(features)
        self.taps = {i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU)
                     and (i + 1 == len(layers) or isinstance(layers[i + 1], nn.MaxPool2d))}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode=True):
        # the frozen network stays in eval mode whatever the surrounding model does
        return super().train(False)

    def _tapped(self, x):
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale -> the RGB VGG was trained on
        h = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            # an in-place ReLU would overwrite the tapped tensor of the previous conv
            h = F.relu(h) if isinstance(layer, nn.ReLU) else layer(h)
            if i in self.taps:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x, y):
        per_layer = [(fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2)) for fx, fy in zip(self._tapped(x), self._tapped(y))]
        return torch.stack(per_layer, dim=1).mean(dim=1)


class SSIMLoss(nn.Module):
    """1 - SSIM (util.ssim: 11x11 Gaussian window, data range 2 for [-1, 1] images) per sample [B].

    Single-scale SSIM weighs the finest structure that MS-SSIM at 64x64 (three scales, the finest at
    7% weight) mostly ignores; it is also the metric stage one is selected and reported on."""

    def forward(self, x, y):
        return 1.0 - ssim(x, y, data_range=2.0)


class MSSSIMLoss(nn.Module):
    """1 - MS-SSIM (util.ms_ssim, data range 2 for [-1, 1] images) per sample [B]."""

    def forward(self, x, y):
        return 1.0 - ms_ssim(x, y, data_range=2.0)


def _lpips_like():
    features, path = _load_vgg16_features()
    description = (f"perceptual: LPIPS-style VGG16 distance (ImageNet weights {path}; LPIPS's learned linear "
                   f"calibration weights are not available offline, so unit-normalised feature differences "
                   f"are summed over channels, averaged over positions and averaged over the 5 layers "
                   f"relu1_2..relu5_3; per-sample loss [B])")
    return VGGFeatureDistance(features), description


MSSSIM_DESCRIPTION = "perceptual: MS-SSIM (1 - util.ms_ssim per sample [B], no pretrained weights needed)"


def build_perceptual_loss(kind="auto"):
    """(loss module or None, description). kind: 'auto' (LPIPS-style, else MS-SSIM), 'lpips', 'msssim', 'ssim', 'none'.

    The module takes two image batches in [-1, 1] and returns a per-sample loss [B]. An explicit 'lpips'
    that cannot be built raises util.UserError saying why.
    """
    if kind == "none":
        return None, "perceptual: none"
    if kind == "msssim":
        return MSSSIMLoss(), MSSSIM_DESCRIPTION
    if kind == "ssim":
        return SSIMLoss(), "perceptual: SSIM (1 - util.ssim per sample [B], 11x11 Gaussian window)"
    if kind == "lpips":
        try:
            return _lpips_like()
        except PerceptualUnavailable as err:
            raise UserError(f"--perceptual lpips: unavailable ({err}); use --perceptual msssim or auto") from None
    if kind == "auto":
        try:
            return _lpips_like()
        except PerceptualUnavailable as err:
            return MSSSIMLoss(), f"perceptual: MS-SSIM (LPIPS unavailable: {err}; 1 - util.ms_ssim per sample [B])"
    raise ValueError(f"unknown perceptual loss {kind!r}; expected 'auto', 'lpips', 'msssim', 'ssim' or 'none'")
