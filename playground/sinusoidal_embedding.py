"""The sinusoidal code (Vaswani et al. 2017) that the models use for the slice z-index and the
diffusion time step, from module.sinusoidal_embedding: emb[p, 2i] = sin(p / 10000^(2i/dim)),
emb[p, 2i+1] = cos(...).

Panels: the code of z = 0..31, the code of t = 0..999, and the cosine similarity between the codes
of every pair of z-indices (neighbouring slices get similar codes, far ones dissimilar codes).
The low dimensions oscillate fast, the high ones slowly: with only 32 positions the slowest
channels are nearly constant, which is why the models put an MLP after the code.

Command (from the repo root):
    python playground/sinusoidal_embedding.py               # -> playground/figures/sinusoidal_embedding.png
    python playground/sinusoidal_embedding.py --z-dim 32 --t-dim 64 --out /tmp/emb.png
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common (which puts the repo root on sys.path)
from _common import FIGURES, save_figure  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import util  # noqa: E402
from module import sinusoidal_embedding  # noqa: E402


def parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-z", type=int, default=32, help="z-indices 0..num_z-1")
    p.add_argument("--timesteps", type=int, default=1000, help="time steps 0..timesteps-1")
    p.add_argument("--z-dim", type=int, default=64, help="code width for the z-index (even)")
    p.add_argument("--t-dim", type=int, default=128, help="code width for the time step (even)")
    p.add_argument("--out", default=str(FIGURES / "sinusoidal_embedding.png"), help="figure to write")
    return p.parse_args(argv)


def main(argv=None):
    """Heat maps of both codes and the z-code similarity matrix."""
    args = parse_args(argv)
    for flag, dim in (("--z-dim", args.z_dim), ("--t-dim", args.t_dim)):
        if dim < 2 or dim % 2:
            raise util.UserError(f"{flag} {dim}: must be an even number >= 2")
    if args.num_z < 2 or args.timesteps < 2:
        raise util.UserError("--num-z and --timesteps must be at least 2")
    z_code = sinusoidal_embedding(torch.arange(args.num_z), args.z_dim)
    t_code = sinusoidal_embedding(torch.arange(args.timesteps), args.t_dim)
    unit = z_code / z_code.norm(dim=1, keepdim=True)
    similarity = unit @ unit.T

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.2, 1.6, 1]})
    panels = [(axes[0], z_code, "z-index", f"z-index code ({args.z_dim} dims)"),
              (axes[1], t_code, "time step t", f"time-step code ({args.t_dim} dims)")]
    for ax, code, ylabel, title in panels:
        im = ax.imshow(code.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set(title=title, xlabel="code dimension (sin, cos interleaved)", ylabel=ylabel)
        fig.colorbar(im, ax=ax, fraction=0.046)
    im = axes[2].imshow(similarity.numpy(), cmap="viridis", interpolation="nearest")
    axes[2].set(title="cosine similarity of z codes", xlabel="z-index", ylabel="z-index")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    print(f"similarity of neighbouring z codes {similarity.diagonal(1).mean():.3f}, "
          f"of z=0 and z={args.num_z - 1}: {similarity[0, -1]:.3f}")
    save_figure(fig, args.out)
    return 0


if __name__ == "__main__":
    util.run_cli(main)
