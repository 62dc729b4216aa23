"""
Peak memory of train_mlx.py's training step, measured against the memory model's estimate (backends/).
For each configuration (depth, device batch), the trainer's own GPT, optimizer and step functions, compiled as
the trainer compiles them, run two optimizer steps on random tokens; mx.get_peak_memory() after them is what
the summary's peak_vram_mb reports for the same step. Then --timed more steps give the step's speed (tok/s,
without accumulation: one device batch per optimizer step). MLX's default device is used (the GPU where there is
one).

Usage: python benchmarks/bench_mlx_memory.py [--timed N] [DEPTH:BATCH ...]   (default: the CPU tier, 2:1, N=0)
       e.g. python benchmarks/bench_mlx_memory.py --timed 5 8:16 8:32 8:64 4:32
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

import train_mlx  # noqa: E402
from backends.device import bound_mlx_graph_memory  # noqa: E402
from backends.memory import estimate_memory_gb  # noqa: E402
from prepare import MAX_SEQ_LEN, VOCAB_SIZE  # noqa: E402


def peak_mib_and_tok_per_s(depth, batch, timed):
    mx.random.seed(0)
    gpu = mx.default_device() == mx.gpu
    dtype = mx.bfloat16 if gpu and train_mlx.HW["generation"] != "M1" else mx.float32  # as the trainer chooses
    model = train_mlx.GPT(train_mlx.build_model_config(depth, VOCAB_SIZE))
    model.init_weights(dtype=dtype)
    optimizer = model.setup_optimizer()
    optimizer.init(model)
    state = [model.state, optimizer.state]
    loss_and_grad = nn.value_and_grad(model, lambda model, x, y: model(x, y))
    grad_step = mx.compile(lambda x, y: loss_and_grad(model, x, y), inputs=state, outputs=state)
    optimizer_step = mx.compile(lambda grads: optimizer.update(model, grads), inputs=state, outputs=state)
    x, y = (mx.random.randint(0, VOCAB_SIZE, (batch, MAX_SEQ_LEN)) for _ in range(2))
    mx.eval(model.parameters(), x, y)

    def step():
        loss, grads = grad_step(x, y)
        mx.eval(loss, grads)
        optimizer.set_schedule(1.0, 0.85, 0.2)
        optimizer_step(tree_map(lambda g: g / 2, grads))  # the trainer divides by its accumulation steps
        mx.eval(model.state, optimizer.state)

    mx.reset_peak_memory()
    for _ in range(2):
        step()
    peak = mx.get_peak_memory() / 2**20
    if not timed:
        return peak, None
    t0 = time.perf_counter()
    for _ in range(timed):
        step()
    return peak, timed * batch * MAX_SEQ_LEN / (time.perf_counter() - t0)


def depth_and_batch(text):
    try:
        depth, batch = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DEPTH:BATCH such as 8:16, got {text!r}") from None
    return depth, batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("configs", nargs="*", type=depth_and_batch, default=[(2, 1)], metavar="DEPTH:BATCH",
                        help="configurations to measure (default: the CPU tier, 2:1)")
    parser.add_argument("--timed", type=int, default=0, metavar="N", help="steps timed after the two measured")
    args = parser.parse_args()
    configs, timed = args.configs, args.timed
    bound_mlx_graph_memory()  # as the trainer's start does, before the first GPU operation
    print(f"MLX {mx.__version__} on {mx.default_device()} ({train_mlx.HW['chip']}), T={MAX_SEQ_LEN}, vocab {VOCAB_SIZE}"
          f", MLX_MAX_MB_PER_BUFFER={os.environ.get('MLX_MAX_MB_PER_BUFFER', 'unset')}")
    print(f"{'depth':>5s} {'batch':>5s} {'peak_mib':>10s} {'estimate_mib':>12s} {'estimate/peak':>13s} "
          f"{'tok/s':>9s} {'seconds':>7s}")
    for depth, batch in configs:
        t0 = time.time()
        peak, tok_per_s = peak_mib_and_tok_per_s(depth, batch, timed)
        estimate = estimate_memory_gb(depth, batch, train_mlx.ASPECT_RATIO, train_mlx.HEAD_DIM, backend="mlx",
                                      hw=train_mlx.HW) * 1024
        speed = f"{tok_per_s:9,.0f}" if tok_per_s else f"{'-':>9s}"
        print(f"{depth:5d} {batch:5d} {peak:10.1f} {estimate:12.1f} {estimate / peak:13.2f} {speed} "
              f"{time.time() - t0:7.1f}", flush=True)


if __name__ == "__main__":
    main()
