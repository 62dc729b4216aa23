"""The suite itself: no test assumes the machine it runs on. The README's CPU/NVIDIA quick start installs PyTorch
alone (`uv sync --extra mps`), a Mac may have MLX alone, and an NVIDIA box may find MLX's CUDA build and rustbpe
through PYTHONPATH (`pip install --target`); the suite must collect and run on each, skipping by name what needs a
framework that is not there."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, hiding, python_env, run_script


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
