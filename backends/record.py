"""
The end of every run, written once for both trainers: the summary block it prints and the record it appends to
runs.jsonl. Shared infrastructure: the agent does not edit this (the harness fingerprint covers it).

A trainer calls start_run() as its main part begins. From then on every end that Python can see leaves one JSON
object, on one line, in runs.jsonl in the working directory:
    ok     the summary was printed (Run.summary)
    fail   the loss blew up (Run.fail prints `FAIL: loss nan at step 37` and exits 1), or val_bpb was not finite
    crash  an uncaught exception, SIGTERM (what `timeout` sends), SIGHUP (a closed terminal), or an exit without a
           summary
A SIGKILL, a crash inside native code, or an error before start_run (a syntax error in the trainer) ends the process
before Python can write anything: results.tsv, the agent's own log, still has its row, and analysis.py's verdict
says what a commit without a record means. A record is appended on a line of its own and flushed to disk, so a
torn last line (a full disk, a killed writer) costs that line only.

Each record also holds how fast the machine itself was as training began and as it ended (backends/calibrate.py),
the branch it ran on, the dataset's name, and fingerprints of the fixed files and of the data: analysis.py compares
only runs of one branch whose dataset and fingerprints are equal and whose machine speeds agree.
"""

import atexit
import datetime
import hashlib
import math
import os
import signal
import sys
import time
import uuid

import prepare
from backends import device
from backends.calibrate import machine_speed
from backends.jsonl import append, git

RUNS_FILE = "runs.jsonl"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_FILES = ("prepare.py", "analysis.py", "hub.py", "backends", "pyproject.toml", "uv.lock")  # the agent may not edit
# Outside git, what a fingerprint of a folder skips: files an editor or the OS leaves beside the real ones
JUNK_SUFFIXES = ("~", ".swp", ".swo", ".pyc", ".orig", ".rej")
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
    ("dataset", "s"),  # the dataset's name (prepare.py --dataset, AUTORESEARCH_DATASET)
    ("data", "s"),
    ("machine_speed", ".1f"),  # GFLOP/s of backends/calibrate.py's matmul: the mean of the readings around training
    ("mode", "s"),  # `time 300s`, or `steps 200` in fixed-work mode (AUTORESEARCH_STEPS)
)


def _is_junk(name):
    return name.startswith(".") or name.endswith(JUNK_SUFFIXES)  # .DS_Store, ._x (macOS), .x.swp (vim), x~ (emacs)


def fixed_file_list(paths, root=ROOT):
    """The files below root that the named files and folders stand for, relative and sorted. In a git repository
    the tracked ones (git ls-files: what `git checkout <commit> -- ...` restores); elsewhere every file but editor
    and OS junk and __pycache__. A named file that does not exist is listed all the same: its absence counts."""
    files = set((git(root, "ls-files", "-z", "--", *paths) or "").split("\0")) - {""}
    if not files:  # not a git repository, or nothing of it committed yet
        files = set()
        for name in paths:
            for folder, dirs, names in os.walk(os.path.join(root, name)):
                dirs[:] = [d for d in dirs if d != "__pycache__" and not _is_junk(d)]
                files.update(os.path.relpath(os.path.join(folder, f), root) for f in names if not _is_junk(f))
    files.update(name for name in paths if not os.path.isdir(os.path.join(root, name)))
    return sorted(f.replace(os.sep, "/") for f in files)


def fingerprint(paths, root=ROOT):
    """8 hex digits of SHA-256 over the named files and folders below root (contents and paths, not mtimes)."""
    h = hashlib.sha256()
    for name in fixed_file_list(paths, root):
        h.update(name.encode() + b"\0")
        try:
            with open(os.path.join(root, name), "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()[:8]


def harness_fingerprint(root=ROOT):
    """The fixed files' fingerprint: runs are comparable only while it stays the same."""
    return fingerprint(FIXED_FILES, root)


def git_state(folder):
    """(short commit, branch, uncommitted changes as `git status --short` lines) of the repository holding folder;
    (None, None, []) outside git. The branch is None on a detached HEAD. Untracked files count: a new file the
    trainer imports must be committed too."""
    head = git(folder, "rev-parse", "--short=7", "HEAD")
    if head is None:
        return None, None, []
    branch = (git(folder, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    return head.strip(), (None if branch in ("", "HEAD") else branch), (git(folder, "status", "--porcelain")
                                                                        or "").splitlines()


def format_line(key, value):
    return f"{key + ':':<18}{value}"


class Run:
    """One training run: what it is (commit, files, machine) from the start, how it ended at the end."""

    def __init__(self, trainer, backend, hw):
        self.pid = os.getpid()  # a forked child (a compile worker) inherits the hooks; only this process records
        self.t_start = time.time()
        self.path = os.path.abspath(RUNS_FILE)  # the working directory now, whatever the trainer does later
        trainer = os.path.abspath(trainer)
        commit, branch, changes = git_state(os.path.dirname(trainer))
        try:
            data = prepare.data_fingerprint()
        except prepare.PrepareError:
            data = None  # not prepared: the trainer stops with its own one-line error as it loads the tokenizer
        self.record = {
            "id": uuid.uuid4().hex[:12],  # what analysis.py's verdicts name the run by
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit,
            "branch": branch,
            "dirty": bool(changes),
            "trainer": os.path.basename(trainer),
            "trainer_sha": fingerprint([os.path.basename(trainer)], os.path.dirname(trainer)),
            "harness": harness_fingerprint(),
            "dataset": prepare.DATASET,
            "data": data,
            "backend": backend,
            "chip": hw["chip"],
            "smoke": prepare.SMOKE_KNOBS,
            "mode": prepare.TRAINING_MODE,
            "fixed_steps": prepare.FIXED_STEPS,  # 0: timed
        }
        if changes:
            self.record["uncommitted"] = changes[:20]
        self.swap_start_mb = None
        self.swap_mb = None
        self.speeds = []  # machine_speed readings, GFLOP/s: as training begins, as it ends
        self.loads = []   # the OS's 1-minute load average at the same moments
        self.training_ended = False
        self.finished = False

    # -- the trainer's hooks, in the order it calls them --

    def mark_training_start(self):
        """Read swap use and the machine's speed as the timed training begins."""
        self.swap_start_mb = device.swap_used_mb()
        self._read_machine()

    def mark_training_end(self):
        """Read them again as it ends: swap growth means the run swapped, and its step times mean nothing; a machine
        that got slower or faster (another program, heat) makes val_bpb a measure of the machine, not of the code."""
        self.swap_mb = self._swap_growth_mb()
        self._read_machine()
        self.training_ended = True

    def fail(self, step, loss):
        """The loss blew up: print the FAIL line (no summary follows), record it, exit with status 1."""
        self._fail(f"loss {loss:.6f} at step {step}", step=step)

    def _fail(self, reason, **fields):
        print()
        print(f"FAIL: {reason}", flush=True)
        self._write("fail", error=reason, swap_mb=self._swap_growth_mb(), **self._machine(), **fields)
        sys.exit(1)

    def _read_machine(self):
        try:
            self.speeds.append(round(machine_speed(self.record["backend"]), 1))
        except Exception as e:  # a reading must never cost the run: the verdict then treats the speed as unknown
            print(f"warning: could not measure the machine's speed: {type(e).__name__}: {e}", file=sys.stderr)
        if hasattr(os, "getloadavg"):
            self.loads.append(round(os.getloadavg()[0], 2))

    def _machine(self):
        """The record's machine fields: the speed readings, their mean (None without both) and the load averages."""
        speed = sum(self.speeds) / 2 if len(self.speeds) == 2 else None
        return {"machine_speed": None if speed is None else round(speed, 1), "machine_speeds": self.speeds,
                "loadavg": self.loads}

    def summary(self, *, val_bpb, training_seconds, total_seconds, peak_vram_mb, mfu_percent, total_tokens_M,
                num_steps, num_params_M, depth, eval_seconds):
        """Print the summary block and append the record of this run to runs.jsonl. A val_bpb that is not finite
        (the model's outputs overflowed) is a failed run, never a result."""
        if not self.training_ended:
            self.mark_training_end()
        if not math.isfinite(val_bpb):
            self._fail(f"val_bpb {val_bpb} after {num_steps} steps (the evaluation's loss was not finite)",
                       step=num_steps)
        machine = self._machine()
        values = dict(val_bpb=val_bpb, training_seconds=training_seconds, total_seconds=total_seconds,
                      peak_vram_mb=peak_vram_mb, mfu_percent=mfu_percent, total_tokens_M=total_tokens_M,
                      num_steps=num_steps, num_params_M=num_params_M, depth=depth, backend=self.record["backend"],
                      chip=self.record["chip"], startup_seconds=total_seconds - training_seconds - eval_seconds,
                      eval_seconds=eval_seconds, harness=self.record["harness"],
                      dataset=self.record["dataset"], data=self.record["data"],
                      machine_speed=machine["machine_speed"], mode=self.record["mode"])
        # what the summary prints is what the record holds: each value rounded as printed, "-" for None
        printed = {key: "-" if values[key] is None else format(values[key], fmt) for key, fmt in SUMMARY}
        values = {key: None if values[key] is None else printed[key] if fmt == "s" else
                  (int if fmt == "d" else float)(printed[key]) for key, fmt in SUMMARY}
        timed_steps = num_steps - prepare.UNTIMED_STEPS  # the training loop's rule, from the same constant
        tokens_per_sec = total_tokens_M * 1e6 / num_steps * timed_steps / training_seconds if training_seconds else 0
        try:
            eval_rows, distinct_rows = prepare.evaluation_rows()
        except prepare.PrepareError:
            eval_rows = distinct_rows = None  # no data: not a trainer's run (those stop without data)
        warnings = [w for w in (
            prepare.SMOKE_TEST_WARNING,
            (f"swapped {self.swap_mb:.0f} MB during training: val_bpb is not comparable"
             if self.swap_mb is not None and self.swap_mb >= SWAP_WARN_MB else None),
            (f"the evaluation repeated validation text: {eval_rows} rows read, only "
             f"{distinct_rows} before the validation shard ran out (prepare more validation data)"
             if distinct_rows is not None and distinct_rows < eval_rows else None),
        ) if w]
        print("---")
        for key, _ in SUMMARY:
            print(format_line(key, printed[key]))
        for warning in warnings:
            print(format_line("warning", warning))
        sys.stdout.flush()
        self._write("ok", **{k: v for k, v in values.items() if k not in self.record and k not in machine}, **machine,
                    tokens_per_sec=round(tokens_per_sec), swap_mb=self.swap_mb,
                    eval_rows=eval_rows, eval_distinct_rows=distinct_rows,
                    warnings=warnings)

    # -- the end of a run that printed no summary --

    def _swap_growth_mb(self):
        if self.swap_start_mb is None:
            return None
        now = device.swap_used_mb()
        return None if now is None else round(max(0.0, now - self.swap_start_mb), 1)

    def _write(self, status, **fields):
        if self.finished or os.getpid() != self.pid:
            return
        self.finished = True
        record = {**self.record, "status": status, **fields}
        record["swapped"] = record.get("swap_mb") is not None and record["swap_mb"] >= SWAP_WARN_MB
        record.setdefault("total_seconds", round(time.time() - self.t_start, 1))
        try:
            append(self.path, record)
        except OSError as e:  # never hide the run's own outcome behind a failure to record it
            print(f"warning: could not append to {self.path}: {e}", file=sys.stderr)

    def _crash(self, error):
        self._write("crash", error=error, swap_mb=self._swap_growth_mb(), **self._machine())


SIGNAL_CAUSES = {"SIGTERM": "a timeout?", "SIGHUP": "the terminal closed?"}


def start_run(trainer, backend, hw):
    """Begin the record of a run of `trainer` (the script's __file__) and make sure it is written however the run
    ends: an uncaught exception, SIGTERM, SIGHUP and an exit without a summary are recorded as a crash."""
    run = Run(trainer, backend, hw)
    previous_excepthook = sys.excepthook

    def excepthook(kind, value, traceback):
        previous_excepthook(kind, value, traceback)  # the traceback first: it is what the agent reads
        run._crash(f"{kind.__name__}: {value}".splitlines()[0])

    def on_signal(signum, frame):
        # `timeout` signals uv's whole process group and uv passes the signal on: a second SIGTERM can come while
        # the first is recorded, and would end the process mid-write. It is ignored until the record is written.
        signal.signal(signum, signal.SIG_IGN)
        name = signal.Signals(signum).name
        if os.getpid() == run.pid:
            try:
                print(f"\nterminated by {name} after {time.time() - run.t_start:.0f} s", flush=True)
            except OSError:
                pass  # the terminal that closed (SIGHUP) took the output with it: the record still says why
            run._crash(f"terminated by {name} ({SIGNAL_CAUSES[name]})")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end as the signal would have: `timeout` and the shell see the usual status

    sys.excepthook = excepthook
    for name in SIGNAL_CAUSES:
        signal.signal(getattr(signal, name), on_signal)
    atexit.register(run._crash, "exited without a summary")
    return run
