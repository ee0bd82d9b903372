"""Stage one: train the autoencoder (VAE with cyclical KL annealing, or VQ-VAE) whose latent space
stage two learns to generate, with L1 + perceptual + PatchGAN losses, conditioned on the z-index.

Commands:
    python prestage_train.py --model vae                      # demo preset on CPU, full on CUDA
    python prestage_train.py --model vqvae --preset full --data /path/to/OASIS --out runs/vq-full
    python prestage_train.py --model vae --preset smoke       # seconds, as the tests do
    python prestage_train.py --resume runs/stage1-demo        # continue a run exactly
    python prestage_train.py --eval-only --split test --ckpt runs/stage1-demo/best.pt
    torchrun --nproc_per_node=4 prestage_train.py --model vqvae --preset full --data /path/to/OASIS
    python prestage_train.py --model vae --dry-run            # print the resolved config and exit
    python prestage_train.py --model vqvae --crop-size 32 --crop-steps 850   # 32x32 crops before the GAN

Without --data the embedded MNI pseudo-cohort is built once into data/embedded_<size> and used.
The best checkpoint (best.pt) is chosen on validate SSIM; the test split is only for --eval-only.
"""
import json
import math

import torch
import torch.nn.functional as F

import dataset
import evaluation
import trainer as tr
import util
from model_discriminator import (LeCamAnchors, PatchDiscriminator, adaptive_gan_weight, build_perceptual_loss, d_loss,
                                 feature_matching_loss, focal_frequency_loss, generator_loss, r1_penalty)
from model_VAE import QUANTIZER_GRADIENTS, QUANTIZERS, build_autoencoder
from util import UserError

H = tr.Hyper
HYPERS = [
    H("size", 256, "image size the slices are resized to", "data", choices=(32, 64, 128, 256)),
    H("ch", 128, "base width of encoder/decoder", "model", low=1),
    H("ch_mult", [1, 2, 4, 4], "width multipliers per level, e.g. 1,2,4 (each level after the first halves the "
      "size)", "model"),
    H("num_res_blocks", 2, "ResBlocks per level", "model"),
    H("attn_resolutions", [32], "feature sizes with self-attention, e.g. 32 ('' for none)", "model"),
    H("z_channels", 4, "latent channels", "model", low=1),
    H("decoder_extra_block", True, "decoder gets num_res_blocks + 1 ResBlocks per level, as LDM; --no-... "
      "matches MONAI", "model"),
    H("decoder_top_blocks", 0, "more ResBlocks in the decoder's full-resolution level, where the finest texture is "
      "drawn (each about a twentieth of the demo autoencoder's arithmetic)", "model", low=0),
    H("dropout", 0.0, "dropout in ResBlocks", "model", high=1),
    H("quantizer", "vq", "vq: a learnt codebook of --n-embed vectors; fsq: finite scalar quantisation (Mentzer et "
      "al. 2024), each code channel rounded to one of --fsq-levels values (the codebook is their fixed grid, with "
      "no codebook loss; --n-embed and --embed-dim follow from the levels)", "model", applies="vqvae",
      choices=QUANTIZERS),
    H("fsq_levels", [8, 5, 5, 5], "with --quantizer fsq: the values per code channel, each at least 3 (8,5,5,5: "
      "1000 codes of 4 channels, the paper's choice near 1024)", "model", applies="vqvae"),
    H("n_embed", 1024, "VQ codebook size", "model", applies="vqvae", low=2),
    H("embed_dim", 4, "VQ code dimension", "model", applies="vqvae", low=1),
    H("vq_ema", True, "EMA codebook updates with dead-code restart", "model", applies="vqvae", arg="ema"),
    H("vq_grad", "ste", "how the decoder's gradient crosses the quantiser: ste (straight-through, copied as it is) "
      "or rotation (turned and scaled by the rotation from the encoder output onto its code: the rotation trick, "
      "Fifty et al. 2024)", "model", applies="vqvae", choices=QUANTIZER_GRADIENTS, arg="grad"),
    H("rec_loss", "l1", "pixel reconstruction loss (L1: sharper than L2 on MRI edges)", "loss", choices=("l1", "l2")),
    H("perceptual", "auto", "perceptual loss (auto: LPIPS-VGG if its weights are local, else MS-SSIM; ssim: "
      "1 - SSIM)", "loss",
      choices=("auto", "lpips", "msssim", "ssim", "none")),
    H("perceptual_weight", 1.0, "perceptual loss weight", "loss"),
    H("freq_weight", 0.0, "focal frequency loss weight (Jiang et al. 2021; spectral, no pretrained network; 0: off)",
      "loss", low=0),
    H("freq_alpha", 1.0, "focal frequency loss: exponent of the weight on each frequency's error (0: plain MSE)",
      "loss", low=0),
    H("disc_start", 50000, "step at which the PatchGAN is switched on (after the decoder has learnt the anatomy)",
      "loss"),
    H("disc_weight", 0.5, "GAN loss weight (times the adaptive weight); 0 disables the GAN", "loss"),
    H("disc_ch", 64, "discriminator base width", "loss", low=1),
    H("disc_layers", 3, "discriminator stride-2 layers (its receptive field)", "loss", low=1),
    H("disc_highpass", False, "the discriminator sees only the finest band (each image minus its 3x3 local mean), "
      "so it judges texture and not anatomy", "loss"),
    H("disc_lr_mult", 1.0, "discriminator learning rate as a multiple of --lr, on the same schedule (two time-scale "
      "update rule, Heusel et al. 2017)", "loss", low=1e-3),
    H("gan_loss", "hinge", "GAN loss", "loss", choices=("hinge", "nonsat")),
    H("disc_z", True, "the discriminator is told each slice's z-index (when the run is z-conditioned); --no-... "
      "judges every slice against all of them", "loss"),
    H("r1_weight", 0.0, "R1 gradient penalty weight gamma on real slices (the discriminator's loss gains gamma/2 "
      "times the mean ||grad_x D(x)||^2, D(x) the slice's mean patch logit, Mescheder et al. 2018; 0: off)", "loss",
      low=0),
    H("lecam_weight", 0.0, "LeCam regulariser weight (Tseng et al. 2021: the discriminator's logits pulled towards "
      "moving averages of the other side's; 0: off)", "loss", low=0),
    H("fm_weight", 0.0, "discriminator feature-matching loss weight (pix2pixHD; from disc_start, while the GAN is "
      "on; 0: off)", "loss", low=0),
    H("kl_weight", 1e-6, "maximum KL weight", "loss", applies="vae"),
    H("kl_cycles", 4, "number of cyclical KL annealing cycles", "loss", applies="vae", low=1),
    H("kl_ramp", 0.5, "fraction of each cycle spent ramping the KL weight up", "loss", applies="vae", high=1),
    *tr.loop_hypers(steps=150000, batch_size=16, lr=1e-4, warmup=1000, lr_schedule="cosine", log_every=50,
                    val_every=2000, ckpt_every=2000),
    H("val_max", 1120, "validate slices used per validation (0: all)", "loop"),
    H("crop_size", 0, "train on random CROP x CROP crops of the slices for the first --crop-steps steps (the "
      "autoencoder and the PatchGAN are convolutional; a 32x32 crop of a 64x64 slice makes a step ~2.4x cheaper "
      "on CPU); 0: off", "loop"),
    H("crop_steps", 0, "with --crop-size: how many steps from the start train on crops; the rest, and every "
      "validation, see whole slices", "loop"),
]
# full: the 256x256 recipe for a GPU. demo: a 0.8M-parameter model that trains in minutes on 2 CPU cores
# (64x64, narrow, lr 1e-3 at batch 4: in the time of 2000 steps at batch 8, 3400 smaller steps gave the VQ-VAE
# +0.009 test SSIM; the GAN from a quarter of the run on the finest band with feature matching, which brought the
# reconstructions' finest texture within 1.10x of real, docs/RESULTS.md). smoke: seconds, for the tests.
PRESETS = {
    "full": {},
    "demo": dict(size=64, ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, attn_resolutions=[], perceptual="ssim",
                 disc_start=850, disc_weight=0.1, disc_ch=32, disc_layers=2, disc_highpass=True, fm_weight=1.0,
                 kl_cycles=2, batch_size=4, lr=1e-3,
                 warmup=170, steps=3400, val_every=680, ckpt_every=680, val_max=192),
    "smoke": dict(size=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], n_embed=32,
                  perceptual="msssim", perceptual_weight=0.5, disc_start=4, disc_weight=0.1, disc_ch=16,
                  disc_layers=2, kl_cycles=2, batch_size=8, lr=1e-3, warmup=2, steps=8, log_every=2, val_every=4,
                  ckpt_every=4, val_max=32),
}


def kl_weight_at(step, total_steps, max_weight, cycles, ramp):
    """Cyclical KL annealing (Fu et al. 2019): within each of `cycles` equal periods the weight rises
    linearly from 0 to max_weight over the first `ramp` fraction, then stays at max_weight."""
    period = total_steps / max(cycles, 1)
    phase = (step % period) / period
    return max_weight * min(1.0, phase / ramp) if ramp > 0 else max_weight


def autoencoder_config(config):
    """The keyword config that rebuilds the autoencoder (stored in every checkpoint for stage two)."""
    model_cfg = tr.model_kwargs(HYPERS, config, config["model"])
    model_cfg.update(resolution=config["size"], in_channels=1, conditional=config["conditional"],
                     num_z=config["num_z"])
    return model_cfg


def gan_is_used(config):
    """Whether a run trains the PatchGAN at all: a positive weight, switched on before the last step."""
    return config["disc_weight"] > 0 and config["disc_start"] < config["steps"]


def load_autoencoder(path, device, flag="--ae"):
    """Rebuild a frozen stage-one model from its checkpoint; returns (model, checkpoint dict)."""
    ckpt = util.load_checkpoint(path, kind="stage1", flag=flag)
    where = f"{flag} {ckpt['_path']}"
    ckpt["config"] = tr.checked_file_config(ckpt, HYPERS, where, [
        ("data", lambda v: isinstance(v, (str, type(None))), "a folder path"),
        ("num_z", tr.is_whole, "a whole number >= 1")])
    if ckpt.get("model_type") not in ("vae", "vqvae") or not isinstance(ckpt.get("model_config"), dict):
        raise UserError(f"{where}: holds no model_type (vae or vqvae) and model_config of a stage-one model")
    # a model keyword newer than the file takes the value runs had before it existed, as the file's config does
    ckpt["model_config"] = {**tr.model_kwargs(HYPERS, {}, ckpt["model_type"]), **ckpt["model_config"]}
    if not isinstance(ckpt["config"].get("conditional"), bool) or ckpt["model_config"] != autoencoder_config(
            {**ckpt["config"], "model": ckpt["model_type"]}):
        # the two are written together from one config: a difference means the file was altered
        raise UserError(f"{where}: its model_config does not match its run config (the file was altered)")
    try:
        model = build_autoencoder(ckpt["model_type"], ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"{flag} {ckpt['_path']}: stage-one checkpoint does not match its model config "
                        f"({str(err).splitlines()[0][:160]})") from None
    return model.to(device).eval().requires_grad_(False), ckpt


def random_crops(images, size, generator):
    """One size x size crop of each slice of images [B, C, H, W], at offsets uniform over the slice."""
    n, _, h, w = images.shape
    tops = torch.randint(0, h - size + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (n,), generator=generator).tolist()
    return torch.stack([im[:, t: t + size, l: l + size] for im, t, l in zip(images, tops, lefts)])


class StageOneTask(tr.Task):
    """Autoencoder (+ optional PatchGAN) training step and validate-split metrics."""

    kind = "stage1"
    select_metric = ("val/ssim", "max")

    def __init__(self, config, device, val):
        super().__init__()
        self.config, self.device = config, device
        self.model_cfg = autoencoder_config(config)
        torch.manual_seed(config["seed"])
        self.model = build_autoencoder(config["model"], self.model_cfg).to(device)
        self.val_images, self.val_z = val
        # built after the model (the VGG of LPIPS draws random weights before loading its own)
        self.perceptual, self.perceptual_used = build_perceptual_loss(config["perceptual"])
        if self.perceptual is not None:
            self.perceptual = self.perceptual.to(device)
        self.models["model"] = self.model
        # fused: one kernel per step instead of a dozen per tensor (1.05x a demo step on CPU, docs/RESULTS.md)
        self.optimizers["opt"] = torch.optim.Adam(self.model.parameters(), lr=config["lr"], betas=(0.5, 0.9),
                                                  fused=True)
        self.use_gan = gan_is_used(config)
        if self.use_gan:
            self.disc = PatchDiscriminator(1, config["disc_ch"], config["disc_layers"],
                                           config["conditional"] and config["disc_z"], config["num_z"],
                                           highpass=config["disc_highpass"]).to(device)
            self.models["disc"] = self.disc
            if config["lecam_weight"] > 0:  # its anchors are saved and resumed with the run
                self.models["lecam"] = LeCamAnchors().to(device)
            self.optimizers["opt_disc"] = torch.optim.Adam(self.disc.parameters(), lr=config["lr"],
                                                           betas=(0.5, 0.9), fused=True)
            self.lr_scale["opt_disc"] = config["disc_lr_mult"]
            self.trained = ("model", "disc")

    def extra_state(self):
        return {"model_type": self.config["model"], "model_config": self.model_cfg}

    def reconstruction_loss(self, recon, x):
        """Pixel loss (L1 by default: sharper than L2 on MRI edges) plus the weighted perceptual loss."""
        rec = (recon - x).abs().mean() if self.config["rec_loss"] == "l1" else F.mse_loss(recon, x)
        perc = self.perceptual(recon, x).mean() if self.perceptual is not None else torch.zeros((), device=x.device)
        return rec, perc

    def train_step(self, batch, step):
        cfg = self.config
        images = batch[0]
        if step < cfg["crop_steps"]:  # offsets drawn from (seed, step): a resumed run crops as the first did
            offsets = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
            images = random_crops(images, cfg["crop_size"], offsets)
        x = util.to_float(images).to(self.device, non_blocking=True)
        z = batch[1].to(self.device) if cfg["conditional"] else None
        with util.autocast(self.device):
            out = self.nets["model"](x, z)
        recon = out["recon"].float()
        rec, perc = self.reconstruction_loss(recon, x)
        nll = rec + cfg["perceptual_weight"] * perc
        logs = {"loss/rec": rec.detach(), "loss/perc": perc.detach()}
        if cfg["freq_weight"] > 0:
            freq = focal_frequency_loss(recon, x, cfg["freq_alpha"]).mean()
            nll = nll + cfg["freq_weight"] * freq
            logs["loss/freq"] = freq.detach()
        loss = nll
        if cfg["model"] == "vae":
            kl_w = kl_weight_at(step, cfg["steps"], cfg["kl_weight"], cfg["kl_cycles"], cfg["kl_ramp"])
            kl = out["kl"].mean()
            loss = loss + kl_w * kl
            logs.update({"loss/kl": kl.detach(), "w/kl": torch.tensor(kl_w)})
        else:
            loss = loss + out["vq_loss"]
            logs.update({"loss/vq": out["vq_loss"].detach(), "vq/perplexity": out["stats"]["perplexity"],
                         "vq/usage_batch": out["stats"]["usage"]})
        gan_on = self.use_gan and step >= cfg["disc_start"]
        if gan_on:
            # Disc is neither trained nor weighted before disc_start: early adversarial gradients wreck
            # reconstructions while the decoder is still learning the anatomy.
            d_real, d_fake, real_features, d_reg = self.discriminator_pass(x, recon.detach(), z, logs)
            loss = loss + self.adversarial_loss(recon, z, nll, real_features, logs)
        opt = self.optimizers["opt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_on:
            logs["loss/d"] = self.discriminator_step(d_real, d_fake, d_reg)
        logs["loss/total"] = loss.detach()
        return logs

    def discriminator_pass(self, x, fake, z, logs):
        """The discriminator on real slices and detached reconstructions in one batch (its GroupNorm is per
        sample, so this equals two passes): logits for its own update, the real slices' features, which are
        also feature matching's targets (the same weights judge both before the update), and the weighted
        R1 + LeCam regularisers of the discriminator's loss. R1 differentiates this same pass with respect to
        the real slices: under DDP a second discriminator forward before the backward would break it."""
        cfg = self.config
        both_z = None if z is None else torch.cat([z, z])
        real = x.detach().requires_grad_(True) if cfg["r1_weight"] > 0 else x
        with util.autocast(self.device):
            logits, features = self.nets["disc"](torch.cat([real, fake]), both_z, features=True)
        real_logits, fake_logits = logits.float().chunk(2)
        reg = torch.zeros((), device=x.device)
        if cfg["r1_weight"] > 0:
            r1 = r1_penalty(real_logits, real)
            logs["loss/r1"] = r1.detach()
            reg = reg + cfg["r1_weight"] / 2 * r1
        if cfg["lecam_weight"] > 0:
            lecam = self.models["lecam"](real_logits, fake_logits)
            logs["loss/lecam"] = lecam.detach()
            reg = reg + cfg["lecam_weight"] * lecam
        return real_logits, fake_logits, [f[: len(x)].detach().float() for f in features], reg

    def adversarial_loss(self, recon, z, nll, real_features, logs):
        """The generator's weighted GAN (+ feature-matching) loss. The discriminator's weights are frozen
        for this pass: the generator needs gradients through it, not of it (they would be discarded). It
        calls the plain module: with no weight gradients there is nothing for DDP to reduce, and a second
        DDP forward before the discriminator's backward would break that backward's reduction."""
        cfg = self.config
        self.disc.requires_grad_(False)
        try:
            with util.autocast(self.device):
                logits, fake_features = self.disc(recon, z, features=True)
                g = generator_loss(logits.float(), cfg["gan_loss"])
        finally:
            self.disc.requires_grad_(True)
        w = adaptive_gan_weight(nll, g, self.model.decoder.last_layer) * cfg["disc_weight"]
        logs.update({"loss/g": g.detach(), "w/gan": w.detach()})
        adv = w * g
        if cfg["fm_weight"] > 0:
            fm = feature_matching_loss([f.float() for f in fake_features], real_features)
            logs["loss/fm"] = fm.detach()
            adv = adv + cfg["fm_weight"] * fm
        return adv

    def discriminator_step(self, real_logits, fake_logits, reg):
        """One PatchGAN update on real slices against the current reconstructions; returns its GAN loss (the
        regularisers `reg` are logged apart)."""
        loss = d_loss(self.config["gan_loss"], real_logits, fake_logits)
        opt = self.optimizers["opt_disc"]
        opt.zero_grad(set_to_none=True)
        (loss + reg).backward()
        opt.step()
        return loss.detach()

    @torch.no_grad()
    def validate(self, step, run_dir):
        metrics = evaluation.reconstruction_metrics(self.model, self.val_images, self.val_z, self.device,
                                                    self.config["val_max"])
        # eight slices spread over the first subject's z range: bottom to top of one brain
        n = min(len(self.val_images), 32)
        pick = torch.linspace(0, n - 1, min(n, 8)).round().long()  # no repeats when validate has < 8 slices
        images = self.val_images.index_select(0, pick)
        grid = evaluation.reconstruct(self.model, images, self.val_z.index_select(0, pick), self.device)
        util.save_image_grid(torch.cat([util.to_float(images), grid]), run_dir / "samples" / f"recon_{step:07d}.png")
        return metrics


def parse_args(argv):
    """The stage-one command line: a flag per hyperparameter (generated from HYPERS), plus the run flags."""
    p = util.ArgumentParser(description=__doc__)
    groups = tr.add_common_args(p, HYPERS, PRESETS)
    groups["model"].add_argument("--model", choices=["vae", "vqvae"], default=None, help="autoencoder kind (default vae)")
    groups["data"].add_argument("--data", default=None,
                                help="OASIS PNG root, NIfTI folder or image folder (default: embedded set)")
    e = p.add_argument_group("evaluate only")
    e.add_argument("--eval-only", action="store_true", help="report metrics of --ckpt on --split and exit")
    e.add_argument("--split", choices=["train", "validate", "test"], default="test", help="split for --eval-only")
    e.add_argument("--ckpt", default=None, help="checkpoint for --eval-only")
    e.add_argument("--out-json", default=None, help="with --eval-only: also write the metrics to this JSON file")
    return p.parse_args(argv)


def evaluate_only(args):
    """--eval-only: reconstruction metrics of a checkpoint on one split, printed as JSON."""
    if not args.ckpt:
        raise UserError("--eval-only needs --ckpt PATH")
    util.check_json_path(args.out_json, "--out-json")
    device = util.pick_device(args.device or "auto")
    model, ckpt = load_autoencoder(args.ckpt, device, flag="--ckpt")
    config = ckpt["config"]
    data_path = dataset.ensure_dataset(args.data or config.get("data"), config["size"])
    split = dataset.load_split(data_path, args.split, size=config["size"])
    images, z = split.tensors()
    metrics = evaluation.reconstruction_metrics(model, images, z, device, prefix=args.split)
    metrics.update(checkpoint=ckpt["_path"], step=ckpt.get("step"), split=args.split, slices=len(images))
    print(json.dumps(metrics, indent=2))
    if args.out_json:
        util.save_json(metrics, args.out_json)
    return 0


def print_data_notes(data_path, train, val, perceptual_used):
    """What the run trains on, and what loading converted, resized or skipped (16-bit, RGB, 4-D volumes, sizes)."""
    print(f"data: {data_path} ({len(train.images)} train / {len(val.images)} validate slices, "
          f"{'z-conditioned' if train.conditional else 'unconditional'}); {perceptual_used}")
    seen = set()
    for split in (train, val):
        for note in split.notes:
            if note not in seen:
                seen.add(note)
                print(f"note ({split.split}): {note}")


def check_run_keys(config, args):
    """The run settings that are not hyperparameters, as a resumed config.json may hold them."""
    where = f"--resume {args.resume}: config.json has" if args.resume else "--"
    if config["model"] not in ("vae", "vqvae"):
        raise UserError(f"{where} model {config['model']!r}, which must be vae or vqvae")
    if not isinstance(config.get("data"), (str, type(None))):
        raise UserError(f"{where} data {config['data']!r}, which must be a folder path")
    check_crops(config, args)
    check_fsq(config, args)
    size, layers = config["size"], config["disc_layers"]
    if gan_is_used(config) and PatchDiscriminator.logits_size(size, layers) < 1:
        fits = [n for n in range(1, layers) if PatchDiscriminator.logits_size(size, n) >= 1]
        source = " (in the run's config.json)" if args.resume else ""
        raise UserError(f"--disc-layers {layers}{source}: at most "
                        f"{max(fits, default=0)} stride-2 discriminator layers fit a {size}x{size} slice (each "
                        f"halves it, and the PatchGAN needs a 3x3 map after them)")


# flags of the learnt codebook, which finite scalar quantisation has no use for
VQ_ONLY = ("n_embed", "embed_dim", "vq_ema", "vq_grad")


def check_fsq(config, args):
    """With --quantizer fsq the codebook size and code channels follow from --fsq-levels (written into the config
    so that it says what the model is); the learnt codebook's flags are refused."""
    if config["model"] != "vqvae" or config["quantizer"] != "fsq":
        if config["model"] == "vqvae" and getattr(args, "fsq_levels", None) is not None and not args.resume:
            raise UserError("--fsq-levels: applies only with --quantizer fsq (this run learns a codebook of "
                            "--n-embed vectors)")
        return
    levels = config["fsq_levels"]
    if not levels or min(levels) < 3:
        source = " (in the run's config.json)" if args.resume else ""
        raise UserError(f"--fsq-levels {','.join(map(str, levels))}{source}: give at least one channel, each with "
                        f"at least 3 levels (with 2, the channel starts deep inside one level and barely trains)")
    given = [name for name in VQ_ONLY if getattr(args, name, None) is not None]
    if given and not args.resume:
        raise UserError(f"{tr.typed_flag(given[0], getattr(args, given[0]))}: does not apply with --quantizer fsq (its codebook is the "
                        f"grid of --fsq-levels, {math.prod(levels)} codes of {len(levels)} channels)")
    config["n_embed"], config["embed_dim"] = math.prod(levels), len(levels)


# the smallest image each perceptual loss takes: SSIM's 11x11 window (auto falls back to MS-SSIM); VGG16's four
# poolings before its last LPIPS layer
PERCEPTUAL_MIN_SIZE = {"ssim": 11, "msssim": 11, "auto": 16, "lpips": 16}


def check_crops(config, args):
    """--crop-size and --crop-steps: both or neither, and a crop the autoencoder and the PatchGAN can take."""
    crop, steps, size = config["crop_size"], config["crop_steps"], config["size"]
    source = " (in the run's config.json)" if args.resume else ""
    if (crop > 0) != (steps > 0):
        given = f"--crop-size {crop}" if crop else f"--crop-steps {steps}"
        other = "--crop-steps N (how many steps train on crops)" if crop else "--crop-size N"
        raise UserError(f"{given}{source}: does nothing without {other}")
    if not crop:
        return
    if steps >= config["steps"]:
        raise UserError(f"--crop-steps {steps}{source}: at or past --steps {config['steps']}, so the run would never "
                        f"train on whole slices; give fewer crop steps")
    factor = 2 ** (len(config["ch_mult"]) - 1)  # each level after the first halves the slice
    if crop >= size or crop % factor:
        raise UserError(f"--crop-size {crop}{source}: must be smaller than the {size}x{size} slice and a multiple of "
                        f"{factor} (the encoder halves it {len(config['ch_mult']) - 1} times)")
    window = PERCEPTUAL_MIN_SIZE.get(config["perceptual"], 0)
    if crop < window:
        least = -(-window // factor) * factor
        raise UserError(f"--crop-size {crop}{source}: smaller than the {window}x{window} the perceptual loss "
                        f"--perceptual {config['perceptual']} needs; give --crop-size {least} or more, or "
                        f"--perceptual none")
    layers = config["disc_layers"]
    if gan_is_used(config) and config["disc_start"] < steps and PatchDiscriminator.logits_size(crop, layers) < 1:
        raise UserError(f"--crop-size {crop}{source}: too small for the PatchGAN's {layers} stride-2 layers, which "
                        f"start at step {config['disc_start']}, before the crops end at {steps}")


EVAL_ONLY_FLAGS = {"eval_only", "ckpt", "split", "out_json", "device", "data"}


def check_command_flags(args):
    """Flags of --eval-only given to a training command, and training flags given to --eval-only: refused, not
    ignored (the checkpoint's own config decides the model and its data size)."""
    if args.eval_only:
        switches = ("overwrite", "dry_run")  # store_true: False unless given; every other flag is None unless given
        stray = [k for k, v in vars(args).items()
                 if k not in EVAL_ONLY_FLAGS and v is not None and not (k in switches and v is False)]
        if stray:
            raise UserError(f"{tr.typed_flag(stray[0], getattr(args, stray[0]))}: does not apply with --eval-only "
                            f"(the checkpoint's config decides the model and the slice size; --eval-only takes --ckpt, --split, "
                            f"--data, --device, --out-json)")
    else:
        stray = [f for f, v in (("--ckpt", args.ckpt), ("--out-json", args.out_json)) if v is not None]
        if stray:
            raise UserError(f"{stray[0]}: applies only with --eval-only (to evaluate a checkpoint); training "
                            f"starts from scratch, or continues a run with --resume RUN_DIR")


def main(argv=None):
    """Train (or resume, or evaluate) a stage-one autoencoder."""
    args = parse_args(argv)
    check_command_flags(args)
    if args.eval_only:
        return evaluate_only(args)
    config = tr.resolve_config(args, HYPERS, PRESETS, "stage1", exclude=("eval_only", "split", "ckpt", "out_json"))
    config.setdefault("model", "vae")
    check_run_keys(config, args)
    tr.check_applies(args, HYPERS, config["model"], "--model", resumed=bool(args.resume))
    rank, world, device = tr.setup_distributed(config.get("device") or "auto")
    if rank == 0:
        print(f"preset: {config['preset']}, model: {config['model']}")
    data_path = dataset.ensure_dataset(config.get("data"), config["size"])
    config["data"] = str(data_path)
    splits = dataset.load_splits(data_path, size=config["size"], splits=("train", "validate"))
    train, val = splits["train"], splits["validate"]
    config["conditional"], config["num_z"] = train.conditional, max(train.num_z, 1)
    task = tr.build_task(lambda: StageOneTask(config, device, val.tensors()), args)  # a dry run checks it too
    if args.dry_run:
        tr.print_config(config)
        return 0
    config["perceptual_used"] = task.perceptual_used  # recorded in config.json
    if rank == 0:
        print_data_notes(data_path, train, val, config["perceptual_used"])
        print(f"autoencoder: {sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M parameters")
    return tr.train_and_report(task, config, train.tensors(), args, rank, world, device)


if __name__ == "__main__":
    util.run_cli(main)
