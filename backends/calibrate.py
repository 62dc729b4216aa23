"""
How fast the machine is right now, apart from the code under test: a fixed matrix multiplication through the run's
own backend, timed. record.py reads it as the timed training begins and as it ends; analysis.py compares only runs
whose machine speeds agree, so another program, heat or a power mode that slows the machine (or stops slowing it)
cannot pass for an idea that helps. The trainers' code does not run here, so a change that makes training faster
still shows as a gain.
"""

import time

from backends.device import sync_device

READ_SECONDS = 0.4  # one reading; a run takes two (before and after training), under a second in all
# A square matmul in the dtype the backend trains in, large enough to keep its compute units busy
SIZE = {"cpu": 384, "mps": 2048, "cuda": 4096, "mlx_cpu": 384, "mlx_gpu": 4096}
MLX_PRODUCTS = 4  # products per mx.eval on a GPU: one at a time, the wait after each is a tenth of the reading


def _torch_matmul(backend):
    import torch
    dtype = torch.float32 if backend == "cpu" else torch.bfloat16
    n = SIZE[backend]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(backend, dtype) for _ in range(2))
    return n, 1, lambda: torch.mm(a, b)


def _mlx_matmul():
    import mlx.core as mx
    on_gpu = mx.default_device() == mx.gpu
    n = SIZE["mlx_gpu" if on_gpu else "mlx_cpu"]
    a, b = (mx.random.normal((n, n), key=mx.random.key(i)).astype(mx.bfloat16 if on_gpu else mx.float32)
            for i in range(2))
    mx.eval(a, b)
    if not on_gpu:
        return n, 1, lambda: mx.eval(a @ b)
    return n, MLX_PRODUCTS, lambda: mx.eval(*[a @ b for _ in range(MLX_PRODUCTS)])


def machine_speed(backend, seconds=READ_SECONDS):
    """The throughput, in GFLOP/s, of identical matmuls run back to back for `seconds`: all the work over all the
    time, so that a machine shared with other programs reads as its average share, not as its best moments."""
    n, products, matmul = _mlx_matmul() if backend == "mlx" else _torch_matmul(backend)
    if backend == "cpu":
        # One thread: several threads that meet at a barrier stall whenever another program preempts one of them,
        # and a loaded machine then reads anywhere from 3% to 100% of its speed (2 cores, 4 busy processes).
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        matmul()  # the first call loads kernels and libraries
        sync_device(backend)
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds:
            matmul()
            count += 1
            if count % 8 == 0:
                sync_device(backend)  # a GPU queue stays short: the clock must not run ahead of the work
        sync_device(backend)
        return 2 * n ** 3 * products * count / (time.perf_counter() - start) / 1e9
    finally:
        if backend == "cpu":
            torch.set_num_threads(threads)
