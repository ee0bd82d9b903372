"""Stage two (b): latent diffusion. A DDPM UNet learns the latents of a frozen stage-one autoencoder,
conditioned on the z-index with classifier-free guidance; sampled latents are decoded to slices.

Commands:
    python stable_diffusion.py train --ae runs/stage1-demo/best.pt                 # demo preset on CPU
    python stable_diffusion.py train --ae runs/vq-full/best.pt --preset full --out runs/ldm-full
    python stable_diffusion.py train --resume runs/ldm-demo
    python stable_diffusion.py sample --ckpt runs/ldm-demo/best.pt --n 2 --z 0..31 --sampler ddim \
        --steps 50 --guidance 2 --seed 0 --out samples.png --gif process.gif
    python stable_diffusion.py evaluate --ckpt runs/ldm-demo/best.pt --sampler ddim --steps 50
    torchrun --nproc_per_node=4 stable_diffusion.py train --ae runs/vq-full/best.pt --preset full

Objective: v-prediction (Salimans & Ho 2022) by default. With eps-prediction the x0 estimate
(x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies the network's eps error by up to 1/sqrt(abar_T) ~ 156
at the first sampling step; on the demo a short eps-trained model then sampled latents with 10x the data's
std (measured), while v-prediction gives x0 directly at high noise. `--objective eps` remains available.

Which latent is diffused: for a VAE, the posterior mean; for a VQ-VAE, the *quantised* code vectors
(what its decoder was trained on), and samples are snapped back to the nearest code before decoding.
Latents are multiplied by a scale factor (1 / std of the training latents, stored in the checkpoint)
so the diffusion sees unit variance, and divided by it again before decoding.
"""
import argparse
import time
from pathlib import Path

import torch

import trainer as tr
import util
from model_diffusion import LatentUNet, NoiseSchedule, diffusion_loss, sample
from util import UserError

PRESETS = {
    "full": dict(lr_schedule="constant", model_channels=192, channel_mult=[1, 2, 4], num_res_blocks=2, attn_resolutions=[16, 8], heads=8,
                 dropout=0.0, schedule="linear", timesteps=1000, objective="v", p_uncond=0.1,
                 batch_size=64, lr=1e-4, warmup=1000, ema_decay=0.9999, steps=200000, log_every=100,
                 val_every=5000, ckpt_every=5000, sample_steps=50, seed=0),
    "demo": dict(lr_schedule="cosine", model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8, 4], heads=4,
                 dropout=0.0, schedule="linear", timesteps=1000, objective="v", p_uncond=0.1,
                 batch_size=32, lr=5e-4, warmup=100, ema_decay=0.995, steps=1500, log_every=50,
                 val_every=500, ckpt_every=500, sample_steps=25, seed=0),
    "smoke": dict(lr_schedule="cosine", model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], heads=1,
                  dropout=0.0, schedule="linear", timesteps=100, objective="v", p_uncond=0.1,
                  batch_size=8, lr=1e-3, warmup=2, ema_decay=0.9, steps=6, log_every=2, val_every=3,
                  ckpt_every=3, sample_steps=5, seed=0),
}
UNET_KEYS = ("model_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "heads", "dropout")


# ----------------------------------------------------------------------------------------------
# Latent cache and decoding


@torch.no_grad()
def decode_latents(ae, latents, scale, z, device, batch_size=64):
    """Undo the scale factor and decode; VQ samples are snapped to their nearest codes first."""
    out = []
    conditional = util.model_is_conditional(ae)
    for i in range(0, len(latents), batch_size):
        lat = latents[i:i + batch_size].to(device) / scale
        zz = z[i:i + batch_size].to(device) if conditional else None
        with util.autocast(device):
            if ae.kind == "vqvae":
                lat = ae.quantize_latent(lat)
            img = ae.decode(lat, zz)
        out.append(img.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def build_unet(config, latent_shape):
    """The latent UNet of a config (latent_shape = (C, h, w))."""
    return LatentUNet(in_channels=latent_shape[0], resolution=latent_shape[1], num_z=config["num_z"],
                      conditional=config["conditional"], **{k: config[k] for k in UNET_KEYS})


# ----------------------------------------------------------------------------------------------
# Training


class DiffusionTask(tr.Task):
    """One DDPM step on cached latents; validation loss on validate latents and an EMA sample grid."""

    kind = "diffusion"
    select_metric = ("val/loss", "min")
    items_name = "latents"

    def __init__(self, config, device, ae, cache, world):
        super().__init__()
        self.config, self.device, self.ae = config, device, ae
        self.schedule = NoiseSchedule(config["schedule"], config["timesteps"]).to(device)
        torch.manual_seed(config["seed"])
        self.model = build_unet(config, config["latent_shape"]).to(device)
        self.ema = tr.EMA(self.model, config["ema_decay"])
        self.models = {"model": self.model, "ema": self.ema.model}
        self.optimizers = {"opt": torch.optim.AdamW(self.model.parameters(), lr=config["lr"], weight_decay=0.0)}
        self.val_latents = cache["validate"] * config["scale_factor"]
        self.val_z = cache["validate_z"]
        self.model_train = self.model
        if world > 1:
            # find_unused_parameters: the null token is unused in steps where no condition is dropped.
            self.model_train = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
        if config.get("compile"):
            self.model_train = torch.compile(self.model_train)

    def extra_state(self):
        return {"scale_factor": self.config["scale_factor"], "ae_path": self.config["ae"],
                "ae_sha256": self.config["ae_sha256"], "latent_shape": list(self.config["latent_shape"])}

    def train_step(self, batch, step):
        cfg = self.config
        x0 = batch[0].to(self.device, non_blocking=True) * cfg["scale_factor"]
        z = batch[1].to(self.device)
        lr = tr.lr_at(step, cfg)
        tr.set_lr(self.optimizers["opt"], lr)
        with util.autocast(self.device):
            loss, per_sample, t = diffusion_loss(self.model_train, self.schedule, x0, z, cfg["objective"], cfg["p_uncond"])
        opt = self.optimizers["opt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.ema.update(self.model)
        logs = {"loss/diffusion": loss.detach(), "lr": torch.tensor(lr)}
        logs.update(loss_by_quartile(per_sample.detach().float(), t, cfg["timesteps"]))
        return logs

    @torch.no_grad()
    def validate(self, step, run_dir):
        cfg = self.config
        n = min(len(self.val_latents), 256)
        gen = torch.Generator().manual_seed(cfg["seed"])
        x0 = self.val_latents[:n].to(self.device)
        z = self.val_z[:n].to(self.device)
        losses = []
        for net, name in ((self.model, "val/loss_raw"), (self.ema.model, "val/loss")):
            # Fixed noise and t per validation: the numbers are comparable across steps.
            g = torch.Generator().manual_seed(cfg["seed"])
            _, per_sample, _ = diffusion_loss(net, self.schedule, x0, z, cfg["objective"], 0.0, generator=g)
            losses.append((name, per_sample.mean().item()))
        zs = list(range(0, cfg["num_z"], max(1, cfg["num_z"] // 8)))[:8] if cfg["conditional"] else [-1] * 8
        zz = torch.tensor(zs, device=self.device)
        lat = sample(self.ema.model, self.schedule, (len(zs), *cfg["latent_shape"]), zz, sampler="ddim",
                     steps=cfg["sample_steps"], guidance=1.0, objective=cfg["objective"],
                     generator=gen, clip_x0=cfg.get("x0_clip"))
        imgs = decode_latents(self.ae, lat, cfg["scale_factor"], zz.cpu(), self.device)
        util.save_image_grid(imgs, run_dir / "samples" / f"sample_{step:07d}.png", nrow=len(zs))
        return dict(losses)


def loss_by_quartile(per_sample, t, timesteps):
    """Mean loss in each quarter of the time steps (improved-diffusion's diagnostic); NaN where empty."""
    quart = (t * 4 // timesteps).clamp(max=3)
    out = {}
    for q in range(4):
        mask = (quart == q).float()
        out[f"loss_t/q{q + 1}"] = (per_sample * mask).sum() / mask.sum()
    return out


def train(args):
    """stable_diffusion.py train."""
    config = tr.resolve_config(args, PRESETS, "ldm", exclude=("command",))
    rank, world, device = tr.setup_distributed(config.get("device") or "auto")
    if not config.get("ae"):
        raise UserError("train needs --ae PATH (a stage-one checkpoint such as runs/stage1-demo/best.pt)")
    ae, ae_ckpt = util.load_autoencoder(config["ae"], device)
    config["ae"] = ae_ckpt["_path"]
    if rank == 0:
        print(f"preset: {config['preset']}; stage one: {ae_ckpt['model_type']} from {config['ae']}")
    out = Path(config["out"])
    tr.claim_run_dir(args, out, rank)  # before encoding, which would replace an existing run's latents.pt
    cache = util.stage_two_cache(ae, ae_ckpt, config, device, "latent", out / "latents.pt", write=rank == 0)
    config["ae_sha256"] = cache["ae_sha256"]
    config["data"] = cache["data"]
    config["num_z"] = cache["num_z"]
    config["conditional"] = bool((cache["train_z"] >= 0).any())
    config["latent_shape"] = list(cache["train"].shape[1:])
    config.setdefault("scale_factor", 1.0 / cache["train"].float().std().item())
    # Predicted x0 is clipped to the range of the (scaled) training latents when sampling: with eps
    # prediction, x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies any eps error by up to
    # 1/sqrt(abar_T) (~156 for the linear schedule), and an unclipped first step can throw the whole
    # trajectory off the data.
    config.setdefault("x0_clip", (cache["train"].float() * config["scale_factor"]).abs().max().item())
    if args.dry_run:
        tr.print_config(config)
        return 0
    task = DiffusionTask(config, device, ae, cache, world)
    if rank == 0:
        print(f"latents {config['latent_shape']}, scale factor {config['scale_factor']:.4f}; "
              f"UNet {sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M parameters")
    return tr.train_and_report(task, config, (cache["train"], cache["train_z"]), args, rank, world, device)


# ----------------------------------------------------------------------------------------------
# Sampling


def load_diffusion(path, device, ae_override=None):
    """Rebuild the EMA UNet, its schedule and its frozen autoencoder from a diffusion checkpoint."""
    ckpt = util.load_checkpoint(path, kind="diffusion")
    config = ckpt["config"]
    model = build_unet(config, ckpt["latent_shape"])
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError as err:
        raise UserError(f"--ckpt {ckpt['_path']}: weights do not match its config ({str(err).splitlines()[0][:160]})") from None
    ae_path = ae_override or ckpt["ae_path"]
    ae, ae_ckpt = util.load_autoencoder(ae_path, device, flag="--ae" if ae_override else util.recorded_ae_flag(ckpt))
    if util.file_sha256(ae_ckpt["_path"]) != ckpt["ae_sha256"]:
        print(f"warning: {ae_ckpt['_path']} is not the stage-one checkpoint this model was trained on (hash differs)")
    schedule = NoiseSchedule(config["schedule"], config["timesteps"]).to(device)
    return model.to(device).eval(), schedule, ae, ckpt


def generate(model, schedule, ae, ckpt, z, device, sampler, steps, eta, guidance, seed, batch_size=64, callback=None,
             clip_x0=None):
    """Sample latents for each z (batched) and decode them; returns images [N,1,H,W] and seconds taken."""
    config = ckpt["config"]
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = tuple(ckpt["latent_shape"])
    t0 = time.perf_counter()
    latents = []
    for i in range(0, len(z), batch_size):
        zz = z[i:i + batch_size].to(device)
        with util.autocast(device):
            lat = sample(model, schedule, (len(zz), *shape), zz, sampler=sampler, steps=steps, eta=eta,
                         guidance=guidance, objective=config["objective"], generator=gen,
                         callback=callback if i == 0 else None, clip_x0=clip_x0)
        latents.append(lat.float())
    images = decode_latents(ae, torch.cat(latents), ckpt["scale_factor"], z, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - t0


def gif_recorder(ae, ckpt, z, device, max_frames=40):
    """A sampler callback that decodes the predicted x0 at evenly spaced steps into GIF frames."""
    frames = []

    def callback(i, num_steps, x_t, x0_pred):
        every = max(1, num_steps // max_frames)
        if i % every == 0 or i == num_steps - 1:
            imgs = decode_latents(ae, x0_pred.float(), ckpt["scale_factor"], z[:len(x0_pred)], device)
            frames.append(util.image_grid(imgs, nrow=min(len(imgs), 8)))

    return frames, callback


def sampling_steps(args, config):
    """The number of sampling steps (default: T for ddpm, min(50, T) otherwise), after checking the sample flags."""
    T = config["timesteps"]
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n {args.n} --batch-size {args.batch_size}: both must be at least 1")
    if args.sampler == "ddpm":
        if args.steps not in (None, T):
            raise UserError(f"--steps {args.steps}: the ddpm sampler takes all {T} steps of this model; "
                            f"use --sampler ddim or dpmpp for fewer")
        return T
    if args.steps is not None and not 1 <= args.steps <= T:
        raise UserError(f"--steps {args.steps}: must lie in 1..{T} (the model's diffusion steps)")
    return args.steps or min(50, T)


def sample_cmd(args):
    """stable_diffusion.py sample."""
    device = util.pick_device(args.device)
    model, schedule, ae, ckpt = load_diffusion(args.ckpt, device, args.ae)
    config = ckpt["config"]
    zs = util.parse_z_spec(args.z, config["num_z"]) if config["conditional"] else [-1]
    z = util.sample_grid_z(zs, args.n)
    steps = sampling_steps(args, config)
    out = Path(args.out)
    util.check_writable(out.parent, "--out")
    frames, callback = gif_recorder(ae, ckpt, z, device) if args.gif else ([], None)
    images, seconds = generate(model, schedule, ae, ckpt, z, device, args.sampler, steps, args.eta,
                               args.guidance, args.seed, args.batch_size, callback, clip_for(args, config))
    util.save_image_grid(images, out, nrow=len(zs))
    print(f"{len(images)} samples ({args.sampler}, {steps} steps, guidance {args.guidance}) in {seconds:.2f}s: "
          f"{seconds / len(images) * 1000:.1f} ms per image -> {out}")
    if args.gif:
        util.save_gif(frames, args.gif)
        print(f"denoising GIF ({len(frames)} frames of decoded x0 predictions) -> {args.gif}")
    return 0


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    """train | sample | evaluate sub-commands."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the latent UNet on a frozen stage-one model")
    tr.add_common_args(t, PRESETS)
    t.add_argument("--ae", default=None, help="stage-one checkpoint (runs/NAME/best.pt)")
    t.add_argument("--data", default=None, help="dataset (default: the one stage one was trained on)")
    t.add_argument("--model-channels", type=int, default=None, help="UNet base width")
    t.add_argument("--channel-mult", type=tr.int_list, default=None, help="UNet width multipliers, e.g. 1,2,2")
    t.add_argument("--num-res-blocks", type=int, default=None, help="ResBlocks per level")
    t.add_argument("--attn-resolutions", type=tr.int_list, default=None, help="latent sizes with self-attention")
    t.add_argument("--heads", type=int, default=None, help="attention heads")
    t.add_argument("--dropout", type=float, default=None, help="dropout in ResBlocks")
    t.add_argument("--schedule", choices=["linear", "cosine"], default=None, help="noise schedule")
    t.add_argument("--timesteps", type=int, default=None, help="diffusion steps T")
    t.add_argument("--objective", choices=["eps", "v"], default=None, help="predict the noise (eps) or v")
    t.add_argument("--p-uncond", type=float, default=None, help="probability of dropping the z condition (CFG)")
    t.add_argument("--warmup", type=int, default=None, help="LR warm-up steps")
    t.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the weights")
    t.add_argument("--sample-steps", type=int, default=None, help="DDIM steps of the validation sample grid")
    s = sub.add_parser("sample", help="sample slices for chosen z-indices")
    _add_sample_args(s)
    s.add_argument("--n", type=int, default=1, help="samples per z-index (rows of the grid)")
    s.add_argument("--z", default="0..31", help="z-indices: a range 0..31, or a list 0,8,16")
    s.add_argument("--out", default="samples.png", help="PNG grid: one row per sample, one column per z")
    s.add_argument("--gif", default=None, help="also write the denoising process (decoded x0 predictions)")
    e = sub.add_parser("evaluate", help="generation metrics against real validate slices")
    _add_sample_args(e)
    e.add_argument("--n", type=int, default=4, help="samples per z-index")
    e.add_argument("--out", default=None, help="write the metrics as JSON here")
    return p.parse_args(argv)


def clip_for(args, config):
    """--clip-x0: None -> the training latents' range recorded at training time; 0 -> no clipping."""
    if args.clip_x0 is None:
        return config.get("x0_clip")
    if args.clip_x0 < 0:
        raise UserError(f"--clip-x0 {args.clip_x0}: must be >= 0 (0 disables clipping)")
    return args.clip_x0 or None


def _add_sample_args(p):
    p.add_argument("--ckpt", required=True, help="diffusion checkpoint (runs/NAME/best.pt)")
    p.add_argument("--ae", default=None, help="override the stage-one checkpoint recorded in --ckpt")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="sampler")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: T for ddpm, 50 otherwise)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: conditional only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clip predicted x0 to +-this (default: the training latents' range; 0: no clipping)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def main(argv=None):
    """Dispatch the sub-command."""
    args = parse_args(argv)
    if args.command == "train":
        return train(args)
    if args.command == "sample":
        return sample_cmd(args)
    return evaluate_cmd(args)


def evaluate_cmd(args):
    """stable_diffusion.py evaluate: sample n per z-index and score them (see evaluation.py)."""
    import evaluation

    device = util.pick_device(args.device)
    model, schedule, ae, ckpt = load_diffusion(args.ckpt, device, args.ae)
    config = ckpt["config"]
    zs = list(range(config["num_z"])) if config["conditional"] else [-1]
    z = util.sample_grid_z(zs, args.n)
    steps = sampling_steps(args, config)
    images, seconds = generate(model, schedule, ae, ckpt, z, device, args.sampler, steps, args.eta,
                               args.guidance, args.seed, args.batch_size, clip_x0=clip_for(args, config))
    metrics = evaluation.evaluate_samples(images, z, config["data"])
    metrics.update(sampler=args.sampler, steps=steps, guidance=args.guidance, ms_per_image=seconds / len(images) * 1000)
    evaluation.report(metrics, args.out)
    return 0


if __name__ == "__main__":
    util.run_cli(main)
