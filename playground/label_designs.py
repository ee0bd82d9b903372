"""Which design gives every generated slice its tissue map: each candidate, trained on the real train pairs,
is scored by Dice against the true maps of the real test split, on what it would see of a sample.

    python playground/label_designs.py --ae runs/demo/stage1-vqvae/best.pt --steps 400

A sample is a decoded latent, so each candidate is scored on test slices passed through stage one
(encode, decode): the reconstruction stands in for the sample, and the latent for what the prior drew.
Rows (docs/RESULTS.md keeps the measured table):
- real -> real: the segmenter on real slices (the reference, not a design: samples are not real slices);
- real -> recon: that segmenter labelling decoded slices;
- recon -> recon: a segmenter trained on decoded train slices;
- latent: the same network on the latent alone (nearest-upsampled);
- recon + latent: on the decoded slice and its latent together.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset  # noqa: E402
import evaluation  # noqa: E402
import util  # noqa: E402
from prestage_train import load_autoencoder  # noqa: E402


def through_stage_one(ae, split, device):
    """(decoded slices in [-1, 1], latents nearest-upsampled to the slice size) of a split."""
    images, z = split.tensors()
    latents = util.map_batches(lambda x, zz: ae.encode_latent(util.to_float(x), zz).float(), (images, z), device)
    decoded = util.map_batches(lambda s, zz: ae.decode(s, zz).float().clamp(-1, 1), (latents, z), device)
    return decoded, F.interpolate(latents, size=images.shape[-2:], mode="nearest"), images


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae", required=True, help="stage-one checkpoint")
    p.add_argument("--steps", type=int, default=400, help="segmenter steps per row")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = torch.device("cpu")
    ae, ckpt = load_autoencoder(args.ae, device)
    size = ckpt["config"]["size"]
    root = dataset.ensure_dataset(ckpt["config"].get("data"), size)
    train = dataset.load_split(root, "train", size=size, labels=True)
    test = dataset.load_split(root, "test", size=size, labels=True)
    tr_dec, tr_lat, tr_real = through_stage_one(ae, train, device)
    te_dec, te_lat, te_real = through_stage_one(ae, test, device)
    y_train, y_test = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    print(f"latent std {tr_lat.std():.3f}; {len(y_train)} train pairs, {len(y_test)} test slices, {args.steps} steps")
    rows = [("real -> real", tr_real, te_real), ("real -> recon", tr_real, te_dec), ("recon -> recon", tr_dec, te_dec),
            ("latent", tr_lat, te_lat),
            ("recon + latent", torch.cat([tr_dec, tr_lat], 1), torch.cat([te_dec, te_lat], 1))]
    print("| design | Dice CSF | grey | white | mean | train s |\n|---|---|---|---|---|---|")
    trained = {}
    for name, x_train, x_test in rows:
        t0 = time.perf_counter()
        key = id(x_train)
        if key not in trained:
            trained[key] = evaluation.train_segmenter(x_train, y_train, steps=args.steps, seed=args.seed)
        seconds = time.perf_counter() - t0
        d = evaluation.dice_scores(evaluation.segment(trained[key], x_test), y_test)
        print(f"| {name} | {d['dice/CSF']:.3f} | {d['dice/grey matter']:.3f} | {d['dice/white matter']:.3f} | "
              f"{d['dice_mean']:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
