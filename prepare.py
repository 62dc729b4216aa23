"""
One-time data preparation for autoresearch experiments, and the fixed runtime utilities
(tokenizer, data loader, evaluation) that train.py and train_mlx.py import.

Usage:
    uv run prepare.py                         # download 10 training shards + the validation shard, train the tokenizer
    uv run prepare.py --num-shards 8          # fewer shards (-1 = all)
    uv run prepare.py --dataset tinystories   # another dataset (--list shows them), in a cache folder of its own
    uv run prepare.py --source ~/corpus       # build the cache from local files instead of the hub

Data, tokenizer and token ids live in ~/.cache/autoresearch/ (AUTORESEARCH_CACHE_DIR moves it). The trainers use the
dataset prepared last, or the one AUTORESEARCH_DATASET names.
Framework-neutral: batches are numpy arrays, and evaluate_bpb takes the model as a function of numpy rows.
"""

import os
import re
import sys
import json
import math
import time
import fcntl
import queue
import shlex
import pickle
import hashlib
import argparse
import filecmp
import threading
import urllib.parse
from bisect import bisect_right, insort
from collections import deque
from itertools import zip_longest
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import rustbpe
import tiktoken
from urllib3.exceptions import NewConnectionError  # requests' own transport


class PrepareError(SystemExit):
    """A one-line message for the user; uncaught, Python prints it to stderr and exits 1 (no traceback)."""


def _env_int(name, default, minimum):
    # the smoke-test knobs (for the tests only; a real run never sets them) and the fixed-work mode's step count
    value = os.environ.get(name)
    if not value:
        return default
    if not value.isdigit() or int(value) < minimum:
        raise PrepareError(f"error: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)

# ---------------------------------------------------------------------------
# Constants (fixed, do not modify)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048       # context length
TIME_BUDGET = _env_int("AUTORESEARCH_TIME_BUDGET", 300, 1)  # training time budget in seconds (5 minutes)
UNTIMED_STEPS = 11       # steps 0-10 (compilation, warmup) are not timed: TIME_BUDGET starts after them
EVAL_TOKENS = _env_int("AUTORESEARCH_EVAL_TOKENS", 10 * 524288, MAX_SEQ_LEN)  # val tokens; one value for every chip
# Fixed-work mode: exactly this many optimizer steps, every schedule on step / FIXED_STEPS instead of the clock, so
# two backends or two machines train the same steps (0, the default: timed). A mode of its own, not a smoke test.
FIXED_STEPS = _env_int("AUTORESEARCH_STEPS", 0, 0)
TRAINING_MODE = f"steps {FIXED_STEPS}" if FIXED_STEPS else f"time {TIME_BUDGET}s"  # the summary's `mode:` line
SMOKE_KNOBS = [f"{k}={os.environ[k]}" for k in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_EVAL_TOKENS")
               if os.environ.get(k)]
SMOKE_TEST_WARNING = (f"smoke test ({', '.join(SMOKE_KNOBS)}): val_bpb is not comparable to real runs"
                      if SMOKE_KNOBS else None)  # the trainers print it as a `warning:` line in their summary

VOCAB_SIZE = 8192
# BPE split pattern (GPT-4 style, with \p{N}{1,2} instead of {1,3})
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = "<|reserved_0|>"

MAX_SHARD = 6542 # the last datashard is shard_06542.parquet
VAL_SHARD = MAX_SHARD  # pinned validation shard (shard_06542), never used for training
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"

# ---------------------------------------------------------------------------
# Datasets: the original's climbmix and the presets of the Mac port this one follows (--dataset NAME)
# ---------------------------------------------------------------------------

class Dataset(NamedTuple):
    repo: str        # the Hugging Face dataset; a file is {HF_ENDPOINT}/datasets/{repo}/resolve/{folder}/{file}
    folder: str      # the revision, then the folder within it
    file: str        # file name, {} standing for the file's number (0, 1, ...)
    files: int       # training files: climbmix's validation file is number `files`, the others' the head of file 0
    shards: int      # training shards `--num-shards` downloads by default
    file_mb: int     # download size of one file, from the hub's listing
    keep: tuple      # (column, minimum): only documents whose column is at least minimum; () keeps them all
    about: str       # what it is, and its licence

# Every preset's documents are in a `text` column. climbmix's files are shards already (downloaded as they are); the
# others' are converted into shards of the same format: shard i holds file i's documents (those `keep` keeps) in row
# groups of ROW_GROUP_DOCS, and the validation shard the first documents of file 0, enough for the evaluation's
# EVAL_TOKENS at CHARS_PER_TOKEN, which training never reads. python-edu (HuggingFaceTB/smollm-corpus) is not here:
# its files hold Software Heritage blob ids, the code itself is behind one S3 request per file. Nor SlimPajama: its
# original is .jsonl.zst (no zstd in the standard library), and the file count of its 6B-token parquet sample
# (DKYoon/SlimPajama-6B) could not be confirmed (sources disagree: 48 or 52). fineweb-edu-high keeps `score` (a
# float), not `int_score`: every fineweb-edu document has int_score >= 3 already, the filter that made the dataset.
DATASETS = {
    "climbmix": Dataset("karpathy/climbmix-400b-shuffle", "main", "shard_{:05d}.parquet", 6542, 10, 88, (),
                        "NVIDIA's ClimbMix, shuffled: the original's data (cc-by-nc-4.0)"),
    "tinystories": Dataset("karpathy/tinystories-gpt4-clean", "main", "tinystories_gpt4_clean.parquet", 1, 1, 673, (),
                           "2.7 M short stories by GPT-4, cleaned: the original's advice for small machines "
                           "(cdla-sharing-1.0)"),
    "fineweb-edu": Dataset("HuggingFaceFW/fineweb-edu", "main/sample/10BT", "{:03d}_00000.parquet", 14, 1, 2153, (),
                           "educational web pages, the 10B-token sample (odc-by)"),
    "fineweb-edu-high": Dataset("HuggingFaceFW/fineweb-edu", "main/sample/10BT", "{:03d}_00000.parquet", 14, 2, 2153,
                                ("score", 3.0), "fineweb-edu's documents of educational score 3 or more (odc-by)"),
    "cosmopedia-v2": Dataset("HuggingFaceTB/smollm-corpus", "main/cosmopedia-v2", "train-{:05d}-of-00104.parquet", 104,
                             1, 1062, (), "synthetic textbooks, stories and blog posts by Mixtral (odc-by)"),
}
SOURCE = "source"  # the name of a corpus built with --source; it shares the cache root with climbmix, as before

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

CACHE_DIR = os.path.abspath(os.path.expanduser(
    os.environ.get("AUTORESEARCH_CACHE_DIR") or os.path.join("~", ".cache", "autoresearch")))
LAST_DATASET = "dataset.json"  # in CACHE_DIR: the dataset prepare.py prepared last, the one a run uses by default
SOURCE_MARKER = "source.json"  # in the data folder: the shards came from --source, so a plain run downloads nothing
# HF_ENDPOINT points at a hub mirror; AUTORESEARCH_DATA_URL names the folder of a dataset's files outright
HF_ENDPOINT = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    with open(tmp_name(path), "w") as f:
        json.dump(obj, f)
    os.replace(tmp_name(path), path)


def dataset_dir(name):
    """The folder of a dataset's data/, tokenizer/ and tokens/: the cache root for climbmix (where earlier versions
    kept it, so an existing cache stays valid) and --source, datasets/NAME for the other presets."""
    return CACHE_DIR if name in ("climbmix", SOURCE) else os.path.join(CACHE_DIR, "datasets", name)


def default_dataset():
    """AUTORESEARCH_DATASET, else the dataset prepared last, else climbmix (or an older --source corpus)."""
    last = (read_json(os.path.join(CACHE_DIR, LAST_DATASET)) or {}).get("dataset")
    name = (os.environ.get("AUTORESEARCH_DATASET") or last
            or (SOURCE if os.path.exists(os.path.join(CACHE_DIR, "data", SOURCE_MARKER)) else "climbmix"))
    if name not in DATASETS and name != SOURCE:
        raise PrepareError(f"error: AUTORESEARCH_DATASET={name}: no such dataset; choose one of "
                           f"{', '.join(DATASETS)} or {SOURCE} (a corpus built with --source)")
    return name


def use_dataset(name):
    """Point the data, tokenizer and token folders, the download URL and the hint of the errors at a dataset."""
    global DATASET, DATA_DIR, TOKENIZER_DIR, TOKENS_DIR, BASE_URL, RUN_PREPARE
    DATASET = name
    DATA_DIR = os.path.join(dataset_dir(name), "data")
    TOKENIZER_DIR = os.path.join(dataset_dir(name), "tokenizer")
    TOKENS_DIR = os.path.join(dataset_dir(name), "tokens")  # token ids of every shard, one folder per tokenizer
    preset = DATASETS.get(name)
    BASE_URL = (os.environ.get("AUTORESEARCH_DATA_URL") or preset and
                f"{HF_ENDPOINT}/datasets/{preset.repo}/resolve/{preset.folder}" or "").rstrip("/")
    # the command that prepares it: a plain `uv run prepare.py` where that is the one it would prepare
    plain = name == default_dataset() and not os.environ.get("AUTORESEARCH_DATASET")
    RUN_PREPARE = ("run `uv run prepare.py`" if plain else
                   f"run `uv run prepare.py --dataset {name}`" if preset else
                   "build it with `uv run prepare.py --source PATH`")


use_dataset(default_dataset())

DOWNLOAD_ATTEMPTS = 5
RETRY_BACKOFF = 2.0            # seconds before the first retry, doubling after each failure
SOURCE_SHARD_CHARS = 100_000_000  # --source: characters per training shard written
CHARS_PER_TOKEN = 5               # held-out validation text is sized for EVAL_TOKENS at this many characters a token
                                  # (English prose gives about 4 with this tokenizer: a margin for denser text)
ROW_GROUP_DOCS = 1000             # --source: documents per parquet row group
LOCK_FILE = ".prepare.lock"       # in CACHE_DIR: one prepare.py at a time per cache; holds the running one's pid

# ---------------------------------------------------------------------------
# Data download
# ---------------------------------------------------------------------------

def shard_name(index):
    return f"shard_{index:05d}.parquet"


def check_shard(path, full=False, keep=()):
    """Why the shard at path is unusable (a string), or None if it is a readable parquet file with a `text` column
    (and keep's numeric column) and >= 1 row. The footer check catches truncation; full=True also decodes every page."""
    try:
        pf = pq.ParquetFile(path)
        field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
        if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            return "no string column `text`"
        kind = pf.schema_arrow.field(keep[0]).type if keep and keep[0] in pf.schema_arrow.names else pa.null()
        if keep and not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            return f"no numeric column `{keep[0]}`"
        if pf.metadata.num_rows < 1:
            return "no rows"
        if full:
            for rg in range(pf.num_row_groups):
                pf.read_row_group(rg, columns=["text", *keep[:1]])
    except (OSError, pa.ArrowException) as e:
        return f"unreadable parquet: {e}"
    return None


def tmp_name(path):
    """Where to write path before renaming it into place: a name of this process's own, so two runs never share one."""
    return f"{path}.{os.getpid()}.tmp"


OFFLINE_HINT = ("offline, set HF_ENDPOINT to a Hugging Face mirror or AUTORESEARCH_DATA_URL to a folder of shards, or "
                "build the data from local files with `uv run prepare.py --source PATH`")


def unreachable(e, base_url):
    """A one-line error if e is a failure to reach the server at all (the name does not resolve, the connection is
    refused: offline or a wrong URL, which retries cannot mend), else None. A timeout, a 5xx or a connection dropped
    mid-transfer is not one: those are retried."""
    reason = getattr(e.args[0], "reason", None) if isinstance(e, requests.ConnectionError) and e.args else None
    if not isinstance(reason, NewConnectionError):
        return None
    why = getattr(reason.__cause__, "strerror", None) or str(reason)  # the socket's error, without urllib3's wrapping
    return f"error: cannot reach {urllib.parse.urlsplit(base_url).netloc} ({why}): {OFFLINE_HINT}"


def download_file(name, base_url, backoff, log, stop=None, keep=()):
    """Stream one file to a temporary file in DATA_DIR and verify it; returns that file's path, or None after the last
    attempt failed. An unreachable server raises PrepareError at once; stop (a threading.Event) set by another worker
    ends the retries."""
    tmp_path = tmp_name(os.path.join(DATA_DIR, name))
    url = f"{base_url}/{name}"
    stop = stop or threading.Event()
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        if stop.is_set():
            return None
        try:
            with requests.get(url, stream=True, timeout=30) as response:
                response.raise_for_status()
                with open(tmp_path, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1024 * 1024):
                        f.write(chunk)
            problem = check_shard(tmp_path, full=True, keep=keep)
            if problem is not None:
                raise ValueError(problem)
            return tmp_path
        except (requests.RequestException, OSError, ValueError) as e:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            fatal = unreachable(e, base_url)
            if fatal is not None:
                raise PrepareError(fatal)
            status = getattr(getattr(e, "response", None), "status_code", None)
            permanent = status is not None and 400 <= status < 500 and status != 429  # e.g. 404: retrying won't help
            if attempt == DOWNLOAD_ATTEMPTS or permanent:
                log(f"  {name}: failed after {attempt} attempt(s): {e}")
                return None
            delay = backoff * 2 ** (attempt - 1)
            log(f"  {name}: attempt {attempt}/{DOWNLOAD_ATTEMPTS} failed ({e}); retrying in {delay:g}s")
            stop.wait(delay)


def kept_documents(path, keep):
    """The non-empty documents of a downloaded file, in order, ROW_GROUP_DOCS at a time in memory; with keep, only
    those whose keep[0] column is at least keep[1]."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=ROW_GROUP_DOCS, columns=["text", *keep[:1]]):
        texts = batch.column(0).to_pylist()
        scores = batch.column(1).to_pylist() if keep else [None] * len(texts)
        yield from (text for text, score in zip(texts, scores)
                    if text and (not keep or score is not None and score >= keep[1]))


def convert_file(path, name, index, keep):
    """Write the documents of `name`, downloaded to path, as shard `index`; file 0 gives the validation shard its
    first documents, enough text for the evaluation (EVAL_TOKENS at CHARS_PER_TOKEN), and shard 0 the rest."""
    docs = kept_documents(path, keep)
    if index == 0:
        val, chars = [], 0
        for doc in docs:
            val.append(doc)
            chars += len(doc)
            if chars >= EVAL_TOKENS * CHARS_PER_TOKEN:
                break
        write_shard(VAL_FILENAME, val)
    if write_shard(shard_name(index), docs)[1] == 0:
        raise PrepareError(f"error: {name} of {DATASET} left no documents to train on (the validation shard took "
                           f"them all, or `keep` none): is the mirror serving other files?")


def download_data(num_shards, download_workers=8, base_url=None, backoff=RETRY_BACKOFF):
    """Make training shards 0..num_shards-1 and the validation shard of DATASET; verify what is already there.
    climbmix's files are shards (its validation shard is file number `files`); the other presets' files are
    downloaded and converted into them (file 0 yields the validation shard too)."""
    preset = DATASETS[DATASET]
    base_url = base_url or BASE_URL
    os.makedirs(DATA_DIR, exist_ok=True)
    # a job: (file number, the file to download, the shards it yields); files named as shards are shards already
    n = min(num_shards, preset.files)
    ready = preset.file.format(0) == shard_name(0)
    if ready:
        jobs = [(i, shard_name(i), [shard_name(i)]) for i in [*range(n), preset.files]]
    else:
        jobs = [(i, preset.file.format(i), [shard_name(i)] + [VAL_FILENAME] * (i == 0)) for i in range(n)]
    names = sorted(name for *_, outputs in jobs for name in outputs)
    for leftover in [f for f in os.listdir(DATA_DIR) if f.endswith(".tmp")]:
        os.remove(os.path.join(DATA_DIR, leftover))  # from an interrupted run (main holds the cache lock); redone below
    missing = []
    for job in jobs:
        for name in job[2]:
            path = os.path.join(DATA_DIR, name)
            problem = check_shard(path) if os.path.exists(path) else "missing"
            if problem not in (None, "missing"):
                print(f"Data: {name} on disk is corrupt ({problem}); fetching it again")
                os.remove(path)
            if problem is not None and job not in missing:
                missing.append(job)
    if not missing:
        print(f"Data: all {len(names)} shards ready at {DATA_DIR}")
        return

    what = "downloading {} shards" if ready else "downloading and converting {} files"
    print(f"Data: {what.format(len(missing))} ({len(jobs) - len(missing)} already verified) from {base_url}")
    todo, lock = queue.Queue(), threading.Lock()
    for job in missing:
        todo.put(job)
    stop, fatal = threading.Event(), []  # the first unreachable-server error stops every worker; it alone is reported
    done, nbytes, t0 = 0, 0, time.time()

    def log(line):
        with lock:
            print(line, flush=True)

    def fetch(index, name):
        """Download one file and put its shards in place; returns its size in bytes, or None if it failed."""
        path = download_file(name, base_url, backoff, log, stop, preset.keep)
        if path is None:
            return None
        size = os.path.getsize(path)
        if ready:
            os.replace(path, os.path.join(DATA_DIR, name))  # atomic: a shard on disk is always a complete one
        else:
            try:
                convert_file(path, name, index, preset.keep)
            finally:
                os.remove(path)
        return size

    def worker():
        nonlocal done, nbytes
        while not stop.is_set():
            try:
                index, name, _ = todo.get_nowait()
            except queue.Empty:
                return
            try:
                size = fetch(index, name)
            except PrepareError as e:
                fatal.append(e)
                stop.set()
            if stop.is_set():
                return
            with lock:
                done += 1
                nbytes += size or 0
                mb = nbytes / 1e6
                print(f"  [{done}/{len(missing)}] {name} {'FAILED' if size is None else 'ok'} "
                      f"({mb:.1f} MB so far, {mb / max(time.time() - t0, 1e-9):.1f} MB/s)", flush=True)

    # daemon threads: Ctrl-C ends the process at once; the next run resumes from the verified shards
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(download_workers, len(missing))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if fatal:
        raise fatal[0]
    failed = [name for _, name, outputs in missing
              if not all(os.path.exists(os.path.join(DATA_DIR, shard)) for shard in outputs)]
    if failed:
        raise PrepareError(f"error: {len(failed)} of {len(jobs)} {'shards' if ready else 'files'} could not be "
                           f"downloaded from {base_url} "
                           f"({first_names(failed)}): rerun to retry; {OFFLINE_HINT}")
    print(f"Data: {len(names)}/{len(names)} shards ready at {DATA_DIR}")


def first_names(names, n=3):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")

# ---------------------------------------------------------------------------
# Local data (--source): any corpus as climbmix-format shards
# ---------------------------------------------------------------------------

SOURCE_HELP = """a folder (or one file) of .parquet files with a `text` column, .jsonl files (one JSON object
per line, field `text`) or .txt files (documents separated by blank lines or by a line <|endoftext|>),
read in sorted path order. Files named shard_06542.parquet or with val/valid/validation as a word in
their path (e.g. valid.txt, val/part-0.jsonl) become the validation shard; without any, the last
documents are held out: enough text for the evaluation's EVAL_TOKENS tokens, at most a fifth of the
corpus. Other files are skipped. Written to the cache as shard_00000.parquet... + shard_06542.parquet."""
SOURCE_TYPES = (".parquet", ".jsonl", ".txt")
VAL_NAME = re.compile(r"(^|[^a-z])(val|valid|validation)([^a-z]|$)", re.IGNORECASE)


def source_files(source):
    """(the corpus files of source in sorted order, the names of the other files found beside them)."""
    if os.path.isfile(source):
        if not source.endswith(SOURCE_TYPES):
            raise PrepareError(f"error: --source {source}: not a .parquet, .jsonl or .txt file "
                               f"(a plain-text corpus must end in .txt)")
        return [source], []
    if not os.path.isdir(source):
        raise PrepareError(f"error: --source {source}: no such file or folder")

    def unlistable(e):
        raise PrepareError(f"error: {e.filename}: cannot list it ({e.strerror})")

    found, skipped = [], []
    for root, dirs, files in os.walk(source, onerror=unlistable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if f.endswith(SOURCE_TYPES)]
        skipped += [os.path.relpath(os.path.join(root, f), source) for f in files
                    if not f.endswith(SOURCE_TYPES) and not f.startswith(".")]
    if not found:
        raise PrepareError(f"error: --source {source}: no .parquet, .jsonl or .txt files")
    return sorted(found), sorted(skipped)


def source_documents(path):
    """Yield the non-empty documents of one source file; a file that cannot be read is a one-line error."""
    try:
        if path.endswith(".parquet"):
            yield from parquet_documents(path)
        else:
            with open(path, encoding="utf-8") as f:
                yield from jsonl_documents(f, path) if path.endswith(".jsonl") else txt_documents(f)
    except UnicodeDecodeError as e:
        raise PrepareError(f"error: {path}:{first_non_utf8_line(path)}: not UTF-8 text "
                           f"(byte 0x{e.object[e.start]:02x}): convert the file to UTF-8")
    except pa.ArrowException as e:
        raise PrepareError(f"error: {path}: not a readable parquet file ({' '.join(str(e).split())})")
    except OSError as e:
        raise PrepareError(f"error: {path}: cannot read it ({e.strerror or ' '.join(str(e).split())})")


def parquet_documents(path):
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise PrepareError(f"error: {path}: no `text` column")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PrepareError(f"error: {path}: column `text` holds {kind}, not strings")
    for rg in range(pf.num_row_groups):
        yield from (t for t in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist() if t)


def jsonl_documents(f, path):
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line).get("text")
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise PrepareError(f"error: {path}:{lineno}: not a JSON object with a string field `text`")
        if text:
            yield text


def txt_documents(f):
    block = []
    for line in f:
        if line.strip() and line.strip() != "<|endoftext|>":
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\n")
            block = []
    if block:
        yield "".join(block).rstrip("\n")


def first_non_utf8_line(path):
    """The number of the first line of path that is not UTF-8 (the byte \\n never occurs inside a multi-byte
    character, so the raw lines are the text's lines)."""
    with open(path, "rb") as f:
        return next(n for n, line in enumerate(f, 1) if line.decode("utf-8", "ignore").encode("utf-8") != line)


def write_shard(name, docs):
    """Write docs (any iterable) as DATA_DIR/name in row groups of ROW_GROUP_DOCS; keep the old file if the bytes are
    identical, so rerunning on the same text retrains nothing. Returns (whether it changed, documents written)."""
    path = os.path.join(DATA_DIR, name)
    tmp_path = tmp_name(path)
    schema = pa.schema([("text", pa.string())])
    count, group = 0, []
    with pq.ParquetWriter(tmp_path, schema, compression="zstd") as writer:
        for doc in docs:
            group.append(doc)
            if len(group) == ROW_GROUP_DOCS:
                writer.write_table(pa.table({"text": group}, schema=schema))
                count, group = count + len(group), []
        if group:
            writer.write_table(pa.table({"text": group}, schema=schema))
            count += len(group)
    if os.path.exists(path) and filecmp.cmp(tmp_path, path, shallow=False):
        os.remove(tmp_path)
        return False, count
    os.replace(tmp_path, path)
    return True, count


def build_from_source(source):
    """Write the documents of a local corpus into DATA_DIR as training shards + the validation shard."""
    files, skipped = source_files(source)
    relative = {f: os.path.relpath(f, source) if os.path.isdir(source) else os.path.basename(f) for f in files}
    val_files = [f for f in files if os.path.basename(f) == VAL_FILENAME or VAL_NAME.search(relative[f])]
    train_files = [f for f in files if f not in val_files]
    if not train_files:
        raise PrepareError(f"error: --source {source}: only validation files, nothing to train on")
    os.makedirs(DATA_DIR, exist_ok=True)
    existing = [f for f in os.listdir(DATA_DIR) if f.endswith(".parquet")]
    marker_path = os.path.join(DATA_DIR, SOURCE_MARKER)
    previous = read_json(marker_path)
    if existing and previous is None:
        raise PrepareError(f"error: {DATA_DIR} holds downloaded shards; delete them or set AUTORESEARCH_CACHE_DIR "
                           f"to another folder to use --source")
    for leftover in [f for f in os.listdir(DATA_DIR) if f.endswith(".tmp")]:
        os.remove(os.path.join(DATA_DIR, leftover))  # from an interrupted run (main holds the cache lock)

    def train_docs():
        for f in train_files:
            yield from source_documents(f)

    n_train = None  # every training-file document is for training...
    if not val_files:  # ...unless validation must come from their tail: count it out first
        lengths = [len(d) for d in train_docs()]
        budget = min(EVAL_TOKENS * CHARS_PER_TOKEN, sum(lengths) // 5)
        n_train, held_out = len(lengths) - 1, lengths[-1] if lengths else 0
        while held_out < budget and n_train > 1:
            n_train -= 1
            held_out += lengths[n_train]
        if n_train < 1:
            raise PrepareError(f"error: --source {source}: need at least 2 documents (training + validation)")
    if existing and previous["source"] != os.path.abspath(source):
        print(f"Source: this cache holds the corpus built from --source {previous['source']}: replacing it (its shards "
              f"are deleted, and the tokenizer and token ids follow the new text)")
    # written first and marked complete last: a plain rerun must neither download nor train on half-built data
    write_json(marker_path, {"source": os.path.abspath(source), "complete": False})
    note = f" (skipped {len(skipped)} of other types: {first_names(skipped)})" if skipped else ""
    print(f"Source: reading {len(files)} files from {source}{note}")

    written, changed, shard, chars, val_docs = [], 0, [], 0, []
    for i, doc in enumerate(train_docs()):
        if n_train is not None and i >= n_train:
            val_docs.append(doc)
            continue
        shard.append(doc)
        chars += len(doc)
        if chars >= SOURCE_SHARD_CHARS:
            written.append(shard_name(len(written)))
            changed += write_shard(written[-1], shard)[0]
            shard, chars = [], 0
    if shard:
        written.append(shard_name(len(written)))
        changed += write_shard(written[-1], shard)[0]
    for f in val_files:
        val_docs.extend(source_documents(f))
    if not written or not val_docs:
        raise PrepareError(f"error: --source {source}: no documents for {'training' if not written else 'validation'}")
    changed += write_shard(VAL_FILENAME, val_docs)[0]
    written.append(VAL_FILENAME)
    for stale in set(existing) - set(written):
        os.remove(os.path.join(DATA_DIR, stale))
    write_json(marker_path, {"source": os.path.abspath(source), "complete": True})
    print(f"Source: {len(written) - 1} training shards + validation shard ({len(val_docs):,} documents) "
          f"ready at {DATA_DIR} ({changed} written, {len(written) - changed} unchanged)")

# ---------------------------------------------------------------------------
# Tokenizer training
# ---------------------------------------------------------------------------

TOKENIZER_RECORD = "trained_on.json"  # what the tokenizer was trained on; written last, so it also marks "complete"


def list_parquet_files():
    """Return sorted list of parquet file paths in the data directory."""
    if not os.path.isdir(DATA_DIR):
        return []
    files = sorted(f for f in os.listdir(DATA_DIR) if f.endswith(".parquet"))
    return [os.path.join(DATA_DIR, f) for f in files]


def data_shards():
    """(training shard paths, validation shard path), or a one-line error saying what is missing."""
    paths = list_parquet_files()
    if not paths:
        raise PrepareError(f"error: no data in {DATA_DIR}: {RUN_PREPARE} first")
    val_path = os.path.join(DATA_DIR, VAL_FILENAME)
    train_paths = [p for p in paths if p != val_path]
    if not train_paths:
        raise PrepareError(f"error: no training shards in {DATA_DIR}: {RUN_PREPARE}")
    if val_path not in paths:
        raise PrepareError(f"error: validation shard {VAL_FILENAME} missing from {DATA_DIR}: {RUN_PREPARE}")
    return train_paths, val_path


def shard_identity(path):
    st = os.stat(path)
    return [os.path.basename(path), st.st_size, st.st_mtime_ns]


def text_iterator(parquet_paths, record, max_chars=1_000_000_000, doc_cap=10_000):
    """Yield training documents (capped at doc_cap characters) until max_chars; note in record which shards
    were read and whether the text ran out before max_chars."""
    nchars = 0
    record.update(shards=[], complete=False)
    for filepath in parquet_paths:
        record["shards"].append(shard_identity(filepath))
        print(f"  reading {os.path.basename(filepath)} ({nchars / 1e6:.0f}M/{max_chars / 1e6:.0f}M characters)",
              flush=True)
        pf = pq.ParquetFile(filepath)
        for rg_idx in range(pf.num_row_groups):
            for text in pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist():
                doc = text[:doc_cap]
                nchars += len(doc)
                yield doc
                if nchars >= max_chars:
                    return
    record["complete"] = True


def tokenizer_staleness(train_paths):
    """Why the tokenizer must be (re)trained, or None if it was trained on exactly the text it would read now."""
    record = read_json(os.path.join(TOKENIZER_DIR, TOKENIZER_RECORD))
    files = ["tokenizer.pkl", "token_bytes.npy"]
    if record is None or not all(os.path.exists(os.path.join(TOKENIZER_DIR, f)) for f in files):
        return "no tokenizer yet" if record is None else "tokenizer files missing"
    if (record.get("vocab_size"), record.get("pattern")) != (VOCAB_SIZE, SPLIT_PATTERN):
        return "tokenizer settings changed"
    problem = read_encoding(TOKENIZER_DIR)[1]
    if problem is not None:
        return f"tokenizer.pkl {problem}"
    current = [shard_identity(p) for p in train_paths]
    if not record["complete"]:  # training stopped at max_chars: later shards were never read
        current = current[:len(record["shards"])]
    for old, new in zip_longest(record["shards"], current):
        if old != new:
            return f"training shards changed since the tokenizer was trained ({(new or old)[0]})"
    return None


def train_tokenizer():
    """Train BPE tokenizer using rustbpe, save as tiktoken pickle; skipped when up to date."""
    train_paths, _ = data_shards()
    reason = tokenizer_staleness(train_paths)
    if reason is None:
        enc = load_encoding(TOKENIZER_DIR)
        problem = token_bytes_problem(enc, TOKENIZER_DIR)
        if problem is None:
            print(f"Tokenizer: up to date at {TOKENIZER_DIR}")
            return
        np.save(os.path.join(TOKENIZER_DIR, "token_bytes.npy"), token_byte_lengths(enc))
        print(f"Tokenizer: up to date at {TOKENIZER_DIR}; rewrote token_bytes.npy, which {problem}")
        return
    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    record_path = os.path.join(TOKENIZER_DIR, TOKENIZER_RECORD)
    if os.path.exists(record_path):
        os.remove(record_path)  # an interrupted retrain must not look complete
    print(f"Tokenizer: {reason}; training BPE tokenizer on {len(train_paths)} training shards...")
    t0 = time.time()

    tokenizer = rustbpe.Tokenizer()
    vocab_size_no_special = VOCAB_SIZE - len(SPECIAL_TOKENS)
    record = {"vocab_size": VOCAB_SIZE, "pattern": SPLIT_PATTERN}
    tokenizer.train_from_iterator(text_iterator(train_paths, record), vocab_size_no_special, pattern=SPLIT_PATTERN)

    # Build tiktoken encoding from trained merges
    mergeable_ranks = {bytes(k): v for k, v in tokenizer.get_mergeable_ranks()}
    if len(mergeable_ranks) != vocab_size_no_special:
        raise PrepareError(f"error: the training text is too small: the tokenizer learned {len(mergeable_ranks)} "
                           f"of {vocab_size_no_special} tokens; add more text")
    special_tokens = {name: len(mergeable_ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.get_pattern(),
                            mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
    test = "Hello world! Numbers: 123. Unicode: 你好"
    decoded = enc.decode(enc.encode_ordinary(test))
    if decoded != test:
        raise PrepareError(f"error: tokenizer roundtrip failed: {test!r} -> {decoded!r}")
    with open(os.path.join(TOKENIZER_DIR, "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)
    print(f"Tokenizer: trained in {time.time() - t0:.1f}s, sanity check passed (vocab_size={enc.n_vocab})")
    np.save(os.path.join(TOKENIZER_DIR, "token_bytes.npy"), token_byte_lengths(enc))
    write_json(record_path, record)


def token_byte_lengths(enc):
    """int32 array for BPB: how many bytes of text each token id stands for, 0 for the special tokens. The token's
    own bytes, not the UTF-8 of its decoded text (the original's rule): a token that is not valid UTF-8 on its own,
    such as a lone high byte or a merge that ends inside a character, decodes to U+FFFD, which is 3 bytes."""
    special = {enc.encode_single_token(name) for name in SPECIAL_TOKENS}
    return np.array([0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
                    dtype=np.int32)


def token_bytes_problem(enc, tokenizer_dir):
    """What is wrong with token_bytes.npy in tokenizer_dir for this tokenizer (a string), or None."""
    try:
        table = np.load(os.path.join(tokenizer_dir, "token_bytes.npy"))
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        return f"is unreadable ({type(e).__name__}: {' '.join(str(e).split())})"
    expected = token_byte_lengths(enc)
    if table.shape != expected.shape:
        return f"has {table.size} entries for {expected.size} tokens"
    wrong = int((table != expected).sum())
    if wrong:
        return f"counts the bytes of {wrong} of {expected.size} tokens wrongly (made by an older prepare.py)"
    return None

# ---------------------------------------------------------------------------
# Token cache: tokenize every shard once, so training reads token ids instead of text
# ---------------------------------------------------------------------------

def token_cache_dir(tokenizer):
    return os.path.join(TOKENS_DIR, tokenizer.fingerprint[:16])


def token_files(cache_dir, parquet_name):
    stem = os.path.join(cache_dir, parquet_name[:-len(".parquet")])
    return stem + ".tokens.npy", stem + ".offsets.npy"


def tokenize_shard(path, tokenizer):
    """All documents of a shard, BOS-prepended: (uint16 token ids, int64 document offsets, documents per row group)."""
    bos = tokenizer.get_bos_token_id()
    pf = pq.ParquetFile(path)
    parts, lengths, row_groups = [], [], []
    for rg in range(pf.num_row_groups):
        texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        row_groups.append(len(texts))
        for i in range(0, len(texts), 1024):  # bounded batches: token lists of Python ints are ~36 bytes a token
            for ids in tokenizer.encode(texts[i:i + 1024], prepend=bos, num_threads=os.cpu_count() or 8):
                parts.append(np.array(ids, dtype=np.uint16))
                lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.concatenate(parts), offsets, row_groups


def is_tokenized(manifest, cache_dir, path):
    """Whether the manifest has token ids for this very shard file (same name, size and mtime) and they are on disk."""
    entry = manifest["shards"].get(os.path.basename(path))
    return (entry is not None and entry["identity"] == shard_identity(path)
            and all(os.path.exists(f) for f in token_files(cache_dir, os.path.basename(path))))


def tokenize_data():
    """Store the token ids of every shard for the current tokenizer; shards already done are skipped."""
    tokenizer = Tokenizer.from_directory()
    cache_dir = token_cache_dir(tokenizer)
    os.makedirs(cache_dir, exist_ok=True)
    for old in os.listdir(TOKENS_DIR):
        if os.path.join(TOKENS_DIR, old) != cache_dir:
            print(f"Tokens: removing the token cache of an older tokenizer ({old})")
            for f in os.listdir(os.path.join(TOKENS_DIR, old)):
                os.remove(os.path.join(TOKENS_DIR, old, f))
            os.rmdir(os.path.join(TOKENS_DIR, old))
    manifest_path = os.path.join(cache_dir, "manifest.json")
    manifest = read_json(manifest_path)
    if manifest is None or manifest.get("tokenizer") != tokenizer.fingerprint:
        manifest = {"tokenizer": tokenizer.fingerprint, "shards": {}}
    paths = list_parquet_files()
    names = {os.path.basename(p) for p in paths}
    for name in set(manifest["shards"]) - names:  # shards no longer in the data folder
        del manifest["shards"][name]
    for f in os.listdir(cache_dir):  # token files of removed shards, and leftovers of an interrupted run
        if f.endswith(".tmp") or (f.endswith(".npy") and f.split(".")[0] + ".parquet" not in names):
            os.remove(os.path.join(cache_dir, f))
    todo = [p for p in paths if not is_tokenized(manifest, cache_dir, p)]
    if not todo:
        print(f"Tokens: all {len(paths)} shards already tokenized at {cache_dir}")
        report_validation_size(manifest)
        return
    print(f"Tokens: tokenizing {len(todo)} shards ({len(paths) - len(todo)} already done)...")
    total, t0 = 0, time.time()
    for k, path in enumerate(todo, 1):
        name, identity = os.path.basename(path), shard_identity(path)
        tokens, offsets, row_groups = tokenize_shard(path, tokenizer)
        for dst, array in zip(token_files(cache_dir, name), (tokens, offsets)):
            with open(tmp_name(dst), "wb") as f:
                np.save(f, array)
            os.replace(tmp_name(dst), dst)
        manifest["shards"][name] = {"identity": identity, "row_groups": row_groups, "num_tokens": len(tokens)}
        write_json(manifest_path, manifest)
        total += len(tokens)
        print(f"  [{k}/{len(todo)}] {name}: {len(tokens) / 1e6:.2f}M tokens "
              f"({total / 1e6 / max(time.time() - t0, 1e-9):.1f}M tokens/s)", flush=True)
    print(f"Tokens: {len(paths)} shards tokenized at {cache_dir}")
    report_validation_size(manifest)


def report_validation_size(manifest):
    """Say how many tokens the validation shard holds; warn when the evaluation must go through it more than once."""
    n = manifest["shards"][VAL_FILENAME]["num_tokens"]
    print(f"Tokens: validation shard {VAL_FILENAME}: {n:,} tokens (the evaluation reads {EVAL_TOKENS:,})")
    if n < EVAL_TOKENS:
        print(f"warning: the validation shard has fewer tokens than the evaluation reads (EVAL_TOKENS): it will repeat "
              f"rows, going through the shard about {EVAL_TOKENS / n:.1f} times; more validation text avoids it")


def data_fingerprint():
    """8 hex digits naming the data a run trains and is measured on: the tokenizer's merges and every shard's name,
    documents and token count, as tokenized. Another --source, another download or another cache gives another
    fingerprint; the same data prepared again gives the same one (no paths or mtimes go in)."""
    tokenizer = Tokenizer.from_directory()
    manifest = read_json(os.path.join(token_cache_dir(tokenizer), "manifest.json"))
    if manifest is None:
        raise PrepareError(f"error: no token ids in {TOKENS_DIR}: {RUN_PREPARE}")
    h = hashlib.sha256(tokenizer.fingerprint.encode())
    for name, shard in sorted(manifest["shards"].items()):
        h.update(f"{name} {shard['row_groups']} {shard['num_tokens']}\n".encode())
    return h.hexdigest()[:8]

# ---------------------------------------------------------------------------
# Runtime utilities (imported by train.py and train_mlx.py)
# ---------------------------------------------------------------------------

class Tokenizer:
    """Minimal tokenizer wrapper. Training is handled above."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)
        # identifies the merges: the token cache is keyed by it, so a retrained tokenizer never reads stale ids
        state = enc.__getstate__()
        h = hashlib.sha256(state["pat_str"].encode())
        for table in (state["mergeable_ranks"], state["special_tokens"]):
            for token, rank in sorted(table.items(), key=lambda kv: kv[1]):
                h.update(b"%d:%d:" % (rank, len(token)) + (token if isinstance(token, bytes) else token.encode()))
        self.fingerprint = h.hexdigest()

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        tokenizer_dir = tokenizer_dir or TOKENIZER_DIR  # the dataset's, as chosen when called
        enc = load_encoding(tokenizer_dir)
        read_token_bytes(enc, tokenizer_dir)  # a stale table fails now, not at the evaluation after training
        return cls(enc)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        if prepend is not None and not isinstance(prepend, int):
            raise TypeError(f"prepend must be an int token id, got {type(prepend)}")
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend is not None:
                ids.insert(0, prepend)
        elif isinstance(text, list):
            ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if prepend is not None:
                for row in ids:
                    row.insert(0, prepend)
        else:
            raise ValueError(f"Invalid input type: {type(text)}")
        return ids

    def decode(self, ids):
        return self.enc.decode(ids)


def load_encoding(tokenizer_dir):
    """The tiktoken encoding that prepare.py trained, or a one-line error saying what to run."""
    marker = read_json(os.path.join(DATA_DIR, SOURCE_MARKER))
    held = f"the corpus built from --source {marker['source']}" if marker else list_parquet_files() and "climbmix"
    if held and (marker is not None) != (DATASET == SOURCE):  # climbmix and --source share a folder: which is there
        raise PrepareError(f"error: dataset {DATASET} is not prepared here ({DATA_DIR} holds {held}): {RUN_PREPARE}")
    if not os.path.exists(os.path.join(tokenizer_dir, TOKENIZER_RECORD)):
        if not list_parquet_files():
            raise PrepareError(f"error: no data in {DATA_DIR}: {RUN_PREPARE} first")
        raise PrepareError(f"error: no tokenizer in {tokenizer_dir}: {RUN_PREPARE}")
    enc, problem = read_encoding(tokenizer_dir)
    if problem is not None:
        raise PrepareError(f"error: {os.path.join(tokenizer_dir, 'tokenizer.pkl')} {problem}: {RUN_PREPARE}")
    return enc


def read_encoding(tokenizer_dir):
    """(the encoding in tokenizer_dir's tokenizer.pkl, None), or (None, what is wrong with the file)."""
    try:
        with open(os.path.join(tokenizer_dir, "tokenizer.pkl"), "rb") as f:
            enc = pickle.load(f)
    except FileNotFoundError:
        return None, "is missing"
    except Exception as e:  # unpickling damaged bytes can raise almost anything: EOFError, KeyError, MemoryError...
        return None, f"is unreadable ({type(e).__name__}: {' '.join(str(e).split())})"
    if not isinstance(enc, tiktoken.Encoding):
        return None, f"holds a {type(enc).__name__}, not a tokenizer"
    if enc.n_vocab != VOCAB_SIZE:
        return None, f"has {enc.n_vocab} tokens, not {VOCAB_SIZE}"
    return enc, None


def read_token_bytes(enc, tokenizer_dir):
    problem = token_bytes_problem(enc, tokenizer_dir)
    if problem is not None:
        raise PrepareError(f"error: {os.path.join(tokenizer_dir, 'token_bytes.npy')} {problem}: {RUN_PREPARE}")
    return np.load(os.path.join(tokenizer_dir, "token_bytes.npy"))


def get_token_bytes():
    """int32 array: the number of bytes of text each token id stands for (0 for special tokens)."""
    return read_token_bytes(load_encoding(TOKENIZER_DIR), TOKENIZER_DIR)


def _token_shards(tokenizer, split):
    """The token files of the split's shards, after checking that every shard was tokenized by this tokenizer."""
    train_paths, val_path = data_shards()
    cache_dir = token_cache_dir(tokenizer)
    manifest = read_json(os.path.join(cache_dir, "manifest.json"))
    if manifest is None or manifest.get("tokenizer") != tokenizer.fingerprint:
        raise PrepareError(f"error: the tokenizer does not match the data (no token ids for it in {TOKENS_DIR}): "
                           f"{RUN_PREPARE}")
    for path in train_paths + [val_path]:
        if not is_tokenized(manifest, cache_dir, path):
            raise PrepareError(f"error: {os.path.basename(path)} changed or was never tokenized with this tokenizer: "
                               f"{RUN_PREPARE}")
    paths = train_paths if split == "train" else [val_path]
    return [(*token_files(cache_dir, os.path.basename(p)), manifest["shards"][os.path.basename(p)]["row_groups"])
            for p in paths]


def _document_batches(token_shards, tokenizer_batch_size=128):
    """Infinite iterator over (tokens, document offsets, epoch), in the original's batches of 128 documents
    that never straddle a row group."""
    epoch = 1
    while True:
        for tokens_path, offsets_path, row_groups in token_shards:
            tokens = np.asarray(np.load(tokens_path, mmap_mode="r"))  # plain ndarray view: slicing a memmap is slow
            offsets = np.load(offsets_path).tolist()
            first = 0
            for n_docs in row_groups:
                for i in range(first, first + n_docs, tokenizer_batch_size):
                    yield tokens, offsets[i:min(i + tokenizer_batch_size, first + n_docs) + 1], epoch
                first += n_docs
        epoch += 1


def make_dataloader(tokenizer, B, T, split, buffer_size=1000):
    """
    BOS-aligned dataloader with best-fit packing, yielding (inputs, targets, epoch): int64 numpy arrays (B, T).
    Every row starts with BOS. Documents packed using best-fit to minimize cropping: the largest buffered document
    that fits entirely goes next; when none fits, the shortest is cropped to fill the row exactly (ties: the earliest
    buffered). 100% utilization (no padding). The rows are the original's, which tokenized on the fly and scanned
    the whole buffer per pick; here the ids come from the token cache and the buffer is kept sorted by length.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    token_shards = _token_shards(tokenizer, split)  # fail now, not at the first batch
    row_capacity = T + 1

    def batches():
        doc_batches = _document_batches(token_shards)
        by_length = {}  # document length -> FIFO of (tokens, start), earliest buffered first
        lengths = []    # the distinct lengths in by_length, sorted
        buffered = 0
        epoch = 1
        while True:
            rows = np.empty((B, row_capacity), dtype=np.int64)  # fresh each batch: the caller may keep the last one
            for row in rows:
                pos = 0
                while pos < row_capacity:
                    while buffered < buffer_size:
                        tokens, offsets, epoch = next(doc_batches)
                        for start, end in zip(offsets, offsets[1:]):
                            fifo = by_length.get(end - start)
                            if fifo is None:
                                fifo = by_length[end - start] = deque()
                                insort(lengths, end - start)
                            fifo.append((tokens, start))
                        buffered += len(offsets) - 1

                    remaining = row_capacity - pos
                    i = bisect_right(lengths, remaining) - 1  # largest document that fits entirely...
                    i = max(i, 0)                             # ...else the shortest, cropped to fill the row
                    length = lengths[i]
                    fifo = by_length[length]
                    tokens, start = fifo.popleft()
                    if not fifo:
                        del by_length[length], lengths[i]
                    buffered -= 1
                    n = min(length, remaining)
                    row[pos:pos + n] = tokens[start:start + n]
                    pos += n
            yield np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]), epoch

    return batches()

# ---------------------------------------------------------------------------
# Evaluation (DO NOT CHANGE — this is the fixed metric)
# ---------------------------------------------------------------------------

def evaluate_bpb(losses, tokenizer, batch_size, rows_per_call=None):
    """
    Bits per byte (BPB): vocab size-independent evaluation metric.
    Sums per-token cross-entropy (in nats), sums target byte lengths,
    then converts nats/byte to bits/byte. Special tokens (byte length 0)
    are excluded from both sums.
    Uses fixed MAX_SEQ_LEN and EVAL_TOKENS // MAX_SEQ_LEN validation rows, whatever batch_size is,
    so results are comparable across configs.
    losses(x, y) is the trainer's model: int64 numpy rows of inputs and targets in, their per-token losses in nats
    out as a numpy array. It gets each batch rows_per_call rows at a time: by default as many as hold at most 1 GiB
    of float32 logits (a 24 GB Mac's Metal buffer limit is ~14 GB); a model that bounds its logits itself may take
    whole batches. Rows of the last batch past EVAL_TOKENS may be in a call; they are not counted.
    """
    token_bytes = get_token_bytes()
    num_rows = EVAL_TOKENS // MAX_SEQ_LEN
    rows_per_call = rows_per_call or max(1, 2**30 // (MAX_SEQ_LEN * tokenizer.get_vocab_size() * 4))
    val_loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val")
    total_nats = 0.0  # float64 on the host: the same weights give the same number twice
    total_bytes = 0
    for first in range(0, num_rows, batch_size):
        x, y, _ = next(val_loader)
        counted = min(batch_size, num_rows - first)  # the last batch may be partial
        for i in range(0, counted, rows_per_call):
            xc, yc = x[i:i + rows_per_call], y[i:i + rows_per_call]
            loss = losses(xc, yc).reshape(yc.shape)[:counted - i].astype(np.float64)
            nbytes = token_bytes[yc[:counted - i]]
            total_nats += float(loss[nbytes > 0].sum())
            total_bytes += int(nbytes.sum())
    return total_nats / (math.log(2) * total_bytes)


def evaluation_rows():
    """(the rows evaluate_bpb reads, how many of them it reads before a validation document has to be used a second
    time). They differ when the validation shard is smaller than EVAL_TOKENS: every document placed in a row starts
    with BOS, so a row past that point holds more document starts than the shard has documents. (The loader's epoch
    cannot tell: its buffer reads up to 1000 documents ahead, so a shard of fewer documents reports epoch 2 at once.)"""
    tokenizer = Tokenizer.from_directory()
    num_rows = EVAL_TOKENS // MAX_SEQ_LEN
    documents = sum(sum(row_groups) for _, _, row_groups in _token_shards(tokenizer, "val"))
    val_loader = make_dataloader(tokenizer, 1, MAX_SEQ_LEN, "val")
    bos = tokenizer.get_bos_token_id()
    used = 0  # documents begun so far
    for row in range(num_rows):
        x, y, _ = next(val_loader)
        used += int((x == bos).sum() + (y[0, -1] == bos))
        if used > documents:
            return num_rows, row
    return num_rows, num_rows

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def hold_cache_lock():
    """Wait until no other prepare.py works on CACHE_DIR, then keep it out until this process exits (the lock goes
    with the open file, so a killed run never leaves a stale one)."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    lock = open(os.path.join(CACHE_DIR, LOCK_FILE), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        other = lock.read().strip()
        pid = f" (pid {other})" if other.isdigit() else ""
        print(f"Cache: waiting for another prepare.py{pid} to finish with {CACHE_DIR}", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def prepared_here(name):
    """--list's note on a dataset: whether this cache holds it prepared, its training shards and its size on disk."""
    folder = dataset_dir(name)
    data = os.path.join(folder, "data")
    complete = (read_json(os.path.join(data, SOURCE_MARKER)) or {}).get("complete")  # None: not built with --source
    if ((complete is not None) != (name == SOURCE) or complete is False
            or not os.path.exists(os.path.join(data, VAL_FILENAME))
            or not os.path.exists(os.path.join(folder, "tokenizer", TOKENIZER_RECORD))):
        return "no"
    shards = sum(f.endswith(".parquet") for f in os.listdir(data)) - 1
    nbytes = sum(os.path.getsize(os.path.join(root, f)) for part in ("data", "tokenizer", "tokens")
                 for root, _, files in os.walk(os.path.join(folder, part)) for f in files)
    return (f"yes: {shards} training shards, {nbytes / 1e9:.2f} GB on disk with tokenizer and token ids"
            + (" (runs use it)" if name == DATASET else ""))


def list_datasets():
    print(f"{'dataset':<17} {'shards':>6} {'default':>7} {'a shard':>8}  prepared here ({CACHE_DIR})")
    for name, d in DATASETS.items():
        print(f"{name:<17} {d.files:>6} {d.shards:>7} {d.file_mb:>5} MB  {prepared_here(name)}")
        print(f"{'':<17} {d.about}")
    print(f"{SOURCE:<17} {'-':>6} {'-':>7} {'-':>8}  {prepared_here(SOURCE)}")
    print(f"{'':<17} your own text: uv run prepare.py --source PATH")
    print(f"A shard's size is its file's download size (a converted shard keeps the text alone). `default` is the "
          f"number of training shards --num-shards downloads unless told; each dataset has a folder of its own, so "
          f"preparing one never deletes another. Runs use the dataset prepared last; AUTORESEARCH_DATASET=NAME picks "
          f"another.")


def main():
    parser = argparse.ArgumentParser(
        description="Prepare data and tokenizer for autoresearch", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""environment variables:
  AUTORESEARCH_CACHE_DIR  where data, tokenizer and token ids go (default ~/.cache/autoresearch; now {CACHE_DIR})
  AUTORESEARCH_DATASET    the dataset to prepare without --dataset, and the one runs use (default: the one prepared
                          last, else climbmix; now {DATASET})
  HF_ENDPOINT             a Hugging Face mirror to download from (now {HF_ENDPOINT})
  AUTORESEARCH_DATA_URL   a folder of shards (the dataset's files) to download from instead of the hub
                          (now {BASE_URL})""")
    parser.add_argument("--dataset", metavar="NAME", help=f"the dataset to download: {', '.join(DATASETS)} "
                        f"(default: the one prepared last, else climbmix; --list describes them)")
    parser.add_argument("--list", action="store_true",
                        help="list the datasets, their sizes and which are prepared here")
    parser.add_argument("--num-shards", type=int, help="Number of training shards to download (default: the dataset's, "
                        "10 for climbmix; -1 = all). The validation shard is always pinned.")
    parser.add_argument("--download-workers", type=int, default=8, help="Number of parallel download workers")
    parser.add_argument("--source", metavar="PATH", help="Build the data from local files instead of downloading: "
                        + SOURCE_HELP)
    args = parser.parse_args()
    if args.num_shards is not None and args.num_shards < 1 and args.num_shards != -1:
        parser.error("--num-shards must be >= 1, or -1 for all")
    if args.download_workers < 1:
        parser.error("--download-workers must be >= 1")
    if args.dataset is not None and args.dataset not in DATASETS:
        raise PrepareError(f"error: --dataset {args.dataset}: no such dataset; choose one of {', '.join(DATASETS)} "
                           f"(or --source PATH for text of your own)")
    if args.source and args.dataset:
        parser.error("--source builds a dataset of its own (source): leave out --dataset")
    if args.list:
        list_datasets()
        return
    use_dataset(SOURCE if args.source else args.dataset or DATASET)

    print(f"Cache directory: {CACHE_DIR}")
    print(f"Dataset: {DATASET} (runs use the dataset prepared last; AUTORESEARCH_DATASET=NAME picks another)")
    lock = hold_cache_lock()  # kept until exit (dropped, the file would close): two runs delete each other's files
    print()

    # Step 1: data
    marker = read_json(os.path.join(DATA_DIR, SOURCE_MARKER))
    if args.source:
        build_from_source(args.source)
    elif marker is not None and DATASET != SOURCE:
        raise PrepareError(f"error: {DATA_DIR} holds the corpus built from --source {marker['source']}, and climbmix "
                           f"would share its folder: set AUTORESEARCH_CACHE_DIR to another folder for climbmix")
    elif marker is not None and not marker.get("complete", True):  # a marker without the key predates it: complete
        raise PrepareError(f"error: building the data from --source {marker['source']} did not finish: rerun "
                           f"`uv run prepare.py --source {shlex.quote(marker['source'])}`")
    elif marker is not None:
        print(f"Data: using the shards built from --source {marker['source']} (delete {DATA_DIR} to download instead)")
    elif DATASET == SOURCE:
        raise PrepareError(f"error: no corpus built from --source in {DATA_DIR}: build one with "
                           f"`uv run prepare.py --source PATH`, or choose a dataset with --dataset")
    else:
        preset = DATASETS[DATASET]
        num_shards = args.num_shards or preset.shards
        download_data(preset.files if num_shards == -1 else num_shards, download_workers=args.download_workers)
    print()

    # Step 2: tokenizer, then the token ids of every shard
    train_tokenizer()
    tokenize_data()
    if read_json(os.path.join(CACHE_DIR, LAST_DATASET)) != {"dataset": DATASET}:  # a rerun changes nothing
        write_json(os.path.join(CACHE_DIR, LAST_DATASET), {"dataset": DATASET})
    print()
    print("Done! Ready to train.")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # the same command resumes: what is on disk is complete (written atomically) and kept, the rest is redone
        print(f"\ninterrupted: rerun `{shlex.join(['uv', 'run', 'prepare.py', *sys.argv[1:]])}` to resume",
              file=sys.stderr)
        sys.exit(130)
