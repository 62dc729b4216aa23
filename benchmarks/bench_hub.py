"""
hub.py at the scale of a big fleet, on local bare repositories (file://, so no network time): AGENTS agents, each
with its own clone, publish their runs until the hub's results branch holds AGENTS x RUNS files (100 x 100 = 10,000
by default). At 1%, 10% and all of that it prints:
    board       `hub.py board` in a clone that fetched the hub before (what an agent does before each idea), and
                the first board of a fresh clone, which fetches every file
    publish     one agent publishing one new run, alone
    concurrent  CONCURRENT agents publishing one new run each, all started at once: each one's wall time (median,
                max), the CPU time one publish costs (its git processes included: the work on one core), and how
                many pushes the hub rejected because another agent landed first (each then fetched, rebuilt and retried)
Each figure is the command as an agent runs it, a Python process included: its wall-clock time, and its CPU time
(with its git processes: the work it costs one core, whatever else the machine runs). Run it on one core to compare
with the targets (board <= 2 s, publish <= 1 s at 10,000 files): `taskset -c 1 uv run benchmarks/bench_hub.py`.

The runs are copies of one record written by the real record code (backends/record.py) with their own id, commit,
val_bpb, chip (10 chips: 10 setups) and results.tsv row and verdict; each publish also moves the agent's branch
agents/<agent>/night to a new kept commit, as in a night.

Usage: uv run benchmarks/bench_hub.py [--agents N] [--runs N] [--concurrent N]
"""

import argparse
import contextlib
import datetime
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare  # noqa: E402
from backends import device, record  # noqa: E402

HUB_PY = os.path.join(ROOT, "hub.py")
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@example.com", "GIT_CONFIG_NOSYSTEM": "1"}


def template_record(folder):
    """One record as a CPU run's trainer writes it, made by the record code in a scratch folder."""
    prepare.data_fingerprint = lambda: "da7a0001"
    prepare.last_evaluation = {"rows": 2560, "distinct_rows": 2560}
    record.machine_speed = lambda backend: 95.0
    device.swap_used_mb = lambda: None
    here = os.getcwd()
    os.chdir(folder)
    with contextlib.redirect_stdout(io.StringIO()):
        run = record.Run(os.path.join(ROOT, "train.py"), "cpu", {"chip": "x"})
        run.mark_training_start()
        run.summary(val_bpb=1.6, training_seconds=300.0, total_seconds=420.0, peak_vram_mb=1400.0, mfu_percent=1.2,
                    total_tokens_M=0.2, num_steps=80, num_params_M=3.5, depth=2, eval_seconds=60.0)
    os.chdir(here)
    with open(os.path.join(folder, record.RUNS_FILE)) as f:
        return json.loads(f.readline())


class Agent:
    """A clone of the hub with a night's files, growing by fake runs that follow the verdict's pattern."""

    def __init__(self, base, name, hub_url, chip, template, rng):
        self.name, self.chip, self.template, self.rng = name, chip, template, rng
        self.dir = os.path.join(base, name)
        self.env = {**os.environ, **GIT_ENV, "HOME": base, "AUTORESEARCH_AGENT": name}
        os.makedirs(self.dir)
        self.git("init", "-q", "-b", "autoresearch/night")
        self.git("commit", "-q", "--allow-empty", "-m", "baseline")
        self.git("remote", "add", "hub", hub_url)
        with open(os.path.join(self.dir, "results.tsv"), "w") as f:
            f.write("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
        self.runs = 0

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.dir, env=self.env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def add_runs(self, n):
        """n more runs: ideas discarded or rerun under made-up commits, the last one kept on a real new commit."""
        self.git("commit", "-q", "--allow-empty", "-m", f"idea {self.runs + n}")
        head = self.git("rev-parse", "--short=7", "HEAD")
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        records, rows, verdicts = [], [], []
        for i in range(n):
            self.runs += 1
            kept = i == n - 1
            commit = head if kept else uuid.uuid4().hex[:7]
            word = "keep" if kept else self.rng.choice(("discard", "discard", "rerun"))
            value = round(1.6 - 0.0005 * self.runs + self.rng.gauss(0, 0.005), 6)
            run_id = uuid.uuid4().hex[:12]
            records.append({**self.template, "id": run_id, "time": now, "commit": commit, "chip": self.chip,
                            "branch": "autoresearch/night", "val_bpb": value, "trainer_sha": uuid.uuid4().hex[:8]})
            rows.append(f"{commit}\t{value:.6f}\t1.4\t{word}\tidea {self.runs} of {self.name}\n")
            verdicts.append({"time": now, "commit": commit, "run": run_id, "kept": head, "word": word,
                             "gain": 0.001, "bar": 0.002, "sigma": 0.005, "dof": 10, "branch": "autoresearch/night"})
        for name, lines in (("runs.jsonl", [json.dumps(r) + "\n" for r in records]), ("results.tsv", rows),
                            ("verdicts.jsonl", [json.dumps(v) + "\n" for v in verdicts])):
            with open(os.path.join(self.dir, name), "a") as f:
                f.writelines(lines)

    def start(self, *args):
        return subprocess.Popen([sys.executable, HUB_PY, *args], cwd=self.dir, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc):
    """(wall-clock end, CPU seconds of the process and the git processes it waited for, stdout) of a started one."""
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.perf_counter()
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or err:
        sys.exit(f"error: {' '.join(proc.args[2:])} in {proc.args}: {proc.returncode}\n{out}{err}")
    return end, usage.ru_utime + usage.ru_stime, out


def timed(agent, *args):
    started = time.perf_counter()
    end, cpu, out = finish(agent.start(*args))
    return end - started, cpu, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--runs", type=int, default=100, help="runs per agent at the end")
    parser.add_argument("--concurrent", type=int, default=20, help="agents publishing at once")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as base:
        hub_dir = os.path.join(base, "hub.git")
        subprocess.run(["git", "init", "-q", "--bare", hub_dir], check=True)
        os.makedirs(os.path.join(base, "scratch"))
        template = template_record(os.path.join(base, "scratch"))
        url = f"file://{hub_dir}"
        agents = [Agent(base, f"agent-{i:03d}", url, f"Test CPU {i % 10}", template, rng) for i in range(args.agents)]
        reader = Agent(base, "reader", url, "Test CPU 0", template, rng)
        steps = sorted({max(1, args.runs // 100), max(1, args.runs // 10), args.runs})
        print(f"hub.py on local bare repositories: {args.agents} agents, {args.concurrent} publishing at once; "
              f"seconds, wall clock / CPU, Python start included")
        print(f"{'files':>7} {'board':>11} {'fresh board':>12} {'publish':>11} {'concurrent: median':>19} "
              f"{'max':>6} {'CPU each':>9} {'rejected':>9}", flush=True)
        for runs in steps:
            for agent in agents:  # the fleet so far, one publish per agent (not timed)
                agent.add_runs(runs - agent.runs)
                timed(agent, "publish")
            timed(reader, "board")  # the reader has fetched the hub before
            for agent in agents[:1 + args.concurrent]:  # the next run of each, not yet published
                agent.add_runs(1)
            board, board_cpu, _ = timed(reader, "board")
            fresh = Agent(base, f"fresh-{runs}", url, "Test CPU 0", template, rng)
            fresh_board, _, out = timed(fresh, "board")
            files = int(out.split(" runs of ")[0].rsplit(" ", 1)[1])
            alone, alone_cpu, _ = timed(agents[0], "publish")
            started = time.perf_counter()
            procs = [agent.start("publish") for agent in agents[1:1 + args.concurrent]]
            ends = [finish(proc) for proc in procs]
            walls = [end - started for end, _, _ in ends]
            retried = sum(int(re.search(r"(\d+) push\(es\) rejected", out).group(1)) for _, _, out in ends
                          if "rejected" in out)
            print(f"{files:>7} {board:>5.2f} / {board_cpu:.2f} {fresh_board:>12.2f} {alone:>5.2f} / {alone_cpu:.2f} "
                  f"{statistics.median(walls):>19.2f} "
                  f"{max(walls):>6.2f} {statistics.mean(c for _, c, _ in ends):>9.2f} {retried:>9}", flush=True)


if __name__ == "__main__":
    main()
