"""
A night of autoresearch at a glance, and the keep/discard verdict the agent follows. Reads results.tsv (the
agent's log: one row per run) and runs.jsonl (the trainers' own record of every run, see backends/record.py)
in the current folder. Read-only for the agent, like prepare.py.

Usage:
    uv run analysis.py             # a plain-text report; draws progress.png
    uv run analysis.py --json      # the same report as one JSON object, for an agent; draws progress.png
    uv run analysis.py --verdict   # keep, discard or rerun for the commit just run, then the numbers behind it

The verdict rule
----------------
The night: the records of the branch checked out now (a record names its branch; runs on a detached HEAD count
when their commit is on the branch). Another night's records, a manual run and a test's never join it.

Runs that count: the night's records of finished runs (status ok) made from a clean commit, that did not swap,
and that share the setup of HEAD's latest run: the harness fingerprint (the fixed files: prepare.py, analysis.py,
hub.py, backends/, pyproject.toml, uv.lock), the dataset's name, the data fingerprint (tokenizer and shards),
backend, chip, smoke-test knobs, and the mode (timed, or fixed work of N steps). Runs of another setup are never
compared: their val_bpb is on another scale.

Machine drift: every record holds the machine's speed as training began and as it ended (backends/calibrate.py, a
fixed matmul: it does not depend on the code under test). Runs count only while the machine was steady (the two
readings agree within the tolerance) and ran at the speed of HEAD's latest run (within the tolerance). When the
last kept commit has no such run, the verdict is rerun and names the drift: in a time-budgeted run a faster machine
makes more steps, and its val_bpb would pass for a gain (or a slower one for a loss). A fixed-work run trains the
same steps at any speed, so its machine's speed changes only its time and is never held against it.

Noise: sigma, the pooled standard deviation of val_bpb over the groups of runs of identical code (the same trainer
fingerprint) among them: sqrt(sum over groups of the squared deviations from the group's mean / dof), with
dof = sum over groups of (group size - 1). program.md's setup runs the baseline 3 times to measure it (dof 2);
every rerun during the night adds to it.

HEAD is the current commit; the last kept commit is the newest results.tsv row with status keep for another one.
    HEAD has no record, or its latest run left none: discard (it died before the trainer started: read the log)
    HEAD's latest run crashed, failed or swapped:    discard
    HEAD's latest run's machine was not steady:      rerun
    HEAD is the baseline (nothing kept before it):   keep once it has BASELINE_RUNS runs, until then rerun
    the last kept commit has no run at this speed:   rerun (measure it again on the machine as it is now)
    gain = mean(last kept commit's runs) - mean(HEAD's runs)          (positive: HEAD is better)
    bar  = max(t(dof) * sigma * sqrt(1/n_kept + 1/n_head), MIN_GAIN)
           the standard error of the gain times Student's t (97.5% quantile) for the dof behind sigma:
           4.30 at dof 2, 2.23 at dof 10, 2.04 at dof 30 (a one-sided test at 2.5%)
    discard  gain <= 0
    rerun    no sigma yet (no code has run twice)
    keep     gain > bar
    discard  gain <= bar after MAX_RUNS runs of HEAD
    rerun    otherwise: a gain inside the noise; another run of the same commit tells whether it holds
Why t and not a fixed 2: sigma from 3 runs is rough (below half the true value one time in five), and a bar drawn
from it keeps noise. benchmarks/bench_verdict.py simulates the rule: an idea that does nothing is kept about 5% of
the time, early in the night or late, and takes 1.8 runs on average; with the machine drifting too, still about 5%.

Every verdict is appended to verdicts.jsonl with its gain, bar and sigma, naming the run it judged: the report
shows each keep as it was decided then, and says so separately where today's sigma would judge it otherwise.
"""

import argparse
import datetime
import json
import math
import os
import re
import sys

from backends import jsonl

RESULTS = "results.tsv"
RUNS = "runs.jsonl"
VERDICTS = "verdicts.jsonl"
LOG = "run.log"  # program.md's run commands write the trainer's output here
PLOT = "progress.png"
HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = ("keep", "discard", "crash", "rerun")
RECORD_FIELDS = ("time", "commit", "dirty", "trainer", "trainer_sha", "harness", "backend", "chip", "smoke", "status")
FIXED_FILES = "prepare.py analysis.py hub.py backends pyproject.toml uv.lock"  # backends/record.py's FIXED_FILES

BASELINE_RUNS = 3   # runs of the baseline before the first idea: the first noise estimate
MAX_RUNS = 3        # runs of one candidate at most: a gain still inside the noise then is not worth keeping
MIN_GAIN = 0.001    # a gain must exceed this much val_bpb whatever sigma says: not worth its code otherwise
BAND_SIGMAS = 2     # progress.png's noise band: the running best +- this many sigma
# Two machine speed readings agree when they differ by at most this fraction. A quiet machine's readings scatter
# less (an H200: 4.4% from the lowest to the highest of 30); another program on the GPU cut them by 60%. Tighter
# would flag quiet runs; looser would let a machine a few per cent faster pass for a gain (bench_verdict.py).
SPEED_TOLERANCE = 0.05
# A CPU shared with the OS and other programs scatters more: about +-5% quiet on 2 cores (docs/measurements.md)
CPU_SPEED_TOLERANCE = 0.15


def tolerance(record):
    return CPU_SPEED_TOLERANCE if record["backend"] == "cpu" else SPEED_TOLERANCE
# Student's t, 97.5% quantile, for 1..30 degrees of freedom (more: the last value, a little on the safe side)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class InputError(SystemExit):
    """One line that names the file (and line) and the problem; exit status 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")

# ---------------------------------------------------------------------------
# Reading the two files
# ---------------------------------------------------------------------------

def _number(text, what, where):
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{where}: {what} {text!r} is not a number >= 0")
    return value


def read_results(path=RESULTS):
    """results.tsv as a list of rows (dicts with their line number); the header is checked, blank lines skipped."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file: run analysis.py in the folder where the agent keeps its results")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    header = lines[0].rstrip("\r") if lines else ""
    if "\t" not in header and "," in header:
        raise InputError(f"{path}:1: comma-separated: results.tsv must be tab-separated (descriptions contain commas)")
    if header.split("\t") != HEADER:
        raise InputError(f"{path}:1: the header must be {chr(9).join(HEADER)!r} (tab-separated), got {header!r}")
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        fields = line.split("\t")
        if len(fields) != len(HEADER):
            hint = ": comma-separated? results.tsv must be tab-separated" if len(fields) == 1 and "," in line else ""
            raise InputError(f"{where}: {len(fields)} tab-separated fields, expected {len(HEADER)}{hint}")
        commit, val_bpb, memory_gb, status, description = (field.strip() for field in fields)
        if not re.fullmatch(r"[0-9a-f]{7,40}", commit):
            raise InputError(f"{where}: commit {commit!r} is not a short git hash (git rev-parse --short=7 HEAD)")
        val_bpb, memory_gb = _number(val_bpb, "val_bpb", where), _number(memory_gb, "memory_gb", where)
        if status not in STATUSES:
            raise InputError(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")
        if status != "crash" and val_bpb == 0:
            raise InputError(f"{where}: val_bpb 0 with status {status}: a run without a result has status crash")
        rows.append({"line": lineno, "commit": commit[:7], "val_bpb": val_bpb, "memory_gb": memory_gb,
                     "status": status, "description": description})
    return rows


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def read_jsonl(path):
    """(line number, dict) for each line of a JSON-lines file; a line that is not a JSON object (torn by a full disk
    or a killed writer, or edited by hand) is skipped with one warning naming it. [] when there is no such file."""
    if not os.path.isfile(path):
        return []
    objects = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                warn(f"{path}:{lineno}: not a JSON object (a torn or edited line?): skipped")
                continue
            objects.append((lineno, obj))
    return objects


def read_runs(path=RUNS):
    """runs.jsonl as a list of records (dicts with their line number), or None when there is no such file. A line
    that is not a trainer's record is skipped with a warning. An ok record whose val_bpb is not a finite number (a
    trainer older than the check) counts as failed."""
    if not os.path.isfile(path):
        return None
    records = []
    for lineno, record in read_jsonl(path):
        if checked_record(record, f"{path}:{lineno}") is not None:
            records.append({**record, "line": lineno})
    return records


def checked_record(record, where):
    """A trainer's record as the verdict reads it (commit shortened to 7 characters; an ok record whose val_bpb is
    not a finite number, from a trainer older than the check, counts as failed), or None with a warning naming where
    it is when it lacks a field every trainer writes. hub.py reads the fleet's records through it too."""
    missing = [k for k in RECORD_FIELDS if k not in record]
    if missing:
        warn(f"{where}: no {', '.join(missing)} field: not a record written by a trainer: skipped")
        return None
    value = record.get("val_bpb")
    if record["status"] == "ok" and not (isinstance(value, (int, float)) and math.isfinite(value)):
        record.update(status="fail", error=f"val_bpb {value} (not a finite number)")
    record["commit"] = (record["commit"] or "")[:7]
    return record


def git(*args):
    """git's output here, stripped, or None outside a repository (or without git)."""
    out = jsonl.git(".", *args)
    return None if out is None else out.strip()


def current_branch():
    """The branch checked out here: None outside git; "" on a detached HEAD."""
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    return None if branch is None else ("" if branch == "HEAD" else branch)


def this_night(records, branch):
    """The records of the branch checked out now, and those made on a detached HEAD at one of its commits (the last
    kept commit measured again). Outside git, all of them."""
    if branch is None:
        return records
    on_branch = {}

    def ours(record):
        if record.get("branch") == branch:
            return True
        if "branch" not in record or record["branch"] is not None or not record["commit"]:
            return False
        if record["commit"] not in on_branch:
            on_branch[record["commit"]] = git("merge-base", "--is-ancestor", record["commit"], "HEAD") is not None
        return on_branch[record["commit"]]
    return [r for r in records if ours(r)]


def head_commit(records):
    """HEAD's short hash; outside a git repository, the commit of the latest run."""
    head = git("rev-parse", "--short=7", "HEAD")
    if head is not None:
        return head[:7]
    return records[-1]["commit"] if records else None

# ---------------------------------------------------------------------------
# Noise and the verdict
# ---------------------------------------------------------------------------

SETUP_NAMES = ("harness", "dataset", "data", "backend", "chip", "smoke-test knobs", "mode")


def setup(record):
    """What must match for two runs' val_bpb to be comparable. The mode: 0 for a timed run (a record older than
    the fixed-work mode was one), else AUTORESEARCH_STEPS."""
    return (record["harness"], record.get("dataset"), record.get("data"), record["backend"], record["chip"],
            tuple(record["smoke"]), record.get("fixed_steps", 0))


def describe_setup(record):
    smoke = f", smoke-test knobs {' '.join(record['smoke'])}" if record["smoke"] else ""
    steps = f", fixed work of {record['fixed_steps']} steps" if record.get("fixed_steps") else ""
    return (f"harness {record['harness']}, dataset {record.get('dataset')}, data {record.get('data')}, "
            f"{record['backend']} on {record['chip']}{smoke}{steps}")


def speed(record):
    """The machine's speed during a run (GFLOP/s of the calibration), or None where it was not measured."""
    return record.get("machine_speed")


def unsteady(record):
    """How much the machine's speed changed during the run, as a fraction, when more than its tolerance (never for
    fixed work, whose val_bpb does not depend on the speed)."""
    readings = record.get("machine_speeds") or []
    if len(readings) == 2 and min(readings) > 0 and not record.get("fixed_steps"):
        change = max(readings) / min(readings) - 1
        return change if change > tolerance(record) else None
    return None


def speed_change(a, b):
    """How much faster (positive) or slower (negative) speed a is than speed b, as a fraction."""
    return a / b - 1


def agrees(record, reference):
    """Whether a run's machine was steady and as fast as the reference speed (unknown speeds agree: records from
    before the calibration, or a reading that failed; fixed work agrees at any speed)."""
    if record.get("fixed_steps"):
        return True
    if unsteady(record) is not None:
        return False
    return (speed(record) is None or reference is None
            or abs(speed_change(speed(record), reference)) <= tolerance(record))


def trustworthy(record):
    """A finished run from a clean commit that did not swap: its val_bpb can be compared."""
    return record["status"] == "ok" and not record["dirty"] and not record.get("swapped")


def mean(values):
    return sum(values) / len(values)


def median(values):
    ordered = sorted(values)
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2


def noise(groups):
    """sigma pooled over groups of repeated runs (lists of val_bpb): {"sigma", "dof", "runs", "groups"}; sigma is
    None until some group has two runs."""
    repeated = [g for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in repeated)
    squares = sum((v - mean(g)) ** 2 for g in repeated for v in g)
    return {"sigma": math.sqrt(squares / dof) if dof else None, "dof": dof, "runs": sum(map(len, repeated)),
            "groups": len(repeated)}


def t_975(dof):
    return T_975[min(dof, len(T_975)) - 1]


def bar(spread, n_kept, n_head):
    """The gain a candidate must beat: the standard error of the difference of the two means times Student's t
    for the degrees of freedom behind sigma, and at least MIN_GAIN."""
    return max(t_975(spread["dof"]) * spread["sigma"] * math.sqrt(1 / n_kept + 1 / n_head), MIN_GAIN)


def decide(head, kept, spread):
    """The rule of the module docstring for val_bpb lists and a noise() estimate: (word, gain, bar). kept is None
    when HEAD is the baseline."""
    if kept is None:
        return ("keep" if len(head) >= BASELINE_RUNS else "rerun"), None, None
    gain = mean(kept) - mean(head)
    threshold = bar(spread, len(kept), len(head)) if spread["sigma"] is not None else None
    if gain <= 0:
        return "discard", gain, threshold
    if threshold is None:
        return "rerun", gain, None
    if gain > threshold:
        return "keep", gain, threshold
    return ("discard" if len(head) >= MAX_RUNS else "rerun"), gain, threshold


def last_kept_commit(rows, head):
    kept = [row for row in rows if row["status"] == "keep" and row["commit"] != head]
    return (kept[-1]["commit"], kept[-1]["line"]) if kept else (None, None)


def unrecorded_run(records):
    """The end of run.log when the latest run left no record: run.log was written after the newest record (a trainer
    writes its record after its last line) and holds no summary. None otherwise."""
    try:
        log_time = os.path.getmtime(LOG)
        with open(LOG, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    newest = os.path.getmtime(RUNS) if records and os.path.isfile(RUNS) else 0
    if log_time <= newest + 2 or re.search(r"^val_bpb:", text, re.MULTILINE):  # 2 s: the log's last flush
        return None
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(empty)"


def verdict(rows, records, head, branch=None):
    """(word, lines of explanation, what to store in verdicts.jsonl) for HEAD's runs against the last kept commit's.
    branch names the night in the advice (None outside git)."""
    mine = [r for r in records if r["commit"] == head]
    kept, kept_line = last_kept_commit(rows, head)
    # a reset only ever goes back to a commit of this night: the last kept one (there is none before the baseline)
    reset = f"`git reset --hard {kept}`" if kept else None
    give_up = (f"fix it and run again, or give up on it: {reset}" if reset else
               "fix it and run again (the baseline is where the branch starts: there is nothing to go back to)")
    died = unrecorded_run(records)
    if not mine or died is not None:
        if not mine and died is None:
            raise InputError(f"{RUNS}: no record of a run of HEAD {head} on this branch: run it first. A run that "
                             f"died before its trainer started (a syntax or import error, a killed process) leaves "
                             f"no record: then read the end of {LOG}, fix the trainer, commit, and run again")
        return "discard", [f"HEAD {head}'s latest run left no record: it died before the trainer started its record "
                           f"(a syntax or import error, a killed process); {LOG} ends with: {died}",
                           f"next: read the end of {LOG} (`tr '\\r' '\\n' < {LOG} | tail -n 60`); log it with "
                           f"status crash, then {give_up}"], None
    last = mine[-1]
    where = f"{RUNS}:{last['line']}"
    if last["dirty"]:
        changes = ", ".join(c.strip() for c in last.get("uncommitted", [])[:5])
        raise InputError(f"{where}: HEAD {head}'s latest run had uncommitted changes ({changes}): commit them "
                         f"(`git add` any new file first), then run again")
    stored = {"commit": head, "run": last.get("id"), "kept": kept}
    if last["status"] != "ok":
        return "discard", [f"HEAD {head}'s latest run ended with status {last['status']}: {last.get('error')}",
                           f"next: log it with status crash, then {give_up}"], stored
    if last.get("swapped"):
        return "discard", [f"HEAD {head}'s latest run swapped {last.get('swap_mb', 0):.0f} MB during training: "
                           f"its val_bpb is not comparable (it outgrew memory, or another program crowded it out)",
                           f"next: log it with status discard, then " + (f"{reset}; try the idea with less memory"
                           if reset else "make the baseline fit in memory (a smaller DEVICE_BATCH_SIZE), commit and "
                           "run again")], stored
    change = unsteady(last)
    if change is not None:
        before, after = last["machine_speeds"]
        return "rerun", [f"HEAD {head}'s latest run: the machine's speed changed by {100 * change:.0f}% during "
                         f"training ({before:.1f} GFLOP/s as it began, {after:.1f} as it ended): another program, "
                         f"heat or a power mode; its val_bpb measures the machine, not the code",
                         f"next: log it with status rerun; close other programs, let the machine settle, and run "
                         f"HEAD again, unchanged"], stored
    now = speed(last)
    same_setup = [r for r in records if trustworthy(r) and setup(r) == setup(last)]
    comparable = [r for r in same_setup if agrees(r, now)]
    groups = {}
    for r in comparable:
        groups.setdefault(r["trainer_sha"], []).append(r["val_bpb"])
    spread = noise(groups.values())
    sigma = spread["sigma"]
    head_values = [r["val_bpb"] for r in comparable if r["commit"] == head]
    at_speed = f", machine speed {now:.1f} GFLOP/s" if now is not None else ""
    sigma_line = (f"sigma {sigma:.6f} (dof {spread['dof']}): the spread of {spread['runs']} runs of identical code in "
                  f"{spread['groups']} group(s) ({describe_setup(last)}{at_speed})" if sigma is not None else
                  f"sigma unknown: no code has run twice yet ({describe_setup(last)}{at_speed})")
    runs = lambda values: f"mean of {len(values)} run{'s' * (len(values) != 1)}: {' '.join(f'{v:.6f}' for v in values)}"

    def drift(commit, what):
        """A line naming the drift, when commit's runs of this setup ran at another machine speed."""
        other = [speed(r) for r in same_setup if r["commit"] == commit and not agrees(r, now)]
        known = [v for v in other if v is not None]
        if not known:
            return None
        change = speed_change(median(known), now)
        return (f"the machine ran {100 * abs(change):.0f}% {'slower' if change < 0 else 'faster'} during {what} "
                f"({len(other)} run(s), {median(known):.1f} GFLOP/s) than during HEAD's latest run ({now:.1f}): "
                f"{'those runs are' if len(other) > 1 else 'that run is'} left out")

    if kept is None:
        word, _, _ = decide(head_values, None, spread)
        lines = [f"baseline {head}: val_bpb {mean(head_values):.6f} ({runs(head_values)})", sigma_line]
        if drift(head, "the baseline's other runs"):
            lines.insert(1, drift(head, "the baseline's other runs"))
        lines.append("next: log it with status keep; the branch starts here" if word == "keep" else
                     f"next: log it with status rerun and run it again, unchanged: baseline run "
                     f"{len(head_values)} of {BASELINE_RUNS} (the noise floor)")
        return word, lines, {**stored, "word": word, "sigma": sigma, "dof": spread["dof"]}

    kept_values = [r["val_bpb"] for r in comparable if r["commit"] == kept]
    if not kept_values:
        kept_drift = drift(kept, f"the last kept commit {kept}'s runs")
        if kept_drift:
            back = f"`git checkout {branch}`" if branch else "check out the branch again"
            return "rerun", [f"HEAD {head}: val_bpb {mean(head_values):.6f} ({runs(head_values)})",
                             kept_drift + ": their val_bpb measure the machine, not the code",
                             f"next: log it with status rerun. If another program is running, or the machine is "
                             f"hot or on battery, wait until it is as it was during {kept}'s runs and run HEAD "
                             f"again. If it stays as it is now, measure {kept} again on it: `git checkout {kept}`, "
                             f"run it, {back}, log that run as a row of {kept} with status keep and its "
                             f"description, then ask again"], {**stored, "word": "rerun", "drift": kept_drift}
        theirs = [r for r in records if r["commit"] == kept and r["status"] == "ok"]
        if theirs:
            differs = [name for name, a, b in zip(SETUP_NAMES, setup(last), setup(theirs[-1])) if a != b]
            fix = (f"the fixed files changed: restore them with `git checkout {kept} -- {FIXED_FILES}` and commit"
                   if "harness" in differs else
                   f"the dataset differs: run with AUTORESEARCH_DATASET={theirs[-1].get('dataset')}"
                   if "dataset" in differs else
                   "the data differs: run with the cache (AUTORESEARCH_CACHE_DIR) and prepared data of the last "
                   "kept commit's runs" if "data" in differs else
                   "run with the backend and environment variables of the last kept commit's runs")
            raise InputError(f"{where}: not comparable: HEAD {head} ran with {describe_setup(last)}, the last kept "
                             f"commit {kept} with {describe_setup(theirs[-1])}: {fix}")
        raise InputError(f"{RUNS}: no finished run of the last kept commit {kept} ({RESULTS}:{kept_line}) on this "
                         f"branch to compare with")
    word, gain, threshold = decide(head_values, kept_values, spread)
    lines = [f"HEAD {head}: val_bpb {mean(head_values):.6f} ({runs(head_values)})",
             f"last kept {kept}: val_bpb {mean(kept_values):.6f} ({runs(kept_values)})"]
    lines += [line for line in (drift(head, "HEAD's other runs"), drift(kept, f"{kept}'s other runs")) if line]
    if threshold is not None:
        relation = ">" if gain > threshold else "<="
        lines.append(f"gain {gain:.6f} {relation} bar {threshold:.6f} = max(t {t_975(spread['dof'])} x sigma x "
                     f"sqrt(1/{len(kept_values)} + 1/{len(head_values)}), {MIN_GAIN})")
    else:
        lines.append(f"gain {gain:.6f}" + (" <= 0: not better" if gain <= 0 else ""))
    lines.append(sigma_line)
    lines.append({
        "keep": "next: log it with status keep; the branch advances to HEAD",
        "discard": f"next: log it with status discard, then `git reset --hard {kept}`",
        "rerun": f"next: log it with status rerun and run HEAD again, unchanged (run {len(head_values)} of at most "
                 f"{MAX_RUNS})",
    }[word])
    return word, lines, {**stored, "word": word, "gain": gain, "bar": threshold, "sigma": sigma, "dof": spread["dof"],
                         "runs": len(head_values), "kept_runs": len(kept_values)}


def store_verdict(entry, path=VERDICTS):
    """Append a verdict to verdicts.jsonl, on a line of its own: the report shows each keep as it was decided."""
    try:
        jsonl.append(path, {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **entry})
    except OSError as e:
        warn(f"could not append to {path}: {e}")

# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def match(rows, records):
    """Pair each results.tsv row with the run record of the same commit in the same order: {row line: record}."""
    by_commit = {}
    for record in records:
        by_commit.setdefault(record["commit"], []).append(record)
    matched, seen = {}, {}
    for row in rows:
        i = seen[row["commit"]] = seen.get(row["commit"], -1) + 1
        if i < len(by_commit.get(row["commit"], [])):
            matched[row["line"]] = by_commit[row["commit"]][i]
    return matched


def build_report(rows, records, verdicts=()):
    """Everything the text report, the JSON report and the plot show, as one dict. verdicts: verdicts.jsonl's
    entries, for each keep as it was decided."""
    matched = match(rows, records)
    reference = matched.get(rows[0]["line"]) or (records[0] if records else None)  # the baseline's setup
    flags = {"not_comparable": [], "swapped": [], "smoke": [], "dirty": [], "drifted": []}
    # the machine's usual speed tonight: the median over the runs of the baseline's setup
    speeds = [speed(r) for r in records if speed(r) is not None and (reference is None or setup(r) == setup(reference))]
    usual = median(speeds) if speeds else None
    for record in records:
        entry = {"runs_line": record["line"], "commit": record["commit"]}
        if reference is not None and setup(record) != setup(reference):
            why = [name for name, a, b in zip(SETUP_NAMES, setup(record), setup(reference)) if a != b]
            flags["not_comparable"].append({**entry, "differs": why, "setup": describe_setup(record)})
        elif record["status"] == "ok" and not agrees(record, usual):
            flags["drifted"].append({**entry, "speed": speed(record), "usual": usual, "during": unsteady(record),
                                     "change": speed_change(speed(record), usual) if speed(record) and usual else None})
        if record.get("swapped"):
            flags["swapped"].append({**entry, "swap_mb": record.get("swap_mb")})
        if record["smoke"]:
            flags["smoke"].append({**entry, "knobs": record["smoke"]})
        if record["dirty"]:
            flags["dirty"].append(entry)

    def comparable(row):
        record = matched.get(row["line"])
        return row["status"] != "crash" and (record is None or (
            not record.get("swapped") and (reference is None or setup(record) == setup(reference))))

    def steady(row):
        record = matched.get(row["line"])
        return record is None or agrees(record, usual)

    commits, values, drifted, status = [], {}, {}, {}
    for row in rows:
        if row["commit"] not in status:
            commits.append(row["commit"])
        status[row["commit"]] = row["status"]  # a commit's verdict is its last row's
        if comparable(row):
            (values if steady(row) else drifted).setdefault(row["commit"], []).append(row["val_bpb"])
    values = {**drifted, **values}  # a commit's runs at the usual machine speed, where it has any
    describe = {row["commit"]: row["description"] for row in rows}
    groups = {}
    # repeated runs of identical code (the same trainer file where the record says so) at the night's usual machine
    # speed: like the verdict's, the report's sigma leaves out the spread that the machine made
    for row in rows:
        record = matched.get(row["line"])
        if comparable(row) and steady(row) and (record is None or not record["dirty"]):
            groups.setdefault(record["trainer_sha"] if record else row["commit"], []).append(row["val_bpb"])
    spread = noise(groups.values())

    def summary(commit):
        v = values.get(commit)
        return {"commit": commit, "val_bpb": mean(v) if v else None, "runs": len(v or []),
                "description": describe[commit]}

    first = next((i for i, c in enumerate(commits) if c in values), 0)  # the first commit with a result
    baseline = summary(commits[first])
    decided = {v["commit"]: v for v in verdicts if v.get("word") == "keep" and v.get("gain") is not None}
    steps, previous = [], None
    for commit in commits:
        if status[commit] != "keep" or commit not in values:
            continue
        step = summary(commit)
        if previous is not None:
            delta = previous["val_bpb"] - step["val_bpb"]
            today = bar(spread, previous["runs"], step["runs"]) if spread["sigma"] is not None else None
            step["today"] = {"delta": delta, "bar": today, "cleared": delta > today if today is not None else None}
            then = decided.get(commit)  # the verdict that kept it, with the sigma known then
            step.update({"delta": then["gain"], "bar": then["bar"], "cleared": then["gain"] > then["bar"],
                         "decided": then["time"]} if then else {**step["today"], "decided": None})
        steps.append(step)
        previous = step
    best = min(steps, key=lambda s: s["val_bpb"]) if steps else baseline
    experiments = commits[first + 1:]
    outcome = lambda word: sum(status[c] == word for c in experiments)
    matched_lines = set(matched)
    return {
        "results": RESULTS, "runs_file": RUNS if records else None,
        "runs": len(rows), "commits": len(commits), "records": len(records),
        "rows_without_record": [row["line"] for row in rows if row["line"] not in matched_lines] if records else [],
        "baseline": baseline, "best": best,
        "gain": (baseline["val_bpb"] - best["val_bpb"]) if baseline["val_bpb"] is not None else None,
        "experiments": len(experiments), "kept": outcome("keep"), "discarded": outcome("discard"),
        "crashed": outcome("crash"), "undecided": outcome("rerun"),
        "reruns": len(rows) - len(commits),
        "keep_rate": outcome("keep") / len(experiments) if experiments else None,
        "noise": spread, "kept_steps": steps, **flags,
        "plot": PLOT,
    }


def format_report(report):
    f6 = lambda v: "-" if v is None else f"{v:.6f}"
    runs = lambda s: f"{s['runs']} run{'s' * (s['runs'] != 1)}"
    base, best = report["baseline"], report["best"]
    lines = [f"{report['runs']} runs of {report['commits']} commits in {RESULTS}; "
             + (f"{report['records']} records in {RUNS}" if report["runs_file"] else f"no {RUNS}: no run records"),
             "",
             f"baseline   {f6(base['val_bpb'])}  {base['commit']}  ({runs(base)})",
             f"best       {f6(best['val_bpb'])}  {best['commit']}  ({runs(best)})  {best['description']}"]
    if report["gain"] is not None:
        lines.append(f"gain       {report['gain']:.6f}  ({100 * report['gain'] / base['val_bpb']:.1f}% below the baseline)")
    if report["experiments"]:
        lines.append(f"keep rate  {report['kept']} of {report['experiments']} experiments kept "
                     f"({100 * report['keep_rate']:.0f}%); {report['discarded']} discarded, {report['crashed']} "
                     f"crashed, {report['undecided']} undecided; {report['reruns']} reruns")
    spread = report["noise"]
    lines.append(f"noise      sigma {spread['sigma']:.6f} (dof {spread['dof']}) from {spread['runs']} runs of "
                 f"identical code in {spread['groups']} group(s)" if spread["sigma"] is not None else
                 "noise      unknown: no code has run twice (program.md's setup runs the baseline 3 times)")
    lines += ["", "kept commits (delta: the gain over the previous kept commit; cleared: above the noise bar)",
              f"  {'commit':8} {'val_bpb':9} {'runs':>4}  {'delta':9} {'bar':9} {'cleared':7}  description"]
    word = lambda cleared: {True: "yes", False: "NO", None: "-"}[cleared]
    for step in report["kept_steps"]:
        lines.append(f"  {step['commit']:8} {f6(step['val_bpb']):9} {step['runs']:>4}  {f6(step.get('delta')):9} "
                     f"{f6(step.get('bar')):9} {word(step.get('cleared')):7}  {step['description']}")
    undecided = [s for s in report["kept_steps"] if "today" in s and not s["decided"]]
    if any(s.get("decided") for s in report["kept_steps"]):
        lines.append(f"  (delta, bar and cleared as the verdict decided them{', except for ' if undecided else ''}"
                     + ", ".join(s["commit"] for s in undecided) + (": no verdict stored in "
                     f"{VERDICTS}, so today's sigma" if undecided else "") + ")")
    disagree = [s for s in report["kept_steps"] if s.get("decided") and s["today"]["cleared"] is False]
    if disagree:
        lines += ["", f"WITH TODAY'S SIGMA {report['noise']['sigma']:.6f}, {len(disagree)} keep(s) would not clear "
                      f"the bar (they were kept on the sigma known then; a rerun of each tells):"]
        lines += [f"  {s['commit']}  gain {s['today']['delta']:.6f} <= bar {s['today']['bar']:.6f} today"
                  for s in disagree]
    if report["not_comparable"]:
        lines += ["", f"NOT COMPARABLE WITH THE BASELINE: {len(report['not_comparable'])} run(s) used another "
                      f"setup; their val_bpb is left out of every number above"]
        lines += [f"  {RUNS}:{f['runs_line']}  {f['commit']}  {', '.join(f['differs'])} differ: {f['setup']}"
                  for f in report["not_comparable"]]
    if report["drifted"]:
        lines += ["", f"MACHINE DRIFT: {len(report['drifted'])} run(s) ran while the machine was not as fast as usual "
                      f"(more than {100 * SPEED_TOLERANCE:.0f}% from the median, {100 * CPU_SPEED_TOLERANCE:.0f}% "
                      f"on a CPU, or changing during the run); the "
                      f"verdict compares only runs at one machine speed"]
        for f in report["drifted"]:
            why = [] if f["change"] is None else [f"{100 * abs(f['change']):.0f}% {'slower' if f['change'] < 0 else 'faster'}"
                                                  f" ({f['speed']:.1f} vs {f['usual']:.1f} GFLOP/s)"]
            why += [f"changed {100 * f['during']:.0f}% during the run"] if f["during"] else []
            lines.append(f"  {RUNS}:{f['runs_line']}  {f['commit']}  {', '.join(why)}")
    if report["swapped"]:
        lines += ["", f"SWAPPED: {len(report['swapped'])} run(s) swapped during training; val_bpb not comparable"]
        lines += [f"  {RUNS}:{f['runs_line']}  {f['commit']}  {f['swap_mb']:.0f} MB" for f in report["swapped"]]
    if report["smoke"]:
        knobs = sorted({" ".join(f["knobs"]) for f in report["smoke"]})
        lines += ["", f"smoke-test knobs set in {len(report['smoke'])} of {report['records']} runs "
                      f"({'; '.join(knobs)}): val_bpb is not comparable to real runs"]
    if report["dirty"]:
        lines += ["", f"{len(report['dirty'])} run(s) had uncommitted changes (they count for no commit): "
                      + ", ".join(f"{RUNS}:{f['runs_line']}" for f in report["dirty"])]
    if report["rows_without_record"]:
        lines += ["", f"{len(report['rows_without_record'])} row(s) of {RESULTS} have no record in {RUNS} (killed "
                      f"outright, or run elsewhere): lines {', '.join(map(str, report['rows_without_record']))}"]
    lines += ["", f"wrote {report['plot']}" if report["plot"] else f"could not draw {PLOT} (see the warning above)"]
    return "\n".join(lines)

# ---------------------------------------------------------------------------
# progress.png
# ---------------------------------------------------------------------------

COLORS = {"keep": "#2e8b3e", "discard": "#9a9a9a", "rerun": "#e08a00", "crash": "#c62828"}


def plot(rows, records, report, path=PLOT):
    """val_bpb of every run in results.tsv order, coloured by its commit's verdict; the running best as a step line
    with the noise band around it; kept commits labelled with their description; crashes as crosses at the bottom."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no window, no display needed
    import matplotlib.pyplot as plt

    matched = match(rows, records)
    final = {row["commit"]: row["status"] for row in rows}
    excluded = {f["runs_line"] for f in report["not_comparable"] + report["swapped"]}
    drifted = {f["runs_line"] for f in report["drifted"]}
    sigma = report["noise"]["sigma"]
    fig, ax = plt.subplots(figsize=(13, 6.5))
    finished = [(i, row) for i, row in enumerate(rows) if row["status"] != "crash"]
    flagged_lines = {row["line"] for _, row in finished if matched.get(row["line"], {}).get("line") in excluded}
    other_setup = {f["runs_line"] for f in report["not_comparable"]}
    ys = [row["val_bpb"] for _, row in finished
          if matched.get(row["line"], {}).get("line") not in other_setup] or [1.0]
    low, high = min(ys), max(ys)  # another setup's val_bpb may be on another scale: it sits at the edge
    if report["baseline"]["val_bpb"] is not None:  # a diverged run far above the baseline would squash the rest
        high = min(high, report["baseline"]["val_bpb"] + 1.5 * (report["baseline"]["val_bpb"] - low) + 3 * (sigma or 0))
    pad = 0.08 * (high - low or 0.01)
    clip = lambda y: min(max(y, low - pad), high + pad)  # outliers sit at the edge instead of squashing the rest
    band = BAND_SIGMAS * (sigma or 0)
    if report["best"]["val_bpb"] is not None:  # the whole noise band in view
        low = min(low, report["best"]["val_bpb"] - band)
    if report["baseline"]["val_bpb"] is not None:
        high = max(high, report["baseline"]["val_bpb"] + band)
    ax.set_ylim(low - 2 * pad, high + 2 * pad)

    for status in ("discard", "rerun", "keep"):
        points = [(i, clip(row["val_bpb"])) for i, row in finished if final[row["commit"]] == status]
        if not points:
            continue
        label = {"keep": "run of a kept commit", "discard": "run of a discarded commit",
                 "rerun": "run of an undecided commit"}[status]
        ax.scatter(*zip(*points), s=36, color=COLORS[status], label=label, zorder=3)
    flagged = [(i, clip(row["val_bpb"])) for i, row in finished if row["line"] in flagged_lines]
    if flagged:
        ax.scatter(*zip(*flagged), s=140, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4,
                   label="not comparable (swapped or another setup)")
    shifted = [(i, clip(row["val_bpb"])) for i, row in finished if matched.get(row["line"], {}).get("line") in drifted]
    if shifted:
        ax.scatter(*zip(*shifted), s=150, marker="D", facecolors="none", edgecolors="#6a1b9a", linewidths=1.2,
                   zorder=4, label="machine drift (speed off its usual)")
    crashes = [i for i, row in enumerate(rows) if row["status"] == "crash"]
    if crashes:
        ax.scatter(crashes, [0.03] * len(crashes), marker="x", s=60, color=COLORS["crash"], zorder=3,
                   transform=ax.get_xaxis_transform(), label="crash (no val_bpb)")

    # the running best: the mean of the last kept commit's runs so far, from the row that kept it on
    best_x, best_y, seen = [], [], {}
    for i, row in enumerate(rows):
        if row["status"] != "crash":
            seen.setdefault(row["commit"], []).append(row["val_bpb"])
        if row["status"] == "keep" and seen.get(row["commit"]):
            best_x.append(i)
            best_y.append(mean(seen[row["commit"]]))
    if best_x:
        best_x.append(len(rows) - 1 + 0.5)
        best_y.append(best_y[-1])
        ax.step(best_x, best_y, where="post", color=COLORS["keep"], linewidth=1.8, label="running best", zorder=2)
        if sigma is not None:
            ax.fill_between(best_x, [y - band for y in best_y], [y + band for y in best_y], step="post",
                            color=COLORS["keep"], alpha=0.12, label=f"noise band (±{BAND_SIGMAS} sigma)")
    labelled = set()
    for i in reversed(range(len(rows))):  # each kept commit labelled once, at its last keep row
        row = rows[i]
        if row["status"] == "keep" and row["commit"] not in labelled and row["commit"] in seen:
            labelled.add(row["commit"])
            text = row["description"] if len(row["description"]) <= 40 else row["description"][:39] + "…"
            ax.annotate(text, (i, mean(seen[row["commit"]])), xytext=(6, 10), textcoords="offset points",
                        rotation=25, fontsize=8, color="#1b5e20")

    base, best = report["baseline"], report["best"]
    title = f"{report['runs']} runs, {report['experiments']} experiments, {report['kept']} kept"
    if report["gain"] is not None:
        title += f": val_bpb {base['val_bpb']:.4f} -> {best['val_bpb']:.4f} (-{report['gain']:.4f})"
    if report["smoke"]:
        title += "\nsmoke-test knobs set: val_bpb not comparable to real runs"
    ax.set_title(title)
    ax.set_xlabel(f"run (row of {RESULTS})")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Report on results.tsv and runs.jsonl in this folder, draw "
                                     "progress.png, or give the keep/discard verdict for HEAD (the rule is in "
                                     "this file's docstring and in program.md)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print the report as one JSON object")
    mode.add_argument("--verdict", action="store_true", help="print keep, discard or rerun for HEAD, then why")
    parser.add_argument("--branch", help="the report on this branch's night instead of the branch checked out now")
    args = parser.parse_args()
    if args.branch and args.verdict:
        parser.error("--branch is for the report: the verdict is always for the branch checked out now")

    rows = read_results()
    branch = args.branch or current_branch()
    if branch == "":
        raise InputError("HEAD is detached: check out the night's branch (git checkout autoresearch/<tag>) first")
    records = read_runs()
    if records is not None:
        records = this_night(records, branch)
    verdicts = [v for _, v in read_jsonl(VERDICTS) if branch is None or v.get("branch") == branch]
    if args.verdict:  # results.tsv may hold only its header: the baseline's first run asks too
        if records is None:
            raise InputError(f"{RUNS}: no such file: the verdict needs the trainers' run records (run a trainer "
                             f"in this folder first)")
        word, lines, stored = verdict(rows, records, head_commit(records), branch)
        print("\n".join([word] + lines), flush=True)
        if stored is not None:
            store_verdict({**stored, "branch": branch, "word": word})
        return
    if not rows:
        raise InputError(f"{RESULTS}: only the header, no runs to report yet")
    report = build_report(rows, records or [], verdicts)
    try:
        plot(rows, records or [], report)
    except Exception as e:  # a missing font, a read-only folder: the report is what matters
        warn(f"could not draw {PLOT}: {type(e).__name__}: {e}")
        report["plot"] = None
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `uv run analysis.py | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes at exit
        sys.exit(1)
