"""analysis.py: the report, progress.png and the verdict, on results.tsv and runs.jsonl files built here. The rule
under test is the one in analysis.py's docstring and program.md. Outside a git repository (tmp_path) HEAD is the
commit of the latest run, so the files alone set up each case; one test uses a real repository."""
import json
import os
import subprocess
import sys

import pytest

import analysis
from conftest import ROOT

ANALYSIS = os.path.join(ROOT, "analysis.py")
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
BASE, IDEA, OTHER = "aaaaaaa", "bbbbbbb", "ccccccc"
BASELINE = [1.000, 1.010, 0.990]  # sigma 0.01 from dof 2: t 4.303, bar vs one run 4.303 * 0.01 * sqrt(4/3) = 0.0497


def rec(commit, val_bpb=None, status="ok", harness="11111111", smoke=(), dirty=False, swap_mb=0.0, trainer_sha=None,
        **extra):
    """A runs.jsonl record as backends/record.py writes it (the fields analysis.py reads)."""
    record = {"time": "2025-11-25T23:00:00+01:00", "commit": commit, "dirty": dirty, "trainer": "train_mlx.py",
              "trainer_sha": trainer_sha or commit[:8], "harness": harness, "backend": "mlx", "chip": "Apple M3 Max",
              "smoke": list(smoke), "status": status, "swap_mb": swap_mb, "swapped": swap_mb >= 64, **extra}
    if status == "ok":
        record["val_bpb"] = val_bpb
    return record


def row(commit, val_bpb, status, description="idea"):
    return f"{commit}\t{val_bpb:.6f}\t{0.0 if status == 'crash' else 11.0}\t{status}\t{description}\n"


def write(folder, rows=(), records=None, header=HEADER):
    (folder / "results.tsv").write_text(header + "".join(rows))
    if records is not None:
        (folder / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def cli(folder, *args):
    result = subprocess.run([sys.executable, ANALYSIS, *args], cwd=folder, capture_output=True, text=True,
                            timeout=120)
    return result.returncode, result.stdout, result.stderr


def baseline_session():
    """The setup of program.md: the baseline run three times (rerun, rerun, keep)."""
    rows = [row(BASE, v, s, "baseline") for v, s in zip(BASELINE, ("rerun", "rerun", "keep"))]
    return rows, [rec(BASE, v) for v in BASELINE]


def verdict(rows, records, head=None):
    """analysis.verdict on rows given as results.tsv lines and records as dicts."""
    parsed = [dict(zip(("commit", "val_bpb", "memory_gb", "status", "description"), r.rstrip("\n").split("\t")),
                   line=i + 2) for i, r in enumerate(rows)]
    for r in parsed:
        r["val_bpb"] = float(r["val_bpb"])
    numbered = [{**r, "line": i + 1} for i, r in enumerate(records)]
    word, lines, _ = analysis.verdict(parsed, numbered, head or records[-1]["commit"])
    return word, lines

# ---------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------

def test_the_baseline_runs_three_times_before_it_is_kept():
    assert verdict([], [rec(BASE, 1.0)])[0] == "rerun"
    word, lines = verdict([row(BASE, 1.0, "rerun")], [rec(BASE, 1.0), rec(BASE, 1.01)])
    assert word == "rerun" and "baseline run 2 of 3" in lines[-1]
    rows, records = baseline_session()
    word, lines = verdict(rows[:2], records)
    assert word == "keep"
    assert lines[0] == "baseline aaaaaaa: val_bpb 1.000000 (mean of 3 runs: 1.000000 1.010000 0.990000)"
    assert lines[1].startswith("sigma 0.010000 (dof 2)")


@pytest.mark.parametrize("value,expected", [
    (0.900, "keep"),     # gain 0.1 > bar 0.0497
    (0.980, "rerun"),    # gain 0.02: inside the noise
    (1.000, "discard"),  # no gain
    (1.020, "discard"),  # worse
])
def test_one_run_of_an_idea_against_the_baseline(value, expected):
    rows, records = baseline_session()
    word, lines = verdict(rows, records + [rec(IDEA, value)])
    assert word == expected, lines
    assert lines[0] == f"HEAD {IDEA}: val_bpb {value:.6f} (mean of 1 run: {value:.6f})"
    assert lines[1].startswith(f"last kept {BASE}: val_bpb 1.000000 (mean of 3 runs")
    # the bar is printed for a worse run too: program.md lets a change that only deletes code stay within it
    assert lines[2] == (f"gain {1 - value:.6f} {'>' if expected == 'keep' else '<='} bar 0.049687 = "
                        f"max(t 4.303 x sigma x sqrt(1/3 + 1/1), 0.001)")


def test_a_gain_inside_the_noise_is_rerun_and_settled_by_the_reruns():
    rows, records = baseline_session()
    assert verdict(rows, records + [rec(IDEA, 0.960)])[0] == "rerun"  # gain 0.04 <= bar 0.0497
    # the rerun holds, and the idea's own pair adds to sigma: 0.009129 at dof 3, t 3.182
    word, lines = verdict(rows + [row(IDEA, 0.960, "rerun")], records + [rec(IDEA, 0.960), rec(IDEA, 0.950)])
    assert word == "keep", lines  # gain 0.045 > 3.182 * 0.009129 * sqrt(1/3 + 1/2) = 0.0265
    # ...or the reruns do not hold, and after three runs the idea is dropped (gain 0.01 <= bar 0.0227)
    word, lines = verdict(rows + [row(IDEA, 0.980, "rerun"), row(IDEA, 0.990, "rerun")],
                          records + [rec(IDEA, 0.980), rec(IDEA, 0.990), rec(IDEA, 1.000)])
    assert word == "discard" and lines[-1] == f"next: log it with status discard, then `git reset --hard {BASE}`"


def test_without_repeated_runs_there_is_no_sigma_and_the_idea_is_rerun():
    rows = [row(BASE, 1.0, "keep", "baseline")]
    word, lines = verdict(rows, [rec(BASE, 1.0), rec(IDEA, 0.95)])
    assert word == "rerun" and any(line.startswith("sigma unknown") for line in lines)
    assert verdict(rows, [rec(BASE, 1.0), rec(IDEA, 1.05)])[0] == "discard"  # worse needs no sigma


def test_the_idea_is_compared_with_the_last_kept_commit():
    rows, records = baseline_session()
    rows += [row(IDEA, 0.900, "keep"), row(OTHER, 0.950, "discard")]
    records += [rec(IDEA, 0.900), rec(OTHER, 0.950)]
    word, lines = verdict(rows, records + [rec("ddddddd", 0.920)])
    assert word == "discard" and lines[1].startswith(f"last kept {IDEA}: val_bpb 0.900000")


def test_sigma_pools_identical_code_across_commits_and_leaves_out_other_setups():
    rows, records = baseline_session()
    same_code = [rec(OTHER, 0.95, trainer_sha="feedfeed"), rec("ddddddd", 0.97, trainer_sha="feedfeed")]
    smoke = [rec(OTHER, 0.5, smoke=["AUTORESEARCH_TIME_BUDGET=5"]), rec(OTHER, 2.5, smoke=["AUTORESEARCH_TIME_BUDGET=5"])]
    word, lines = verdict(rows, records + same_code + smoke + [rec(IDEA, 0.98)])
    assert "sigma 0.011547 (dof 3)" in lines[-2] and "5 runs of identical code in 2 group(s)" in lines[-2]


def test_a_harness_change_is_never_compared(tmp_path):
    rows, records = baseline_session()
    write(tmp_path, rows, records + [rec(IDEA, 0.5, harness="22222222")])
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 1 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("error: runs.jsonl:4: not comparable: HEAD bbbbbbb ran with harness 22222222")
    assert f"git checkout {BASE} -- prepare.py analysis.py hub.py backends pyproject.toml uv.lock" in line


@pytest.mark.parametrize("last,expected", [
    (rec(IDEA, status="crash", error="RuntimeError: out of memory"), "ended with status crash: RuntimeError: out of memory"),
    (rec(IDEA, status="fail", error="loss nan at step 37"), "ended with status fail: loss nan at step 37"),
    (rec(IDEA, 0.5, swap_mb=2048.0), "swapped 2048 MB during training"),
])
def test_a_crashed_failed_or_swapped_run_is_discarded(last, expected):
    rows, records = baseline_session()
    word, lines = verdict(rows, records + [rec(IDEA, 0.5), last])  # an earlier good run does not save it
    assert word == "discard" and expected in lines[0]


def test_a_run_with_uncommitted_changes_must_be_committed_first(tmp_path):
    rows, records = baseline_session()
    write(tmp_path, rows, records + [rec(BASE, 0.5, dirty=True, uncommitted=[" M train_mlx.py", "?? helper.py"])])
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 1
    assert err.strip() == ("error: runs.jsonl:4: HEAD aaaaaaa's latest run had uncommitted changes (M train_mlx.py, "
                           "?? helper.py): commit them (`git add` any new file first), then run again")


def test_verdict_prints_one_word_then_the_numbers(tmp_path):
    rows, records = baseline_session()
    write(tmp_path, rows, records + [rec(IDEA, 0.9)])
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "keep" and lines[-1] == "next: log it with status keep; the branch advances to HEAD"


def test_verdict_on_the_first_run_needs_only_the_header(tmp_path):
    write(tmp_path, [], [rec(BASE, 1.0)])
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 0, err
    assert out.splitlines()[0] == "rerun"


def test_verdict_reads_head_from_git(tmp_path):
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
           "GIT_COMMITTER_EMAIL": "a@b"}
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True,
                                       text=True).stdout.strip()
    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "baseline")
    head = git("rev-parse", "--short=7", "HEAD")
    rows, records = baseline_session()
    write(tmp_path, rows, records + [rec(IDEA, 0.9)])  # the latest run is of another commit than HEAD
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 1 and err.strip() == (
        f"error: runs.jsonl: no record of a run of HEAD {head} on this branch: run it first. A run that died before "
        f"its trainer started (a syntax or import error, a killed process) leaves no record: then read the end of "
        f"run.log, fix the trainer, commit, and run again")

# ---------------------------------------------------------------------------
# The report and progress.png
# ---------------------------------------------------------------------------

def night():
    """A small night: baseline x3, a kept idea (rerun once), a discarded one, a crash, a kept one, a swapped run and
    a run after someone edited prepare.py."""
    rows, records = baseline_session()
    rows += [row(IDEA, 0.950, "rerun", "MATRIX_LR 0.06"), row(IDEA, 0.940, "keep", "MATRIX_LR 0.06"),
             row("ccccccc", 0.960, "discard", "DEPTH 10"), row("ddddddd", 0.0, "crash", "DEPTH 16, OOM"),
             row("eeeeeee", 0.925, "keep", "TOTAL_BATCH_SIZE 2**15"), row("fffffff", 0.890, "discard", "swapped"),
             row("1234567", 0.700, "discard", "edited prepare.py")]
    records += [rec(IDEA, 0.950), rec(IDEA, 0.940), rec("ccccccc", 0.960),
                rec("ddddddd", status="crash", error="RuntimeError: out of memory"), rec("eeeeeee", 0.925),
                rec("fffffff", 0.890, swap_mb=812.0), rec("1234567", 0.700, harness="99999999")]
    return rows, records


def test_report_json(tmp_path):
    write(tmp_path, *night())
    returncode, out, err = cli(tmp_path, "--json")
    assert returncode == 0, err
    report = json.loads(out)
    assert report["baseline"] == {"commit": BASE, "val_bpb": pytest.approx(1.0), "runs": 3, "description": "baseline"}
    assert report["best"]["commit"] == "eeeeeee" and report["best"]["val_bpb"] == pytest.approx(0.925)
    assert report["gain"] == pytest.approx(0.075)
    assert (report["experiments"], report["kept"], report["discarded"], report["crashed"]) == (6, 2, 3, 1)
    assert report["keep_rate"] == pytest.approx(2 / 6) and report["reruns"] == 3
    # sigma: the baseline's three runs and the idea's two, as dof 2 + 1 (the swapped and other-harness runs never count)
    assert report["noise"]["sigma"] == pytest.approx(((0.0002 + 0.00005) / 3) ** 0.5) and report["noise"]["dof"] == 3
    steps = report["kept_steps"]
    assert [s["commit"] for s in steps] == [BASE, IDEA, "eeeeeee"]
    assert steps[1]["delta"] == pytest.approx(0.055) and steps[1]["cleared"] is True
    # kept inside the noise: 0.02 <= 3.182 * 0.009129 * sqrt(1/2 + 1/1) = 0.0356
    assert steps[2]["delta"] == pytest.approx(0.02) and steps[2]["cleared"] is False
    (changed,) = report["not_comparable"]
    assert changed["commit"] == "1234567" and changed["differs"] == ["harness"] and changed["runs_line"] == 10
    assert [f["commit"] for f in report["swapped"]] == ["fffffff"]
    assert os.path.getsize(tmp_path / "progress.png") > 10000
    with open(tmp_path / "progress.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_text(tmp_path):
    write(tmp_path, *night())
    returncode, out, err = cli(tmp_path)
    assert returncode == 0, err
    assert "baseline   1.000000  aaaaaaa  (3 runs)" in out
    assert "best       0.925000  eeeeeee  (1 run)  TOTAL_BATCH_SIZE 2**15" in out
    assert "gain       0.075000  (7.5% below the baseline)" in out
    assert "keep rate  2 of 6 experiments kept (33%); 3 discarded, 1 crashed, 0 undecided; 3 reruns" in out
    assert "NOT COMPARABLE WITH THE BASELINE: 1 run(s)" in out and "runs.jsonl:10  1234567  harness differ" in out
    assert "SWAPPED: 1 run(s)" in out and "runs.jsonl:9  fffffff  812 MB" in out
    kept = out.split("kept commits")[1].splitlines()
    assert any(line.split()[:2] == [IDEA, "0.945000"] and " yes " in line for line in kept)
    assert any(line.split()[:2] == ["eeeeeee", "0.925000"] and " NO " in line for line in kept)
    assert out.rstrip().endswith("wrote progress.png") and (tmp_path / "progress.png").exists()


def test_report_without_run_records_measures_noise_from_repeated_rows(tmp_path):
    rows, _ = night()
    write(tmp_path, rows)
    returncode, out, err = cli(tmp_path, "--json")
    assert returncode == 0, err
    report = json.loads(out)
    assert report["runs_file"] is None and report["not_comparable"] == [] and report["noise"]["dof"] == 3


def test_smoke_knobs_are_named_in_the_report(tmp_path):
    rows, records = baseline_session()
    write(tmp_path, rows, [{**r, "smoke": ["AUTORESEARCH_TIME_BUDGET=20"]} for r in records])
    returncode, out, err = cli(tmp_path)
    assert returncode == 0, err
    assert "smoke-test knobs set in 3 of 3 runs (AUTORESEARCH_TIME_BUDGET=20): val_bpb is not comparable" in out

# ---------------------------------------------------------------------------
# Bad input: one line naming the file and the line, exit status 1
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("results,runs,args,message", [
    (None, None, (), "error: results.tsv: no such file"),
    (HEADER, None, (), "error: results.tsv: only the header, no runs to report yet"),
    ("", None, (), "error: results.tsv:1: the header must be"),
    ("commit,val_bpb,memory_gb,status,description\naaaaaaa,1.0,1.0,keep,baseline\n", None, (),
     "error: results.tsv:1: comma-separated"),
    (HEADER + "aaaaaaa\t1.000000\t11.0\tkeep\n", None, (), "error: results.tsv:2: 4 tab-separated fields, expected 5"),
    (HEADER + "aaaaaaa,1.0,11.0,keep,baseline\n", None, (), "error: results.tsv:2: 1 tab-separated fields, expected 5: "
     "comma-separated?"),
    (HEADER + "aaaaaaa\t1.0\t11.0\tkeep\tx\naaaaaaa\tabc\t11.0\tkeep\tx\n", None, (),
     "error: results.tsv:3: val_bpb 'abc' is not a number"),
    (HEADER + "aaaaaaa\t1.0\t11.0\tkept\tx\n", None, (), "error: results.tsv:2: status 'kept' is not one of"),
    (HEADER + "HEAD\t1.0\t11.0\tkeep\tx\n", None, (), "error: results.tsv:2: commit 'HEAD' is not a short git hash"),
    (HEADER + "aaaaaaa\t0.000000\t0.0\tkeep\tx\n", None, (), "error: results.tsv:2: val_bpb 0 with status keep"),
    (HEADER, None, ("--verdict",), "error: runs.jsonl: no such file"),
])
def test_bad_input_is_one_line_and_exit_status_1(tmp_path, results, runs, args, message):
    if results is not None:
        (tmp_path / "results.tsv").write_text(results)
    if runs is not None:
        (tmp_path / "runs.jsonl").write_text(runs)
    returncode, out, err = cli(tmp_path, *args)
    assert returncode == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(message), err
    assert not (tmp_path / "progress.png").exists()


def test_a_crash_row_is_data_not_an_error(tmp_path):
    write(tmp_path, [row(BASE, 1.0, "keep", "baseline"), row(IDEA, 0.0, "crash", "DEPTH 64")])
    returncode, out, err = cli(tmp_path)
    assert returncode == 0, err
    assert "keep rate  0 of 1 experiments kept (0%); 0 discarded, 1 crashed" in out


def test_the_baseline_is_the_first_commit_with_a_result(tmp_path):
    write(tmp_path, [row(BASE, 0.0, "crash", "baseline"), row(IDEA, 1.0, "keep", "baseline, fixed"),
                     row(OTHER, 0.9, "discard", "idea")])
    returncode, out, err = cli(tmp_path)
    assert returncode == 0, err
    assert "baseline   1.000000  bbbbbbb  (1 run)" in out  # the crashed first commit is no baseline
    assert "keep rate  0 of 1 experiments kept" in out and (tmp_path / "progress.png").exists()

# ---------------------------------------------------------------------------
# A messy night: machine drift, other nights' records, torn lines, runs that left no record
# ---------------------------------------------------------------------------

def at(speed, after=None, **extra):
    """The machine fields of a record: its speed as training began and as it ended, in GFLOP/s."""
    after = speed if after is None else after
    return {"machine_speed": (speed + after) / 2, "machine_speeds": [speed, after], **extra}


def test_a_machine_that_sped_up_is_not_a_gain():
    """The H200 night of the issue: the baseline three times while another program shared the GPU (56 steps a run),
    then a do-nothing commit alone (100 steps): its val_bpb is far lower, and the verdict must name the machine."""
    rows = [row(BASE, v, s, "baseline") for v, s in zip((1.5643, 1.5650, 1.5639), ("rerun", "rerun", "keep"))]
    records = [rec(BASE, v, **at(412.0)) for v in (1.5643, 1.5650, 1.5639)] + [rec(IDEA, 1.4193, **at(701.0))]
    word, lines = verdict(rows, records)
    assert word == "rerun"
    assert lines[1] == (f"the machine ran 41% slower during the last kept commit {BASE}'s runs (3 run(s), 412.0 "
                        f"GFLOP/s) than during HEAD's latest run (701.0): those runs are left out: their val_bpb "
                        f"measure the machine, not the code")
    assert f"`git checkout {BASE}`" in lines[-1] and "log that run as a row of" in lines[-1]
    # the last kept commit measured again on the machine as it is now: the comparison is back, and judges the code
    word, lines = verdict(rows + [row(BASE, 1.4190, "keep", "baseline")], records + [rec(BASE, 1.4190, **at(698.0))],
                          head=IDEA)
    assert word == "discard" and lines[1] == f"last kept {BASE}: val_bpb 1.419000 (mean of 1 run: 1.419000)"


def test_a_change_that_makes_the_code_faster_still_wins():
    """The machine speed is a fixed matmul, not the trainer: faster code at the same machine speed is a real gain."""
    rows, records = baseline_session()
    records = [{**r, **at(100.0)} for r in records]
    word, _ = verdict(rows, records + [rec(IDEA, 0.9, tokens_per_sec=90000, **at(104.0))])
    assert word == "keep"


def test_a_run_during_which_the_machine_changed_is_rerun():
    rows, records = baseline_session()
    records = [{**r, **at(100.0)} for r in records]
    word, lines = verdict(rows, records + [rec(IDEA, 0.9, **at(100.0, 150.0))])
    assert word == "rerun" and lines[0] == (f"HEAD {IDEA}'s latest run: the machine's speed changed by 50% during "
                                            f"training (100.0 GFLOP/s as it began, 150.0 as it ended): another "
                                            f"program, heat or a power mode; its val_bpb measures the machine, not "
                                            f"the code")


def test_baseline_runs_at_another_speed_do_not_count_towards_its_three():
    records = [rec(BASE, 1.0, **at(50.0)), rec(BASE, 1.01, **at(50.0)), rec(BASE, 0.95, **at(100.0))]
    word, lines = verdict([row(BASE, 1.0, "rerun"), row(BASE, 1.01, "rerun")], records)
    assert word == "rerun" and "baseline run 1 of 3" in lines[-1]
    assert lines[1].startswith("the machine ran 50% slower during the baseline's other runs (2 run(s), 50.0 GFLOP/s)")


def test_sigma_comes_from_runs_at_this_machine_speed():
    rows, records = baseline_session()
    records = [{**r, **at(100.0)} for r in records] + [rec(BASE, 1.3, **at(60.0))]  # one slow run: left out
    word, lines = verdict(rows, records + [rec(IDEA, 0.9, **at(100.0))])
    assert word == "keep" and lines[-2].startswith("sigma 0.010000 (dof 2)") and "machine speed 100.0" in lines[-2]


@pytest.mark.parametrize("value", ["NaN", "-Infinity", "Infinity", "null"])
def test_a_non_finite_val_bpb_fails_and_poisons_nothing(tmp_path, value):
    rows, records = baseline_session()
    lines = [json.dumps(r) for r in records] + [json.dumps(rec(IDEA, 0.0)).replace('"val_bpb": 0.0', f'"val_bpb": {value}')]
    write(tmp_path, rows)
    (tmp_path / "runs.jsonl").write_text("\n".join(lines) + "\n")
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 0, err
    assert out.splitlines()[:2] == ["discard", f"HEAD {IDEA}'s latest run ended with status fail: val_bpb "
                                               f"{None if value == 'null' else float(value)} (not a finite number)"]
    # the next idea is judged with the baseline's sigma, not NaN
    (tmp_path / "runs.jsonl").write_text("\n".join(lines + [json.dumps(rec(OTHER, 0.9))]) + "\n")
    returncode, out, err = cli(tmp_path, "--verdict")
    assert out.splitlines()[0] == "keep" and "sigma 0.010000 (dof 2)" in out


def test_a_torn_line_is_skipped_with_one_warning(tmp_path):
    """A killed writer leaves half a record; the next record is glued onto it. Only that line is lost."""
    rows, records = baseline_session()
    torn = json.dumps(rec(BASE, 1.0))[:40]
    text = (json.dumps(records[0]) + "\n" + torn + json.dumps(rec(BASE, 1.005)) + "\n" + "[1, 2]\n"
            + json.dumps({"commit": BASE, "status": "ok"}) + "\n" + json.dumps(records[1]) + "\n"
            + json.dumps(records[2]) + "\n" + json.dumps(rec(IDEA, 0.9)) + "\n")
    write(tmp_path, rows)
    (tmp_path / "runs.jsonl").write_text(text)
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 0
    assert err.splitlines() == [
        "warning: runs.jsonl:2: not a JSON object (a torn or edited line?): skipped",
        "warning: runs.jsonl:3: not a JSON object (a torn or edited line?): skipped",
        "warning: runs.jsonl:4: no time, dirty, trainer, trainer_sha, harness, backend, chip, smoke field: not a "
        "record written by a trainer: skipped"]
    assert out.splitlines()[0] == "keep" and "last kept aaaaaaa: val_bpb 1.000000 (mean of 3 runs" in out
    returncode, out, err = cli(tmp_path)  # the report reads the rest too
    assert returncode == 0 and "baseline   1.000000  aaaaaaa  (3 runs)" in out


def git_repo(folder):
    """A git repository with one commit on branch autoresearch/one; returns a git(*args) helper."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
           "GIT_COMMITTER_EMAIL": "a@b"}
    git = lambda *args: subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True,
                                       text=True).stdout.strip()
    git("init", "-q", "-b", "autoresearch/one")
    git("commit", "-q", "--allow-empty", "-m", "baseline")
    return git


def test_a_night_is_its_own_branch(tmp_path):
    """A second night from the same commit starts from nothing: the first night's baseline runs, a manual run and a
    test's runs (no branch) are not its runs."""
    git = git_repo(tmp_path)
    head = git("rev-parse", "--short=7", "HEAD")
    old = [rec(head, v, branch="autoresearch/one") for v in BASELINE]
    stray = [rec(head, 0.5, branch="main"), rec(head, 0.5)]
    git("checkout", "-q", "-b", "autoresearch/two")
    write(tmp_path, [], old + stray + [rec(head, 1.0, branch="autoresearch/two")])
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 0, err
    assert out.splitlines()[:2] == ["rerun", f"baseline {head}: val_bpb 1.000000 (mean of 1 run: 1.000000)"]
    assert "sigma unknown" in out
    # the report of the first night, asked for by name, still has its three runs
    write(tmp_path, [row(head, v, s, "baseline") for v, s in zip(BASELINE, ("rerun", "rerun", "keep"))],
          old + stray + [rec(head, 1.0, branch="autoresearch/two")])
    returncode, out, err = cli(tmp_path, "--json", "--branch", "autoresearch/one")
    assert returncode == 0, err
    assert json.loads(out)["records"] == 3


def test_runs_on_a_detached_head_at_a_commit_of_the_branch_count(tmp_path):
    git = git_repo(tmp_path)
    base = git("rev-parse", "--short=7", "HEAD")
    git("commit", "-q", "--allow-empty", "-m", "idea")
    idea = git("rev-parse", "--short=7", "HEAD")
    rows = [row(base, v, s, "baseline") for v, s in zip(BASELINE, ("rerun", "rerun", "keep"))]
    records = ([rec(base, v, branch="autoresearch/one", **at(50.0)) for v in BASELINE]
               + [rec(idea, 0.9, branch="autoresearch/one", **at(100.0))]
               + [rec(base, v, branch=None, **at(100.0)) for v in (1.0, 1.01, 0.99)]  # base measured again
               + [rec("1234567", 2.0, branch=None, **at(100.0))])  # detached elsewhere: not this night's
    write(tmp_path, rows, records)
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 0, err
    assert out.splitlines()[0] == "keep" and f"last kept {base}: val_bpb 1.000000 (mean of 3 runs" in out
    git("checkout", "-q", base)  # program.md's `git checkout <kept>`: the verdict waits for the branch
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 1 and err.startswith("error: HEAD is detached")
    git("checkout", "-q", "autoresearch/one")  # and `git checkout autoresearch/<tag>`
    assert cli(tmp_path, "--verdict")[1].splitlines()[0] == "keep"


def test_every_verdict_is_stored_and_the_report_shows_keeps_as_decided(tmp_path):
    rows, records = baseline_session()
    write(tmp_path, rows, records + [rec(IDEA, 0.94)])
    assert cli(tmp_path, "--verdict")[1].splitlines()[0] == "keep"
    (stored,) = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert stored["word"] == "keep" and stored["commit"] == IDEA and stored["run"] == records[-1].get("id")
    assert stored["gain"] == pytest.approx(0.06) and stored["bar"] == pytest.approx(4.303 * 0.01 * (4 / 3) ** 0.5)
    # later in the night, reruns of other code show a larger sigma: the keep is shown as it was decided, and
    # today's judgement separately
    rows += [row(IDEA, 0.94, "keep", "idea")]
    noisy = [rec(OTHER, 1.05, trainer_sha="c0ffee00"), rec(OTHER, 0.85, trainer_sha="c0ffee00")]
    write(tmp_path, rows + [row(OTHER, 1.05, "rerun"), row(OTHER, 0.85, "discard")], records + [rec(IDEA, 0.94)]
          + noisy)
    returncode, out, err = cli(tmp_path, "--json")
    step = json.loads(out)["kept_steps"][1]
    assert step["cleared"] is True and step["bar"] == pytest.approx(stored["bar"]) and step["decided"]
    assert step["today"]["cleared"] is False
    returncode, out, err = cli(tmp_path)
    assert "WITH TODAY'S SIGMA" in out and f"  {IDEA}  gain 0.060000 <= bar" in out


def test_advice_never_rewinds_past_the_start_of_the_branch():
    word, lines = verdict([], [rec(BASE, status="crash", error="SyntaxError: invalid syntax")])
    assert word == "discard" and "git reset" not in "\n".join(lines) and "HEAD~" not in "\n".join(lines)
    word, lines = verdict([], [rec(BASE, 1.0, swap_mb=900.0)])
    assert word == "discard" and "git reset" not in "\n".join(lines)
    rows, records = baseline_session()
    word, lines = verdict(rows, records + [rec(IDEA, status="fail", error="loss nan at step 3")])
    assert lines[-1].endswith(f"`git reset --hard {BASE}`")


def test_a_run_that_died_before_its_record_is_named(tmp_path):
    """A syntax error in the trainer ends it before record.py runs: run.log, written after the newest record, has
    the traceback and no summary. The verdict says so instead of describing the older runs."""
    rows, records = baseline_session()
    write(tmp_path, rows, records + [rec(IDEA, 0.9)])
    old = os.path.getmtime(tmp_path / "runs.jsonl") - 60
    os.utime(tmp_path / "runs.jsonl", (old, old))
    (tmp_path / "run.log").write_text('  File "train_mlx.py", line 3\n    x = (\nSyntaxError: \'(\' was never closed\n')
    returncode, out, err = cli(tmp_path, "--verdict")
    assert returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "discard" and lines[1] == (
        f"HEAD {IDEA}'s latest run left no record: it died before the trainer started its record (a syntax or "
        f"import error, a killed process); run.log ends with: SyntaxError: '(' was never closed")
    assert lines[2].startswith("next: read the end of run.log") and f"`git reset --hard {BASE}`" in lines[2]
    # a run that did leave its record (written after the log) is judged as usual
    os.utime(tmp_path / "runs.jsonl")
    assert cli(tmp_path, "--verdict")[1].splitlines()[0] == "keep"


def test_data_of_another_cache_is_never_compared():
    rows, records = baseline_session()
    records = [{**r, "data": "d1d1d1d1"} for r in records]
    with pytest.raises(SystemExit) as e:
        verdict(rows, records + [rec(IDEA, 0.5, data="e2e2e2e2")])
    assert "data e2e2e2e2" in str(e.value) and "the data differs" in str(e.value)


def test_runs_on_two_datasets_are_never_compared(tmp_path):
    """Even with one fingerprint (two caches can hold data that tokenizes alike), the dataset's name decides."""
    rows, records = baseline_session()
    records = [{**r, "data": "d1d1d1d1", "dataset": "climbmix"} for r in records]
    with pytest.raises(SystemExit) as e:
        verdict(rows, records + [rec(IDEA, 0.5, data="d1d1d1d1", dataset="tinystories")])
    assert "dataset tinystories" in str(e.value) and "dataset climbmix" in str(e.value)
    assert "the dataset differs: run with AUTORESEARCH_DATASET=climbmix" in str(e.value)
    rows.append(row(IDEA, 0.5, "discard"))
    write(tmp_path, rows, records + [rec(IDEA, 0.5, data="d1d1d1d1", dataset="tinystories")])
    returncode, out, err = cli(tmp_path, "--json")
    assert returncode == 0, err
    assert json.loads(out)["not_comparable"][0]["differs"] == ["dataset"]


def test_a_fixed_work_run_is_never_compared_with_a_timed_one(tmp_path):
    """AUTORESEARCH_STEPS=N trains exactly N steps on a schedule of its own: its val_bpb is on another scale than a
    timed run's, and than a run of another N. The verdict stops with an error; the report names the mode."""
    rows, records = baseline_session()
    fixed = lambda n: {"mode": f"steps {n}", "fixed_steps": n}
    with pytest.raises(SystemExit) as e:
        verdict(rows, records + [rec(IDEA, 0.5, **fixed(200))])
    assert "fixed work of 200 steps" in str(e.value) and "environment variables" in str(e.value)
    fixed_rows = [{**r, **fixed(200)} for r in records]
    with pytest.raises(SystemExit) as e:
        verdict(rows, fixed_rows + [rec(IDEA, 0.5, **fixed(100))])
    assert "fixed work of 100 steps" in str(e.value)
    assert verdict(rows, fixed_rows + [rec(IDEA, 0.5, **fixed(200))])[0] == "keep"  # the same N: compared
    write(tmp_path, rows + [row(IDEA, 0.5, "keep")], records + [rec(IDEA, 0.5, **fixed(200))])
    returncode, out, err = cli(tmp_path, "--json")
    assert returncode == 0, err
    (changed,) = json.loads(out)["not_comparable"]
    assert changed["commit"] == IDEA and changed["differs"] == ["mode"] and "fixed work of 200 steps" in changed["setup"]


def test_a_fixed_work_run_does_not_care_how_fast_the_machine_was(tmp_path):
    """Fixed work trains the same steps on the same schedule at any speed: a machine that slowed down during the
    run, or ran slower for the baseline, changes its time and not its val_bpb. The verdict judges the code, and the
    report marks no drift."""
    fixed = {"mode": "steps 200", "fixed_steps": 200}
    rows, records = baseline_session()
    records = [{**r, **fixed, **at(100.0)} for r in records]
    word, lines = verdict(rows, records + [rec(IDEA, 0.5, **fixed, **at(100.0, 150.0))])
    assert word == "keep", lines
    word, lines = verdict(rows, records + [rec(IDEA, 0.5, **fixed, **at(40.0))])
    assert word == "keep" and not any("machine ran" in line for line in lines), lines
    write(tmp_path, rows + [row(IDEA, 0.5, "keep")], records + [rec(IDEA, 0.5, **fixed, **at(40.0, 60.0))])
    returncode, out, err = cli(tmp_path, "--json")
    assert returncode == 0, err
    assert json.loads(out)["drifted"] == []


def test_the_report_marks_drifted_runs(tmp_path):
    rows, records = night()
    records = [{**r, **at(100.0)} for r in records]
    records[3] = {**records[3], **at(70.0)}  # the idea's first run: the machine was 30% slower
    write(tmp_path, rows, records)
    returncode, out, err = cli(tmp_path)
    assert returncode == 0, err
    assert "MACHINE DRIFT: 1 run(s)" in out and f"runs.jsonl:4  {IDEA}  30% slower (70.0 vs 100.0 GFLOP/s)" in out


def test_the_reports_sigma_leaves_out_drifted_runs(tmp_path):
    """A CPU night: the baseline ran once more while other programs loaded the machine (80% slower, val_bpb 0.3
    higher). Its spread is the machine's, not the code's: the report's sigma, like the verdict's, leaves it out."""
    rows, records = night()
    records = [{**r, **at(100.0)} for r in records]
    write(tmp_path, rows + [row(BASE, 1.3, "rerun", "baseline")], records + [rec(BASE, 1.3, **at(20.0))])
    report = json.loads(cli(tmp_path, "--json")[1])
    assert report["drifted"][0]["speed"] == 20.0
    clean = analysis.noise([BASELINE, [0.950, 0.940]])
    assert report["noise"]["sigma"] == pytest.approx(clean["sigma"]) and report["noise"]["runs"] == clean["runs"]
    # and the baseline's val_bpb is the mean of its runs at the usual speed
    assert report["baseline"]["val_bpb"] == pytest.approx(sum(BASELINE) / 3) and report["baseline"]["runs"] == 3


def test_a_plot_that_cannot_be_written_still_prints_the_report(tmp_path):
    write(tmp_path, *night())
    (tmp_path / "progress.png").mkdir()  # savefig cannot write a file there
    returncode, out, err = cli(tmp_path)
    assert returncode == 0 and "baseline   1.000000  aaaaaaa  (3 runs)" in out
    assert err.startswith("warning: could not draw progress.png: ")
    assert out.rstrip().endswith("could not draw progress.png (see the warning above)")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`uv run analysis.py | head -1`: head exits after one line, and the rest of a long report meets a closed pipe."""
    rows, records = baseline_session()
    rows += [row(f"{i:07x}", 0.5, "discard") for i in range(2000)]  # runs of another harness: a line each
    write(tmp_path, rows, records + [rec(f"{i:07x}", 0.5, harness="22222222") for i in range(2000)])
    result = subprocess.run(f"{sys.executable} {ANALYSIS} --json | head -1", shell=True, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout == "{\n" and result.stderr == ""
