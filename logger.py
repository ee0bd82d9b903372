"""Plot the training curves of one or more runs from their log.jsonl files.

Every numeric quantity that a trainer logs (loss/rec, loss/kl, w/kl, lr, val/ssim, images_per_s, ...)
gets a panel with step on the x axis; several runs are overlaid, one colour per run. Families of
series such as the timestep-quartile losses loss_t/q1..q4 share one panel. A run still in progress
(last line cut mid-write), series that start late or exist in one run only, and values logged as
"nan" / "inf" strings (skipped) are all fine.

Commands:
    python logger.py runs/stage1-demo                        # writes runs/stage1-demo/curves.png
    python logger.py runs/ldm-demo runs/ldm-cosine --smooth 10 --out compare.png
"""
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

import util
from util import UserError

SKIP_KEYS = {"step", "epoch"}
FAMILY = re.compile(r"(?P<base>.+/)(?P<member>q\d+)$")  # loss_t/q1..q4 -> panel "loss_t/q*"
PANEL_ORDER = ("loss", "val", "w/", "lr", "vq", "images_per_s")


def read_run(run_dir):
    """{series name: (steps [n], values [n])} of the finite numeric values in RUN_DIR/log.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise UserError(f"{run_dir}: no log.jsonl in this directory (is it a run directory?)")
    series = defaultdict(lambda: ([], []))
    for i, record in enumerate(util.read_jsonl(log)):
        if not isinstance(record, dict):
            continue
        step = _number(record.get("step"))
        step = i if step is None else step
        for key, value in record.items():
            value = _number(value)
            if key in SKIP_KEYS or value is None:
                continue
            series[key][0].append(step)
            series[key][1].append(value)
    return {k: (np.asarray(s, dtype=float), np.asarray(v, dtype=float)) for k, (s, v) in series.items()}


def _number(value):
    """A finite float from a logged value, or None ('nan'/'inf' strings, text, bools, lists)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def panel_of(name):
    """(panel title, line label within the panel) for a series name."""
    m = FAMILY.fullmatch(name)
    return (f"{m['base']}q*", m["member"]) if m else (name, None)


def _panel_rank(title):
    """Sort key: losses first, then validation, weights, lr, the rest alphabetically."""
    for rank, prefix in enumerate(PANEL_ORDER):
        if title.startswith(prefix):
            return rank, title
    return len(PANEL_ORDER), title


def moving_average(values, k):
    """Centred mean over k points (the window shrinks at both ends), same length as `values`.

    Centred rather than trailing so that the smoothed curve does not lag behind the raw one.
    """
    if k <= 1 or len(values) == 0:
        return values
    csum = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    idx = np.arange(len(values))
    lo = np.maximum(idx - (k - 1) // 2, 0)
    hi = np.minimum(idx + k // 2 + 1, len(values))
    return (csum[hi] - csum[lo]) / (hi - lo)


def use_log_scale(arrays):
    """Log y when every value is positive and they span more than two decades."""
    values = np.concatenate([a for a in arrays if len(a)]) if arrays else np.empty(0)
    return len(values) > 1 and values.min() > 0 and values.max() / values.min() > 100


def _widen_flat(ax, arrays):
    """Give a (nearly) constant panel a +-5% y range: rounding noise of the smoothing is not a trend."""
    values = np.concatenate([a for a in arrays if len(a)])
    lo, hi = values.min(), values.max()
    if hi - lo <= 1e-9 * max(abs(hi), abs(lo), 1e-30):
        pad = max(abs(hi) * 0.05, 1e-12)
        ax.set_ylim(lo - pad, hi + pad)


def run_labels(run_dirs):
    """Legend names: the run directory names, or longer paths where two names clash."""
    names = [Path(r).name or str(r) for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(Path(r)) for r in run_dirs]


def collect_panels(runs):
    """{panel title: [(run index, member label, steps, values)]} from the per-run series."""
    panels = defaultdict(list)
    for r, series in enumerate(runs):
        for name in sorted(series):
            title, member = panel_of(name)
            steps, values = series[name]
            panels[title].append((r, member, steps, values))
    return dict(sorted(panels.items(), key=lambda kv: _panel_rank(kv[0])))


def plot(runs, labels, out, smooth=1):
    """Draw every panel into one figure at `out`; returns the number of panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = collect_panels(runs)
    if not panels:
        raise UserError("nothing to plot: the log(s) hold no numeric values yet")
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        members = sorted({m for _, m, _, _ in lines if m})
        for r, member, steps, values in lines:
            order = np.argsort(steps, kind="stable")
            steps, values = steps[order], values[order]
            colour = colours[r % len(colours)]
            style = styles[members.index(member) % len(styles)] if member else "-"
            label = labels[r] if not member else f"{labels[r]} {member}" if len(labels) > 1 else member
            # Sparse series (validation metrics) are drawn raw: a K-point window would flatten them.
            if smooth > 1 and len(values) >= 3 * smooth:
                ax.plot(steps, values, style, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(steps, moving_average(values, smooth), style, color=colour, linewidth=1.5, label=label)
            else:
                ax.plot(steps, values, style, color=colour, linewidth=1.2, marker="." if len(values) < 20 else None,
                        label=label)
        if use_log_scale([v for _, _, _, v in lines]):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # a constant lr reads 0.0004, not 1e-16+4e-4
            _widen_flat(ax, [v for _, _, _, v in lines])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(labels) > 1 or members:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    suffix = f" (moving average over {smooth} points)" if smooth > 1 else ""
    fig.suptitle(", ".join(labels) + suffix, fontsize=11)
    # leave the top strip to the title: plain tight_layout lets it overlap the first row's panel titles
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.0 * rows)))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror or err})") from None
    finally:
        plt.close(fig)
    return len(panels)


def parse_args(argv):
    """The command line."""
    p = util.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding log.jsonl")
    p.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curves.png for one run, "
                                               "curves.png for several)")
    p.add_argument("--smooth", type=int, default=1, metavar="K",
                   help="centred moving average over K logged points, raw values drawn faint (series with "
                        "fewer than 3K points stay raw); 1 = none")
    return p.parse_args(argv)


def main(argv=None):
    """Read the logs, plot, say what was written."""
    args = parse_args(argv)
    if args.smooth < 1:
        raise UserError(f"--smooth {args.smooth}: must be at least 1")
    runs = [read_run(r) for r in args.runs]
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1
                                           else Path("curves.png"))
    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg"):
        raise UserError(f"--out {out}: use a .png, .pdf, .svg or .jpg file name")
    n_panels = plot(runs, run_labels(args.runs), out, args.smooth)
    print(f"wrote {out} ({n_panels} panels, {len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0


if __name__ == "__main__":
    util.run_cli(main)
