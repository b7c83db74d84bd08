"""Token shards and the packing loader: shards decode back to the documents, every document token is placed once or
counted as cropped (checked by a perfect matching of row segments to documents), packing equals a brute-force
best-fit packer, loader state restores bit-exactly, ranks are disjoint, and `data prepare` killed with SIGKILL then
rerun gives byte-identical shards."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chatsmith import config
from chatsmith.common import UserError
from chatsmith.data import shards
from chatsmith.data.shards import PackingLoader, ShardReader, iter_val_batches

WORDS_EN = "the model reads text and learns to predict the next token from many small examples".split()
WORDS_ZH = list("我们今天学习语言模型它会预测下一个词语并且不断进步")
VOCAB = 400


def write_corpus(path: Path, n_docs: int, seed: int = 0, max_words: int = 120) -> None:
    """Unique documents ("i: ..."), English and Chinese, 1 to max_words words: many longer than the test rows."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            n = rng.randint(1, max_words)
            if i % 3 == 0:
                text = "".join(rng.choice(WORDS_ZH) for _ in range(n))
            else:
                text = " ".join(rng.choice(WORDS_EN) for _ in range(n))
            f.write(json.dumps({"text": f"{i}: {text}"}, ensure_ascii=False) + "\n")


def stage(run: str, corpus: Path, **shards_cfg) -> config.DataStage:
    return config.make(config.DataStage, {
        "run": {"preset": "smoke", "run": run},
        "data": {"sources": (f"local:{corpus}",), "max_docs": 0, "val_fraction": 0.1},
        "shards": {"shard_docs": 64, "workers": 2, **shards_cfg},
    })


def train_tokenizer(home: Path, run: str, corpus: Path) -> None:
    from chatsmith.tokenizer import Tokenizer

    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    Tokenizer.train(texts, VOCAB).save(home / "runs" / run / "tokenizer")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A CHATSMITH_HOME with run 'base': corpus, tokenizer, documents and shards (built once for the module)."""
    home = tmp_path_factory.mktemp("home")
    corpus = home / "corpus.jsonl"
    write_corpus(corpus, 600)
    old = os.environ.get("CHATSMITH_HOME")
    os.environ["CHATSMITH_HOME"] = str(home)
    try:
        train_tokenizer(home, "base", corpus)
        summary = shards.main(stage("base", corpus))
    finally:
        if old is None:
            del os.environ["CHATSMITH_HOME"]
        else:
            os.environ["CHATSMITH_HOME"] = old
    return home, corpus, summary


def load_tok(home: Path):
    from chatsmith.tokenizer import Tokenizer

    return Tokenizer.load(home / "runs" / "base" / "tokenizer")


def documents(home: Path, split: str) -> list[str]:
    path = home / "runs" / "base" / "documents" / f"{split}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def rows_of(loader) -> list[list[int]]:
    """Every row the loader yields until it ends, cut to its valid tokens (targets -1 mark padding)."""
    rows = []
    for x, y in loader:
        full = torch.cat([x, y[:, -1:]], dim=1)  # (B, T+1): inputs = row[:-1], targets = row[1:]
        for r in range(x.shape[0]):
            valid = int((y[r] != -1).sum()) + 1 if y[r, 0] != -1 else 0
            assert (y[r, : valid - 1] != -1).all() if valid else True, "padding only at the end of a row"
            if valid:
                rows.append(full[r, :valid].tolist())
    return rows


def segments(rows: list[list[int]], bos: int) -> list[tuple[int, ...]]:
    out = []
    for row in rows:
        assert row[0] == bos, "every row starts at a document boundary"
        cuts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
        out += [tuple(row[a:b]) for a, b in zip(cuts, cuts[1:])]
    return out


def match(segs: list[tuple[int, ...]], docs: list[tuple[int, ...]]) -> list[int]:
    """A perfect matching segment -> document with segment a prefix of its document (Kuhn's algorithm), or fail."""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for d, doc in enumerate(docs):
        for n in range(1, len(doc) + 1):
            by_prefix.setdefault(doc[:n], []).append(d)
    owner: dict[int, int] = {}

    def augment(s: int, seen: set[int]) -> bool:
        for d in by_prefix.get(segs[s], []):
            if d not in seen:
                seen.add(d)
                if d not in owner or augment(owner[d], seen):
                    owner[d] = s
                    return True
        return False

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for s in range(len(segs)):
        assert augment(s, set()), f"segment {s} is not a prefix of any unused document"
    assert len(owner) == len(docs) == len(segs), "every document is placed exactly once"
    seg_doc = [0] * len(segs)
    for d, s in owner.items():
        seg_doc[s] = d
    return seg_doc


def encoded(home: Path, split: str) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in load_tok(home).encode_batch(documents(home, split), bos=True)]


# ---------------------------------------------------------------------------------------------------------------------
# data prepare


def test_shards_hold_the_encoded_documents(prepared):
    home, _, summary = prepared
    tok = load_tok(home)
    run = home / "runs" / "base"
    assert shards.shard_dtype(VOCAB) == np.uint16 and shards.shard_dtype(65537) == np.uint32
    for split in ("train", "val"):
        index = json.loads((run / "shards" / split / "index.json").read_text())
        assert index == summary["splits"][split]
        assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size and index["bos_id"] == tok.bos_id
        texts = documents(home, split)
        reader = ShardReader(run / "shards" / split)
        assert len(reader) == len(texts) == index["docs"] > 0
        assert [r["docs"] for r in index["shards"]][:-1] == [64] * (len(index["shards"]) - 1)
        reference = tok.encode_batch(texts, bos=True)
        for i, text in enumerate(texts):
            doc = reader.doc(i)
            assert doc.tolist() == reference[i] and doc[0] == tok.bos_id
            assert tok.decode(doc[1:].tolist()) == text
        assert index["tokens"] == sum(map(len, reference))
        assert index["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        for rec in index["shards"]:
            path = run / "shards" / split / f"{rec['name']}.bin"
            assert np.fromfile(path, dtype=np.uint16).size == rec["tokens"]
            assert shards.sha256_file(path) == rec["sha256"]
    top = json.loads((run / "shards" / "index.json").read_text())
    assert top["plan"]["tokenizer_sha256"] == shards.sha256_file(run / "tokenizer" / "tokenizer.json")
    assert json.loads((run / "config.json").read_text())["data"]["shards"]["shard_docs"] == 64
    doc_index = json.loads((run / "documents" / "index.json").read_text())
    assert doc_index["splits"]["train"]["docs"] + doc_index["splits"]["val"]["docs"] == 600


def test_rerun_is_a_no_op_and_a_changed_data_config_rebuilds(prepared, chatsmith_home):
    home, corpus, _ = prepared
    shutil.copytree(home / "runs" / "base", chatsmith_home / "runs" / "base")
    run = chatsmith_home / "runs" / "base"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "config.json"}
    shards.main(stage("base", corpus))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    summary = shards.main(config.make(config.DataStage, {
        "run": {"preset": "smoke", "run": "base"},
        "data": {"sources": (f"local:{corpus}",), "max_docs": 200, "val_fraction": 0.1},
        "shards": {"shard_docs": 64, "workers": 1}}))
    n = summary["splits"]["train"]["docs"] + summary["splits"]["val"]["docs"]
    assert n < 600 and len(ShardReader(run / "shards" / "train")) == summary["splits"]["train"]["docs"]


def test_missing_tokenizer_exits_2_with_one_sentence(tmp_path, chatsmith_home):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, 10)
    out = subprocess.run([sys.executable, "-m", "chatsmith", "data", "prepare", "--preset", "smoke", "--run", "nope",
                          "--sources", f"local:{corpus}"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CHATSMITH_HOME": str(chatsmith_home)})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no tokenizer in run nope; run `chatsmith tokenizer train --run nope` first" in out.stderr


def test_empty_corpus_and_empty_split_are_user_errors(prepared, tmp_path, chatsmith_home):
    home, corpus, _ = prepared
    shutil.copytree(home / "runs" / "base" / "tokenizer", chatsmith_home / "runs" / "e" / "tokenizer")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError):
        shards.main(stage("e", empty))
    assert not (chatsmith_home / "runs" / "e" / "shards" / "index.json").exists()
    no_val = config.make(config.DataStage, {"run": {"preset": "smoke", "run": "e"},
                                            "data": {"sources": (f"local:{corpus}",), "val_fraction": 0.0}})
    with pytest.raises(UserError, match="val split has no documents"):
        shards.main(no_val)
    assert not (chatsmith_home / "runs" / "e" / "shards" / "index.json").exists()
    assert not (chatsmith_home / "runs" / "e" / "documents" / "index.json").exists()


def shard_files(home: Path, run: str) -> dict[str, bytes]:
    root = home / "runs" / run / "shards"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_killed_with_sigkill_resumes_to_identical_shards(prepared, tmp_path, chatsmith_home):
    home, _, _ = prepared
    corpus = tmp_path / "big.jsonl"
    write_corpus(corpus, 12000, seed=1, max_words=300)
    for h in (chatsmith_home, tmp_path / "ref"):
        shutil.copytree(home / "runs" / "base" / "tokenizer", h / "runs" / "r" / "tokenizer")
    cmd = [sys.executable, "-m", "chatsmith", "data", "prepare", "--preset", "smoke", "--run", "r", "--sources",
           f"local:{corpus}", "--max-docs", "0", "--val-fraction", "0.1", "--shard-docs", "100", "--workers", "2"]
    env = {**os.environ, "CHATSMITH_HOME": str(chatsmith_home)}
    train_dir = chatsmith_home / "runs" / "r" / "shards" / "train"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300  # forkserver workers import chatsmith (and torch) first: slow on a busy machine
    while len(list(train_dir.glob("shard_*.json"))) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: the parent and its pool workers
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed = sorted(train_dir.glob("shard_*.json"))
    n_train_shards = -(-json.loads((train_dir.parent.parent / "documents" / "index.json").read_text())
                       ["splits"]["train"]["docs"] // 100)
    assert 10 <= len(committed) < n_train_shards, "the kill should land midway; make the corpus bigger"
    assert not (chatsmith_home / "runs" / "r" / "shards" / "index.json").exists()
    assert not (train_dir / f"shard_{n_train_shards - 1:05d}.json").exists()
    # what an interruption leaves: a temp file, a shard whose commit record never came, a damaged committed shard
    (train_dir / ".shard_00099.bin.12345.tmp").write_bytes(b"partial")
    uncommitted = train_dir / f"shard_{n_train_shards - 1:05d}.bin"
    uncommitted.write_bytes(b"\x01\x02" * 10)
    damaged = train_dir / committed[1].with_suffix(".bin").name
    data = bytearray(damaged.read_bytes())
    data[5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    kept = train_dir / committed[0].with_suffix(".bin").name
    kept_mtime = kept.stat().st_mtime_ns

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "keeping" in out.stderr
    assert kept.stat().st_mtime_ns == kept_mtime, "a complete shard is kept, not rewritten"
    out = subprocess.run(cmd, env={**os.environ, "CHATSMITH_HOME": str(tmp_path / "ref")}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    resumed, reference = shard_files(chatsmith_home, "r"), shard_files(tmp_path / "ref", "r")
    assert resumed.keys() == reference.keys() and not [k for k in resumed if k.endswith(".tmp")]
    assert [k for k in resumed if resumed[k] != reference[k]] == []


# ---------------------------------------------------------------------------------------------------------------------
# the loader


def brute_force_rows(docs: list[tuple[int, ...]], order: list[int], width: int, buffer_docs: int) -> list[list[int]]:
    """The packing rule spelled out: top the buffer up in stream order, put in the largest document that fits (the
    earliest of equals), else crop the shortest (the earliest of equals) to fill the row."""
    stream, buffer, rows = list(order), [], []
    while stream or buffer:
        row = []
        while len(row) < width:
            while stream and len(buffer) < buffer_docs:
                buffer.append(stream.pop(0))
            if not buffer:
                break
            space = width - len(row)
            fitting = [d for d in buffer if len(docs[d]) <= space]
            if fitting:
                pick = max(fitting, key=lambda d: (len(docs[d]), -buffer.index(d)))
            else:
                pick = min(buffer, key=lambda d: (len(docs[d]), buffer.index(d)))
            row += docs[pick][:space]
            buffer.remove(pick)
        rows.append(row)
    return rows


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_epoch_places_every_token_once_or_counts_it_cropped(prepared, shuffle):
    home, _, _ = prepared
    docs = encoded(home, "train")
    loader = PackingLoader(home / "runs" / "base" / "shards" / "train", batch_size=3, seq_len=48, buffer_docs=16,
                           epochs=1, shuffle=shuffle, seed=7)
    rows = rows_of(loader)
    segs = segments(rows, load_tok(home).bos_id)
    seg_doc = match(segs, docs)
    total = sum(map(len, docs))
    stats = loader.stats
    assert sum(map(len, rows)) == stats["tokens"] == total - stats["cropped_tokens"]
    assert stats["docs"] == len(docs) and stats["epoch"] == 1
    assert stats["cropped_tokens"] == sum(len(docs[d]) - len(s) for s, d in zip(segs, seg_doc)) > 0
    assert all(len(r) == 49 for r in rows[:-1]), "rows are full until the data runs out"
    assert max(map(len, docs)) > 49, "the corpus has documents longer than a row"
    order = list(range(len(docs)))
    if shuffle:
        order = np.random.default_rng([7, 0]).permutation(len(docs)).tolist()
    assert rows == brute_force_rows(docs, order, 49, 16)
    if shuffle:
        other_seed = PackingLoader(home / "runs" / "base" / "shards" / "train", 3, 48, buffer_docs=16, epochs=1, seed=8)
        assert rows_of(other_seed) != rows


def test_state_restores_exactly_mid_epoch_and_across_epochs(prepared):
    home, _, _ = prepared
    shard_dir = home / "runs" / "base" / "shards" / "train"
    loader = PackingLoader(shard_dir, batch_size=4, seq_len=64, buffer_docs=32, seed=3)
    states, batches, epochs = {}, [], []
    for step in range(260):
        states[step] = json.loads(json.dumps(loader.state_dict()))
        batches.append(loader.next_batch())
        epochs.append(loader.stats["epoch"])
    assert epochs[-1] >= 2, "the run crosses epoch boundaries"
    assert len(json.dumps(states[100])) < 16_000
    boundary = epochs.index(1)
    for step in (0, 1, 37, boundary - 2, boundary + 1, epochs.index(2) - 3):
        fresh = PackingLoader(shard_dir, batch_size=4, seq_len=64, buffer_docs=32, seed=3)
        fresh.load_state_dict(states[step])
        for ahead in range(6):
            x, y = fresh.next_batch()
            assert torch.equal(x, batches[step + ahead][0]) and torch.equal(y, batches[step + ahead][1]), (step, ahead)
    assert all(bool((x[:, 0] == load_tok(home).bos_id).all()) for x, _ in batches)
    assert all(bool((y != -1).all()) for _, y in batches), "an infinite loader never pads"
    other = PackingLoader(shard_dir, batch_size=4, seq_len=64, buffer_docs=32, seed=3, world_size=2)
    with pytest.raises(UserError, match="another corpus or process layout"):
        other.load_state_dict(states[5])


def test_ranks_are_disjoint_and_cover_the_split(prepared):
    home, _, _ = prepared
    docs = encoded(home, "train")
    bos = load_tok(home).bos_id
    placed = []
    for rank in range(2):
        loader = PackingLoader(home / "runs" / "base" / "shards" / "train", 2, 40, rank=rank, world_size=2,
                               buffer_docs=8, epochs=1)
        segs = segments(rows_of(loader), bos)
        mine = sorted(np.random.default_rng([0, 0]).permutation(len(docs))[rank::2].tolist())  # the documented order
        match(segs, [docs[d] for d in mine])  # exactly this rank's documents, each once
        placed.append(set(mine))
        assert loader.stats["docs"] == len(mine)
    assert not placed[0] & placed[1] and placed[0] | placed[1] == set(range(len(docs)))


def test_val_batches_are_a_deterministic_finite_pass(prepared):
    home, _, _ = prepared
    val_dir = home / "runs" / "base" / "shards" / "val"
    docs = encoded(home, "val")
    a = list(iter_val_batches(val_dir, 2, 32, 10**9))
    b = list(iter_val_batches(val_dir, 2, 32, 10**9))
    assert len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    placed = sum(int((y != -1).sum()) + int((y[:, 0] != -1).sum()) for _, y in a)  # targets + each row's first token
    loader = PackingLoader(val_dir, 2, 32, epochs=1, seed=0)
    rows = rows_of(loader)
    assert placed == sum(map(len, rows)) == sum(map(len, docs)) - loader.stats["cropped_tokens"]
    assert len(list(iter_val_batches(val_dir, 2, 32, 3 * 64 + 5))) == min(3, len(a))
    assert len(list(iter_val_batches(val_dir, 2, 32, 1))) == 1


def test_long_documents_are_counted_and_keep_tails_packs_their_pieces(prepared):
    home, _, _ = prepared
    shard_dir = home / "runs" / "base" / "shards" / "train"
    docs = encoded(home, "train")
    width = 49
    dropping = PackingLoader(shard_dir, batch_size=3, seq_len=48, buffer_docs=16, epochs=1, seed=7)
    long = [d for d in docs if len(d) > width]
    assert long, "the corpus has documents longer than a row"
    assert dropping.data_stats() == {
        "documents": len(docs), "tokens": sum(map(len, docs)), "row_tokens": width, "longer_than_row": len(long),
        "tokens_beyond_row": sum(len(d) - width for d in long), "keep_tails": False, "items": len(docs)}
    kept = PackingLoader(shard_dir, batch_size=3, seq_len=48, buffer_docs=16, epochs=1, seed=7, keep_tails=True)
    pieces = [d[i : i + width] for d in docs for i in range(0, len(d), width)]  # only the first starts with BOS
    assert kept.data_stats()["items"] == len(pieces) and kept.data_stats()["keep_tails"]
    rows = rows_of(kept)
    order = np.random.default_rng([7, 0]).permutation(len(pieces)).tolist()
    assert rows == brute_force_rows(pieces, order, width, 16)  # pieces packed like documents
    dropped_rows = rows_of(dropping)
    assert kept.stats["cropped_tokens"] < dropping.stats["cropped_tokens"]
    assert sum(map(len, rows)) == kept.stats["tokens"] > sum(map(len, dropped_rows))
    state = json.loads(json.dumps(kept.state_dict()))
    with pytest.raises(UserError, match="another corpus or process layout"):
        dropping.load_state_dict(state)  # a resume cannot switch --keep-tails silently


def test_shard_workers_are_not_forked_after_threads(prepared, tmp_path, monkeypatch):
    """The pool starts its workers with forkserver (fork after the tokenizers library's threads can deadlock), and
    they write the same shards."""
    home, _, _ = prepared
    real = shards.multiprocessing.get_context
    methods = []

    def get_context(method=None):
        methods.append(method)
        return real(method)

    monkeypatch.setattr(shards.multiprocessing, "get_context", get_context)
    run = home / "runs" / "base"
    index = json.loads((run / "shards" / "train" / "index.json").read_text())
    out = tmp_path / "shards"
    records = shards.tokenize_split(run / "documents" / "train.jsonl", out, run / "tokenizer" / "tokenizer.json",
                                    stage("base", Path("unused")).shards.shard_docs, 2,
                                    shards.shard_dtype(index["vocab_size"]))
    assert methods == ["forkserver"]
    assert [r["sha256"] for r in records] == [r["sha256"] for r in index["shards"]]
