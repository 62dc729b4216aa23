"""From download to summary: prepare.py against a local HTTP server (the prepared_cache fixture), then both
trainers for a few seconds with the smoke-test knobs, read the way program.md tells the agent to read them."""
import math
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, SMOKE_ENV, run_script

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "backend", "chip", "startup_seconds", "eval_seconds", "warning"]


def grep(pattern, path):
    """The agent's own tool: `grep "^val_bpb:" run.log`."""
    return subprocess.run(["grep", pattern, path], capture_output=True, text=True).stdout


def summary(log_path):
    """The block after the `---` line, as key -> value, in order: `key:` padded to 18 columns, then the value.
    It ends at the first other line (on Linux, triton's bindings print leak reports as the interpreter exits)."""
    values = {}
    for line in open(log_path).read().split("\n---\n")[-1].splitlines():
        m = re.match(r"([a-zA-Z_]+:) +(\S.*)$", line)
        if not m or line.index(m.group(2)) != 18:
            break
        values[m.group(1)[:-1]] = m.group(2)
    return values


@pytest.fixture(scope="module")
def untrained_bpb(prepared_cache):
    """val_bpb of the CPU tier's model straight from init: a trained run must beat it."""
    import torch
    import prepare
    import train
    old = prepare.EVAL_TOKENS
    prepare.EVAL_TOKENS = int(SMOKE_ENV["AUTORESEARCH_EVAL_TOKENS"])
    try:
        tokenizer = prepare.Tokenizer.from_directory()
        torch.manual_seed(42)
        model = train.GPT(train.build_model_config(train.DEPTH, tokenizer.get_vocab_size()))
        model.init_weights(dtype=torch.float32)
        return prepare.evaluate_bpb(model, tokenizer, 1)
    finally:
        prepare.EVAL_TOKENS = old


def check_summary(log_path, backend, untrained):
    values = summary(log_path)
    assert list(values) == SUMMARY_KEYS, values  # the original's keys in its order, then ours
    assert grep("^---$", log_path).strip() == "---"
    val_bpb = float(grep("^val_bpb:", log_path).split()[1])
    assert math.isfinite(val_bpb) and 0 < val_bpb < untrained, (val_bpb, untrained)
    assert int(values["num_steps"]) > 10  # warmup steps 0-10 are not timed, so a run always makes at least 11
    assert float(values["training_seconds"]) >= float(SMOKE_ENV["AUTORESEARCH_TIME_BUDGET"])
    assert float(values["peak_vram_mb"]) > 0
    assert values["backend"] == backend
    assert "not comparable" in values["warning"]  # the smoke-test knobs never pass for a real result
    for key in ("total_seconds", "startup_seconds", "eval_seconds", "mfu_percent", "total_tokens_M", "num_params_M"):
        assert float(values[key]) >= 0, key


def test_train_py_on_cpu_end_to_end(torch_run, untrained_bpb):
    returncode, log_path, log = torch_run
    assert returncode == 0, log[-3000:]
    check_summary(log_path, "cpu", untrained_bpb)
    assert re.search(r"\rstep 00011 \(\d+\.\d%\) \| loss: [\d.]+ \| lrm: [\d.]+ \| dt: \d+ms \| tok/sec: [\d,]+ \| "
                     r"mfu: [\d.]+% \| epoch: \d+ \| remaining: \d+s", log)


def test_train_py_hands_over_to_train_mlx_end_to_end(mlx_run, untrained_bpb):
    returncode, log_path, log = mlx_run
    assert returncode == 0, log[-3000:]
    assert log.startswith("backend: mlx -> handing over to train_mlx.py")
    check_summary(log_path, "mlx", untrained_bpb)


def edited_copy(tmp_path, script, *edits):
    """A copy of a training script with lines edited, as the agent edits it."""
    text = open(os.path.join(ROOT, script)).read()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / script
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("script,edits", [
    ("train.py", []),
    ("train_mlx.py", [("COMPILE = True", "COMPILE = False")]),  # no compile: the crash comes within two steps
])
def test_nan_loss_prints_fail_and_exits_1(prepared_cache, tmp_path, script, edits):
    path = edited_copy(tmp_path, script, ("EMBEDDING_LR = 0.6", "EMBEDDING_LR = float('nan')"), *edits)
    returncode, _, log = run_script(path, str(tmp_path), env={**SMOKE_ENV, "AUTORESEARCH_BACKEND": "cpu"})
    assert returncode == 1, log[-3000:]
    assert "FAIL" in log.splitlines()
    assert "val_bpb" not in log


@pytest.mark.parametrize("script", ["train.py", "train_mlx.py"])
def test_missing_dataset_is_a_one_line_error(tmp_path, script):
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
