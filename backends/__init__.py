"""
Backend and chip detection, memory-safe defaults and device utilities.
Shared infrastructure: the agent does not edit this.
Nothing here imports torch or mlx at module level: a Mac may have only one of them installed.
Usage: python -m backends   (prints what was detected and what would be used)
"""

import atexit
import gc
import importlib
import math
import os
import re
import subprocess
import sys

BACKENDS = ("auto", "mlx", "mps", "cuda", "cpu")
# The mps extra is plain PyTorch (the CUDA build on Linux), so it also installs what cuda needs
INSTALL = {"mlx": "uv sync --extra mlx", "torch": "uv sync --extra mps"}
DEFAULT_MEMORY_GB = 8.0  # assumed when memory cannot be read: the smallest Mac, so the defaults stay safe


class BackendError(SystemExit):
    """A one-line configuration error: a script exits non-zero with this line and no traceback."""


# The trainers freeze the garbage collector after their first step, as the original does (no ~500 ms pauses). The
# collection at interpreter exit skips frozen objects, so the reference cycles that keep triton's objects alive
# (Linux torch imports triton with torch._dynamo, which even the meta-device init loads) outlive it, and nanobind then
# prints ~30 lines of "leaked ..." after the summary, or after a crash's traceback. Unfrozen, they are freed.
atexit.register(gc.unfreeze)

# ---------------------------------------------------------------------------
# Probes (module-level so tests can replace them with fakes)
# ---------------------------------------------------------------------------

def _platform():
    return sys.platform


def _import(name):
    """The module, or None if it is not installed or fails to import."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def _run(*args):
    """stdout of a command, or "" if it is missing or fails (never raises: unknown machines must not crash us)."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return ""


def _sysctl(name):
    return _run("sysctl", "-n", name).strip()


def _read_file(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""

# ---------------------------------------------------------------------------
# Backend detection
# ---------------------------------------------------------------------------

def _backend_problem(backend):
    """None if `backend` can run here, else why not (with the install command where installing fixes it).
    cpu is PyTorch's CPU: train.py runs it."""
    if backend == "mlx":
        mx = _import("mlx.core")
        if mx is None:
            return f"mlx is not installed: run `{INSTALL['mlx']}`"
        if _platform() == "darwin" and not mx.metal.is_available():
            return "mlx.core.metal.is_available() is False"
        return None
    torch = _import("torch")
    if torch is None:
        return f"torch is not installed: run `{INSTALL['torch']}`"
    if backend == "mps" and not torch.backends.mps.is_available():
        return "torch.backends.mps.is_available() is False" + ("" if _platform() == "darwin" else " (MPS needs macOS)")
    if backend == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def detect_backend():
    """One of mlx, mps, cuda, cpu, from AUTORESEARCH_BACKEND (default auto), or a one-line BackendError.
    auto: on macOS MLX, then MPS, then PyTorch's CPU; elsewhere CUDA if PyTorch sees a GPU, else PyTorch's CPU,
    else MLX (its CPU or CUDA build), for a machine that has only MLX installed."""
    requested = os.environ.get("AUTORESEARCH_BACKEND", "auto").strip().lower() or "auto"
    if requested not in BACKENDS:
        raise BackendError(f"AUTORESEARCH_BACKEND={requested!r} is not valid: choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        problem = _backend_problem(requested)
        if problem:
            raise BackendError(f"{requested} requested (AUTORESEARCH_BACKEND={requested}) but {problem}")
        return requested
    problems = []
    for backend in ("mlx", "mps", "cpu") if _platform() == "darwin" else ("cuda", "cpu", "mlx"):
        problem = _backend_problem(backend)
        if problem is None:
            return backend
        problems.append(problem)
    raise BackendError("no backend can run here: " + "; ".join(dict.fromkeys(problems)))

# ---------------------------------------------------------------------------
# Hardware info
# ---------------------------------------------------------------------------

def _apple_info():
    brand = _sysctl("machdep.cpu.brand_string")
    info = {"chip": brand or "unknown"}
    if "Intel" in brand:
        info["tier"] = "cpu"  # an Intel Mac: no unified-memory GPU tiers apply
    else:
        m = re.search(r"\bM(\d+)\b(?:\s+(Pro|Max|Ultra)\b)?", brand)
        info["generation"] = f"M{m.group(1)}" if m else None
        info["tier"] = (m.group(2) or "base").lower() if m else "base"  # an Apple chip we cannot parse: smallest tier
    memsize = _sysctl("hw.memsize")
    if memsize.isdigit():
        info["memory_gb"] = int(memsize) / 2**30
    # ioreg answers at once; system_profiler takes about a second, so it is the fallback
    m = (re.search(r'"gpu-core-count"\s*=\s*(\d+)', _run("ioreg", "-rc", "AGXAccelerator", "-d", "1"))
         or re.search(r"Total Number of Cores:\s*(\d+)", _run("system_profiler", "SPDisplaysDataType")))
    if m:
        info["gpu_cores"] = int(m.group(1))
    return info


def _linux_info():
    info = {}
    m = re.search(r"^model name\s*:\s*(.+)$", _read_file("/proc/cpuinfo"), re.MULTILINE)
    if m:
        info["chip"] = m.group(1).strip()
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read_file("/proc/meminfo"), re.MULTILINE)
    if m:
        info["memory_gb"] = int(m.group(1)) / 2**20
    return info


def _cuda_info():
    torch = _import("torch")
    props = torch.cuda.get_device_properties(0)
    # SMs are the unit closest to an Apple GPU core (both have 128 FP32 lanes)
    return {"chip": props.name, "generation": None, "tier": "cuda", "gpu_cores": props.multi_processor_count,
            "memory_gb": props.total_memory / 2**30}


def _mlx_cuda_available():
    mx = _import("mlx.core")
    return mx is not None and hasattr(mx, "cuda") and mx.cuda.is_available()


def get_hardware_info(backend=None):
    """chip, generation (M1..M5 or None), tier (base/pro/max/ultra on Apple, cuda, cpu), gpu_cores,
    memory_gb (unified memory on a Mac, GPU memory on CUDA, RAM otherwise) and backend. Never raises on an
    unknown machine: what cannot be read keeps a safe default."""
    backend = backend or detect_backend()
    info = {"chip": "unknown", "generation": None, "tier": "cpu", "gpu_cores": None,
            "memory_gb": DEFAULT_MEMORY_GB, "backend": backend}
    info.update(_apple_info() if _platform() == "darwin" else _linux_info())
    # MLX's CUDA build (Linux) runs on the same NVIDIA card that PyTorch would report
    mlx_on_cuda = backend == "mlx" and _platform() != "darwin" and _mlx_cuda_available()
    if backend == "cuda" or mlx_on_cuda:
        try:
            info.update(_cuda_info())
        except Exception:
            pass  # torch or the driver went away: keep the host's figures
    return info

def swap_used_mb():
    """Swap in use on this machine, in MiB, or None where it cannot be read: `sysctl vm.swapusage` on macOS
    ("total = 2048.00M  used = 1034.25M  free = ..."), SwapTotal - SwapFree in /proc/meminfo on Linux."""
    if _platform() == "darwin":
        m = re.search(r"used\s*=\s*([\d.]+)([KMG])", _sysctl("vm.swapusage"))
        return float(m.group(1)) * {"K": 2**-10, "M": 1, "G": 2**10}[m.group(2)] if m else None
    meminfo = _read_file("/proc/meminfo")
    total = re.search(r"^SwapTotal:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
    free = re.search(r"^SwapFree:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
    return (int(total.group(1)) - int(free.group(1))) / 2**10 if total and free else None

# ---------------------------------------------------------------------------
# Optimizer constants (framework-neutral; used by muon_mps.py and muon_mlx.py)
# ---------------------------------------------------------------------------

# Polar Express coefficients (a, b, c), one triple per Newton-Schulz iteration (from the original;
# Amsel et al., "The Polar Express", arXiv:2505.16932).
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

# ---------------------------------------------------------------------------
# Model size and memory model
# ---------------------------------------------------------------------------

ASPECT_RATIO = 64       # the original's model_dim = depth * ASPECT_RATIO, rounded up to whole heads
HEAD_DIM = 128
VE_GATE_CHANNELS = 32
MAX_SEQ_LEN = 2048      # prepare.py's sequence length, the default for the estimates below


def _model_dim(depth):
    return math.ceil(depth * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM


def count_parameters(depth, vocab_size=8192):
    """Parameters of the original GPT at this depth (depth 8, vocab 8192: 50.3 M, the original's num_params_M)."""
    d = _model_dim(depth)
    n_head = d // HEAD_DIM
    n_ve = sum(i % 2 == (depth - 1) % 2 for i in range(depth))  # value embeddings on alternating layers, last included
    blocks = depth * 12 * d * d + n_ve * VE_GATE_CHANNELS * n_head  # q,k,v,proj (4 d^2) + MLP (8 d^2) + ve gates
    embeddings = (2 + n_ve) * vocab_size * d                        # wte, lm_head, value embeddings
    return blocks + embeddings + 2 * depth                          # + resid and x0 lambdas


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


def estimate_memory_gb(depth, device_batch_size, seq_len=MAX_SEQ_LEN, vocab_size=8192, backend="mps", hw=None):
    """Estimated peak memory (GiB) of one training step. `backend` (and, for MLX, `hw`) picks the calibration;
    the default (mps) is the hungriest, so an estimate that names no backend errs high."""
    act_widths, score_bytes, every_layer, logit_bytes, overhead_gb = PROFILES[memory_profile(backend, hw)]
    hw = hw or {}
    if backend == "mlx" and (hw.get("tier") == "cpu" or hw.get("generation") == "M1"):  # float32 compute
        act_widths, score_bytes = 2 * act_widths, 2 * score_bytes
    d = _model_dim(depth)
    tokens = device_batch_size * seq_len
    state = count_parameters(depth, vocab_size) * STATE_BYTES
    activations = tokens * depth * act_widths * d * 2
    scores = device_batch_size * (d // HEAD_DIM) * seq_len**2 * score_bytes * (depth if every_layer else 1)
    logits = tokens * vocab_size * logit_bytes
    return (state + activations + scores + logits) / 2**30 + overhead_gb

# ---------------------------------------------------------------------------
# Tiered defaults
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


def suggest_hyperparameters(hw):
    """dict(depth, device_batch_size, total_batch_size) for this machine: its tier's row of TIER_DEFAULTS,
    shrunk until estimate_memory_gb fits memory_budget_gb."""
    depth, batch, total = TIER_DEFAULTS.get(_tier_key(hw), TIER_DEFAULTS["cpu"])
    backend = hw.get("backend", "mps")
    budget = memory_budget_gb(hw)
    while estimate_memory_gb(depth, batch, backend=backend, hw=hw) > budget and (batch > 1 or depth > 1):
        if batch > 1:
            batch //= 2
        else:
            depth -= 1
    return {"depth": depth, "device_batch_size": batch, "total_batch_size": total}

# ---------------------------------------------------------------------------
# Peak FLOPS (the denominator of MFU, which is therefore an estimate)
# ---------------------------------------------------------------------------

# Apple publishes no bf16 peak for any M chip. An Apple GPU core has 128 FP32 ALUs (an FMA is 2 FLOPs) and on
# M1-M4 bf16 runs no faster than FP32, so bf16 peak = FP32 peak = GPU cores * 256 * GPU clock. Per core:
APPLE_GFLOPS_PER_CORE = {
    "M1": 325,   # Apple's own FP32 figures: M1 8-core 2.6 TFLOPS, M1 Max 32-core 10.4, M1 Ultra 64-core 21
    "M2": 358,   # Apple: M2 10-core 3.6 TFLOPS, M2 Max 38-core 13.6, M2 Ultra 76-core 27.2
    "M3": 358,   # Apple publishes none: third-party GPU clock 1.398 GHz (e.g. 40-core M3 Max at 14.3 TFLOPS)
    "M4": 430,   # Apple publishes none: third-party GPU clock 1.678 GHz (e.g. 32-core M4 Max at 13.7 TFLOPS)
    "M5": 1720,  # M4's per core x 4: Apple says M5's per-core GPU neural accelerators give "over 4x the peak GPU
                 # compute for AI" of M4. Frameworks that do not use them will show a low MFU on M5
}
# The largest GPU of each chip, used when the core count cannot be read (a larger peak understates MFU, never
# overstates it). Ultra = 2 x Max; no M4 Ultra has shipped, and M5 Pro/Max/Ultra are assumed to match M4's.
APPLE_GPU_CORES = {
    "M1": {"base": 8, "pro": 16, "max": 32, "ultra": 64},
    "M2": {"base": 10, "pro": 19, "max": 38, "ultra": 76},
    "M3": {"base": 10, "pro": 18, "max": 40, "ultra": 80},
    "M4": {"base": 10, "pro": 20, "max": 40, "ultra": 80},
    "M5": {"base": 10, "pro": 20, "max": 40, "ultra": 80},
}
APPLE_PEAK_FLOPS = {(gen, tier): cores * APPLE_GFLOPS_PER_CORE[gen] * 1e9
                    for gen, tiers in APPLE_GPU_CORES.items() for tier, cores in tiers.items()}
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (their headline figures assume 2:4 sparsity: halved here).
# First match of a substring of the device name wins, so longer names come first.
NVIDIA_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.5e12),     # SXM: the original's H100_BF16_PEAK_FLOPS
    ("H200", 989.5e12),     # same SMs and clocks as the H100 SXM (GH200 included)
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),   # GeForce: fp32 accumulate
    ("RTX 3090", 71e12),
)
UNKNOWN_NVIDIA_FLOPS = 989.5e12  # an unlisted card: the original's H100 figure
CPU_FLOPS_PER_CORE = 1e11        # rough: AVX-512 FP32 FMA near 3 GHz is 100-200 GFLOPS a core


def peak_flops_and_source(hw):
    """(bf16 peak FLOPS, where the figure comes from): every figure is a datasheet number or an estimate."""
    tier, gen, cores = hw.get("tier"), hw.get("generation"), hw.get("gpu_cores")
    if tier == "cuda":
        name = hw.get("chip", "")
        for key, flops in NVIDIA_PEAK_FLOPS:
            if key in name:
                return flops, f"NVIDIA datasheet, {key}, dense bf16"
        return UNKNOWN_NVIDIA_FLOPS, f"estimate: {name!r} not in the table, assumed H100-class"
    if tier in ("base", "pro", "max", "ultra"):
        known = gen in APPLE_GFLOPS_PER_CORE
        gen = gen if known else max(APPLE_GFLOPS_PER_CORE, key=lambda g: int(g[1:]))  # unknown: newest, highest
        cores = cores or APPLE_GPU_CORES[gen][tier]
        note = "" if known else f", {hw.get('generation') or 'unknown generation'} taken as {gen}"
        per_core = APPLE_GFLOPS_PER_CORE[gen]
        return cores * per_core * 1e9, f"estimate: {cores} GPU cores x {per_core} GFLOPS ({gen}){note}"
    n = os.cpu_count() or 1
    return n * CPU_FLOPS_PER_CORE, f"estimate: {n} CPU cores x {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOPS"


def get_peak_flops(hw):
    """bf16 peak FLOPS of this machine's accelerator, for MFU (an estimate: see peak_flops_and_source)."""
    return peak_flops_and_source(hw)[0]

# ---------------------------------------------------------------------------
# Compiler caches
# ---------------------------------------------------------------------------

def keep_compiler_caches(cache_dir):
    """Keep the compilers' kernel caches in the autoresearch cache folder, unless the user chose other places.
    Their defaults live in the temporary folder, which a reboot empties: on NVIDIA, MLX then spends ~3.5 minutes
    JIT-compiling its kernels again before the first step (10 s with its cache), and torch.compile loses inductor's
    cache of compiled graphs. Both read these variables when they first compile, after the trainer's imports."""
    mx = sys.modules.get("mlx.core")
    if mx is not None:  # MLX's own default keeps one folder per version
        os.environ.setdefault("MLX_PTX_CACHE_DIR", os.path.join(cache_dir, "compiled", f"mlx-{mx.__version__}-ptx"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "compiled", "torchinductor"))


MLX_GRAPH_MB = 100  # MLX_MAX_MB_PER_BUFFER off macOS (see below)


def bound_mlx_graph_memory():
    """MLX's CUDA build records kernels into CUDA graphs of up to 1000 MB of inputs (on an H100 or H200) and keeps
    every input of a graph alive until the GPU has run it, with up to 11 graphs queued ahead of the GPU
    (mlx/backend/cuda/device.cpp, eval.cpp, transforms.cpp): gigabytes held beyond what the step needs. Smaller
    graphs free them sooner, but more, smaller graphs mean more host work a step: 100 MB gave the fastest step
    measured, within 10% of the least memory (docs/measurements.md). MLX reads the variable once, at its first GPU
    operation: call this before it. Metal keeps its own small command buffers (40-50 MB), so macOS is left alone; a
    value the user set is kept."""
    if _platform() != "darwin":
        os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", str(MLX_GRAPH_MB))

# ---------------------------------------------------------------------------
# Device utilities
# ---------------------------------------------------------------------------

def sync_device(backend):
    """Wait for queued device work, so wall-clock timings measure it."""
    if backend in ("mps", "cuda"):
        import torch
        getattr(torch, backend).synchronize()
    elif backend == "mlx":
        import mlx.core as mx
        if hasattr(mx, "synchronize"):
            mx.synchronize()
        else:
            mx.eval(mx.array(0))  # older mlx: a stream executes in order, so this waits for the work queued before it


_mps_peak_bytes = 0  # running maximum kept by sample_memory


def sample_memory(backend):
    """Fold the current MPS footprint into a running peak. MPS reports only current usage, so the training loop must
    call this after each backward pass (one cheap driver query) for get_peak_memory_mb("mps") to be a true peak.
    driver_allocated_memory counts the allocator's cached blocks, which keep a step's high-water mark until
    torch.mps.empty_cache(). A no-op elsewhere: CUDA, MLX and the OS track their own peaks."""
    global _mps_peak_bytes
    if backend == "mps":
        import torch
        _mps_peak_bytes = max(_mps_peak_bytes, torch.mps.driver_allocated_memory())


def get_peak_memory_mb(backend):
    """Peak memory of this process on the device, in MiB (the original's peak_vram_mb)."""
    if backend == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    if backend == "mlx":
        import mlx.core as mx
        get_peak = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory  # mlx < 0.24 kept it in metal
        return get_peak() / 2**20
    if backend == "mps":
        sample_memory(backend)
        return _mps_peak_bytes / 2**20
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS: bytes on macOS, KiB on Linux
    return peak / 2**20 if _platform() == "darwin" else peak / 2**10

# ---------------------------------------------------------------------------
# Summary (python -m backends)
# ---------------------------------------------------------------------------

def print_hardware_summary(hw=None):
    """Print what was detected and the defaults that follow from it, one `key: value` per line."""
    hw = hw or get_hardware_info()
    config = suggest_hyperparameters(hw)
    estimate = estimate_memory_gb(config["depth"], config["device_batch_size"], backend=hw["backend"], hw=hw)
    budget = memory_budget_gb(hw)
    flops, source = peak_flops_and_source(hw)
    dash = lambda v: "-" if v is None else v
    print(f"backend:            {hw['backend']}")
    print(f"chip:               {hw['chip']}")
    print(f"generation:         {dash(hw['generation'])}")
    print(f"tier:               {hw['tier']}")
    print(f"gpu_cores:          {dash(hw['gpu_cores'])}")
    print(f"memory_gb:          {hw['memory_gb']:.1f}")
    print(f"depth:              {config['depth']}")
    print(f"device_batch_size:  {config['device_batch_size']}")
    print(f"total_batch_size:   {config['total_batch_size']}")
    print(f"memory_estimate_gb: {estimate:.1f} (budget {budget:.1f} = {memory_fraction(hw):.0%} of memory_gb)")
    print(f"peak_tflops_bf16:   {flops / 1e12:.1f} ({source})")
