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

Without --data the embedded MNI pseudo-cohort is built once into data/embedded_<size> and used.
The best checkpoint (best.pt) is chosen on validate SSIM; the test split is only for --eval-only.
"""
import argparse
import json

import torch
import torch.nn.functional as F

import dataset
import trainer as tr
import util
from model_discriminator import PatchDiscriminator, adaptive_gan_weight, build_perceptual_loss, d_loss, generator_loss
from model_VAE import build_autoencoder
from util import UserError

# Values every preset sets; any one can be overridden by its flag (--ch-mult 1,2,4 etc.).
# demo: a 0.8M-parameter model sized for 2 CPU cores. In equal-budget trials (400 steps of batch 16, VQ-VAE,
# validate SSIM) each of these beat the earlier recipe (0.812): SSIM instead of MS-SSIM as the perceptual
# term (0.837; at 64x64 MS-SSIM puts 7% of its weight on the finest scale), lr 1e-3 (0.829), 1024 codes
# (0.835), all three (0.864), and batch 8 for twice the steps at the same images (0.880).
PRESETS = {
    "full": dict(lr_schedule="cosine", size=256, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[32], z_channels=4,
                 decoder_extra_block=True,
                 dropout=0.0, n_embed=1024, embed_dim=4, vq_ema=True, batch_size=16, lr=1e-4, steps=150000,
                 warmup=1000, disc_start=50000, disc_weight=0.5, disc_ch=64, disc_layers=3, gan_loss="hinge",
                 perceptual="auto", perceptual_weight=1.0, rec_loss="l1", kl_weight=1e-6, kl_cycles=4,
                 kl_ramp=0.5, log_every=50, val_every=2000, ckpt_every=2000, val_max=1120, seed=0),
    "demo": dict(lr_schedule="cosine", size=64, ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, attn_resolutions=[], z_channels=4,
                 decoder_extra_block=True,
                 dropout=0.0, n_embed=1024, embed_dim=4, vq_ema=True, batch_size=8, lr=1e-3, steps=2000,
                 warmup=100, disc_start=1500, disc_weight=0.1, disc_ch=32, disc_layers=2, gan_loss="hinge",
                 perceptual="ssim", perceptual_weight=1.0, rec_loss="l1", kl_weight=1e-6, kl_cycles=2,
                 kl_ramp=0.5, log_every=50, val_every=400, ckpt_every=400, val_max=192, seed=0),
    "smoke": dict(lr_schedule="cosine", size=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], z_channels=4,
                  decoder_extra_block=True,
                  dropout=0.0, n_embed=32, embed_dim=4, vq_ema=True, batch_size=8, lr=1e-3, steps=8,
                  warmup=2, disc_start=4, disc_weight=0.1, disc_ch=16, disc_layers=2, gan_loss="hinge",
                  perceptual="msssim", perceptual_weight=0.5, rec_loss="l1", kl_weight=1e-6, kl_cycles=2,
                  kl_ramp=0.5, log_every=2, val_every=4, ckpt_every=4, val_max=32, seed=0),
}
MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "dropout")


def kl_weight_at(step, total_steps, max_weight, cycles, ramp):
    """Cyclical KL annealing (Fu et al. 2019): within each of `cycles` equal periods the weight rises
    linearly from 0 to max_weight over the first `ramp` fraction, then stays at max_weight."""
    period = total_steps / max(cycles, 1)
    phase = (step % period) / period
    return max_weight * min(1.0, phase / ramp) if ramp > 0 else max_weight


def autoencoder_config(config, conditional):
    """The keyword config that rebuilds the autoencoder (stored in every checkpoint for stage two)."""
    model_cfg = {k: config[k] for k in MODEL_KEYS}
    model_cfg["decoder_extra_block"] = config.get("decoder_extra_block", True)  # runs made before the flag had it
    model_cfg.update(resolution=config["size"], in_channels=1, conditional=conditional, num_z=config["num_z"])
    if config["model"] == "vqvae":
        model_cfg.update(n_embed=config["n_embed"], embed_dim=config["embed_dim"], ema=config["vq_ema"])
    return model_cfg


class StageOneTask(tr.Task):
    """Autoencoder (+ optional PatchGAN) training step and validate-split metrics."""

    kind = "stage1"
    select_metric = ("val/ssim", "max")

    def __init__(self, config, device, val, world):
        super().__init__()
        self.config, self.device = config, device
        self.conditional = config["conditional"]
        self.model_cfg = autoencoder_config(config, self.conditional)
        torch.manual_seed(config["seed"])
        self.model = build_autoencoder(config["model"], self.model_cfg).to(device)
        self.val_images, self.val_z = val
        self.perceptual, config["perceptual_used"] = build_perceptual_loss(config["perceptual"])
        if self.perceptual is not None:
            self.perceptual = self.perceptual.to(device)
        self.models["model"] = self.model
        self.optimizers["opt"] = torch.optim.Adam(self.model.parameters(), lr=config["lr"], betas=(0.5, 0.9))
        self.use_gan = config["disc_weight"] > 0 and config["disc_start"] < config["steps"]
        if self.use_gan:
            self.disc = PatchDiscriminator(1, config["disc_ch"], config["disc_layers"], self.conditional,
                                           config["num_z"]).to(device)
            self.models["disc"] = self.disc
            self.optimizers["opt_disc"] = torch.optim.Adam(self.disc.parameters(), lr=config["lr"], betas=(0.5, 0.9))
        self.model_train, self.disc_train = self.model, getattr(self, "disc", None)
        if world > 1:
            # find_unused_parameters: the z null-token is unused when every slice has a z-index.
            ddp = torch.nn.parallel.DistributedDataParallel
            self.model_train = ddp(self.model, find_unused_parameters=True)
            if self.use_gan:
                self.disc_train = ddp(self.disc, find_unused_parameters=True)
        if config.get("compile"):
            self.model_train = torch.compile(self.model_train)

    def extra_state(self):
        return {"model_type": self.config["model"], "model_config": self.model_cfg}

    def reconstruction_loss(self, recon, x):
        """Pixel loss (L1 by default: sharper than L2 on MRI edges) plus the weighted perceptual loss."""
        rec = (recon - x).abs().mean() if self.config["rec_loss"] == "l1" else F.mse_loss(recon, x)
        perc = self.perceptual(recon, x).mean() if self.perceptual is not None else torch.zeros((), device=x.device)
        return rec, perc

    def train_step(self, batch, step):
        cfg = self.config
        x = dataset.to_float(batch[0]).to(self.device, non_blocking=True)
        z = batch[1].to(self.device) if self.conditional else None
        lr = tr.lr_at(step, cfg)
        for opt in self.optimizers.values():
            tr.set_lr(opt, lr)
        with util.autocast(self.device):
            out = self.model_train(x, z)
        recon = out["recon"].float()
        rec, perc = self.reconstruction_loss(recon, x)
        nll = rec + cfg["perceptual_weight"] * perc
        logs = {"loss/rec": rec.detach(), "loss/perc": perc.detach(), "lr": torch.tensor(lr)}
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
            with util.autocast(self.device):
                g = generator_loss(self.disc_train(recon, z).float(), cfg["gan_loss"])
            w = adaptive_gan_weight(nll, g, self.model.decoder.last_layer) * cfg["disc_weight"]
            loss = loss + w * g
            logs.update({"loss/g": g.detach(), "w/gan": w.detach()})
        opt = self.optimizers["opt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_on:
            logs["loss/d"] = self.discriminator_step(x, recon.detach(), z)
        logs["loss/total"] = loss.detach()
        return logs

    def discriminator_step(self, x, fake, z):
        """One PatchGAN update on real slices against the current reconstructions."""
        with util.autocast(self.device):
            real_logits = self.disc_train(x, z).float()
            fake_logits = self.disc_train(fake, z).float()
        loss = d_loss(self.config["gan_loss"], real_logits, fake_logits)
        opt = self.optimizers["opt_disc"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    @torch.no_grad()
    def validate(self, step, run_dir):
        metrics = reconstruction_metrics(self.model, self.val_images, self.val_z, self.device, self.config)
        # eight slices spread over the first subject's z range: bottom to top of one brain
        pick = torch.linspace(0, min(len(self.val_images), 32) - 1, 8).round().long()
        images = self.val_images.index_select(0, pick)
        grid = reconstruct(self.model, images, self.val_z.index_select(0, pick), self.device, self.conditional)
        util.save_image_grid(torch.cat([dataset.to_float(images), grid]), run_dir / "samples" / f"recon_{step:07d}.png")
        return metrics


@torch.no_grad()
def reconstruct(model, images_u8, z, device, conditional, batch_size=64):
    """Deterministic reconstructions (posterior mean / nearest codes) of uint8 images, on the CPU."""
    outs = []
    for i in range(0, len(images_u8), batch_size):
        x = dataset.to_float(images_u8[i:i + batch_size]).to(device)
        zz = z[i:i + batch_size].to(device) if conditional else None
        with util.autocast(device):
            if getattr(model, "kind", "") == "vae":
                recon = model.decode(model.encode(x, zz).mode(), zz)
            else:
                recon = model(x, zz)["recon"]
        outs.append(recon.float().clamp(-1, 1).cpu())
    return torch.cat(outs)


@torch.no_grad()
def reconstruction_metrics(model, images_u8, z, device, config, prefix="val"):
    """SSIM, MS-SSIM and PSNR of reconstructions over a split (first val_max slices), plus codebook usage."""
    n = min(len(images_u8), config.get("val_max") or len(images_u8))
    images_u8, z = images_u8[:n], z[:n]
    recon = reconstruct(model, images_u8, z, device, config["conditional"])
    x = dataset.to_float(images_u8)
    metrics = {f"{prefix}/ssim": util.ssim(recon, x).mean().item(), f"{prefix}/psnr": util.psnr(recon, x).mean().item(),
               f"{prefix}/ms_ssim": util.ms_ssim(recon, x).mean().item()}
    if getattr(model, "kind", "") == "vqvae":
        metrics.update(codebook_usage(model, images_u8, z, device, config["conditional"], prefix))
    return metrics


@torch.no_grad()
def codebook_usage(model, images_u8, z, device, conditional, prefix="val", batch_size=64):
    """Fraction of codes used and code perplexity over a whole split (not a single batch)."""
    counts = torch.zeros(model.n_embed)
    for i in range(0, len(images_u8), batch_size):
        x = dataset.to_float(images_u8[i:i + batch_size]).to(device)
        zz = z[i:i + batch_size].to(device) if conditional else None
        idx = model.encode_indices(x, zz).flatten().cpu()
        counts += torch.bincount(idx, minlength=model.n_embed).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return {f"{prefix}/codebook_usage": (counts > 0).float().mean().item(), f"{prefix}/perplexity": perplexity}


def parse_args(argv):
    """The stage-one command line: every preset value has a flag of its own."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_common_args(p, PRESETS)
    p.add_argument("--model", choices=["vae", "vqvae"], default=None, help="autoencoder kind (default vae)")
    p.add_argument("--data", default=None, help="OASIS PNG root, NIfTI folder or image folder (default: embedded set)")
    p.add_argument("--size", type=int, choices=[32, 64, 128, 256], default=None, help="image size the slices are resized to")
    p.add_argument("--ch", type=int, default=None, help="base width of encoder/decoder")
    p.add_argument("--ch-mult", type=tr.int_list, default=None, help="width multipliers per level, e.g. 1,2,4 (each level after the first halves the size)")
    p.add_argument("--num-res-blocks", type=int, default=None, help="ResBlocks per level")
    p.add_argument("--attn-resolutions", type=tr.int_list, default=None, help="feature sizes with self-attention, e.g. 32 ('' for none)")
    p.add_argument("--decoder-extra-block", action=argparse.BooleanOptionalAction, default=None,
                   help="decoder gets num_res_blocks + 1 ResBlocks per level, as LDM (default); --no-... matches MONAI")
    p.add_argument("--z-channels", type=int, default=None, help="latent channels (VAE)")
    p.add_argument("--dropout", type=float, default=None, help="dropout in ResBlocks")
    p.add_argument("--n-embed", type=int, default=None, help="VQ codebook size")
    p.add_argument("--embed-dim", type=int, default=None, help="VQ code dimension")
    p.add_argument("--vq-ema", action=argparse.BooleanOptionalAction, default=None, help="EMA codebook updates with dead-code restart")
    p.add_argument("--warmup", type=int, default=None, help="LR warm-up steps")
    p.add_argument("--disc-start", type=int, default=None, help="step at which the PatchGAN is switched on")
    p.add_argument("--disc-weight", type=float, default=None, help="GAN loss weight (times the adaptive weight); 0 disables the GAN")
    p.add_argument("--disc-ch", type=int, default=None, help="discriminator base width")
    p.add_argument("--disc-layers", type=int, default=None, help="discriminator stride-2 layers")
    p.add_argument("--gan-loss", choices=["hinge", "nonsat"], default=None, help="GAN loss")
    p.add_argument("--perceptual", choices=["auto", "lpips", "msssim", "ssim", "none"], default=None, help="perceptual loss (auto: LPIPS-VGG if its weights are local, else MS-SSIM; ssim: 1 - SSIM, the demo choice)")
    p.add_argument("--perceptual-weight", type=float, default=None, help="perceptual loss weight")
    p.add_argument("--rec-loss", choices=["l1", "l2"], default=None, help="pixel reconstruction loss")
    p.add_argument("--kl-weight", type=float, default=None, help="maximum KL weight (VAE)")
    p.add_argument("--kl-cycles", type=int, default=None, help="number of cyclical KL annealing cycles")
    p.add_argument("--kl-ramp", type=float, default=None, help="fraction of each cycle spent ramping the KL weight up")
    p.add_argument("--val-max", type=int, default=None, help="validate slices used per validation (0: all)")
    p.add_argument("--eval-only", action="store_true", help="report metrics of --ckpt on --split and exit")
    p.add_argument("--split", choices=["train", "validate", "test"], default="test", help="split for --eval-only")
    p.add_argument("--ckpt", default=None, help="checkpoint for --eval-only")
    p.add_argument("--out-json", default=None, help="with --eval-only: also write the metrics to this JSON file")
    return p.parse_args(argv)


def evaluate_only(args):
    """--eval-only: reconstruction metrics of a checkpoint on one split, printed as JSON."""
    if not args.ckpt:
        raise UserError("--eval-only needs --ckpt PATH")
    device = util.pick_device(args.device or "auto")
    model, ckpt = util.load_autoencoder(args.ckpt, device, flag="--ckpt")
    config = dict(ckpt["config"], val_max=0)
    data_path = dataset.ensure_dataset(args.data or config.get("data"), config["size"])
    split = dataset.load_split(data_path, args.split, size=config["size"])
    images, z = split.tensors()
    metrics = reconstruction_metrics(model, images, z, device, config, prefix=args.split)
    metrics.update(checkpoint=ckpt["_path"], step=ckpt["step"], split=args.split, slices=len(images))
    print(json.dumps(metrics, indent=2))
    if args.out_json:
        util.save_json(metrics, args.out_json)
    return 0


def main(argv=None):
    """Train (or resume, or evaluate) a stage-one autoencoder."""
    args = parse_args(argv)
    if args.eval_only:
        return evaluate_only(args)
    config = tr.resolve_config(args, PRESETS, "stage1", exclude=("eval_only", "split", "ckpt", "out_json"))
    config.setdefault("model", "vae")
    rank, world, device = tr.setup_distributed(config.get("device") or "auto")
    if rank == 0:
        print(f"preset: {config['preset']}, model: {config['model']}")
    data_path = dataset.ensure_dataset(config.get("data"), config["size"])
    config["data"] = str(data_path)
    splits = dataset.load_splits(data_path, size=config["size"], splits=("train", "validate"))
    train, val = splits["train"], splits["validate"]
    config["conditional"], config["num_z"] = train.conditional, max(train.num_z, 1)
    if args.dry_run:
        tr.print_config(config)
        return 0
    task = StageOneTask(config, device, val.tensors(), world)
    if rank == 0:
        print(f"data: {data_path} ({len(train.images)} train / {len(val.images)} validate slices, "
              f"{'z-conditioned' if train.conditional else 'unconditional'}); {config['perceptual_used']}")
        seen = set()  # what loading converted, resized or skipped (16-bit, RGB, 4-D volumes, other sizes)
        for split in (train, val):
            for note in split.notes:
                if note not in seen:
                    seen.add(note)
                    print(f"note ({split.split}): {note}")
        print(f"autoencoder: {sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M parameters")
    return tr.train_and_report(task, config, train.tensors(), args, rank, world, device)


if __name__ == "__main__":
    util.run_cli(main)
