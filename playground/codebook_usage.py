"""How a trained VQ-VAE uses its codebook over a whole split: code counts sorted from most to least
used, the fraction of codes used at all, and the perplexity exp(H(code distribution)) (= the number
of codes if all were used equally often).

A codebook whose few codes carry most tokens leaves the PixelCNN / diffusion prior little to model;
dead codes are wasted capacity (the EMA quantiser restarts them during training).

Command (from the repo root; the data come from the checkpoint's config unless --data is given):
    python playground/codebook_usage.py --ckpt runs/stage1-vq/best.pt     # -> playground/figures/codebook_usage.png
    python playground/codebook_usage.py --ckpt runs/vq-full/best.pt --split test --out /tmp/codes.png
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common (which puts the repo root on sys.path)
from _common import FIGURES, save_figure  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import dataset  # noqa: E402
import evaluation  # noqa: E402
import util  # noqa: E402
from prestage_train import load_autoencoder  # noqa: E402
from util import UserError  # noqa: E402


def parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="stage-one VQ-VAE checkpoint (best.pt / last.pt or its run dir)")
    p.add_argument("--data", default=None, help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--split", choices=list(dataset.SPLITS), default="validate", help="split to encode")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=str(FIGURES / "codebook_usage.png"), help="figure to write")
    return p.parse_args(argv)


def main(argv=None):
    """Encode the split, count codes, plot sorted counts and the cumulative share of tokens."""
    args = parse_args(argv)
    device = util.pick_device(args.device)
    model, ckpt = load_autoencoder(args.ckpt, device, flag="--ckpt")
    if not hasattr(model, "n_embed"):
        raise UserError(f"--ckpt {ckpt['_path']}: is a {ckpt.get('model_type', 'non-VQ')} autoencoder; "
                        f"codebook usage needs a VQ-VAE checkpoint")
    config = ckpt["config"]
    root = dataset.ensure_dataset(args.data or config.get("data"), config["size"])
    split = dataset.load_split(root, args.split, size=config["size"])
    images, z = split.tensors()
    counts = evaluation.code_counts(model, images, z, device)
    stats = evaluation.codebook_usage(counts, prefix=args.split)
    used, perplexity = stats[f"{args.split}/codebook_usage"], stats[f"{args.split}/perplexity"]
    counts = counts.numpy()
    order = np.sort(counts)[::-1]
    share = np.cumsum(order) / max(order.sum(), 1)
    half = int(np.searchsorted(share, 0.5)) + 1  # codes that carry half of all tokens

    fig, (ax_counts, ax_share) = plt.subplots(1, 2, figsize=(11, 3.8))
    ranks = np.arange(1, len(order) + 1)
    ax_counts.bar(ranks, np.maximum(order, 0.8), width=1.0, color="tab:blue")
    ax_counts.set_yscale("log")
    ax_counts.set(title="code counts, most used first", xlabel="code rank", ylabel="tokens (log)")
    ax_share.plot(ranks, share, color="tab:green")
    ax_share.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax_share.set(title=f"share of tokens in the top-k codes ({half} codes carry half)", xlabel="k",
                 ylabel="share of tokens", ylim=(0, 1.02))
    for ax in (ax_counts, ax_share):
        ax.grid(alpha=0.3)
    name = Path(ckpt["_path"])
    fig.suptitle(f"{name.parent.name}/{name.name} on {args.split} ({len(images)} slices): {used:.1%} of "
                 f"{model.n_embed} codes used, perplexity {perplexity:.1f}", fontsize=10)
    fig.tight_layout()
    print(f"{args.split}: {used:.1%} of {model.n_embed} codes used, perplexity {perplexity:.1f}, "
          f"{half} codes carry half of the {int(counts.sum())} tokens")
    save_figure(fig, args.out)
    return 0


if __name__ == "__main__":
    util.run_cli(main)
