"""The GPT of train.py and train_mlx.py: sizes, FLOPs, window visibility, dtypes. Each model on its own here;
test_parity.py compares them with each other."""
import math

import numpy as np
import pytest

from conftest import need

need("mlx")  # before the imports below: a framework that is not installed skips this module, naming its extra
need("torch")

import mlx.core as mx
import mlx.nn as nn
import torch
from mlx.utils import tree_flatten

import train
import train_mlx
from tests.compute_dtype import check_bf16_forward, check_norm

VOCAB = 8192
TINY = dict(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SSSL")


def torch_gpt(config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = train.GPT(config)
    model.init_weights(dtype=dtype)
    return model


def mlx_gpt(config, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    model = train_mlx.GPT(config)
    model.init_weights(dtype=dtype)
    mx.eval(model.parameters())
    return model


def test_depth8_matches_the_original_parameter_count():
    # The original reports num_params_M 50.3 for DEPTH 8 at vocab 8192.
    with torch.device("meta"):
        model = train.GPT(train.build_model_config(8, VOCAB))
    counts = model.num_scaling_params()
    assert round(counts["total"] / 1e6, 1) == 50.3
    assert model.config.n_embd == 512 and model.config.n_head == 4
    assert counts == {
        "wte": VOCAB * 512, "value_embeds": 4 * VOCAB * 512, "lm_head": VOCAB * 512,
        "transformer_matrices": 8 * 12 * 512 * 512 + 4 * 32 * 4, "scalars": 16, "total": counts["total"],
    }


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8])
def test_model_dim_rounds_up_to_whole_heads(depth):
    config = train.build_model_config(depth, VOCAB)
    assert config.n_embd % train.HEAD_DIM == 0
    assert config.n_embd == math.ceil(depth * train.ASPECT_RATIO / train.HEAD_DIM) * train.HEAD_DIM
    assert config.n_head == config.n_embd // train.HEAD_DIM
    assert train_mlx.build_model_config(depth, VOCAB) == train_mlx.GPTConfig(**vars(config))


def test_value_embeddings_alternate_and_include_the_last_layer():
    for n_layer in range(1, 9):
        layers = [i for i in range(n_layer) if train.has_ve(i, n_layer)]
        assert n_layer - 1 in layers
        assert all(b - a == 2 for a, b in zip(layers, layers[1:]))


def test_window_sizes_tile_the_pattern_with_a_full_last_layer():
    config = train.GPTConfig(**{**TINY, "n_layer": 6})
    with torch.device("meta"):
        model = train.GPT(config)
    assert model.window_sizes == [32, 32, 32, 64, 32, 64]
    assert train_mlx.GPT(train_mlx.GPTConfig(**{**TINY, "n_layer": 6})).window_sizes == model.window_sizes


@pytest.mark.parametrize("T,window", [(16, 4), (64, 32), (2048, 1024)])
def test_window_mask_matches_the_brute_force_definition(T, window):
    # Key j is visible from query i iff 0 <= i - j <= window (FlashAttention's window_size=(window, 0)).
    brute = np.array([[0 <= i - j <= window for j in range(T)] for i in range(T)]) if T <= 64 else None
    torch_mask = train.window_mask(T, window, torch.device("cpu")).numpy()
    if brute is not None:
        np.testing.assert_array_equal(torch_mask, brute)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    np.testing.assert_array_equal(torch_mask, (i - j >= 0) & (i - j <= window))
    if T == 2048:  # the real S layer: query 1500 sees keys 476..1500
        assert torch_mask[1500, 476] and not torch_mask[1500, 475] and not torch_mask[1500, 1501]


@pytest.mark.parametrize("chunk,window", [(4, 3), (16, 7), (1024, 1024)])
def test_mlx_band_mask_is_the_window_seen_from_a_chunk(chunk, window):
    # A chunk of queries starting at q0 sees keys from q0 - window: query r of the chunk sees key c of its keys
    # iff query q0 + r may see key q0 - window + c in the full mask.
    additive = np.array(train_mlx.band_mask(chunk, window, mx.float32))
    assert additive.shape == (chunk, window + chunk) and set(np.unique(additive)) == {0.0, -np.inf}
    q0 = window
    full = train.window_mask(q0 + chunk, window, torch.device("cpu")).numpy()
    np.testing.assert_array_equal(additive == 0, full[q0:, :])


def test_masks_are_built_once_per_shape():
    assert train.window_mask(64, 32, torch.device("cpu")) is train.window_mask(64, 32, torch.device("cpu"))
    assert train_mlx.band_mask(64, 32, mx.bfloat16) is train_mlx.band_mask(64, 32, mx.bfloat16)
    assert train_mlx.band_mask(64, 32, mx.bfloat16).dtype == mx.bfloat16  # the dtype of q, k and v


def test_windowed_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    out = train.attention(q, k, v, window=7)
    scores = (q @ k.transpose(-1, -2)) / 4.0
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    scores = scores.masked_fill(~((i - j >= 0) & (i - j <= 7)), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=1e-5, atol=1e-5)


def test_flex_attention_block_mask_agrees_with_the_sdpa_mask():
    # CUDA runs windowed layers through flex_attention; check its block mask encodes the same visibility.
    block_mask = train.window_block_mask(256, 100, "cpu")
    dense = block_mask.to_dense()[0, 0]  # (q blocks, kv blocks), 1 where a tile has any visible key
    mask = train.window_mask(256, 100, torch.device("cpu"))
    bs = 256 // dense.shape[0]
    tiles = mask.view(dense.shape[0], bs, dense.shape[1], bs).any(dim=(1, 3))
    assert torch.equal(dense.bool(), tiles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_is_the_originals_slice_and_cat_rotation_bit_for_bit(dtype):
    # train.py writes RoPE with roll (its compiled backward builds far faster); the values must be the original's.
    torch.manual_seed(0)
    x = torch.randn(2, 50, 3, 32).to(dtype)
    cos, sin = (t.to(dtype) for t in train.GPT(train.GPTConfig(**TINY))._precompute_rotary_embeddings(50, 32))
    x1, x2 = x[..., :16], x[..., 16:]
    original = torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)
    assert torch.equal(train.apply_rotary_emb(x, cos, sin), original)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the CPU window mask
def test_compiled_blocks_make_one_graph_per_variant():
    # train.py compiles each block on its own (CUDA), and blocks alike share a graph: here (window, value embedding)
    # = (S, none) for layers 0 and 2, (S, ve) and (L, ve): 3 graphs. Layer 0 must not add one of its own, as it
    # would if its x and x0 were the same tensor (dynamo guards on inputs that alias).
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(**TINY))
    model.init_weights(dtype=torch.float32)
    for block in model.transformer.h:
        block.compile(backend="aot_eager", dynamic=False)
    idx = torch.randint(0, 512, (2, 64))
    model(idx, idx).backward()
    assert counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()


def test_torch_forward_shapes_and_loss_reductions():
    model = torch_gpt(train.GPTConfig(**TINY))
    idx = torch.randint(0, 512, (2, 64))
    assert model(idx).shape == (2, 64, 512)
    per_token = model(idx, idx, reduction="none")
    assert per_token.shape == (2, 64)
    torch.testing.assert_close(per_token.mean(), model(idx, idx))
    # An untrained model is close to uniform over the vocabulary
    assert abs(model(idx, idx).item() - math.log(512)) < 0.1


def test_mlx_forward_shapes_and_loss_reductions():
    model = mlx_gpt(train_mlx.GPTConfig(**TINY))
    idx = mx.array(np.random.default_rng(0).integers(0, 512, (2, 64)), dtype=mx.int32)
    assert model(idx).shape == (2, 64, 512)
    per_token = model(idx, idx, reduction="none")
    assert per_token.shape == (2, 64)
    assert abs(per_token.mean().item() - model(idx, idx).item()) < 1e-6
    assert abs(model(idx, idx).item() - math.log(512)) < 0.1


def test_mlx_master_weights_are_float32_and_embeddings_take_the_compute_dtype():
    model = mlx_gpt(train_mlx.GPTConfig(**TINY), dtype=mx.bfloat16)
    for path, p in tree_flatten(model.parameters()):
        expected = mx.bfloat16 if path.startswith(("transformer.wte", "value_embeds")) else mx.float32
        assert p.dtype == expected, path


def test_mlx_embedding_gradient_sums_repeated_tokens_in_float32():
    # 1000 repeats of one token: a bf16 running sum stalls at 256 (8-bit mantissa); the float32 sum is exact.
    table = train_mlx.Embedding(16, 4)
    table.weight = table.weight.astype(mx.bfloat16)
    idx = mx.array([[3] * 1000 + [5] * 7], dtype=mx.int32)
    loss = lambda weight: train_mlx.embedding_lookup(weight, idx).astype(mx.float32).sum()
    grad = mx.grad(loss)(table.weight)
    assert grad.dtype == mx.bfloat16  # stored like the table, as PyTorch's .grad
    expected = np.zeros((16, 4), dtype=np.float32)
    expected[3], expected[5] = 1000, 7
    np.testing.assert_array_equal(np.array(grad.astype(mx.float32)), expected)
    as_numpy = lambda a: np.array(a.astype(mx.float32))
    np.testing.assert_array_equal(as_numpy(table(idx)), as_numpy(table.weight[idx]))  # the forward is a plain lookup


def mlx_grads(fn, *args):
    """fn's value and its gradients with respect to every array argument, as float64 numpy arrays."""
    value, grads = mx.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
    return [np.array(a.astype(mx.float32), dtype=np.float64) for a in (value, *grads)]


@pytest.mark.parametrize("n_chunks", [1, 3, 8])  # 3 does not divide the 37 tokens: the last slice is shorter
def test_mlx_lm_head_cross_entropy_matches_autodiff(n_chunks):
    # The custom VJP against MLX's own autodiff of what it replaces: lm_head, the float32 softcap, cross-entropy
    rng = np.random.default_rng(0)
    x, weight = mx.array(rng.normal(size=(37, 16)), mx.float32), mx.array(3 * rng.normal(size=(64, 16)), mx.float32)
    targets = mx.array(rng.integers(0, 64, 37), mx.int32)
    weights = mx.array(rng.normal(size=37), mx.float32)  # a cotangent other than 1 for every token

    def autodiff(x, weight):
        logits = 15 * mx.tanh((x @ weight.T).astype(mx.float32) / 15)
        return (nn.losses.cross_entropy(logits, targets, reduction="none") * weights).sum()

    def custom(x, weight):
        losses, _ = train_mlx.lm_head_cross_entropy(x, weight, targets, 15, n_chunks)  # and each slice's logits
        return (losses * weights).sum()

    for got, expected in zip(mlx_grads(custom, x, weight), mlx_grads(autodiff, x, weight)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    compiled = mx.compile(mx.grad(custom, argnums=(0, 1)))(x, weight)  # the trainer compiles it
    for got, expected in zip(compiled, mlx_grads(autodiff, x, weight)[1:]):
        np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-6)


def test_mlx_relu_squared_matches_autodiff():
    x = mx.array(np.random.default_rng(0).normal(size=(4, 9)), mx.float32)
    weights = mx.array(np.random.default_rng(1).normal(size=(4, 9)), mx.float32)
    got = mlx_grads(lambda x: (train_mlx.relu_squared(x) * weights).sum(), x)
    expected = mlx_grads(lambda x: (mx.square(mx.maximum(x, 0)) * weights).sum(), x)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def window_softmax_mask(T, window):
    """The additive (T, T) mask of a windowed causal layer, built from its definition."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return mx.array(np.where((i - j >= 0) & (i - j <= window), 0.0, -np.inf), mx.float32)


@pytest.mark.parametrize("window", [20, 64])  # a windowed layer (chunked) and a full one (causal)
def test_mlx_attention_equals_the_masked_fused_call_forward_and_backward(window):
    # attention() skips the scores that the window hides (windowed_attention), and on MLX's CPU (and Metal)
    # recomputes them in the backward (mx.checkpoint): values and gradients must be those of one
    # mx.fast.scaled_dot_product_attention call over all T x T pairs with the window's mask.
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.normal(size=(2, 3, 64, 16)), mx.float32) for _ in range(3))
    weights = mx.array(rng.normal(size=(2, 3, 64, 16)), mx.float32)
    mask = window_softmax_mask(64, window)
    fused = lambda q, k, v: (mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask) * weights).sum()
    ours = lambda q, k, v: (train_mlx.attention(q, k, v, window) * weights).sum()
    for got, expected in zip(mlx_grads(ours, q, k, v), mlx_grads(fused, q, k, v)):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,window,chunk", [(64, 20, 8), (64, 20, 44), (64, 31, 5), (40, 7, 3), (64, 1, 8),
                                            (64, 62, 4)])
@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
def test_mlx_windowed_attention_in_chunks_is_exact(T, window, chunk, layout):
    # Chunks that divide the queries after the window and chunks that leave a padded last one (a single chunk too),
    # windows from 1 to T - 2, inputs contiguous or (as the model passes them) (B, H, T, D) views of (B, T, H, D)
    # memory: the same values and gradients as the masked call over all pairs.
    rng = np.random.default_rng(1)
    shape = (2, 3, T, 16) if layout == "BHTD" else (2, T, 3, 16)
    q, k, v, weights = (mx.array(rng.normal(size=shape), mx.float32) for _ in range(4))
    if layout == "BTHD":
        q, k, v, weights = (a.transpose(0, 2, 1, 3) for a in (q, k, v, weights))
    sdpa = lambda q, k, v, mask: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    mask = window_softmax_mask(T, window)
    full = lambda q, k, v: (sdpa(q, k, v, mask) * weights).sum()
    chunked = lambda q, k, v: (train_mlx.windowed_attention(q, k, v, window, sdpa, chunk=chunk) * weights).sum()
    for got, expected in zip(mlx_grads(chunked, q, k, v), mlx_grads(full, q, k, v)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_mlx_residual_stream_stays_in_the_compute_dtype(monkeypatch):
    # A stray float32 scalar would silently promote the whole bf16 network to float32.
    model = mlx_gpt(train_mlx.GPTConfig(**TINY), dtype=mx.bfloat16)
    seen = []
    original_call = train_mlx.Block.__call__

    def spy(self, x, *args):
        out = original_call(self, x, *args)
        seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(train_mlx.Block, "__call__", spy)
    idx = mx.array(np.random.default_rng(0).integers(0, 512, (1, 64)), dtype=mx.int32)
    logits = model(idx)
    assert len(seen) == TINY["n_layer"]
    assert all(d == (mx.bfloat16, mx.bfloat16) for d in seen), seen
    assert logits.dtype == mx.float32  # logits (and the loss) are computed in float32, as the original


def test_torch_bf16_autocast_keeps_bf16_through_norm():
    # Under CPU autocast with CUDA's float32 rule for rms_norm (PyTorch 2.12 and later): see tests/compute_dtype.py
    check_norm("cpu")
    check_bf16_forward("cpu")
