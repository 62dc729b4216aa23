"""Shared test setup. No test may touch the real cache: point it at a throwaway folder before anything imports prepare."""
import ast
import atexit
import importlib
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tests/corpus.py
SESSION_CACHE_DIR = tempfile.mkdtemp(prefix="autoresearch-test-cache-")
os.environ["AUTORESEARCH_CACHE_DIR"] = SESSION_CACHE_DIR
atexit.register(shutil.rmtree, SESSION_CACHE_DIR, ignore_errors=True)


EXTRAS = {"mlx": "mlx", "torch": "torch"}  # the `uv sync --extra` that installs each framework


def need(name):
    """Import `name` (e.g. "mlx.core") or skip the test, or the module when called at its top, naming the extra that
    installs the framework: the README's CPU/NVIDIA quick start installs PyTorch alone, a Mac may have MLX alone.
    Only a framework that is not installed skips; one that is installed but fails to import still fails."""
    __tracebackhide__ = True  # the skip's location is the caller's line, so `-rs` names the module or test
    top = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != top:
            raise
        pytest.skip(f"{top} is not installed: uv sync --extra {EXTRAS[top]} (or --extra all)", allow_module_level=True)


def python_env(*front, **env):
    """os.environ plus `env` for a child Python process, with `front` (the repository if none) put ahead of the
    user's own PYTHONPATH. Replacing it would hide what is installed only there: on an NVIDIA box MLX's CUDA build
    and rustbpe may come from `pip install --target DIR` with DIR on PYTHONPATH."""
    kept = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    return {**os.environ, **env, "PYTHONPATH": os.pathsep.join([*(front or (ROOT,)), *kept])}


def hiding(tmp_path, *modules):
    """Environment for a child process in which importing these modules fails as if they were not installed (a
    sitecustomize on PYTHONPATH, so processes it execs, such as train.py's hand-over to train_mlx.py, inherit it)."""
    folder = tmp_path / "hide"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {modules!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    return python_env(str(folder), ROOT)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """A folder of synthetic climbmix-format shards: shard_00000..00002 (training) + shard_06542 (validation)."""
    from corpus import make_corpus  # imported here: corpus imports prepare, which reads AUTORESEARCH_CACHE_DIR
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder)
    return str(folder)


@pytest.fixture(scope="session")
def prepared_cache(synthetic_corpus):
    """The session cache (AUTORESEARCH_CACHE_DIR) prepared by the real CLI: the synthetic shards downloaded from a
    local HTTP server, the tokenizer trained, every shard tokenized. Returns the cache path. Read-only for tests:
    copy it (shutil.copytree keeps mtimes) before changing anything."""
    from corpus import run_prepare, serve_shards
    with serve_shards(synthetic_corpus) as server:
        result = run_prepare("--num-shards", "3", env={"AUTORESEARCH_CACHE_DIR": SESSION_CACHE_DIR,
                                                       "AUTORESEARCH_DATA_URL": server.url})
    if result.returncode != 0:
        pytest.fail(f"prepare.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return SESSION_CACHE_DIR


# ---------------------------------------------------------------------------
# Real training runs (slow: shared by the end-to-end and documentation tests)
# ---------------------------------------------------------------------------

SMOKE_ENV = {"AUTORESEARCH_TIME_BUDGET": "2", "AUTORESEARCH_EVAL_TOKENS": "4096"}  # 11 warmup steps + 2 s, 2 val rows


def run_script(script, cwd, env=None, timeout=1200):
    """Run a training script the way program.md tells the agent to: all output redirected to cwd/run.log."""
    import subprocess
    log_path = os.path.join(cwd, "run.log")
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, script], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                              env=python_env(**(env or {})), timeout=timeout)
    with open(log_path, newline="") as f:  # keep the progress line's \r as written
        return proc.returncode, log_path, f.read()


@pytest.fixture(scope="session")
def torch_run(prepared_cache, tmp_path_factory):
    """`train.py` on the CPU backend for a few seconds: (returncode, run.log path, log text)."""
    need("torch")
    return run_script(os.path.join(ROOT, "train.py"), str(tmp_path_factory.mktemp("torch_run")),
                      env={**SMOKE_ENV, "AUTORESEARCH_BACKEND": "cpu"})


@pytest.fixture(scope="session")
def mlx_run(prepared_cache, tmp_path_factory):
    """`train.py` with AUTORESEARCH_BACKEND=mlx, which hands over to train_mlx.py (MLX's CPU build here)."""
    need("mlx")
    return run_script(os.path.join(ROOT, "train.py"), str(tmp_path_factory.mktemp("mlx_run")),
                      env={**SMOKE_ENV, "AUTORESEARCH_BACKEND": "mlx"})


# ---------------------------------------------------------------------------
# Edited copies of a trainer, as the agent edits it
# ---------------------------------------------------------------------------

def trainer_line(script, start):
    """The line of the trainer `script` whose code starts with `start`, as written (indentation included)."""
    with open(os.path.join(ROOT, script)) as f:
        return next(line for line in f.read().splitlines() if line.strip().startswith(start))


def after_line(script, start, code, deeper=0):
    """An edit that puts `code` on a line of its own after the trainer's line starting with `start`, at its
    indentation (`deeper` spaces more: inside the block that line opens)."""
    anchor = trainer_line(script, start)
    return anchor, anchor + "\n" + " " * (len(anchor) - len(anchor.lstrip()) + deeper) + code


def model_size(script, depth, rows, micro_batches, seq_len=None):
    """Edits that set the model's depth, its micro-batches of `rows` rows, `micro_batches` of them a step, and a
    shorter MAX_SEQ_LEN if given (the evaluation cannot run then: its rows are 2048 tokens)."""
    import prepare
    shorter = f"\nMAX_SEQ_LEN = {seq_len}" if seq_len else ""
    return [(trainer_line(script, "DEPTH = "), f"DEPTH = {depth}{shorter}"),
            (trainer_line(script, "DEVICE_BATCH_SIZE = "), f"DEVICE_BATCH_SIZE = {rows}"),
            (trainer_line(script, "TOTAL_BATCH_SIZE = "),
             f"TOTAL_BATCH_SIZE = {rows * micro_batches * (seq_len or prepare.MAX_SEQ_LEN)}")]


def main_block(script):
    """The `if __name__ == "__main__":` block of a trainer (its path), as syntax: what runs when it trains."""
    with open(script) as f:
        (main,) = [node for node in ast.parse(f.read()).body
                   if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"]
    return main


MLX_ON_CPU = ('BACKEND = "mlx"', 'BACKEND = "mlx"\nmx.set_default_device(mx.cpu)')  # also on a machine with a GPU


def edited_copy(folder, script, *edits):
    """A copy of a training script in folder with lines edited, as the agent edits it: (old, new) pairs."""
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = folder / script
    path.write_text(text)
    return str(path)


def pytest_collection_modifyitems(items):
    """A test that reads the shared trainer runs below is slow whatever else it does: `pytest -m "not slow"`, the
    fast loop, leaves out the two trainer runs (minutes on 2 cores) with every test that needs them."""
    for item in items:
        if {"torch_run", "mlx_run"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


RUN_OUTPUTS = ("run.log", "runs.jsonl", "progress.png", "results.tsv", "verdicts.jsonl")  # what a night writes


def repository_state():
    """The run outputs in the repository root (size and mtime of each), and whether it holds a .venv."""
    paths = {name: os.path.join(ROOT, name) for name in RUN_OUTPUTS}
    files = {name: (os.stat(path).st_size, os.stat(path).st_mtime_ns) for name, path in paths.items()
             if os.path.exists(path)}
    # `uv run` in a checkout without a .venv creates one (empty: the tests' own Python may be another)
    return {**files, **({".venv": "there"} if os.path.exists(os.path.join(ROOT, ".venv")) else {})}


def fail_if_written_since(before, who):
    after = repository_state()
    written = ", ".join(sorted(name for name in after if after[name] != before.get(name)))
    if written:
        pytest.fail(f"{who} wrote {written} into the repository root {ROOT}: run it in tmp_path")


STATE_AT_START = repository_state()  # taken as conftest is imported, so writes during collection count too


@pytest.fixture(scope="session", autouse=True)
def nothing_written_by_the_session():
    """The check below snapshots the root after the session fixtures a test uses (the shared trainer runs) are set
    up, so one of those writing there would pass unseen; this compares the end of the session with its start."""
    yield
    fail_if_written_since(STATE_AT_START, "the test session")


@pytest.fixture(autouse=True)
def nothing_written_into_the_repository():
    """A test that runs a trainer or analysis.py in the repository root would add to the user's own night: its
    runs.jsonl, run.log, progress.png, results.tsv; `uv run` would add a .venv. Runs belong in a tmp folder; this
    fails the test that wrote."""
    before = repository_state()
    yield
    fail_if_written_since(before, "the test")


@pytest.fixture(autouse=True)
def mlx_on_cpu():
    """The numeric tests compare MLX with float64 references and with PyTorch on the CPU. Pin MLX's default device
    to its CPU so a machine with a GPU runs the same comparisons (MLX's CUDA build computes float32 matmuls in TF32,
    about 1e-3 relative). test_devices.py picks the GPU explicitly with mx.stream."""
    try:
        import mlx.core as mx
    except ModuleNotFoundError as e:  # without MLX there is nothing to pin; the tests that need it skip
        if e.name != "mlx":
            raise
        yield
        return
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)
