"""What every playground script shares: the repo on sys.path, the figures folder, saving a figure.

Each script imports this first (it sits beside them, so `python playground/x.py` finds it).
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIGURES = Path(__file__).resolve().parent / "figures"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # util, dataset, model_* live in the repo root

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed

from util import UserError  # noqa: E402


def count_gflop(step_fn, batch, digits=3):
    """GFLOP per item of `step_fn(batch)` (forward + backward for training), attention on the math path, which
    torch.utils.flop_counter can see; rounded to `digits` decimals (None: not rounded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        step_fn(batch)
    gflop = counter.get_total_flops() / batch / 1e9
    return gflop if digits is None else round(gflop, digits)


def save_figure(fig, out, dpi=120):
    """Write the figure (creating its folder) and close it; an unwritable path is a one-line error."""
    import matplotlib.pyplot as plt

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror or err})") from None
    finally:
        plt.close(fig)
    print(f"wrote {out}")
    return out
