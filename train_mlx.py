"""
Autoresearch pretraining script, MLX backend. Single-device, single-file.
The same model and loop as train.py, in MLX's idiom: Metal on Apple Silicon, also MLX's CPU and CUDA builds.
Usage: uv run train_mlx.py
"""

import gc
import math
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache, partial

import numpy as np

try:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
except ImportError:
    sys.exit("error: mlx is not installed: run `uv sync --extra mlx`")

from backends.device import get_hardware_info, get_peak_memory_mb, set_compiler_environment, sync_device
from backends.flops import get_peak_flops
from backends.gradcheck import check_gradients, hand_gradient
from backends.memory import suggest_hyperparameters
from backends.muon_mlx import MuonAdamW
from backends.record import start_run
from prepare import CACHE_DIR, FIXED_STEPS, MAX_SEQ_LEN, TIME_BUDGET, UNTIMED_STEPS, Tokenizer, evaluate_bpb, make_dataloader

# ---------------------------------------------------------------------------
# GPT Model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def norm(x):
    # eps as PyTorch's F.rms_norm default for bf16 and float32 inputs, which it computes in float32: float32's
    # machine epsilon (bf16's, 7.8e-3, would shrink rows of small activations)
    return mx.fast.rms_norm(x, None, mx.finfo(mx.float32).eps)


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def rope(x):
    # Half-split layout (traditional=False) over (B, H, T, D); scale=-1 negates the angles, which gives the
    # original's sign convention (y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos).
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=10000, scale=-1.0, offset=0)


@lru_cache(maxsize=None)
def band_mask(chunk, window, dtype):
    """Additive (chunk, window + chunk) mask of a chunk of queries against the keys from `window` before its first
    query to its last: 0 where query r may see key c (r <= c <= r + window, FlashAttention's left window), -inf
    elsewhere. In the compute dtype: MLX's CUDA attention turns a boolean mask into a fresh additive bias at every
    call. Built once per (chunk, window, dtype)."""
    r = mx.arange(chunk)[:, None]
    c = mx.arange(window + chunk)[None, :]
    return mx.where((c >= r) & (c <= r + window), 0.0, -mx.inf).astype(dtype)


def windowed_attention(q, k, v, window, sdpa, chunk=1024):
    """Causal attention with a left window, without computing the scores that the window hides. Queries before
    `window` see every earlier key: one causal call. The later ones go in chunks of `chunk` queries, each against
    only the window + chunk keys it can see, all chunks side by side in the batch axis of one masked call. A mask
    skips no work: one masked call would compute all T x T scores; at window T/2 these calls compute 2.5/4 of them
    (timings in docs/measurements.md)."""
    B, H, T, D = q.shape
    head = sdpa(q[:, :, :window], k[:, :, :window], v[:, :, :window], mask="causal")
    chunk = min(chunk, T - window)
    n = -(-(T - window) // chunk)
    if n == 1:  # one chunk (T=2048 at window T/2) sees every key: slices, where stacking would copy q, k and v
        tail = sdpa(q[:, :, window:], k, v, mask=band_mask(chunk, window, q.dtype))
    else:
        pad = window + n * chunk - T
        if pad:  # a last, shorter chunk is padded to full length (mx.pad copies even when there is nothing to add)
            q, k, v = (mx.pad(a, [(0, 0), (0, 0), (0, pad), (0, 0)]) for a in (q, k, v))
        qc = q[:, :, window:].reshape(B, H, n, chunk, D).swapaxes(1, 2).reshape(B * n, H, chunk, D)
        kc, vc = (mx.stack([a[:, :, i * chunk:i * chunk + window + chunk] for i in range(n)], axis=1)
                  .reshape(B * n, H, window + chunk, D) for a in (k, v))
        tail = sdpa(qc, kc, vc, mask=band_mask(chunk, window, q.dtype))
        tail = tail.reshape(B, n, H, chunk, D).swapaxes(1, 2).reshape(B, H, n * chunk, D)[:, :, :T - window]
    # joined in (B, T, H, D) order, the order the caller turns the output back to: one copy, not two
    return mx.concatenate([head.swapaxes(1, 2), tail.swapaxes(1, 2)], axis=1).swapaxes(1, 2)


def attention(q, k, v, window):
    """Causal attention over (B, H, T, D) with a left window. MLX's CUDA build trains with fused cuDNN kernels,
    forward and backward. Metal, and MLX's CPU build, run attention unfused whenever gradients are needed (the fused
    kernel serves only inference), so autodiff would keep every layer's scores and probabilities for the backward:
    512 MiB per tensor per layer at B=16, H=4, T=2048 in bf16. There, mx.checkpoint keeps only q, k, v and the
    output, and recomputes one layer's scores at a time in the backward (one more attention forward per layer)."""
    sdpa = partial(mx.fast.scaled_dot_product_attention, scale=q.shape[-1]**-0.5)
    if window >= q.shape[2] - 1:
        fn = lambda q, k, v: sdpa(q, k, v, mask="causal")
    else:
        fn = lambda q, k, v: windowed_attention(q, k, v, window, sdpa)
    fused_backward = mx.default_device() == mx.gpu and not mx.metal.is_available()  # MLX's CUDA build
    return fn(q, k, v) if fused_backward else mx.checkpoint(fn)(q, k, v)


# @hand_gradient marks a forward whose gradient is written by hand (its .vjp): change one, change the other. As the
# run starts, check_gradients compares each with MLX's autodiff of its forward and stops the run if they disagree.
@hand_gradient
def embedding_lookup(weight, idx):
    return weight[idx]


@embedding_lookup.vjp
def embedding_lookup_vjp(primals, cotangent, output):
    # Sum the gradient rows of repeated tokens in float32, stored afterwards in the table's dtype. The default
    # scatter-adds in the table's dtype: bf16 atomics on the many repeats of real text are slow (about 25 times,
    # docs/measurements.md) and round at every add.
    weight, idx = primals
    grad = mx.zeros(weight.shape, mx.float32).at[idx].add(cotangent.astype(mx.float32))
    return grad.astype(weight.dtype), mx.zeros_like(idx)


def chunks(a, n):
    """a split into n slices along its first axis (the last ones shorter when n does not divide it)."""
    size = -(-a.shape[0] // n)
    return [a[i:i + size] for i in range(0, a.shape[0], size)]


@hand_gradient
def lm_head_cross_entropy(x, weight, targets, softcap, n_chunks):
    """Per-token cross-entropy (float32) of the softcapped logits softcap * tanh(x @ weight.T / softcap), for x of
    shape (tokens, n_embd), computed n_chunks slices of the tokens at a time: what lm_head, `.astype(float32)`,
    the softcap and the cross-entropy compute in train.py. Returns the losses and each slice's logits, in x's dtype
    (the VJP needs nothing else): the float32 ones exist one slice at a time."""
    w = weight.astype(x.dtype)
    losses, logits = [], []
    for xc, tc in zip(chunks(x, n_chunks), chunks(targets, n_chunks)):
        if losses:  # one slice after the other (see the VJP)
            xc = mx.depends(xc, losses[-1])
        logits.append(xc @ w.T)
        capped = softcap * mx.tanh(logits[-1].astype(mx.float32) / softcap)
        losses.append(mx.logsumexp(capped, axis=-1) - mx.take_along_axis(capped, tc[:, None], axis=-1)[:, 0])
    return mx.concatenate(losses), logits


@lm_head_cross_entropy.vjp
def lm_head_cross_entropy_vjp(primals, cotangents, outputs):
    # Replaces autodiff through lm_head and the float32 loss chain, which keeps several float32 copies of the logits
    # (cast, scaled, tanh, softmax) for the backward: 64 MiB each per 2048-token row at vocab 8192. Here only the
    # logits are kept (2 bytes each in bf16), and each slice turns into gradients at once: d loss / d capped =
    # softmax - onehot, d capped / d logits = 1 - tanh^2, and the softmax comes from the saved loss (loss =
    # logsumexp - capped target). Recomputing the logits instead would keep less memory but take longer a step
    # (docs/measurements.md).
    # Each slice waits for the one before: MLX schedules independent work breadth-first (up to 20 wide), which would
    # run the slices side by side and hold all their gradients at once.
    x, weight, targets, softcap, n_chunks = primals
    cotangent, (loss, logits) = cotangents[0], outputs
    w = weight.astype(x.dtype)
    grad_x, grad_w = [], mx.zeros(weight.shape, mx.float32)
    for xc, tc, gc, lc, lg in zip(*(chunks(a, n_chunks) for a in (x, targets, cotangent, loss)), logits):
        if grad_x:
            xc, tc, gc, lc, lg = mx.depends([xc, tc, gc, lc, lg], [grad_x[-1], grad_w])
        # the target's capped logit from its gathered logit: a gather from t would make mx.compile write all of t
        # out in float32 and read it back; this way t exists only inside the one fused kernel that makes `grad`
        target_logit = mx.take_along_axis(lg, tc[:, None], axis=-1)[:, 0].astype(mx.float32)
        log_sum_exp = lc + softcap * mx.tanh(target_logit / softcap)
        t = mx.tanh(lg.astype(mx.float32) / softcap)
        onehot = mx.arange(w.shape[0]) == tc[:, None]
        grad = gc[:, None] * (mx.exp(softcap * t - log_sum_exp[:, None]) - onehot) * (1 - t * t)
        grad = grad.astype(x.dtype)
        grad_x.append(grad @ w)
        grad_w = grad_w + (grad.T @ xc).astype(mx.float32)
    return mx.concatenate(grad_x), grad_w.astype(weight.dtype), mx.zeros_like(targets), None, None


@hand_gradient
def relu_squared(x):
    # relu(x)^2, written so that mx.compile makes it one kernel (square(relu(x)) compiles to two)
    return mx.where(x > 0, x * x, 0)


@relu_squared.vjp
def relu_squared_vjp(primals, cotangent, output):
    # Replaces autodiff through `relu` and `square`, which keeps both relu's input and its output for the backward:
    # one (B, T, 4 * n_embd) tensor per layer more than this, which keeps only the input.
    x = primals  # a function of one array gets that array, not a tuple
    return 2 * nn.relu(x) * cotangent


class Embedding(nn.Embedding):
    """nn.Embedding with a float32 gradient sum (see embedding_lookup_vjp); the table keeps its dtype."""

    def __call__(self, idx):
        return embedding_lookup(self.weight, idx)


class Linear(nn.Linear):
    """nn.Linear with float32 master weights, cast to the activations' dtype at use (bf16 compute on GPUs)."""

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = 32
        if has_ve(layer_idx, config.n_layer):
            self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head, bias=False)

    def __call__(self, x, ve, window):
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)

        # Value residual (ResFormer): mix in the value embedding with an input-dependent gate per kv-head
        if ve is not None:
            ve = ve.reshape(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + mx.expand_dims(gate, -1) * ve

        # q, k and v stay in the projections' (B, T, H, D) memory: rope takes a (B, H, T, D) view (it wants the
        # sequence axis second to last) and keeps its memory order, rms_norm reads (B, T, H, D) rows as they are (it
        # would copy a (B, H, T, D) view), and the attention takes (B, H, T, D) views and returns its output in q's
        # memory order, so the reshape back to (B, T, C) copies nothing.
        q, k = (rope(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for a in (q, k))
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        y = attention(q, k, v, window)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def __call__(self, x):
        x = self.c_fc(x)
        x = relu_squared(x)
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def __call__(self, x, x0, resid_lambda, x0_lambda, ve, window):
        # the original mixes in x0 just before each block. The float32 scalars are cast: an MLX float32 array times a
        # bf16 one would promote the whole residual stream
        x = resid_lambda.astype(x.dtype) * x + x0_lambda.astype(x.dtype) * x0
        x = x + self.attn(norm(x), ve, window)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = {
            "wte": Embedding(config.vocab_size, config.n_embd),
            "h": [Block(config, i) for i in range(config.n_layer)],
        }
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.zeros((config.n_layer,))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = {
            str(i): Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        }

    def init_weights(self, dtype=mx.bfloat16):
        """The original's init. `dtype` is the compute dtype: the embeddings are stored in it (bf16 as the
        original on GPUs; float32 on CPU). Every other parameter is a float32 master weight."""
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5  # uniform with the std of N(0, 1/d)
        uniform = lambda w: mx.random.uniform(-s, s, w.shape)
        self.transformer["wte"].weight = mx.random.normal(self.transformer["wte"].weight.shape).astype(dtype)
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)
        for block in self.transformer["h"]:
            block.attn.c_q.weight = uniform(block.attn.c_q.weight)
            block.attn.c_k.weight = uniform(block.attn.c_k.weight)
            block.attn.c_v.weight = uniform(block.attn.c_v.weight)
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
            block.mlp.c_fc.weight = uniform(block.mlp.c_fc.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if "ve_gate" in block.attn:
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)  # 2*sigmoid(0) = 1: neutral
        self.resid_lambdas = mx.ones((self.config.n_layer,))
        self.x0_lambdas = mx.full((self.config.n_layer,), 0.1)
        for ve in self.value_embeds.values():
            ve.weight = uniform(ve.weight).astype(dtype)

    def _compute_window_sizes(self, config):
        """Left window per layer from the pattern: L = full context, S = half; the last layer is always full."""
        pattern = config.window_pattern.upper()
        assert pattern and all(c in "SL" for c in pattern), f"window_pattern must use only S and L, got {pattern!r}"
        long_window = config.sequence_len
        short_window = long_window // 2
        windows = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
        windows[-1] = long_window
        return windows

    def estimate_flops(self):
        """Estimated FLOPs per token (forward + backward): 6 per matmul weight plus attention."""
        counts = self.num_scaling_params()
        nparams_exclude = counts["wte"] + counts["value_embeds"] + counts["scalars"]
        h = self.config.n_head
        q = self.config.n_embd // self.config.n_head
        t = self.config.sequence_len
        attn_flops = sum(12 * h * q * min(window, t) for window in self.window_sizes)
        return 6 * (counts["total"] - nparams_exclude) + attn_flops

    def num_scaling_params(self):
        def count(tree):
            return sum(p.size for _, p in tree_flatten(tree))
        wte = count(self.transformer["wte"].parameters())
        value_embeds = count({k: ve.parameters() for k, ve in self.value_embeds.items()})
        lm_head = count(self.lm_head.parameters())
        transformer_matrices = count([block.parameters() for block in self.transformer["h"]])
        scalars = self.resid_lambdas.size + self.x0_lambdas.size
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        return {
            "wte": wte, "value_embeds": value_embeds, "lm_head": lm_head,
            "transformer_matrices": transformer_matrices, "scalars": scalars, "total": total,
        }

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                        weight_decay=0.0, adam_betas=(0.8, 0.95), scalar_lr=0.5):
        model_dim = self.config.n_embd
        params = dict(tree_flatten(self.parameters()))  # path -> array; the optimizer groups hold paths
        matrix_params = [p for p in params if p.startswith("transformer.h.")]
        value_embeds_params = [p for p in params if p.startswith("value_embeds.")]
        embedding_params = ["transformer.wte.weight"]
        lm_head_params = ["lm_head.weight"]
        resid_params = ["resid_lambdas"]
        x0_params = ["x0_lambdas"]
        assert len(params) == (len(matrix_params) + len(embedding_params) +
            len(lm_head_params) + len(value_embeds_params) + len(resid_params) + len(x0_params))
        # Scale the AdamW LRs of the embeddings and lm_head by 1/sqrt(d_model) (tuned at 768)
        dmodel_lr_scale = (model_dim / 768) ** -0.5
        print(f"Scaling AdamW LRs by 1/sqrt({model_dim}/768) = {dmodel_lr_scale:.6f}")
        param_groups = [
            dict(kind="adamw", params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=embedding_params, lr=embedding_lr * dmodel_lr_scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=value_embeds_params, lr=embedding_lr * dmodel_lr_scale, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=resid_params, lr=scalar_lr * 0.01, betas=adam_betas, eps=1e-10, weight_decay=0.0),
            dict(kind="adamw", params=x0_params, lr=scalar_lr, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        ]
        for shape in sorted({tuple(params[p].shape) for p in matrix_params}):
            group_params = [p for p in matrix_params if tuple(params[p].shape) == shape]
            param_groups.append(dict(kind="muon", params=group_params, lr=matrix_lr,
                                     momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        return MuonAdamW(param_groups)

    def __call__(self, idx, targets=None, reduction="mean"):
        T = idx.shape[1]
        assert T <= self.config.sequence_len * 10  # the PyTorch model's RoPE table length

        x = self.transformer["wte"](idx)
        x = norm(x)
        x0 = x
        for i, block in enumerate(self.transformer["h"]):
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, self.window_sizes[i])
        return self.head(x, targets, reduction)

    def head(self, x, targets, reduction):
        """Final norm, lm_head, softcap and the loss: the logits (and the loss) in float32, as the original."""
        x = norm(x)
        softcap = 15
        loss_chunks = 8  # lm_head_cross_entropy holds float32 logits for 1/8 of the tokens at a time
        if targets is None:
            logits = self.lm_head(x)
            return softcap * mx.tanh(logits.astype(mx.float32) / softcap)
        valid = targets != -1  # ignore_index=-1, as F.cross_entropy in train.py
        safe_targets = mx.where(valid, targets, 0).reshape(-1)
        loss, _ = lm_head_cross_entropy(x.reshape(safe_targets.size, -1), self.lm_head.weight, safe_targets, softcap,
                                        loss_chunks)
        loss = loss.reshape(targets.shape) * valid
        return loss if reduction == "none" else loss.sum() / mx.maximum(valid.sum(), 1)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

# Model architecture
ASPECT_RATIO = 64       # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128          # target head dimension for attention
WINDOW_PATTERN = "SSSL" # sliding window pattern: L=full, S=half context

BACKEND = "mlx"
HW = get_hardware_info(BACKEND)
SUGGESTED = suggest_hyperparameters(HW, ASPECT_RATIO, HEAD_DIM)  # memory-safe for this machine (python -m backends)

# Optimization
TOTAL_BATCH_SIZE = SUGGESTED["total_batch_size"] # tokens per optimizer step (tier default; the original uses 2**19)
EMBEDDING_LR = 0.6      # learning rate for token embeddings (Adam)
UNEMBEDDING_LR = 0.004  # learning rate for lm_head (Adam)
MATRIX_LR = 0.04        # learning rate for matrix parameters (Muon)
SCALAR_LR = 0.5         # learning rate for per-layer scalars (Adam)
WEIGHT_DECAY = 0.2      # cautious weight decay for Muon
ADAM_BETAS = (0.8, 0.95) # Adam beta1, beta2
WARMUP_RATIO = 0.0      # fraction of the run (time budget, or AUTORESEARCH_STEPS) for LR warmup
WARMDOWN_RATIO = 0.5    # fraction of the run for LR warmdown
FINAL_LR_FRAC = 0.0     # final LR as fraction of initial

# Model size
DEPTH = SUGGESTED["depth"]   # number of transformer layers (tier default; the original uses 8)
DEVICE_BATCH_SIZE = SUGGESTED["device_batch_size"] # per-device batch size (reduce if memory runs short)

# Execution
COMPILE = True          # mx.compile the training step (forward, backward and optimizer update)

# ---------------------------------------------------------------------------
# Setup: device, tokenizer, model, optimizer, dataloader
# ---------------------------------------------------------------------------

def build_model_config(depth, vocab_size):
    base_dim = depth * ASPECT_RATIO
    model_dim = ((base_dim + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return GPTConfig(
        sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size,
        n_layer=depth, n_head=num_heads, n_kv_head=num_heads, n_embd=model_dim,
        window_pattern=WINDOW_PATTERN,
    )


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0
    elif progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    else:
        cooldown = (1.0 - progress) / WARMDOWN_RATIO
        return cooldown * 1.0 + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


def evaluate(model, tokenizer, batch_size):
    """val_bpb of the model: evaluate_bpb, fed numpy rows."""
    def losses(x, y):
        loss = model(mx.array(x, dtype=mx.int32), mx.array(y, dtype=mx.int32), reduction="none")
        return np.array(loss.astype(mx.float32))

    return evaluate_bpb(losses, tokenizer, batch_size)


if __name__ == "__main__":
    t_start = time.time()
    set_compiler_environment(CACHE_DIR)  # before the first compilation and MLX's first GPU operation
    run = start_run(__file__, BACKEND, HW)  # runs.jsonl gets a record of this run, however it ends
    mx.random.seed(42)
    # bf16 compute on the GPU (Metal or CUDA), float32 on MLX's CPU build and on an M1 (no bf16 hardware)
    compute_dtype = mx.bfloat16 if mx.default_device() == mx.gpu and HW["generation"] != "M1" else mx.float32
    peak_flops = get_peak_flops(HW)
    print(f"backend: {BACKEND} ({mx.default_device()}) | chip: {HW['chip']} | tier: {HW['tier']} | compute dtype: {str(compute_dtype).removeprefix('mlx.core.')}")

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")

    config = build_model_config(DEPTH, vocab_size)
    print(f"Model config: {asdict(config)}")

    model = GPT(config)
    model.init_weights(dtype=compute_dtype)
    mx.eval(model.parameters())
    check_gradients(model, vocab_size)  # the @hand_gradient VJPs against autodiff: a wrong one stops the run here

    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    num_params = param_counts["total"]
    num_flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0, (
        f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN "
        f"({DEVICE_BATCH_SIZE} * {MAX_SEQ_LEN} = {tokens_per_fwdbwd}): change one of them, "
        f"e.g. TOTAL_BATCH_SIZE = {max(1, round(TOTAL_BATCH_SIZE / tokens_per_fwdbwd)) * tokens_per_fwdbwd}")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

    optimizer = model.setup_optimizer(
        unembedding_lr=UNEMBEDDING_LR,
        embedding_lr=EMBEDDING_LR,
        scalar_lr=SCALAR_LR,
        adam_betas=ADAM_BETAS,
        matrix_lr=MATRIX_LR,
        weight_decay=WEIGHT_DECAY,
    )

    optimizer.init(model)  # create the optimizer state now, so the compiled step sees it as an input

    # The compiled functions read and write the model and optimizer state: declare it as both inputs and
    # outputs (declared only as inputs, the traced parameters leak back and corrupt the model on the 2nd call).
    state = [model.state, optimizer.state]
    maybe_compile = partial(mx.compile, inputs=state, outputs=state) if COMPILE else (lambda fn: fn)
    loss_and_grad = nn.value_and_grad(model, lambda model, x, y: model(x, y))

    @maybe_compile
    def grad_step(x, y):
        return loss_and_grad(model, x, y)

    @maybe_compile
    def optimizer_step(grads):
        optimizer.update(model, tree_map(lambda g: g / grad_accum_steps, grads))

    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")

    def to_device(batch):
        x, y, epoch = batch
        return mx.array(x, dtype=mx.int32), mx.array(y, dtype=mx.int32), epoch

    x, y, epoch = to_device(next(train_loader))  # prefetch first batch

    print(f"Fixed work: {FIXED_STEPS} steps" if FIXED_STEPS else f"Time budget: {TIME_BUDGET}s")
    print(f"Gradient accumulation steps: {grad_accum_steps}")

    # -----------------------------------------------------------------------
    # Training loop
    # -----------------------------------------------------------------------

    t_start_training = time.time()
    run.mark_training_start()  # reads swap use and the machine's speed (a fixed matmul, under half a second)
    smooth_train_loss = 0
    total_training_time = 0
    step = 0

    while True:
        sync_device(BACKEND)
        t0 = time.time()
        grads = None
        for micro_step in range(grad_accum_steps):
            loss, micro_grads = grad_step(x, y)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            # Evaluate each micro-step (asynchronously, so the next batch is packed while the GPU works):
            # the accumulation graph never spans more than one micro-batch.
            mx.async_eval(loss, grads)
            x, y, epoch = to_device(next(train_loader))

        # Progress and schedules: one call reaches every group (LR for all, momentum and decay for Muon). Progress is
        # the time budget's share spent, or in fixed-work mode (AUTORESEARCH_STEPS) the steps' share done
        progress = step / FIXED_STEPS if FIXED_STEPS else min(total_training_time / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        optimizer.set_schedule(lrm, get_muon_momentum(step), get_weight_decay(progress))
        optimizer_step(grads)
        mx.eval(model.state, optimizer.state)  # the step ends here: read the clock only after this

        train_loss_f = loss.item()

        # Fast fail: abort if loss is exploding, NaN or inf
        if not math.isfinite(train_loss_f) or train_loss_f > 100:
            run.fail(step, train_loss_f)  # prints "FAIL: loss nan at step 37", records the run, exits with status 1

        sync_device(BACKEND)
        t1 = time.time()
        dt = t1 - t0

        if step >= UNTIMED_STEPS:
            total_training_time += dt

        # Logging
        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta**(step + 1))
        pct_done = 100 * progress
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
        mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops
        remaining = (FIXED_STEPS - step - 1) * dt if FIXED_STEPS else max(0, TIME_BUDGET - total_training_time)

        print(f"\rstep {step:05d} ({pct_done:.1f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | dt: {dt*1000:.0f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu:.1f}% | epoch: {epoch} | remaining: {remaining:.0f}s    ", end="", flush=True)

        # GC management (Python's GC causes ~500ms stalls)
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()

        step += 1

        # Time's up, but only stop after the warmup steps so compilation is not counted (fixed work: after its steps)
        if (step >= FIXED_STEPS) if FIXED_STEPS else (step >= UNTIMED_STEPS and total_training_time >= TIME_BUDGET):
            break

    print()  # newline after the \r training log
    run.mark_training_end()

    total_tokens = step * TOTAL_BATCH_SIZE

    # Final eval
    t_eval = time.time()
    val_bpb = evaluate(model, tokenizer, DEVICE_BATCH_SIZE)
    sync_device(BACKEND)
    eval_seconds = time.time() - t_eval

    # Final summary
    t_end = time.time()
    # step - UNTIMED_STEPS + 1 is the original's count, one step more than were timed: mfu_percent stays the original's
    steady_state_mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE * (step - UNTIMED_STEPS + 1) / total_training_time / peak_flops if total_training_time > 0 else 0
    peak_vram_mb = get_peak_memory_mb(BACKEND)

    # prints the summary block (program.md's contract) and appends this run's record to runs.jsonl
    run.summary(val_bpb=val_bpb, training_seconds=total_training_time, total_seconds=t_end - t_start,
                peak_vram_mb=peak_vram_mb, mfu_percent=steady_state_mfu, total_tokens_M=total_tokens / 1e6,
                num_steps=step, num_params_M=num_params / 1e6, depth=DEPTH, eval_seconds=eval_seconds)
