"""
The presets of `prepare.py --dataset`: each one's real file layout (names, folders, columns) served in miniature by
the local HTTP server, downloaded through the verified downloader, converted into shards with a pinned validation
shard, tokenized in a cache folder of its own; switching between two prepared datasets; the dataset in every run's
summary; and the one-line errors for a dataset that is unknown or not prepared.
"""

import json
import os
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import ROOT, SMOKE_ENV, need, run_script
from corpus import make_docs, run_prepare, run_python, serve_shards, use_cache

# Each preset's files as the hub serves them (the layout in prepare.DATASETS' comment), for files 0 and 1
URLS = {
    "tinystories": ["/datasets/karpathy/tinystories-gpt4-clean/resolve/main/tinystories_gpt4_clean.parquet"],
    "fineweb-edu": [f"/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/00{i}_00000.parquet"
                    for i in range(2)],
    "fineweb-edu-high": [f"/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/00{i}_00000.parquet"
                         for i in range(2)],
    "cosmopedia-v2": [f"/datasets/HuggingFaceTB/smollm-corpus/resolve/main/cosmopedia-v2/train-0000{i}-of-00104.parquet"
                      for i in range(2)],
}
EVAL_TOKENS = 2048  # the validation shard: the first documents of file 0, EVAL_TOKENS * 5 characters' worth


def columns(name, docs, rng):
    """A file's columns as the dataset card lists them, the documents in `text`."""
    n = len(docs)
    if name.startswith("fineweb-edu"):
        score = [round(rng.uniform(2.5, 5.0), 3) for _ in range(n)]  # fineweb-edu holds only int_score >= 3
        return {"text": docs, "id": [f"<urn:uuid:{i}>" for i in range(n)], "score": score,
                "int_score": [round(s) for s in score]}
    if name == "cosmopedia-v2":
        return {"prompt": ["Write a textbook chapter"] * n, "text": docs, "token_length": [len(d) // 4 for d in docs],
                "audience": ["college_students"] * n, "format": ["textbook"] * n, "seed_data": ["stanford"] * n}
    return {"text": docs}


def serve_folder(folder, name, n_files=2, docs_per_file=700, seed=0):
    """Write the preset's first files (each with row groups of 250 rows) into folder; returns {file: documents}."""
    rng = random.Random(seed)
    files = {}
    for url in URLS[name][:n_files]:
        docs = make_docs(rng, docs_per_file, long_every=40)
        table = pa.table(columns(name, docs, rng))
        pq.write_table(table, os.path.join(folder, url.rsplit("/", 1)[1]), row_group_size=250)
        files[url.rsplit("/", 1)[1]] = table
    return files


def kept(name, table):
    texts = table.column("text").to_pylist()
    if name != "fineweb-edu-high":
        return texts
    return [t for t, s in zip(texts, table.column("score").to_pylist()) if s >= 3.0]


def shard_texts(path):
    return pq.read_table(path).column("text").to_pylist()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local server standing in for huggingface.co (HF_ENDPOINT), its files in tmp_path/hub."""
    folder = tmp_path / "hub"
    folder.mkdir()
    with serve_shards(folder) as server:
        monkeypatch.setattr(prepare, "HF_ENDPOINT", server.url)
        monkeypatch.setattr(prepare, "EVAL_TOKENS", EVAL_TOKENS)
        server.folder_path = folder
        yield server


@pytest.mark.parametrize("name", list(URLS))
def test_each_preset_downloads_and_converts_into_shards(hub, tmp_path, monkeypatch, name):
    files = serve_folder(hub.folder_path, name)
    use_cache(monkeypatch, tmp_path / "cache", dataset=name)
    assert prepare.DATA_DIR == str(tmp_path / "cache" / "datasets" / name / "data")  # a folder of its own
    prepare.download_data(2, download_workers=2, backoff=0.01)
    n = len(URLS[name])  # tinystories is one file
    assert sorted(hub.requests) == sorted(URLS[name])  # the hub's real paths, each file once
    data = tmp_path / "cache" / "datasets" / name / "data"
    assert sorted(os.listdir(data)) == [prepare.shard_name(i) for i in range(n)] + [prepare.VAL_FILENAME]
    first, *rest = [kept(name, table) for table in files.values()]
    val = shard_texts(data / prepare.VAL_FILENAME)
    # the validation shard: the first documents of file 0, just enough text; training shard 0 the rest of it
    assert val == first[:len(val)] and sum(map(len, val)) >= EVAL_TOKENS * 5 > sum(map(len, val[:-1]))
    assert shard_texts(data / "shard_00000.parquet") == first[len(val):]
    for i, docs in enumerate(rest, 1):
        assert shard_texts(data / prepare.shard_name(i)) == docs
    for shard in os.listdir(data):
        assert prepare.check_shard(str(data / shard), full=True) is None
        pf = pq.ParquetFile(data / shard)
        assert pf.schema_arrow.names == ["text"]  # the other columns are left behind
        assert max(pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)) <= prepare.ROW_GROUP_DOCS
    if name == "fineweb-edu-high":  # educational score 3 or more only, a real subset of fineweb-edu
        table = next(iter(files.values()))
        assert 0 < len(first) < table.num_rows and min(table.column("int_score").to_pylist()) >= 3


def test_a_corrupt_converted_shard_is_fetched_again(hub, tmp_path, monkeypatch, capsys):
    serve_folder(hub.folder_path, "fineweb-edu-high")
    use_cache(monkeypatch, tmp_path / "cache", dataset="fineweb-edu-high")
    prepare.download_data(2, download_workers=2, backoff=0.01)
    data = tmp_path / "cache" / "datasets" / "fineweb-edu-high" / "data"
    before = {f: (data / f).read_bytes() for f in os.listdir(data)}
    shard_0 = os.stat(data / "shard_00000.parquet").st_mtime_ns
    (data / "shard_00001.parquet").write_bytes(before["shard_00001.parquet"][:1000])  # truncated
    capsys.readouterr()
    hub.requests.clear()
    prepare.download_data(2, download_workers=2, backoff=0.01)
    assert "Data: shard_00001.parquet on disk is corrupt" in capsys.readouterr().out
    assert hub.requests == [URLS["fineweb-edu-high"][1]]  # that file alone
    (data / prepare.VAL_FILENAME).unlink()  # file 0 again: the validation shard back, shard 0 left as it was
    hub.requests.clear()
    hub.faults[URLS["fineweb-edu"][0].rsplit("/", 1)[1]] = ["500", "truncate"]  # and the usual retries
    prepare.download_data(2, download_workers=2, backoff=0.01)
    assert hub.requests == [URLS["fineweb-edu-high"][0]] * 3
    assert {f: (data / f).read_bytes() for f in os.listdir(data)} == before
    assert os.stat(data / "shard_00000.parquet").st_mtime_ns == shard_0  # unchanged: its token ids stay valid


def test_a_file_without_the_columns_is_refused(hub, tmp_path, monkeypatch, capsys):
    """A mirror serving other files: fineweb-edu-high needs the `score` column to keep anything."""
    serve_folder(hub.folder_path, "tinystories", n_files=1)
    os.rename(hub.folder_path / "tinystories_gpt4_clean.parquet", hub.folder_path / "000_00000.parquet")
    use_cache(monkeypatch, tmp_path / "cache", dataset="fineweb-edu-high")
    with pytest.raises(prepare.PrepareError) as info:
        prepare.download_data(1, download_workers=1, backoff=0.001)
    assert "no numeric column `score`" in capsys.readouterr().out
    assert str(info.value).startswith("error: 1 of 1 files could not be downloaded from ")

# ---------------------------------------------------------------------------
# Two datasets in one cache, through the command line
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_datasets(prepared_cache, tmp_path_factory):
    """A copy of the session's climbmix cache to which `prepare.py --dataset tinystories` added TinyStories
    (served in miniature); (cache path, prepare's output, climbmix's files before)."""
    cache = tmp_path_factory.mktemp("two") / "cache"
    shutil.copytree(prepared_cache, cache)
    before = climbmix_files(cache)
    hub = tmp_path_factory.mktemp("tinyhub")
    serve_folder(hub, "tinystories", n_files=1, docs_per_file=2500)
    with serve_shards(hub) as server:
        result = run_prepare("--dataset", "tinystories", env={"AUTORESEARCH_CACHE_DIR": str(cache),
                                                             "HF_ENDPOINT": server.url, **SMOKE_ENV})
        assert server.requests == URLS["tinystories"]
    assert result.returncode == 0, result.stdout + result.stderr
    return cache, result.stdout, before


def climbmix_files(cache):
    """Every file of climbmix's data, tokenizer and token ids (in the cache root), with its mtime."""
    return {os.path.relpath(os.path.join(root, f), cache): os.stat(os.path.join(root, f)).st_mtime_ns
            for part in ("data", "tokenizer", "tokens") for root, _, files in os.walk(cache / part) for f in files}


def test_a_second_dataset_has_its_own_folder_and_tokenizer(two_datasets):
    cache, out, before = two_datasets
    assert out.startswith(f"Cache directory: {cache}\nDataset: tinystories ")
    assert "Tokenizer: no tokenizer yet; training BPE tokenizer on 1 training shards" in out
    assert out.rstrip().endswith("Done! Ready to train.")
    folder = cache / "datasets" / "tinystories"
    assert sorted(os.listdir(folder)) == ["data", "tokenizer", "tokens"]
    assert sorted(os.listdir(folder / "data")) == ["shard_00000.parquet", prepare.VAL_FILENAME]
    assert climbmix_files(cache) == before  # untouched
    assert json.loads((cache / "dataset.json").read_text()) == {"dataset": "tinystories"}  # runs use it now


FINGERPRINT = "import prepare; print(prepare.DATASET, prepare.data_fingerprint())"


def test_switching_between_prepared_datasets_downloads_nothing(two_datasets, prepared_cache, tmp_path):
    cache, _, _ = two_datasets
    cache = shutil.copytree(cache, tmp_path / "cache")
    env = {"AUTORESEARCH_CACHE_DIR": str(cache), "AUTORESEARCH_DATA_URL": "http://127.0.0.1:9"}  # no server
    climbmix = run_python(FINGERPRINT, env={"AUTORESEARCH_CACHE_DIR": prepared_cache}).stdout.split()
    assert climbmix[0] == "climbmix"
    tiny = run_python(FINGERPRINT, env=env).stdout.split()  # the dataset prepared last
    assert tiny[0] == "tinystories" and tiny[1] != climbmix[1]
    assert run_python(FINGERPRINT, env={**env, "AUTORESEARCH_DATASET": "climbmix"}).stdout.split() == climbmix
    result = run_prepare("--dataset", "climbmix", "--num-shards", "3", env=env)  # back: all verified, nothing fetched
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Data: all 4 shards ready" in result.stdout and "Tokenizer: up to date" in result.stdout
    assert run_python(FINGERPRINT, env=env).stdout.split() == climbmix
    result = run_prepare("--dataset", "tinystories", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Data: all 2 shards ready" in result.stdout
    assert run_python(FINGERPRINT, env=env).stdout.split() == tiny


def test_list_shows_sizes_and_what_is_prepared(two_datasets):
    cache, _, _ = two_datasets
    result = run_prepare("--list", env={"AUTORESEARCH_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line and not line.startswith(" ")}
    assert set(prepare.DATASETS) | {"source"} <= set(rows)
    for name, d in prepare.DATASETS.items():
        assert rows[name].split()[1:5] == [str(d.files), str(d.shards), str(d.file_mb), "MB"]
    assert "yes: 3 training shards" in rows["climbmix"] and "(runs use it)" not in rows["climbmix"]
    assert "yes: 1 training shards" in rows["tinystories"] and rows["tinystories"].endswith("(runs use it)")
    assert rows["fineweb-edu"].endswith("  no") and rows["source"].endswith("  no")
    assert "--source PATH" in result.stdout

# ---------------------------------------------------------------------------
# Choosing at train time
# ---------------------------------------------------------------------------

def one_line_error(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    return line


def test_a_dataset_never_prepared_names_the_command(tmp_path):
    env = {"AUTORESEARCH_CACHE_DIR": str(tmp_path), "AUTORESEARCH_DATASET": "cosmopedia-v2"}
    line = one_line_error(run_python("import prepare; prepare.Tokenizer.from_directory()", env=env))
    assert line == (f"error: no data in {tmp_path}/datasets/cosmopedia-v2/data: "
                    f"run `uv run prepare.py --dataset cosmopedia-v2` first")


def test_climbmix_where_the_cache_holds_a_source_corpus_is_not_prepared(two_datasets, tmp_path):
    """climbmix and --source share the cache root: asking for the one the root does not hold is a one-line error."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_text("\n\n".join(make_docs(random.Random(3), 2500)))
    env = {"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"), **SMOKE_ENV}
    assert run_prepare("--source", str(src), env=env).returncode == 0
    line = one_line_error(run_python("import prepare; prepare.Tokenizer.from_directory()",
                                     env={**env, "AUTORESEARCH_DATASET": "climbmix"}))
    assert line == (f"error: dataset climbmix is not prepared here ({tmp_path}/cache/data holds the corpus built from "
                    f"--source {src}): run `uv run prepare.py --dataset climbmix`")
    line = one_line_error(run_prepare("--dataset", "climbmix", env=env))
    assert line.startswith(f"error: {tmp_path}/cache/data holds the corpus built from --source {src}")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_an_unknown_dataset_is_one_line_naming_the_choices(tmp_path, how):
    env = {"AUTORESEARCH_CACHE_DIR": str(tmp_path)}
    if how == "env":
        line = one_line_error(run_python("import prepare", env={**env, "AUTORESEARCH_DATASET": "tinystory"}))
        assert line.startswith("error: AUTORESEARCH_DATASET=tinystory: no such dataset; choose one of climbmix, "
                               "tinystories, fineweb-edu, fineweb-edu-high, cosmopedia-v2 or source")
    else:
        line = one_line_error(run_prepare("--dataset", "tinystory", env=env))
        assert line == ("error: --dataset tinystory: no such dataset; choose one of climbmix, tinystories, "
                        "fineweb-edu, fineweb-edu-high, cosmopedia-v2 (or --source PATH for text of "
                        "your own)")


@pytest.mark.slow
def test_a_cpu_run_on_tinystories_names_it_in_the_summary_and_record(two_datasets, tmp_path):
    need("torch")
    cache, _, _ = two_datasets
    returncode, log_path, log = run_script(os.path.join(ROOT, "train.py"), str(tmp_path),
                                           env={**SMOKE_ENV, "AUTORESEARCH_BACKEND": "cpu",
                                                "AUTORESEARCH_CACHE_DIR": str(cache)})
    assert returncode == 0, log[-3000:]
    assert "dataset:          tinystories" in log.splitlines()
    with open(tmp_path / "runs.jsonl") as f:
        (rec,) = [json.loads(line) for line in f]
    expected = run_python(FINGERPRINT, env={"AUTORESEARCH_CACHE_DIR": str(cache)}).stdout.split()
    assert [rec["dataset"], rec["data"]] == expected == ["tinystories", expected[1]]
