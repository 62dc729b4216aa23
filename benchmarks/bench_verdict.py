"""
What analysis.py's verdict rule costs and what it buys, by simulation: run-to-run noise is normal with standard
deviation SIGMA (val_bpb), the baseline is run 3 times (program.md's setup), and each idea shifts the mean val_bpb
by a true gain. For each true gain it prints how often the idea is kept and how many runs it takes on average,
once with sigma estimated from the baseline's 3 runs only (early in a night) and once from 20 groups of repeats
(later in a night, when every rerun has added to the estimate). The rule's decide() and noise() are called as they
are, so the figures follow the code.

Machine drift: the machine's speed changes between runs (another program comes and goes, heat, a power mode), and
a time-budgeted run on a faster machine makes more steps: val_bpb falls by SENSITIVITY per unit of log speed. Each
run records the speed that backends/calibrate.py reads, with its own scatter. The drift table runs the whole
verdict (analysis.verdict on records and rows, as --verdict does), once with the speeds recorded and once without
them (the rule before machine speeds were recorded), and follows its `next:` advice: rerun HEAD, or measure the
last kept commit again when the machine changed.

Usage: uv run benchmarks/bench_verdict.py [TRIALS]
"""

import math
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import analysis  # noqa: E402

SIGMA = 0.01   # about what program.md reports for two MLX runs of the same code on a Mac
GAINS = (-0.01, 0.0, 0.005, 0.01, 0.02, 0.03)  # true gains, in val_bpb (positive: the idea helps)
# Drift, per machine: (name, sigma, val_bpb change per unit of log machine speed, relative scatter of one speed
# reading). An H200's 30-s runs made 100 steps instead of 56 while another program shared the GPU: 0.145 lower,
# 0.25 per unit, at sigma 0.0006 (docs/measurements.md, "Machine drift"); its readings scatter 1.2%. The Mac's 0.1 is an
# assumption for 5-minute runs (longer runs are less steep), with the 2% scatter of a quiet 2-core CPU.
DRIFT_MACHINES = (("a Mac, 5-min runs", SIGMA, 0.1, 0.02), ("an H200, 30-s runs", 0.0006, 0.25, 0.012))
SLOWDOWN = (0.5, 0.9)  # busy: uniform in this range. Slower by less than the tolerance is beyond what the readings tell
SWITCH = 0.3                # chance that the machine changes between quiet and busy before a run
MAX_RUNS = 12               # a trial gives up here (counted as not kept)


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


class Machine:
    """A machine that is quiet (speed 1) or busy (slower). PATTERNS: "switching", before any run it may change
    between the two; "quiet after the baseline", the issue's night: busy for the whole baseline, quiet from then on."""

    def __init__(self, rng, scatter, pattern):
        self.rng, self.scatter, self.pattern = rng, scatter, pattern
        self.speed = 1.0 if pattern == "switching" else rng.uniform(*SLOWDOWN)

    def baseline_done(self):
        if self.pattern != "switching":
            self.speed = 1.0

    def run(self):
        if self.pattern == "switching" and self.rng.random() < SWITCH:
            self.speed = 1.0 if self.speed < 1.0 else self.rng.uniform(*SLOWDOWN)
        read = lambda: round(self.speed * 100 * (1 + self.rng.gauss(0, self.scatter)), 2)
        return self.speed, [read(), read()]


PATTERNS = ("switching", "quiet after the baseline")


def drift_trial(rng, gain, recorded, sigma, sensitivity, scatter, pattern):
    """A baseline, then one idea, on a drifting machine, following the verdict's advice: (kept, runs it took)."""
    machine, rows, records = Machine(rng, scatter, pattern), [], []

    def run(commit, true_mean, status=None):
        speed, readings = machine.run()
        value = true_mean - sensitivity * math.log(speed) + rng.gauss(0, sigma)
        record = {"time": "", "commit": commit, "dirty": False, "trainer": "train.py", "trainer_sha": commit,
                  "harness": "h", "backend": "mps", "chip": "c", "smoke": [], "status": "ok", "val_bpb": value,
                  "line": len(records) + 1}
        if recorded:
            record.update(machine_speed=sum(readings) / 2, machine_speeds=readings)
        records.append(record)
        return value

    def ask(head):
        word, lines, _ = analysis.verdict(rows, records, head)
        return word, lines[-1]

    base_runs = 0
    while True:  # the baseline, until the verdict keeps it
        value = run("base", 1.0)
        base_runs += 1
        word, _ = ask("base")
        rows.append({"commit": "base", "val_bpb": value, "status": word, "line": len(rows) + 2})
        if word == "keep" or base_runs >= MAX_RUNS:
            break
    machine.baseline_done()
    runs = 0
    while runs < MAX_RUNS:
        value = run("idea", 1.0 - gain * sigma / SIGMA)  # the gains in units of the machine's noise
        runs += 1
        word, advice = ask("idea")
        rows.append({"commit": "idea", "val_bpb": value, "status": word, "line": len(rows) + 2})
        if word != "rerun":
            return word == "keep", runs
        if "measure base again" in advice:
            value = run("base", 1.0)
            rows.append({"commit": "base", "val_bpb": value, "status": "keep", "line": len(rows) + 2})
            runs += 1
    return False, runs


def main():
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    os.chdir(tempfile.mkdtemp())  # the verdict reads run.log in the working folder: none here
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

    drift_trials = max(1, trials // 10)  # each runs the whole verdict: slower
    print()
    print(f"machine drift: busy means {SLOWDOWN[0]:.2f}-{SLOWDOWN[1]:.2f} of the quiet speed; 'switching': "
          f"{100 * SWITCH:.0f}% chance before each run that the machine changed between quiet and busy; 'quiet after "
          f"the baseline': the issue's night; speed tolerance {100 * analysis.SPEED_TOLERANCE:.0f}%; {drift_trials} "
          f"trials each; gains scaled to each machine's sigma (the same gain/sigma as above); runs: the idea's and "
          f"the kept commit's measured again")
    for name, sigma, sensitivity, scatter in DRIFT_MACHINES:
        for pattern in PATTERNS:
            print()
            print(f"{name}, {pattern}: sigma {sigma}, val_bpb {sensitivity} lower per unit of log speed, speed "
                  f"readings scatter {100 * scatter:.1f}%")
            print(f"{'true gain':>9} | {'kept (speeds not recorded)':>26} {'runs':>5} | {'kept (speeds recorded)':>27} "
                  f"{'runs':>5}")
            for gain in GAINS:
                cells = []
                for recorded in (False, True):
                    outcomes = [drift_trial(rng, gain, recorded, sigma, sensitivity, scatter, pattern)
                                for _ in range(drift_trials)]
                    cells.append((sum(k for k, _ in outcomes) / drift_trials,
                                  sum(n for _, n in outcomes) / drift_trials))
                (k0, r0), (k1, r1) = cells
                print(f"{gain:>9.3f} | {100 * k0:>25.1f}% {r0:>5.2f} | {100 * k1:>26.1f}% {r1:>5.2f}")

if __name__ == "__main__":
    main()
