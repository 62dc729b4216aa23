"""
Training data loader throughput on one core: tokens/second for B=16, T=2048 on real English text
(../shared/data/corpus-openprose, or the folder given as the first argument), comparing
  (a) a straightforward port of the original loop (tokenize on the fly, O(buffer) scan per pick), and
  (b) prepare.make_dataloader (token ids stored once by prepare, length-sorted buffer).
It prepares its own temporary cache from the corpus with `prepare.py --source`, so no real cache is touched.

Usage: uv run benchmarks/bench_loader.py [CORPUS_DIR]
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "..", "shared", "data", "corpus-openprose")
B, T = 16, 2048
MIN_SECONDS = 10.0  # time each loader for at least this long, after two warm-up batches

if not os.path.isdir(CORPUS):
    print(f"skipped: no corpus at {os.path.abspath(CORPUS)}")
    sys.exit(0)
cache = tempfile.mkdtemp(prefix="bench-loader-cache-")
os.environ["AUTORESEARCH_CACHE_DIR"] = cache  # before prepare is imported: it reads the cache folder once
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402
import prepare  # noqa: E402
from corpus import reference_dataloader  # noqa: E402  (the original loop, kept in the tests)

# ---------------------------------------------------------------------------
# Setup: a private cache built from the corpus (also tokenizes every shard once)
# ---------------------------------------------------------------------------

t0 = time.time()
result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--source", CORPUS],
                        capture_output=True, text=True)
if result.returncode != 0:
    sys.exit(f"prepare.py --source failed:\n{result.stdout}\n{result.stderr}")
print(f"prepare.py --source {os.path.abspath(CORPUS)}: {time.time() - t0:.1f}s (one-off: tokenizer + token ids) into {cache}")
tokenizer = prepare.Tokenizer.from_directory()

# ---------------------------------------------------------------------------
# Measure, on one core
# ---------------------------------------------------------------------------

if hasattr(os, "sched_setaffinity"):  # Linux; threads started from now on (the tokenizer's) share that core
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    core = "pinned to one core"
else:
    core = "not pinned (no sched_setaffinity on this OS)"


def throughput(loader):
    """(tokens/second, the batches seen) over at least MIN_SECONDS after two warm-up batches."""
    batches = [next(loader)[0] for _ in range(2)]  # warm-up: the first fills the 1000-document buffer
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < MIN_SECONDS:
        batches.append(next(loader)[0])
        steps += 1
    return steps * B * T / (time.perf_counter() - t0), batches


print(f"train loader, B={B}, T={T}, {core}")
baseline, baseline_batches = throughput(reference_dataloader(tokenizer, B, T, "train"))
print(f"  (a) original loop (tokenize on the fly, O(buffer) scan): {baseline / 1e6:7.2f} M tokens/s")
fast, fast_batches = throughput(prepare.make_dataloader(tokenizer, B, T, "train"))
print(f"  (b) prepare.make_dataloader:                             {fast / 1e6:7.2f} M tokens/s")
same = all(np.array_equal(a, b) for a, b in zip(baseline_batches, fast_batches))
print(f"  speedup {fast / baseline:.1f}x; first {len(baseline_batches)} batches identical: {same}")
shutil.rmtree(cache)
