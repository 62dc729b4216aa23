"""
Which backend runs, on what machine: the backend's detection (AUTORESEARCH_BACKEND), the chip and its memory, swap,
the compilers' environment, and the device utilities the trainers time and measure with (sync, peak memory).
Nothing here imports torch or mlx at module level: a Mac may have only one of them installed.
"""

import atexit
import gc
import importlib
import os
import re
import subprocess
import sys

BACKENDS = ("auto", "mlx", "mps", "cuda", "cpu")
# The torch extra is plain PyTorch (the CUDA build on Linux): it installs what mps, cuda and cpu need
INSTALL = {"mlx": "uv sync --extra mlx", "torch": "uv sync --extra torch"}
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


def set_compiler_environment(cache_dir):
    """The environment variables the compilers and MLX read once, when they first run: the trainer calls this before
    its first compilation and MLX's first GPU operation (keep_compiler_caches, bound_mlx_graph_memory)."""
    keep_compiler_caches(cache_dir)
    bound_mlx_graph_memory()

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

