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
