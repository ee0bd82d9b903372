"""Does stage one keep the texture of real slices? Per Laplacian-pyramid level, the sliced Wasserstein distance
between reconstructions of 192 train slices and the real validate slices, beside the same distance between
those real train slices and validate (the floor that sampling alone gives), and their ratio. SSIM hardly moves
when the finest band is smoothed away; this ratio does. The figure shows slices, their reconstructions and the
finest band-pass level of both (the texture the ratio at the finest level measures).

Command (from the repo root; the data come from the checkpoint's config unless --data is given):
    python playground/texture.py --ckpt runs/demo/stage1-vqvae/best.pt     # -> playground/figures/texture.png
    python playground/texture.py --ckpt runs/vq-full/best.pt --n 512 --json /tmp/texture.json
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common (which puts the repo root on sys.path)
from _common import FIGURES, save_figure  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import dataset  # noqa: E402
import evaluation  # noqa: E402
import util  # noqa: E402
from prestage_train import load_autoencoder  # noqa: E402
from util import UserError  # noqa: E402


def parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="stage-one checkpoint (VAE or VQ-VAE best.pt / last.pt)")
    p.add_argument("--data", default=None, help="dataset root (default: the one the checkpoint was trained on)")
    p.add_argument("--n", type=int, default=192, help="train slices reconstructed (default 192)")
    p.add_argument("--seed", type=int, default=0, help="which train slices are drawn")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=str(FIGURES / "texture.png"), help="figure to write")
    p.add_argument("--json", default=None, help="also write the table to this JSON file")
    return p.parse_args(argv)


def band_figure(model, images, z, device, out, title):
    """Four slices: real, reconstruction, and the finest band-pass level of each, on one shared grey scale."""
    x = util.to_float(images)
    recon = evaluation.reconstruct(model, images, z, device)
    bands = [evaluation.laplacian_pyramid(v, 2)[0] for v in (x, recon)]
    limit = float(bands[0].abs().amax()) or 1.0
    fig, axes = plt.subplots(len(images), 4, figsize=(8, 2 * len(images)), squeeze=False)
    for row in range(len(images)):
        panels = [(x[row, 0], -1, 1, "real"), (recon[row, 0], -1, 1, "reconstruction"),
                  (bands[0][row, 0], -limit, limit, "real, finest band"),
                  (bands[1][row, 0], -limit, limit, "reconstruction, finest band")]
        for ax, (image, lo, hi, name) in zip(axes[row], panels):
            ax.imshow(image.numpy(), cmap="gray", vmin=lo, vmax=hi)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)


def main(argv=None):
    """Reconstruct, compare per level, print the table, write the figure (and the JSON)."""
    args = parse_args(argv)
    if args.n < 2:
        raise UserError(f"--n {args.n}: must be at least 2 slices")
    device = util.pick_device(args.device)
    model, ckpt = load_autoencoder(args.ckpt, device, flag="--ckpt")
    config = ckpt["config"]
    root = dataset.ensure_dataset(args.data or config.get("data"), config["size"])
    train, val = (dataset.load_split(root, s, size=config["size"]).tensors() for s in ("train", "validate"))
    gap = evaluation.texture_gap(model, train, val, device, n=args.n, seed=args.seed)
    print(f"SWD x1e3 to the {len(val[0])} validate slices, {min(args.n, len(train[0]))} train slices:")
    print(f"{'level':>7} {'reconstructions':>16} {'real':>8} {'ratio':>7}")
    for res, (ours, floor, ratio) in gap.items():
        print(f"{res:>5}px {ours:>16.1f} {floor:>8.1f} {ratio:>6.2f}x")
    if args.json:
        util.save_json({f"level_{r}": dict(recon=o, real=f, ratio=q) for r, (o, f, q) in gap.items()}, args.json)
    pick = torch.linspace(0, len(val[0]) - 1, 4).round().long().unique()
    finest = next(iter(gap))
    band_figure(model, val[0][pick], val[1][pick], device, args.out,
                f"{Path(ckpt['_path']).parent.name}: finest-level SWD {gap[finest][2]:.2f}x real")
    return 0


if __name__ == "__main__":
    util.run_cli(main)
