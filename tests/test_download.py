"""
The download path against a real HTTP server on 127.0.0.1 (tests/corpus.py) with injected faults:
HTTP 500s, connection resets, truncated and garbage bodies, corrupt files already on disk, a permanent
failure, and a run interrupted with Ctrl-C then resumed. Every case ends with all shards verified.
"""

import filecmp
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from corpus import ROOT, ctrl_c_as_in_a_terminal, run_prepare, run_python, serve_shards, use_cache

NAMES = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "shard_06542.parquet"]
MIRROR_PATH = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache")
    return tmp_path / "cache" / "data"


@pytest.fixture
def server(synthetic_corpus):
    with serve_shards(synthetic_corpus) as server:
        yield server


def download(server, **kwargs):
    prepare.download_data(3, download_workers=4, base_url=server.url, backoff=0.01, **kwargs)


def assert_all_verified(data_dir, corpus):
    assert sorted(os.listdir(data_dir)) == NAMES  # no leftovers: no .tmp, nothing extra
    for name in NAMES:
        assert prepare.check_shard(str(data_dir / name), full=True) is None
        assert filecmp.cmp(data_dir / name, os.path.join(corpus, name), shallow=False)


def requests_for(server, name):
    return sum(path.endswith("/" + name) for path in server.requests)


def test_clean_download(server, data_dir, synthetic_corpus, capsys):
    download(server)
    out = capsys.readouterr().out
    assert "Data: downloading 4 shards (0 already verified)" in out
    assert "[4/4]" in out  # progress, one line a shard
    assert out.strip().splitlines()[-1] == f"Data: 4/4 shards ready at {data_dir}"
    assert_all_verified(data_dir, synthetic_corpus)
    download(server)  # a rerun checks what is there and fetches nothing
    assert capsys.readouterr().out.strip() == f"Data: all 4 shards ready at {data_dir}"
    assert len(server.requests) == 4


def test_retries_recover_from_server_faults(server, data_dir, synthetic_corpus, capsys):
    server.faults.update({"shard_00000.parquet": ["500", "500"], "shard_00001.parquet": ["reset"],
                          "shard_00002.parquet": ["truncate"], "shard_06542.parquet": ["garbage", "reset"]})
    download(server)
    out = capsys.readouterr().out
    assert [requests_for(server, n) for n in NAMES] == [3, 2, 2, 3]
    assert "shard_00000.parquet: attempt 2/5 failed (500 Server Error" in out
    assert "shard_06542.parquet: attempt 1/5 failed (unreadable parquet" in out
    assert "shard_00001.parquet: attempt 1/5 failed" in out and "Connection reset by peer" in out
    assert "shard_00002.parquet: attempt 1/5 failed" in out and "IncompleteRead" in out
    assert out.strip().splitlines()[-1] == f"Data: 4/4 shards ready at {data_dir}"
    assert_all_verified(data_dir, synthetic_corpus)


def test_corrupt_and_truncated_shards_on_disk_are_fetched_again(server, data_dir, synthetic_corpus, capsys):
    data_dir.mkdir(parents=True)
    with open(os.path.join(synthetic_corpus, "shard_00001.parquet"), "rb") as f:
        body = f.read()
    (data_dir / "shard_00000.parquet").write_bytes(os.urandom(5000))           # garbage
    (data_dir / "shard_00001.parquet").write_bytes(body[:len(body) // 2])      # truncated
    shutil.copy(os.path.join(synthetic_corpus, "shard_00002.parquet"), data_dir)  # good: kept
    (data_dir / "shard_06542.parquet").write_bytes(b"")                          # empty
    (data_dir / "shard_00000.parquet.tmp").write_bytes(b"partial")               # left by a killed run
    download(server)
    out = capsys.readouterr().out
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"):
        assert f"Data: {name} on disk is corrupt" in out and requests_for(server, name) == 1
    assert requests_for(server, "shard_00002.parquet") == 0
    assert "(1 already verified)" in out
    assert_all_verified(data_dir, synthetic_corpus)


@pytest.mark.parametrize("table,problem", [
    (pa.table({"body": ["x"]}), "no string column `text`"),
    (pa.table({"text": [1, 2]}), "no string column `text`"),
    (pa.table({"text": pa.array([], type=pa.string())}), "no rows"),
])
def test_check_shard_wants_a_text_column_and_rows(tmp_path, table, problem):
    pq.write_table(table, tmp_path / "s.parquet")
    assert prepare.check_shard(str(tmp_path / "s.parquet")) == problem


def offline_hint(failed, total, url, names):
    return (f"error: {failed} of {total} shards could not be downloaded from {url} ({names}): rerun to retry; "
            f"offline, set HF_ENDPOINT to a Hugging Face mirror or AUTORESEARCH_DATA_URL to a folder of shards, or "
            f"build the data from local files with `uv run prepare.py --source PATH`")


def test_every_shard_failing_names_a_few_and_the_ways_to_work_offline(data_dir, tmp_path, capsys):
    with serve_shards(tmp_path / "empty") as server:  # a mirror without the dataset: every shard is a 404
        with pytest.raises(prepare.PrepareError) as info:
            prepare.download_data(5, download_workers=8, base_url=server.url, backoff=0.001)
    assert str(info.value) == offline_hint(6, 6, server.url, "shard_00000.parquet, shard_00001.parquet, "
                                                              "shard_00002.parquet and 3 more")


@pytest.mark.parametrize("url,host", [("http://127.0.0.1:9", "127.0.0.1:9"),  # nothing listens: refused
                                      ("http://nonexistent.invalid/shards", "nonexistent.invalid")])  # never resolves
def test_unreachable_server_is_one_line_at_once(tmp_path, url, host):
    """Offline, or a wrong mirror: the server cannot be reached at all, so retrying with backoff cannot help. One line
    naming the host and the ways to work without it, at once, instead of every worker's retries."""
    t0 = time.time()
    result = run_prepare("--num-shards", "20", env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"),
                                                    "AUTORESEARCH_DATA_URL": url})
    assert time.time() - t0 < 15  # the retries' backoff alone is 2 + 4 + 8 + 16 = 30 s
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: cannot reach {host} (")
    assert line.endswith("): offline, set HF_ENDPOINT to a Hugging Face mirror or AUTORESEARCH_DATA_URL to a folder "
                         "of shards, or build the data from local files with `uv run prepare.py --source PATH`")
    assert "attempt" not in result.stdout and "FAILED" not in result.stdout and "Tokenizer" not in result.stdout


def test_persistent_failure_names_the_shard_then_a_rerun_completes(server, data_dir, synthetic_corpus, capsys):
    server.faults["shard_00001.parquet"] = ["500"] * prepare.DOWNLOAD_ATTEMPTS
    with pytest.raises(prepare.PrepareError) as info:
        download(server)
    assert str(info.value) == offline_hint(1, 4, server.url, "shard_00001.parquet")
    assert "shard_00001.parquet: failed after 5 attempt(s)" in capsys.readouterr().out
    assert requests_for(server, "shard_00001.parquet") == 5
    assert sorted(os.listdir(data_dir)) == [n for n in NAMES if n != "shard_00001.parquet"]
    download(server)  # the server has recovered
    assert_all_verified(data_dir, synthetic_corpus)


def test_missing_shard_fails_at_once_and_the_cli_exits_nonzero(synthetic_corpus, tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache")
    partial = tmp_path / "mirror"
    shutil.copytree(synthetic_corpus, partial)
    (partial / "shard_00002.parquet").unlink()
    with serve_shards(partial) as server:
        result = run_prepare("--num-shards", "3", env={"AUTORESEARCH_DATA_URL": server.url})
        assert requests_for(server, "shard_00002.parquet") == 1  # a 404 is not retried
    assert result.returncode == 1
    assert result.stderr.splitlines() == [offline_hint(1, 4, server.url, "shard_00002.parquet")]  # one line
    assert "Tokenizer" not in result.stdout  # nothing runs on incomplete data
    with serve_shards(synthetic_corpus) as server:  # the mirror is complete again
        download(server)
        assert server.requests == ["/shard_00002.parquet"]
    assert_all_verified(tmp_path / "cache" / "data", synthetic_corpus)


@pytest.mark.slow
def test_two_prepares_at_once_on_one_fresh_cache(server, synthetic_corpus, tmp_path):
    """Two prepare.py started together on one empty cache (two terminals, two agents): both finish, and the cache
    they leave is complete and loads."""
    env = {**os.environ, "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"), "AUTORESEARCH_DATA_URL": server.url}
    server.faults["shard_06542.parquet"] = ["stall", "stall"]  # holds both runs at one point, so they overlap
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "prepare.py", "--num-shards", "3"], cwd=ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT))

    def output():
        return "\n".join(log.read_text() for log in logs)

    deadline = time.time() + 60
    # both have started: one is stalled in the download, the other waits for it (without the lock: stalls too)
    while requests_for(server, "shard_06542.parquet") < 1 or "Cache: waiting" not in output():
        assert time.time() < deadline, output()
        time.sleep(0.05)
    server.release.set()
    assert [proc.wait(timeout=300) for proc in procs] == [0, 0], output()
    outs = [log.read_text() for log in logs]
    assert all("Done! Ready to train." in out for out in outs)
    waited = [i for i, out in enumerate(outs) if "Cache: waiting for another prepare.py" in out]
    assert len(waited) == 1  # the second ran after the first, and says whom it waited for
    assert f"another prepare.py (pid {procs[1 - waited[0]].pid}) to finish" in outs[waited[0]]
    assert_all_verified(tmp_path / "cache" / "data", synthetic_corpus)
    result = run_python("import prepare; t = prepare.Tokenizer.from_directory(); "
                        "next(prepare.make_dataloader(t, 2, 64, 'val')); print(prepare.data_fingerprint())",
                        env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0 and len(result.stdout.strip()) == 8, result.stderr


def test_base_url_overrides():
    show = "import prepare; print(prepare.BASE_URL)"
    hub = "datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    cases = [({}, f"https://huggingface.co/{hub}"),
             ({"HF_ENDPOINT": "https://mirror.example/"}, f"https://mirror.example/{hub}"),
             ({"HF_ENDPOINT": "https://mirror.example", "AUTORESEARCH_DATA_URL": "http://host/shards/"}, "http://host/shards")]
    for env, url in cases:
        result = run_python(show, env={"HF_ENDPOINT": "", "AUTORESEARCH_DATA_URL": "", **env})
        assert result.stdout.strip() == url, result.stderr


@pytest.mark.slow
def test_interrupted_download_resumes(server, synthetic_corpus, tmp_path):
    # through HF_ENDPOINT, as with a hub mirror; the validation shard stalls halfway until we press Ctrl-C
    env = {**os.environ, "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"), "HF_ENDPOINT": server.url,
           "AUTORESEARCH_DATA_URL": ""}
    data_dir = tmp_path / "cache" / "data"
    server.faults["shard_06542.parquet"] = ["stall"]
    proc = subprocess.Popen([sys.executable, "prepare.py", "--num-shards", "3"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    deadline = time.time() + 60
    stalled = str(data_dir / "shard_06542.parquet.*.tmp")  # the temporary file carries the pid
    while not (all((data_dir / n).exists() for n in NAMES[:3]) and glob.glob(stalled)):
        assert proc.poll() is None and time.time() < deadline, "download did not reach the stalled shard"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip() == "interrupted: rerun `uv run prepare.py --num-shards 3` to resume"
    assert not (data_dir / "shard_06542.parquet").exists()
    assert all(path.startswith(MIRROR_PATH) for path in server.requests)

    server.release.set()
    result = run_prepare("--num-shards", "3", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Data: downloading 1 shards (3 already verified)" in result.stdout
    assert [requests_for(server, n) for n in NAMES] == [1, 1, 1, 2]
    assert_all_verified(data_dir, synthetic_corpus)
    assert "Done! Ready to train." in result.stdout
