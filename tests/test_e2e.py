"""From download to summary: prepare.py against a local HTTP server (the prepared_cache fixture), then both
trainers for a few seconds with the smoke-test knobs, read the way program.md tells the agent to read them."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from backends import memory, record
from prepare import UNTIMED_STEPS
from conftest import MLX_ON_CPU, ROOT, SMOKE_ENV, after_line, edited_copy, model_size, need, run_script

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "backend", "chip", "startup_seconds", "eval_seconds", "harness",
                "dataset", "data", "machine_speed", "mode"]
RECORD_KEYS = {"id", "time", "commit", "branch", "dirty", "trainer", "trainer_sha", "harness", "backend", "chip",
               "smoke", "fixed_steps", "status", "tokens_per_sec", "swap_mb", "swapped", "eval_rows", "eval_distinct_rows", "warnings",
               "machine_speeds", "loadavg", *SUMMARY_KEYS}
FRAMEWORK = {"train.py": "torch", "train_mlx.py": "mlx"}  # what each trainer imports


def grep(pattern, path):
    """The agent's own tool: `grep "^val_bpb:" run.log`."""
    return subprocess.run(["grep", pattern, path], capture_output=True, text=True).stdout


def summary(log_path):
    """The block after the `---` line, as (key, value) pairs in order: `key:` padded to 18 columns, then the value;
    `warning` may come more than once. It ends at the first other line (on Linux, triton's bindings print leak
    reports as the interpreter exits)."""
    pairs = []
    for line in open(log_path).read().split("\n---\n")[-1].splitlines():
        m = re.match(r"([a-zA-Z_]+:) +(\S.*)$", line)
        if not m or line.index(m.group(2)) != 18:
            break
        pairs.append((m.group(1)[:-1], m.group(2)))
    return pairs


def run_records(log_path):
    """The runs.jsonl records a trainer wrote in the folder it ran in."""
    with open(os.path.join(os.path.dirname(log_path), "runs.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def untrained_bpb(prepared_cache):
    """val_bpb of the CPU tier's model straight from init: a trained run must beat it."""
    torch = need("torch")
    import prepare
    import train
    old = prepare.EVAL_TOKENS
    prepare.EVAL_TOKENS = int(SMOKE_ENV["AUTORESEARCH_EVAL_TOKENS"])
    try:
        tokenizer = prepare.Tokenizer.from_directory()
        torch.manual_seed(42)
        model = train.GPT(train.build_model_config(train.DEPTH, tokenizer.get_vocab_size()))
        model.init_weights(dtype=torch.float32)
        return train.evaluate(model, tokenizer, 1)
    finally:
        prepare.EVAL_TOKENS = old


def check_summary(log_path, backend, untrained):
    pairs = summary(log_path)
    keys = [key for key, _ in pairs]
    # the original's keys in its order, then ours, then the warnings
    assert keys[:len(SUMMARY_KEYS)] == SUMMARY_KEYS and set(keys[len(SUMMARY_KEYS):]) == {"warning"}, keys
    values = dict(pairs[:len(SUMMARY_KEYS)])
    warnings = [value for key, value in pairs if key == "warning"]
    assert grep("^---$", log_path).strip() == "---"
    val_bpb = float(grep("^val_bpb:", log_path).split()[1])
    assert math.isfinite(val_bpb) and 0 < val_bpb < untrained, (val_bpb, untrained)
    assert int(values["num_steps"]) >= UNTIMED_STEPS  # the untimed steps always run: the budget starts after them
    assert float(values["training_seconds"]) >= float(SMOKE_ENV["AUTORESEARCH_TIME_BUDGET"])
    assert float(values["peak_vram_mb"]) > 0
    assert values["backend"] == backend
    assert values["mode"] == f"time {SMOKE_ENV['AUTORESEARCH_TIME_BUDGET']}s"
    assert any(w.startswith("smoke test") and "not comparable" in w for w in warnings)  # never a real result
    assert values["harness"] == record.harness_fingerprint()
    assert values["dataset"] == "climbmix"  # the session cache's, downloaded from the test server
    for key in ("total_seconds", "startup_seconds", "eval_seconds", "mfu_percent", "total_tokens_M", "num_params_M"):
        assert float(values[key]) >= 0, key
    # every step trains on TOTAL_BATCH_SIZE tokens (the CPU tier's 2048, the GPU tier's where MLX's CUDA build runs):
    # a short run must not print 0.0
    tier = re.search(r"\| tier: (\w+)", open(log_path).read()).group(1)
    total_batch_size = memory.TIER_DEFAULTS[memory._tier_key({"backend": backend, "tier": tier})][2]
    assert float(values["total_tokens_M"]) == pytest.approx(int(values["num_steps"]) * total_batch_size / 1e6, abs=5e-4)

    # the run's record: one line in runs.jsonl, complete, holding what the summary printed
    (rec,) = run_records(log_path)
    assert RECORD_KEYS <= set(rec), RECORD_KEYS - set(rec)
    assert rec["status"] == "ok" and rec["backend"] == backend and rec["warnings"] == warnings
    for key, value in values.items():
        assert rec[key] == (value if isinstance(rec[key], str) else float(value)), key
    assert rec["trainer"] == ("train_mlx.py" if backend == "mlx" else "train.py")
    assert rec["trainer_sha"] == record.fingerprint([rec["trainer"]], ROOT)
    assert rec["smoke"] == [f"{k}={v}" for k, v in SMOKE_ENV.items()] and rec["fixed_steps"] == 0
    assert rec["tokens_per_sec"] > 0 and rec["swapped"] is (rec["swap_mb"] is not None and rec["swap_mb"] >= record.SWAP_WARN_MB)


def test_train_py_on_cpu_end_to_end(torch_run, untrained_bpb):
    returncode, log_path, log = torch_run
    assert returncode == 0, log[-3000:]
    check_summary(log_path, "cpu", untrained_bpb)
    assert log.startswith("backend: cpu | chip: ")  # the summary's key, spelled the same way
    assert re.search(r"\rstep 00011 \(\d+\.\d%\) \| loss: [\d.]+ \| lrm: [\d.]+ \| dt: \d+ms \| tok/sec: [\d,]+ \| "
                     r"mfu: [\d.]+% \| epoch: \d+ \| remaining: \d+s", log)


def test_train_py_hands_over_to_train_mlx_end_to_end(mlx_run, untrained_bpb):
    returncode, log_path, log = mlx_run
    assert returncode == 0, log[-3000:]
    assert log.startswith("backend: mlx -> handing over to train_mlx.py")
    assert log.splitlines()[1].startswith("backend: mlx (")  # train_mlx.py's own first line
    check_summary(log_path, "mlx", untrained_bpb)


def test_train_mlx_cpu_tier_peaks_below_300_mb(mlx_run):
    # The CPU tier's step (depth 2, one 2048-token row, float32) peaked at 505 MB with autodiff through the float32
    # loss chain, relu^2 and unfused attention; train_mlx.py's VJPs and recomputed attention bring it to ~226 MB.
    # mx.get_peak_memory() counts MLX's own buffers: the same code gives the same figure on any machine.
    _, log_path, log = mlx_run
    tier = re.search(r"\| tier: (\w+)", log).group(1)
    if tier != "cpu":  # MLX's CUDA build trains the GPU tier's model: another bound
        pytest.skip(f"MLX ran the {tier} tier here, not the CPU tier this bound is for")
    assert float(dict(summary(log_path))["peak_vram_mb"]) <= 300


@pytest.mark.parametrize("script,edits", [
    ("train.py", []),
    ("train_mlx.py", [("COMPILE = True", "COMPILE = False")]),  # no compile: the crash comes within two steps
])
@pytest.mark.slow
def test_nan_loss_prints_fail_and_exits_1(prepared_cache, tmp_path, script, edits):
    need(FRAMEWORK[script])
    path = edited_copy(tmp_path, script, ("EMBEDDING_LR = 0.6", "EMBEDDING_LR = float('nan')"), *edits)
    returncode, _, log = run_script(path, str(tmp_path), env={**SMOKE_ENV, "AUTORESEARCH_BACKEND": "cpu"})
    assert returncode == 1, log[-3000:]
    fail_lines = [line for line in log.splitlines() if line.startswith("FAIL")]
    assert len(fail_lines) == 1 and re.fullmatch(r"FAIL: loss nan at step \d+", fail_lines[0]), log[-3000:]
    assert "val_bpb" not in log
    (rec,) = run_records(os.path.join(tmp_path, "run.log"))
    assert rec["status"] == "fail" and rec["error"] == fail_lines[0].removeprefix("FAIL: ")
    assert rec["trainer"] == script and rec["step"] == int(fail_lines[0].split()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "train_mlx.py"])
def test_missing_dataset_is_a_one_line_error(tmp_path, script):
    need(FRAMEWORK[script])
    returncode, _, log = run_script(os.path.join(ROOT, script), str(tmp_path),
                                    env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "empty"), "AUTORESEARCH_BACKEND": "cpu"})
    assert returncode != 0
    assert "Traceback" not in log
    error_lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "uv run prepare.py" in error_lines[0], log


def test_invalid_backend_is_a_one_line_error(tmp_path):
    returncode, _, log = run_script(os.path.join(ROOT, "train.py"), str(tmp_path), env={"AUTORESEARCH_BACKEND": "tpu"})
    assert returncode != 0
    assert log.strip().count("\n") == 0 and "mlx, mps, cuda, cpu" in log, log


# ---------------------------------------------------------------------------
# Gradient accumulation, through each trainer's own step code
# ---------------------------------------------------------------------------

PERTURB_AFTER_INIT = {  # noise on every weight: from the exact init, the zero output projections leave half the
    # network without a gradient and the lambdas with rounding noise for one (see test_parity.perturb)
    "train.py": "for p in model.parameters(): p.data.add_(0.02 * torch.randn_like(p))",
    "train_mlx.py": "model.update(tree_map(lambda p: p + 0.02 * mx.random.normal(p.shape, dtype=p.dtype), model.parameters()))",
}
DUMP_AFTER_FIRST_STEP = {  # written where the loop reads the step's loss, so right after the first optimizer step
    "train.py": [
        "import numpy as np",
        "names = {p: n for n, p in model.named_parameters()}",
        "arrays = {**dict(model.named_parameters()), **{f'optimizer.{names[p]}.{k}': v for p, s in optimizer.state.items()"
        " for k, v in s.items() if torch.is_tensor(v)}}",
        "np.savez('first_step.npz', **{n: t.detach().float().cpu().numpy() for n, t in arrays.items()})",
        "sys.exit(0)",
    ],
    "train_mlx.py": [
        "import numpy as np",
        "arrays = {**dict(tree_flatten(model.parameters())), **{f'optimizer.{n}': a for n, a in tree_flatten(optimizer.state)}}",
        "np.savez('first_step.npz', **{n: np.array(a.astype(mx.float32)) for n, a in arrays.items()})",
        "sys.exit(0)",
    ],
}


def first_step(tmp_path, script, rows, micro_batches, seq_len=128):
    """Parameters and optimizer state after the first optimizer step of a 1-layer model (its weights perturbed)
    whose steps take `micro_batches` micro-batches of `rows` rows each. The dataloader packs rows one after another,
    so every split of the same number of rows trains on the same tokens."""
    edits = [
        *model_size(script, 1, rows, micro_batches, seq_len),
        after_line(script, "model.init_weights(", PERTURB_AFTER_INIT[script]),
        after_line(script, "train_loss_f = ", "; ".join(DUMP_AFTER_FIRST_STEP[script])),
    ]
    if script == "train_mlx.py":  # float32 on MLX's CPU, also on a Mac with a GPU
        edits.append(MLX_ON_CPU)
    folder = tmp_path / f"{rows}x{micro_batches}"
    folder.mkdir()
    path = edited_copy(folder, script, *edits)
    returncode, _, log = run_script(path, str(folder), env={"AUTORESEARCH_BACKEND": "cpu"})
    assert returncode == 0, log[-3000:]
    assert f"Gradient accumulation steps: {micro_batches}" in log
    return dict(np.load(folder / "first_step.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "train_mlx.py"])
def test_k_micro_batches_step_like_one_batch_of_k_times_the_rows(prepared_cache, tmp_path, script):
    need(FRAMEWORK[script])
    with ThreadPoolExecutor(2) as pool:  # two processes at once: most of each run is start-up
        one_batch, accumulated = pool.map(lambda split: first_step(tmp_path, script, *split), [(4, 1), (2, 2)])
    assert one_batch.keys() == accumulated.keys() and any(name.startswith("optimizer.") for name in one_batch)
    for name in sorted(one_batch, key=lambda name: not name.startswith("optimizer.")):  # the gradients first
        got, expected = accumulated[name], one_batch[name]
        if name.startswith("optimizer."):
            # The moments hold the gradient the step was computed from (a gradient twice too large doubles them)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)
        else:
            # Adam's first step is lr * g / (|g| + 1e-10), about lr * sign(g): an entry whose gradient is down at
            # rounding level may step differently after the other summation order. One entry in 10,000 may.
            mismatched = ~np.isclose(got, expected, rtol=1e-4, atol=1e-6)
            assert mismatched.mean() <= 1e-4, (name, mismatched.sum(), np.abs(got - expected).max())


@pytest.mark.slow
def test_train_mlx_compiles_its_step_and_traces_it_once(prepared_cache, tmp_path):
    """The training step's two functions run their Python code only while mx.compile traces them: once for the
    whole run, not once per step (a retrace per step costs a compilation every step, and no compile at all costs
    MLX's fusion). Counted by a side effect put into each, over 5 fixed-work steps of 2 micro-batches."""
    need("mlx")
    script = "train_mlx.py"
    path = edited_copy(tmp_path, script, *model_size(script, 1, 2, 2, 128), MLX_ON_CPU,
                       after_line(script, "COMPILE = ", "TRACES = []"),
                       after_line(script, "def grad_step(", "TRACES.append('grad_step')", 4),
                       after_line(script, "def optimizer_step(", "TRACES.append('optimizer_step')", 4),
                       after_line(script, "print()  # newline after", "print('traces:', TRACES); sys.exit(0)"))
    returncode, _, log = run_script(path, str(tmp_path), env={"AUTORESEARCH_STEPS": "5"})
    assert returncode == 0, log[-3000:]
    assert "Gradient accumulation steps: 2" in log and "\rstep 00004 (80.0%)" in log
    assert "traces: ['grad_step', 'optimizer_step']" in log, log[-2000:]

# ---------------------------------------------------------------------------
# A night on a loaded machine: the machine's speed, not the code, must not decide
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_baseline_run_under_load_then_a_do_nothing_commit_alone_is_not_kept(prepared_cache, tmp_path):
    """The issue's night: the baseline three times while other programs load every core, then a commit that changes
    nothing but a comment, run alone. In a time-budgeted run the quiet machine makes more steps; the verdict must
    name the machine instead of keeping the commit. ~2 minutes on 2 cores."""
    need("torch")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in record.FIXED_FILES + ("train.py", ".gitignore"):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy2
        copy(os.path.join(ROOT, name), repo / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                       if copy is shutil.copytree else {}))
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a",
           "GIT_COMMITTER_EMAIL": "a@b"}
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                                       text=True).stdout.strip()
    git("init", "-q", "-b", "autoresearch/loaded")
    git("add", ".")
    git("commit", "-q", "-m", "baseline")
    baseline = git("rev-parse", "--short=7", "HEAD")
    results = repo / "results.tsv"
    results.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
    verdict = lambda: subprocess.run([sys.executable, str(repo / "analysis.py"), "--verdict"], cwd=repo,
                                     capture_output=True, text=True, timeout=120)
    run_env = {**SMOKE_ENV, "AUTORESEARCH_BACKEND": "cpu"}

    def start(log):  # program.md's run command, all output to a log (beside the repository: .gitignore has run.log)
        with open(tmp_path / log, "w") as out:
            return subprocess.Popen([sys.executable, str(repo / "train.py")], cwd=repo, stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **run_env})

    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    try:  # the three baseline runs at once: they load the machine too, and take a minute instead of three
        runs = [start(f"run{i}.log") for i in range(3)]
        assert [proc.wait(timeout=900) for proc in runs] == [0, 0, 0], (tmp_path / "run0.log").read_text()[-3000:]
    finally:
        for proc in load:
            proc.kill()
            proc.wait()
    loaded = run_records(str(repo / "train.py"))
    with open(results, "a") as f:  # the baseline's rows as program.md shows them
        for r, status in zip(loaded, ("rerun", "rerun", "keep")):
            f.write(f"{baseline}\t{r['val_bpb']}\t0.1\t{status}\tbaseline\n")

    with open(repo / "train.py", "a") as f:
        f.write("# a comment: the code is the same\n")
    git("commit", "-q", "-am", "a comment")
    assert start("run.log").wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-3000:]
    *_, quiet = run_records(str(repo / "train.py"))
    result = verdict()
    assert result.returncode == 0, result.stderr
    word, *lines = result.stdout.splitlines()
    assert quiet["machine_speed"] > 1.5 * max(r["machine_speed"] for r in loaded), (loaded, quiet)  # the load shows
    # rerun, naming the machine: it was slower during the baseline's runs (or, on a busy machine, changed during
    # this one)
    assert word == "rerun" and any(f"slower during the last kept commit {baseline}'s runs" in line or
                                   "the machine's speed changed" in line for line in lines), result.stdout

# ---------------------------------------------------------------------------
# Fixed-work mode: the same steps on any machine, whatever else the machine is doing
# ---------------------------------------------------------------------------

FIXED_WORK_STEPS = 3  # progress 0, 1/3, 2/3: the warmdown's first steps too


def fixed_work_run(script, folder, load=0):
    """A run of `script` with AUTORESEARCH_STEPS, while `load` busy loops compete for the CPU: its summary."""
    folder.mkdir()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        returncode, log_path, log = run_script(os.path.join(ROOT, script), str(folder), env={
            "AUTORESEARCH_STEPS": str(FIXED_WORK_STEPS), "AUTORESEARCH_EVAL_TOKENS": SMOKE_ENV["AUTORESEARCH_EVAL_TOKENS"],
            "AUTORESEARCH_BACKEND": "cpu"})
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert returncode == 0, log[-3000:]
    assert f"Fixed work: {FIXED_WORK_STEPS} steps" in log
    (rec,) = run_records(log_path)
    return dict(summary(log_path)), rec


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "train_mlx.py"])
def test_fixed_work_runs_n_steps_and_repeats_its_val_bpb_on_a_loaded_machine(prepared_cache, tmp_path, script):
    """AUTORESEARCH_STEPS=N: exactly N optimizer steps on step / N, so the same code gives the same val_bpb on a
    quiet CPU and on one where another program takes a core each (the clock decides nothing). The summary and the
    record say which mode ran; it is no smoke test (only the evaluation knob is named)."""
    need(FRAMEWORK[script])
    if script == "train_mlx.py":
        mx = need("mlx.core")
        if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()):
            pytest.skip("MLX trains on its GPU here: the determinism promised is the CPU's")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # Linux, macOS
    quiet, quiet_rec = fixed_work_run(script, tmp_path / "quiet")
    loaded, loaded_rec = fixed_work_run(script, tmp_path / "loaded", load=cores)
    assert quiet["val_bpb"] == loaded["val_bpb"], (quiet["val_bpb"], loaded["val_bpb"])
    for values, rec in ((quiet, quiet_rec), (loaded, loaded_rec)):
        assert values["num_steps"] == str(FIXED_WORK_STEPS) and values["mode"] == f"steps {FIXED_WORK_STEPS}"
        assert (rec["mode"], rec["fixed_steps"]) == (values["mode"], FIXED_WORK_STEPS)
        assert rec["smoke"] == [f"AUTORESEARCH_EVAL_TOKENS={SMOKE_ENV['AUTORESEARCH_EVAL_TOKENS']}"]
