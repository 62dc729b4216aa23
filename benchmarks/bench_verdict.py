"""
What analysis.py's verdict rule costs and what it buys, by simulation: run-to-run noise is normal with standard
deviation SIGMA (val_bpb), the baseline is run 3 times (program.md's setup), and each idea shifts the mean val_bpb
by a true gain. For each true gain it prints how often the idea is kept and how many runs it takes on average,
once with sigma estimated from the baseline's 3 runs only (early in a night) and once from 20 groups of repeats
(later in a night, when every rerun has added to the estimate). The rule's decide() and noise() are called as they
are, so the figures follow the code.

Usage: uv run benchmarks/bench_verdict.py [TRIALS]
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import analysis  # noqa: E402

SIGMA = 0.01   # about what program.md reports for two MLX runs of the same code on a Mac
GAINS = (-0.01, 0.0, 0.005, 0.01, 0.02, 0.03)  # true gains, in val_bpb (positive: the idea helps)


def trial(rng, gain, extra_groups):
    """One idea against a 3-run baseline: (verdict, runs of the idea it took)."""
    baseline = [rng.gauss(0, SIGMA) for _ in range(analysis.BASELINE_RUNS)]
    others = [[rng.gauss(0, SIGMA) for _ in range(2)] for _ in range(extra_groups)]  # earlier reruns of other code
    idea = []
    while True:
        idea.append(rng.gauss(-gain, SIGMA))
        word, _, _ = analysis.decide(idea, baseline, analysis.noise([baseline, idea, *others]))
        if word != "rerun":
            return word, len(idea)


def main():
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    rng = random.Random(0)
    print(f"noise sigma {SIGMA}, baseline {analysis.BASELINE_RUNS} runs, at most {analysis.MAX_RUNS} runs an idea, "
          f"{trials} trials each")
    print(f"{'true gain':>9} | {'kept (sigma from baseline)':>26} {'runs':>5} | {'kept (sigma from 20 groups)':>27} {'runs':>5}")
    for gain in GAINS:
        cells = []
        for extra_groups in (0, 20):
            outcomes = [trial(rng, gain, extra_groups) for _ in range(trials)]
            kept = sum(word == "keep" for word, _ in outcomes) / trials
            runs = sum(n for _, n in outcomes) / trials
            cells.append((kept, runs))
        (k0, r0), (k1, r1) = cells
        print(f"{gain:>9.3f} | {100 * k0:>25.1f}% {r0:>5.2f} | {100 * k1:>26.1f}% {r1:>5.2f}")


if __name__ == "__main__":
    main()
