"""Shared test setup. No test may touch the real cache: point it at a throwaway folder before anything imports prepare."""
import atexit
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
