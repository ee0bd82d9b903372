"""The forward (noising) process q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) applied to one real
slice in pixel space, at several t, for the linear and the cosine schedule (same noise for both).

With the linear schedule the anatomy is gone by about t = 600; with the cosine one it fades
evenly until the end. (The models diffuse latents, not pixels; this shows the schedules' pace.)

Command (from the repo root; the embedded dataset is built once at data/embedded_64 if needed):
    python playground/forward_diffusion.py                     # -> playground/figures/forward_diffusion.png
    python playground/forward_diffusion.py --data /path/to/OASIS --size 128 --z 20 --t 0 100 300 600 999
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common (which puts the repo root on sys.path)
from _common import FIGURES, save_figure  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import dataset  # noqa: E402
import util  # noqa: E402
from model_diffusion import NoiseSchedule  # noqa: E402


def parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset root (default: the embedded set)")
    p.add_argument("--size", type=int, choices=list(dataset.SIZES), default=64, help="image size")
    p.add_argument("--split", choices=list(dataset.SPLITS), default="validate", help="split to take the slice from")
    p.add_argument("--z", type=int, default=None, help="z-index of the slice (default: the middle one)")
    p.add_argument("--t", type=int, nargs="+", default=[0, 50, 100, 200, 300, 500, 700, 999], help="time steps shown")
    p.add_argument("--timesteps", type=int, default=1000, help="schedule length T")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out", default=str(FIGURES / "forward_diffusion.png"), help="figure to write")
    return p.parse_args(argv)


def pick_slice(split, z):
    """(image [1, 1, S, S] in [-1, 1], its z): the first slice at z (middle z by default; any if unconditional)."""
    images, zs = split.tensors()
    if not split.conditional:
        return util.to_float(images[:1]), -1
    z = split.num_z // 2 if z is None else z
    hits = (zs == z).nonzero().flatten()
    if len(hits) == 0:
        raise util.UserError(f"--z {z}: no slice at this z-index in the {split.split} split "
                             f"(z runs 0..{split.num_z - 1})")
    return util.to_float(images[hits[:1]]), z


def main(argv=None):
    """Noise one slice at each t under both schedules and show the grid."""
    args = parse_args(argv)
    bad = [t for t in args.t if not 0 <= t < args.timesteps]
    if bad:
        raise util.UserError(f"--t {bad[0]}: time steps run 0..{args.timesteps - 1}")
    root = dataset.ensure_dataset(args.data, args.size)
    x0, z = pick_slice(dataset.load_split(root, args.split, size=args.size), args.z)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    kinds = ("linear", "cosine")
    fig, axes = plt.subplots(len(kinds), len(args.t), figsize=(1.6 * len(args.t), 1.9 * len(kinds) + 0.4),
                             squeeze=False)
    for row, kind in enumerate(kinds):
        sched = NoiseSchedule(kind, args.timesteps)
        for col, t in enumerate(args.t):
            xt = sched.q_sample(x0, torch.tensor([t]), noise)
            ax = axes[row, col]
            # Fixed grey range: shows the signal shrinking under the growing noise, not a re-stretched image.
            ax.imshow(xt[0, 0].numpy(), cmap="gray", vmin=-2.5, vmax=2.5)
            ax.set_xticks([])
            ax.set_yticks([])
            abar = sched.alpha_bar(t)
            ax.set_title(f"t={t}\nabar={abar:.3f}" if abar >= 1e-3 else f"t={t}\nabar={abar:.0e}", fontsize=7)
            if col == 0:
                ax.set_ylabel(kind, fontsize=9)
    where = f"z={z}" if z >= 0 else "unconditional data"
    fig.suptitle(f"forward diffusion of one {args.split} slice ({where}, {args.size}x{args.size}), "
                 f"grey range [-2.5, 2.5]", fontsize=9)
    fig.tight_layout()
    save_figure(fig, args.out)
    return 0


if __name__ == "__main__":
    util.run_cli(main)
