"""
Shared infrastructure for both trainers; the agent does not edit it. One module per concern:
    device.py         which backend runs, the chip and its memory, swap, the compilers' environment, sync, peak memory
    flops.py          peak bf16 FLOPS of the accelerator: the denominator of MFU
    memory.py         the memory model and the defaults per chip tier (suggest_hyperparameters)
    muon_torch.py     the Muon + AdamW optimizer for PyTorch (MPS, CUDA, CPU)
    muon_mlx.py       the same optimizer for MLX
    polar_express.py  the Newton-Schulz coefficients both optimizers share
    gradcheck.py      train_mlx.py's hand-written gradients, checked against autodiff as a run starts
    record.py         the summary every run prints and its record in runs.jsonl
    calibrate.py      how fast the machine is right now (a fixed matmul), read around training
    jsonl.py          appending to runs.jsonl and asking git, for record.py and analysis.py
Nothing here imports torch or mlx as the package loads: a Mac may have only one of them installed.
Usage: python -m backends   (prints what was detected and the defaults that follow)
"""
