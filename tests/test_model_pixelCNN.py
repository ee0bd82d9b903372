"""Tests of the gated PixelCNN prior (model_pixelCNN.py): causality, no blind spot, incremental sampling, losses."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model_pixelCNN
from model_pixelCNN import GatedPixelCNN, bits_per_code, code_loss, sample_codes


def small_model(seed=0, **kwargs):
    """A small random model (float32, eval mode) for structural tests."""
    torch.manual_seed(seed)
    cfg = dict(n_codes=16, hidden=16, n_layers=2, kernel_size=3)
    cfg.update(kwargs)
    return GatedPixelCNN(**cfg).eval()


def dependency_map(model, shape, i, j, z=None):
    """Boolean [h, w]: which input positions the logits at (i, j) have a non-zero gradient with respect to."""
    torch.manual_seed(1)
    x = torch.randn(1, model.config["hidden"], *shape, requires_grad=True)
    z = torch.tensor([5]) if z is None else z
    logits = model.forward_embedded(x, z)
    # A random projection of the K logits, so no accidental cancellation of a real dependency.
    (logits[0, :, i, j] * torch.randn(model.n_codes)).sum().backward()
    return x.grad[0].abs().sum(0) != 0


def expected_dependencies(shape, i, j, n_layers, kernel_size):
    """Receptive field of a blind-spot-free gated PixelCNN: full-width band of rows above, codes left in the row."""
    reach = n_layers * (kernel_size // 2)
    dep = torch.zeros(shape, dtype=torch.bool)
    for r in range(max(0, i - reach - 1), i):
        dep[r, max(0, j - reach): j + reach + 1] = True
    dep[i, max(0, j - reach): j] = True
    return dep


# ------------------------------------------------------------------------------------------
# Structure


def test_shapes_and_config_roundtrip():
    model = small_model(n_codes=11, hidden=8, n_layers=3, kernel_size=5)
    indices = torch.randint(0, 11, (3, 5, 7))
    logits = model(indices, torch.tensor([0, 31, -1]))
    assert logits.shape == (3, 11, 5, 7)
    rebuilt = GatedPixelCNN(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(indices, torch.tensor([0, 31, -1])), logits)
    unconditional = GatedPixelCNN(11, hidden=8, n_layers=2, conditional=False)
    assert unconditional(indices).shape == (3, 11, 5, 7)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        GatedPixelCNN(16, kernel_size=4)
    with pytest.raises(ValueError):
        sample_codes(small_model(), (4, 4), z=None)


@pytest.mark.parametrize("n_layers,kernel_size,shape,extra",
                         [(2, 3, (10, 10), {}), (3, 5, (12, 13), {}), (2, 7, (11, 12), {}), (12, 5, (16, 16), {}),
                          (3, 5, (12, 13), {"position": True}), (3, 5, (12, 13), {"features": True})])
def test_causality_and_receptive_field(n_layers, kernel_size, shape, extra):
    model = (code_feature_model(n_layers=n_layers, kernel_size=kernel_size) if extra.get("features")
             else small_model(n_layers=n_layers, kernel_size=kernel_size, **extra))
    h, w = shape
    positions = [(0, 0), (0, w - 1), (1, 0), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2), (h // 2, w - 2)]
    for i, j in positions:
        dep = dependency_map(model, shape, i, j)
        future = torch.zeros(shape, dtype=torch.bool).view(-1)
        future[i * w + j:] = True  # the current position and everything after it in raster order
        assert not (dep & future.view(shape)).any(), f"({i},{j}) sees itself or the future"
        assert torch.equal(dep, expected_dependencies(shape, i, j, n_layers, kernel_size)), f"({i},{j})"
        if (i, j) != (0, 0):
            assert dep.any()


def test_no_blind_spot():
    # The original masked PixelCNN with 3x3 masks never sees (i-1, j+2) nor further right in the rows above.
    model = small_model(n_layers=2, kernel_size=3)
    i, j = 4, 3
    dep = dependency_map(model, (8, 8), i, j)
    assert dep[i - 1, j + 2] and dep[i - 2, j + 2] and dep[i - 1, j + 1] and dep[i, j - 1]
    assert not dep[i, j] and not dep[i, j + 1]


def code_feature_model(seed=0, **kwargs):
    """A small model with code features on random stage-one vectors, its per-code tables made non-zero (as after
    training) so that both halves of every embedding and output row matter."""
    model = small_model(seed, code_dim=3, **kwargs)
    model.set_code_vectors(torch.randn(16, 3) * 5 + 2)
    with torch.no_grad():
        model.embedding.weight.normal_()
        model.head[3].weight.normal_()
    return model


def assert_cache_matches_forward(model, shape, conditional):
    """The raster cache's logits at every cell equal the full forward pass's, on random codes."""
    indices = torch.randint(0, 16, (2, *shape))
    z = torch.tensor([3, -1]) if conditional else None
    with torch.no_grad():
        full = model(indices, z)
        cache = model_pixelCNN._RasterCache(model, model.embed(indices), z)
        for i in range(shape[0]):
            cache.start_row(i)
            for j in range(shape[1]):
                torch.testing.assert_close(cache.logits_at(j), full[:, :, i, j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_layers,kernel_size,shape,features,position,conditional",
                         [(2, 3, (9, 11), False, False, True), (3, 5, (7, 6), False, False, True),
                          (2, 3, (9, 11), True, False, True), (3, 3, (9, 11), False, True, True),
                          (2, 3, (9, 11), True, True, True), (2, 3, (6, 7), False, True, False)])
def test_incremental_cache_matches_forward(n_layers, kernel_size, shape, features, position, conditional):
    # The grid is larger than the receptive field in the first case, so the caches' cropping matters.
    model = (code_feature_model if features else small_model)(n_layers=n_layers, kernel_size=kernel_size,
                                                               position=position, conditional=conditional)
    assert_cache_matches_forward(model, shape, conditional)


def naive_sample(model, shape, z, temperature, generator, guidance=1.0, top_k=0, top_p=1.0):
    """Reference sampler: the whole network on the whole grid for every position."""
    codes = torch.zeros(z.shape[0], *shape, dtype=torch.long)
    with torch.no_grad():
        for i in range(shape[0]):
            for j in range(shape[1]):
                logits = model(codes, z)[:, :, i, j]
                if guidance != 1.0:
                    uncond = model(codes, torch.full_like(z, -1))[:, :, i, j]
                    logits = uncond + guidance * (logits - uncond)
                codes[:, i, j] = model_pixelCNN._draw(logits, temperature, generator, top_k, top_p)
    return codes


@pytest.mark.parametrize("guidance,features,position", [(1.0, False, False), (2.5, False, False), (2.5, True, False),
                                                        (2.5, False, True)])
def test_fast_sampler_matches_naive_sampler(guidance, features, position):
    model = (code_feature_model if features else small_model)(n_layers=2, kernel_size=3, position=position)
    z = torch.tensor([0, 7, 30, -1])
    fast = sample_codes(model, (6, 7), z, 1.0, torch.Generator().manual_seed(3), guidance=guidance)
    slow = naive_sample(model, (6, 7), z, 1.0, torch.Generator().manual_seed(3), guidance=guidance)
    assert torch.equal(fast, slow)


def test_code_features_are_the_standardised_codebook_through_a_shared_function():
    torch.manual_seed(0)
    codebook = torch.randn(16, 3) * torch.tensor([0.01, 1.0, 100.0]) + 7
    codebook[5] = codebook[9]  # two codes with one vector
    model = small_model(code_dim=3)
    model.set_code_vectors(codebook)
    expected = (codebook - codebook.mean(0)) / codebook.std(0)
    torch.testing.assert_close(model.code_vectors, expected)
    assert GatedPixelCNN(**json.loads(json.dumps(model.config))).code_vectors.shape == (16, 3)
    # Untrained, the per-code tables are zero: the embedding and output row of a code are functions of its
    # vector alone, so codes 5 and 9 are indistinguishable to the prior until training tells them apart.
    table, (weight, bias) = model.input_table(), model.output_layer()
    with torch.no_grad():
        torch.testing.assert_close(table, model.code_in(expected))
    assert torch.equal(table[5], table[9]) and not torch.equal(table[5], table[4])
    assert torch.equal(weight[5], weight[9]) and not torch.equal(weight[5], weight[4])
    logits = model(torch.randint(0, 16, (2, 4, 4)), torch.tensor([1, 2]))
    torch.testing.assert_close(logits[:, 5] - bias[5], logits[:, 9] - bias[9])


def test_position_features_are_sinusoids_of_row_and_column():
    model = small_model(position=True)
    pos = model.positions(5, 7)
    assert pos.shape == (1, model_pixelCNN.POSITION_FEATURES, 5, 7)
    i, j = np.meshgrid(np.arange(5) / 4, np.arange(7) / 6, indexing="ij")
    k = np.arange(1, model_pixelCNN.POSITION_FEATURES // 4 + 1)[:, None, None] * np.pi
    expected = np.concatenate([np.sin(k * i), np.cos(k * i), np.sin(k * j), np.cos(k * j)])
    np.testing.assert_allclose(pos[0].numpy(), expected, atol=1e-6)
    assert small_model().positions(5, 7) is None


def test_position_tells_interior_cells_apart():
    # On a constant grid the logits of a plain model in the interior (beyond the padding's reach) are the same
    # everywhere; with position features they differ from cell to cell.
    indices = torch.full((1, 12, 12), 3)
    z = torch.tensor([4])
    with torch.no_grad():
        plain = small_model(n_layers=2, kernel_size=3)(indices, z)
        placed = small_model(n_layers=2, kernel_size=3, position=True)(indices, z)
    torch.testing.assert_close(plain[0, :, 5, 5], plain[0, :, 6, 8])
    assert (placed[0, :, 5, 5] - placed[0, :, 6, 8]).abs().max() > 1e-3


def test_guidance_zero_is_unconditional():
    model = small_model(n_layers=3, kernel_size=3)
    z = torch.tensor([2, 20])
    guided = sample_codes(model, (5, 5), z, temperature=0.0, guidance=0.0)
    null = sample_codes(model, (5, 5), torch.tensor([-1, -1]), temperature=0.0)
    conditional = sample_codes(model, (5, 5), z, temperature=0.0)
    assert torch.equal(guided, null)
    assert not torch.equal(conditional, null)


def test_greedy_sample_is_a_fixed_point_of_forward():
    model = small_model(n_layers=4, kernel_size=5)
    z = torch.tensor([1, 12, 25])
    codes = sample_codes(model, (8, 8), z, temperature=0.0)
    with torch.no_grad():
        assert torch.equal(model(codes, z).argmax(1), codes)


def test_sampling_calls_back_after_each_row_and_leaves_the_thread_count_to_it():
    """callback(i, rows, codes, None) after row i, with rows 0..i drawn; the draw is the one without a callback;
    with num_threads=None the count the callback sets stands after the call."""
    model = small_model(n_layers=3, kernel_size=3)
    z = torch.tensor([2, 7])
    plain = sample_codes(model, (4, 5), z, generator=torch.Generator().manual_seed(1))
    seen = []

    def record(i, rows, codes, x0):
        seen.append((i, rows, x0, codes[:, : i + 1].clone()))
        torch.set_num_threads(2)

    pinned = torch.get_num_threads()
    try:
        codes = sample_codes(model, (4, 5), z, generator=torch.Generator().manual_seed(1), num_threads=None,
                             callback=record)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(pinned)
    assert torch.equal(codes, plain)
    assert [(i, rows, x0) for i, rows, x0, _ in seen] == [(i, 4, None) for i in range(4)]
    assert all(torch.equal(drawn, plain[:, : i + 1]) for i, _, _, drawn in seen)


def test_sampling_restores_training_mode_and_threads():
    model = small_model(dropout=0.5).train()
    pinned = torch.get_num_threads()  # the conftest `one_thread` pin, restored below
    torch.set_num_threads(2)
    try:
        sample_codes(model, (3, 3), torch.tensor([4]), num_threads=1)
        assert model.training
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(pinned)


# ------------------------------------------------------------------------------------------
# Condition and losses


def test_z_condition_changes_logits():
    model = small_model()
    indices = torch.randint(0, 16, (1, 6, 6)).repeat(3, 1, 1)
    with torch.no_grad():
        logits = model(indices, torch.tensor([3, 20, -1]))
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    assert (logits[0] - logits[2]).abs().max() > 1e-4
    unconditional = GatedPixelCNN(16, hidden=16, n_layers=2, kernel_size=3, conditional=False).eval()
    with torch.no_grad():
        plain = unconditional(indices, torch.tensor([3, 20, -1]))
    torch.testing.assert_close(plain[0], plain[1], rtol=0, atol=0)


def test_bits_per_code_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, 5, 6) * 3
    targets = torch.randint(0, 10, (4, 5, 6))
    expected = F.cross_entropy(logits, targets) / math.log(2)
    torch.testing.assert_close(bits_per_code(logits, targets), expected)
    # the model's own logits are channels-last (softmax along contiguous rows): the same value in either layout
    torch.testing.assert_close(bits_per_code(logits.contiguous(memory_format=torch.channels_last), targets), expected)
    uniform = torch.zeros(2, 8, 3, 3)
    torch.testing.assert_close(bits_per_code(uniform, torch.zeros(2, 3, 3, dtype=torch.long)), torch.tensor(3.0))


def test_code_loss_and_condition_dropout():
    model = small_model()
    indices = torch.randint(0, 16, (3, 6, 6))
    z = torch.tensor([1, 2, 3])
    loss, bits = code_loss(model, indices, z)
    torch.testing.assert_close(bits, loss.detach() / math.log(2))
    torch.testing.assert_close(bits, bits_per_code(model(indices, z), indices))
    logits = model(indices, z)
    assert logits.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loss, F.cross_entropy(logits.contiguous(), indices))  # over NCHW's channel axis
    dropped, _ = code_loss(model, indices, z, p_uncond=1.0)
    null, _ = code_loss(model, indices, torch.full_like(z, -1))
    torch.testing.assert_close(dropped, null)
    assert (dropped - loss).abs() > 1e-6


# ------------------------------------------------------------------------------------------
# Learning and temperature (one small model overfits four grids)


GRID_Z = torch.tensor([2, 9, 17, 28])


@pytest.fixture(scope="module")
def overfit():
    """A small model trained to memorise four random 8x8 grids with K=16, one per z-index."""
    torch.manual_seed(0)
    grids = torch.randint(0, 16, (4, 8, 8))
    model = GatedPixelCNN(16, hidden=32, n_layers=4, kernel_size=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss, _ = code_loss(model, grids, GRID_Z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    return model.eval(), grids, first, loss.item()


def test_overfits_and_greedy_sampling_reproduces_grids(overfit):
    model, grids, first, last = overfit
    assert first > 0.8 * math.log(16)
    assert last < 0.05 * math.log(16)
    codes = sample_codes(model, (8, 8), GRID_Z, temperature=0.0)
    assert torch.equal(codes, grids)
    assert torch.equal(sample_codes(model, (8, 8), GRID_Z.flip(0), temperature=0.0), grids.flip(0))


def sample_entropy(codes, n_codes):
    """Mean over positions of the empirical entropy (nats) of the sampled codes across the batch."""
    onehot = F.one_hot(codes, n_codes).float().mean(0)  # [h, w, K] frequencies
    return -(onehot * torch.log(onehot.clamp(min=1e-12))).sum(-1).mean().item()


def test_temperature_and_generator(overfit):
    model = overfit[0]
    z = GRID_Z[1].repeat(64)
    greedy = sample_codes(model, (8, 8), z, temperature=0.0, generator=torch.Generator().manual_seed(0))
    tiny = sample_codes(model, (8, 8), z, temperature=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, tiny)
    assert sample_entropy(greedy, 16) == 0.0
    cold = sample_codes(model, (8, 8), z, temperature=0.5, generator=torch.Generator().manual_seed(0))
    hot = sample_codes(model, (8, 8), z, temperature=3.0, generator=torch.Generator().manual_seed(0))
    assert sample_entropy(hot, 16) > sample_entropy(cold, 16) + 1.0
    again = sample_codes(model, (8, 8), z, temperature=3.0, generator=torch.Generator().manual_seed(0))
    other = sample_codes(model, (8, 8), z, temperature=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(hot, again)
    assert not torch.equal(hot, other)


# ------------------------------------------------------------------------------------------
# Top-k and nucleus truncation


def kept_by_numpy(logits, top_k, top_p):
    """Which codes survive, computed independently: rank by probability, keep the first k, then the shortest
    prefix of those whose probability, renormalised over the k, reaches p."""
    keep = np.zeros(logits.shape, bool)
    for b, row in enumerate(logits.double().numpy()):
        order = np.argsort(-row, kind="stable")[:top_k or len(row)]
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        n = int(np.searchsorted(np.cumsum(probs), top_p) + 1) if top_p < 1 else len(order)
        keep[b, order[:n]] = True
    return keep


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (3, 0.9)])
def test_truncate_keeps_the_top_k_and_the_nucleus(top_k, top_p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(top_k))
    kept = torch.isfinite(model_pixelCNN.truncate(logits, top_k, top_p)).numpy()
    assert np.array_equal(kept, kept_by_numpy(logits, top_k, top_p))


def test_the_nucleus_is_taken_within_the_top_k():
    # over all 40 codes the first two hold a quarter of the probability (the nucleus at 0.85 would keep more
    # than three); renormalised over the top 3, they hold 0.91 and the nucleus keeps just them
    logits = torch.tensor([[3.0, 2.0, 0.5] + [0.4] * 37]).log()
    kept = torch.isfinite(model_pixelCNN.truncate(logits, top_k=3, top_p=0.85))
    assert kept[0, :3].tolist() == [True, True, False] and not kept[0, 3:].any()
    assert np.array_equal(kept.numpy(), kept_by_numpy(logits, 3, 0.85))


def test_a_uniform_of_zero_never_draws_a_removed_code(monkeypatch):
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    for u in (0.0, 1.0 - 2**-24):
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full((1, 1), u))
        picked = model_pixelCNN._draw(logits, 1.0, top_k=2).item()
        assert picked in (1, 2)


def test_truncated_sampling_draws_only_kept_codes_in_their_proportions():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    codes = model_pixelCNN._draw(logits, 1.0, torch.Generator().manual_seed(0), top_k=2)
    share = torch.bincount(codes, minlength=5).float() / len(codes)
    assert share[2:].sum() == 0
    assert share[0].item() == pytest.approx(math.e / (math.e + 1), abs=0.01)  # renormalised over the two kept
    assert torch.equal(model_pixelCNN._draw(logits[:50], 1.0, torch.Generator().manual_seed(1), top_k=1),
                       torch.zeros(50, dtype=torch.long))  # top-1 is greedy


def test_fast_sampler_matches_naive_sampler_with_truncation():
    model = small_model(n_layers=2, kernel_size=3)
    z = torch.tensor([0, 7, 30])
    fast = sample_codes(model, (5, 6), z, 0.9, torch.Generator().manual_seed(4), guidance=2.0, top_k=4, top_p=0.8)
    slow = naive_sample(model, (5, 6), z, 0.9, torch.Generator().manual_seed(4), guidance=2.0, top_k=4, top_p=0.8)
    assert torch.equal(fast, slow)


def z_map_model(**kwargs):
    """A small model with random z maps (they start at zero, which would hide their effect)."""
    model = small_model(z_maps=3, z_map_size=4, num_z=5, **kwargs)
    with torch.no_grad():
        model.z_map.normal_()
    return model


@pytest.mark.parametrize("position", [False, True])
def test_z_maps_incremental_cache_matches_forward(position):
    model = z_map_model(position=position, n_layers=3)
    indices, z = torch.randint(0, 16, (3, 6, 7)), torch.tensor([4, -1, 0])
    with torch.no_grad():
        full = model(indices, z)
        cache = model_pixelCNN._RasterCache(model, model.embed(indices), z)
        for i in range(6):
            cache.start_row(i)
            for j in range(7):
                torch.testing.assert_close(cache.logits_at(j), full[:, :, i, j], rtol=1e-5, atol=1e-5)


def test_z_maps_pick_each_z_its_own_map_and_the_null_map_for_unknown():
    model = z_map_model(position=True)
    pos = model.positions(4, 4, torch.tensor([2, -1]))
    assert pos.shape == (2, model_pixelCNN.POSITION_FEATURES + 3, 4, 4)
    torch.testing.assert_close(pos[0, model_pixelCNN.POSITION_FEATURES:], model.z_map[2])
    torch.testing.assert_close(pos[1, model_pixelCNN.POSITION_FEATURES:], model.z_map[5])  # num_z = 5: the null row
    torch.testing.assert_close(pos[0, :model_pixelCNN.POSITION_FEATURES], model._sinusoids(4, 4)[0])
    # On another grid size the map is resized bilinearly (torch's interpolate: the independent computation).
    wide = model.z_map_for(torch.tensor([1]), 8, 6)
    torch.testing.assert_close(wide, F.interpolate(model.z_map[1:2], size=(8, 6), mode="bilinear"))


def test_z_maps_change_the_logits_with_z_and_keep_causality():
    model = z_map_model()
    indices = torch.randint(0, 16, (1, 5, 5))
    with torch.no_grad():
        a, b = model(indices, torch.tensor([1])), model(indices, torch.tensor([3]))
    assert not torch.allclose(a, b)
    deps = dependency_map(model, (5, 5), 2, 2, z=torch.tensor([1]))
    assert torch.equal(deps, expected_dependencies((5, 5), 2, 2, n_layers=2, kernel_size=3))  # the map: a bias


def test_z_maps_need_a_conditional_model():
    with pytest.raises(ValueError, match="z_maps needs a conditional model"):
        small_model(z_maps=2, conditional=False)


# ------------------------------------------------------------------------------------------
# The half-resolution path (`coarse`)


def coarse_dependencies(shape, i, j, coarse, kernel_size):
    """What the coarse summary at fine cell (i, j) reads: coarse row R = i // 2 holds coarse rows R-1-L*p .. R-1
    and coarse columns j // 2 +- L*p after L layers of reach p, each coarse cell being fine rows and columns 2R, 2R+1."""
    reach, (r, c) = coarse * (kernel_size // 2), (i // 2, j // 2)
    dep = torch.zeros(shape, dtype=torch.bool)
    for cr in range(max(0, r - 1 - reach), r):
        dep[2 * cr: 2 * cr + 2, max(0, 2 * (c - reach)): 2 * (c + reach + 1)] = True
    return dep


@pytest.mark.parametrize("shape,coarse,position", [((10, 10), 1, False), ((11, 9), 2, True), ((16, 16), 3, True)])
def test_coarse_path_is_causal_and_reaches_what_it_should(shape, coarse, position):
    # One fine layer: the summary enters only through the cell's own position term, so the dependencies are the
    # fine layer's receptive field plus exactly the coarse cells the half-resolution layers reach.
    model = small_model(n_layers=1, kernel_size=3, coarse=coarse, position=position)
    h, w = shape
    for i, j in [(0, 0), (1, w - 1), (2, 0), (3, 4), (h - 1, w - 1), (h // 2, w // 2), (h - 2, 1)]:
        dep = dependency_map(model, shape, i, j)
        future = torch.zeros(h * w, dtype=torch.bool)
        future[i * w + j:] = True
        assert not (dep & future.view(shape)).any(), f"({i},{j}) sees itself or the future"
        expected = expected_dependencies(shape, i, j, 1, 3) | coarse_dependencies(shape, i, j, coarse, 3)
        assert torch.equal(dep, expected), f"({i},{j})"


def test_coarse_path_reaches_rows_the_fine_stacks_do_not():
    plain, coarse = small_model(n_layers=2, kernel_size=3), small_model(n_layers=2, kernel_size=3, coarse=3)
    far = dependency_map(coarse, (16, 16), 15, 8)
    assert not dependency_map(plain, (16, 16), 15, 8)[:10].any()  # the fine stacks reach 2 x 1 + 1 rows up
    assert far[8:10].all() and far[6:8, 2:16].all()  # coarse rows 3..6 from row 7, columns 1..7 from 4


@pytest.mark.parametrize("shape,position,conditional", [((9, 11), False, True), ((6, 7), True, True),
                                                        ((8, 8), True, False)])
def test_coarse_incremental_cache_matches_forward(shape, position, conditional):
    # Odd sizes: the pooled grid is padded below and right; the cache recomputes the summary every other row.
    model = small_model(n_layers=3, kernel_size=3, coarse=2, position=position, conditional=conditional)
    assert_cache_matches_forward(model, shape, conditional)


def test_coarse_fast_sampler_matches_naive_sampler_with_guidance():
    model = small_model(n_layers=2, kernel_size=3, coarse=2, position=True)
    z = torch.tensor([0, 7, 30, -1])
    fast = sample_codes(model, (7, 6), z, 1.0, torch.Generator().manual_seed(3), guidance=2.5)
    slow = naive_sample(model, (7, 6), z, 1.0, torch.Generator().manual_seed(3), guidance=2.5)
    assert torch.equal(fast, slow)


def test_coarse_summary_is_the_pooled_causal_stack_repeated():
    # Independent of CoarseContext.forward: pool, run the stack, shift and repeat by hand.
    model = small_model(n_layers=1, kernel_size=3, coarse=1, position=False)
    net, x = model.coarse, torch.randn(2, 16, 6, 8)
    cond = model.condition(torch.tensor([4, -1]), 2)
    with torch.no_grad():
        pooled = net.inp((x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) / 4)
        pre = F.conv2d(F.pad(pooled, (1, 1, 1, 0)), net.convs[0].weight, net.convs[0].bias)
        c = net.out(pooled + model_pixelCNN._gate(pre + net.cond_proj[0](F.silu(cond))[:, :, None, None]))
        want = torch.zeros_like(c)
        want[:, :, 1:] = c[:, :, :-1]
        want = want[:, :, [0, 0, 1, 1, 2, 2]][..., [0, 0, 1, 1, 2, 2, 3, 3]]
        torch.testing.assert_close(net(x, cond), want)


def test_coarse_must_not_be_negative_and_round_trips():
    with pytest.raises(ValueError, match="coarse must be >= 0"):
        small_model(coarse=-1)
    model = small_model(coarse=2)
    rebuilt = GatedPixelCNN(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    indices = torch.randint(0, 16, (2, 5, 6))
    assert torch.equal(rebuilt.eval()(indices, torch.tensor([1, 2])), model(indices, torch.tensor([1, 2])))
    assert "coarse" not in "".join(small_model().state_dict())


# ------------------------------------------------------------------------------------------
# Dilated stacks


def dilated_dependencies(shape, i, j, kernel_size, dilations):
    """Which inputs the logits at (i, j) read, by propagating dependency sets through the stacks' definitions
    (not the model's code): a vertical layer of dilation d maps v at (r, c) to v_in at rows r - d*{0..p}, columns
    c + d*{-p..p}; its link reaches the horizontal stack one row down; a type-B horizontal layer reads h_in at
    (r, c - d*{0..p}) and keeps a residual; the type-A one reads the input at (r, c-p..c-1); every layer's gate
    output feeds the head through its skip."""
    h, w = shape
    p = kernel_size // 2
    eye = np.eye(h * w, dtype=bool).reshape(h, w, h, w)  # eye[r, c] = the input cell (r, c) alone
    v_in, h_in, out = eye, eye, np.zeros((h, w), dtype=bool)

    def gather(deps, offsets):
        """deps [h, w, h, w] -> [h, w, h, w]: the union of deps at (r + dr, c + dc) over the offsets in range."""
        res = np.zeros_like(deps)
        for dr, dc in offsets:
            for r in range(h):
                for c in range(w):
                    if 0 <= r + dr < h and 0 <= c + dc < w:
                        res[r, c] |= deps[r + dr, c + dc]
        return res
    for layer, d in enumerate(dilations):
        taps = [(-d * a, d * b) for a in range(p + 1) for b in range(-p, p + 1)]
        v_out = gather(v_in, taps)
        link = gather(v_in, [(dr - 1, dc) for dr, dc in taps])  # the pre-activation, shifted down one row
        if layer == 0:
            gate = gather(eye, [(0, -b) for b in range(1, p + 1)]) | link
            h_out = gate
        else:
            gate = gather(h_in, [(0, -d * b) for b in range(p + 1)]) | link
            h_out = gate | h_in
        out |= gate[i, j]
        v_in, h_in = v_out, h_out
    return torch.from_numpy(out)


@pytest.mark.parametrize("n_layers,kernel_size,dilation,shape",
                         [(3, 3, (2,), (12, 13)), (4, 3, (1, 2, 4), (16, 16)), (3, 5, (3, 1), (14, 15))])
def test_dilated_stacks_are_causal_and_reach_what_they_should(n_layers, kernel_size, dilation, shape):
    model = small_model(n_layers=n_layers, kernel_size=kernel_size, dilation=dilation)
    layers = [1] + [dilation[(k - 1) % len(dilation)] for k in range(1, n_layers)]
    assert [layer.dilation for layer in model.layers] == layers
    h, w = shape
    for i, j in [(0, 1), (1, 0), (h // 2, w // 2), (h - 1, w - 1), (h - 1, 2), (5, w - 3)]:
        dep = dependency_map(model, shape, i, j)
        future = torch.zeros(shape, dtype=torch.bool).view(-1)
        future[i * w + j:] = True
        assert not (dep & future.view(shape)).any(), f"({i},{j}) sees itself or the future"
        assert torch.equal(dep, dilated_dependencies(shape, i, j, kernel_size, layers)), f"({i},{j})"


def test_dilated_reference_agrees_with_the_dense_receptive_field():
    # The propagation reference with every dilation 1 is the closed form the dense tests use.
    for i, j in [(4, 3), (9, 0), (9, 9)]:
        assert torch.equal(dilated_dependencies((10, 10), i, j, 5, [1, 1, 1]),
                           expected_dependencies((10, 10), i, j, 3, 5))


def test_dilation_1_2_4_reaches_further_with_the_same_taps():
    dense, dilated = small_model(n_layers=4, kernel_size=3), small_model(n_layers=4, kernel_size=3, dilation=(1, 2, 4))
    assert sum(t.numel() for t in dense.parameters()) == sum(t.numel() for t in dilated.parameters())
    rows_seen = [dependency_map(m, (16, 16), 15, 8).any(1).nonzero().min().item() for m in (dense, dilated)]
    assert rows_seen == [15 - 5, 15 - 1 - (1 + 1 + 2 + 4)]  # the link adds a row: 1 + reach of the four layers


@pytest.mark.parametrize("position,conditional", [(False, True), (True, True), (True, False)])
def test_dilated_incremental_cache_matches_forward(position, conditional):
    # Grids wider and taller than the dilated reach, so the windows are cropped and padded on every side.
    model = small_model(n_layers=4, kernel_size=3, dilation=(2, 3), position=position, conditional=conditional)
    assert_cache_matches_forward(model, (11, 13), conditional)


def test_dilated_fast_sampler_matches_naive_sampler_with_guidance():
    model = small_model(n_layers=3, kernel_size=5, dilation=(2,))
    z = torch.tensor([0, 7, 30, -1])
    fast = sample_codes(model, (7, 9), z, 1.0, torch.Generator().manual_seed(3), guidance=2.0)
    assert torch.equal(fast, naive_sample(model, (7, 9), z, 1.0, torch.Generator().manual_seed(3), guidance=2.0))


def test_dilation_is_checked_and_round_trips():
    with pytest.raises(ValueError, match="dilation must be one or more integers >= 1"):
        small_model(dilation=(0,))
    with pytest.raises(ValueError, match="dilation must be one or more"):
        small_model(dilation=())
    model = small_model(n_layers=3, dilation=(2, 3))
    rebuilt = GatedPixelCNN(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    indices = torch.randint(0, 16, (2, 6, 7))
    assert torch.equal(rebuilt.eval()(indices, torch.tensor([1, 2])), model(indices, torch.tensor([1, 2])))
    old = {k: v for k, v in small_model(n_layers=3).config.items() if k != "dilation"}  # a checkpoint from before
    assert [layer.dilation for layer in GatedPixelCNN(**old).layers] == [1, 1, 1]
