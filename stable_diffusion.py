"""Stage two (b): latent diffusion. A DDPM UNet learns the latents of a frozen stage-one autoencoder,
conditioned on the z-index with classifier-free guidance; sampled latents are decoded to slices.

Commands:
    python stable_diffusion.py train --ae runs/stage1-demo/best.pt                 # demo preset on CPU
    python stable_diffusion.py train --ae runs/vq-full/best.pt --preset full --out runs/ldm-full
    python stable_diffusion.py train --resume runs/ldm-demo
    python stable_diffusion.py sample --ckpt runs/ldm-demo/best.pt --n 2 --z 0..31 --sampler ddim \
        --steps 50 --guidance 2 --seed 0 --out samples.png --gif process.gif
    python stable_diffusion.py sample --ckpt runs/ldm-demo/best.pt --subjects 2 --out subjects   # NIfTI volumes
    python stable_diffusion.py evaluate --ckpt runs/ldm-demo/best.pt --sampler ddim --steps 50 --tstr 400
    python stable_diffusion.py train --ae runs/stage1-demo/best.pt --tissue --out runs/ldm-tissue   # from maps
    python stable_diffusion.py sample --ckpt runs/ldm-tissue/best.pt --labels seg.png --z 16 --n 4
    torchrun --nproc_per_node=4 stable_diffusion.py train --ae runs/vq-full/best.pt --preset full

Objective: v-prediction (Salimans & Ho 2022) by default. With eps-prediction the x0 estimate
(x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies the network's eps error by up to 1/sqrt(abar_T) ~ 156
at the first sampling step; on the demo a short eps-trained model then sampled latents with 10x the data's
std (measured), while v-prediction gives x0 directly at high noise. `--objective eps` remains available.

Whole subjects (`--neighbours either`, the default): in training each slice also sees the latent of the same
subject's slice z-1 or z+1 (which one is a side channel; hidden with probability p_neighbour_drop), so
`sample --subjects` draws a subject slice by slice from the middle slice outwards, each conditioned on the one
before it, and writes it as a NIfTI volume. Independent slices (`--independent`, and every `sample` grid) give
the net no neighbour. docs/RESULTS.md compares the designs and orders.

Tissue maps (`--tissue`): the UNet also sees each slice's segmentation, its one-hot classes folded onto the
latent grid (hidden with probability p_tissue_drop), so `sample --labels MAP` draws slices whose anatomy
follows a given map, and `evaluate` reports how closely for every real test map (`follow/*`).

Which latent is diffused: for a VAE, the posterior mean; for a VQ-VAE, the *quantised* code vectors
(what its decoder was trained on), and samples are snapped back to the nearest code before decoding.
Latents are multiplied by a scale factor (1 / std of the training latents, stored in the checkpoint)
so the diffusion sees unit variance, and divided by it again before decoding.
"""
import torch

import dataset
import stage_two
import trainer as tr
import util
from model_diffusion import (NEIGHBOURS, ContextGuided, LatentUNet, NoiseSchedule, diffusion_loss,
                             neighbour_context, pick_neighbours, sample)
from util import UserError

TISSUE_GUIDANCE = 2.0  # sample/evaluate default for a --tissue model given a map (docs/RESULTS.md)

H = tr.Hyper
HYPERS = [
    H("model_channels", 192, "UNet base width", "model", low=1),
    H("channel_mult", [1, 2, 4], "UNet width multipliers, e.g. 1,2,2", "model"),
    H("num_res_blocks", 2, "ResBlocks per level", "model"),
    H("attn_resolutions", [16, 8], "latent sizes with self-attention", "model"),
    H("heads", 8, "attention heads", "model", low=1),
    H("dropout", 0.0, "dropout in ResBlocks", "model", high=1),
    H("neighbours", "either", "condition each slice on a neighbouring slice of its subject, so that `sample "
      "--subjects` draws whole stacks: none, below (z-1) or either (z-1 or z+1)", "model", choices=NEIGHBOURS,
      before="none"),
    H("p_neighbour_drop", 0.2, "probability of hiding the neighbour in training (the net then also draws a slice "
      "alone: a stack's first slice, or independent slices)", "loss", high=1),
    H("tissue", False, "condition on a tissue map (its one-hot classes folded onto the latent grid, 4 f^2 more "
      "UNet input channels for f pixels per latent cell), so that `sample --labels MAP` draws anatomy that follows a "
      "given segmentation; needs the data's seg maps", "model", before=False),
    H("p_tissue_drop", 0.2, "probability of hiding the tissue map in training (the net then also draws without "
      "one)", "loss", high=1),
    H("schedule", "linear", "noise schedule", "loss", choices=("linear", "cosine")),
    H("timesteps", 1000, "diffusion steps T", "loss", low=2),
    H("objective", "v", "predict the noise (eps) or v", "loss", choices=("eps", "v")),
    H("min_snr_gamma", 0.0, "min-SNR-gamma loss weighting (Hang et al. 2023; 5 is theirs); 0 = plain MSE",
      "loss"),
    H("sample_steps", 50, "DDIM steps of the validation sample grid", "output", low=1),
    *stage_two.prior_hypers(ema_decay=0.9999, steps=200000, batch_size=64, lr=1e-4, warmup=1000,
                            lr_schedule="constant", log_every=100, val_every=5000, ckpt_every=5000),
]
# full: the UNet of the 256x256 recipe on 32x32x4 latents, for a GPU. demo: a 32-channel UNet for minutes
# on 2 CPU cores (cosine decay settles a short run). smoke: seconds, for the tests.
PRESETS = {
    "full": {},
    "demo": dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8, 4], heads=4,
                 ema_decay=0.995, batch_size=32, lr=5e-4, warmup=100, lr_schedule="cosine", steps=1500,
                 log_every=50, val_every=500, ckpt_every=500, sample_steps=25),
    "smoke": dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], heads=1,
                  timesteps=100, ema_decay=0.9, batch_size=8, lr=1e-3, warmup=2, lr_schedule="cosine", steps=6,
                  log_every=2, val_every=3, ckpt_every=3, sample_steps=5),
}


class DiffusionTask(stage_two.PriorTask):
    """One DDPM step on cached latents; validation loss on validate latents and an EMA sample grid."""

    select_metric = ("val/loss", "min")
    items_name = "latents"

    def __init__(self, prior, config, device, ae, cache):
        super().__init__(prior, config, device, ae, cache)
        self.schedule = NoiseSchedule(config["schedule"], config["timesteps"])
        self.val_data = self.val_data * config["scale_factor"]
        # Neighbours are looked up in the whole split (a batch holds only their indices), on the host: a large
        # cache is not copied to the GPU a second time, and one batch of latents moves per step.
        if config["neighbours"] != "none":
            self.neighbour_pool = {"train": cache["train"], "validate": cache["validate"]}
            self.val_neighbours = cache["validate_below"], cache["validate_above"]
        self.val_tissue = cache["validate_tissue"] if config["tissue"] else None

    def context(self, split, below, above, tissue=None, generator=None):
        """The UNet's context channels for slices whose neighbours in `split` are `below` / `above` and whose
        tissue maps are `tissue` (each hidden with its drop probability); None for a net with neither."""
        cfg = self.config
        parts = []
        if cfg["neighbours"] != "none":
            side, index = pick_neighbours(below, above, cfg["neighbours"], cfg["p_neighbour_drop"], generator)
            pool = self.neighbour_pool[split]
            neighbour = pool.index_select(0, index.cpu()).to(self.device, non_blocking=True) * cfg["scale_factor"]
            parts.append(neighbour_context(neighbour, side.to(self.device)))
        if cfg["tissue"]:
            keep = torch.rand(len(tissue), generator=generator) >= cfg["p_tissue_drop"]
            maps = stage_two.tissue_grid(tissue, cfg["latent_shape"][-1]).to(self.device)
            parts.append(maps * keep.to(self.device)[:, None, None, None].float())
        return torch.cat(parts, 1) if parts else None

    def extra_state(self):
        return {**super().extra_state(), "scale_factor": self.config["scale_factor"],
                "latent_shape": list(self.config["latent_shape"])}

    def train_step(self, batch, step):
        cfg = self.config
        x0 = batch[0].to(self.device, non_blocking=True) * cfg["scale_factor"]
        z = batch[1].to(self.device)
        context = self.context("train", batch[2], batch[3], batch[4] if cfg["tissue"] else None)
        with util.autocast(self.device):
            loss, per_sample, t = diffusion_loss(self.nets["model"], self.schedule, x0, z, cfg["objective"],
                                                 cfg["p_uncond"], context=context, min_snr_gamma=cfg["min_snr_gamma"])
        self.optimizer_step(loss, step)
        return {"loss/diffusion": loss.detach(), **loss_by_quartile(per_sample.detach().float(), t, cfg["timesteps"])}

    @torch.no_grad()
    def validate(self, step, run_dir):
        cfg = self.config
        n = min(len(self.val_data), 256)
        x0, z = self.val_data[:n].to(self.device), self.val_z[:n].to(self.device)
        below, above = (v[:n] for v in self.val_neighbours) if cfg["neighbours"] != "none" else (None, None)
        losses = {}
        nets = ((self.model, "val/loss_raw"),) if self.ema else ()
        for net, name in nets + ((self.sampled, "val/loss"),):
            # Fixed noise, t and neighbours per validation: the numbers are comparable across steps.
            g = torch.Generator().manual_seed(cfg["seed"])
            tissue = None if self.val_tissue is None else self.val_tissue[:n]
            context = self.context("validate", below, above, tissue, g)
            _, per_sample, _ = diffusion_loss(net, self.schedule, x0, z, cfg["objective"], 0.0, generator=g,
                                              context=context)
            losses[name] = per_sample.mean().item()
        options = dict(sampler="ddim", steps=cfg["sample_steps"], eta=0.0, clip_x0=cfg.get("x0_clip"))
        self.save_preview(self.sampled, step, run_dir, torch.Generator().manual_seed(cfg["seed"]), options)
        return losses


def loss_by_quartile(per_sample, t, timesteps):
    """Mean loss in each quarter of the time steps (improved-diffusion's diagnostic); NaN where empty."""
    quart = (t * 4 // timesteps).clamp(max=3)
    out = {}
    for q in range(4):
        mask = (quart == q).float()
        out[f"loss_t/q{q + 1}"] = (per_sample * mask).sum() / mask.sum()
    return out


class DiffusionPrior(stage_two.Prior):
    """Latent diffusion as a stage-two prior: a UNet over scaled latents, sampled by DDPM, DDIM or DPM++."""

    name, kind, stage = "latent diffusion model", "diffusion", "ldm"
    cache_what, cache_file = "latent", "latents.pt"
    gif, amp, sample_out = True, True, "samples.png"
    from_maps = True
    derived = [("latent_shape", lambda v: tr.is_shape(v, 3), "[channels, height, width]"),
               ("scale_factor", lambda v: tr.is_finite(v, 1e-12), "a positive number"),
               ("x0_clip", lambda v: v is None or tr.is_finite(v), "a number >= 0"),
               ("image_size", lambda v: v is None or tr.is_whole(v), "a whole number >= 1 (or absent)")]
    hypers, presets, task, doc = HYPERS, PRESETS, DiffusionTask, __doc__

    def summary(self, config):
        return f"latents {config['latent_shape']}, scale factor {config['scale_factor']:.4f}"

    def train_data(self, cache):
        tissue = (cache["train_tissue"],) if "train_tissue" in cache else ()
        return cache["train"], cache["train_z"], cache["train_below"], cache["train_above"], *tissue

    def check_config(self, config):
        super().check_config(config)
        if config["sample_steps"] > config["timesteps"]:
            raise UserError(f"--sample-steps {config['sample_steps']}: the validation grid's DDIM steps must not "
                            f"exceed the model's --timesteps {config['timesteps']}")
        if config["tissue"] and not 0 < config["p_tissue_drop"] < 1:
            raise UserError(f"--p-tissue-drop {config['p_tissue_drop']}: must lie strictly between 0 and 1 with "
                            f"--tissue (0 never teaches drawing without a map, 1 never shows one)")
        p = config["p_neighbour_drop"]
        if config["neighbours"] != "none" and not 0 < p < 1:
            raise UserError(f"--p-neighbour-drop {p}: must lie strictly between 0 and 1 with --neighbours "
                            f"{config['neighbours']} (0 never teaches a slice alone, which a subject's first slice "
                            f"and --independent need; 1 never shows a neighbour)")

    def complete_config(self, config, cache, ae):
        config["latent_shape"] = list(cache["train"].shape[1:])
        config["image_size"] = ae.resolution
        config.setdefault("scale_factor", 1.0 / cache["train"].float().std().item())
        # Predicted x0 is clipped to the range of the (scaled) training latents when sampling: with eps
        # prediction, x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies any eps error by up to
        # 1/sqrt(abar_T) (~156 for the linear schedule), and an unclipped first step can throw the whole
        # trajectory off the data.
        config.setdefault("x0_clip", (cache["train"].float() * config["scale_factor"]).abs().max().item())

    def stage_one_mismatch(self, config, ae):
        if list(ae.latent_shape) != list(config["latent_shape"]):
            return (f"its latents are {'x'.join(map(str, ae.latent_shape))}, but this model draws latents of "
                    f"{'x'.join(map(str, config['latent_shape']))}")
        return None

    def build(self, config):
        shape = config["latent_shape"]
        kwargs = tr.model_kwargs(HYPERS, config)
        # The context: the neighbour's latent and a side channel (model_diffusion.neighbour_context).
        context = shape[0] + 1 if kwargs.pop("neighbours") != "none" else 0
        if kwargs.pop("tissue"):  # the tissue map folded onto the latent grid (stage_two.tissue_grid)
            context += stage_two.tissue_channels(config["image_size"], shape[1])
        return LatentUNet(in_channels=shape[0], resolution=shape[1], num_z=config["num_z"],
                          conditional=config["conditional"], context_channels=context, **kwargs)

    def add_sample_args(self, parser):
        parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddim", help="sampler")
        parser.add_argument("--steps", type=int, default=None,
                            help="sampling steps (default: T for ddpm, 50 otherwise; ddpm with fewer is respaced)")
        parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 DDPM-like)")
        parser.add_argument("--clip-x0", type=float, default=None,
                            help="clip predicted x0 to +-this (default: the training latents' range; 0: no clipping)")
        parser.add_argument("--tissue-guidance", type=float, default=None,
                            help=f"classifier-free guidance on the tissue map of a --tissue model, where a map is "
                                 f"given (default {TISSUE_GUIDANCE}: Dice to the map 0.738 against 0.693 unguided on "
                                 f"the demo; 1: none; each value above 1 costs twice)")

    def sample_options(self, args, config):
        T = config["timesteps"]
        if args.steps is not None and not 1 <= args.steps <= T:
            raise UserError(f"--steps {args.steps}: must lie in 1..{T} (the model's diffusion steps)")
        if not tr.is_finite(args.eta):
            raise UserError(f"--eta {args.eta}: must be a finite number >= 0 (0: deterministic DDIM)")
        if args.clip_x0 is not None and not tr.is_finite(args.clip_x0):
            raise UserError(f"--clip-x0 {args.clip_x0}: must be a finite number >= 0 (0 disables clipping)")
        steps = args.steps or (T if args.sampler == "ddpm" else min(50, T))
        # --clip-x0: None -> the training latents' range recorded at training time; 0 -> no clipping
        clip = config.get("x0_clip") if args.clip_x0 is None else args.clip_x0 or None
        options = dict(sampler=args.sampler, steps=steps, eta=args.eta, clip_x0=clip)
        given = args.tissue_guidance
        if given is not None and not tr.is_finite(given):
            raise UserError(f"--tissue-guidance {given}: must be a finite number >= 0 (1: none)")
        if given is not None and not config.get("tissue"):
            raise UserError(f"--tissue-guidance {given}: this model was trained without tissue maps (--tissue), so "
                            f"there is no map to guide by")
        if config.get("tissue"):
            options["tissue_guidance"] = TISSUE_GUIDANCE if given is None else given
        if getattr(args, "labels", None):
            if not config.get("tissue"):
                raise UserError(f"--labels {args.labels}: this model was trained without tissue maps; train one with "
                                f"--tissue to draw from a given map")
            classes = dataset.read_label_map(args.labels, config["image_size"])
            options.update(labels=classes, tissue=stage_two.tissue_grid(classes[None], config["latent_shape"][-1]))
        return options

    def describe(self, options):
        fields = {"sampler": options["sampler"], "steps": options["steps"]}
        if "tissue_guidance" in options:
            fields["tissue_guidance"] = options["tissue_guidance"]
        return f"{options['sampler']}, {options['steps']} steps", fields

    def with_tissue(self, config, context, options, n, device):
        """The UNet's context: the neighbour part (`context`; None where there is none) and, for a tissue-
        conditioned net, the tissue part (options['tissue'], one map [1, 4, h, w] or one per sample; zeros when
        none is given, as a map hidden in training)."""
        if not config.get("tissue"):
            return context
        shape = config["latent_shape"]
        tissue = options.get("tissue")
        channels = stage_two.tissue_channels(config["image_size"], shape[1])
        tissue = torch.zeros(n, channels, *shape[1:]) if tissue is None else tissue.expand(n, -1, -1, -1)
        if config["neighbours"] != "none" and context is None:
            context = torch.zeros(n, shape[0] + 1, *shape[1:], device=device)
        tissue = tissue.to(device)
        return tissue if context is None else torch.cat([context, tissue], 1)

    def draw(self, model, config, z, generator, guidance, options, callback=None, context=None):
        context = self.with_tissue(config, context, options, len(z), z.device)
        if options.get("tissue") is not None and options.get("tissue_guidance", 1.0) != 1.0:
            channels = stage_two.tissue_channels(config["image_size"], config["latent_shape"][1])
            model = ContextGuided(model, options["tissue_guidance"], channels)
        schedule = NoiseSchedule(config["schedule"], config["timesteps"])
        latents = sample(model, schedule, (len(z), *config["latent_shape"]), z, sampler=options["sampler"],
                         steps=options["steps"], eta=options["eta"], guidance=guidance, objective=config["objective"],
                         generator=generator, callback=callback, clip_x0=options["clip_x0"], context=context)
        return latents.float()

    def stack_orders(self, config):
        # middle-out first: on the demo it kept per-slice quality closest to independent slices (docs/RESULTS.md)
        return {"none": (), "below": ("bottom-up",), "either": ("middle-out", "bottom-up")}[config["neighbours"]]

    def alone_note(self, config):
        return f" (trained with --neighbours {config['neighbours']}; --neighbours either draws subjects)"

    def draw_chain(self, model, config, n, generator, guidance, options, order, snap, callback=None):
        """n subjects [n, K, C, h, w], slice by slice: the first (z = 0, or the middle one) alone, each next one
        conditioned on the slice drawn before it (snapped to what the stage one encodes, as in training)."""
        num_z, device = config["num_z"], next(model.parameters()).device
        start = 0 if order == "bottom-up" else num_z // 2
        stack = [None] * num_z

        def one(k, neighbour=None, side=0):
            z = torch.full((n,), k, dtype=torch.long, device=device)
            context = None if neighbour is None else neighbour_context(neighbour, torch.full((n,), side))
            return snap(self.draw(model, config, z, generator, guidance, options, callback, context))

        stack[start] = one(start)
        for k in range(start + 1, num_z):
            stack[k] = one(k, stack[k - 1], 1)  # the slice below is known
        for k in range(start - 1, -1, -1):
            stack[k] = one(k, stack[k + 1], -1)  # the slice above is known
        return torch.stack(stack, dim=1)


PRIOR = DiffusionPrior()


def main(argv=None):
    """train | sample | evaluate (see the module docstring)."""
    return stage_two.main(PRIOR, argv)


if __name__ == "__main__":
    util.run_cli(main)
