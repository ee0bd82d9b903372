"""Cyclical KL annealing (Fu et al. 2019) as stage one uses it: the KL weight over the training steps
for a few (cycles, ramp) settings, from prestage_train.kl_weight_at.

Each cycle restarts the weight at 0 so the decoder can again rely on the latent code, then ramps it
linearly to the maximum over the first `ramp` fraction of the cycle and holds it there.

Command (from the repo root):
    python playground/kl_annealing.py                        # -> playground/figures/kl_annealing.png
    python playground/kl_annealing.py --steps 1500 --max-weight 1e-6 --settings 1:1.0 2:0.5 4:0.25
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common (which puts the repo root on sys.path)
from _common import FIGURES, save_figure  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import util  # noqa: E402
import trainer  # noqa: E402
from prestage_train import HYPERS, PRESETS, kl_weight_at  # noqa: E402


def _setting(text):
    """'cycles:ramp' -> (int, float)."""
    try:
        cycles, ramp = text.split(":")
        cycles, ramp = int(cycles), float(ramp)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cycles:ramp such as 4:0.5, got {text!r}") from None
    if cycles < 1 or not 0 <= ramp <= 1:
        raise argparse.ArgumentTypeError(f"{text}: need cycles >= 1 and 0 <= ramp <= 1")
    return cycles, ramp


def parse_args(argv):
    """The command line (defaults: the 'full' preset's steps and maximum weight)."""
    full = trainer.preset_values(HYPERS, PRESETS, "full")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=full["steps"], help="total training steps")
    p.add_argument("--max-weight", type=float, default=full["kl_weight"], help="maximum KL weight")
    p.add_argument("--settings", type=_setting, nargs="+", metavar="CYCLES:RAMP",
                   default=[(1, 1.0), (1, 0.25), (full["kl_cycles"], full["kl_ramp"]), (4, 0.25)],
                   help="(cycles, ramp) pairs to compare")
    p.add_argument("--out", default=str(FIGURES / "kl_annealing.png"), help="figure to write")
    return p.parse_args(argv)


def main(argv=None):
    """One panel per setting, weight over steps."""
    args = parse_args(argv)
    if args.steps < 1:
        raise util.UserError(f"--steps {args.steps}: need at least 1")
    steps = np.unique(np.linspace(0, args.steps - 1, min(args.steps, 2000)).astype(int))
    fig, axes = plt.subplots(len(args.settings), 1, figsize=(8, 1.7 * len(args.settings) + 0.6), sharex=True,
                             squeeze=False)
    for ax, (cycles, ramp) in zip(axes[:, 0], args.settings):
        w = [kl_weight_at(int(s), args.steps, args.max_weight, cycles, ramp) for s in steps]
        ax.plot(steps, w, color="tab:purple")
        ax.fill_between(steps, w, alpha=0.15, color="tab:purple")
        ax.set_ylabel("KL weight", fontsize=8)
        ax.set_title(f"cycles={cycles}, ramp={ramp}: mean weight {np.mean(w) / args.max_weight:.2f} x max",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(f"cyclical KL annealing, max weight {args.max_weight:g}, {args.steps} steps", fontsize=10)
    fig.tight_layout()
    save_figure(fig, args.out)
    return 0


if __name__ == "__main__":
    util.run_cli(main)
