"""
Per-experiment overhead of a trainer on this machine: what a run costs beyond its timed training,
total_seconds - training_seconds (startup, compilation, the 11 untimed steps and the evaluation).
Three runs, as the agent's loop meets them:
  first   the trainer as it is, with empty compiler caches (inductor's, MLX's PTX cache)
  again   the same code once more: the caches are warm
  edited  an agent-style edit (DEPTH = 10): the model changes, the caches are warm
Each run uses the prepared data in the usual cache (AUTORESEARCH_CACHE_DIR) and a short training budget, and imports
prepare.py and backends/ from the trainer's own folder (so an older checkout can be measured too).

Usage: python benchmarks/bench_overhead.py [TRAINER] [--budget SECONDS]   (TRAINER defaults to train.py)
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("training_seconds", "total_seconds", "startup_seconds", "eval_seconds", "mfu_percent", "peak_vram_mb",
        "num_steps", "val_bpb")


def torch_bytecode_cached():
    """Whether Python finds a .pyc for torch's compiler (without importing torch: the trainers run in subprocesses)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torch here: nothing to compile
    source = os.path.join(spec.submodule_search_locations[0], "_inductor", "compile_fx.py")
    return os.path.exists(importlib.util.cache_from_source(source))


def run(trainer, repo, budget, caches, log_path):
    """Run the trainer (importing prepare and backends from repo) to the end; returns its summary as key -> float."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
           "AUTORESEARCH_TIME_BUDGET": str(budget),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor"),
           "MLX_PTX_CACHE_DIR": os.path.join(caches, "mlx-ptx"), "TRITON_CACHE_DIR": os.path.join(caches, "triton")}
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, trainer], cwd=os.path.dirname(log_path), env=env,
                              stdout=log, stderr=subprocess.STDOUT).returncode
    text = open(log_path).read()
    if code != 0:
        sys.exit(f"error: {trainer} exited with {code}; the end of {log_path}:\n{text[-2000:]}")
    summary = text.split("\n---\n")[-1]
    return {k: float(m.group(1)) for k in KEYS if (m := re.search(rf"^{k}:\s+(\S+)", summary, re.MULTILINE))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trainer", nargs="?", default=os.path.join(ROOT, "train.py"))
    parser.add_argument("--budget", type=int, default=20, help="AUTORESEARCH_TIME_BUDGET of each run (default 20)")
    args = parser.parse_args()
    trainer = os.path.abspath(args.trainer)
    work = tempfile.mkdtemp(prefix="bench-overhead-")
    edited = os.path.join(work, "edited", os.path.basename(trainer))
    os.makedirs(os.path.dirname(edited))
    text = open(trainer).read()
    depth_line = re.search(r"^DEPTH = .*$", text, re.MULTILINE)
    assert depth_line, f"no `DEPTH = ...` line in {trainer}"
    with open(edited, "w") as f:
        f.write(text.replace(depth_line.group(0), "DEPTH = 10", 1))

    caches = os.path.join(work, "caches")
    print(f"{os.path.basename(trainer)}, budget {args.budget} s, caches in {caches}")
    if sys.flags.dont_write_bytecode and not torch_bytecode_cached():  # the trainers inherit the variable
        print("note: PYTHONDONTWRITEBYTECODE is set and torch has no .pyc files, so every run compiles torch's "
              "compiler modules from source (H200: importing torch._dynamo and torch._inductor took 9.7 s, 2.0 s "
              "with .pyc files). A user's venv writes them once; `uv sync --extra torch --compile-bytecode`, with the "
              "extras you installed (a sync without them removes them), writes them here")
    print(f"{'run':8s} {'overhead':>8s} {'startup':>8s} {'eval':>6s} {'training':>8s} {'total':>7s} {'mfu%':>6s} "
          f"{'steps':>5s} {'peak_vram_mb':>12s}")
    for name, path in (("first", trainer), ("again", trainer), ("edited", edited)):
        s = run(path, os.path.dirname(trainer), args.budget, caches, os.path.join(work, f"{name}.log"))
        print(f"{name:8s} {s['total_seconds'] - s['training_seconds']:8.1f} {s['startup_seconds']:8.1f} "
              f"{s['eval_seconds']:6.1f} {s['training_seconds']:8.1f} {s['total_seconds']:7.1f} {s['mfu_percent']:6.2f} "
              f"{s['num_steps']:5.0f} {s['peak_vram_mb']:12.1f}", flush=True)
    print(f"logs in {work}")


if __name__ == "__main__":
    main()
