"""stage_two.py: the contract shared by the two priors (z specs, guidance checks, decoding, the v-prediction x0)."""
import pytest
import torch

import pixelCNN
import stable_diffusion as sd
import stage_two
from model_diffusion import NoiseSchedule, guided
from util import UserError


def test_parse_z_spec():
    assert stage_two.parse_z_spec("0..3", 32) == [0, 1, 2, 3]
    assert stage_two.parse_z_spec("5,7", 32) == [5, 7]
    with pytest.raises(UserError, match="must lie in 0..31"):
        stage_two.parse_z_spec("30..33", 32)
    with pytest.raises(UserError, match="expected a range"):
        stage_two.parse_z_spec("a..b", 32)
    with pytest.raises(UserError, match=r"runs backwards; write it low to high \(2..5\)"):
        stage_two.parse_z_spec("5..2", 32)
    for typo in ("", "1,,2", "3,"):  # an empty item is a typo, never "every slice"
        with pytest.raises(UserError, match="expected a range"):
            stage_two.parse_z_spec(typo, 32)


def test_sample_grid_z_reads_row_by_row():
    assert stage_two.sample_grid_z([0, 5, 9], 2).tolist() == [0, 5, 9, 0, 5, 9]


@pytest.mark.parametrize("config, guidance, message", [
    (dict(conditional=True, p_uncond=0.1), float("nan"), "must be a finite number >= 0"),
    (dict(conditional=True, p_uncond=0.1), -1.0, "must be a finite number >= 0"),
    (dict(conditional=True, p_uncond=0.0), 2.0, "trained without condition dropout"),
    (dict(conditional=False, p_uncond=0.1), 2.0, "this prior is unconditional"),
])
def test_guidance_is_refused_where_it_cannot_work(config, guidance, message):
    with pytest.raises(UserError, match=message):
        stage_two.check_guidance(guidance, config)
    assert stage_two.check_guidance(1.0, config) == 1.0  # conditional only: always fine


@pytest.mark.parametrize("prior", [sd.PRIOR, pixelCNN.PRIOR])
def test_each_prior_declares_every_preset_value_once(prior):
    names = [h.name for h in prior.hypers]
    assert len(names) == len(set(names))
    for diff in prior.presets.values():
        assert set(diff) <= set(names)
    assert prior.presets["full"] == {}  # full is the declared defaults; the others are differences


def test_v_prediction_x0_skips_the_division_by_alpha():
    # A "model" whose v is the exact v of a known x0 and noise: x0 must come back to float32 precision at every
    # t, also at t = T-1 where alpha ~ 6e-3 (linear, T=1000); through eps, (x_t - sigma eps) / alpha amplifies
    # the rounding of v by 1 / alpha.
    schedule = NoiseSchedule("linear", 1000)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 4, 8, 8, generator=gen), torch.randn(64, 4, 8, 8, generator=gen)
    t = torch.full((64,), 999)
    x_t = schedule.q_sample(x0, t, noise)
    v = schedule.v_target(x0, noise, t)

    class Oracle(torch.nn.Module):
        conditional = False

        def forward(self, x, tt, z):
            return v

    fn = guided(Oracle(), 1.0, "v", schedule)
    eps_direct, x0_direct = fn.eps_and_x0(x_t, t, None)
    a, s = schedule.signal_noise(t, x_t)
    exact = (a.double() * x_t.double() - s.double() * v.double()).float()  # alpha x_t - sigma v in float64
    assert torch.allclose(x0_direct, exact, atol=1e-6)
    x0_via_eps = schedule.predict_x0_from_eps(x_t, t, fn(x_t, t, None))
    err_direct = (x0_direct - x0).abs().max().item()
    err_via_eps = (x0_via_eps - x0).abs().max().item()
    assert err_direct < 1e-5 and err_via_eps > 20 * err_direct
    assert torch.allclose(eps_direct, noise, atol=1e-5)


def test_mirrored_appends_each_slice_flipped_with_its_neighbours_and_map():
    images = torch.arange(3 * 2 * 3, dtype=torch.uint8).reshape(3, 1, 2, 3)
    labels = torch.tensor([[[0, 1, 2], [3, 0, 1]]] * 3, dtype=torch.uint8)
    z, below, above = torch.tensor([4, 5, 6]), torch.tensor([-1, 0, 1]), torch.tensor([1, 2, -1])
    x, zz, b, a, y = stage_two.mirrored(images, z, below, above, labels)
    assert torch.equal(x[:3], images) and torch.equal(x[3:, 0, 0, 0], images[:, 0, 0, 2])  # column 0 <- 2
    assert torch.equal(x[3:], images[..., [2, 1, 0]])
    assert zz.tolist() == [4, 5, 6, 4, 5, 6]
    assert b.tolist() == [-1, 0, 1, -1, 3, 4] and a.tolist() == [1, 2, -1, 4, 5, -1]
    assert torch.equal(y[3:], labels[..., [2, 1, 0]])
    assert stage_two.mirrored(images, z, below, above)[4] is None


def test_flip_cache_encodes_the_mirrored_slices_and_is_rebuilt_when_flip_changes(vqvae_run, tmp_path):
    import dataset
    from prestage_train import load_autoencoder

    device = torch.device("cpu")
    ae, ckpt = load_autoencoder(vqvae_run / "best.pt", device)
    path = tmp_path / "codes.pt"
    plain = stage_two.build_cache(ae, ckpt, {}, device, "indices", path)
    flipped = stage_two.build_cache(ae, ckpt, {"flip": True}, device, "indices", path)  # flip differs: rebuilt
    n = len(plain["train"])
    assert flipped["flip"] and not plain["flip"] and len(flipped["train"]) == 2 * n
    assert torch.equal(flipped["train"][:n], plain["train"]) and torch.equal(flipped["validate"], plain["validate"])
    train = dataset.load_split(ckpt["config"]["data"], "train", size=ckpt["config"]["size"])
    images, z = train.tensors()
    direct = stage_two.encode(ae, images.flip(-1), z, device, "indices")  # the mirror encoded on its own
    assert torch.equal(flipped["train"][n:], direct) and not torch.equal(direct, plain["train"])
    assert torch.equal(flipped["train_z"], torch.cat([plain["train_z"]] * 2))
    assert stage_two.build_cache(ae, ckpt, {"flip": True}, device, "indices", path) is not None
    assert torch.load(path, weights_only=True)["flip"]  # the flipped cache is the one on disk now


def test_flip_flag_trains_a_prior_on_the_doubled_cache(vqvae_run, tmp_path):
    out = tmp_path / "pc"
    assert pixelCNN.main(["train", "--ae", str(vqvae_run / "best.pt"), "--preset", "smoke", "--flip",
                          "--out", str(out)]) == 0
    cache = torch.load(out / "codes.pt", weights_only=True)
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert cache["flip"] and state["config"]["flip"] is True
    n = len(cache["train"]) // 2
    assert len(cache["train"]) == 2 * n == len(cache["train_z"]) and torch.equal(cache["train_z"][:n],
                                                                                 cache["train_z"][n:])
    mirror_below = cache["train_below"][n:]
    assert bool((mirror_below[mirror_below >= 0] >= n).all())  # mirrored slices neighbour mirrored slices


@pytest.mark.parametrize("trainer", ["pixelcnn", "diffusion"])
def test_every_prior_keeps_the_decayed_average_of_its_trained_weights(playground_module, trainer):
    # After each step: ema <- d * ema + (1 - d) * weights, computed here from the weights each step leaves (the
    # smoke models have no buffers; that buffers are copied, not averaged, is test_trainer's EMA test).
    task, cfg, batch = playground_module("full_costs").build(trainer, "smoke")
    d = cfg["ema_decay"]
    assert 0 < d < 1
    expected = {k: v.clone() for k, v in task.model.named_parameters()}
    for step in range(3):
        task.train_step(batch(cfg["batch_size"]), step)
        for k, v in task.model.named_parameters():
            expected[k] = d * expected[k] + (1 - d) * v.detach()
    ema = dict(task.ema.model.named_parameters())
    assert any(not torch.equal(ema[k], v) for k, v in task.model.named_parameters())  # not the weights themselves
    for k, v in expected.items():
        torch.testing.assert_close(ema[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainer", ["pixelcnn", "diffusion"])
def test_before_its_start_step_the_ema_is_the_trained_weights_and_from_it_their_average(playground_module,
                                                                                         trainer):
    # --ema-start 2: after steps 0 and 1 the EMA equals the weights bit for bit; from step 2 on it decays from
    # the weights step 1 left, not from the random start.
    task, cfg, batch = playground_module("full_costs").build(trainer, "smoke")
    task.config["ema_start"], d = 2, cfg["ema_decay"]
    for step in range(4):
        task.train_step(batch(cfg["batch_size"]), step)
        weights = {k: v.detach().clone() for k, v in task.model.named_parameters()}
        if step < 2:
            expected = weights
            assert all(torch.equal(v, weights[k]) for k, v in task.ema.model.named_parameters())
        else:
            expected = {k: d * expected[k] + (1 - d) * weights[k] for k in weights}
    for k, v in task.ema.model.named_parameters():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, weights[k]) for k, v in task.ema.model.named_parameters())
