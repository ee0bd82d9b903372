"""demo.py: the command list it runs, at 64 and at 128 (the commands themselves are tested by their own suites)."""
from pathlib import Path

import torch

import demo
import prestage_train
import trainer as tr
from model_VAE import build_autoencoder


def stage_one_latent(steps):
    """Parse the demo's stage-one command as prestage_train does and build its model: the latent shape it gives."""
    name, argv, done = next(s for s in steps if s[0] == "stage one")
    args = prestage_train.parse_args([str(a) for a in argv[1:]])
    config = tr.resolve_config(args, prestage_train.HYPERS, prestage_train.PRESETS, "stage1")
    config.update(conditional=True, num_z=32)
    model = build_autoencoder(config["model"], prestage_train.autoencoder_config(config)).eval()
    size = config["size"]
    x, z = torch.zeros(1, 1, size, size), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        assert model.reconstruct(x, z).shape == x.shape
        return size, tuple(model.encode_latent(x, z).shape[1:])


def test_demo_at_64_is_the_demo_preset_with_16x16_latents():
    args = demo.parse_args([])
    assert (args.out, args.data) == (Path("runs/demo"), Path("data/embedded_64"))
    steps, stage1 = demo.plan(args)
    assert stage1 == Path("runs/demo/stage1-vqvae")
    assert stage_one_latent(steps) == (64, (4, 16, 16))
    assert [s[0] for s in steps][-4:] == ["PixelCNN prior", "PixelCNN samples", "PixelCNN metrics", "training curves"]


def test_demo_at_128_adds_a_level_so_stage_two_sees_the_same_latents():
    args = demo.parse_args(["--size", "128"])
    assert (args.out, args.data) == (Path("runs/demo128"), Path("data/embedded_128"))
    steps, _ = demo.plan(args)
    build = steps[0][1]
    assert build[build.index("--size") + 1] == 128 and build[build.index("--out") + 1] == Path("data/embedded_128")
    assert stage_one_latent(steps) == (128, (4, 16, 16))


def test_demo_with_a_vae_skips_the_pixelcnn():
    steps, stage1 = demo.plan(demo.parse_args(["--model", "vae", "--out", "runs/x"]))
    assert stage1 == Path("runs/x/stage1-vae")
    assert not [s for s in steps if "PixelCNN" in s[0]] and steps[-1][0] == "training curves"
