"""backends/record.py: the summary block both trainers print and the record of every run in runs.jsonl, the swap
watchdog (readings injected through backends' probes), the harness fingerprint, and the record a run leaves when it
fails, crashes or is killed. The trainers' own runs are checked in test_e2e.py."""
import ast
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

import prepare
from backends import device, record
from conftest import ROOT, main_block, need, python_env

HW = {"chip": "Test Chip"}
SWAP_USED_MB = device.swap_used_mb
VALUES = dict(val_bpb=1.2345678, training_seconds=300.04, total_seconds=400.26, peak_vram_mb=1234.56,
              mfu_percent=12.345, total_tokens_M=0.04096, num_steps=20, num_params_M=3.456, depth=2,
              eval_seconds=30.11)
ORIGINAL_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                 "num_steps", "num_params_M", "depth"]  # the original's summary, in its order, after `---`
KEYS = ORIGINAL_KEYS + ["backend", "chip", "startup_seconds", "eval_seconds", "harness", "dataset", "data",
                        "machine_speed", "mode"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder with no smoke knobs, timed, no swap readings, an evaluation that read no text twice
    and no prepared data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "FIXED_STEPS", 0)
    monkeypatch.setattr(prepare, "TRAINING_MODE", "time 300s")
    monkeypatch.setattr(prepare, "SMOKE_KNOBS", [])
    monkeypatch.setattr(prepare, "SMOKE_TEST_WARNING", None)
    monkeypatch.setattr(prepare, "evaluation_rows", lambda: (2560, 2560))
    monkeypatch.setattr(device, "swap_used_mb", lambda: None)
    def unprepared():  # whether another test prepared the session's cache or not
        raise prepare.PrepareError("error: no data")
    monkeypatch.setattr(prepare, "data_fingerprint", unprepared)
    readings = iter([100.0, 90.0, 80.0])  # GFLOP/s: as training begins, as it ends
    monkeypatch.setattr(record, "machine_speed", lambda backend: next(readings))
    return tmp_path


def summary_lines(out):
    block = out.split("---\n", 1)[1].splitlines()
    assert all(len(line) > 18 and line[17] == " " and line[18] != " " for line in block), block  # values at column 18
    return [(line.split(":", 1)[0], line[18:]) for line in block]


def runs(folder):
    with open(os.path.join(folder, "runs.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_summary_prints_the_originals_lines_first_then_ours(in_tmp, capsys):
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.mark_training_start()
    run.summary(**VALUES)
    lines = summary_lines(capsys.readouterr().out)
    assert [key for key, _ in lines] == KEYS
    assert dict(lines) == {
        "val_bpb": "1.234568", "training_seconds": "300.0", "total_seconds": "400.3", "peak_vram_mb": "1234.6",
        "mfu_percent": "12.35", "total_tokens_M": "0.041", "num_steps": "20", "num_params_M": "3.5", "depth": "2",
        "backend": "cpu", "chip": "Test Chip", "startup_seconds": "70.1", "eval_seconds": "30.1",
        "harness": record.harness_fingerprint(), "dataset": prepare.DATASET, "data": "-",  # no data prepared here
        "machine_speed": "95.0", "mode": "time 300s",
    }


def test_the_mode_line_and_the_record_say_a_fixed_work_run_ran(in_tmp, monkeypatch, capsys):
    """AUTORESEARCH_STEPS=200: the summary says so, and the record holds the mode and N (the verdict's
    comparability key); no warning, since a fixed-work run is a real result."""
    monkeypatch.setattr(prepare, "FIXED_STEPS", 200)
    monkeypatch.setattr(prepare, "TRAINING_MODE", "steps 200")
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.summary(**{**VALUES, "num_steps": 200})
    lines = summary_lines(capsys.readouterr().out)
    assert [key for key, _ in lines] == KEYS and dict(lines)["mode"] == "steps 200"
    (rec,) = runs(in_tmp)
    assert (rec["mode"], rec["fixed_steps"], rec["smoke"], rec["warnings"]) == ("steps 200", 200, [], [])


def test_total_tokens_m_shows_a_short_run(in_tmp, capsys):
    """A CPU or smoke run trains on tens of thousands of tokens: the original's .1f printed them as 0.0."""
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.summary(**{**VALUES, "total_tokens_M": 11 * 2048 / 1e6})
    assert dict(summary_lines(capsys.readouterr().out))["total_tokens_M"] == "0.023"


def test_the_record_holds_what_the_summary_printed(in_tmp, capsys):
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.mark_training_start()
    run.mark_training_end()
    run.summary(**VALUES)
    printed = dict(summary_lines(capsys.readouterr().out))
    (rec,) = runs(in_tmp)
    assert rec["status"] == "ok"
    for key in KEYS:
        assert rec[key] == (printed[key] if isinstance(rec[key], str) else None if printed[key] == "-" else
                            float(printed[key])), key
    assert rec["trainer"] == "train.py" and rec["trainer_sha"] == record.fingerprint(["train.py"], ROOT)
    assert re.fullmatch(r"[0-9a-f]{8}", rec["trainer_sha"]) and re.fullmatch(r"[0-9a-f]{8}", rec["harness"])
    assert rec["smoke"] == [] and rec["warnings"] == [] and rec["swap_mb"] is None and rec["swapped"] is False
    assert rec["fixed_steps"] == 0  # timed
    assert rec["eval_rows"] == rec["eval_distinct_rows"] == 2560
    assert rec["tokens_per_sec"] == round(40960 / 20 * (20 - prepare.UNTIMED_STEPS) / 300.0)  # steps 0-10: untimed
    assert rec["time"][:4].isdigit() and rec["total_seconds"] == 400.3
    assert set(rec) >= {"commit", "branch", "dirty", "backend", "chip"} and re.fullmatch(r"[0-9a-f]{12}", rec["id"])
    assert rec["machine_speeds"] == [100.0, 90.0] and rec["machine_speed"] == 95.0
    assert len(rec["loadavg"]) == 2 and all(v >= 0 for v in rec["loadavg"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_val_bpb_that_is_not_finite_is_a_failed_run(in_tmp, capsys, value):
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.mark_training_start()
    with pytest.raises(SystemExit) as exit:
        run.summary(**{**VALUES, "val_bpb": value})
    assert exit.value.code == 1
    out = capsys.readouterr().out
    assert "---" not in out and out.splitlines()[-1] == (f"FAIL: val_bpb {value} after 20 steps (the evaluation's "
                                                         f"loss was not finite)")
    (rec,) = runs(in_tmp)
    assert rec["status"] == "fail" and "val_bpb" not in rec and rec["machine_speeds"] == [100.0, 90.0]


def test_a_record_starts_on_a_fresh_line_after_a_torn_one_and_reaches_the_disk(in_tmp, capsys, monkeypatch):
    (in_tmp / "runs.jsonl").write_text('{"commit": "aaaaaaa", "sta')  # a writer killed mid-line
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.mark_training_start()
    run.summary(**VALUES)
    torn, line = (in_tmp / "runs.jsonl").read_text().split("\n")[:2]
    assert torn == '{"commit": "aaaaaaa", "sta' and json.loads(line)["status"] == "ok" and synced


def test_smoke_knobs_and_evaluation_repeats_are_warnings(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "SMOKE_KNOBS", ["AUTORESEARCH_TIME_BUDGET=5"])
    monkeypatch.setattr(prepare, "SMOKE_TEST_WARNING", "smoke test (AUTORESEARCH_TIME_BUDGET=5): val_bpb is not comparable")
    monkeypatch.setattr(prepare, "evaluation_rows", lambda: (2560, 1488))
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.summary(**VALUES)
    lines = summary_lines(capsys.readouterr().out)
    assert [key for key, _ in lines] == KEYS + ["warning", "warning"]
    smoke, repeats = (value for key, value in lines if key == "warning")
    assert smoke.startswith("smoke test")
    assert "2560 rows" in repeats and "1488" in repeats and "validation" in repeats
    (rec,) = runs(in_tmp)
    assert rec["smoke"] == ["AUTORESEARCH_TIME_BUDGET=5"] and rec["warnings"] == [smoke, repeats]
    assert (rec["eval_rows"], rec["eval_distinct_rows"]) == (2560, 1488)

def test_without_prepared_data_the_record_has_no_evaluation_rows(in_tmp, monkeypatch, capsys):
    def unprepared():
        raise prepare.PrepareError("error: no data")
    monkeypatch.setattr(prepare, "evaluation_rows", unprepared)
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.summary(**VALUES)
    assert "warning" not in [key for key, _ in summary_lines(capsys.readouterr().out)]
    (rec,) = runs(in_tmp)
    assert rec["eval_rows"] is None and rec["eval_distinct_rows"] is None and rec["warnings"] == []

# ---------------------------------------------------------------------------
# Swap watchdog
# ---------------------------------------------------------------------------

def meminfo(total_kb, free_kb):
    return f"MemTotal:       16318256 kB\nSwapCached:            0 kB\nSwapTotal: {total_kb} kB\nSwapFree: {free_kb} kB\n"


def fake_swap(monkeypatch, platform, readings):
    """Replace backends' probes so that successive swap readings return `readings` (MiB used)."""
    readings = iter(readings)
    monkeypatch.setattr(device, "_platform", lambda: platform)
    if platform == "darwin":
        monkeypatch.setattr(device, "_run", lambda *args: f"total = 4096.00M  used = {next(readings):.2f}M  "
                                                            f"free = 1.00M  (encrypted)\n")
    else:
        monkeypatch.setattr(device, "_read_file", lambda path: meminfo(8 * 2**20, 8 * 2**20 - round(next(readings) * 1024)))


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_swap_used_mb_reads_the_platform_probe(monkeypatch, platform):
    fake_swap(monkeypatch, platform, [1034.25])
    assert device.swap_used_mb() == pytest.approx(1034.25)


def test_swap_used_mb_in_gigabytes_and_when_unreadable(monkeypatch):
    monkeypatch.setattr(device, "_platform", lambda: "darwin")
    monkeypatch.setattr(device, "_run", lambda *args: "total = 2.00G  used = 1.50G  free = 0.50G\n")
    assert device.swap_used_mb() == 1536
    monkeypatch.setattr(device, "_run", lambda *args: "")
    assert device.swap_used_mb() is None
    monkeypatch.setattr(device, "_platform", lambda: "linux")
    monkeypatch.setattr(device, "_read_file", lambda path: "")
    assert device.swap_used_mb() is None


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_swap_growth_during_training_is_a_warning_and_flags_the_record(in_tmp, monkeypatch, capsys, platform):
    monkeypatch.setattr(device, "swap_used_mb", SWAP_USED_MB)  # the real reader, of the fake probes below
    fake_swap(monkeypatch, platform, [512.0, 1536.0])
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.mark_training_start()
    run.mark_training_end()
    run.summary(**VALUES)
    lines = summary_lines(capsys.readouterr().out)
    assert lines[-1] == ("warning", "swapped 1024 MB during training: val_bpb is not comparable")
    (rec,) = runs(in_tmp)
    assert rec["swap_mb"] == 1024.0 and rec["swapped"] is True


def test_a_few_mb_of_swap_is_recorded_but_not_a_warning(in_tmp, monkeypatch, capsys):
    readings = iter([100.0, 100.0 + record.SWAP_WARN_MB - 1])
    monkeypatch.setattr(device, "swap_used_mb", lambda: next(readings))
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.mark_training_start()
    run.mark_training_end()
    run.summary(**VALUES)
    assert "warning" not in [key for key, _ in summary_lines(capsys.readouterr().out)]
    (rec,) = runs(in_tmp)
    assert rec["swap_mb"] == record.SWAP_WARN_MB - 1 and rec["swapped"] is False

# ---------------------------------------------------------------------------
# Harness fingerprint
# ---------------------------------------------------------------------------

PRINT_SUMMARY = """
from backends.record import Run
Run("train.py", "cpu", {"chip": "x"}).summary(val_bpb=1.0, training_seconds=1.0, total_seconds=3.0,
    peak_vram_mb=1.0, mfu_percent=1.0, total_tokens_M=1.0, num_steps=12, num_params_M=1.0, depth=1, eval_seconds=1.0)
"""


def harness_line(root):
    result = subprocess.run([sys.executable, "-c", PRINT_SUMMARY], cwd=root, capture_output=True, text=True,
                            env=python_env(root), timeout=120)
    assert result.returncode == 0, result.stderr
    (line,) = [l for l in result.stdout.splitlines() if l.startswith("harness:")]
    return line


def test_the_fixed_files_are_exactly_these():
    """What the agent may not edit, written out: a file dropped from the list would stop counting silently."""
    import analysis
    assert record.FIXED_FILES == ("prepare.py", "analysis.py", "hub.py", "backends", "pyproject.toml", "uv.lock")
    assert analysis.FIXED_FILES == "prepare.py analysis.py hub.py backends pyproject.toml uv.lock"  # restore advice
    assert record.fixed_file_list(record.FIXED_FILES) == sorted(
        ["prepare.py", "analysis.py", "hub.py", "pyproject.toml", "uv.lock"]
        + [f"backends/{f}" for f in os.listdir(os.path.join(ROOT, "backends")) if f.endswith(".py")])


def test_editor_and_os_junk_never_changes_the_fingerprint(tmp_path):
    """In git, only tracked files count (what `git checkout <kept> -- ...` can restore); outside git, everything but
    junk. Both give the same fingerprint for the same files."""
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                                       env={**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b",
                                            "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@b"})
    for name in record.FIXED_FILES:
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy2
        copy(os.path.join(ROOT, name), tmp_path / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                           if copy is shutil.copytree else {}))
    outside_git = record.harness_fingerprint(str(tmp_path))
    junk = [tmp_path / "backends" / name for name in (".DS_Store", "._prepare.py", ".record.py.swp", "record.py~")]
    for path in junk:
        path.write_text("junk")
    assert record.harness_fingerprint(str(tmp_path)) == outside_git
    for path in junk:
        path.unlink()
    git("init", "-q")
    git("add", *record.FIXED_FILES)
    git("commit", "-q", "-m", "x")
    for path in junk + [tmp_path / "backends" / "untracked.py"]:  # in git, tracked files only: git cannot restore
        path.write_text("X = 1\n")                                  # or remove an untracked one
    assert record.harness_fingerprint(str(tmp_path)) == outside_git
    with open(tmp_path / "analysis.py", "a") as f:  # the keep rule is a fixed file
        f.write("MIN_GAIN = 0\n")
    assert record.harness_fingerprint(str(tmp_path)) != outside_git


def test_the_data_fingerprint_names_the_data_not_the_folder(prepared_cache, tmp_path):
    """The same prepared data in another folder (copied, new mtimes) has the same fingerprint; other data another."""
    fingerprint = lambda cache: subprocess.run(
        [sys.executable, "-c", "import prepare; print(prepare.data_fingerprint())"], cwd=tmp_path, text=True,
        capture_output=True, check=True, env=python_env(AUTORESEARCH_CACHE_DIR=cache),
        timeout=120).stdout.strip()
    original = fingerprint(prepared_cache)
    copy = str(tmp_path / "copy")
    shutil.copytree(prepared_cache, copy)  # new mtimes: prepare.py would re-tokenize, but the data is the same
    assert re.fullmatch(r"[0-9a-f]{8}", original) and fingerprint(copy) == original
    (manifest,) = [os.path.join(folder, "manifest.json") for folder, _, names in os.walk(copy)
                   if "manifest.json" in names]
    with open(manifest) as f:
        data = json.load(f)
    next(iter(data["shards"].values()))["num_tokens"] += 1  # one shard's text differs
    with open(manifest, "w") as f:
        json.dump(data, f)
    assert fingerprint(copy) != original


@pytest.mark.slow
def test_editing_a_fixed_file_changes_the_harness_line(tmp_path):
    scratch = tmp_path / "repo"
    scratch.mkdir()
    for name in record.FIXED_FILES + ("train.py",):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy2
        copy(os.path.join(ROOT, name), scratch / name)
    first = harness_line(str(scratch))
    assert first == f"harness:          {record.harness_fingerprint()}"  # the copy is the same harness
    os.utime(scratch / "prepare.py")  # a touch that changes nothing but the mtime
    (scratch / "train.py").write_text("# the agent's file is not part of the harness\n")
    assert harness_line(str(scratch)) == first
    with open(scratch / "prepare.py", "a") as f:
        f.write("# an edit\n")
    edited = harness_line(str(scratch))
    assert edited != first
    (scratch / "backends" / "extra.py").write_text("X = 1\n")  # a new file in backends/ counts too
    assert harness_line(str(scratch)) not in (first, edited)

# ---------------------------------------------------------------------------
# Runs that end without a summary, and the git state (real processes in a scratch repository)
# ---------------------------------------------------------------------------

TRAINER = """
import sys, time
sys.path.insert(0, {root!r})
from backends.record import start_run
run = start_run(__file__, {backend!r}, {{"chip": "x"}})
run.mark_training_start()
print("started", flush=True)
{body}
"""


def trainer_backend():
    """The tiny trainer's backend, whose framework reads the machine's speed as the run starts: MLX where it is
    installed (it imports in a fraction of a second, PyTorch in about two), else PyTorch's CPU (a Linux machine may
    have PyTorch alone; without a framework a warning would land in the output the tests read)."""
    try:
        if importlib.util.find_spec("mlx") is not None:
            return "mlx"
    except ModuleNotFoundError:  # a finder that hides mlx (test_suite's) raises instead of answering None
        pass
    need("torch")
    return "cpu"


def run_trainer(folder, body, git=False, signal_after=None):
    """Write a tiny trainer that starts a run record and then runs `body`; run it in folder."""
    path = os.path.join(folder, "train.py")
    with open(path, "w") as f:
        f.write(TRAINER.format(root=ROOT, backend=trainer_backend(), body=textwrap.dedent(body)))
    proc = subprocess.Popen([sys.executable, path], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if signal_after is not None:
        assert proc.stdout.readline() == "started\n"
        proc.send_signal(signal_after)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out, runs(folder)


def test_an_uncaught_exception_is_recorded_as_a_crash_after_its_traceback(tmp_path):
    returncode, out, (rec,) = run_trainer(tmp_path, "raise RuntimeError('out of memory\\nmore')")
    assert returncode == 1 and "Traceback" in out and "RuntimeError: out of memory" in out
    assert rec["status"] == "crash" and rec["error"] == "RuntimeError: out of memory"
    assert rec["trainer"] == "train.py" and rec["commit"] is None and rec["dirty"] is False  # not a repository


def test_a_second_sigterm_while_the_first_is_recorded_does_not_lose_the_record(tmp_path):
    # `timeout` signals uv's process group and uv passes the signal on: the trainer can get two SIGTERMs. Here the
    # second arrives while the first one's record is being written.
    returncode, out, records = run_trainer(tmp_path, """
        import json, os, signal
        real_dumps, sent = json.dumps, []
        def dumps(*args, **kwargs):
            if not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
            return real_dumps(*args, **kwargs)
        json.dumps = dumps  # the record's line is made by json.dumps
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        """)
    assert returncode == -signal.SIGTERM and out.count("terminated by SIGTERM") == 1, out
    (record,) = records
    assert record["status"] == "crash" and "SIGTERM" in record["error"]


def test_start_run_leaves_the_environment_alone(tmp_path, monkeypatch):
    # the trainers set the compilers' environment themselves, before start_run (the test below)
    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    returncode, out, _ = run_trainer(tmp_path, "import os; print(os.environ.get('MLX_MAX_MB_PER_BUFFER'), "
                                               "os.environ.get('TORCHINDUCTOR_CACHE_DIR'))")
    assert out.split("\n")[1] == "None None"


@pytest.mark.parametrize("trainer", ["train.py", "train_mlx.py"])
def test_the_trainers_set_the_compilers_environment_before_anything_compiles(trainer):
    # the compilers and MLX read these variables once, at the first compilation and MLX's first GPU operation
    assert [ast.unparse(s) for s in main_block(os.path.join(ROOT, trainer)).body[:3]] == [
        "t_start = time.time()", "set_compiler_environment(CACHE_DIR)", "run = start_run(__file__, BACKEND, HW)"]


@pytest.mark.parametrize("trainer", ["train.py", "train_mlx.py"])
def test_the_training_loop_times_the_steps_the_record_counts(trainer):
    # the record's tokens_per_sec divides by the steps the loop timed: both take the rule from prepare.UNTIMED_STEPS
    main = main_block(os.path.join(ROOT, trainer))
    timing = [ast.unparse(n.test) for n in ast.walk(main) if isinstance(n, ast.If)
              and any(ast.unparse(s) == "total_training_time += dt" for s in n.body)]
    assert timing == ["step >= UNTIMED_STEPS"]
    literals = [ast.unparse(n) for n in ast.walk(main) if isinstance(n, (ast.Compare, ast.BinOp))
                and "step" in ast.unparse(n) and any(isinstance(c, ast.Constant) and c.value in (10, 11)
                                                     for c in ast.walk(n))]
    assert literals == []  # no step count of its own beside the constant


def test_tokens_per_sec_follows_the_untimed_steps(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "UNTIMED_STEPS", 5)
    run = record.Run(os.path.join(ROOT, "train.py"), "cpu", HW)
    run.summary(**VALUES)
    (rec,) = runs(in_tmp)
    assert rec["tokens_per_sec"] == round(40960 / 20 * (20 - 5) / 300.0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_from_timeout_and_sighup_from_a_closed_terminal_are_recorded_as_a_crash(tmp_path, signum):
    returncode, out, (rec,) = run_trainer(tmp_path, "time.sleep(60)", signal_after=signum)
    assert returncode == -signum  # killed by the signal, as without the handler
    assert f"terminated by {signum.name}" in out
    assert rec["status"] == "crash" and signum.name in rec["error"]


def test_an_exit_without_a_summary_is_recorded_as_a_crash(tmp_path):
    returncode, out, (rec,) = run_trainer(tmp_path, "sys.exit('error: no data')")
    assert returncode == 1 and rec["status"] == "crash" and rec["error"] == "exited without a summary"


def test_fail_prints_the_step_and_the_loss_and_records_them(tmp_path):
    returncode, out, (rec,) = run_trainer(tmp_path, "run.fail(37, float('nan'))")
    assert returncode == 1
    assert out.splitlines()[-1] == "FAIL: loss nan at step 37"
    assert rec["status"] == "fail" and rec["step"] == 37 and rec["error"] == "loss nan at step 37"


@pytest.mark.slow
def test_the_record_names_the_commit_and_whether_the_tree_was_dirty(tmp_path):
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                                       text=True, env={**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b",
                                                       "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@b"}).stdout
    shutil.copy(os.path.join(ROOT, ".gitignore"), tmp_path)
    run_trainer(tmp_path, "pass")  # writes train.py (and a runs.jsonl, which .gitignore keeps out of git)
    git("init", "-q", "-b", "autoresearch/nov25")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    commit = git("rev-parse", "--short=7", "HEAD").strip()
    *_, clean = run_trainer(tmp_path, "pass")[2]
    assert clean["commit"] == commit and clean["dirty"] is False and "uncommitted" not in clean
    assert clean["branch"] == "autoresearch/nov25"
    git("checkout", "-q", "--detach")
    *_, detached = run_trainer(tmp_path, "pass")[2]
    assert detached["commit"] == commit and detached["branch"] is None
    git("checkout", "-q", "autoresearch/nov25")
    (tmp_path / "helper.py").write_text("X = 1\n")  # a new file an idea imports, not yet added
    *_, dirty = run_trainer(tmp_path, "pass")[2]
    assert dirty["dirty"] is True and dirty["uncommitted"] == ["?? helper.py"]
