"""
The end of every run, written once for both trainers: the summary block it prints and the record it appends to
runs.jsonl. Shared infrastructure: the agent does not edit this (the harness fingerprint covers it).

A trainer calls start_run() as its main part begins. From then on every end that Python can see leaves one JSON
object, on one line, in runs.jsonl in the working directory:
    ok     the summary was printed (Run.summary)
    fail   the loss blew up (Run.fail prints `FAIL: loss nan at step 37` and exits 1)
    crash  an uncaught exception, SIGTERM (what `timeout` sends), or an exit without a summary
A SIGKILL or a crash inside native code ends the process before Python can write anything: results.tsv, the
agent's own log, still has its row. analysis.py reads both files.
"""

import atexit
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import backends
import prepare

RUNS_FILE = "runs.jsonl"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_FILES = ("prepare.py", "backends", "pyproject.toml", "uv.lock")  # what the agent may not edit
# A run that outgrows memory pushes hundreds of MB to GBs into swap; the OS moves a few MB of idle programs
# out now and then, and that does not slow training down.
SWAP_WARN_MB = 64
# The summary block: key and format, the original's ten lines first and in its order. Values start at column 18.
SUMMARY = (
    ("val_bpb", ".6f"),
    ("training_seconds", ".1f"),
    ("total_seconds", ".1f"),
    ("peak_vram_mb", ".1f"),
    ("mfu_percent", ".2f"),
    ("total_tokens_M", ".3f"),  # the original's .1f prints 0.0 for a short run's 40,960 tokens
    ("num_steps", "d"),
    ("num_params_M", ".1f"),
    ("depth", "d"),
    ("backend", "s"),
    ("chip", "s"),
    ("startup_seconds", ".1f"),
    ("eval_seconds", ".1f"),
    ("harness", "s"),
)


def fingerprint(paths, root=ROOT):
    """8 hex digits of SHA-256 over the named files and folders below root (contents and paths, not mtimes)."""
    h = hashlib.sha256()
    for name in paths:
        path = os.path.join(root, name)
        files = [path]
        if os.path.isdir(path):
            files = sorted(os.path.join(folder, f) for folder, dirs, names in os.walk(path) for f in names
                           if "__pycache__" not in folder.split(os.sep))
        for f in files:
            h.update(os.path.relpath(f, root).encode() + b"\0")
            try:
                with open(f, "rb") as fh:
                    h.update(hashlib.sha256(fh.read()).digest())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()[:8]


def harness_fingerprint(root=ROOT):
    """The fixed files' fingerprint: runs are comparable only while it stays the same."""
    return fingerprint(FIXED_FILES, root)


def _git(folder, *args):
    try:
        result = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def git_state(folder):
    """(short commit, uncommitted changes as `git status --short` lines) of the repository holding folder;
    (None, []) outside git. Untracked files count: a new file the trainer imports must be committed too."""
    head = _git(folder, "rev-parse", "--short=7", "HEAD")
    if head is None:
        return None, []
    return head.strip(), (_git(folder, "status", "--porcelain") or "").splitlines()


def format_line(key, value):
    return f"{key + ':':<18}{value}"


class Run:
    """One training run: what it is (commit, files, machine) from the start, how it ended at the end."""

    def __init__(self, trainer, backend, hw):
        self.pid = os.getpid()  # a forked child (a compile worker) inherits the hooks; only this process records
        self.t_start = time.time()
        self.path = os.path.abspath(RUNS_FILE)  # the working directory now, whatever the trainer does later
        trainer = os.path.abspath(trainer)
        commit, changes = git_state(os.path.dirname(trainer))
        self.record = {
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit,
            "dirty": bool(changes),
            "trainer": os.path.basename(trainer),
            "trainer_sha": fingerprint([os.path.basename(trainer)], os.path.dirname(trainer)),
            "harness": harness_fingerprint(),
            "backend": backend,
            "chip": hw["chip"],
            "smoke": prepare.SMOKE_KNOBS,
        }
        if changes:
            self.record["uncommitted"] = changes[:20]
        self.swap_start_mb = None
        self.swap_mb = None
        self.finished = False

    # -- the trainer's hooks, in the order it calls them --

    def mark_training_start(self):
        """Read swap use as the timed training begins."""
        self.swap_start_mb = backends.swap_used_mb()

    def mark_training_end(self):
        """Read swap use as it ends: growth means the run swapped, and its step times mean nothing."""
        self.swap_mb = self._swap_growth_mb()

    def fail(self, step, loss):
        """The loss blew up: print the FAIL line (no summary follows), record it, exit with status 1."""
        reason = f"loss {loss:.6f} at step {step}"
        print()
        print(f"FAIL: {reason}", flush=True)
        self._write("fail", error=reason, step=step, swap_mb=self._swap_growth_mb())
        sys.exit(1)

    def summary(self, *, val_bpb, training_seconds, total_seconds, peak_vram_mb, mfu_percent, total_tokens_M,
                num_steps, num_params_M, depth, eval_seconds):
        """Print the summary block and append the record of this run to runs.jsonl."""
        values = dict(val_bpb=val_bpb, training_seconds=training_seconds, total_seconds=total_seconds,
                      peak_vram_mb=peak_vram_mb, mfu_percent=mfu_percent, total_tokens_M=total_tokens_M,
                      num_steps=num_steps, num_params_M=num_params_M, depth=depth, backend=self.record["backend"],
                      chip=self.record["chip"], startup_seconds=total_seconds - training_seconds - eval_seconds,
                      eval_seconds=eval_seconds, harness=self.record["harness"])
        # what the summary prints is what the record holds: each value rounded as printed
        printed = {key: format(values[key], fmt) for key, fmt in SUMMARY}
        values = {key: printed[key] if fmt == "s" else (int if fmt == "d" else float)(printed[key])
                  for key, fmt in SUMMARY}
        if self.swap_mb is None:
            self.mark_training_end()
        timed_steps = num_steps - 11  # steps 0-10 are not timed (the training loop's rule)
        tokens_per_sec = total_tokens_M * 1e6 / num_steps * timed_steps / training_seconds if training_seconds else 0
        evaluation = prepare.last_evaluation
        warnings = [w for w in (
            prepare.SMOKE_TEST_WARNING,
            (f"swapped {self.swap_mb:.0f} MB during training: val_bpb is not comparable"
             if self.swap_mb is not None and self.swap_mb >= SWAP_WARN_MB else None),
            (f"the evaluation repeated validation text: {evaluation['rows']} rows read, only "
             f"{evaluation['distinct_rows']} before the validation shard ran out (prepare more validation data)"
             if evaluation and evaluation["distinct_rows"] < evaluation["rows"] else None),
        ) if w]
        print("---")
        for key, _ in SUMMARY:
            print(format_line(key, printed[key]))
        for warning in warnings:
            print(format_line("warning", warning))
        sys.stdout.flush()
        self._write("ok", **{k: v for k, v in values.items() if k not in self.record},
                    tokens_per_sec=round(tokens_per_sec), swap_mb=self.swap_mb,
                    eval_rows=evaluation.get("rows"), eval_distinct_rows=evaluation.get("distinct_rows"),
                    warnings=warnings)

    # -- the end of a run that printed no summary --

    def _swap_growth_mb(self):
        if self.swap_start_mb is None:
            return None
        now = backends.swap_used_mb()
        return None if now is None else round(max(0.0, now - self.swap_start_mb), 1)

    def _write(self, status, **fields):
        if self.finished or os.getpid() != self.pid:
            return
        self.finished = True
        record = {**self.record, "status": status, **fields}
        record["swapped"] = record.get("swap_mb") is not None and record["swap_mb"] >= SWAP_WARN_MB
        record.setdefault("total_seconds", round(time.time() - self.t_start, 1))
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # never hide the run's own outcome behind a failure to record it
            print(f"warning: could not append to {self.path}: {e}", file=sys.stderr)

    def _crash(self, error):
        self._write("crash", error=error, swap_mb=self._swap_growth_mb())


def start_run(trainer, backend, hw):
    """Begin the record of a run of `trainer` (the script's __file__) and make sure it is written however the run
    ends: an uncaught exception, SIGTERM and an exit without a summary are recorded as a crash."""
    run = Run(trainer, backend, hw)
    backends.keep_compiler_caches(prepare.CACHE_DIR)  # before the first compilation
    backends.bound_mlx_graph_memory()  # before MLX's first GPU operation
    previous_excepthook = sys.excepthook

    def excepthook(kind, value, traceback):
        previous_excepthook(kind, value, traceback)  # the traceback first: it is what the agent reads
        run._crash(f"{kind.__name__}: {value}".splitlines()[0])

    def on_sigterm(signum, frame):
        # `timeout` signals uv's whole process group and uv passes the signal on: a second SIGTERM can come while
        # the first is recorded, and would end the process mid-write. It is ignored until the record is written.
        signal.signal(signum, signal.SIG_IGN)
        if os.getpid() == run.pid:
            print(f"\nterminated by SIGTERM after {time.time() - run.t_start:.0f} s", flush=True)
            run._crash("terminated by SIGTERM (a timeout?)")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end as SIGTERM would have: `timeout` and the shell see the usual status

    sys.excepthook = excepthook
    signal.signal(signal.SIGTERM, on_sigterm)
    atexit.register(run._crash, "exited without a summary")
    return run
