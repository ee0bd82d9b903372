"""Stage two (a): a conditional gated PixelCNN prior (van den Oord et al. 2016, `model_pixelCNN.py`) over the
code grids of a frozen VQ-VAE, conditioned on the z-index with classifier-free guidance; sampled grids are
decoded to slices by the VQ-VAE.

Commands:
    python pixelCNN.py train --ae runs/stage1-vqvae/best.pt                   # demo preset on CPU
    python pixelCNN.py train --ae runs/vq-full/best.pt --preset full --out runs/pixelcnn-full
    python pixelCNN.py train --resume runs/pixelcnn-demo
    python pixelCNN.py sample --ckpt runs/pixelcnn-demo/best.pt --n 2 --z 0..31 --temperature 1.0 \
        --seed 0 --out grid.png
    python pixelCNN.py sample --ckpt runs/pixelcnn-demo/best.pt --z 0,8,16,24 --guidance 1.75 --temperature 1.2
    python pixelCNN.py evaluate --ckpt runs/pixelcnn-demo/best.pt --n 4
    torchrun --nproc_per_node=4 pixelCNN.py train --ae runs/vq-full/best.pt --preset full
"""
import torch

import stage_two
import trainer as tr
import util
from model_pixelCNN import GatedPixelCNN, bits_per_code, code_loss, sample_codes
from util import UserError

H = tr.Hyper
HYPERS = [
    H("hidden", 192, "channels of the gated stacks", "model", low=1),
    H("n_layers", 15, "gated layers (first is type A, the rest type B)", "model", low=1),
    H("kernel_size", 5, "odd kernel size of the masked convolutions", "model", low=3),
    H("dilation", [1], "dilations of the gated layers after the first, cycled (e.g. 1,2,4: a layer reaches d * (k "
      "// 2) rows and columns, so 8 layers of kernel 3 reach 17 rows; the first, type-A layer is not dilated)",
      "model"),
    H("dropout", 0.0, "dropout in the gated layers", "model", high=1),
    H("position", True, "condition every layer on its position in the grid (sinusoids of row and column, "
      "location-dependent conditioning as in van den Oord et al. 2016)", "model", before=False),
    H("z_maps", 0, "channels of a learned map per z-index that conditions every layer (where each tissue lies at "
      "that slice level; 0: none)", "model"),
    H("coarse", 0, "layers of a causal half-resolution path whose summary of the rows above every layer reads "
      "(a coarse-to-fine path for the layout; 0: none)", "model", low=0),
    H("code_features", False, "embed and predict each code through a learned function of its stage-one codebook "
      "vector (plus a per-code table), so codes close in the codebook share what the prior learns", "model"),
    H("sample_every", 1, "write a sample grid every N validations", "output", low=1),
    # no EMA in full (unmeasured at its length). The demo's, started once the loss's steepest fall is over, met
    # every sample target on each of three trainings; its trained weights missed the SWD bar on one (docs/RESULTS.md)
    # runs from before the EMA existed sampled their trained weights (ema_before=0)
    *stage_two.prior_hypers(ema_decay=0.0, ema_before=0.0, steps=100000, batch_size=64, lr=3e-4, warmup=1000,
                            lr_schedule="cosine", log_every=100, val_every=5000, ckpt_every=5000),
]
# full: for a GPU. demo: an 8-layer, 64-channel prior for under 4 minutes on 2 CPU cores (lr 2e-3: the short run
# is far from overfitting; with position, 400 steps are within the sample targets). smoke: seconds, for the tests.
# Every preset conditions on position: without it the samples' coarse layout was 1.65x real (docs/RESULTS.md).
PRESETS = {
    "full": {},
    "demo": dict(hidden=64, n_layers=8, batch_size=32, lr=2e-3, warmup=50, steps=400, log_every=25, val_every=200,
                 ckpt_every=200, ema_decay=0.99, ema_start=100),
    "smoke": dict(hidden=16, n_layers=3, kernel_size=3, ema_decay=0.9, batch_size=8, lr=1e-3, warmup=2, steps=6,
                  log_every=2, val_every=3, ckpt_every=3),
}


class PixelCNNTask(stage_two.PriorTask):
    """Cross-entropy on cached code grids; validate bits per code and a decoded sample grid."""

    select_metric = ("val/bits_per_code", "min")
    items_name = "grids"

    def __init__(self, prior, config, device, ae, cache):
        super().__init__(prior, config, device, ae, cache)
        if config["code_features"]:  # a resumed run's state dict brings the same vectors back
            self.model.set_code_vectors(ae.quantizer.codebook)
            if self.ema:  # the copy was taken before the vectors were set
                self.ema.update(self.model, decay=0.0)

    def extra_state(self):
        return {**super().extra_state(), "grid": list(self.config["grid"])}

    def train_step(self, batch, step):
        cfg = self.config
        codes, z = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device)
        with util.autocast(self.device):
            loss, bits = code_loss(self.nets["model"], codes, z if cfg["conditional"] else None, cfg["p_uncond"])
        self.optimizer_step(loss, step)
        return {"loss/ce": loss.detach(), "bits_per_code": bits.detach()}

    @torch.no_grad()
    def validate(self, step, run_dir):
        cfg = self.config
        n = min(len(self.val_data), 512)
        metrics = {}
        nets = [(self.sampled, "val/bits_per_code")] + ([(self.model, "val/bits_per_code_raw")] if self.ema else [])
        for net, name in nets:
            total = 0.0
            for i in range(0, n, 64):
                codes = self.val_data[i:min(i + 64, n)].to(self.device)
                z = self.val_z[i:min(i + 64, n)].to(self.device) if cfg["conditional"] else None
                total += bits_per_code(net(codes, z).float(), codes).item() * len(codes)
            metrics[name] = total / n
        # Counted from the step (not from validations since start), so a resumed run samples at the same steps.
        if (step // cfg["val_every"]) % cfg["sample_every"] == 0 or step == cfg["steps"]:
            generator = torch.Generator(device=self.device).manual_seed(cfg["seed"])
            self.save_preview(self.sampled, step, run_dir, generator, {"temperature": 1.0})
        return metrics


class PixelCNNPrior(stage_two.Prior):
    """The gated PixelCNN as a stage-two prior: code grids drawn in raster order."""

    name, kind, stage = "PixelCNN", "pixelcnn", "pixelcnn"
    cache_what, cache_file, needs_codes = "indices", "codes.pt", True
    sample_out = "samples_pixelcnn.png"
    derived = [("grid", lambda v: tr.is_shape(v, 2), "[height, width]"),
               ("n_codes", lambda v: tr.is_whole(v, 2), "a whole number >= 2"),
               ("code_dim", lambda v: v is None or tr.is_whole(v), "a whole number >= 1 (or absent)")]
    hypers, presets, task, doc = HYPERS, PRESETS, PixelCNNTask, __doc__

    def summary(self, config):
        return f"codes {config['grid']} of {config['n_codes']}"

    def check_config(self, config):
        super().check_config(config)
        if config["kernel_size"] % 2 == 0:
            raise UserError(f"--kernel-size {config['kernel_size']}: must be odd (a masked kernel is centred on the "
                            f"code it predicts)")
        dilation = config["dilation"]
        if not dilation:
            raise UserError("--dilation '': give one or more dilations >= 1 (1: none)")
        if config["n_layers"] == 1 and dilation != [1]:
            raise UserError(f"--dilation {','.join(map(str, dilation))}: does not apply with --n-layers 1 (the only "
                            f"layer is the type-A one, which is never dilated)")
        if len(dilation) > config["n_layers"] - 1 > 0:
            raise UserError(f"--dilation {','.join(map(str, dilation))}: {len(dilation)} dilations for the "
                            f"{config['n_layers'] - 1} gated layers after the type-A one (--n-layers "
                            f"{config['n_layers']}): the last ones would never be used")

    def complete_config(self, config, cache, ae):
        if config["z_maps"] and not config["conditional"]:
            raise UserError(f"--z-maps {config['z_maps']}: this stage one's data have no z-index, so there is no "
                            f"map per z-index to learn; leave --z-maps at 0")
        config.update(grid=list(cache["train"].shape[1:]), n_codes=ae.n_embed)
        if config["code_features"]:
            config["code_dim"] = ae.quantizer.embed_dim

    def stage_one_mismatch(self, config, ae):
        grid = list(ae.latent_shape[1:])
        if ae.n_embed != config["n_codes"] or grid != list(config["grid"]):
            return (f"has {ae.n_embed} codes on a {grid[0]}x{grid[1]} grid, but this PixelCNN draws codes of "
                    f"{config['n_codes']} on a {config['grid'][0]}x{config['grid'][1]} grid")
        return None

    def build(self, config):
        kwargs = tr.model_kwargs(HYPERS, config)
        code_dim = config["code_dim"] if kwargs.pop("code_features") else None
        return GatedPixelCNN(config["n_codes"], conditional=config["conditional"], num_z=config["num_z"],
                             code_dim=code_dim, **kwargs)

    def add_sample_args(self, parser):
        parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (near 0: greedy)")
        parser.add_argument("--top-k", type=int, default=0, help="sample among the K most likely codes (0: all)")
        parser.add_argument("--top-p", type=float, default=1.0,
                            help="nucleus sampling: among the most likely codes that hold this probability (1: all)")

    def sample_options(self, args, config):
        if not tr.is_finite(args.temperature):
            raise UserError(f"--temperature {args.temperature}: must be a finite number >= 0 (near 0: greedy)")
        if not 0 <= args.top_k <= config["n_codes"]:
            raise UserError(f"--top-k {args.top_k}: must lie in 0..{config['n_codes']} (the codebook size; 0: all)")
        if not (tr.is_finite(args.top_p) and 0 < args.top_p <= 1):
            raise UserError(f"--top-p {args.top_p}: must lie in (0, 1] (1: all codes)")
        return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}

    def describe(self, options):
        text = f"temperature {options['temperature']}"
        if options.get("top_k"):
            text += f", top-k {options['top_k']}"
        if options.get("top_p", 1.0) < 1.0:
            text += f", top-p {options['top_p']}"
        return text, {"sampler": "pixelcnn", **options}

    def draw(self, model, config, z, generator, guidance, options, callback=None):
        return sample_codes(model, tuple(config["grid"]), z if config["conditional"] else None,
                            temperature=options["temperature"], generator=generator, guidance=guidance,
                            batch_size=len(z), top_k=options.get("top_k", 0), top_p=options.get("top_p", 1.0),
                            num_threads=None, callback=callback)


PRIOR = PixelCNNPrior()


def main(argv=None):
    """train | sample | evaluate (see the module docstring)."""
    return stage_two.main(PRIOR, argv)


if __name__ == "__main__":
    util.run_cli(main)
