"""
Test helpers for prepare.py: a synthetic climbmix-style corpus, a local HTTP shard server
with injectable faults, and the reference data loader that the fast one must match.
"""

import math
import os
import random
import socket
import struct
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# Running prepare on a cache of one's own
# ---------------------------------------------------------------------------

def run_prepare(*args, env=None, timeout=300):
    """Run `prepare.py` as the user would (a fresh process); returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def run_python(code, env=None, timeout=120):
    """Run a Python snippet in a fresh process from the repository root (prepare importable)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def use_cache(monkeypatch, cache_dir, dataset=None):
    """Point prepare (in this process, and any prepare.py started from it) at another cache folder, and at the
    dataset a fresh process would use there (the one prepared last, else climbmix) unless told another."""
    cache_dir = str(cache_dir)
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", cache_dir)
    monkeypatch.setattr(prepare, "CACHE_DIR", cache_dir)
    for name in ("DATASET", "DATA_DIR", "TOKENIZER_DIR", "TOKENS_DIR", "BASE_URL", "RUN_PREPARE"):
        monkeypatch.setattr(prepare, name, getattr(prepare, name))  # restored after the test
    prepare.use_dataset(dataset or prepare.default_dataset())

# ---------------------------------------------------------------------------
# Synthetic corpus
# ---------------------------------------------------------------------------

# A word that only occurs in the validation shard and one that only occurs after the
# first 10,000 characters of long training documents: a tokenizer trained on the right
# text (training shards, documents capped) never sees either often enough to merge them.
VAL_ONLY_WORD = "zyzzogetonic"
CAPPED_WORD = "quoxathrilbe"
COMMON_WORD = "the"

SYLLABLES = ("ka mo ri sun tel pra vo den lis ar qu ein ost ul bre ny cha fo gim ze"
             " to wa pe lo an mi rus hal dor ve ik sa nel om tri gu").split()
EXTRA = ["café", "naïve", "Zürich", "東京", "данные", "😀", "—", "…", "3.14", "2024", "42%", "(x)", "#7"]


def _vocabulary(n_words=30000, seed=1234):
    """30,000 pseudo-words, most frequent first, with Zipf cumulative weights: plenty of pairs for 8188 merges."""
    rng = random.Random(seed)
    words = {COMMON_WORD, "and", "of", "a", "to", "in"}
    while len(words) < n_words:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    words = sorted(words, key=lambda w: (w != COMMON_WORD, len(w), w))
    cum_weights, total = [], 0.0
    for rank in range(len(words)):
        total += 1.0 / (rank + 1) ** 1.05
        cum_weights.append(total)
    return words, cum_weights


WORDS, CUM_WEIGHTS = _vocabulary()


def make_docs(rng, n_docs, long_every=0, sentinel=None):
    """Pseudo-English documents: Zipf-distributed pseudo-words, punctuation, digits, unicode, paragraphs;
    every 17th very short, every long_every-th longer than MAX_SEQ_LEN tokens (so it gets cropped)."""
    docs = []
    for i in range(n_docs):
        if long_every and i % long_every == long_every - 1:
            n_words = rng.randint(2500, 4000)
        elif i % 17 == 0:
            n_words = rng.randint(1, 4)
        else:
            n_words = min(int(rng.paretovariate(1.2) * 40), 4000)
        parts = []
        for w in rng.choices(WORDS, cum_weights=CUM_WEIGHTS, k=n_words):
            r = rng.random()
            if r < 0.02:
                w = rng.choice(EXTRA)
            elif r < 0.05:
                w = str(rng.randint(0, 99999))
            elif r < 0.12:
                w += rng.choice(".,;:!?")
            elif r < 0.14:
                w += "\n\n"
            parts.append(w)
        doc = " ".join(parts).replace("\n\n ", "\n\n")
        docs.append(doc if sentinel is None else sentinel(i, doc))
    return docs


def make_multilingual_docs(rng, n_docs):
    """Accented Latin and Chinese-with-kana pseudo-words: enough distinct multi-byte characters that the tokenizer
    learns merges that end inside a character (UTF-8 lead bytes shared by many characters pair up first)."""
    vowels = "a e i o u é è ê à ç ü ö ä ß ñ ø å œ ł ş ž".split()
    consonants = "b c d f g h j k l m n p r s t v z".split()
    hanzi = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA5), 1500)]
    kana = [chr(c) for c in range(0x3041, 0x3097)]
    latin = ["".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    cjk = ["".join(rng.choice(hanzi) for _ in range(rng.randint(1, 3))) + rng.choice(kana) for _ in range(6000)]
    return [" ".join(rng.choice(latin if rng.random() < 0.5 else cjk) for _ in range(rng.randint(20, 300)))
            for _ in range(n_docs)]


def _capped(i, doc):
    # every 25th training document: 10,000 characters of ordinary text, then the capped word
    if i % 25 != 3:
        return doc
    head = (doc + " ") * (10_000 // (len(doc) + 1) + 1)
    return head[:10_000] + (" " + CAPPED_WORD) * 150


def _val_only(i, doc):
    return doc + (" " + VAL_ONLY_WORD) * 30 if i % 2 == 0 else doc


def write_shard(path, docs, row_group_size):
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


def make_corpus(folder, num_train_shards=3, docs_per_shard=900, row_group_size=300, seed=0):
    """Writes shard_00000.. (training) and shard_06542 (validation). Row groups of 300 documents
    (not a multiple of 128) so tokenizer batches end early at every row group boundary."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num_train_shards):
        docs = make_docs(rng, docs_per_shard + 37 * i, long_every=40, sentinel=_capped)
        write_shard(os.path.join(folder, f"shard_{i:05d}.parquet"), docs, row_group_size)
    docs = make_docs(rng, 400, long_every=50, sentinel=_val_only)
    write_shard(os.path.join(folder, prepare.VAL_FILENAME), docs, 150)

# ---------------------------------------------------------------------------
# Local HTTP shard server with injectable faults
# ---------------------------------------------------------------------------

class _ShardHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        with server.lock:
            server.requests.append(self.path)
            pending = server.faults.get(name)
            fault = pending.pop(0) if pending else None
        path = os.path.join(server.folder, name)
        if fault == "500" or not os.path.isfile(path):
            self.send_response(500 if fault == "500" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault == "reset":  # RST instead of a response: the client sees "connection reset by peer"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the socket closes only once its file objects are closed too
            self.wfile.close()
            self.connection.close()
            return
        with open(path, "rb") as f:
            body = f.read()
        if fault == "garbage":  # a complete response that is not a parquet file
            body = random.Random(0).randbytes(len(body))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault in ("truncate", "stall"):
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if fault == "stall":  # hold the connection open until the test lets go
                server.release.wait(60)
            self.close_connection = True
            return
        self.wfile.write(body)

    def finish(self):
        try:
            super().finish()
        except (OSError, ValueError):  # the socket was reset on purpose
            pass


@contextmanager
def serve_shards(folder):
    """A real HTTP server on 127.0.0.1 (ephemeral port, in a thread) serving the files of folder under any
    path prefix. server.faults[name] is a list of faults applied to that file's next requests, one each:
    "500", "reset", "truncate" (half the body, then close), "garbage" (a full body of random bytes),
    "stall" (half the body, then wait for server.release). server.requests lists the paths requested."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ShardHandler)
    server.daemon_threads = True
    server.folder = str(folder)
    server.faults = {}
    server.requests = []
    server.lock = threading.Lock()
    server.release = threading.Event()
    server.handle_error = lambda request, client_address: None  # injected faults are not server errors
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()

# ---------------------------------------------------------------------------
# Reference data loader: the original autoresearch loop, tokenizing on the fly
# ---------------------------------------------------------------------------

def reference_dataloader(tokenizer, B, T, split, buffer_size=1000):
    """The packing rules written as plainly as possible; prepare.make_dataloader must yield the same rows.
    Documents come in shard order, row group order, document order, tokenized in batches of 128 that never
    straddle a row group; BOS before every document; rows of T+1 tokens; the largest buffered document that
    fits entirely (ties: earliest buffered), else the shortest (ties: earliest) cropped to fill the row."""
    files = sorted(f for f in os.listdir(prepare.DATA_DIR) if f.endswith(".parquet"))
    files = [f for f in files if f != prepare.VAL_FILENAME] if split == "train" else [prepare.VAL_FILENAME]

    def document_batches():
        epoch = 1
        while True:
            for f in files:
                pf = pq.ParquetFile(os.path.join(prepare.DATA_DIR, f))
                for rg in range(pf.num_row_groups):
                    texts = pf.read_row_group(rg).column("text").to_pylist()
                    for i in range(0, len(texts), 128):
                        yield texts[i:i + 128], epoch
            epoch += 1

    batches = document_batches()
    bos = tokenizer.get_bos_token_id()
    buffer = []
    epoch = 1
    while True:
        rows = np.empty((B, T + 1), dtype=np.int64)
        for row in rows:
            pos = 0
            while pos < T + 1:
                while len(buffer) < buffer_size:
                    texts, epoch = next(batches)
                    buffer.extend(tokenizer.encode(texts, prepend=bos))
                remaining = T + 1 - pos
                best, best_len = -1, 0  # the largest document that fits; a later one must be strictly longer
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best < 0:  # none fits: the shortest (min returns the first, i.e. earliest, on ties)
                    best = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                doc = buffer.pop(best)[:remaining]
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
        yield rows[:, :-1].copy(), rows[:, 1:].copy(), epoch

# ---------------------------------------------------------------------------
# Reference metric: evaluate_bpb written out from its definition
# ---------------------------------------------------------------------------

def reference_bpb(tokenizer, losses, batch_size, rows_per_call=16, dtype=np.float64):
    """What evaluate_bpb must return, to the last bit. EVAL_TOKENS // MAX_SEQ_LEN validation rows from the reference
    loader, in batches of batch_size, given to losses(x, y) rows_per_call rows at a time (16 rows of float32 logits at
    vocab 8192 are 1 GiB). Each call's sum is taken in float64 (or dtype) over the tokens of its counted rows whose
    target stands for at least one byte of text (the special tokens stand for none); the sums are added in call order,
    the bytes are counted from the tokenizer's own tokens, and nats / (ln 2 * bytes) is the answer."""
    enc = tokenizer.enc
    special = {enc.encode_single_token(name) for name in prepare.SPECIAL_TOKENS}
    token_bytes = np.array([0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)])
    num_rows = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    loader = reference_dataloader(tokenizer, batch_size, prepare.MAX_SEQ_LEN, "val")
    nats, nbytes = dtype(0), 0
    for first in range(0, num_rows, batch_size):
        x, y, _ = next(loader)
        for i in range(0, min(batch_size, num_rows - first), rows_per_call):
            loss = np.asarray(losses(x[i:i + rows_per_call], y[i:i + rows_per_call]), dtype=dtype)
            counted = y[i:min(i + rows_per_call, num_rows - first)]
            loss = loss.reshape(-1, prepare.MAX_SEQ_LEN)[:len(counted)]
            nats += loss[token_bytes[counted] > 0].sum()
            nbytes += token_bytes[counted].sum()
    return float(nats / (math.log(2) * nbytes))
