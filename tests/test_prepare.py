"""
prepare.py's contracts: the fixed constants, the tokenizer, the data loader (row for row the same as the
original algorithm), evaluate_bpb for PyTorch and MLX, --source, reruns, and the one-line errors a trainer
gets when the cache is not ready. The download path is in test_download.py.
"""

import json
import math
import os
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import prepare
from corpus import (CAPPED_WORD, COMMON_WORD, VAL_ONLY_WORD, make_docs, reference_dataloader, run_prepare,
                    run_python, use_cache, write_shard)

UNREACHABLE = {"AUTORESEARCH_DATA_URL": "http://127.0.0.1:9"}  # any download attempt would fail

# ---------------------------------------------------------------------------
# Constants and knobs
# ---------------------------------------------------------------------------

def test_constants_are_the_originals():
    assert prepare.MAX_SEQ_LEN == 2048
    assert prepare.VOCAB_SIZE == 8192
    assert prepare.SPLIT_PATTERN == ("'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+|\\p{N}{1,2}|"
                                     " ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+")
    assert prepare.SPECIAL_TOKENS == ["<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
    assert prepare.BOS_TOKEN == "<|reserved_0|>"
    assert prepare.MAX_SHARD == prepare.VAL_SHARD == 6542
    assert prepare.VAL_FILENAME == "shard_06542.parquet"
    assert prepare.CACHE_DIR == os.environ["AUTORESEARCH_CACHE_DIR"]
    assert prepare.DATA_DIR == os.path.join(prepare.CACHE_DIR, "data")
    assert prepare.TOKENIZER_DIR == os.path.join(prepare.CACHE_DIR, "tokenizer")


SHOW_KNOBS = "import prepare; print(prepare.TIME_BUDGET, prepare.EVAL_TOKENS, prepare.SMOKE_TEST_WARNING, sep='|')"
NO_KNOBS = {"AUTORESEARCH_TIME_BUDGET": "", "AUTORESEARCH_EVAL_TOKENS": ""}


def test_time_budget_and_eval_tokens_default_to_the_fixed_values():
    result = run_python(SHOW_KNOBS, env=NO_KNOBS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["300|5242880|None"]


def test_smoke_knobs_override_and_say_val_bpb_is_not_comparable():
    result = run_python(SHOW_KNOBS, env={"AUTORESEARCH_TIME_BUDGET": "7", "AUTORESEARCH_EVAL_TOKENS": "4096"})
    assert result.returncode == 0, result.stderr
    budget, eval_tokens, warning = result.stdout.strip().split("|")
    assert (budget, eval_tokens) == ("7", "4096")
    assert "AUTORESEARCH_TIME_BUDGET=7" in warning and "AUTORESEARCH_EVAL_TOKENS=4096" in warning
    assert "not comparable" in warning and not warning.lower().startswith("warning")


@pytest.mark.parametrize("value", ["abc", "100", "-5"])
def test_bad_smoke_knob_is_a_one_line_error(value):
    result = run_python(SHOW_KNOBS, env={**NO_KNOBS, "AUTORESEARCH_EVAL_TOKENS": value})  # 100 < MAX_SEQ_LEN
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: AUTORESEARCH_EVAL_TOKENS must be an integer >= 2048, got {value!r}"]


def test_import_loads_neither_torch_nor_mlx():
    result = run_python("import sys, prepare; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(prepared_cache):
    return prepare.Tokenizer.from_directory()


def test_tokenizer_has_8188_learned_tokens_then_the_specials(tokenizer):
    assert tokenizer.get_vocab_size() == 8192
    assert tokenizer.get_bos_token_id() == 8188
    assert [tokenizer.enc.encode_single_token(s) for s in prepare.SPECIAL_TOKENS] == [8188, 8189, 8190, 8191]


def test_encode_decode(tokenizer):
    texts = ["Hello world! Numbers: 123. Unicode: 你好", "café naïve 😀\n\n  tabs\tand 2024", ""]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    bos = tokenizer.get_bos_token_id()
    batch = tokenizer.encode(texts, prepend=bos)
    assert batch == [[bos] + tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(texts[0], prepend=bos) == batch[0]
    with pytest.raises(TypeError):
        tokenizer.encode("x", prepend="<|reserved_0|>")
    with pytest.raises(ValueError):
        tokenizer.encode(b"bytes")


def test_tokenizer_learns_from_training_text_only(tokenizer):
    # frequent training words are single tokens; a word frequent only in the validation shard, or only
    # past the 10,000-character document cap, would be too if the tokenizer had seen that text
    assert len(tokenizer.encode(" " + COMMON_WORD)) == 1
    assert len(tokenizer.encode(" " + VAL_ONLY_WORD)) > 4
    assert len(tokenizer.encode(" " + CAPPED_WORD)) > 4


def test_token_bytes_follow_the_decode_rule(tokenizer):
    token_bytes = prepare.get_token_bytes()
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (8192,)
    expected = [0 if tokenizer.decode([i]) in prepare.SPECIAL_TOKENS else len(tokenizer.decode([i]).encode("utf-8"))
                for i in range(8192)]
    assert token_bytes.tolist() == expected
    assert token_bytes[8188:].tolist() == [0, 0, 0, 0] and token_bytes[:8188].min() >= 1


def test_text_iterator_caps_documents_and_characters(prepared_cache):
    train_paths, _ = prepare.data_shards()
    record = {}
    docs = list(prepare.text_iterator(train_paths, record, max_chars=5000, doc_cap=100))
    assert max(map(len, docs)) == 100
    assert sum(map(len, docs)) >= 5000 > sum(map(len, docs[:-1]))
    assert record["complete"] is False and [s[0] for s in record["shards"]] == ["shard_00000.parquet"]
    record = {}
    docs = list(prepare.text_iterator(train_paths, record))
    assert record["complete"] is True and len(record["shards"]) == 3
    assert len(docs) == sum(pq.ParquetFile(p).metadata.num_rows for p in train_paths)

# ---------------------------------------------------------------------------
# Data loader: the same rows as the reference, fresh numpy batches
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("split,B,T,buffer_size,steps", [
    ("train", 4, 256, 1000, 250),   # the default buffer, across epoch boundaries (long documents get cropped)
    ("train", 3, 100, 50, 700),     # a small buffer: many more refills
    ("train", 2, 2048, 1000, 90),  # full-length rows
    ("val", 2, 2048, 1000, 60),     # the validation shard alone, cycled
])
def test_loader_rows_match_the_reference(tokenizer, split, B, T, buffer_size, steps):
    fast = prepare.make_dataloader(tokenizer, B, T, split, buffer_size=buffer_size)
    reference = reference_dataloader(tokenizer, B, T, split, buffer_size=buffer_size)
    epochs = []
    for step in range(steps):
        x, y, epoch = next(fast)
        x_ref, y_ref, epoch_ref = next(reference)
        assert np.array_equal(x, x_ref) and np.array_equal(y, y_ref), f"batch {step} differs"
        assert epoch == epoch_ref, f"batch {step}: epoch {epoch} != {epoch_ref}"
        epochs.append(epoch)
    assert epochs[-1] > epochs[0]  # crossed at least one epoch boundary


def test_batches_are_fresh_contiguous_int64_rows_starting_with_bos(tokenizer):
    loader = prepare.make_dataloader(tokenizer, 4, 64, "train")
    x, y, epoch = next(loader)
    kept = x.copy(), y.copy()
    for arr in (x, y):
        assert arr.dtype == np.int64 and arr.shape == (4, 64) and arr.flags.c_contiguous
    assert (x[:, 0] == tokenizer.get_bos_token_id()).all()
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert x.max() < 8192 and x.min() >= 0
    x2, y2, _ = next(loader)
    assert np.array_equal(x, kept[0]) and np.array_equal(y, kept[1])  # still valid after the next batch
    assert not np.array_equal(x, x2)


def test_bad_split_is_a_value_error(tokenizer):
    with pytest.raises(ValueError):
        prepare.make_dataloader(tokenizer, 1, 8, "test")

# ---------------------------------------------------------------------------
# One-line errors when the cache is not ready
# ---------------------------------------------------------------------------

@pytest.fixture
def cache_copy(prepared_cache, tmp_path, monkeypatch):
    """A private copy of the prepared cache (mtimes kept), which prepare in this process now uses."""
    copy = tmp_path / "cache"
    shutil.copytree(prepared_cache, copy)
    use_cache(monkeypatch, copy)
    return copy


def load_tokenizer(cache):
    return prepare.Tokenizer.from_directory(os.path.join(cache, "tokenizer"))


def token_cache_files(cache):
    (folder,) = (cache / "tokens").iterdir()
    return folder


def test_no_data_at_all(tmp_path, monkeypatch, tokenizer):
    use_cache(monkeypatch, tmp_path)
    with pytest.raises(prepare.PrepareError, match=r"no data in .*: run `uv run prepare.py` first"):
        prepare.Tokenizer.from_directory(str(tmp_path / "tokenizer"))
    with pytest.raises(prepare.PrepareError, match="no data in"):
        prepare.make_dataloader(tokenizer, 1, 8, "train")


@pytest.mark.parametrize("remove,message", [
    ("data/shard_0000*.parquet", "no training shards in"),
    ("data/shard_06542.parquet", "validation shard shard_06542.parquet missing from"),
    ("tokens/*/shard_00001.offsets.npy", "shard_00001.parquet changed or was never tokenized with this tokenizer"),
    ("tokens/*/manifest.json", "the tokenizer does not match the data"),
])
def test_missing_pieces_name_the_problem(cache_copy, remove, message):
    tokenizer = load_tokenizer(cache_copy)
    for path in cache_copy.glob(remove):
        path.unlink()
    for split in ("train", "val"):
        with pytest.raises(prepare.PrepareError, match=message) as info:
            prepare.make_dataloader(tokenizer, 1, 8, split)
        assert str(info.value).endswith("run `uv run prepare.py`") and "\n" not in str(info.value)


def test_no_tokenizer(cache_copy):
    shutil.rmtree(cache_copy / "tokenizer")
    with pytest.raises(prepare.PrepareError, match="no tokenizer in .*: run `uv run prepare.py`"):
        load_tokenizer(cache_copy)
    with pytest.raises(prepare.PrepareError, match="no tokenizer in"):
        prepare.get_token_bytes()


def test_shard_changed_since_tokenizing(cache_copy):
    tokenizer = load_tokenizer(cache_copy)
    shard = cache_copy / "data" / "shard_00002.parquet"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    with pytest.raises(prepare.PrepareError, match="shard_00002.parquet changed or was never tokenized"):
        prepare.make_dataloader(tokenizer, 1, 8, "train")


def test_tokenizer_that_does_not_match_the_data(cache_copy):
    enc = load_tokenizer(cache_copy).enc
    other = prepare.Tokenizer(tiktoken.Encoding(name="other", pat_str=r"\S+|\s+", mergeable_ranks=enc._mergeable_ranks,
                                                special_tokens=enc._special_tokens))
    with pytest.raises(prepare.PrepareError, match="the tokenizer does not match the data"):
        prepare.make_dataloader(other, 1, 8, "train")


def test_trainer_without_data_exits_with_one_line(tmp_path):
    result = run_python("import prepare\ntok = prepare.Tokenizer.from_directory()\nprint('unreachable')",
                        env={"AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 1 and "unreachable" not in result.stdout
    assert result.stderr.splitlines() == [f"error: no data in {tmp_path}/data: run `uv run prepare.py` first"]


def test_trainer_without_validation_shard_exits_with_one_line(cache_copy):
    (cache_copy / "data" / prepare.VAL_FILENAME).unlink()
    result = run_python("import prepare\nprepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, 64, 'train')")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: validation shard shard_06542.parquet missing from "
                                          f"{cache_copy}/data: run `uv run prepare.py`"]

# ---------------------------------------------------------------------------
# Rerunning prepare: skip what is up to date, retrain what changed
# ---------------------------------------------------------------------------

def snapshot(folder, pattern="*"):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob(pattern) if p.is_file()}


def test_rerun_skips_everything_up_to_date(cache_copy):
    before = snapshot(cache_copy)
    result = run_prepare("--num-shards", "3", env=UNREACHABLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Data: all 4 shards ready" in result.stdout
    assert "Tokenizer: up to date" in result.stdout
    assert "Tokens: all 4 shards already tokenized" in result.stdout
    assert snapshot(cache_copy) == before


def test_changed_training_shard_retrains_tokenizer_and_tokens(cache_copy):
    old_fingerprint = load_tokenizer(cache_copy).fingerprint
    write_shard(cache_copy / "data" / "shard_00001.parquet", make_docs(random.Random(99), 900), 300)
    result = run_prepare("--num-shards", "3", env=UNREACHABLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Tokenizer: training shards changed since the tokenizer was trained (shard_00001.parquet)" in result.stdout
    tokenizer = load_tokenizer(cache_copy)
    assert tokenizer.fingerprint != old_fingerprint
    assert "removing the token cache of an older tokenizer" in result.stdout
    assert token_cache_files(cache_copy).name == tokenizer.fingerprint[:16]  # the old token ids are gone
    record = json.loads((cache_copy / "tokenizer" / "trained_on.json").read_text())
    assert record["shards"] == [prepare.shard_identity(p) for p in prepare.data_shards()[0]]
    x, y, _ = next(prepare.make_dataloader(tokenizer, 2, 128, "train"))
    x_ref, y_ref, _ = next(reference_dataloader(tokenizer, 2, 128, "train"))
    assert np.array_equal(x, x_ref) and np.array_equal(y, y_ref)


def test_changed_validation_shard_retokenizes_without_retraining(cache_copy):
    write_shard(cache_copy / "data" / prepare.VAL_FILENAME, make_docs(random.Random(7), 200), 100)
    result = run_prepare("--num-shards", "3", env=UNREACHABLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Tokenizer: up to date" in result.stdout
    assert "Tokens: tokenizing 1 shards (3 already done)" in result.stdout
    tokenizer = load_tokenizer(cache_copy)
    x, _, _ = next(prepare.make_dataloader(tokenizer, 2, 128, "val"))
    x_ref, _, _ = next(reference_dataloader(tokenizer, 2, 128, "val"))
    assert np.array_equal(x, x_ref)

# ---------------------------------------------------------------------------
# --source: local corpora
# ---------------------------------------------------------------------------

def shard_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def write_source(folder, val_file=True):
    folder.mkdir()
    (folder / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n<|endoftext|>\nthird doc\n\n")
    (folder / "b.jsonl").write_text('{"text": "fourth doc"}\n\n{"text": "", "id": 1}\n{"text": "fifth\\ndoc", "id": 2}\n')
    (folder / "sub").mkdir()
    pq.write_table(pa.table({"text": ["sixth doc", None, "seventh doc"], "n": [1, 2, 3]}), folder / "sub" / "c.parquet")
    (folder / "README.md").write_text("not a corpus file")
    if val_file:
        (folder / "tiny-valid.txt").write_text("val one\n\nval two\n")
        (folder / "val").mkdir()
        (folder / "val" / "more.jsonl").write_text('{"text": "val three"}\n')
    return ["first doc\nline two", "second doc", "third doc", "fourth doc", "fifth\ndoc", "sixth doc", "seventh doc"]


def test_source_reads_txt_jsonl_and_parquet(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache")
    docs = write_source(tmp_path / "src")
    prepare.build_from_source(str(tmp_path / "src"))
    data = tmp_path / "cache" / "data"
    assert sorted(p.name for p in data.glob("*.parquet")) == ["shard_00000.parquet", "shard_06542.parquet"]
    assert shard_texts(data / "shard_00000.parquet") == docs
    assert shard_texts(data / "shard_06542.parquet") == ["val one", "val two", "val three"]
    for path in data.glob("*.parquet"):
        assert prepare.check_shard(str(path), full=True) is None


def test_source_rerun_is_idempotent_and_drops_stale_shards(tmp_path, monkeypatch, capsys):
    use_cache(monkeypatch, tmp_path / "cache")
    docs = write_source(tmp_path / "src")
    monkeypatch.setattr(prepare, "SOURCE_SHARD_CHARS", 25)  # ~2 documents a shard
    monkeypatch.setattr(prepare, "ROW_GROUP_DOCS", 1)
    prepare.build_from_source(str(tmp_path / "src"))
    data = tmp_path / "cache" / "data"
    names = sorted(p.name for p in data.glob("*.parquet"))
    assert names == [f"shard_{i:05d}.parquet" for i in range(3)] + ["shard_06542.parquet"]
    assert sum((shard_texts(data / n) for n in names[:-1]), []) == docs
    assert pq.ParquetFile(data / "shard_00000.parquet").num_row_groups == 2
    before = snapshot(data, "*.parquet")
    prepare.build_from_source(str(tmp_path / "src"))
    assert "(0 written, 4 unchanged)" in capsys.readouterr().out
    assert snapshot(data, "*.parquet") == before  # same bytes: nothing for the tokenizer to retrain on
    (tmp_path / "src" / "sub" / "c.parquet").unlink()
    prepare.build_from_source(str(tmp_path / "src"))
    assert sorted(p.name for p in data.glob("*.parquet")) == names[:2] + names[-1:]


def test_source_without_validation_file_holds_out_the_tail(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache")
    src = tmp_path / "src"
    src.mkdir()
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(200)]
    (src / "all.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare.build_from_source(str(src))
    train = shard_texts(tmp_path / "cache" / "data" / "shard_00000.parquet")
    val = shard_texts(tmp_path / "cache" / "data" / prepare.VAL_FILENAME)
    assert train + val == docs
    val_share = sum(map(len, val)) / sum(map(len, docs))
    assert 0.1 <= val_share < 0.12  # the last ~10% of the text


@pytest.mark.parametrize("setup,message", [
    (lambda src: None, "no such file or folder"),
    (lambda src: src.mkdir() or (src / "notes.md").write_text("x"), "no .parquet, .jsonl or .txt files"),
    (lambda src: src.mkdir() or (src / "a.jsonl").write_text('{"text": "ok"}\n[1, 2]\n'), r"a.jsonl:2: not a JSON object"),
    (lambda src: src.mkdir() or (src / "a.jsonl").write_text('{"body": "x"}\n'), r"a.jsonl:1: not a JSON object with a string field `text`"),
    (lambda src: src.mkdir() or pq.write_table(pa.table({"body": ["x"]}), src / "a.parquet"), "a.parquet: no `text` column"),
    (lambda src: src.mkdir() or (src / "val.txt").write_text("x\n"), "only validation files"),
    (lambda src: src.mkdir() or (src / "one.txt").write_text("just one document\n"), "need at least 2 documents"),
])
def test_bad_source_is_a_one_line_error(tmp_path, monkeypatch, setup, message):
    use_cache(monkeypatch, tmp_path / "cache")
    setup(tmp_path / "src")
    with pytest.raises(prepare.PrepareError, match=message) as info:
        prepare.build_from_source(str(tmp_path / "src"))
    assert "\n" not in str(info.value)


def test_source_refuses_to_overwrite_downloaded_shards(cache_copy, tmp_path):
    write_source(tmp_path / "src")
    with pytest.raises(prepare.PrepareError, match="holds downloaded shards"):
        prepare.build_from_source(str(tmp_path / "src"))
    assert len(list((cache_copy / "data").glob("*.parquet"))) == 4


def test_source_cli_builds_a_working_cache(synthetic_corpus, tmp_path, monkeypatch):
    # the synthetic corpus as .jsonl training files + a validation .txt: prepare must do the rest on its own
    use_cache(monkeypatch, tmp_path / "cache")
    src = tmp_path / "src"
    src.mkdir()
    for name in sorted(os.listdir(synthetic_corpus)):
        docs = shard_texts(os.path.join(synthetic_corpus, name))
        if name == prepare.VAL_FILENAME:  # blank lines separate .txt documents: none inside one
            (src / "held-out_val.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs) + "\n")
        else:
            (src / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = run_prepare("--source", str(src), env=UNREACHABLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Tokenizer: no tokenizer yet; training BPE tokenizer on 1 training shards" in result.stdout
    assert result.stdout.strip().endswith("Done! Ready to train.")
    tokenizer = load_tokenizer(tmp_path / "cache")
    for split in ("train", "val"):
        fast, ref = prepare.make_dataloader(tokenizer, 2, 512, split), reference_dataloader(tokenizer, 2, 512, split)
        for _ in range(5):
            assert np.array_equal(next(fast)[0], next(ref)[0])
    # a plain rerun keeps the --source shards instead of downloading climbmix
    result = run_prepare(env=UNREACHABLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Data: using the shards built from --source {src}" in result.stdout
    assert "Tokenizer: up to date" in result.stdout


def test_help_documents_the_options():
    result = run_prepare("--help", env={"COLUMNS": "1000"})  # no line wrapping inside the phrases
    assert result.returncode == 0
    for option in ("--num-shards", "--download-workers", "--source", "<|endoftext|>", "blank lines", "shard_06542"):
        assert option in result.stdout

# ---------------------------------------------------------------------------
# evaluate_bpb: one metric for PyTorch and MLX
# ---------------------------------------------------------------------------

def loss_table():
    # a per-token "loss" that depends on the target id only: the exact BPB can be computed from the rows alone
    table = (np.arange(8192) % 13 + 1).astype(np.float32) / 4
    table[8188:] = 1e6  # special tokens: must be left out of the sum
    return table


def expected_bpb(tokenizer, num_rows):
    rows = reference_dataloader(tokenizer, 1, prepare.MAX_SEQ_LEN, "val")
    token_bytes = prepare.get_token_bytes()
    nats, nbytes = 0.0, 0
    for _ in range(num_rows):
        _, y, _ = next(rows)
        keep = token_bytes[y] > 0
        nats += loss_table()[y][keep].astype(np.float64).sum()
        nbytes += token_bytes[y].sum()
    return nats / (math.log(2) * nbytes)


@pytest.fixture
def torch_model():
    torch = pytest.importorskip("torch")

    class TableModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.from_numpy(loss_table()))
            self.calls = []

        def forward(self, x, y, reduction="mean"):
            assert reduction == "none" and x.dtype == y.dtype == torch.int64
            assert x.device == self.table.device and not torch.is_grad_enabled()
            self.calls.append(x.shape[0])
            return self.table[y].view(-1)  # flat, like the original's cross_entropy(..., reduction='none')

    return TableModel()


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_bpb_uses_the_same_rows_for_every_batch_size(tokenizer, torch_model, monkeypatch, batch_size):
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 5 * prepare.MAX_SEQ_LEN + 100)  # 5 rows, whatever the batch size
    bpb = prepare.evaluate_bpb(torch_model, tokenizer, batch_size)
    assert sum(torch_model.calls) == 5
    assert bpb == pytest.approx(expected_bpb(tokenizer, 5), rel=1e-12)


def test_bpb_splits_batches_to_bound_logit_memory(tokenizer, torch_model, monkeypatch):
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 20 * prepare.MAX_SEQ_LEN)
    bpb = prepare.evaluate_bpb(torch_model, tokenizer, 20)
    assert torch_model.calls == [16, 4]  # 16 rows x 2048 x 8192 x 4 bytes = 1 GiB of logits at most
    assert bpb == prepare.evaluate_bpb(torch_model, tokenizer, 20)  # deterministic, to the last bit
    assert bpb == pytest.approx(expected_bpb(tokenizer, 20), rel=1e-12)


def document_starts_per_row(tokenizer, num_rows):
    """How many documents begin in each of the first num_rows validation rows (each document starts with BOS)."""
    loader = prepare.make_dataloader(tokenizer, 1, prepare.MAX_SEQ_LEN, "val")
    bos = tokenizer.get_bos_token_id()
    counts = []
    for _ in range(num_rows):
        x, y, _ = next(loader)
        counts.append(int((x == bos).sum() + (y[0, -1] == bos)))
    return counts


@pytest.mark.parametrize("batch_size", [1, 4])
def test_bpb_notes_when_the_evaluation_repeats_validation_text(tokenizer, torch_model, monkeypatch, batch_size):
    """A validation shard smaller than EVAL_TOKENS is read more than once; the summary warns from what this notes:
    the rows filled before the shard's documents ran out (a row past them begins more documents than it has)."""
    val = pq.ParquetFile(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME)).metadata.num_rows
    starts = np.cumsum(document_starts_per_row(tokenizer, 200))
    assert starts[-1] > val  # the small test shard runs out well before 200 rows
    distinct = int(np.argmax(starts > val))  # rows 0..distinct-1 use each document at most once
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 200 * prepare.MAX_SEQ_LEN)
    prepare.evaluate_bpb(torch_model, tokenizer, batch_size)
    assert prepare.last_evaluation == {"rows": 200, "distinct_rows": distinct}
    assert 10 < distinct < 200
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 3 * prepare.MAX_SEQ_LEN)  # well inside the shard
    prepare.evaluate_bpb(torch_model, tokenizer, batch_size)
    assert prepare.last_evaluation == {"rows": 3, "distinct_rows": 3}


def test_bpb_for_an_mlx_model_matches_torch(tokenizer, torch_model, monkeypatch):
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")

    class TableModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = mx.array(loss_table())

        def __call__(self, x, y, reduction="mean"):
            assert reduction == "none" and x.dtype == y.dtype == mx.int32
            return self.table[y]

    monkeypatch.setattr(prepare, "EVAL_TOKENS", 3 * prepare.MAX_SEQ_LEN)
    bpb = prepare.evaluate_bpb(TableModel(), tokenizer, 2)
    assert bpb == prepare.evaluate_bpb(torch_model, tokenizer, 2)
    assert bpb == pytest.approx(expected_bpb(tokenizer, 3), rel=1e-12)


def test_bpb_for_an_mlx_model_never_imports_torch(prepared_cache):
    pytest.importorskip("mlx.core")
    code = """
import sys, mlx.core as mx, mlx.nn as nn, prepare
class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = mx.zeros((1,))
    def __call__(self, x, y, reduction="mean"):
        return mx.full(y.shape, 2.0) + self.w
print(prepare.evaluate_bpb(Uniform(), prepare.Tokenizer.from_directory(), 4), "torch" in sys.modules)
"""
    result = run_python(code, env={"AUTORESEARCH_EVAL_TOKENS": str(2 * prepare.MAX_SEQ_LEN)})
    assert result.returncode == 0, result.stderr
    bpb, torch_loaded = result.stdout.split()
    assert float(bpb) > 0 and torch_loaded == "False"
