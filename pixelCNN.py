"""Stage two (prior over VQ codes): a conditional gated PixelCNN over the VQ-VAE code grid.

The model follows van den Oord et al., 2016, "Conditional Image Generation with PixelCNN Decoders":
- the code indices [B, h, w] are embedded (nn.Embedding) and fed to a vertical and a horizontal stack;
- the vertical stack sees the rows above, the horizontal stack the codes to the left in the current row,
  so the receptive field has no blind spot;
- every layer is gated, tanh(W_f * x + V_f c) * sigmoid(W_g * x + V_g c), where c is the z-index
  (slice position, -1 = unknown) embedded by `module.ConditionEmbedding` with a null token;
- the horizontal stack has residual connections, every layer sends a skip connection to the output head
  (ReLU -> 1x1 conv -> ReLU -> 1x1 conv) which gives logits over the K codes at every position.

Public API:
- `GatedPixelCNN(n_codes, ...)`: `forward(indices, z) -> logits [B, K, h, w]`; `model.config` is a dict of
  plain keyword values (JSON-saveable) with `GatedPixelCNN(**model.config)` rebuilding the model.
- `sample_codes(model, shape, z, temperature, generator, guidance, ...)`: batched autoregressive sampling
  in raster order.  Both stacks are cached and advanced incrementally (one new row of the vertical stack
  per row, one new column of the horizontal stack per position), which gives exactly the logits of
  `forward` at about the compute of a single forward pass per grid.
- `bits_per_code(logits, targets)`, `code_loss(model, indices, z, p_uncond)`: training losses.

Commands:
    python pixelCNN.py train --ae runs/stage1-vqvae/best.pt                   # demo preset on CPU
    python pixelCNN.py train --ae runs/vq-full/best.pt --preset full --out runs/pixelcnn-full
    python pixelCNN.py train --resume runs/pixelcnn-demo
    python pixelCNN.py sample --ckpt runs/pixelcnn-demo/best.pt --n 2 --z 0..31 --temperature 1.0 \
        --seed 0 --out grid.png
    python pixelCNN.py sample --ckpt runs/pixelcnn-demo/best.pt --z 0,8,16,24 --guidance 2   # follow z more closely
    python pixelCNN.py evaluate --ckpt runs/pixelcnn-demo/best.pt --n 4
    torchrun --nproc_per_node=4 pixelCNN.py train --ae runs/vq-full/best.pt --preset full
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainer as tr
import util
from module import ConditionEmbedding
from util import UserError

# Temperatures at or below this are treated as 0: greedy (argmax) sampling.
GREEDY_TEMPERATURE = 1e-4


# ------------------------------------------------------------------------------------------
# Model
#
# Masked convolutions are implemented by padding + cropping (shifted convolutions) rather than by
# multiplying weights with a mask: the kernels only hold the taps that may be used, so causality is a
# property of the shapes (a loaded checkpoint or an optimiser step cannot break it), no FLOPs are spent on
# taps that are always zero, and the same code runs on a cropped window of rows/columns during sampling.


def _gate(pre):
    """Gated activation unit: tanh of the first half of the channels times sigmoid of the second half."""
    f, g = pre.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


def _shift_down(x):
    """Move a feature map down by one row (zero row on top), so row i only holds rows < i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class GatedLayer(nn.Module):
    """One gated PixelCNN layer: vertical stack, vertical->horizontal link, horizontal stack, skip output."""

    def __init__(self, hidden, kernel_size, first, cond_dim=0, dropout=0.0):
        super().__init__()
        self.pad = kernel_size // 2
        self.first = first
        # Vertical: a (p+1) x k kernel on an input padded by p rows on top only, so output row r covers
        # rows r-p..r (the current row included; the link below shifts it out of the horizontal stack).
        self.v_conv = nn.Conv2d(hidden, 2 * hidden, (self.pad + 1, kernel_size))
        self.link = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        # Horizontal: a 1 x (p+1) kernel on a row padded by p on the left covers columns c-p..c (type B);
        # the first layer (type A) uses 1 x p taps and drops the last output column, covering c-p..c-1.
        self.h_conv = nn.Conv2d(hidden, 2 * hidden, (1, self.pad if first else self.pad + 1))
        self.h_out = nn.Conv2d(hidden, hidden, 1)
        self.skip = nn.Conv2d(hidden, hidden, 1)
        self.cond_proj = nn.Linear(cond_dim, 4 * hidden) if cond_dim else None
        self.dropout = nn.Dropout(dropout)

    def cond_terms(self, cond):
        """Per-stack condition biases [B, 2H, 1, 1] (V_f c, V_g c) for the vertical and horizontal stack."""
        if self.cond_proj is None or cond is None:
            return 0.0, 0.0
        v, h = self.cond_proj(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        return v, h

    def vertical_pre(self, v, pad_top):
        """Vertical pre-activations [B, 2H, rows, w] of `v` padded with `pad_top` zero rows (p for a whole grid)."""
        return self.v_conv(F.pad(v, (self.pad, self.pad, pad_top, 0)))

    def vertical(self, v, cond_v):
        """Vertical step on a whole grid: (next vertical features, link into the horizontal stack)."""
        pre = self.vertical_pre(v, self.pad)
        return _gate(pre + cond_v), self.link(_shift_down(pre))

    def horizontal_pre(self, h, pad_left):
        """Horizontal pre-activations of `h` padded with `pad_left` zero columns (p for whole rows)."""
        return self.h_conv(F.pad(h, (pad_left, 0, 0, 0)))

    def horizontal_out(self, pre, h, link, cond_h):
        """Gate, residual and skip of the horizontal stack: (next horizontal features, skip output)."""
        out = self.dropout(_gate(pre + link + cond_h))
        # No residual in the type-A layer: its input holds the current code, which must stay hidden.
        h_next = self.h_out(out) if self.first else h + self.h_out(out)
        return h_next, self.skip(out)

    def horizontal(self, h, link, cond_h):
        """Horizontal step on whole rows: (next horizontal features, skip output)."""
        pre = self.horizontal_pre(h, self.pad)
        if self.first:
            pre = pre[..., : h.shape[-1]]  # type A: output column c covered c-p..c-1
        return self.horizontal_out(pre, h, link, cond_h)


class GatedPixelCNN(nn.Module):
    """Conditional gated PixelCNN over a code grid: `forward(indices [B,h,w], z [B]) -> logits [B,K,h,w]`.

    `n_codes` K, `hidden` channels of both stacks, `n_layers` gated layers (the first of type A), odd
    `kernel_size` k (each layer reaches k//2 rows up and k//2 columns to each side), `conditional` on the
    z-index, `cond_dim` width of its embedding (default `hidden`), `dropout` in the horizontal stack.
    `num_z` (number of z-indices) is recorded for the callers only: the sinusoidal z code needs no table.
    The grid size is free: one model handles 16x16 and 32x32 grids alike.
    """

    def __init__(self, n_codes, hidden=128, n_layers=12, kernel_size=5, conditional=True, num_z=32,
                 cond_dim=None, dropout=0.0):
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if n_layers < 1 or n_codes < 2 or hidden < 1:
            raise ValueError(f"need n_layers >= 1, n_codes >= 2, hidden >= 1; got {n_layers}, {n_codes}, {hidden}")
        cond_dim = (cond_dim or hidden) if conditional else 0
        self.config = dict(n_codes=int(n_codes), hidden=int(hidden), n_layers=int(n_layers),
                           kernel_size=int(kernel_size), conditional=bool(conditional), num_z=int(num_z),
                           cond_dim=int(cond_dim) or None, dropout=float(dropout))
        self.n_codes = n_codes
        self.embedding = nn.Embedding(n_codes, hidden)
        self.cond_embed = ConditionEmbedding(cond_dim, null_token=True) if conditional else None
        self.layers = nn.ModuleList(
            GatedLayer(hidden, kernel_size, first=(i == 0), cond_dim=cond_dim, dropout=dropout)
            for i in range(n_layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, n_codes, 1))

    def embed(self, indices):
        """Code indices [B, h, w] -> embedded grid [B, hidden, h, w]."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def condition(self, z, batch):
        """Condition vector [B, cond_dim] for z-indices (-1 = unknown), or None for an unconditional model."""
        if self.cond_embed is None:
            return None
        if z is None:
            z = torch.full((batch,), -1, dtype=torch.long, device=self.embedding.weight.device)
        return self.cond_embed(z.reshape(-1).to(self.embedding.weight.device))

    def vertical_links(self, x, cond):
        """Run the vertical stack on embedded rows; returns each layer's link [B, 2H, rows, w]."""
        links, v = [], x
        for layer in self.layers:
            cond_v, _ = layer.cond_terms(cond)
            v, link = layer.vertical(v, cond_v)
            links.append(link)
        return links

    def horizontal_logits(self, x, links, cond):
        """Run the horizontal stack and the head given the vertical links; returns logits [B, K, rows, cols]."""
        h, skips = x, 0.0
        for layer, link in zip(self.layers, links):
            _, cond_h = layer.cond_terms(cond)
            h, skip = layer.horizontal(h, link, cond_h)
            skips = skips + skip
        return self.head(skips)

    def forward_embedded(self, x, z):
        """Logits from an already embedded grid [B, hidden, h, w] (lets tests take gradients w.r.t. inputs)."""
        cond = self.condition(z, x.shape[0])
        return self.horizontal_logits(x, self.vertical_links(x, cond), cond)

    def forward(self, indices, z=None):
        """Code indices [B, h, w] (and z-index [B]) -> logits [B, n_codes, h, w]."""
        return self.forward_embedded(self.embed(indices), z)


# ------------------------------------------------------------------------------------------
# Losses


def bits_per_code(logits, targets):
    """Cross-entropy of `targets` [B, h, w] under `logits` [B, K, h, w] in bits, mean over positions."""
    log_probs = torch.log_softmax(logits.float(), dim=1)
    picked = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return -picked.mean() / math.log(2.0)


def code_loss(model, indices, z=None, p_uncond=0.0):
    """Training loss: (cross-entropy in nats, bits per code as a detached float tensor).

    With `p_uncond > 0` each z is replaced by -1 (the null token) with that probability, so the same model
    also learns the unconditional prior that `sample_codes(..., guidance=s)` needs.
    """
    if z is not None and p_uncond > 0:
        drop = torch.rand(z.shape, device=z.device) < p_uncond
        z = torch.where(drop, torch.full_like(z, -1), z)
    logits = model(indices, z)
    loss = F.cross_entropy(logits.float(), indices)
    return loss, (loss.detach() / math.log(2.0))


# ------------------------------------------------------------------------------------------
# Sampling


def _draw(logits, temperature, generator=None):
    """Pick codes from logits [B, K]: argmax when temperature <= GREEDY_TEMPERATURE, else sample softmax(l/T).

    Sampling is by inverse CDF with one uniform per row, so a generator's stream is used identically
    whatever the logits are (reproducible, and easy to replay in tests).
    """
    if temperature <= GREEDY_TEMPERATURE:
        return logits.argmax(dim=1)
    probs = torch.softmax(logits.float() / temperature, dim=1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)
    cdf = probs.cumsum(dim=1)
    return (cdf < u * cdf[:, -1:]).sum(dim=1).clamp(max=logits.shape[1] - 1)


class _RasterCache:
    """Sampling state of one condition: every vertical layer's rows so far and the current row's horizontal stack.

    Each new row of the vertical stack and each new column of the horizontal stack is computed from the cached
    p rows above / p columns to the left only, so a whole grid costs about one forward pass of compute (instead
    of one forward pass per position) and gives exactly the logits of `model.forward`.
    """

    def __init__(self, model, x, cond):
        self.model, self.x, self.pad = model, x, model.layers[0].pad
        batch, hidden, h, w = x.shape
        self.terms = [layer.cond_terms(cond) for layer in model.layers]
        self.vs = [x.new_zeros(batch, hidden, h, w) for _ in model.layers]
        self.hs = [x.new_zeros(batch, hidden, 1, w) for _ in model.layers]
        self.links, self.row = None, -1

    def start_row(self, i):
        """Advance the vertical stack by the completed row i-1 and set the links into row i."""
        p, r, below = self.pad, i - 1, self.x
        if r < 0:
            zero = self.x.new_zeros(self.x.shape[0], 2 * self.x.shape[1], 1, self.x.shape[3])
            self.links = [layer.link(zero) for layer in self.model.layers]  # the shifted-in zero row
        else:
            lo, self.links = max(0, r - p), []
            for layer, v, (cond_v, _) in zip(self.model.layers, self.vs, self.terms):
                pre = layer.vertical_pre(below[:, :, lo: r + 1], pad_top=p - (r - lo))
                self.links.append(layer.link(pre))
                v[:, :, r: r + 1] = _gate(pre + cond_v)
                below = v
        self.row = i

    def logits_at(self, j):
        """Logits [B, K] at (row, j), from the codes already in `x` left of j in this row and the rows above."""
        p, lo = self.pad, max(0, j - self.pad)
        h_prev, skips = self.x[:, :, self.row: self.row + 1], 0.0
        for layer, h, link, (_, cond_h) in zip(self.model.layers, self.hs, self.links, self.terms):
            hi = j if layer.first else j + 1  # type A excludes column j, type B includes it
            window = F.pad(h_prev[..., lo:hi], (p - (j - lo), 0, 0, 0))
            # One column at a time the convolutions are matrix products; F.linear avoids the per-call setup
            # of a convolution primitive, which dominated sampling time.  Mirrors GatedLayer.horizontal_out.
            pre = _as_linear(layer.h_conv, window) + link[:, :, 0, j] + _flat(cond_h)
            out = _gate(pre)
            h_next = _as_linear(layer.h_out, out) + (0.0 if layer.first else h_prev[:, :, 0, j])
            h[:, :, 0, j] = h_next
            skips, h_prev = skips + _as_linear(layer.skip, out), h
        head = self.model.head  # ReLU, 1x1 conv, ReLU, 1x1 conv
        return _as_linear(head[3], F.relu(_as_linear(head[1], F.relu(skips))))


def _as_linear(conv, x):
    """A convolution whose kernel covers all of `x` ([B, C, kh, kw], or [B, C] for 1x1) as one matrix product."""
    return F.linear(x.flatten(1), conv.weight.flatten(1), conv.bias)


def _flat(cond_term):
    """A per-layer condition term ([B, 2H, 1, 1] or the scalar 0.0 without condition) as [B, 2H] or 0.0."""
    return cond_term.flatten(1) if torch.is_tensor(cond_term) else cond_term


def _fill_raster(model, caches, codes, x, temperature, generator, guidance):
    """Fill `codes` (and its embedding `x`, which the caches read) position by position in raster order."""
    for i in range(codes.shape[1]):
        for cache in caches:
            cache.start_row(i)
        for j in range(codes.shape[2]):
            logits = [cache.logits_at(j) for cache in caches]
            if len(logits) == 2:  # classifier-free guidance: uncond + s * (cond - uncond)
                logits[0] = logits[1] + guidance * (logits[0] - logits[1])
            picked = _draw(logits[0], temperature, generator)
            codes[:, i, j] = picked
            x[:, :, i, j] = model.embedding(picked)
    return codes


@torch.no_grad()
def sample_codes(model, shape, z=None, temperature=1.0, generator=None, guidance=1.0, batch_size=None,
                 num_threads=1):
    """Sample code grids [B, h, w] in raster order.

    `z` is a LongTensor [B] of z-indices (-1 = unknown); for an unconditional model pass `z=None` and
    `batch_size`.  `temperature` divides the logits; `temperature <= 1e-4` (0 included) means greedy
    argmax decoding, which is deterministic.  With a `generator` (on the model's device) the samples are
    reproducible.  `guidance != 1` mixes in the null-condition logits (classifier-free guidance; only
    meaningful for a model trained with `p_uncond > 0`), at twice the cost.  The model is put in eval mode,
    and torch's CPU thread count is set to `num_threads` (None: unchanged) for the duration: the per-position
    tensors are tiny, and on a shared CPU two threads were measured to be many times slower than one.
    """
    batch = z.shape[0] if z is not None else batch_size
    if batch is None:
        raise ValueError("sample_codes needs z or batch_size")
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        codes = torch.zeros(batch, *shape, dtype=torch.long, device=model.embedding.weight.device)
        x = model.embed(codes).contiguous()
        cond = model.condition(z, batch)
        caches = [_RasterCache(model, x, cond)]
        if guidance != 1.0 and cond is not None:
            caches.append(_RasterCache(model, x, model.condition(None, batch)))
        return _fill_raster(model, caches, codes, x, temperature, generator, guidance)
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# Command line (train / sample): added by the CLI work

PRESETS = {
    "full": dict(lr_schedule="cosine", hidden=192, n_layers=15, kernel_size=5, dropout=0.0, p_uncond=0.1, batch_size=64, lr=3e-4,
                 warmup=1000, steps=100000, log_every=100, val_every=5000, ckpt_every=5000, sample_every=1, seed=0),
    "demo": dict(lr_schedule="cosine", hidden=64, n_layers=8, kernel_size=5, dropout=0.0, p_uncond=0.1, batch_size=32, lr=1e-3,
                 warmup=50, steps=400, log_every=25, val_every=200, ckpt_every=200, sample_every=1, seed=0),
    "smoke": dict(lr_schedule="cosine", hidden=16, n_layers=3, kernel_size=3, dropout=0.0, p_uncond=0.1, batch_size=8, lr=1e-3,
                  warmup=2, steps=6, log_every=2, val_every=3, ckpt_every=3, sample_every=1, seed=0),
}
PRIOR_KEYS = ("hidden", "n_layers", "kernel_size", "dropout")


def build_prior(config):
    """The PixelCNN of a config."""
    return GatedPixelCNN(config["n_codes"], conditional=config["conditional"], num_z=config["num_z"],
                         **{k: config[k] for k in PRIOR_KEYS})


class PixelCNNTask(tr.Task):
    """Cross-entropy on cached code grids; validate bits per code and a decoded sample grid."""

    kind = "pixelcnn"
    select_metric = ("val/bits_per_code", "min")
    items_name = "grids"

    def __init__(self, config, device, ae, cache, world):
        super().__init__()
        self.config, self.device, self.ae = config, device, ae
        torch.manual_seed(config["seed"])
        self.model = build_prior(config).to(device)
        self.models = {"model": self.model}
        self.optimizers = {"opt": torch.optim.AdamW(self.model.parameters(), lr=config["lr"], weight_decay=0.0)}
        self.val_codes, self.val_z = cache["validate"], cache["validate_z"]
        self.model_train = self.model
        if world > 1:
            self.model_train = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
        if config.get("compile"):
            self.model_train = torch.compile(self.model_train)

    def extra_state(self):
        return {"ae_path": self.config["ae"], "ae_sha256": self.config["ae_sha256"], "grid": list(self.config["grid"])}

    def train_step(self, batch, step):
        cfg = self.config
        codes, z = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device)
        lr = tr.lr_at(step, cfg)
        tr.set_lr(self.optimizers["opt"], lr)
        with util.autocast(self.device):
            loss, bits = code_loss(self.model_train, codes, z if cfg["conditional"] else None, cfg["p_uncond"])
        opt = self.optimizers["opt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss/ce": loss.detach(), "bits_per_code": bits.detach(), "lr": torch.tensor(lr)}

    @torch.no_grad()
    def validate(self, step, run_dir):
        cfg = self.config
        n = min(len(self.val_codes), 512)
        total = 0.0
        for i in range(0, n, 64):
            codes = self.val_codes[i:min(i + 64, n)].to(self.device)
            z = self.val_z[i:min(i + 64, n)].to(self.device) if cfg["conditional"] else None
            logits = self.model(codes, z).float()
            total += bits_per_code(logits, codes).item() * len(codes)
        metrics = {"val/bits_per_code": total / n}
        # Counted from the step (not from validations since start), so a resumed run samples at the same steps.
        if (step // cfg["val_every"]) % cfg["sample_every"] == 0 or step == cfg["steps"]:
            zs = list(range(0, cfg["num_z"], max(1, cfg["num_z"] // 8)))[:8] if cfg["conditional"] else [-1] * 8
            z = torch.tensor(zs)
            codes = sample_codes(self.model, tuple(cfg["grid"]), z.to(self.device) if cfg["conditional"] else None,
                                 generator=torch.Generator(device=self.device).manual_seed(cfg["seed"]),
                                 batch_size=len(zs))
            imgs = decode_codes(self.ae, codes, z, self.device)
            util.save_image_grid(imgs, run_dir / "samples" / f"sample_{step:07d}.png", nrow=len(zs))
        return metrics


@torch.no_grad()
def decode_codes(ae, codes, z, device, batch_size=64):
    """Decode code grids with the frozen VQ-VAE decoder."""
    out = []
    conditional = util.model_is_conditional(ae)
    for i in range(0, len(codes), batch_size):
        zz = z[i:i + batch_size].to(device) if conditional else None
        with util.autocast(device):
            out.append(ae.decode_indices(codes[i:i + batch_size].to(device), zz).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def load_vqvae(path, device, flag="--ae"):
    """The frozen stage-one model, refused unless it is a VQ-VAE (a VAE has no codes to model)."""
    ae, ae_ckpt = util.load_autoencoder(path, device, flag=flag)
    if ae_ckpt["model_type"] != "vqvae":
        raise UserError(f"{flag} {ae_ckpt['_path']}: is a {ae_ckpt['model_type'].upper()} checkpoint; the PixelCNN "
                        f"models discrete codes and needs a VQ-VAE (train one with prestage_train.py --model vqvae, "
                        f"or use stable_diffusion.py for a VAE)")
    return ae, ae_ckpt


def train(args):
    """pixelCNN.py train."""
    config = tr.resolve_config(args, PRESETS, "pixelcnn", exclude=("command",))
    rank, world, device = tr.setup_distributed(config.get("device") or "auto")
    if not config.get("ae"):
        raise UserError("train needs --ae PATH (a VQ-VAE stage-one checkpoint such as runs/stage1-vq/best.pt)")
    ae, ae_ckpt = load_vqvae(config["ae"], device)
    config["ae"] = ae_ckpt["_path"]
    if rank == 0:
        print(f"preset: {config['preset']}; stage one: vqvae from {config['ae']}")
    out = Path(config["out"])
    tr.claim_run_dir(args, out, rank)  # before encoding, which would replace an existing run's codes.pt
    cache = util.stage_two_cache(ae, ae_ckpt, config, device, "indices", out / "codes.pt", write=rank == 0)
    config.update(ae_sha256=cache["ae_sha256"], data=cache["data"], num_z=cache["num_z"],
                  conditional=bool((cache["train_z"] >= 0).any()), grid=list(cache["train"].shape[1:]),
                  n_codes=ae.n_embed)
    if args.dry_run:
        tr.print_config(config)
        return 0
    task = PixelCNNTask(config, device, ae, cache, world)
    if rank == 0:
        print(f"codes {config['grid']} of {config['n_codes']}; PixelCNN "
              f"{sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M parameters")
    return tr.train_and_report(task, config, (cache["train"], cache["train_z"]), args, rank, world, device)


def load_prior(path, device, ae_override=None):
    """Rebuild the PixelCNN and its frozen VQ-VAE from a checkpoint."""
    ckpt = util.load_checkpoint(path, kind="pixelcnn")
    model = build_prior(ckpt["config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"--ckpt {ckpt['_path']}: weights do not match its config ({str(err).splitlines()[0][:160]})") from None
    ae, ae_ckpt = load_vqvae(ae_override or ckpt["ae_path"], device, "--ae" if ae_override else util.recorded_ae_flag(ckpt))
    if util.file_sha256(ae_ckpt["_path"]) != ckpt["ae_sha256"]:
        print(f"warning: {ae_ckpt['_path']} is not the stage-one checkpoint this prior was trained on (hash differs)")
    return model.to(device).eval(), ae, ckpt


def check_sample_args(args):
    """One clear line for sample/evaluate flags that would otherwise fail deep inside sampling."""
    if args.n < 1 or args.batch_size < 1:
        raise UserError(f"--n {args.n} --batch-size {args.batch_size}: both must be at least 1")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise UserError(f"--guidance {args.guidance}: must be a finite number >= 0 (1: conditional only)")


def guidance_for(args, config):
    """The guidance scale to sample with; a scale other than 1 needs a z-conditioned prior trained with
    --p-uncond > 0 (else the null-condition logits it mixes in were never learned)."""
    if args.guidance != 1.0 and not (config["conditional"] and config.get("p_uncond", 0) > 0):
        raise UserError(f"--guidance {args.guidance}: this prior was trained without condition dropout "
                        f"(conditional={config['conditional']}, p_uncond={config.get('p_uncond', 0)}); "
                        f"use --guidance 1")
    return args.guidance


def generate(model, ae, ckpt, z, device, temperature, seed, batch_size=64, guidance=1.0):
    """Sample code grids for each z (batched) and decode them; returns images and seconds taken."""
    config = ckpt["config"]
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    codes = []
    for i in range(0, len(z), batch_size):
        zz = z[i:i + batch_size].to(device) if config["conditional"] else None
        codes.append(sample_codes(model, tuple(ckpt["grid"]), zz if zz is not None else None, temperature=temperature,
                                  generator=gen, guidance=guidance, batch_size=len(z[i:i + batch_size])))
    images = decode_codes(ae, torch.cat(codes), z, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - t0


def sample_cmd(args):
    """pixelCNN.py sample."""
    check_sample_args(args)
    device = util.pick_device(args.device)
    model, ae, ckpt = load_prior(args.ckpt, device, args.ae)
    config = ckpt["config"]
    zs = util.parse_z_spec(args.z, config["num_z"]) if config["conditional"] else [-1]
    z = util.sample_grid_z(zs, args.n)
    out = Path(args.out)
    util.check_writable(out.parent, "--out")
    images, seconds = generate(model, ae, ckpt, z, device, args.temperature, args.seed, args.batch_size,
                               guidance_for(args, config))
    util.save_image_grid(images, out, nrow=len(zs))
    print(f"{len(images)} samples (temperature {args.temperature}, guidance {args.guidance}) in {seconds:.2f}s: "
          f"{seconds / len(images) * 1000:.1f} ms per image -> {out}")
    return 0


def evaluate_cmd(args):
    """pixelCNN.py evaluate: sample n per z-index and score them against real validate slices."""
    import evaluation

    check_sample_args(args)
    device = util.pick_device(args.device)
    model, ae, ckpt = load_prior(args.ckpt, device, args.ae)
    config = ckpt["config"]
    zs = list(range(config["num_z"])) if config["conditional"] else [-1]
    z = util.sample_grid_z(zs, args.n)
    images, seconds = generate(model, ae, ckpt, z, device, args.temperature, args.seed, args.batch_size,
                               guidance_for(args, config))
    metrics = evaluation.evaluate_samples(images, z, config["data"])
    metrics.update(sampler="pixelcnn", temperature=args.temperature, guidance=args.guidance,
                   ms_per_image=seconds / len(images) * 1000)
    evaluation.report(metrics, args.out)
    return 0


def parse_args(argv):
    """train | sample | evaluate sub-commands."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the prior on the codes of a frozen VQ-VAE")
    tr.add_common_args(t, PRESETS)
    t.add_argument("--ae", default=None, help="VQ-VAE stage-one checkpoint (runs/NAME/best.pt)")
    t.add_argument("--data", default=None, help="dataset (default: the one stage one was trained on)")
    t.add_argument("--hidden", type=int, default=None, help="channels of the gated stacks")
    t.add_argument("--n-layers", type=int, default=None, help="gated layers (first is type A, the rest type B)")
    t.add_argument("--kernel-size", type=int, default=None, help="odd kernel size of the masked convolutions")
    t.add_argument("--dropout", type=float, default=None, help="dropout in the gated layers")
    t.add_argument("--p-uncond", type=float, default=None, help="probability of dropping the z condition")
    t.add_argument("--warmup", type=int, default=None, help="LR warm-up steps")
    t.add_argument("--sample-every", type=int, default=None, help="write a sample grid every N validations")
    for name, helptext in (("sample", "sample slices for chosen z-indices"), ("evaluate", "generation metrics")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--ckpt", required=True, help="PixelCNN checkpoint (runs/NAME/best.pt)")
        s.add_argument("--ae", default=None, help="override the VQ-VAE checkpoint recorded in --ckpt")
        s.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (near 0: greedy)")
        s.add_argument("--guidance", type=float, default=1.0,
                       help="classifier-free guidance scale on the logits (1: conditional only; above 1 follows "
                            "z more closely, at twice the cost)")
        s.add_argument("--seed", type=int, default=0, help="sampling seed")
        s.add_argument("--batch-size", type=int, default=64, help="grids sampled at once")
        s.add_argument("--device", default="auto", help="auto | cpu | cuda")
        s.add_argument("--n", type=int, default=1 if name == "sample" else 4, help="samples per z-index")
        if name == "sample":
            s.add_argument("--z", default="0..31", help="z-indices: a range 0..31, or a list 0,8,16")
            s.add_argument("--out", default="samples_pixelcnn.png", help="PNG grid: a row per sample, a column per z")
        else:
            s.add_argument("--out", default=None, help="write the metrics as JSON here")
    return p.parse_args(argv)


def main(argv=None):
    """Dispatch the sub-command."""
    args = parse_args(argv)
    return {"train": train, "sample": sample_cmd, "evaluate": evaluate_cmd}[args.command](args)


if __name__ == "__main__":
    util.run_cli(main)
