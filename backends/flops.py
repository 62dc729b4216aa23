"""
Peak bf16 FLOPS of the machine's accelerator: the denominator of MFU, which is therefore an estimate. Datasheet
figures for NVIDIA cards, GPU core counts times a per-core figure for Apple chips, a rough per-core figure for CPUs.
"""

import os

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
