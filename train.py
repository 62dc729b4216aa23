"""
Autoresearch pretraining script, PyTorch backend. Single-device, single-file.
Runs on Apple Silicon (MPS), NVIDIA (CUDA) and CPU; hands over to train_mlx.py when the backend is MLX.
Usage: uv run train.py
"""

import os
import sys

from backends.device import detect_backend

BACKEND = detect_backend()
if __name__ == "__main__" and BACKEND == "mlx":
    # One experiment, one file: the agent must know which script produced the run it is reading.
    print("backend: mlx -> handing over to train_mlx.py (edit train_mlx.py, not train.py, for MLX runs)", flush=True)
    train_mlx = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_mlx.py")
    os.execv(sys.executable, [sys.executable, train_mlx] + sys.argv[1:])

import gc
import math
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from backends.device import get_hardware_info, get_peak_memory_mb, sample_memory, set_compiler_environment, sync_device
from backends.flops import get_peak_flops
from backends.memory import suggest_hyperparameters
from backends.muon_torch import MuonAdamW
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
    # What F.rms_norm does with a bf16 input on its own: float32 math with float32's eps, the result in x's dtype.
    # Spelled out because CUDA autocast runs rms_norm in float32 since PyTorch 2.12 and would return float32,
    # turning the bf16 residual stream, q and k into float32 (and flex_attention refuses q/k/v of mixed dtypes).
    return F.rms_norm(x.float(), (x.size(-1),), eps=torch.finfo(torch.float32).eps).to(x.dtype)


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    # Half-split layout with the original's sign convention (a rotation by -theta): [x1 cos + x2 sin, x2 cos - x1 sin].
    # Written with roll instead of the original's slices and cat: the same products and sums, bit-identical, but
    # inductor fuses the backward with qk-norm's into one kernel without per-half masked copies, which Triton builds
    # several times faster, at every edit of the model (docs/measurements.md).
    d = x.shape[3] // 2
    return x * torch.cat([cos, cos], 3) + x.roll(d, 3) * torch.cat([sin, -sin], 3)


@lru_cache(maxsize=None)
def window_mask(T, window, device):
    """Boolean (T, T) mask, True where query i may see key j: 0 <= i - j <= window (FlashAttention's left window).
    Cached per (T, window, device) so no forward pass ever builds one."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (i - j >= 0) & (i - j <= window)


_block_masks = {}  # a plain dict, not lru_cache: torch.compile traces through lru_cache, but reads a filled dict

def window_block_mask(T, window, device):
    """The same visibility as window_mask, as a flex_attention block mask: tiles outside the window are skipped.
    GPT.init_weights builds the training length's masks eagerly, so the compiled graph only looks them up."""
    key = (T, window, device)
    if key not in _block_masks:
        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
        _block_masks[key] = create_block_mask(sliding_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    return _block_masks[key]


def attention(q, k, v, window):
    """Causal attention over (B, H, T, D) with a left window. Full-context layers take SDPA's causal fast path;
    windowed layers use flex_attention when compiled on CUDA (it skips masked tiles; uncompiled it would fall back to a
    slow reference) and SDPA with a cached mask elsewhere."""
    T = q.size(2)
    if window >= T - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if q.device.type == "cuda" and torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=window_block_mask(T, window, str(q.device)))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, window, q.device))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)

        # Value residual (ResFormer): mix in the value embedding with an input-dependent gate per kv-head
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve

        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = attention(q, k, v, window)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square()
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, x0, resid_lambda, x0_lambda, ve, cos_sin, window):
        x = resid_lambda * x + x0_lambda * x0  # the original mixes in x0 just before each block
        x = x + self.attn(norm(x), ve, cos_sin, window)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, dtype=torch.bfloat16):
        """The original's init. `dtype` is the compute dtype: embeddings and RoPE tables are stored in it
        (bf16 as the original on GPUs; float32 where the device computes in float32)."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform with the std of N(0, 1/d)
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)  # 2*sigmoid(0) = 1: a neutral gate
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        head_dim = self.config.n_embd // self.config.n_head
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        if cos.device.type == "cuda":  # flex_attention masks for the windowed layers, built outside torch.compile
            for window in set(self.window_sizes) - {self.config.sequence_len}:
                window_block_mask(self.config.sequence_len, window, str(cos.device))
        self.transformer.wte.to(dtype=dtype)
        for ve in self.value_embeds.values():
            ve.to(dtype=dtype)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000):
        device = self.transformer.wte.weight.device
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

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
        nparams = sum(p.numel() for p in self.parameters())
        value_embeds_numel = sum(ve.weight.numel() for ve in self.value_embeds.values())
        nparams_exclude = (self.transformer.wte.weight.numel() + value_embeds_numel +
                           self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h = self.config.n_head
        q = self.config.n_embd // self.config.n_head
        t = self.config.sequence_len
        attn_flops = sum(12 * h * q * min(window, t) for window in self.window_sizes)
        return 6 * (nparams - nparams_exclude) + attn_flops

    def num_scaling_params(self):
        wte = sum(p.numel() for p in self.transformer.wte.parameters())
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = sum(p.numel() for p in self.lm_head.parameters())
        transformer_matrices = sum(p.numel() for p in self.transformer.h.parameters())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        total = wte + value_embeds + lm_head + transformer_matrices + scalars
        return {
            "wte": wte, "value_embeds": value_embeds, "lm_head": lm_head,
            "transformer_matrices": transformer_matrices, "scalars": scalars, "total": total,
        }

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                        weight_decay=0.0, adam_betas=(0.8, 0.95), scalar_lr=0.5):
        model_dim = self.config.n_embd
        matrix_params = list(self.transformer.h.parameters())
        value_embeds_params = list(self.value_embeds.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        resid_params = [self.resid_lambdas]
        x0_params = [self.x0_lambdas]
        assert len(list(self.parameters())) == (len(matrix_params) + len(embedding_params) +
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
        for shape in sorted({p.shape for p in matrix_params}):
            group_params = [p for p in matrix_params if p.shape == shape]
            param_groups.append(dict(kind="muon", params=group_params, lr=matrix_lr,
                                     momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        return MuonAdamW(param_groups)

    def forward(self, idx, targets=None, reduction="mean"):
        T = idx.size(1)
        assert T <= self.cos.size(1)
        cos_sin = self.cos[:, :T], self.sin[:, :T]

        x = self.transformer.wte(idx)
        x = norm(x)
        x0 = x.clone()  # a tensor of its own: a compiled block called with x is x0 would compile a graph just for that
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, cos_sin, self.window_sizes[i])
        return self.head(x, targets, reduction)

    def head(self, x, targets, reduction):
        """Final norm, lm_head, softcap and the loss: the logits (and the loss) in float32, as the original."""
        x = norm(x)
        softcap = 15
        logits = self.lm_head(x)
        logits = logits.float()
        logits = softcap * torch.tanh(logits / softcap)

        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

# Model architecture
ASPECT_RATIO = 64       # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128          # target head dimension for attention
WINDOW_PATTERN = "SSSL" # sliding window pattern: L=full, S=half context

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


def evaluate(model, tokenizer, batch_size, compiled=False):
    """val_bpb of the model: evaluate_bpb, fed numpy rows. An eager model runs under no_grad, in evaluate_bpb's chunks
    of at most 1 GiB of float32 logits. A compiled one is called as training calls it, with whole batches and autograd
    on, so that its training graphs serve (under no_grad, or with fewer rows, each would compile again); its compiled
    head bounds the logits itself."""
    device = model.lm_head.weight.device

    def losses(x, y):
        loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), reduction="none")
        return loss.detach().float().cpu().numpy()

    with torch.set_grad_enabled(compiled):
        return evaluate_bpb(losses, tokenizer, batch_size, rows_per_call=batch_size if compiled else None)


if __name__ == "__main__":
    t_start = time.time()
    set_compiler_environment(CACHE_DIR)  # before the first compilation and MLX's first GPU operation
    run = start_run(__file__, BACKEND, HW)  # runs.jsonl gets a record of this run, however it ends
    torch.manual_seed(42)
    device = torch.device(BACKEND)
    if BACKEND == "cuda":
        torch.set_float32_matmul_precision("high")
        compute_dtype = torch.bfloat16
    elif BACKEND == "mps":
        # MPS: bf16 needs macOS 14+, and only M2 and later have bf16 hardware (M1 would emulate it slowly).
        macos = tuple(int(v) for v in (platform.mac_ver()[0] or "0").split(".")[:2])
        compute_dtype = torch.bfloat16 if macos >= (14, 0) and HW["generation"] not in (None, "M1") else torch.float32
    else:
        compute_dtype = torch.float32
    autocast_ctx = torch.amp.autocast(device_type=BACKEND, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    peak_flops = get_peak_flops(HW)
    print(f"backend: {BACKEND} | chip: {HW['chip']} | tier: {HW['tier']} | compute dtype: {str(compute_dtype).removeprefix('torch.')}")

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")

    config = build_model_config(DEPTH, vocab_size)
    print(f"Model config: {asdict(config)}")

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(dtype=compute_dtype)

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

    if BACKEND == "cuda":
        # Regional compilation (MPS and CPU run eager: inductor does not help there). Each block and the head compile
        # on their own, and the blocks share one compiled graph per variant (window, value embedding or not): a few
        # blocks' worth of compilation instead of the whole unrolled model: an edited model's run costs less than half
        # as much beyond its training, for a few per cent of training speed (fusion stops at block borders).
        # Static shapes: with dynamic=True a new DEPTH or batch would reuse the cached graphs, but the steps ran
        # slower and the first compile took longer (docs/measurements.md).
        for block in model.transformer.h:
            block.compile(dynamic=False)
        model.head = torch.compile(model.head, dynamic=False)

    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")

    def to_device(batch):
        x, y, epoch = batch
        return torch.from_numpy(x).to(device, non_blocking=True), torch.from_numpy(y).to(device, non_blocking=True), epoch

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
        for micro_step in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y)
            train_loss = loss.detach()
            loss = loss / grad_accum_steps
            loss.backward()
            sample_memory(BACKEND)  # MPS reports only current usage: keep a running peak (a no-op elsewhere)
            x, y, epoch = to_device(next(train_loader))

        # Progress and schedules: one call reaches every group (LR for all, momentum and decay for Muon). Progress is
        # the time budget's share spent, or in fixed-work mode (AUTORESEARCH_STEPS) the steps' share done
        progress = step / FIXED_STEPS if FIXED_STEPS else min(total_training_time / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        optimizer.set_schedule(lrm, get_muon_momentum(step), get_weight_decay(progress))
        optimizer.step()
        model.zero_grad(set_to_none=True)

        train_loss_f = train_loss.item()

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
    model.eval()
    with autocast_ctx:  # on CUDA through the training's compiled graphs: only the head compiles again
        val_bpb = evaluate(model, tokenizer, DEVICE_BATCH_SIZE, compiled=BACKEND == "cuda")
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
