"""Linear (Ho et al. 2020) vs cosine (Nichol & Dhariwal 2021) noise schedules: how much of the clean
signal survives at each step (alpha-bar) and the log signal-to-noise ratio log(abar / (1 - abar)).

The linear schedule destroys the signal early (abar is ~0 for the last few hundred steps, which
are wasted); the cosine one falls off evenly and its log-SNR is nearly linear in t.

Command (from the repo root):
    python playground/noise_schedules.py                     # -> playground/figures/noise_schedules.png
    python playground/noise_schedules.py --timesteps 500 --out /tmp/schedules.png
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common (which puts the repo root on sys.path)
from _common import FIGURES, save_figure  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402

import util  # noqa: E402
from model_diffusion import NoiseSchedule  # noqa: E402


def parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T")
    p.add_argument("--out", default=str(FIGURES / "noise_schedules.png"), help="figure to write")
    return p.parse_args(argv)


def main(argv=None):
    """Plot alpha-bar and log-SNR over t for both schedules."""
    args = parse_args(argv)
    if args.timesteps < 2:
        raise util.UserError(f"--timesteps {args.timesteps}: need at least 2")
    fig, (ax_abar, ax_snr) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, colour in (("linear", "tab:blue"), ("cosine", "tab:orange")):
        sched = NoiseSchedule(kind, args.timesteps)
        t = range(args.timesteps)
        abar = sched.alphas_cumprod.numpy()
        ax_abar.plot(t, abar, color=colour, label=kind)
        ax_snr.plot(t, sched.log_snr.numpy(), color=colour, label=kind)
        half = int((abar > 0.5).sum())
        print(f"{kind:6s}: abar(T/2) = {abar[args.timesteps // 2]:.4f}, abar(T-1) = {abar[-1]:.2e}, "
              f"abar < 0.5 from t = {half}")
    ax_abar.set(title="signal kept: alpha-bar(t)", xlabel="t", ylabel="alpha-bar")
    ax_snr.set(title="log SNR = log(abar / (1 - abar))", xlabel="t", ylabel="log SNR")
    for ax in (ax_abar, ax_snr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, args.out)
    return 0


if __name__ == "__main__":
    util.run_cli(main)
