"""
prepare.py's contracts: the fixed constants, the tokenizer, the data loader (row for row the same as the
original algorithm), the metric evaluate_bpb, --source, reruns, and the one-line errors a trainer
gets when the cache is not ready. The download path is in test_download.py.
"""

import fcntl
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import prepare
from corpus import (CAPPED_WORD, COMMON_WORD, ROOT, VAL_ONLY_WORD, make_docs, make_multilingual_docs,
                    reference_bpb, reference_dataloader, run_prepare, run_python, use_cache, write_shard)

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


SHOW_STEPS = "import prepare; print(prepare.FIXED_STEPS, prepare.TRAINING_MODE, prepare.SMOKE_KNOBS, sep='|')"


@pytest.mark.parametrize("value,shown", [("", "0|time 300s|[]"), ("0", "0|time 300s|[]"),
                                         ("200", "200|steps 200|[]")])
def test_fixed_work_mode_is_off_by_default_and_no_smoke_test(value, shown):
    """AUTORESEARCH_STEPS=N: exactly N optimizer steps, the schedules on step / N; unset or 0, the timed default.
    A mode of its own (the comparability key holds it), not a smoke-test knob: its val_bpb is a real result."""
    result = run_python(SHOW_STEPS, env={**NO_KNOBS, "AUTORESEARCH_STEPS": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shown


@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "1e3"])
def test_bad_fixed_work_steps_is_a_one_line_error(value):
    result = run_python(SHOW_STEPS, env={**NO_KNOBS, "AUTORESEARCH_STEPS": value})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: AUTORESEARCH_STEPS must be an integer >= 0, got {value!r}"]


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


def decode_rule(enc):
    """The token_bytes of an older prepare.py (and of the original): the UTF-8 length of each token's decoded text,
    3 bytes (U+FFFD) for any token that is not valid UTF-8 on its own."""
    return np.array([0 if enc.decode([i]) in prepare.SPECIAL_TOKENS else len(enc.decode([i]).encode("utf-8"))
                     for i in range(enc.n_vocab)], dtype=np.int32)


def test_token_bytes_are_the_raw_bytes_of_each_token(tokenizer):
    token_bytes = prepare.get_token_bytes()
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (8192,)
    assert token_bytes[:8188].tolist() == [len(tokenizer.enc.decode_single_token_bytes(i)) for i in range(8188)]
    assert token_bytes[8188:].tolist() == [0, 0, 0, 0] and token_bytes[:8188].min() >= 1
    # a lone high byte (here 0xC3, the first byte of é) is one byte of text, not the three of U+FFFD
    high = tokenizer.enc.encode_single_token(bytes([0xC3]))
    assert token_bytes[high] == 1 and decode_rule(tokenizer.enc)[high] == 3
    text = "café naïve Zürich 東京 данные 😀 — 漢字とかな交じり文 Ελληνικά"  # rare characters: split into their bytes
    assert token_bytes[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))


def test_val_bytes_are_the_bytes_of_the_text_on_accented_and_cjk_text(tmp_path, monkeypatch):
    """The metric's denominator on a corpus of accented and Chinese text: every validation byte counted once."""
    src = tmp_path / "src"
    src.mkdir()
    docs = make_multilingual_docs(random.Random(5), 2100)
    val_docs = docs[2000:]
    (src / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:2000]))
    (src / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in val_docs))
    result = run_prepare("--source", str(src), env={**UNREACHABLE, "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stdout + result.stderr
    use_cache(monkeypatch, tmp_path / "cache")
    tokenizer = load_tokenizer(tmp_path / "cache")
    enc = tokenizer.enc
    partial = [i for i in range(8188) if len(enc.decode_single_token_bytes(i)) > 1 and "\ufffd" in enc.decode([i])]
    assert len(partial) >= 10  # merges that end inside a character: the tokens the decode rule got wrong
    token_bytes = prepare.get_token_bytes()
    ((tokens_path, _, _),) = prepare._token_shards(tokenizer, "val")
    val_tokens = np.load(tokens_path)
    assert token_bytes[val_tokens].sum() == sum(len(d.encode("utf-8")) for d in val_docs)


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
    """Every file's mtime, but the lock file's: each run writes its pid there."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob(pattern)
            if p.is_file() and p.name != prepare.LOCK_FILE}


def validation_report(cache, eval_tokens=prepare.EVAL_TOKENS):
    """The lines prepare prints about the validation shard's size, from the token cache's manifest."""
    manifest = json.loads(next((cache / "tokens").glob("*/manifest.json")).read_text())
    n = manifest["shards"][prepare.VAL_FILENAME]["num_tokens"]
    lines = [f"Tokens: validation shard {prepare.VAL_FILENAME}: {n:,} tokens (the evaluation reads {eval_tokens:,})"]
    if n < eval_tokens:
        lines.append(f"warning: the validation shard has fewer tokens than the evaluation reads (EVAL_TOKENS): it will "
                     f"repeat rows, going through the shard about {eval_tokens / n:.1f} times; more validation text "
                     f"avoids it")
    return lines


def test_rerun_skips_everything_up_to_date(cache_copy):
    before = snapshot(cache_copy)
    result = run_prepare("--num-shards", "3", env=UNREACHABLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Data: all 4 shards ready" in result.stdout
    assert "Tokenizer: up to date" in result.stdout
    assert "Tokens: all 4 shards already tokenized" in result.stdout
    report = validation_report(cache_copy)
    assert len(report) == 2  # the synthetic validation shard is small: the warning too
    assert "\n".join(report) in result.stdout
    assert snapshot(cache_copy) == before


def test_no_warning_when_the_validation_shard_is_large_enough(cache_copy):
    result = run_prepare("--num-shards", "3", env={**UNREACHABLE, "AUTORESEARCH_EVAL_TOKENS": "4096"})
    assert result.returncode == 0, result.stdout + result.stderr
    (report,) = validation_report(cache_copy, 4096)
    lines = result.stdout.splitlines()
    assert report in lines and not [line for line in lines if line.startswith("warning")]


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

def test_token_bytes_of_an_older_prepare_are_refused_then_rewritten(cache_copy):
    """A cache prepared before token_bytes counted raw bytes: the trainers refuse it at startup (not after 5 minutes
    of training), and rerunning prepare rewrites the table without retraining the tokenizer or retokenizing."""
    path = cache_copy / "tokenizer" / "token_bytes.npy"
    enc = load_tokenizer(cache_copy).enc
    np.save(path, decode_rule(enc))
    wrong = int((decode_rule(enc) != prepare.token_byte_lengths(enc)).sum())
    assert wrong >= 128  # at least the lone high bytes
    message = (f"error: {path} counts the bytes of {wrong} of 8192 tokens wrongly (made by an older prepare.py): "
               f"run `uv run prepare.py`")
    for load in (prepare.get_token_bytes, lambda: load_tokenizer(cache_copy)):
        with pytest.raises(prepare.PrepareError) as info:
            load()
        assert str(info.value) == message
    result = run_python("import prepare; prepare.Tokenizer.from_directory()")
    assert result.returncode == 1 and result.stderr.splitlines() == [message]

    before = snapshot(cache_copy / "tokens")
    result = run_prepare("--num-shards", "3", env=UNREACHABLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"Tokenizer: up to date at {cache_copy}/tokenizer; rewrote token_bytes.npy, which counts the bytes of "
            f"{wrong} of 8192 tokens wrongly (made by an older prepare.py)") in result.stdout.splitlines()
    assert "Tokens: all 4 shards already tokenized" in result.stdout
    assert snapshot(cache_copy / "tokens") == before
    assert prepare.get_token_bytes().tolist() == prepare.token_byte_lengths(enc).tolist()


def corrupt(path, how):
    body = path.read_bytes()
    path.write_bytes({"truncated": body[:len(body) // 2], "random bytes": random.Random(0).randbytes(len(body)),
                      "empty": b""}[how])


@pytest.mark.parametrize("name", ["tokenizer.pkl", "token_bytes.npy"])
@pytest.mark.parametrize("how", ["truncated", "random bytes", "empty"])
def test_corrupt_tokenizer_file_is_one_line_naming_it(cache_copy, name, how):
    """A tokenizer file damaged on disk (a full disk, a killed copy): the trainers stop with one line naming the file
    and what to run, not an unpickling or numpy traceback."""
    path = cache_copy / "tokenizer" / name
    corrupt(path, how)
    for load in (prepare.get_token_bytes, lambda: load_tokenizer(cache_copy)):
        with pytest.raises(prepare.PrepareError) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"error: {path} ") and message.endswith(": run `uv run prepare.py`")
        assert "\n" not in message
    result = run_python("import prepare; prepare.Tokenizer.from_directory()")
    assert result.returncode == 1 and result.stderr.splitlines() == [message]


@pytest.mark.parametrize("name,how,repair", [
    ("tokenizer.pkl", "random bytes", "Tokenizer: tokenizer.pkl is unreadable"),
    ("token_bytes.npy", "empty", "rewrote token_bytes.npy, which is unreadable"),
])
def test_prepare_repairs_a_corrupt_tokenizer_file(cache_copy, name, how, repair):
    corrupt(cache_copy / "tokenizer" / name, how)
    result = run_prepare("--num-shards", "3", env=UNREACHABLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert repair in result.stdout
    assert "Tokens: all 4 shards already tokenized" in result.stdout  # the same text trains the same merges
    assert prepare.get_token_bytes().tolist() == prepare.token_byte_lengths(load_tokenizer(cache_copy).enc).tolist()


def test_second_prepare_on_a_cache_waits_for_the_first(cache_copy, tmp_path):
    """Two prepare.py on one cache would overwrite each other's files: the second waits for the first's lock,
    saying so once, then does its work."""
    with open(cache_copy / ".prepare.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        with open(tmp_path / "out.txt", "w") as out:
            proc = subprocess.Popen([sys.executable, "prepare.py", "--num-shards", "3"], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **UNREACHABLE}, text=True)
        wait_line = f"Cache: waiting for another prepare.py (pid {os.getpid()}) to finish with {cache_copy}"
        deadline = time.time() + 60
        while wait_line not in (tmp_path / "out.txt").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.05)
        time.sleep(1)
        assert proc.poll() is None  # still waiting
        assert "Data:" not in (tmp_path / "out.txt").read_text()
    assert proc.wait(timeout=120) == 0  # closing the file released the lock
    out = (tmp_path / "out.txt").read_text()
    assert out.count("waiting for another prepare.py") == 1 and "Done! Ready to train." in out


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


@pytest.mark.parametrize("eval_tokens", [2048, 10 * 524288])
def test_source_without_validation_file_holds_out_enough_of_the_tail(tmp_path, monkeypatch, eval_tokens):
    """The held-out tail is the shortest one with enough text for EVAL_TOKENS (estimated at CHARS_PER_TOKEN
    characters a token), but never more than a fifth of the corpus."""
    use_cache(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(prepare, "EVAL_TOKENS", eval_tokens)
    src = tmp_path / "src"
    src.mkdir()
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(1000)]
    (src / "all.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare.build_from_source(str(src))
    train = shard_texts(tmp_path / "cache" / "data" / "shard_00000.parquet")
    val = shard_texts(tmp_path / "cache" / "data" / prepare.VAL_FILENAME)
    assert train + val == docs
    total = sum(map(len, docs))
    budget = min(eval_tokens * prepare.CHARS_PER_TOKEN, total // 5)
    assert sum(map(len, val)) >= budget > sum(map(len, val[1:]))
    assert budget == (10240 if eval_tokens == 2048 else total // 5)  # enough for 2048 tokens; a fifth of this corpus


@pytest.mark.parametrize("setup,message", [
    (lambda src: None, "no such file or folder"),
    (lambda src: src.mkdir() or (src / "notes.md").write_text("x"), "no .parquet, .jsonl or .txt files"),
    (lambda src: src.mkdir() or (src / "a.jsonl").write_text("") or (src / "b.txt").write_text("\n\n"),
     "need at least 2 documents"),  # empty files
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


def write_text_docs(path, n=3):
    path.write_text("".join(f"document {i}\n\n" for i in range(n)))


# Unreadable inputs: each ends in one line that names the file (and the line, for text) and the problem
UNREADABLE = {
    "not parquet": (lambda src: (src / "a.parquet").write_text("just text"),
                    r"{src}/a\.parquet: not a readable parquet file \(.*magic bytes.*\)"),
    "empty parquet": (lambda src: (src / "a.parquet").write_bytes(b""),
                      r"{src}/a\.parquet: not a readable parquet file \(.*0 bytes.*\)"),
    "text of numbers": (lambda src: pq.write_table(pa.table({"text": [1, 2]}), src / "a.parquet"),
                        r"{src}/a\.parquet: column `text` holds int64, not strings"),
    "latin-1 txt": (lambda src: (src / "b.txt").write_bytes("one\n\ntwo\n\ncaf\u00e9\n".encode("latin-1")),
                    r"{src}/b\.txt:5: not UTF-8 text \(byte 0xe9\): convert the file to UTF-8"),
    "latin-1 jsonl": (lambda src: (src / "b.jsonl").write_bytes('{"text": "ok"}\n{"text": "na\u00efve"}\n'.encode("latin-1")),
                      r"{src}/b\.jsonl:2: not UTF-8 text \(byte 0xef\): convert the file to UTF-8"),
    "broken link": (lambda src: os.symlink(src / "gone.txt", src / "b.txt"),
                    r"{src}/b\.txt: cannot read it \(No such file or directory\)"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_source_file_is_one_line_naming_it(tmp_path, monkeypatch, case):
    setup, pattern = UNREADABLE[case]
    src = tmp_path / "src"
    src.mkdir()
    write_text_docs(src / "a-good.txt")  # read first, in sorted order: the bad file is not the only one
    setup(src)
    use_cache(monkeypatch, tmp_path / "cache")
    with pytest.raises(prepare.PrepareError) as info:
        prepare.build_from_source(str(src))
    message = str(info.value)
    assert re.fullmatch("error: " + pattern.format(src=re.escape(str(src))), message), message


def test_unreadable_source_through_the_cli_has_no_traceback(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_text_docs(src / "a.txt")
    (src / "b.parquet").write_text("just text")
    result = run_prepare("--source", str(src), env={**UNREACHABLE, "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {src}/b.parquet: not a readable parquet file (")


def test_unreadable_permissions_are_one_line(tmp_path, monkeypatch):
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    if os.access(probe, os.R_OK):
        pytest.skip("this user reads files whatever their permissions (root with CAP_DAC_OVERRIDE)")
    src = tmp_path / "src"
    src.mkdir()
    write_text_docs(src / "a.txt")
    (src / "secret").mkdir()
    write_text_docs(src / "secret" / "b.txt")
    use_cache(monkeypatch, tmp_path / "cache")
    (src / "a.txt").chmod(0)
    with pytest.raises(prepare.PrepareError, match=rf"^error: {re.escape(str(src))}/a.txt: cannot read it \(Permission denied\)$"):
        prepare.build_from_source(str(src))
    (src / "a.txt").chmod(0o644)
    (src / "secret").chmod(0)
    with pytest.raises(prepare.PrepareError, match=rf"^error: {re.escape(str(src))}/secret: cannot list it \(Permission denied\)$"):
        prepare.build_from_source(str(src))


def test_single_file_of_another_type_names_the_accepted_ones(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "cache")
    (tmp_path / "notes.md").write_text("one\n\ntwo\n")
    with pytest.raises(prepare.PrepareError) as info:
        prepare.build_from_source(str(tmp_path / "notes.md"))
    assert str(info.value) == (f"error: --source {tmp_path}/notes.md: not a .parquet, .jsonl or .txt file "
                               f"(a plain-text corpus must end in .txt)")


def test_source_skips_other_files_and_says_which(tmp_path, monkeypatch, capsys):
    """A folder named like a file is searched like any folder; files of other types are left out, by name."""
    src = tmp_path / "src"
    src.mkdir()
    write_text_docs(src / "a.txt")
    (src / "part.parquet").mkdir()  # e.g. a dataset written as a folder of parts
    write_text_docs(src / "part.parquet" / "b.txt")
    (src / "empty.txt").write_text("")
    for name in ("README.md", "notes.md", "data.csv", "z.jsonl.gz"):
        (src / name).write_text("x")
    use_cache(monkeypatch, tmp_path / "cache")
    prepare.build_from_source(str(src))
    out = capsys.readouterr().out
    assert (f"Source: reading 3 files from {src} (skipped 4 of other types: README.md, data.csv, notes.md and 1 more)"
            in out.splitlines())
    docs = shard_texts(tmp_path / "cache" / "data" / "shard_00000.parquet") + \
        shard_texts(tmp_path / "cache" / "data" / prepare.VAL_FILENAME)
    assert docs == [f"document {i}" for i in range(3)] * 2


def test_second_source_into_the_same_cache_says_it_replaces_the_first(tmp_path, monkeypatch, capsys):
    use_cache(monkeypatch, tmp_path / "cache")
    write_source(tmp_path / "first")
    for _ in range(2):  # a rerun on the same corpus replaces nothing
        prepare.build_from_source(str(tmp_path / "first"))
        assert "replacing" not in capsys.readouterr().out
    write_source(tmp_path / "second", val_file=False)
    prepare.build_from_source(str(tmp_path / "second"))
    assert (f"Source: this cache holds the corpus built from --source {tmp_path}/first: replacing it (its shards are "
            f"deleted, and the tokenizer and token ids follow the new text)") in capsys.readouterr().out.splitlines()


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
    assert result.stdout.strip().endswith("\n".join(validation_report(tmp_path / "cache")) + "\n\nDone! Ready to train.")
    use_cache(monkeypatch, tmp_path / "cache")  # again: it holds the dataset `source` now, as a new process finds
    assert prepare.DATASET == "source"
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


def test_interrupted_source_names_the_command_that_resumes_it(synthetic_corpus, tmp_path):
    """Ctrl-C while --source reads the validation file, after the training shard is written: the message names the
    --source command (a plain `uv run prepare.py` would download from the hub), and that command finishes the job."""
    src = tmp_path / "my corpus"  # a space: the command must come quoted
    src.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(synthetic_corpus, f"shard_{i:05d}.parquet"), src / f"part-{i}.parquet")
    os.mkfifo(src / "val.txt")  # reading it blocks until the test lets go
    cache = tmp_path / "cache"
    env = {**os.environ, **UNREACHABLE, "AUTORESEARCH_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([sys.executable, "prepare.py", "--source", str(src)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while True:  # opening the writing end succeeds once prepare waits on the reading end
        assert proc.poll() is None and time.time() < deadline, "prepare never reached the validation file"
        try:
            writer = os.open(src / "val.txt", os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            time.sleep(0.05)
    assert (cache / "data" / "shard_00000.parquet").exists()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    os.close(writer)
    assert proc.returncode == 130
    command = f"uv run prepare.py --source {shlex.quote(str(src))}"
    assert err.strip() == f"interrupted: rerun `{command}` to resume"

    result = run_prepare(env=env)  # the plain command: not on half-built data, and no download
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: building the data from --source {src} did not finish: "
                                          f"rerun `{command}`"]
    (src / "val.txt").unlink()
    write_text_docs(src / "val.txt", 5)
    result = run_prepare(*shlex.split(command)[3:], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Done! Ready to train." in result.stdout


def test_help_documents_the_options():
    result = run_prepare("--help", env={"COLUMNS": "1000"})  # no line wrapping inside the phrases
    assert result.returncode == 0
    for option in ("--num-shards", "--download-workers", "--source", "<|endoftext|>", "blank lines", "shard_06542"):
        assert option in result.stdout
    # the environment variables that move the cache and the download, with what each one does
    lines = result.stdout.splitlines()
    for name, what in (("AUTORESEARCH_CACHE_DIR", prepare.CACHE_DIR), ("HF_ENDPOINT", "mirror"),
                       ("AUTORESEARCH_DATA_URL", "folder of shards")):
        (line,) = [line for line in lines if line.strip().startswith(name)]
        assert what in line, line

# ---------------------------------------------------------------------------
# evaluate_bpb: the fixed metric, for any model given as a function of numpy rows
# ---------------------------------------------------------------------------

def loss_table():
    # a per-token "loss" that depends on the target id only: the exact BPB can be computed from the rows alone. Its
    # values span 2**-30 to 2**10: a float64 sum keeps the small ones, a float32 sum loses them
    table = np.exp2(np.random.default_rng(0).uniform(-30, 10, 8192)).astype(np.float32)
    table[8188:] = 1e30  # special tokens: must be left out of the sum
    return table


class TableModel:
    """losses(x, y) for evaluate_bpb: loss_table()[y], noting how many rows each call had."""

    def __init__(self):
        self.table = loss_table()
        self.calls = []

    def __call__(self, x, y):
        assert x.dtype == y.dtype == np.int64 and x.shape == y.shape and x.shape[1] == prepare.MAX_SEQ_LEN
        self.calls.append(len(x))
        return self.table[y].reshape(-1)  # flat, like the original's cross_entropy(..., reduction='none')


@pytest.mark.parametrize("batch_size,rows", [(1, 5), (3, 5), (7, 5), (20, 20), (20, 37), (3, 37)])
def test_bpb_is_the_metric_written_out_to_the_last_bit(tokenizer, monkeypatch, batch_size, rows):
    # Batches smaller, larger and not a divisor of the rows; batches of 20 go in calls of 16 and 4 (1 GiB of logits)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", rows * prepare.MAX_SEQ_LEN + 100)
    expected = reference_bpb(tokenizer, TableModel(), batch_size)
    assert prepare.evaluate_bpb(TableModel(), tokenizer, batch_size) == expected
    # the test can fail: summed in float32 (on the device, say) the number is another, and counting the special
    # tokens' 1e30 losses would make it huge
    assert reference_bpb(tokenizer, TableModel(), batch_size, dtype=np.float32) != expected
    assert 0 < expected < 1000


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_bpb_uses_the_same_rows_for_every_batch_size(tokenizer, monkeypatch, batch_size):
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 5 * prepare.MAX_SEQ_LEN + 100)  # 5 rows, whatever the batch size
    model = TableModel()
    bpb = prepare.evaluate_bpb(model, tokenizer, batch_size)
    assert model.calls == [batch_size] * (5 // batch_size) + [batch_size] * (5 % batch_size > 0)  # whole batches
    assert bpb == pytest.approx(prepare.evaluate_bpb(TableModel(), tokenizer, 1), rel=1e-12)


def test_bpb_splits_batches_to_bound_logit_memory(tokenizer, monkeypatch):
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 20 * prepare.MAX_SEQ_LEN)
    model = TableModel()
    bpb = prepare.evaluate_bpb(model, tokenizer, 20)
    assert model.calls == [16, 4]  # 16 rows x 2048 x 8192 x 4 bytes = 1 GiB of logits at most
    assert bpb == prepare.evaluate_bpb(TableModel(), tokenizer, 20)  # deterministic, to the last bit


def test_bpb_gives_a_model_that_bounds_its_logits_whole_batches(tokenizer, monkeypatch):
    # train.py's compiled model on CUDA: every call gets all batch_size rows, the last batch's too (a torch.compile
    # graph built for training then serves it); the rows past EVAL_TOKENS are left out, so the number is the same.
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 5 * prepare.MAX_SEQ_LEN)
    model = TableModel()
    bpb = prepare.evaluate_bpb(model, tokenizer, 3, rows_per_call=3)
    assert model.calls == [3, 3]
    assert bpb == reference_bpb(tokenizer, TableModel(), 3, rows_per_call=3)
    assert bpb == pytest.approx(prepare.evaluate_bpb(TableModel(), tokenizer, 1), rel=1e-12)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 20 * prepare.MAX_SEQ_LEN)
    model.calls.clear()
    assert prepare.evaluate_bpb(model, tokenizer, 20, rows_per_call=20) == reference_bpb(
        tokenizer, TableModel(), 20, rows_per_call=20)
    assert model.calls == [20]  # no 1 GiB split


def document_starts_per_row(tokenizer, num_rows):
    """How many documents begin in each of the first num_rows validation rows (each document starts with BOS)."""
    loader = prepare.make_dataloader(tokenizer, 1, prepare.MAX_SEQ_LEN, "val")
    bos = tokenizer.get_bos_token_id()
    counts = []
    for _ in range(num_rows):
        x, y, _ = next(loader)
        counts.append(int((x == bos).sum() + (y[0, -1] == bos)))
    return counts


def test_evaluation_rows_say_when_the_evaluation_repeats_validation_text(tokenizer, monkeypatch):
    """A validation shard smaller than EVAL_TOKENS is read more than once; the summary warns from this: the rows
    filled before the shard's documents ran out (a row past them begins more documents than it has)."""
    val = pq.ParquetFile(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME)).metadata.num_rows
    starts = np.cumsum(document_starts_per_row(tokenizer, 200))
    assert starts[-1] > val  # the small test shard runs out well before 200 rows
    distinct = int(np.argmax(starts > val))  # rows 0..distinct-1 use each document at most once
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 200 * prepare.MAX_SEQ_LEN)
    assert prepare.evaluation_rows() == (200, distinct)
    assert 10 < distinct < 200
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 3 * prepare.MAX_SEQ_LEN)  # well inside the shard
    assert prepare.evaluation_rows() == (3, 3)


def test_bpb_imports_no_framework(prepared_cache):
    # the metric is numpy only: an MLX user may not have torch installed, a CUDA user may not have MLX
    code = """
import sys, numpy as np, prepare
print(prepare.evaluate_bpb(lambda x, y: np.full(y.shape, 2.0, np.float32), prepare.Tokenizer.from_directory(), 4),
      "torch" in sys.modules, "mlx" in sys.modules)
"""
    result = run_python(code, env={"AUTORESEARCH_EVAL_TOKENS": str(2 * prepare.MAX_SEQ_LEN)})
    assert result.returncode == 0, result.stderr
    bpb, torch_loaded, mlx_loaded = result.stdout.split()
    assert float(bpb) > 0 and torch_loaded == mlx_loaded == "False"
