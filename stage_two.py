"""The contract between a frozen stage one and any stage-two prior: what `stable_diffusion.py` and
`pixelCNN.py` share.

A prior script describes itself in a `Prior` (its hyperparameters and presets, its Task, how to build its
network from a config and how to draw latents or code grids for given z-indices); everything else is here:
- loading the frozen stage one, and the hash check that it is the file the prior was trained on;
- the cache of the train and validate splits, encoded once by the frozen stage one (latents or codes);
- decoding what a prior draws (latents, snapped to the nearest codes for a VQ-VAE, or code grids);
- the command line: `train`, `sample` and `evaluate` sub-commands, their shared flags and checks;
- whole subjects: `generate_stacks` draws every z-index of n subjects, slice by slice where the prior can
  condition on a neighbour (`stack_orders`, `draw_chain`), and `sample --subjects` writes them as NIfTI.

Data flows one way: dataset -> stage one (prestage_train) -> this module -> the prior scripts.

A third prior (say a transformer over codes) takes: its model file; a Task subclassing `PriorTask` (its
`train_step` and `validate`); a `Prior` subclass (its hyperparameter table and presets, `build`, `summary`,
`draw`, `describe`, and any sample flags of its own); and a script whose `main` calls `stage_two.main(PRIOR)`.
Caching, loading with the hash check, decoding, the three sub-commands, guidance and z checks, evaluation,
resume, DDP and checkpoints come from here and from trainer.py unchanged.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

import dataset
import evaluation
import trainer as tr
import util
from prestage_train import load_autoencoder
from util import UserError


class Prior:
    """What one stage-two prior tells the shared commands; each prior script subclasses it once."""

    name = None          # in messages: "PixelCNN", "latent diffusion model"
    kind = None          # its checkpoint kind
    stage = None         # config stage, and runs/<stage>-<preset> by default
    cache_what = None    # what the cache holds: "latent" (continuous) or "indices" (VQ codes)
    cache_file = None    # the cache's name in the run directory
    needs_codes = False  # True: the stage one must be a VQ-VAE
    gif = False          # sample --gif: the sampler reports x0 predictions along the way
    from_maps = False    # sample --labels MAP: draws for a given tissue map (a model trained with --tissue)
    amp = False          # sample/evaluate draw under bf16 autocast on CUDA (validation previews stay fp32)
    derived = []         # (key, test, what it must be): the config entries `complete_config` adds
    sample_out = "samples.png"  # sample's default --out
    hypers, presets, task, doc = [], {}, None, None

    def summary(self, config):
        """What the prior models, for the start-up line (e.g. the latent shape and scale factor)."""
        raise NotImplementedError

    def check_config(self, config):
        """Refuse, before anything loads, hyperparameter values that cannot work together (UserError)."""
        if config["ema_decay"] >= 1:
            raise UserError(f"--ema-decay {config['ema_decay']}: must be below 1 (at 1 the average never moves from "
                            f"the weights it starts with); 0 keeps no average")
        if config["ema_start"] and not config["ema_decay"]:
            raise UserError(f"--ema-start {config['ema_start']}: there is no EMA to start (--ema-decay 0); give "
                            f"--ema-decay > 0 or leave --ema-start at 0")
        if config["ema_start"] >= config["steps"]:
            raise UserError(f"--ema-start {config['ema_start']}: must be below --steps {config['steps']}, or the "
                            f"EMA would average nothing")

    def complete_config(self, config, cache, ae):
        """Settings derived from the cache and the stage one (latent shape, scale factor, grid, ...)."""

    def build(self, config):
        """The untrained network of a config."""
        raise NotImplementedError

    def stage_one_mismatch(self, config, ae):
        """Why the stage one `ae` cannot decode what this trained prior draws (None where it can)."""
        return None

    def add_sample_args(self, parser):
        """The prior's own sample/evaluate flags."""

    def sample_options(self, args, config):
        """Check the prior's own sample flags; returns what `draw` takes."""
        return {}

    def describe(self, options):
        """(text for the sample line, fields for the metrics JSON) of these options."""
        raise NotImplementedError

    def draw(self, model, config, z, generator, guidance, options, callback=None):
        """Latents [B, C, h, w] (scaled as in training) or code grids [B, h, w] for z-indices z [B] (on the
        model's device; -1 = unknown). The sampler calls `callback` after each of its steps (a diffusion step, a
        PixelCNN row) as callback(i, num_steps, x, x0_pred)."""
        raise NotImplementedError

    def train_data(self, cache):
        """The tensors the trainer batches (the neighbour indices too, where the prior uses them)."""
        return cache["train"], cache["train_z"]

    def stack_orders(self, config):
        """The orders in which `draw_chain` can draw a subject slice by slice; () where every slice is drawn
        alone (`sample --subjects` then needs --independent)."""
        return ()

    def alone_note(self, config):
        """Why this model draws every slice alone, for messages ('' where there is no other way)."""
        return ""

    def draw_chain(self, model, config, n, generator, guidance, options, order, snap, callback=None):
        """n whole subjects [n, num_z, ...] drawn slice by slice in `order` (one of `stack_orders`); `snap` maps
        a drawn latent to the nearest one the stage one produces, before it conditions the next slice; `callback`
        goes to every slice's `draw`."""
        raise NotImplementedError


def prior_hypers(ema_decay, ema_before=tr.FULL, **loop):
    """The hyperparameters every prior has: condition dropout (which classifier-free guidance needs), the weights'
    EMA and the loop's, with the prior's `full` values (see trainer.loop_hypers)."""
    return [tr.Hyper("p_uncond", 0.1, "probability of dropping the z condition, which classifier-free guidance needs",
                     "loss", high=1),
            tr.Hyper("ema_decay", ema_decay, "EMA decay of the weights that validation and sampling use (0: the "
                     "trained weights)", "optimisation", high=1, before=ema_before),
            tr.Hyper("ema_start", 0, "steps before the EMA averages: for the first N steps the EMA is the trained "
                     "weights themselves, from step N + 1 (as the log counts) it decays (so a short run's average "
                     "holds none of the random start)", "optimisation"),
            tr.Hyper("flip", False, "also train on every train slice mirrored left-right (encoded once into the "
                     "cache): twice the training codes or latents, for a prior that otherwise overfits a small set",
                     "data", before=False),
            *tr.loop_hypers(**loop)]


# ----------------------------------------------------------------------------------------------
# The frozen stage one


def load_stage_one(prior, path, device, flag="--ae"):
    """The frozen stage-one model and its checkpoint; a prior over codes refuses a VAE."""
    ae, ckpt = load_autoencoder(path, device, flag=flag)
    if prior.needs_codes and ckpt["model_type"] != "vqvae":
        raise UserError(f"{flag} {ckpt['_path']}: is a {ckpt['model_type'].upper()} checkpoint; the {prior.name} "
                        f"models discrete codes and needs a VQ-VAE (train one with prestage_train.py --model vqvae, "
                        f"or use stable_diffusion.py for a VAE)")
    return ae, ckpt


def recorded_ae_flag(ckpt):
    """How an error names the stage-one path a stage-two checkpoint recorded (relative to where it was
    trained): points the user at --ae, which overrides it."""
    return f"--ae not given, and the stage-one checkpoint recorded in {ckpt['_path']},"


def encode(ae, images_u8, z, device, what):
    """Latents ("latent") or code indices ("indices") of uint8 slices by the frozen stage one, on the CPU."""
    if what == "indices":
        return util.map_batches(lambda x, zz: ae.encode_indices(util.to_float(x), zz), (images_u8, z), device)
    return util.map_batches(lambda x, zz: ae.encode_latent(util.to_float(x), zz).float(), (images_u8, z), device)


def decode(ae, samples, z, device, scale=1.0):
    """Slices in [-1, 1] from code grids (integer) or latents (float, `scale` times the stage-one latents, as
    the prior learnt them); a VQ-VAE's latents are snapped to their nearest codes before decoding."""
    def one(s, zz):
        if not s.is_floating_point():
            return ae.decode_indices(s, zz)
        latent = s / scale
        return ae.decode(ae.quantize_latent(latent) if ae.kind == "vqvae" else latent, zz)

    return util.map_batches(lambda s, zz: one(s, zz).float().clamp(-1, 1), (samples, z), device)


# ----------------------------------------------------------------------------------------------
# The cache of encoded splits


def load_cache(path, ae_sha256):
    """A latent/code cache written for this exact stage-one file, or None (missing, stale or corrupt: rebuilt)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a broken cache is rebuilt, never trusted
        return None
    whole = (isinstance(cache, dict) and cache.get("ae_sha256") == ae_sha256 and isinstance(cache.get("data"), str)
             and tr.is_whole(cache.get("num_z")) and all(_split_is_whole(cache, s) for s in ("train", "validate"))
             and is_spacing(cache.get("spacing")))
    return cache if whole else None


def is_spacing(value):
    """A voxel size: three finite numbers > 0 (mm)."""
    return isinstance(value, list) and len(value) == 3 and all(tr.is_finite(v) and v > 0 for v in value)


def _split_is_whole(cache, split):
    """A split of a cache: latents [N, C, h, w] (finite floats) or codes [N, h, w] with z-indices [N]."""
    x, z = cache.get(split), cache.get(f"{split}_z")
    if not (torch.is_tensor(x) and torch.is_tensor(z) and z.dtype == torch.long and z.shape == x.shape[:1]
            and len(x) > 0 and bool((z < cache["num_z"]).all())):
        return False
    for side in ("below", "above"):  # neighbour indices into the same split, -1 where none
        n = cache.get(f"{split}_{side}")
        if not (torch.is_tensor(n) and n.dtype == torch.long and n.shape == z.shape
                and bool(((n >= -1) & (n < len(x))).all())):
            return False
    if x.is_floating_point():
        return x.dim() == 4 and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    return x.dim() == 3 and x.dtype == torch.long and bool((x >= 0).all())


def tissue_grid(labels, grid):
    """Tissue classes [N, H, W] (0..3) -> the one-hot map folded onto a grid x grid latent (space to depth:
    each latent cell holds its f x f pixels' classes, f = H / grid), float [N, 4 f^2, grid, grid]. Pooled class
    fractions instead lose the thin CSF: at 16x16 their upsampled argmax scores Dice 0.15 on it (docs/RESULTS.md)."""
    labels = torch.as_tensor(labels).long()
    one_hot = torch.nn.functional.one_hot(labels, len(dataset.LABELS)).permute(0, 3, 1, 2).float()
    return torch.nn.functional.pixel_unshuffle(one_hot, labels.shape[-1] // grid)


def tissue_channels(image_size, grid):
    """The context channels `tissue_grid` gives at this image and latent size."""
    return len(dataset.LABELS) * (image_size // grid) ** 2


def _tissue_is_whole(cache):
    """The cache holds a tissue map per slice: classes uint8 [N, H, W] in 0..3."""
    return all(torch.is_tensor(t := cache.get(f"{split}_tissue")) and t.dtype == torch.uint8 and t.dim() == 3
               and len(t) == len(cache[split]) and int(t.max()) < len(dataset.LABELS)
               for split in ("train", "validate"))


def mirrored(images, z, below, above, labels=None):
    """A split followed by its left-right mirror image: slice i + N is slice i flipped, with its z-index, its
    tissue map flipped alike, and its neighbours the mirrored neighbours (index + N; -1 stays -1)."""
    n = len(images)

    def shift(idx):
        return torch.cat([idx, torch.where(idx >= 0, idx + n, idx)])

    labels = None if labels is None else torch.cat([labels, labels.flip(-1)])
    return torch.cat([images, images.flip(-1)]), torch.cat([z, z]), shift(below), shift(above), labels


def build_cache(ae, ae_ckpt, config, device, what, cache_path, write=True, tissue=False):
    """Encode the train and validate splits once with the frozen stage one (with `tissue`, also keep their
    tissue maps). Reused on resume when it was built by the same stage-one file from
    the same data; rebuilt otherwise. `write` is False on ranks > 0."""
    ae_hash = util.file_sha256(ae_ckpt["_path"])
    size = ae_ckpt["config"]["size"]
    wanted = config.get("data") or ae_ckpt["config"].get("data")
    wanted_path = Path(wanted) if wanted else dataset.default_data_dir(size)
    cached = load_cache(cache_path, ae_hash)
    flip = bool(config.get("flip"))
    if (cached is not None and cached.get("data") and Path(cached["data"]).resolve() == wanted_path.resolve()
            and (not tissue or _tissue_is_whole(cached)) and cached.get("flip", False) == flip):
        return cached  # a cache of other data (a run redone with another --data) is rebuilt below
    data_path = dataset.ensure_dataset(wanted, size)
    splits = dataset.load_splits(data_path, size=size, splits=("train", "validate"), labels=tissue)
    if tissue and any(split.labels is None for split in splits.values()):
        raise UserError(f"--tissue: {data_path} has no tissue maps for its train and validate splits "
                        f"({dataset.LABEL_SOURCES})")
    t0 = time.perf_counter()
    # The absolute path: sample/evaluate may run from another working directory.
    cache = {"kind": "cache", "ae_sha256": ae_hash, "data": str(Path(data_path).resolve()),
             "num_z": max(splits["train"].num_z, 1), "spacing": list(dataset.voxel_spacing(data_path, size)[0]),
             "flip": flip}
    for name, split in splits.items():
        images, z = split.tensors()
        below, above = split.neighbours()
        labels = torch.from_numpy(split.labels) if tissue else None
        if flip and name == "train":
            images, z, below, above, labels = mirrored(images, z, below, above, labels)
        cache[name] = encode(ae, images, z, device, what)
        cache[f"{name}_z"] = z if splits["train"].conditional else torch.full_like(z, -1)
        cache[f"{name}_below"], cache[f"{name}_above"] = below, above
        if tissue:
            cache[f"{name}_tissue"] = labels  # folded per batch (tissue_grid)
    mirror = " (half of them mirrored, --flip)" if flip else ""
    print(f"{'latent' if what == 'latent' else 'code'} cache: encoded {len(cache['train'])} train{mirror} + "
          f"{len(cache['validate'])} validate slices in {time.perf_counter() - t0:.1f}s -> "
          f"{tuple(cache['train'].shape[1:])} per slice")
    if write:
        util.save_checkpoint(cache, cache_path)
    return cache


# ----------------------------------------------------------------------------------------------
# Training


PREVIEW_SLICES = 8  # slices in each training preview (tests of the 256x256 presets lower it: ~5 s a decode on CPU)


class PriorTask(tr.Task):
    """What every prior's Task has: its seeded network, AdamW, the validate split, the frozen stage one."""

    def __init__(self, prior, config, device, ae, cache):
        super().__init__()
        self.kind = prior.kind
        self.prior, self.config, self.device, self.ae = prior, config, device, ae
        torch.manual_seed(config["seed"])
        self.model = prior.build(config).to(device)
        self.models = {"model": self.model}
        # the averaged weights that validation and sampling use; decay 0: none, the trained weights themselves
        self.ema = tr.EMA(self.model, config["ema_decay"]) if config["ema_decay"] > 0 else None
        if self.ema:
            self.models["ema"] = self.ema.model
        # fused: one kernel per step instead of a dozen per tensor (1.05x a diffusion demo step on CPU)
        self.optimizers = {"opt": torch.optim.AdamW(self.model.parameters(), lr=config["lr"], weight_decay=0.0,
                                                    fused=True)}
        self.val_data, self.val_z = cache["validate"], cache["validate_z"]

    @property
    def sampled(self):
        """The network whose weights validation and sampling use: the EMA where one is kept."""
        return self.ema.model if self.ema else self.model

    def extra_state(self):
        return {"ae_path": self.config["ae"], "ae_sha256": self.config["ae_sha256"], "ae_kind": self.ae.kind}

    def optimizer_step(self, loss, step):
        """Backward, one AdamW step, and the EMA of the weights (a copy of them before step `ema_start`)."""
        opt = self.optimizers["opt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if self.ema:
            self.ema.update(self.model, decay=0.0 if step < self.config["ema_start"] else None)

    def save_preview(self, model, step, run_dir, generator, options):
        """Decode one draw of `model` for PREVIEW_SLICES z-indices spread bottom to top into run_dir/samples."""
        cfg, n = self.config, PREVIEW_SLICES
        zs = list(range(0, cfg["num_z"], max(1, cfg["num_z"] // n)))[:n] if cfg["conditional"] else [-1] * n
        z = torch.tensor(zs)
        drawn = self.prior.draw(model, cfg, z.to(self.device), generator, 1.0, options)
        images = decode(self.ae, drawn, z, self.device, cfg.get("scale_factor", 1.0))
        util.save_image_grid(images, run_dir / "samples" / f"sample_{step:07d}.png", nrow=len(zs))


def train(prior, args):
    """`train`: encode the splits once with the frozen stage one, then fit the prior on them."""
    config = tr.resolve_config(args, prior.hypers, prior.presets, prior.stage, exclude=("command",))
    prior.check_config(config)
    rank, world, device = tr.setup_distributed(config.get("device") or "auto")
    if not config.get("ae"):
        raise UserError(f"train needs --ae PATH (a{' VQ-VAE' if prior.needs_codes else ''} stage-one checkpoint "
                        f"such as runs/stage1-demo/best.pt)")
    ae, ae_ckpt = load_stage_one(prior, config["ae"], device)
    config["ae"] = ae_ckpt["_path"]
    if rank == 0:
        print(f"preset: {config['preset']}; stage one: {ae_ckpt['model_type']} from {config['ae']}")
    out = Path(config["out"])
    if Path(config["ae"]).resolve().parent == out.resolve():
        raise UserError(f"--out {out}: is the folder of the stage one that --ae names ({config['ae']}), whose "
                        f"checkpoints the {prior.name}'s would replace; give the prior its own folder")
    tr.claim_run_dir(args, out, rank)  # before encoding, which would replace an existing run's cache
    cache = build_cache(ae, ae_ckpt, config, device, prior.cache_what, out / prior.cache_file,
                        write=rank == 0 and not args.dry_run, tissue=bool(config.get("tissue")))
    config.update(ae_sha256=cache["ae_sha256"], data=cache["data"], num_z=cache["num_z"], spacing=cache["spacing"],
                  conditional=bool((cache["train_z"] >= 0).any()))
    prior.complete_config(config, cache, ae)
    task = tr.build_task(lambda: prior.task(prior, config, device, ae, cache), args)  # a dry run checks it too
    if args.dry_run:
        tr.print_config(config)
        return 0
    if rank == 0:
        print(f"{prior.summary(config)}; {prior.name} {sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M "
              f"parameters")
    return tr.train_and_report(task, config, prior.train_data(cache), args, rank, world, device)


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation


def load_prior(prior, path, device, ae_override=None):
    """The trained prior (eval mode), its frozen stage one and its checkpoint dict."""
    ckpt = util.load_checkpoint(path, kind=prior.kind)
    ckpt["config"] = tr.checked_file_config(ckpt, prior.hypers, f"--ckpt {ckpt['_path']}", [
        ("num_z", tr.is_whole, "a whole number >= 1"), ("conditional", lambda v: isinstance(v, bool), "true or false"),
        ("data", lambda v: isinstance(v, str), "a folder path"),
        ("spacing", lambda v: v is None or is_spacing(v), "three voxel sizes > 0 in mm (or absent)"), *prior.derived])
    try:
        model = prior.build(ckpt["config"])
        model.load_state_dict(ckpt["ema" if "ema" in ckpt else "model"])  # the EMA where the run kept one
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"--ckpt {ckpt['_path']}: weights do not match its config "
                        f"({str(err).splitlines()[0][:160]})") from None
    if not (ae_override or isinstance(ckpt.get("ae_path"), str)):
        raise UserError(f"--ckpt {ckpt['_path']}: records no stage-one checkpoint; pass --ae PATH")
    flag = "--ae" if ae_override else recorded_ae_flag(ckpt)
    ae, ae_ckpt = load_stage_one(prior, ae_override or ckpt["ae_path"], device, flag)
    trained_on = ckpt.get("ae_kind")  # absent in checkpoints from before it was recorded: the hash warning below
    if trained_on in ("vae", "vqvae") and trained_on != ae_ckpt["model_type"]:
        raise UserError(f"{flag} {ae_ckpt['_path']}: a {ae_ckpt['model_type'].upper()}, but this {prior.name} was "
                        f"trained on the latents of a {trained_on.upper()}; give the stage one it was trained on")
    recorded = ckpt.get("ae_sha256")
    if util.file_sha256(ae_ckpt["_path"]) != recorded:  # a missing hash differs too
        if recorded and not ae_override:
            # Decoding through another stage one gives noise (a PixelCNN's codes index another codebook), and a
            # relative recorded path points elsewhere from another folder: refuse rather than score garbage.
            raise UserError(f"{flag} {ae_ckpt['_path']}: is not the stage one this {prior.name} was trained on (its "
                            f"sha256 differs from the recorded one; a relative recorded path resolves from the "
                            f"current folder): pass --ae with the stage-one checkpoint it was trained on")
        print(f"warning: {ae_ckpt['_path']} is not the stage-one checkpoint this prior was trained on (hash differs)")
    mismatch = prior.stage_one_mismatch(ckpt["config"], ae)
    if mismatch:
        raise UserError(f"{flag} {ae_ckpt['_path']}: {mismatch}; give the stage one this {prior.name} was trained on")
    return model.to(device).eval(), ae, ckpt


def parse_z_spec(text, num_z, flag="--z", model="this model"):
    """'0..31' (inclusive range), '5', or '0,8,16' -> list of ints, each checked against num_z."""
    try:
        if ".." in text:
            lo, hi = (int(v) for v in text.split(".."))
            values = list(range(lo, hi + 1))
            if hi < lo:
                raise UserError(f"{flag} {text}: the range runs backwards; write it low to high ({hi}..{lo})")
        else:
            values = [int(v) for v in text.split(",")]  # an empty item ('', '1,,2') is a typo, not "all"
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a range like 0..31 or a list like 0,8,16") from None
    bad = [v for v in values if not 0 <= v < max(num_z, 1)]
    if not values or bad:
        raise UserError(f"{flag} {text}: z-indices must lie in 0..{max(num_z, 1) - 1} for {model}")
    return values


def sample_grid_z(zs, n):
    """z for n rows of one sample per requested z-index (row-major: a row reads bottom to top)."""
    return torch.tensor(zs * n, dtype=torch.long)


def check_guidance(guidance, config=None):
    """The guidance scale: finite and >= 0 (checked before anything loads, with config None); other than 1
    only for a z-conditioned prior trained with --p-uncond > 0 (else the null-condition output it mixes in
    was never learnt)."""
    if not math.isfinite(guidance) or guidance < 0:
        raise UserError(f"--guidance {guidance}: must be a finite number >= 0 (1: conditional only)")
    if guidance == 1.0 or config is None:
        return guidance
    if not config["conditional"]:
        raise UserError(f"--guidance {guidance}: this prior is unconditional (its data have no z-index), so there "
                        f"is no condition to guide by; use --guidance 1")
    if not config.get("p_uncond", 0) > 0:
        raise UserError(f"--guidance {guidance}: this prior was trained without condition dropout "
                        f"(p_uncond={config.get('p_uncond', 0)}); use --guidance 1")
    return guidance


def generate(prior, model, ae, ckpt, z, device, guidance, options, seed, batch_size=64, callback=None):
    """Draw for each z (in batches) and decode; returns images [N, 1, H, W] and the seconds taken."""
    def draw(gen, step):
        return [prior.draw(model, ckpt["config"], z[i:i + batch_size].to(device), gen, guidance, options,
                           _both(callback, step) if i == 0 else step) for i in range(0, len(z), batch_size)]
    return _timed(prior, draw, ae, ckpt, z, device, seed)


def _both(first, second):
    """A sampler callback that calls `first` (None: nothing) and then `second`."""
    if first is None:
        return second

    def both(*args):
        first(*args)
        second(*args)
    return both


def _timed(prior, draw, ae, ckpt, z, device, seed):
    """Decoded images [N, 1, H, W] of what draw(generator, step) returns (a list of batches), and the seconds
    taken. `step` is a sampler callback that keeps the draw to the CPU cores other processes leave free
    (trainer.ThreadGovernor): a sampler's small tensors on a core another process holds wait many times over."""
    gen = torch.Generator(device=device).manual_seed(seed)
    governor = tr.ThreadGovernor(device, lambda text: print(text, file=sys.stderr), "sampling").start()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), util.autocast(device, enabled=prior.amp):
            drawn = torch.cat(draw(gen, lambda *_: governor.adjust()))
    finally:
        governor.restore()
    images = decode(ae, drawn, z, device, ckpt["config"].get("scale_factor", 1.0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - t0


STACK_ORDERS = ("bottom-up", "middle-out")


def stack_order(prior, config, args):
    """The order `generate_stacks` draws subjects in, None for independent slices (--independent, or a prior
    that draws every slice alone); --order is checked against what the model can do."""
    orders = prior.stack_orders(config)
    if args.independent and args.order:
        raise UserError(f"--order {args.order}: does not apply with --independent (every slice is drawn alone)")
    if args.order and args.order not in orders:
        can = (f"draws subjects {' or '.join(orders)}" if orders
               else f"draws every slice alone{prior.alone_note(config)}")
        raise UserError(f"--order {args.order}: this {prior.name} {can}")
    return None if args.independent or not orders else args.order or orders[0]


def snap_to_stage_one(ae, scale):
    """Drawn latents -> the nearest latents the stage one encodes (a VQ-VAE's code vectors): what a neighbour
    looked like in training, so each slice of a chain is conditioned on what the next one will see."""
    if ae.kind != "vqvae":
        return lambda latent: latent
    return lambda latent: ae.quantize_latent(latent.float() / scale) * scale


def generate_stacks(prior, model, ae, ckpt, n, device, guidance, options, seed, order=None, batch_size=64):
    """n subjects, every z-index once: images [n * K, 1, H, W] (subject-major, z rising within a subject), z,
    seconds. order None draws each slice alone (`generate`); else slice by slice with `prior.draw_chain`."""
    config = ckpt["config"]
    num_z = config["num_z"]
    z = sample_grid_z(list(range(num_z)), n)
    if order is None:
        images, seconds = generate(prior, model, ae, ckpt, z, device, guidance, options, seed, batch_size)
        return images, z, seconds
    snap = snap_to_stage_one(ae, config.get("scale_factor", 1.0))

    def draw(gen, step):
        return [prior.draw_chain(model, config, min(batch_size, n - i), gen, guidance, options, order,
                                 snap, step).flatten(0, 1) for i in range(0, n, batch_size)]
    images, seconds = _timed(prior, draw, ae, ckpt, z, device, seed)
    return images, z, seconds


def gif_recorder(ae, ckpt, z, device, max_frames=40):
    """A sampler callback that decodes the predicted x0 at evenly spaced steps into GIF frames."""
    frames = []

    def callback(i, num_steps, x_t, x0_pred):
        every = max(1, num_steps // max_frames)
        if i % every == 0 or i == num_steps - 1:
            imgs = decode(ae, x0_pred.float(), z[:len(x0_pred)], device, ckpt["config"].get("scale_factor", 1.0))
            frames.append(util.image_grid(imgs, nrow=min(len(imgs), 8)))

    return frames, callback


def prepare_sampling(prior, args):
    """Checks shared by sample and evaluate, the loaded prior, and its checked options."""
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n {args.n} --batch-size {args.batch_size}: both must be at least 1")
    check_guidance(args.guidance)
    device = util.pick_device(args.device)
    model, ae, ckpt = load_prior(prior, args.ckpt, device, args.ae)
    options = prior.sample_options(args, ckpt["config"])
    check_guidance(args.guidance, ckpt["config"])
    return device, model, ae, ckpt, options


def check_image_path(path, flag, animated=False):
    """A path an image (an animation if `animated`) can be written to: not a folder, an image file name of a
    format Pillow writes (animated: one it writes frames into), in a writable folder."""
    from PIL import Image

    path = Path(path)
    image_format = None if path.is_dir() else Image.registered_extensions().get(path.suffix.lower())
    if image_format is None or image_format not in (Image.SAVE_ALL if animated else Image.SAVE):
        example = "process.gif" if animated else "samples.png"
        raise UserError(f"{flag} {path}: not {'an animation' if animated else 'an image'} file name (e.g. {example})")
    util.check_writable(path.parent, flag)
    return path


def sample_cmd(prior, args):
    """`sample`: a PNG grid, a row per sample and a column per requested z-index (or, with --subjects, whole
    subjects as NIfTI volumes)."""
    if args.subjects is not None:
        return subjects_cmd(prior, args)
    if args.independent or args.order:
        flag = "--independent" if args.independent else f"--order {args.order}"
        raise UserError(f"{flag}: applies to whole subjects (--subjects N, and evaluate); a grid's slices are "
                        f"always drawn alone")
    args.n = 1 if args.n is None else args.n
    device, model, ae, ckpt, options = prepare_sampling(prior, args)
    config = ckpt["config"]
    if args.z is not None and not config["conditional"]:
        raise UserError(f"--z {args.z}: this {prior.name} is unconditional (its data have no z-index), so there is "
                        f"no z-index to choose; leave --z out")
    zs = (parse_z_spec(f"0..{config['num_z'] - 1}" if args.z is None else args.z, config["num_z"],
                       model=f"--ckpt {ckpt['_path']}") if config["conditional"] else [-1])
    z = sample_grid_z(zs, args.n)
    out = check_image_path(args.out or prior.sample_out, "--out")
    if getattr(args, "gif", None):
        check_image_path(args.gif, "--gif", animated=True)
    frames, callback = gif_recorder(ae, ckpt, z, device) if getattr(args, "gif", None) else ([], None)
    images, seconds = generate(prior, model, ae, ckpt, z, device, args.guidance, options, args.seed,
                               args.batch_size, callback)
    util.save_image_grid(images, out, nrow=len(zs))
    text, _ = prior.describe(options)
    print(f"{len(images)} samples ({text}, guidance {args.guidance}) in {seconds:.2f}s: "
          f"{seconds / len(images) * 1000:.1f} ms per image -> {out}")
    labels = tissue_maps(images, config, args)
    if labels is not None:
        seg, over = util.save_labelled_grids(images, labels, dataset.SEG_CLASS_LEVELS, out, nrow=len(zs))
        print(f"tissue maps (OASIS seg levels 0/85/170/255) -> {seg}; over the samples -> {over}")
    if labels is not None and options.get("labels") is not None:
        given = dataset.fit_square(options["labels"], images.shape[-1], nearest=True)
        scores = evaluation.dice_scores(torch.from_numpy(labels), torch.from_numpy(given).expand(len(labels), -1, -1))
        per_tissue = ", ".join(f"{name} {scores[f'dice/{name}']:.3f}" for name in dataset.LABELS[1:])
        print(f"the samples follow --labels {args.labels}: Dice of their tissue maps against it {per_tissue} "
              f"(mean {scores['dice_mean']:.3f})")
    if frames:
        util.save_gif(frames, args.gif)
        print(f"denoising GIF ({len(frames)} frames of decoded x0 predictions) -> {args.gif}")
    return 0


def tissue_maps(images, config, args, labeller=None):
    """Tissue classes uint8 [N, H, W] of generated slices by the labeller of the prior's data (the segmenter
    trained on its real train pairs, evaluation.segmenter_for; `labeller` where the caller has it already); None
    with a note where the data has no tissue maps, or with --no-tissue-maps."""
    if not args.tissue_maps:
        return None
    if labeller is None:
        try:
            labeller = evaluation.segmenter_for(config["data"], images.shape[-1])
        except UserError as err:
            print(f"note: no tissue maps written: {err}")
            return None
    return evaluation.segment(labeller, images).to(torch.uint8).numpy()


def check_subjects_dir(path):
    """The folder `sample --subjects` writes into: not a file, an image name or a run folder."""
    path = Path(path)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".nii", ".gz"):
        raise UserError(f"--out {path}: with --subjects, --out is a folder (e.g. subjects/), not a file name")
    if path.is_dir() and any(path.glob("*.pt")):
        raise UserError(f"--out {path}: holds checkpoints (a run folder); write the subjects to another folder")
    if path.is_dir() and any(path.glob("subject_*.nii.gz")):
        # never mixed with (or overwriting) an earlier draw: the folder is read back as one dataset
        raise UserError(f"--out {path}: already holds subject_*.nii.gz from an earlier run; choose a new folder")
    util.check_writable(path, "--out")
    return path


def subjects_cmd(prior, args):
    """`sample --subjects N`: N whole subjects, each a NIfTI volume subject_NNN.nii.gz (uint8, slices in z order,
    the training data's voxel size), and subjects.png: per subject, axial slices and mid-sagittal/coronal
    reslices."""
    given = [f for f, v in (("--n", args.n), ("--z", args.z), ("--gif", getattr(args, "gif", None)),
                            ("--labels", getattr(args, "labels", None))) if v is not None]
    if given:
        raise UserError(f"{given[0]}: does not apply with --subjects (a subject holds every z-index once; "
                        f"--subjects N sets how many)")
    if args.subjects < 1:
        raise UserError(f"--subjects {args.subjects}: must be at least 1")
    out = check_subjects_dir(args.out or "subjects")
    args.n = args.subjects
    device, model, ae, ckpt, options = prepare_sampling(prior, args)
    config = ckpt["config"]
    if not config["conditional"]:
        raise UserError(f"--subjects: this {prior.name} was trained on slices without z-indices "
                        f"({config['data']}), so it cannot stack them into subjects")
    order = stack_order(prior, config, args)
    if order is None and not args.independent:
        raise UserError(f"--subjects: this {prior.name} draws every slice alone{prior.alone_note(config)}, so a "
                        f"stack of its slices is not one subject; pass --independent to write such stacks anyway")
    images, z, seconds = generate_stacks(prior, model, ae, ckpt, args.subjects, device, args.guidance, options,
                                         args.seed, order, args.batch_size)
    size = images.shape[-1]
    spacing = config.get("spacing") or list(dataset.voxel_spacing(config["data"], size)[0])
    stacks = util.to_uint8(images).reshape(args.subjects, config["num_z"], size, size)
    for i, stack in enumerate(stacks):
        dataset.write_volume(stack, out / f"subject_{i:03d}.nii.gz", spacing)
    util.save_subject_sheet(stacks, spacing, out / "subjects.png")
    labels = tissue_maps(images, config, args)
    if labels is not None:  # NAME_seg.nii.gz beside NAME.nii.gz: dataset.py reads the folder back with its labels
        maps = labels.reshape(stacks.shape)
        for i, stack in enumerate(maps):
            dataset.write_volume(stack, out / f"subject_{i:03d}{dataset.LABEL_SUFFIX}.nii.gz", spacing)
        util.save_subject_sheet(dataset.SEG_CLASS_LEVELS[maps], spacing, out / "subjects_seg.png")
        print(f"tissue maps -> {out}/subject_000{dataset.LABEL_SUFFIX}.nii.gz ... and {out / 'subjects_seg.png'}")
    text, _ = prior.describe(options)
    how = "slices drawn alone" if order is None else f"drawn {order}, each slice conditioned on its neighbour"
    print(f"{args.subjects} subjects x {config['num_z']} slices ({how}; {text}, guidance {args.guidance}) in "
          f"{seconds:.2f}s; voxel {' x '.join(f'{v:.2f}' for v in spacing)} mm -> {out}/subject_000.nii.gz ... "
          f"and {out / 'subjects.png'}")
    return 0


def follow_metrics(prior, model, ae, ckpt, device, guidance, options, seed, batch_size=64):
    """For a prior drawn from tissue maps: one sample per real test slice, drawn for its map and z-index; Dice
    between each map and the labeller's segmentation of its sample (`follow/*`), beside the labeller's Dice on
    the real slices themselves (`follow_real/*`: the most a sample can score by this labeller)."""
    config = ckpt["config"]
    size = ae.resolution
    test = dataset.load_split(config["data"], "test", size=size, labels=True)
    if test.labels is None:
        raise UserError(f"{config['data']}: has no tissue maps for its test split, which the tissue-conditioned "
                        f"evaluation draws from")
    real, z = test.tensors()
    z = z if config["conditional"] else torch.full_like(z, -1)
    grid = config["latent_shape"][-1]

    def draw(gen, step):
        return [prior.draw(model, config, z[i:i + batch_size].to(device), gen, guidance,
                           {**options, "tissue": tissue_grid(test.labels[i:i + batch_size], grid)}, step)
                for i in range(0, len(z), batch_size)]
    samples, _ = _timed(prior, draw, ae, ckpt, z, device, seed)
    labeller = evaluation.segmenter_for(config["data"], size)
    target = torch.from_numpy(test.labels)
    metrics = {f"follow/{k}": v for k, v in evaluation.dice_scores(evaluation.segment(labeller, samples),
                                                                   target).items()}
    metrics.update({f"follow_real/{k}": v for k, v in evaluation.dice_scores(evaluation.segment(labeller, real),
                                                                             target).items()})
    metrics["follow_slices"] = len(z)
    return metrics


def evaluate_cmd(prior, args):
    """`evaluate`: n subjects (n samples per z-index) scored slice by slice against real validate slices, and as
    stacks against real validate subjects (see evaluation.py)."""
    if args.tstr < 0:
        raise UserError(f"--tstr {args.tstr}: steps must be 0 (skip) or more")
    if args.tstr and not args.tissue_maps:
        raise UserError(f"--tstr {args.tstr}: needs tissue maps for the samples, which --no-tissue-maps turns off")
    if not args.tstr and not args.tstr_two_subjects:
        raise UserError("--no-tstr-two-subjects: applies only with --tstr STEPS")
    util.check_json_path(args.out, "--out")
    device, model, ae, ckpt, options = prepare_sampling(prior, args)
    config = ckpt["config"]
    if not config["conditional"] and args.n < 2:
        raise UserError(f"--n {args.n}: this {prior.name} is unconditional, so --n is the number of samples, and "
                        f"their metrics need at least 2")
    labeller = None
    if args.tstr:  # the labeller first: data without tissue maps is refused before the samples are drawn
        try:
            labeller = evaluation.segmenter_for(config["data"], ae.resolution)
        except UserError as err:
            raise UserError(f"--tstr {args.tstr}: needs tissue maps for the samples ({err})") from None
    if not config["conditional"]:
        if args.order or args.independent:
            flag = f"--order {args.order}" if args.order else "--independent"
            raise UserError(f"{flag}: this {prior.name} is unconditional (no z-index), so it draws no stacks")
        z = sample_grid_z([-1], args.n)
        images, seconds = generate(prior, model, ae, ckpt, z, device, args.guidance, options, args.seed,
                                   args.batch_size)
        metrics = evaluation.evaluate_samples(images, z, config["data"])
    else:
        order = stack_order(prior, config, args)
        images, z, seconds = generate_stacks(prior, model, ae, ckpt, args.n, device, args.guidance, options,
                                             args.seed, order, args.batch_size)
        metrics = evaluation.evaluate_samples(images, z, config["data"])
        metrics["stack/order"] = order or "independent"
        metrics.update(evaluation.consistency_metrics(images.reshape(args.n, config["num_z"], *images.shape[-2:]),
                                                      config["data"]))
    metrics.update(prior.describe(options)[1], guidance=args.guidance, ms_per_image=seconds / len(images) * 1000)
    if config.get("tissue"):
        metrics.update(follow_metrics(prior, model, ae, ckpt, device, args.guidance, options, args.seed,
                                      args.batch_size))
    if args.tstr:
        labels = tissue_maps(images, config, args, labeller)
        metrics.update(evaluation.train_on_synthetic(images, torch.from_numpy(labels), config["data"],
                                                     steps=args.tstr, seed=args.seed,
                                                     two_subjects=args.tstr_two_subjects))
    evaluation.report(metrics, args.out)
    return 0


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(prior, argv):
    """train | sample | evaluate sub-commands of a prior script."""
    p = util.ArgumentParser(description=prior.doc)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help=f"train the {prior.name} on a frozen stage-one model")
    groups = tr.add_common_args(t, prior.hypers, prior.presets)
    groups["run"].add_argument("--ae", default=None, help="stage-one checkpoint (runs/NAME/best.pt)")
    groups["run"].add_argument("--data", default=None, help="dataset (default: the one stage one was trained on)")
    for command, text in (("sample", "sample slices for chosen z-indices"),
                          ("evaluate", "generation metrics against real validate slices")):
        s = sub.add_parser(command, help=text)
        s.add_argument("--ckpt", required=True, help=f"{prior.name} checkpoint (runs/NAME/best.pt)")
        s.add_argument("--ae", default=None, help="override the stage-one checkpoint recorded in --ckpt")
        s.add_argument("--n", type=int, default=None if command == "sample" else 16,
                       help="samples per z-index (default 1)" if command == "sample" else
                       "samples per z-index, i.e. subjects, scored slice by slice and as stacks")
        s.add_argument("--guidance", type=float, default=1.0,
                       help="classifier-free guidance scale (1: conditional only; above 1 follows z more closely, "
                            "at twice the cost)")
        s.add_argument("--seed", type=util.seed_arg, default=0, help="sampling seed")
        s.add_argument("--batch-size", type=int, default=64, help="samples (subjects, slice by slice) drawn at once")
        s.add_argument("--device", default="auto", help="auto | cpu | cuda")
        s.add_argument("--independent", action="store_true",
                       help="draw each slice of a subject alone (what a prior without neighbour conditioning does)")
        s.add_argument("--order", choices=STACK_ORDERS, default=None,
                       help="how a neighbour-conditioned prior draws a subject: from z = 0 up, or from the middle "
                            "slice outwards (default: middle-out where the model can, else bottom-up)")
        s.add_argument("--tissue-maps", action=argparse.BooleanOptionalAction, default=True,
                       help="label every sample with its tissue classes by the segmenter of the prior's data "
                            "(trained once on its real train pairs and cached; needs seg maps)")
        prior.add_sample_args(s)
        if command == "evaluate":
            s.add_argument("--tstr", type=int, default=0, metavar="STEPS",
                           help="train-on-synthetic / test-on-real: train the segmenter for STEPS steps on the "
                                "samples and their tissue maps, on as many real pairs, on 2 real subjects with and "
                                "without the samples (unless --no-tstr-two-subjects); Dice of each on the real test "
                                "split (0: skip)")
            s.add_argument("--tstr-two-subjects", action=argparse.BooleanOptionalAction, default=True,
                           help="with --tstr: also the rows on 2 real subjects with and without the samples (two "
                                "of the four segmenter trainings; make demo skips them)")
        if command == "sample":
            s.add_argument("--z", default=None, help="z-indices: a range 0..31, or a list 0,8,16 (default: all)")
            s.add_argument("--subjects", type=int, default=None,
                           help="write N whole subjects as NIfTI volumes (subject_NNN.nii.gz) and a figure of their "
                                "slices and reslices (subjects.png) into the folder --out")
            s.add_argument("--out", default=None,
                           help=f"PNG grid, a row per sample and a column per z-index (default {prior.sample_out}); "
                                f"with --subjects a folder (default subjects)")
            if prior.gif:
                s.add_argument("--gif", default=None, help="also write the denoising process (decoded x0 predictions)")
            if prior.from_maps:
                s.add_argument("--labels", default=None, metavar="MAP",
                               help="a tissue map PNG (OASIS seg levels 0/85/170/255, as sample writes them, or "
                                    "classes 0..3): every sample's anatomy follows it (a model trained with "
                                    "--tissue); give the map's slice as --z")
        else:
            s.add_argument("--out", default=None, help="write the metrics as JSON here")
    return p.parse_args(argv)


def main(prior, argv=None):
    """Dispatch a prior script's sub-command."""
    args = parse_args(prior, argv)
    return {"train": train, "sample": sample_cmd, "evaluate": evaluate_cmd}[args.command](prior, args)
