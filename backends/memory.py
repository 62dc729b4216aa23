"""
The memory model and the defaults per chip: the estimated peak memory of one training step of the trainers' GPT, and
the tier's starting configuration shrunk until that estimate fits the machine (docs/memory-and-tiers.md). The model's
shape comes from the trainer's own ASPECT_RATIO and HEAD_DIM, the sequence length and vocabulary from prepare.py.
"""

import ast
import math
import os

from backends.device import DEFAULT_MEMORY_GB, BackendError
from prepare import MAX_SEQ_LEN, VOCAB_SIZE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURE = ("ASPECT_RATIO", "HEAD_DIM")  # the trainers' constants that shape the model, in this order

# ---------------------------------------------------------------------------
# Model size
# ---------------------------------------------------------------------------

def trainer_architecture(backend):
    """(ASPECT_RATIO, HEAD_DIM) as the trainer of this backend assigns them, read from its source without running it
    (python -m backends shows the defaults before any trainer starts, and an agent's edit must show there too)."""
    name = "train_mlx.py" if backend == "mlx" else "train.py"
    with open(os.path.join(ROOT, name)) as f:
        tree = ast.parse(f.read())
    assigned = {node.targets[0].id: node.value for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    try:
        return tuple(ast.literal_eval(assigned[constant]) for constant in ARCHITECTURE)
    except (KeyError, ValueError) as e:
        raise BackendError(f"{name} must assign {' and '.join(ARCHITECTURE)} plain numbers at its top level ({e!r})")


def model_dim(depth, aspect_ratio, head_dim):
    """The trainers' model_dim: depth * aspect_ratio, rounded up to whole heads."""
    return math.ceil(depth * aspect_ratio / head_dim) * head_dim


def count_parameters(depth, aspect_ratio, head_dim, vocab_size=VOCAB_SIZE, ve_gate_channels=0):
    """Parameters of the trainers' GPT at this depth (depth 8, aspect ratio 64, head dim 128, vocab 8192 and the
    models' 32 gate channels: 50.3 M, the original's num_params_M). The value-embedding gates (ve_gate_channels
    inputs per head, on the layers with value embeddings) are counted only when their width is given: a few hundred
    parameters, kilobytes that the memory estimate does without."""
    d = model_dim(depth, aspect_ratio, head_dim)
    n_head = d // head_dim
    n_ve = sum(i % 2 == (depth - 1) % 2 for i in range(depth))  # value embeddings on alternating layers, last included
    blocks = depth * 12 * d * d + n_ve * ve_gate_channels * n_head  # q,k,v,proj (4 d^2) + MLP (8 d^2) + ve gates
    embeddings = (2 + n_ve) * vocab_size * d                        # wte, lm_head, value embeddings
    return blocks + embeddings + 2 * depth                          # + resid and x0 lambdas

# ---------------------------------------------------------------------------
# Memory model
# ---------------------------------------------------------------------------

# The memory model, per training step of the original GPT at (depth, B = device_batch_size, T = seq_len, V = vocab):
#   state       = params * STATE_BYTES       fp32 weights + fp32 grads + two fp32 Adam moments (Muon keeps one
#                                            momentum, embeddings are bf16: an upper bound)
#   activations = B*T * depth * ACT_WIDTHS * d * 2
#                 what autograd keeps per token per layer, counted in d-wide bf16 vectors (twice that where the
#                 compute dtype is float32: MLX on an M1 or the CPU)
#   scores      = B * n_head * T*T * SCORE_BYTES * (depth or 1)
#                 attention scores where the backend materialises them: every layer's for eager PyTorch (MPS: SDPA's
#                 backward takes the math path, upcast to fp32), one layer's at a time for MLX on Metal and CPU
#   logits      = B*T * V * LOGIT_BYTES       lm_head output, fp32 copy, softcap, log-softmax and their grads
#   overhead    = OVERHEAD_GB                 framework, allocator slack, RoPE tables, the batch (for MLX's CUDA
#                                            build: the inputs its queued CUDA graphs hold)
# PyTorch: fitted to peaks measured on an H100 in four setups (compiled and eager, bf16 and fp32), then rounded up,
# so the estimates err high (the points: docs/memory-and-tiers.md).
# MLX (train_mlx.py) keeps less than eager PyTorch: relu^2 keeps only its input, the loss keeps the logits in the
# compute dtype and makes their float32 softcap for 1/8 of the tokens at a time, and attention keeps no scores
# (fused on CUDA, recomputed per layer elsewhere).
# Fitted to peaks of MLX's CUDA build on an H200 (with MLX_MAX_MB_PER_BUFFER=100, see bound_mlx_graph_memory; the
# 1 GiB overhead is what its queued CUDA graphs hold); the estimates err high. MLX's CPU build keeps the same widths
# (float32 there). Metal was not measured (no Mac): the same widths and overhead, plus one layer's unfused attention
# (recomputed per layer in the backward, 9 bytes per score in bf16, measured on the CPU build). The float32 compute
# of an M1 and of the CPU doubles the widths and the scores. The points and the fit: docs/memory-and-tiers.md.
STATE_BYTES = 16
OVERHEAD_GB = 1.0
PROFILES = {
    # (ACT_WIDTHS, SCORE_BYTES, scores of every layer?, LOGIT_BYTES, OVERHEAD_GB)
    "torch-compiled": (20, 0, False, 2.5, OVERHEAD_GB),  # CUDA: torch.compile fuses softcap + cross-entropy,
                                                         # flash attention keeps no scores
    "torch-eager": (36, 4.5, True, 17, OVERHEAD_GB),     # MPS, CPU
    "mlx-cuda": (24, 0, False, 4, OVERHEAD_GB),          # cuDNN's fused attention, forward and backward
    "mlx": (24, 9, False, 4, OVERHEAD_GB),               # Metal and MLX's CPU build: unfused attention, per layer
}


def memory_profile(backend, hw=None):
    """The PROFILES key for a backend; for MLX, hw (get_hardware_info) tells its CUDA build from Metal and the CPU."""
    if backend == "cuda":
        return "torch-compiled"
    if backend != "mlx":
        return "torch-eager"
    return "mlx-cuda" if (hw or {}).get("tier") == "cuda" else "mlx"


def estimate_memory_gb(depth, device_batch_size, aspect_ratio, head_dim, seq_len=MAX_SEQ_LEN, vocab_size=VOCAB_SIZE,
                       backend="mps", hw=None):
    """Estimated peak memory (GiB) of one training step of the trainers' GPT shaped by aspect_ratio and head_dim.
    `backend` (and, for MLX, `hw`) picks the calibration; the default (mps) is the hungriest, so an estimate that
    names no backend errs high."""
    act_widths, score_bytes, every_layer, logit_bytes, overhead_gb = PROFILES[memory_profile(backend, hw)]
    hw = hw or {}
    if backend == "mlx" and (hw.get("tier") == "cpu" or hw.get("generation") == "M1"):  # float32 compute
        act_widths, score_bytes = 2 * act_widths, 2 * score_bytes
    d = model_dim(depth, aspect_ratio, head_dim)
    tokens = device_batch_size * seq_len
    state = count_parameters(depth, aspect_ratio, head_dim, vocab_size) * STATE_BYTES
    activations = tokens * depth * act_widths * d * 2
    scores = device_batch_size * (d // head_dim) * seq_len**2 * score_bytes * (depth if every_layer else 1)
    logits = tokens * vocab_size * logit_bytes
    return (state + activations + scores + logits) / 2**30 + overhead_gb

# ---------------------------------------------------------------------------
# Defaults per tier
# ---------------------------------------------------------------------------

# Starting points for a 5-minute run, before fitting to memory: (depth, device_batch_size, total_batch_size).
# Small machines get smaller models (more steps in 5 minutes beat a bigger model that barely trains) and smaller
# total batches (an 8-core M1 does ~2 TFLOPS: 2**19 tokens a step would leave a handful of steps; at 2**16 a
# depth-8 model on a 40-core M3 Max, ~14 TFLOPS bf16 at ~30% MFU, makes about 80 steps in 5 minutes).
#   tier    depth  device batch  total batch   note
#   base      4         8          2**16       M1..M5, 8-32 GB
#   pro       6        16          2**16       18-64 GB
#   max       8        32          2**16       36-128 GB
#   ultra     8        64          2**17       64-192 GB
#   cuda      8       128          2**19       the original (H100, 44 GiB measured)
#   cpu       2         1          2048        smoke tests only
# Then device_batch_size halves (and after it reaches 1, depth drops) until the estimate fits memory_fraction of
# memory: half on a Mac, where unified memory swaps instead of failing (docs/memory-and-tiers.md), 85% of a CUDA
# card, which fails fast with an out-of-memory error instead. Every total is a power of two
# at least device_batch_size * MAX_SEQ_LEN, so halving keeps total % (device_batch_size * MAX_SEQ_LEN) == 0.
TIER_DEFAULTS = {
    "base": (4, 8, 2**16),
    "pro": (6, 16, 2**16),
    "max": (8, 32, 2**16),
    "ultra": (8, 64, 2**17),
    "cuda": (8, 128, 2**19),
    "cpu": (2, 1, 2048),
}


def _tier_key(hw):
    # A Mac forced onto the CPU gets the CPU row, not its chip's tier
    return "cpu" if hw.get("backend") == "cpu" else hw.get("tier", "cpu")


def memory_fraction(hw):
    return 0.85 if _tier_key(hw) == "cuda" else 0.5


def memory_budget_gb(hw):
    """The most memory a suggested configuration's estimate may use on this machine."""
    return memory_fraction(hw) * (hw.get("memory_gb") or DEFAULT_MEMORY_GB)


def suggest_hyperparameters(hw, aspect_ratio, head_dim):
    """dict(depth, device_batch_size, total_batch_size) for this machine and the trainer's model shape (its
    ASPECT_RATIO and HEAD_DIM): its tier's row of TIER_DEFAULTS, shrunk until estimate_memory_gb fits
    memory_budget_gb."""
    depth, batch, total = TIER_DEFAULTS.get(_tier_key(hw), TIER_DEFAULTS["cpu"])
    backend = hw.get("backend", "mps")
    budget = memory_budget_gb(hw)
    while (estimate_memory_gb(depth, batch, aspect_ratio, head_dim, backend=backend, hw=hw) > budget
           and (batch > 1 or depth > 1)):
        if batch > 1:
            batch //= 2
        else:
            depth -= 1
    return {"depth": depth, "device_batch_size": batch, "total_batch_size": total}
