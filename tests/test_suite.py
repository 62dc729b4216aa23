"""The suite itself: no test assumes the machine it runs on. The README's CPU/NVIDIA quick start installs PyTorch
alone (`uv sync --extra torch`), a Mac may have MLX alone, and an NVIDIA box may find MLX's CUDA build and rustbpe
through PYTHONPATH (`pip install --target`); the suite must collect and run on each, skipping by name what needs a
framework that is not there."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import EXTRAS, ROOT, hiding, need, python_env, run_script


@pytest.mark.slow
@pytest.mark.parametrize("framework", sorted(EXTRAS))
def test_the_suite_collects_without_a_framework_and_names_the_extra(tmp_path, framework):
    """Collection only (cheap): no module fails to import, and each module that needs the missing framework is
    skipped with a reason that says what to install."""
    env = hiding(tmp_path, framework)
    hidden = subprocess.run([sys.executable, "-c", f"import {framework}"], env=env, capture_output=True)
    assert hidden.returncode == 1  # the hiding works
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider",
                             "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips, result.stdout[-3000:]  # every module but a few imports one framework or the other
    missing = {framework} | {name for name in EXTRAS if importlib.util.find_spec(name) is None}  # or not here
    reasons = tuple(f"{name} is not installed: uv sync --extra {EXTRAS[name]} (or --extra all)" for name in missing)
    for line in skips:
        assert line.endswith(reasons), line


@pytest.fixture
def pip_target(tmp_path, monkeypatch):
    """A folder on the user's PYTHONPATH holding a module found nowhere else, as `pip install --target DIR` leaves
    MLX's CUDA build and rustbpe on an NVIDIA box."""
    folder = tmp_path / "target"
    folder.mkdir()
    (folder / "only_on_pythonpath.py").write_text("")
    user = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *user]))
    return str(folder)


def test_a_trainer_run_by_the_tests_finds_what_pythonpath_holds(tmp_path, pip_target):
    """run_script (the trainers' runs): the repository and the user's PYTHONPATH are both importable."""
    script = tmp_path / "train.py"
    script.write_text("import only_on_pythonpath, prepare\nprint('ok')\n")
    folder = tmp_path / "run"
    folder.mkdir()
    returncode, _, log = run_script(str(script), str(folder))
    assert (returncode, log) == (0, "ok\n")


def test_python_env_puts_its_folders_first_and_keeps_the_users(tmp_path, pip_target):
    other = str(tmp_path / "scratch-repo")
    assert python_env()["PYTHONPATH"].split(os.pathsep)[:2] == [ROOT, pip_target]
    assert python_env(other, X="1")["PYTHONPATH"].split(os.pathsep)[:2] == [other, pip_target]
    assert python_env(X="1")["X"] == "1" and python_env()["PATH"] == os.environ["PATH"]
    code = "import only_on_pythonpath, prepare"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=python_env()).returncode == 0
    env = hiding(tmp_path, "numpy")  # the hiding keeps the user's PYTHONPATH too, and hides numpy only
    assert subprocess.run([sys.executable, "-c", "import only_on_pythonpath"], cwd=tmp_path, env=env).returncode == 0
    assert subprocess.run([sys.executable, "-c", "import numpy"], cwd=tmp_path, env=env,
                          capture_output=True).returncode == 1


def test_a_session_fixture_that_writes_into_the_repository_fails_the_run(tmp_path):
    """The per-test check snapshots the root after session fixtures (the shared trainer runs) are set up, so one that
    ran in the repository root would go unnoticed; the session-end check catches it. Run on a copy of conftest.py,
    whose repository root is then tmp_path."""
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tests)
    (tests / "test_writer.py").write_text(
        "import os\n"
        "import pytest\n"
        "from conftest import ROOT\n"
        "@pytest.fixture(scope='session')\n"
        "def night():\n"
        "    open(os.path.join(ROOT, 'run.log'), 'w').close()\n"
        "def test_uses_the_night(night):\n"
        "    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                            env=python_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout
    assert f"the test session wrote run.log into the repository root {tmp_path}" in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("alone, hidden", [("mlx", "torch"), ("torch", "mlx")])
def test_the_run_record_tests_pass_with_one_framework(tmp_path, alone, hidden):
    """A Mac may have MLX and no PyTorch, a Linux machine PyTorch and no MLX: test_record's tiny trainers read the
    machine's speed with the framework that is there, so no warning about a missing one lands in the output the
    tests read."""
    need(alone)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_record.py",
                             "-k", "sigterm or leaves_the_environment"], cwd=ROOT, env=hiding(tmp_path, hidden),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout, result.stdout[-3000:]


def collected(*args):
    """The test ids pytest collects from tests/ with these arguments (collection only: cheap)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                             "tests"], cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


@pytest.mark.slow
def test_the_fast_loop_keeps_a_test_of_every_file():
    """`uv run pytest -m "not slow"`, the README's fast loop: the tests marked slow stay out, and every test file
    keeps at least one test of its contracts."""
    everything, fast = collected(), collected("-m", "not slow")
    files = lambda ids: {test_id.split("::")[0] for test_id in ids}
    assert files(fast) == files(everything) == {f"tests/{name}" for name in os.listdir(os.path.join(ROOT, "tests"))
                                                if name.startswith("test_") and name.endswith(".py")}
    assert len(fast) < len(everything)  # the marker is in use
