"""Samplers of the class-conditional generators: schedules, MaskGIT decoding, RAR decoding and its KV cache."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from titok_lightning.models import maskgit as maskgit_module
from titok_lightning.models import rar as rar_module
from titok_lightning.models.maskgit import ImageBert, MaskGITSampling, UViTBert, guidance_weight, maskgit_generate
from titok_lightning.models.rar import RAR, KVCache, RARSampling, decode_key_length, randomness_ratio, rar_generate
from titok_lightning.sampling import (
    CUDAGraphCall,
    GraphCache,
    class_condition_ids,
    masking_ratio,
    power_cosine_guidance,
    random_masking,
    resolve_generator,
)

TINY = dict(codebook_size=16, image_seq_len=8, num_classes=5, hidden_size=32, num_layers=2, num_heads=2)


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Eval-mode model whose weights (zero-initialised ones included) are large enough to matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(std=0.3 if p.ndim > 1 else 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def rar() -> RAR:
    return _randomised(RAR(**TINY, intermediate_size=64))


@pytest.fixture(scope="module", params=[ImageBert, UViTBert])
def maskgit(request) -> ImageBert | UViTBert:
    return _randomised(request.param(**TINY, intermediate_size=64))


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


def test_mask_schedule_end_points_and_monotonicity():
    assert masking_ratio(0.0) == 1.0 and masking_ratio(1.0) == 0.0
    grid = torch.linspace(0, 1, 11)
    ratios = masking_ratio(grid)
    assert torch.allclose(ratios[[0, -1]], torch.tensor([1.0, 0.0]), atol=1e-6)
    assert (ratios[1:] < ratios[:-1]).all()
    assert all(math.isclose(masking_ratio(float(t)), float(r), abs_tol=1e-6) for t, r in zip(grid, ratios))


def test_training_masking_masks_at_least_one_token_with_the_mask_id():
    ids = torch.randint(0, 16, (64, 8))
    masked, mask = random_masking(ids, mask_token_id=16, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).min() >= 1 and mask.sum(1).max() <= 8
    assert torch.equal(masked, torch.where(mask, torch.full_like(ids, 16), ids))
    # Small mask ratios are likelier than large ones under the arccos schedule (E[ratio] = 2/pi).
    assert abs(mask.float().mean().item() - 2 / math.pi) < 0.1


def test_class_condition_ids_shift_and_null_class():
    classes = torch.tensor([0, 4, 2])
    assert torch.equal(class_condition_ids(classes, 16, 5), classes + 17)
    assert torch.equal(class_condition_ids(classes, 16, 5, drop_prob=1.0), torch.full_like(classes, 22))
    with pytest.raises(ValueError):
        class_condition_ids(classes.float(), 16, 5)


def test_power_cosine_guidance_end_points():
    assert power_cosine_guidance(0.0, 7.0, 2.0) == 1.0
    assert math.isclose(power_cosine_guidance(1.0, 7.0, 2.0), 7.0)
    assert math.isclose(power_cosine_guidance(0.0, 7.0, 0.0), 7.0)  # power 0: constant


def test_guidance_weights_per_decay():
    assert guidance_weight(0, MaskGITSampling(guidance_scale=3.0, guidance_decay="constant")) == 3.0
    linear = MaskGITSampling(num_steps=4, guidance_scale=3.0, guidance_decay="linear")
    assert [guidance_weight(s, linear) for s in range(4)] == [0.0, 0.75, 1.5, 2.25]
    cosine = MaskGITSampling(num_steps=4, guidance_scale=3.0, guidance_decay="power-cosine")
    assert guidance_weight(0, cosine) == 0.0 and 0 < guidance_weight(3, cosine) < 2.0
    with pytest.raises(ValueError):
        MaskGITSampling(guidance_decay="cosine")


def test_resolve_generator():
    assert resolve_generator(None, torch.device("cpu")) is None
    seeded = resolve_generator(3, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=seeded), torch.rand(4, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError):
        resolve_generator(torch.Generator(), torch.device("meta"))
    with pytest.raises(TypeError):
        resolve_generator(1.5, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------
# MaskGIT
# ----------------------------------------------------------------------------------------------------------

CLASSES = torch.tensor([0, 3, 1])


@pytest.mark.parametrize("decay", ["constant", "linear", "power-cosine"])
def test_maskgit_fills_every_position_with_codebook_ids(maskgit, decay):
    sampling = MaskGITSampling(num_steps=5, guidance_scale=2.0, guidance_decay=decay, randomize_temperature=3.0)
    ids = maskgit_generate(maskgit, CLASSES, sampling, generator=0)
    assert ids.shape == (3, maskgit.image_seq_len) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < maskgit.codebook_size


def test_maskgit_follows_the_arccos_schedule_and_keeps_decoded_tokens(maskgit, monkeypatch):
    seen: list[torch.Tensor] = []
    forward_tokens = maskgit.forward_tokens
    monkeypatch.setattr(
        maskgit, "forward_tokens", lambda ids, c: seen.append(ids[: len(CLASSES)]) or forward_tokens(ids, c)
    )
    steps, n = 4, maskgit.image_seq_len
    final = maskgit_generate(maskgit, CLASSES, MaskGITSampling(num_steps=steps, randomize_temperature=2.0), generator=1)
    expected, masked = [n], n
    for step in range(steps - 1):
        masked = max(1, min(masked - 1, math.floor(n * masking_ratio((step + 1) / steps))))
        expected.append(masked)
    counts = [(ids == maskgit.mask_token_id).sum(1) for ids in seen]
    assert [c.tolist() for c in counts] == [[e] * len(CLASSES) for e in expected]
    after = seen[1:] + [final]
    for before, now in zip(seen, after):  # a decoded token is never changed again
        decoded = before != maskgit.mask_token_id
        assert torch.equal(now[decoded], before[decoded])


def test_maskgit_is_deterministic_under_a_seed(maskgit):
    sampling = MaskGITSampling(num_steps=4, randomize_temperature=5.0)
    a = maskgit_generate(maskgit, CLASSES, sampling, generator=torch.Generator().manual_seed(7))
    b = maskgit.generate(CLASSES, generator=7, num_steps=4, randomize_temperature=5.0)
    c = maskgit_generate(maskgit, CLASSES.repeat(4), sampling, generator=8)
    assert torch.equal(a, b)
    assert not torch.equal(a.repeat(4, 1), c)


def test_maskgit_guidance_scale_one_power_cosine_equals_no_guidance(maskgit):
    unguided = MaskGITSampling(num_steps=4, guidance_scale=0.0, guidance_decay="constant", randomize_temperature=2.0)
    scale_one = MaskGITSampling(
        num_steps=4, guidance_scale=1.0, guidance_decay="power-cosine", randomize_temperature=2.0
    )
    guided = MaskGITSampling(num_steps=4, guidance_scale=30.0, guidance_decay="constant", randomize_temperature=2.0)
    reference = maskgit_generate(maskgit, CLASSES.repeat(4), unguided, generator=0)
    assert torch.equal(maskgit_generate(maskgit, CLASSES.repeat(4), scale_one, generator=0), reference)
    assert not torch.equal(maskgit_generate(maskgit, CLASSES.repeat(4), guided, generator=0), reference)


def test_maskgit_guidance_is_a_no_op_when_the_null_class_equals_the_class(maskgit):
    model = _randomised(type(maskgit)(**TINY, intermediate_size=64))
    with torch.no_grad():
        model.embeddings.weight[model.null_condition_id] = model.embeddings.weight[model.codebook_size + 1 + 2]
    classes = torch.full((6,), 2)
    guided = MaskGITSampling(num_steps=4, guidance_scale=5.0, guidance_decay="constant", randomize_temperature=2.0)
    unguided = MaskGITSampling(num_steps=4, guidance_scale=0.0, guidance_decay="constant", randomize_temperature=2.0)
    assert torch.equal(maskgit_generate(model, classes, guided, 0), maskgit_generate(model, classes, unguided, 0))


# ----------------------------------------------------------------------------------------------------------
# RAR
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outside", [[5], [-1], [0, 7]])
def test_class_ids_outside_the_generator_classes_are_refused(maskgit, rar, outside):
    # 5 of 5 classes would sample the null (unconditional) class, -1 the mask token's condition
    for model, settings in ((maskgit, {"num_steps": 2}), (rar, {})):
        with pytest.raises(ValueError, match=r"class ids \[-?\d\] are outside the generator's 5 classes \(0..4\)"):
            model.generate(torch.tensor(outside), generator=0, **settings)


def test_randomness_ratio_anneals_from_one_to_zero():
    assert [randomness_ratio(s, 10, 20) for s in (0, 10, 15, 20, 30)] == [1.0, 1.0, 0.5, 0.0, 0.0]


def test_rar_orders_follow_the_random_ratio(rar):
    raster = torch.arange(rar.image_seq_len).expand(64, -1)
    rar.set_random_ratio(0.0)
    assert torch.equal(rar.sample_orders(64, torch.device("cpu")), raster)
    rar.set_random_ratio(1.0)
    orders = rar.sample_orders(64, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(orders.sort(1).values, raster)
    assert (orders != raster).any(1).float().mean() > 0.9
    rar.set_random_ratio(0.0)


def test_rar_training_labels_are_the_permuted_ids(rar):
    ids = torch.randint(0, 16, (2, rar.image_seq_len))
    orders = torch.stack([torch.randperm(rar.image_seq_len) for _ in range(2)])
    condition = rar.preprocess_condition(torch.tensor([1, 2]))
    with torch.no_grad():
        logits, labels = rar(ids, condition, return_labels=True, orders=orders)
    assert torch.equal(labels, ids.gather(1, orders))
    assert logits.shape == (2, rar.image_seq_len + 1, rar.codebook_size)


@pytest.mark.parametrize("rows", [2, 4])
def test_rar_kv_cache_gives_the_uncached_logits_at_every_step(rar, rows):
    ids = torch.randint(0, 16, (rows, rar.image_seq_len))
    condition = rar.preprocess_condition(torch.arange(rows) % 5)
    cache = rar.make_kv_cache()
    with torch.no_grad():
        for length in range(rar.image_seq_len + 1):
            cached = rar.forward_fn(ids[:, :length], condition, is_sampling=True, kv_cache=cache)
            full = rar.forward_fn(ids[:, :length], condition, is_sampling=True)
            assert cached.shape == (rows, 1, rar.codebook_size) and full.shape == (rows, length + 1, rar.codebook_size)
            torch.testing.assert_close(cached[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.length == rar.image_seq_len + 2


def test_rar_static_decode_step_gives_the_uncached_logits_at_every_step(rar):
    ids = torch.randint(0, 16, (3, rar.image_seq_len))
    condition = rar.preprocess_condition(torch.tensor([0, 2, 4]))
    cache = rar.make_kv_cache()
    with torch.no_grad():
        rar.forward_fn(ids[:, :0], condition, is_sampling=True, kv_cache=cache)
        for step in range(1, rar.image_seq_len):  # the last token is never fed back
            position = torch.tensor(step + 1)
            cached = rar.decode_step(ids[:, step - 1], condition, position, cache)
            full = rar.forward_fn(ids[:, :step], condition, is_sampling=True)[:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_decode_key_length_covers_the_position_in_blocks_and_runs_the_last_block_to_the_end():
    lengths = {position: decode_key_length(position, 258) for position in range(2, 257)}  # RAR-B's steps
    assert all(position < length <= 258 for position, length in lengths.items())
    assert sorted(set(lengths.values())) == [64, 128, 192, 258]
    assert lengths[63] == 64 and lengths[64] == 128 and lengths[191] == 192 and lengths[192] == 258
    assert {decode_key_length(p, 18) for p in range(2, 17)} == {18}  # shorter than a block: one shape


def test_rar_decode_step_reads_only_its_key_length(rar, monkeypatch):
    """Cache slots past the key length hold NaN (a masked NaN still poisons attention): a step that read
    them would not give the uncached logits."""
    monkeypatch.setattr(rar_module, "DECODE_KEY_BLOCK", 3)
    ids = torch.randint(0, 16, (2, rar.image_seq_len))
    condition = rar.preprocess_condition(torch.tensor([1, 3]))
    cache = rar.make_kv_cache()
    with torch.no_grad():
        rar.forward_fn(ids[:, :0], condition, is_sampling=True, kv_cache=cache)
        lengths = set()
        for step in range(1, rar.image_seq_len):
            position = step + 1
            key_length = decode_key_length(position, cache.max_len)
            lengths.add(key_length)
            cache.keys[:, :, :, key_length:] = float("nan")
            cache.values[:, :, :, key_length:] = float("nan")
            cached = rar.decode_step(ids[:, step - 1], condition, torch.tensor(position), cache, key_length)
            cache.keys[:, :, :, key_length:] = 0.0
            cache.values[:, :, :, key_length:] = 0.0
            full = rar.forward_fn(ids[:, :step], condition, is_sampling=True)[:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert len(lengths) == 3  # several shapes were exercised


def test_rar_kv_cache_accepts_several_new_positions_after_a_prefix(rar):
    ids = torch.randint(0, 16, (2, rar.image_seq_len))
    condition = rar.preprocess_condition(torch.tensor([0, 4]))
    cache = rar.make_kv_cache()
    with torch.no_grad():
        rar.forward_fn(ids[:, :2], condition, is_sampling=True, kv_cache=cache)
        chunk = rar.forward_fn(ids[:, :6], condition, is_sampling=True, kv_cache=cache)
        full = rar.forward_fn(ids[:, :6], condition, is_sampling=True)
    torch.testing.assert_close(chunk, full[:, -4:], rtol=1e-5, atol=1e-5)


def test_kv_cache_buffers_are_static_and_bounded():
    cache = KVCache(num_layers=1, max_len=3)
    k = torch.randn(2, 1, 2, 4)
    keys, values = cache.update(0, k, k)
    pointer = cache.keys.data_ptr()
    cache.advance(2)
    keys, _ = cache.update(0, k[:, :, :1], k[:, :, :1])
    assert cache.keys.data_ptr() == pointer and keys.shape == (2, 1, 3, 4)
    assert torch.equal(keys[:, :, :2], k) and torch.equal(keys[:, :, 2:], k[:, :, :1])
    cache.advance(1)
    with pytest.raises(ValueError):
        cache.update(0, k[:, :, :1], k[:, :, :1])


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_rar_generate_shapes_ranges_and_cache_equivalence(rar, guidance_scale):
    sampling = RARSampling(guidance_scale=guidance_scale, guidance_scale_pow=1.0, randomize_temperature=1.0)
    with_cache = rar_generate(rar, CLASSES, sampling, generator=0)
    without_cache = rar_generate(rar, CLASSES, replace(sampling, kv_cache=False), generator=0)
    assert with_cache.shape == (3, rar.image_seq_len) and with_cache.dtype == torch.long
    assert with_cache.min() >= 0 and with_cache.max() < rar.codebook_size
    assert torch.equal(with_cache, without_cache)


def test_rar_generate_with_several_key_lengths_equals_the_uncached_sampler(rar, monkeypatch):
    monkeypatch.setattr(rar_module, "DECODE_KEY_BLOCK", 2)
    sampling = RARSampling(guidance_scale=3.0, guidance_scale_pow=1.0)
    with_cache = rar_generate(rar, CLASSES, sampling, generator=4)
    assert torch.equal(with_cache, rar_generate(rar, CLASSES, replace(sampling, kv_cache=False), generator=4))


class TracedGraphCall(CUDAGraphCall):
    """CPU stand-in for a CUDA graph, under the contract of :class:`CUDAGraphCall` (its ``__call__`` is the
    real one): the call's operations are traced once (``make_fx`` on real tensors) and a replay runs exactly
    those operations again on the input buffers. As in a real graph, every value the capture did not read
    from the buffers (a number taken from a tensor, a shape, a Python branch) stays what it was at capture;
    closure tensors (the weights, the KV cache) are the same objects, so in-place writes reach them."""

    replays = captures = 0

    def _first_call(self) -> torch.Tensor:
        return self.fn(*self.inputs)

    def _capture(self):
        TracedGraphCall.captures += 1
        traced = make_fx(self.fn)(*self.inputs)  # runs fn once more: the first call's cache writes, repeated
        output = traced(*self.inputs)
        return _TracedReplay(traced, self.inputs, output), output


class _TracedReplay:
    def __init__(self, traced, inputs, output):
        self.traced, self.inputs, self.output = traced, inputs, output

    def replay(self) -> None:
        TracedGraphCall.replays += 1
        self.output.copy_(self.traced(*self.inputs))


@pytest.fixture
def traced_graphs(monkeypatch):
    """The samplers on CPU replaying their network calls as from CUDA graphs (TracedGraphCall)."""
    for module in (rar_module, maskgit_module):
        monkeypatch.setattr(module, "CUDAGraphCall", TracedGraphCall)
        monkeypatch.setattr(module, "can_graph", lambda model, device: True)
    TracedGraphCall.replays = TracedGraphCall.captures = 0
    return TracedGraphCall


def test_the_graph_stand_in_refuses_host_reads_and_keeps_what_the_capture_fixed():
    """As a CUDA graph: reading a number out of a tensor while capturing fails, a Python value read at
    capture is replayed unchanged, and only the input buffers vary."""
    with pytest.raises(RuntimeError, match="value out of a tracing tensor"):
        TracedGraphCall(lambda x, p: x * int(p))(torch.ones(2), 2)  # the eager first call passes, capture not
    setting = {"scale": 2.0}
    call = TracedGraphCall(lambda x, p: x * p * setting["scale"])
    assert torch.equal(call(torch.ones(2), 1), torch.full((2,), 2.0))  # the first call runs for real
    setting["scale"] = 5.0
    assert torch.equal(call(torch.ones(2), 3), torch.full((2,), 6.0))  # new buffer value, the old scale


def test_rar_graph_replays_equal_the_uncached_sampler(rar, traced_graphs, monkeypatch):
    monkeypatch.setattr(rar_module, "DECODE_KEY_BLOCK", 2)  # 4 graphs (key lengths 4, 6, 8, 10)
    for sampling in (RARSampling(guidance_scale=3.0, guidance_scale_pow=1.0), RARSampling(guidance_scale=0.0)):
        uncached = rar_generate(rar, CLASSES, replace(sampling, kv_cache=False), generator=4)
        replays = traced_graphs.replays
        assert torch.equal(rar_generate(rar, CLASSES, sampling, generator=4), uncached)
        # 7 cached steps: each key length's first step runs for real, the other 3 replay
        assert traced_graphs.replays - replays == 3


def test_maskgit_graph_replays_equal_eager_sampling(maskgit, traced_graphs):
    for decay in ("constant", "linear"):  # linear: step 0 runs unguided once, the others from one graph
        sampling = MaskGITSampling(num_steps=4, guidance_decay=decay)
        eager = maskgit_generate(maskgit, CLASSES, replace(sampling, cuda_graph=False), generator=3)
        replays = traced_graphs.replays
        assert torch.equal(maskgit_generate(maskgit, CLASSES, sampling, generator=3), eager)
        assert traced_graphs.replays - replays == (3 if decay == "constant" else 2)


def test_rar_graphs_kept_across_calls_only_replay_and_stay_exact(rar, traced_graphs, monkeypatch):
    """sample.py's batches: with a GraphCache the second call captures nothing, and every call equals the
    uncached sampler; another number of rows rebuilds the graphs (and the KV cache they write)."""
    monkeypatch.setattr(rar_module, "DECODE_KEY_BLOCK", 2)
    graphs, sampling = GraphCache(), RARSampling(guidance_scale=3.0, guidance_scale_pow=1.0)
    for classes, seed, captures in ((CLASSES, 4, 4), (CLASSES.flip(0), 5, 0), (CLASSES[:2], 6, 4)):
        before = traced_graphs.captures
        kept = rar_generate(rar, classes, sampling, generator=seed, graphs=graphs)
        assert torch.equal(kept, rar_generate(rar, classes, replace(sampling, kv_cache=False), generator=seed))
        assert traced_graphs.captures - before == captures


def test_maskgit_graphs_kept_across_calls_only_replay_and_stay_exact(maskgit, traced_graphs):
    graphs, sampling = GraphCache(), MaskGITSampling(num_steps=4, guidance_decay="linear")
    for classes, seed, captures, replays in ((CLASSES, 3, 1, 2), (CLASSES.flip(0), 4, 0, 3)):  # kept: replays all
        before = (traced_graphs.captures, traced_graphs.replays)
        kept = maskgit_generate(maskgit, classes, sampling, generator=seed, graphs=graphs)
        eager = maskgit_generate(maskgit, classes, replace(sampling, cuda_graph=False), generator=seed)
        assert torch.equal(kept, eager)
        assert (traced_graphs.captures - before[0], traced_graphs.replays - before[1]) == (captures, replays)


def test_graph_cache_keeps_an_entry_until_what_a_capture_fixed_changes():
    model, cache, built = torch.nn.Linear(2, 2), GraphCache(), []

    def build():
        built.append(object())
        return built[-1]

    entry = cache.get("kind", model, (1,), build)
    with torch.no_grad():
        model.weight.copy_(torch.ones(2, 2))  # new values in the same storage: a graph reads them
    assert cache.get("kind", model, (1,), build) is entry and len(built) == 1
    assert cache.get("kind", model, (2,), build) is not entry  # another key (batch rows)
    model.weight.data = model.weight.data.clone()  # new storage: a graph would read the old one
    cache.get("kind", model, (2,), build)
    assert len(built) == 3
    model.eval()  # dropout on or off is in a graph
    cache.get("kind", model, (2,), build)
    assert len(built) == 4


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@CUDA
@pytest.mark.parametrize("autocast", [False, True])
def test_rar_cuda_graph_sampling_equals_eager_sampling(rar, autocast, monkeypatch):
    monkeypatch.setattr(rar_module, "DECODE_KEY_BLOCK", 2)  # 4 graphs
    model = RAR(**TINY, intermediate_size=64).cuda().eval()
    model.load_state_dict(rar.state_dict())
    classes = CLASSES.cuda().repeat(3)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        graphed = model.generate(classes, generator=3)
        eager = model.generate(classes, generator=3, cuda_graph=False)
    assert torch.equal(graphed, eager)


@CUDA
def test_maskgit_cuda_graph_sampling_equals_eager_sampling(maskgit):
    model = type(maskgit)(**TINY, intermediate_size=64).cuda().eval()
    model.load_state_dict(maskgit.state_dict())
    classes = CLASSES.cuda().repeat(3)
    for decay in ("constant", "linear"):  # linear: step 0 runs unguided once, the others from one graph
        sampling = MaskGITSampling(num_steps=4, guidance_decay=decay)
        graphed = maskgit_generate(model, classes, sampling, generator=3)
        eager = maskgit_generate(model, classes, replace(sampling, cuda_graph=False), generator=3)
        assert torch.equal(graphed, eager)


@CUDA
def test_cuda_graphs_kept_across_calls_equal_eager_sampling(rar, maskgit, monkeypatch):
    monkeypatch.setattr(rar_module, "DECODE_KEY_BLOCK", 2)
    for trained in (rar, maskgit):
        model = type(trained)(**TINY, intermediate_size=64).cuda().eval()
        model.load_state_dict(trained.state_dict())
        graphs = GraphCache()
        for classes, seed in ((CLASSES.cuda().repeat(3), 3), (CLASSES.cuda().flip(0).repeat(3), 4)):
            kept = model.generate(classes, generator=seed, graphs=graphs)
            assert torch.equal(kept, model.generate(classes, generator=seed, cuda_graph=False))


def test_rar_is_deterministic_and_guidance_scale_one_is_unguided(rar):
    a = rar.generate(CLASSES, generator=5, guidance_scale=1.0)
    assert torch.equal(a, rar_generate(rar, CLASSES, RARSampling(guidance_scale=0.0), torch.Generator().manual_seed(5)))
    assert not torch.equal(rar.generate(CLASSES.repeat(4), generator=6), rar.generate(CLASSES.repeat(4), generator=5))
    guided = rar.generate(CLASSES.repeat(4), generator=5, guidance_scale=8.0, guidance_scale_pow=0.0)
    assert not torch.equal(guided, rar.generate(CLASSES.repeat(4), generator=5, guidance_scale=1.0))


def test_rar_raster_positions_match_explicit_raster_orders(rar):
    ids = torch.randint(0, 16, (2, rar.image_seq_len))
    condition = rar.preprocess_condition(torch.tensor([3, 1]))
    raster = torch.arange(rar.image_seq_len).expand(2, -1)
    with torch.no_grad():
        for length, sampling in [(rar.image_seq_len, False), (3, True), (0, True)]:
            implicit = rar.forward_fn(ids[:, :length], condition, is_sampling=sampling)
            explicit = rar.forward_fn(ids[:, :length], condition, orders=raster, is_sampling=sampling)
            torch.testing.assert_close(implicit, explicit, rtol=1e-6, atol=1e-6)
