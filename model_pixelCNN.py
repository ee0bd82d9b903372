"""Stage two (prior over VQ codes): a conditional gated PixelCNN over the VQ-VAE code grid.

The model follows van den Oord et al., 2016, "Conditional Image Generation with PixelCNN Decoders":
- the code indices [B, h, w] are embedded (nn.Embedding) and fed to a vertical and a horizontal stack;
- the vertical stack sees the rows above, the horizontal stack the codes to the left in the current row,
  so the receptive field has no blind spot;
- every layer is gated, tanh(W_f * x + V_f c) * sigmoid(W_g * x + V_g c), where c is the z-index
  (slice position, -1 = unknown) embedded by `module.ConditionEmbedding` with a null token;
- the horizontal stack has residual connections, every layer sends a skip connection to the output head
  (ReLU -> 1x1 conv -> ReLU -> 1x1 conv) which gives logits over the K codes at every position;
- optionally (`position`, on in every preset of pixelCNN.py) each layer is also conditioned on the cell's row and
  column, (`code_dim`) codes are embedded and predicted through their stage-one codebook vectors, and (`coarse`)
  every layer also sees a half-resolution summary of the rows above (`CoarseContext`), a coarse-to-fine path.

Public API:
- `GatedPixelCNN(n_codes, ...)`: `forward(indices, z) -> logits [B, K, h, w]`; `model.config` is a dict of
  plain keyword values (JSON-saveable) with `GatedPixelCNN(**model.config)` rebuilding the model.
- `sample_codes(model, shape, z, temperature, generator, guidance, ...)`: batched autoregressive sampling
  in raster order.  Both stacks are cached and advanced incrementally (one new row of the vertical stack
  per row, one new column of the horizontal stack per position), which gives exactly the logits of
  `forward` at about the compute of a single forward pass per grid.
- `bits_per_code(logits, targets)`, `code_loss(model, indices, z, p_uncond)`: training losses.

The command line (train / sample / evaluate) is `pixelCNN.py`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from module import ConditionEmbedding

# Temperatures at or below this are treated as 0: greedy (argmax) sampling.
GREEDY_TEMPERATURE = 1e-4
# Position features of a model with `position`: sin and cos of 4 frequencies of the row and of the column.
POSITION_FEATURES = 16


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
    """Move a feature map down by one row (zero row on top), so row i only holds rows < i. (A negative pad crops
    the last row into a contiguous tensor, where a slice would leave a view for the next convolution to copy.)"""
    return F.pad(x, (0, 0, 1, -1))


class GatedLayer(nn.Module):
    """One gated PixelCNN layer: vertical stack, vertical->horizontal link, horizontal stack, skip output."""

    def __init__(self, hidden, kernel_size, first, cond_dim=0, dropout=0.0, pos_dim=0, dilation=1):
        super().__init__()
        self.pad = kernel_size // 2
        self.first = first
        # Dilation d spaces the taps d apart, so a layer reaches d p rows up and d p columns to each side with the
        # taps of kernel k; the type-A layer stays dense (its taps must stop exactly one column short).
        self.dilation = 1 if first else int(dilation)
        self.reach = self.dilation * self.pad
        # Vertical: a (p+1) x k kernel on an input padded by p d rows on top only, so output row r covers
        # rows r-pd..r (the current row included; the link below shifts it out of the horizontal stack).
        self.v_conv = nn.Conv2d(hidden, 2 * hidden, (self.pad + 1, kernel_size), dilation=self.dilation)
        self.link = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        # Horizontal: a 1 x (p+1) kernel on a row padded by p d on the left covers columns c-pd..c (type B);
        # the first layer (type A) uses 1 x p taps and drops the last output column, covering c-p..c-1.
        self.h_conv = nn.Conv2d(hidden, 2 * hidden, (1, self.pad if first else self.pad + 1),
                                dilation=(1, self.dilation))
        self.h_out = nn.Conv2d(hidden, hidden, 1)
        self.skip = nn.Conv2d(hidden, hidden, 1)
        self.cond_proj = nn.Linear(cond_dim, 4 * hidden) if cond_dim else None
        self.pos_proj = nn.Conv2d(pos_dim, 4 * hidden, 1) if pos_dim else None
        self.dropout = nn.Dropout(dropout)

    def cond_terms(self, cond, pos=None):
        """Per-stack condition biases (V_f c, V_g c) for the vertical and horizontal stack: [B, 2H, 1, 1] from the
        z condition plus [1, 2H, rows, w] from the position features `pos` where the model has them (or 0.0)."""
        v = h = 0.0
        if self.cond_proj is not None and cond is not None:
            v, h = self.cond_proj(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        if self.pos_proj is not None:
            pv, ph = self.pos_proj(pos).chunk(2, dim=1)
            v, h = v + pv, h + ph
        return v, h

    def vertical_pre(self, v, pad_top):
        """Vertical pre-activations [B, 2H, rows, w] of `v` padded with `pad_top` zero rows (the reach for a whole
        grid)."""
        return self.v_conv(F.pad(v, (self.reach, self.reach, pad_top, 0)))

    def vertical(self, v, cond_v):
        """Vertical step on a whole grid: (next vertical features, link into the horizontal stack)."""
        pre = self.vertical_pre(v, self.reach)
        return _gate(pre + cond_v), self.link(_shift_down(pre))

    def horizontal_pre(self, h, pad_left):
        """Horizontal pre-activations of `h` padded with `pad_left` zero columns (the reach for whole rows)."""
        return self.h_conv(F.pad(h, (pad_left, 0, 0, 0)))

    def horizontal_out(self, pre, h, link, cond_h):
        """Gate, residual and skip of the horizontal stack: (next horizontal features, skip output)."""
        out = self.dropout(_gate(pre + link + cond_h))
        # No residual in the type-A layer: its input holds the current code, which must stay hidden.
        h_next = self.h_out(out) if self.first else h + self.h_out(out)
        return h_next, self.skip(out)

    def horizontal(self, h, link, cond_h):
        """Horizontal step on whole rows: (next horizontal features, skip output)."""
        pre = self.horizontal_pre(h, self.reach)
        if self.first:
            pre = pre[..., : h.shape[-1]]  # type A: output column c covered c-p..c-1
        return self.horizontal_out(pre, h, link, cond_h)


class CoarseContext(nn.Module):
    """A causal half-resolution path: what the rows above hold, summarised at half the grid's resolution.

    The embedded grid is average-pooled 2x2 (coarse row R holds fine rows 2R and 2R+1), then `n_layers` residual
    gated layers of vertical-stack convolutions (coarse row R sees coarse rows R-p..R and every column within p)
    reach k//2 coarse rows per layer, twice the fine stacks' reach; the result is shifted down one coarse row and
    repeated back to the fine grid, so fine row i receives coarse rows < i // 2, i.e. fine rows < 2 (i // 2) <= i:
    whole rows that raster order has already drawn.  Every gated layer reads it through its position term.
    """

    def __init__(self, hidden, n_layers, kernel_size, cond_dim=0, pos_dim=0):
        super().__init__()
        self.pad = kernel_size // 2
        self.inp = nn.Conv2d(hidden + pos_dim, hidden, 1)
        self.convs = nn.ModuleList(nn.Conv2d(hidden, 2 * hidden, (self.pad + 1, kernel_size))
                                   for _ in range(n_layers))
        self.cond_proj = nn.ModuleList(nn.Linear(cond_dim, 2 * hidden) for _ in range(n_layers)) if cond_dim else None
        self.out = nn.Conv2d(hidden, hidden, 1)

    def forward(self, x, cond=None, pos=None):
        """Embedded grid [B, H, h, w] (condition [B, cond_dim], position features [1, P, h, w]) -> [B, H, h, w]."""
        h, w = x.shape[-2:]
        if pos is not None:
            x = torch.cat([x, pos.expand(len(x), -1, -1, -1)], 1)
        c = self.inp(F.avg_pool2d(F.pad(x, (0, w % 2, 0, h % 2)), 2))  # zero padding below / right: odd sizes
        for i, conv in enumerate(self.convs):
            pre = conv(F.pad(c, (self.pad, self.pad, self.pad, 0)))
            if self.cond_proj is not None and cond is not None:
                pre = pre + self.cond_proj[i](F.silu(cond))[:, :, None, None]
            c = c + _gate(pre)
        c = _shift_down(self.out(c))
        return c.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[:, :, :h, :w]


class GatedPixelCNN(nn.Module):
    """Conditional gated PixelCNN over a code grid: `forward(indices [B,h,w], z [B]) -> logits [B,K,h,w]`.

    `n_codes` K, `hidden` channels of both stacks, `n_layers` gated layers (the first of type A), odd
    `kernel_size` k (each layer reaches k//2 rows up and k//2 columns to each side), `conditional` on the
    z-index, `cond_dim` width of its embedding (default `hidden`), `dropout` in the horizontal stack.
    `num_z` (number of z-indices) is recorded for the callers only: the sinusoidal z code needs no table.
    With `position` every layer is also conditioned on where it is in the grid (location-dependent conditioning,
    van den Oord et al. 2016 section 2.3: a 1x1 convolution of sinusoids of the row and column, which a model
    with only zero padding to go by can infer only near the border). With `code_dim` D the model also sees each
    code's stage-one vector (a [K, D] buffer that `set_code_vectors` must fill before training): the input
    embedding and the output layer's row of every code are a learned function of that vector plus a per-code
    table that starts at zero, so codes close in the codebook share what the prior learns about each of them
    (1024 codes over ~1.7k training grids: most are rare at every position).
    With `coarse` L, every layer also reads the `CoarseContext` of L half-resolution layers (kernel k), which
    reaches the rows above twice as fast as the fine stacks and sees each row whole. `dilation` (d_1, d_2, ...)
    spaces the taps of layers 2, 3, ... d_1, d_2, ... apart, cycled (as WaveNet's stacks): layer l then reaches
    d_l (k // 2) rows and columns, so 1, 2, 4 over kernel 3 covers every offset up to 7 in three layers.
    The grid size is free: one model handles 16x16 and 32x32 grids alike.
    """

    def __init__(self, n_codes, hidden=128, n_layers=12, kernel_size=5, conditional=True, num_z=32,
                 cond_dim=None, dropout=0.0, code_dim=None, position=False, z_maps=0, z_map_size=16,
                 coarse=0, dilation=(1,)):
        super().__init__()
        dilation = [int(d) for d in dilation]
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if n_layers < 1 or n_codes < 2 or hidden < 1:
            raise ValueError(f"need n_layers >= 1, n_codes >= 2, hidden >= 1; got {n_layers}, {n_codes}, {hidden}")
        if coarse < 0:
            raise ValueError(f"coarse must be >= 0 (layers of the half-resolution path), got {coarse}")
        if not dilation or min(dilation) < 1:
            raise ValueError(f"dilation must be one or more integers >= 1, got {dilation}")
        if z_maps and not conditional:
            raise ValueError("z_maps needs a conditional model (a map per z-index)")
        cond_dim = (cond_dim or hidden) if conditional else 0
        self.config = dict(n_codes=int(n_codes), hidden=int(hidden), n_layers=int(n_layers),
                           kernel_size=int(kernel_size), conditional=bool(conditional), num_z=int(num_z),
                           cond_dim=int(cond_dim) or None, dropout=float(dropout),
                           code_dim=int(code_dim) if code_dim else None, position=bool(position),
                           z_maps=int(z_maps), z_map_size=int(z_map_size), coarse=int(coarse), dilation=dilation)
        self.n_codes = n_codes
        self.embedding = nn.Embedding(n_codes, hidden)
        self.cond_embed = ConditionEmbedding(cond_dim, null_token=True) if conditional else None
        self.layers = nn.ModuleList(
            GatedLayer(hidden, kernel_size, first=(i == 0), cond_dim=cond_dim, dropout=dropout,
                       pos_dim=(POSITION_FEATURES if position else 0) + z_maps + (hidden if coarse else 0),
                       dilation=dilation[(i - 1) % len(dilation)])
            for i in range(n_layers))
        self.coarse = CoarseContext(hidden, coarse, kernel_size, cond_dim, POSITION_FEATURES if position else 0
                                    ) if coarse else None
        # One learned map per z-index (and one for the null token, the last row), read at the grid's size: where
        # each kind of tissue lies at that slice level, which position sinusoids plus a z bias can express only
        # through the gates' nonlinearity.  Zero at the start: the model begins as one without them.
        self.z_map = nn.Parameter(torch.zeros(num_z + 1, z_maps, z_map_size, z_map_size)) if z_maps else None
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, n_codes, 1))
        self.code_in = self.code_out = None
        if code_dim:
            self.register_buffer("code_vectors", torch.zeros(n_codes, code_dim))
            self.code_in, self.code_out = (
                nn.Sequential(nn.Linear(code_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(2))
            nn.init.zeros_(self.embedding.weight)  # the per-code tables start as the function of the vectors
            nn.init.zeros_(self.head[3].weight)

    def positions(self, h, w, z=None):
        """Position features [1 or B, F, h, w]: sin, cos of pi k u for k = 1..4 of the row and column coordinates
        u in [0, 1] (16 channels, `position`), then the learned map of each z-index in `z` [B] (-1: the null map;
        `z_maps` channels, resized to h x w); None for a model with neither."""
        sines = self._sinusoids(h, w) if self.config["position"] else None
        if self.z_map is None:
            return sines
        maps = self.z_map_for(z, h, w)
        return maps if sines is None else torch.cat([sines.expand(len(maps), -1, -1, -1), maps], 1)

    def context(self, x, z, cond):
        """Everything a layer's position term reads for the embedded grid `x` [B, H, h, w] with z-indices `z` [B]
        and condition `cond`: `positions`, then (`coarse`) the `CoarseContext` of `x`; None for none of them."""
        pos = self.positions(*x.shape[-2:], z)
        if self.coarse is None:
            return pos
        summary = self.coarse(x, cond, self._sinusoids(*x.shape[-2:]) if self.config["position"] else None)
        return summary if pos is None else torch.cat([pos.expand(len(summary), -1, -1, -1), summary], 1)

    def z_map_for(self, z, h, w):
        """The learned maps [B, z_maps, h, w] of z-indices `z` [B] (-1 = unknown: the null token's map)."""
        z = z.reshape(-1).to(self.z_map.device)
        maps = self.z_map[torch.where(z < 0, torch.full_like(z, self.z_map.shape[0] - 1), z)]
        if maps.shape[-2:] != (h, w):
            maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        return maps

    def _sinusoids(self, h, w):
        """The 16 position sinusoids [1, POSITION_FEATURES, h, w]."""
        device = self.embedding.weight.device
        k = torch.arange(1, POSITION_FEATURES // 4 + 1, device=device, dtype=torch.float32)
        rows, cols = (torch.linspace(0, 1, n, device=device)[:, None] * k * math.pi for n in (h, w))
        rows, cols = torch.cat([rows.sin(), rows.cos()], 1), torch.cat([cols.sin(), cols.cos()], 1)
        return torch.cat([rows.t()[:, :, None].expand(-1, h, w), cols.t()[:, None, :].expand(-1, h, w)])[None]

    def set_code_vectors(self, codebook):
        """Store the stage-one codebook [K, D], standardised per dimension (its scale is the autoencoder's)."""
        codebook = codebook.detach().float()
        self.code_vectors.copy_((codebook - codebook.mean(0)) / codebook.std(0).clamp_min(1e-8))

    def input_table(self):
        """Embedding of every code, [K, hidden]."""
        table = self.embedding.weight
        return table if self.code_in is None else table + self.code_in(self.code_vectors)

    def output_layer(self):
        """Weight [K, hidden] and bias [K] of the head's last (1x1) layer: one row per code."""
        last = self.head[3]
        weight = last.weight.flatten(1)
        return (weight if self.code_out is None else weight + self.code_out(self.code_vectors)), last.bias

    def embed(self, indices):
        """Code indices [B, h, w] -> embedded grid [B, hidden, h, w], contiguous: the permuted view is channels-last,
        which the convolutions carry through, so every add with a condition term mixed layouts (1.06x a step)."""
        return F.embedding(indices, self.input_table()).permute(0, 3, 1, 2).contiguous()

    def full_z(self, z, batch):
        """z-indices [B] on the model's device, all -1 (unknown) for `z=None`."""
        if z is None:
            return torch.full((batch,), -1, dtype=torch.long, device=self.embedding.weight.device)
        return z.reshape(-1).to(self.embedding.weight.device)

    def condition(self, z, batch):
        """Condition vector [B, cond_dim] for z-indices (-1 = unknown), or None for an unconditional model."""
        if self.cond_embed is None:
            return None
        return self.cond_embed(self.full_z(z, batch))

    def layer_terms(self, cond, pos):
        """Every layer's (vertical, horizontal) condition terms from the z condition and the position features `pos`
        (`positions`, of the whole grid or some of its rows; None without position)."""
        return [layer.cond_terms(cond, pos) for layer in self.layers]

    def forward_embedded(self, x, z):
        """Logits from an already embedded whole grid [B, hidden, h, w] (tests take gradients w.r.t. the input)."""
        cond = self.condition(z, x.shape[0])
        terms = self.layer_terms(cond, self.context(x, self.full_z(z, x.shape[0]), cond))
        links, v = [], x
        for layer, (cond_v, _) in zip(self.layers, terms):
            v, link = layer.vertical(v, cond_v)
            links.append(link)
        h, skips = x, 0.0
        for layer, link, (_, cond_h) in zip(self.layers, links, terms):
            h, skip = layer.horizontal(h, link, cond_h)
            skips = skips + skip
        weight, bias = self.output_layer()
        # Logits channels-last: the softmax over K codes then runs along contiguous rows (`_code_rows`), which made
        # the loss's forward and backward 1.5x faster on CPU than reducing over NCHW's strided channel axis.
        features = self.head[:3](skips).contiguous(memory_format=torch.channels_last)
        return F.conv2d(features, weight[:, :, None, None], bias)

    def forward(self, indices, z=None):
        """Code indices [B, h, w] (and z-index [B]) -> logits [B, n_codes, h, w]."""
        return self.forward_embedded(self.embed(indices), z)


# ------------------------------------------------------------------------------------------
# Losses


def _code_rows(logits):
    """Logits [B, K, h, w] as [B h w, K] rows: a view where the model made them channels-last, else a copy."""
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


def bits_per_code(logits, targets):
    """Cross-entropy of `targets` [B, h, w] under `logits` [B, K, h, w] in bits, mean over positions."""
    log_probs = torch.log_softmax(_code_rows(logits.float()), dim=1)
    picked = log_probs.gather(1, targets.reshape(-1, 1))
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
    loss = F.cross_entropy(_code_rows(logits.float()), indices.reshape(-1))
    return loss, (loss.detach() / math.log(2.0))


# ------------------------------------------------------------------------------------------
# Sampling


def truncate(logits, top_k=0, top_p=1.0):
    """Logits [B, K] with every code outside the `top_k` most likely (0: all) set to -inf, then every code outside
    the smallest set of the remaining ones whose probability, renormalised over them, reaches `top_p` (nucleus
    sampling, Holtzman et al. 2020; 1: all)."""
    if top_k and top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=1, descending=True)
        probs = sorted_logits.softmax(dim=1)
        beyond = probs.cumsum(dim=1) - probs >= top_p  # the more likely codes already hold top_p
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter(1, order, beyond), float("-inf"))
    return logits


def _draw(logits, temperature, generator=None, top_k=0, top_p=1.0):
    """Pick codes from logits [B, K]: argmax when temperature <= GREEDY_TEMPERATURE, else sample softmax(l/T)
    over the codes `truncate` keeps.

    Sampling is by inverse CDF with one uniform per row, so a generator's stream is used identically
    whatever the logits are (reproducible, and easy to replay in tests).
    """
    if temperature <= GREEDY_TEMPERATURE:
        return logits.argmax(dim=1)
    probs = torch.softmax(truncate(logits.float() / temperature, top_k, top_p), dim=1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)
    cdf = probs.cumsum(dim=1)
    # The first code whose cdf exceeds u * total: never one of probability 0 (not even at u = 0), and at most
    # the last code of positive probability (u * total can round up to the total).
    last = (probs > 0).long().cumsum(dim=1).argmax(dim=1)
    return torch.minimum((cdf <= u * cdf[:, -1:]).sum(dim=1), last)


class _RasterCache:
    """Sampling state of one condition: every vertical layer's rows so far and the current row's horizontal stack.

    Each new row of the vertical stack and each new column of the horizontal stack is computed from the cached
    p rows above / p columns to the left only, so a whole grid costs about one forward pass of compute (instead
    of one forward pass per position) and gives exactly the logits of `model.forward`.
    """

    def __init__(self, model, x, z):
        self.model, self.x = model, x
        batch, hidden, h, w = x.shape
        z = model.full_z(z, batch)
        # The position features are kept whole (16 channels plus any z maps and coarse summary), the layers' terms
        # ([B, 2H, 1, w] each) for one row at a time: for the full preset all of them at once would take gigabytes.
        self.z, self.cond, self.terms = z, model.condition(z, batch), None
        self.pos = model.context(x, z, self.cond)
        self.vs = [x.new_zeros(batch, hidden, h, w) for _ in model.layers]
        self.hs = [x.new_zeros(batch, hidden, 1, w) for _ in model.layers]
        self.links, self.row = None, -1
        self.out_weight, self.out_bias = model.output_layer()  # constant while sampling: computed once

    def start_row(self, i):
        """Advance the vertical stack by the completed row i-1 and set the links into row i."""
        r, below = i - 1, self.x
        if r < 0:
            zero = self.x.new_zeros(self.x.shape[0], 2 * self.x.shape[1], 1, self.x.shape[3])
            self.links = [layer.link(zero) for layer in self.model.layers]  # the shifted-in zero row
        else:
            self.links = []
            for layer, v, (cond_v, _) in zip(self.model.layers, self.vs, self.terms):  # self.terms: row r's
                lo = max(0, r - layer.reach)
                pre = layer.vertical_pre(below[:, :, lo: r + 1], pad_top=layer.reach - (r - lo))
                self.links.append(layer.link(pre))
                v[:, :, r: r + 1] = _gate(pre + cond_v)
                below = v
        if self.model.coarse is not None and i % 2 == 0:  # rows 2R and 2R+1 read rows < 2R: now all drawn
            self.pos = self.model.context(self.x, self.z, self.cond)
        self.terms = self.model.layer_terms(self.cond, None if self.pos is None else self.pos[:, :, i: i + 1])
        self.row = i

    def logits_at(self, j):
        """Logits [B, K] at (row, j), from the codes already in `x` left of j in this row and the rows above."""
        h_prev, skips = self.x[:, :, self.row: self.row + 1], 0.0
        for layer, h, link, (_, cond_h) in zip(self.model.layers, self.hs, self.links, self.terms):
            hi = j if layer.first else j + 1  # type A excludes column j, type B includes it
            lo = max(0, j - layer.reach)
            # columns j - reach .. hi - 1, every d-th of them: the dilated taps
            window = F.pad(h_prev[..., lo:hi], (layer.reach - (j - lo), 0, 0, 0))[..., ::layer.dilation]
            # One column at a time the convolutions are matrix products; F.linear avoids the per-call setup
            # of a convolution primitive, which dominated sampling time.  Mirrors GatedLayer.horizontal_out.
            pre = _as_linear(layer.h_conv, window) + link[:, :, 0, j] + _column(cond_h, j)
            out = _gate(pre)
            h_next = _as_linear(layer.h_out, out) + (0.0 if layer.first else h_prev[:, :, 0, j])
            h[:, :, 0, j] = h_next
            skips, h_prev = skips + _as_linear(layer.skip, out), h
        hidden = F.relu(_as_linear(self.model.head[1], F.relu(skips)))  # the head: ReLU, 1x1, ReLU, output layer
        return F.linear(hidden, self.out_weight, self.out_bias)


def _as_linear(conv, x):
    """A convolution whose kernel covers all of `x` ([B, C, kh, kw], or [B, C] for 1x1) as one matrix product."""
    return F.linear(x.flatten(1), conv.weight.flatten(1), conv.bias)


def _column(term, col):
    """A row's condition term ([B or 1, 2H, 1, 1 or w], or the scalar 0.0 without condition) at one column:
    [B or 1, 2H] (a term without position is the same in every column)."""
    if not torch.is_tensor(term):
        return term
    return term[:, :, 0, col if term.shape[3] > 1 else 0]


def _fill_raster(model, caches, codes, x, temperature, generator, guidance, top_k=0, top_p=1.0, callback=None):
    """Fill `codes` (and its embedding `x`, which the caches read) position by position in raster order;
    `callback(i, rows, codes, None)` after each row i."""
    table = model.input_table()
    rows = codes.shape[1]
    for i in range(rows):
        for cache in caches:
            cache.start_row(i)
        for j in range(codes.shape[2]):
            logits = [cache.logits_at(j) for cache in caches]
            if len(logits) == 2:  # classifier-free guidance: uncond + s * (cond - uncond)
                logits[0] = logits[1] + guidance * (logits[0] - logits[1])
            picked = _draw(logits[0], temperature, generator, top_k, top_p)
            codes[:, i, j] = picked
            x[:, :, i, j] = table[picked]
        if callback is not None:
            callback(i, rows, codes, None)
    return codes


@torch.no_grad()
def sample_codes(model, shape, z=None, temperature=1.0, generator=None, guidance=1.0, batch_size=None,
                 num_threads=1, top_k=0, top_p=1.0, callback=None):
    """Sample code grids [B, h, w] in raster order.

    `z` is a LongTensor [B] of z-indices (-1 = unknown); for an unconditional model pass `z=None` and
    `batch_size`.  `temperature` divides the logits; `temperature <= 1e-4` (0 included) means greedy
    argmax decoding, which is deterministic; `top_k` / `top_p` sample among the most likely codes only (see
    `truncate`; after guidance and temperature).  With a `generator` (on the model's device) the samples are
    reproducible.  `guidance != 1` mixes in the null-condition logits (classifier-free guidance; only
    meaningful for a model trained with `p_uncond > 0`), at twice the cost.  The model is put in eval mode,
    and torch's CPU thread count is set to `num_threads` (None: unchanged) for the duration: the per-position
    tensors are tiny, and on a shared CPU two threads were measured to be many times slower than one (on free
    cores two were 1.24x faster: the stage-two scripts pass None and a `callback`, called after each row as
    callback(i, rows, codes, None), that keeps the count to the free cores).
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
        x = model.embed(codes)
        caches = [_RasterCache(model, x, z)]
        if guidance != 1.0 and model.cond_embed is not None:
            caches.append(_RasterCache(model, x, None))
        return _fill_raster(model, caches, codes, x, temperature, generator, guidance, top_k, top_p, callback)
    finally:
        model.train(was_training)
        if num_threads:
            torch.set_num_threads(threads)
