"""Token shards on disk and the BOS-aligned packing loader that reads them.

    chatsmith data prepare --preset cpu         # documents -> run_dir/shards/{train,val}/ (parallel, resumable)
    chatsmith bench data --json                 # its throughput, 1 worker beside N workers

`data prepare` has two steps, each skipped when its output is already complete:

1. documents: the run's sources (data/sources.py) are read once into `documents/{train,val}.jsonl` (one
   {"text", "source"} object per line, temp file + rename) and `documents/index.json` records the document counts and
   a hash of the data config. A changed data config is detected through that hash: documents and shards are rebuilt.
2. shards: `documents/<split>.jsonl` is cut into chunks of `--shard-docs` documents by line count (deterministic, no
   dependence on worker timing); a multiprocessing pool tokenizes chunk i into
       shards/<split>/shard_NNNNN.bin    flat token ids, uint16 when vocab <= 65536 else uint32, each document [bos]+ids
       shards/<split>/shard_NNNNN.idx    npy int64 document offsets into the .bin (n_docs + 1 of them, from 0)
       shards/<split>/shard_NNNNN.json   the shard's commit record: docs, tokens, text bytes, sha256 of .bin and .idx
   each written to a temp name (`.shard_*.tmp`), fsynced, renamed, the .json last. Then `shards/<split>/index.json`
   (the loader's table of contents) and finally `shards/index.json`, whose presence means the whole step completed.
   `shards/plan.json` pins what the shards are made of (tokenizer hash, documents hash, shard size); a rerun with the
   same plan keeps every shard whose commit record matches its files (size and sha256) and redoes the rest, so a
   prepare killed at any point (even SIGKILL) and rerun gives byte-identical shards (tested). Temp names never look
   like shards and are deleted on the next run. One prepare per run at a time.
   Workers turn off the tokenizers library's own threads (TOKENIZERS_PARALLELISM=false): one process per core; the
   pool also spreads the Python parts (JSON, flattening, sha256) over the cores (`chatsmith bench data` measures it
   against one worker and against the library's own threads). Workers are started by forkserver (spawn off Linux),
   never by fork: the parent has already started threads (the tokenizers library's, gloo's under torchrun), and a
   fork copies their locks in whatever state they are in, the classic fork-after-threads deadlock.

The loader, `PackingLoader`, packs rows of T+1 tokens (inputs = row[:-1], targets = row[1:]) nanochat style: every
row starts at a document boundary (BOS), and is filled by best fit from a buffer of `buffer_docs` documents (the
largest document that fits the space left). When none fits, the *shortest* buffered document is cropped to fill the
row exactly: every buffered document is then longer than the space, so the shortest one drops the fewest tokens
(cropped tokens are dropped, never carried over, and counted in `loader.stats`). Documents longer than T+1 are cropped
the same way, their tails dropped and counted (`data_stats()`: documents longer than a row, tokens beyond it), unless
`keep_tails`: then a long document is cut into pieces of T+1 tokens, each packed as an item of its own (only the first
starts with BOS). Order: a seeded permutation of all documents per epoch (documents.jsonl lists the sources one after
another, so reading it in order would train on one source at a time); rank r of world_size takes positions r,
r + world_size, ... of each epoch's permutation, so ranks are disjoint within an epoch. The state is
"position of the next document + the buffered documents as positions": a few KB of JSON, and restoring it gives
exactly the same next batches (tested with torch.equal, mid-epoch and across an epoch boundary). Shards are
memory-mapped (np.memmap): only document offsets (8 bytes per document) live in memory.

With `epochs` set, the loader ends (StopIteration) after that many passes; the last batch is padded: padding inputs
are BOS and padding targets are -1 (the ignore index). `iter_val_batches` is that, one epoch, for evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import config
from ..common import UserError, atomic_write_json, fsync_dir, log, progress, read_json, run_dir

SPLITS = ("train", "val")
IGNORE_INDEX = -1


# ---------------------------------------------------------------------------------------------------------------------
# small helpers


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids of vocabularies up to 65536 (half the disk and page cache of uint32)."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def tokenizer_file(run: Path, run_name: str) -> Path:
    path = run / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"no tokenizer in run {run_name}; run `chatsmith tokenizer train --run {run_name}` first")
    return path


def _write_synced(path: Path, write) -> None:
    """Call write(f) on a temp file named `.{name}.tmp` beside `path`, fsync, rename. Temp names never match shards."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# step 1: documents


def documents_hash(data: config.DataConfig) -> str:
    return sha256_json(dataclasses.asdict(data))


def documents_index(data: config.DataConfig, doc_dir: Path) -> dict | None:
    """documents/index.json when the documents in `doc_dir` are complete and were made with this data config."""
    try:
        index = json.loads((doc_dir / "index.json").read_text(encoding="utf-8"))
        ok = index["data_hash"] == documents_hash(data) and all(
            (doc_dir / f"{s}.jsonl").stat().st_size == index["splits"][s]["bytes"] for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index if ok else None


def prepare_documents(data: config.DataConfig, doc_dir: Path) -> dict:
    """Write documents/{train,val}.jsonl from the sources once; returns documents/index.json (skips when complete)."""
    from . import sources

    index = documents_index(data, doc_dir)
    if index is not None:
        return index
    index_path = doc_dir / "index.json"
    if index_path.exists():
        log(f"the data config or the files in {doc_dir} changed since the documents were written; rebuilding them")
        index_path.unlink()
    want = documents_hash(data)
    doc_dir.mkdir(parents=True, exist_ok=True)
    for tmp in doc_dir.glob(".*.tmp"):  # left by an interrupted run
        tmp.unlink(missing_ok=True)
    # one pass over the sources writes both splits (each source is read and parsed once)
    paths = {split: doc_dir / f"{split}.jsonl" for split in SPLITS}
    tmps = {split: path.with_name(f".{path.name}.{os.getpid()}.tmp") for split, path in paths.items()}
    counts = {split: {"docs": 0, "text_bytes": 0} for split in SPLITS}
    try:
        with contextlib.ExitStack() as stack:
            files = {split: stack.enter_context(open(tmp, "wb")) for split, tmp in tmps.items()}
            with progress(desc="documents", unit="doc") as bar:  # closed before any error is printed
                for split, doc in sources.iter_split_documents(data):
                    line = json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n"
                    files[split].write(line.encode("utf-8"))
                    counts[split]["docs"] += 1
                    counts[split]["text_bytes"] += len(doc.text.encode("utf-8"))
                    bar.update(1)
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        for split in SPLITS:
            if counts[split]["docs"] == 0:
                raise UserError(f"the {split} split has no documents; add documents to --sources or change "
                                f"--val-fraction")
        for split in SPLITS:
            os.replace(tmps[split], paths[split])
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    splits = {split: {**counts[split], "bytes": paths[split].stat().st_size} for split in SPLITS}
    fsync_dir(doc_dir)
    index = {"data_hash": want, "data": dataclasses.asdict(data), "splits": splits}
    atomic_write_json(index_path, index)
    return index


# ---------------------------------------------------------------------------------------------------------------------
# step 2: shards


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Tokenize lines [start, end) (byte range) of a documents jsonl into shard `name` of `out_dir`."""

    jsonl: str
    start: int
    end: int
    out_dir: str
    name: str
    tokenizer: str
    dtype: str


def chunk_ranges(jsonl: Path, shard_docs: int) -> list[tuple[int, int]]:
    """Byte ranges of consecutive runs of `shard_docs` lines: the deterministic cut of a split into shards."""
    ranges, start, pos, n = [], 0, 0, 0
    with open(jsonl, "rb") as f:
        for line in f:
            pos += len(line)
            n += 1
            if n == shard_docs:
                ranges.append((start, pos))
                start, n = pos, 0
    if n:
        ranges.append((start, pos))
    return ranges


@functools.lru_cache(maxsize=2)
def _load_tokenizer(path: str):
    """One tokenizer per worker process (cached across its tasks)."""
    from ..tokenizer import Tokenizer

    return Tokenizer.load(path)


def pool_start_method() -> str:
    """forkserver on Linux, spawn elsewhere: never fork a process that runs threads (see the module docstring)."""
    return "forkserver" if sys.platform == "linux" else "spawn"


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; the library's threads would oversubscribe


def tokenize_shard(task: ShardTask) -> dict:
    """Tokenize one chunk of documents and commit it as .bin + .idx + .json (each temp, fsync, rename; .json last)."""
    with open(task.jsonl, "rb") as f:
        f.seek(task.start)
        lines = f.read(task.end - task.start).splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    ids = _load_tokenizer(task.tokenizer).encode_batch(texts, bos=True)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dtype = np.dtype(task.dtype)
    tokens = np.fromiter((t for doc in ids for t in doc), dtype=dtype, count=int(offsets[-1]))
    out = Path(task.out_dir)
    bin_path, idx_path = out / f"{task.name}.bin", out / f"{task.name}.idx"
    _write_synced(bin_path, lambda f: f.write(tokens.tobytes()))
    _write_synced(idx_path, lambda f: np.save(f, offsets))
    record = {
        "name": task.name, "docs": len(ids), "tokens": int(offsets[-1]),
        "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(), "idx_sha256": sha256_file(idx_path),
    }
    _write_synced(out / f"{task.name}.json", lambda f: f.write(json.dumps(record, sort_keys=True).encode("utf-8")))
    return record


def committed_shard(out_dir: Path, name: str, itemsize: int, docs: int) -> dict | None:
    """The shard's commit record when its files are complete and match it (size and sha256), else None."""
    try:
        record = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
        bin_path, idx_path = out_dir / f"{name}.bin", out_dir / f"{name}.idx"
        if record["docs"] != docs or bin_path.stat().st_size != record["tokens"] * itemsize:
            return None
        if sha256_file(bin_path) != record["sha256"] or sha256_file(idx_path) != record["idx_sha256"]:
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tokenize_split(jsonl: Path, out_dir: Path, tokenizer: Path, shard_docs: int, workers: int, dtype: np.dtype,
                   desc: str = "shards", pool: bool = True) -> list[dict]:
    """Tokenize a documents jsonl into shards in `out_dir` (keeping committed ones); returns the shard records.

    `pool=False` tokenizes in this process with the tokenizers library's own threads instead (a bench baseline).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob(".shard_*.tmp"):  # left by an interrupted run
        tmp.unlink(missing_ok=True)
    ranges = chunk_ranges(jsonl, shard_docs)
    records: dict[int, dict] = {}
    todo = []
    for i, (start, end) in enumerate(ranges):
        name = f"shard_{i:05d}"
        n_docs = shard_docs if i < len(ranges) - 1 else None
        rec = committed_shard(out_dir, name, dtype.itemsize, n_docs) if n_docs is not None else None
        if rec is None and n_docs is None:  # the last chunk: count its lines
            with open(jsonl, "rb") as f:
                f.seek(start)
                rec = committed_shard(out_dir, name, dtype.itemsize, f.read(end - start).count(b"\n"))
        if rec is not None:
            records[i] = rec
        else:
            todo.append(ShardTask(str(jsonl), start, end, str(out_dir), name, str(tokenizer), dtype.name))
    if records:
        log(f"{desc}: keeping {len(records)} complete shards, tokenizing {len(todo)}")
    total_bytes = sum(t.end - t.start for t in todo)
    bar = progress(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1000)
    n_docs = 0

    def done(rec: dict, task: ShardTask) -> None:
        nonlocal n_docs
        records[int(rec["name"].split("_")[1])] = rec
        n_docs += rec["docs"]
        bar.update(task.end - task.start)
        bar.set_postfix(docs=n_docs, refresh=False)

    with bar:
        if todo and pool and workers > 0:
            ctx = multiprocessing.get_context(pool_start_method())
            by_name = {t.name: t for t in todo}
            with ctx.Pool(min(workers, len(todo)), initializer=_init_worker) as p:
                for rec in p.imap_unordered(tokenize_shard, todo):
                    done(rec, by_name[rec["name"]])
        else:
            for task in todo:
                done(tokenize_shard(task), task)
    fsync_dir(out_dir)
    return [records[i] for i in range(len(ranges))]


def main(cfg: config.DataStage) -> dict:
    """`chatsmith data prepare`: documents, then token shards for both splits; returns shards/index.json."""
    from ..tokenizer import Tokenizer

    name = cfg.run.run
    run = run_dir(name)
    tok_path = tokenizer_file(run, name)
    config.save(cfg, run / "config.json", "data")
    t0 = time.perf_counter()
    docs = prepare_documents(cfg.data, run / "documents")
    tok = Tokenizer.load(run / "tokenizer")
    dtype = shard_dtype(tok.vocab_size)
    plan = {"tokenizer_sha256": sha256_file(tok_path), "documents": docs["data_hash"],
            "doc_counts": {s: docs["splits"][s]["docs"] for s in SPLITS}, "shard_docs": cfg.shards.shard_docs,
            "dtype": dtype.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id}
    shard_root = run / "shards"
    final = shard_root / "index.json"
    if final.exists() and read_json(final).get("plan") == plan:
        log(f"shards of run {name!r} are complete ({final}); nothing to do")
        return read_json(final)
    plan_path = shard_root / "plan.json"
    if shard_root.exists() and (not plan_path.exists() or read_json(plan_path) != plan):
        log(f"the tokenizer, documents or shard size changed; rebuilding {shard_root}")
        shutil.rmtree(shard_root)
    atomic_write_json(plan_path, plan)

    workers = cfg.shards.workers or os.cpu_count() or 1
    summary = {"plan": plan, "splits": {}}
    for split in SPLITS:
        out = shard_root / split
        records = tokenize_split(run / "documents" / f"{split}.jsonl", out, tok_path, cfg.shards.shard_docs,
                                 workers, dtype, desc=f"shards {split}")
        index = {"dtype": dtype.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                 "tokenizer_sha256": plan["tokenizer_sha256"], "shards": records,
                 "docs": sum(r["docs"] for r in records), "tokens": sum(r["tokens"] for r in records),
                 "text_bytes": sum(r["text_bytes"] for r in records)}
        summary["splits"][split] = index
    for split, index in summary["splits"].items():
        atomic_write_json(shard_root / split / "index.json", index)
    atomic_write_json(final, summary)  # last: its presence means complete
    seconds = time.perf_counter() - t0
    tr = summary["splits"]["train"]
    log(f"data prepare: {tr['docs']:,} train documents, {tr['tokens']:,} tokens "
        f"({tr['text_bytes'] / max(tr['tokens'], 1):.2f} bytes/token), "
        f"{summary['splits']['val']['docs']:,} val documents; {seconds:.1f}s")
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# the loader


class ShardReader:
    """One split's shards, memory-mapped: document i (in shard order) -> its tokens as a read-only array view."""

    def __init__(self, shard_dir: Path):
        shard_dir = Path(shard_dir)
        if not (shard_dir / "index.json").exists():
            raise UserError(f"{shard_dir} holds no complete shards; run `chatsmith data prepare` first")
        index = read_json(shard_dir / "index.json")
        self.bos_id: int = index["bos_id"]
        self.tokens: list[np.memmap] = []
        shard_of, start = [], []
        for s, rec in enumerate(index["shards"]):
            self.tokens.append(np.memmap(shard_dir / f"{rec['name']}.bin", dtype=index["dtype"], mode="r"))
            offsets = np.load(shard_dir / f"{rec['name']}.idx")
            shard_of.append(np.full(len(offsets) - 1, s, dtype=np.int32))
            start.append(offsets)
        self.shard_of = np.concatenate(shard_of)  # (N,) shard of each document
        self.start = np.concatenate([o[:-1] for o in start])  # (N,) first token within its shard
        self.length = np.concatenate([np.diff(o) for o in start])  # (N,) tokens, BOS included

    def __len__(self) -> int:
        return len(self.length)

    def doc(self, i: int) -> np.ndarray:
        s, a = int(self.shard_of[i]), int(self.start[i])
        return self.tokens[s][a : a + int(self.length[i])]


class RankStream:
    """Positions k = 0, 1, ... of one rank's share of a stream of `n_items` items: position k lies in epoch
    k // n_rank and names item order_epoch[rank + (k % n_rank) * world_size], where order_epoch is a permutation
    seeded by (seed, epoch) (the identity without `shuffle`). Ranks are disjoint within an epoch; a position alone
    names its item, so a loader's state is just positions. Used by PackingLoader and data.chat.ChatLoader."""

    def __init__(self, n_items: int, rank: int, world_size: int, seed: int, shuffle: bool):
        self.n_items, self.rank, self.world_size, self.seed, self.shuffle = n_items, rank, world_size, seed, shuffle
        self.n_rank = len(range(rank, n_items, world_size))  # items of this rank per epoch
        self._orders: dict[int, np.ndarray] = {}  # the last few epochs' permutations

    def item(self, k: int) -> int:
        epoch, j = divmod(k, self.n_rank)
        pos = self.rank + j * self.world_size
        if not self.shuffle:
            return pos
        if epoch not in self._orders:
            if len(self._orders) >= 4:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
        return int(self._orders[epoch][pos])


class StreamPacker:
    """What both packing loaders (documents here, conversations in data/chat.py) share: this rank's item stream, the
    next stream position, the positions buffered for best-fit packing, counters, iteration until the last epoch,
    and the JSON state that makes a resume exact. Subclasses set `_counts`, define `_layout()` (what the state must
    match), `next_batch()`, and the two halves of the error when the layout differs."""

    _saved_for = "the loader state was saved for another corpus or process layout"
    _mismatch = "resume with the same data and number of processes"
    _counts: dict[str, int]

    def _init_stream(self, n_items: int, rank: int, world_size: int, seed: int, shuffle: bool,
                     epochs: int | None, too_few: str) -> None:
        self.rank, self.world_size, self.seed, self.shuffle, self.epochs = rank, world_size, seed, shuffle, epochs
        self.stream = RankStream(n_items, rank, world_size, seed, shuffle)
        self.n_rank = self.stream.n_rank  # items of this rank per epoch
        if self.n_rank == 0:
            raise UserError(f"{too_few}, fewer than the {world_size} ranks; add some or use fewer processes")
        self._next = 0  # position in this rank's stream: epoch = position // n_rank
        self._buffer: list[int] = []  # stream positions of buffered items, ascending

    def _take(self, size: int) -> list[int]:
        """Advance the stream by the positions that bring the buffer up to `size` (none after the last epoch)."""
        end = None if self.epochs is None else self.epochs * self.n_rank
        new = []
        while len(self._buffer) + len(new) < size and (end is None or self._next < end):
            new.append(self._next)
            self._next += 1
        return new

    def __iter__(self) -> Iterator:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def state_dict(self) -> dict:
        """JSON-able: the next stream position and the buffered items as positions (no tokens)."""
        return {"next": self._next, "buffer": list(self._buffer), **self._counts, **self._layout()}

    def load_state_dict(self, d: dict) -> None:
        saved = {k: d.get(k) for k in self._layout()}
        if saved != self._layout():
            raise UserError(f"{self._saved_for} ({saved}, now {self._layout()}); {self._mismatch}")
        self._next = int(d["next"])
        self._buffer = [int(k) for k in d["buffer"]]
        self._counts = {k: int(d[k]) for k in self._counts}


class PackingLoader(StreamPacker):
    """Infinite (or `epochs`-long) batches of BOS-aligned, best-fit packed rows; see the module docstring."""

    _mismatch = "resume with the same shards and number of processes"

    def __init__(self, shard_dir: Path, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 buffer_docs: int = 1000, epochs: int | None = None, seed: int = 0, shuffle: bool = True,
                 keep_tails: bool = False):
        self.reader = ShardReader(shard_dir)
        self.batch_size, self.seq_len, self.buffer_docs = batch_size, seq_len, max(1, buffer_docs)
        self.n_docs = len(self.reader)
        self.keep_tails = keep_tails
        width, lengths = seq_len + 1, self.reader.length
        if keep_tails:  # items are pieces of at most one row: document, first token, tokens
            pieces = np.maximum(1, -(-lengths // width))  # (N,) pieces of each document
            self._piece_doc = np.repeat(np.arange(self.n_docs), pieces)  # (P,)
            first = np.repeat(np.cumsum(pieces) - pieces, pieces)  # (P,) index of its document's first piece
            self._piece_start = (np.arange(len(self._piece_doc)) - first) * width  # (P,)
            self._piece_len = np.minimum(width, lengths[self._piece_doc] - self._piece_start)  # (P,)
        else:  # items are whole documents
            self._piece_doc, self._piece_start, self._piece_len = None, None, lengths
        self.n_items = len(self._piece_len)
        self._init_stream(self.n_items, rank, world_size, seed, shuffle, epochs,
                          f"{shard_dir} has {self.n_docs} documents")
        self._lengths = np.zeros(0, dtype=np.int64)  # lengths of the buffered items, aligned with _buffer
        self._counts = {"docs": 0, "tokens": 0, "cropped_tokens": 0}

    def data_stats(self) -> dict:
        """The split against the row width T+1: documents and tokens, how many documents are longer than a row and
        their tokens beyond it (dropped unless `keep_tails`; `stats` counts what the packing actually cropped)."""
        width, lengths = self.seq_len + 1, self.reader.length
        long = lengths > width
        return {"documents": self.n_docs, "tokens": int(lengths.sum()), "row_tokens": width,
                "longer_than_row": int(long.sum()), "tokens_beyond_row": int((lengths[long] - width).sum()),
                "keep_tails": self.keep_tails, "items": self.n_items}

    # -- document stream --------------------------------------------------------------------------------------------

    def _doc_id(self, k: int) -> int:
        """The item (a document, or a piece of one with `keep_tails`) at position k of this rank's stream."""
        return self.stream.item(k)

    def _item_tokens(self, item: int) -> np.ndarray:
        if self._piece_doc is None:
            return self.reader.doc(item)
        start = int(self._piece_start[item])
        return self.reader.doc(int(self._piece_doc[item]))[start : start + int(self._piece_len[item])]

    def _refill(self) -> None:
        new = self._take(self.buffer_docs)
        if new:
            self._buffer += new
            self._lengths = np.concatenate([self._lengths, self._piece_len[[self._doc_id(k) for k in new]]])

    def _fill_row(self, row: np.ndarray) -> int:
        """Pack documents into `row` from its start; returns the tokens written (< len(row) only at the end)."""
        pos, size = 0, len(row)
        while pos < size:
            self._refill()
            if not self._buffer:
                break
            space = size - pos
            fits = self._lengths <= space
            if fits.any():  # best fit: the largest document that fits (the earliest of equals)
                i = int(np.argmax(np.where(fits, self._lengths, -1)))
                take = int(self._lengths[i])
            else:  # crop the shortest: every buffered document overflows, the shortest loses the fewest tokens
                i = int(np.argmin(self._lengths))
                take = space
                self._counts["cropped_tokens"] += int(self._lengths[i]) - space
            row[pos : pos + take] = self._item_tokens(self._doc_id(self._buffer[i]))[:take]
            pos += take
            self._counts["docs"] += 1
            self._counts["tokens"] += take
            del self._buffer[i]
            self._lengths = np.delete(self._lengths, i)
        return pos

    # -- public API --------------------------------------------------------------------------------------------------

    def next_batch(self):
        """(inputs, targets), both LongTensor (B, T); raises StopIteration after the last epoch."""
        import torch

        B, T = self.batch_size, self.seq_len
        rows = np.full((B, T + 1), self.reader.bos_id, dtype=np.int64)  # (B, T+1)
        filled = np.array([self._fill_row(rows[b]) for b in range(B)])  # (B,)
        if filled[0] == 0:
            raise StopIteration
        targets = rows[:, 1:].copy()  # (B, T)
        targets[np.arange(T)[None, :] + 1 >= filled[:, None]] = IGNORE_INDEX  # padding after the last document
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(targets)

    @property
    def stats(self) -> dict:
        """Items (documents, or pieces with `keep_tails`) and tokens placed in rows so far, tokens cropped away, and
        completed epochs."""
        return {**self._counts, "epoch": self._counts["docs"] // self.n_rank}

    def _layout(self) -> dict:
        return {"n_docs": self.n_docs, "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "shuffle": self.shuffle, "keep_tails": self.keep_tails}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict({"keep_tails": False, **d})  # states saved before keep_tails existed
        self._lengths = np.array([self._piece_len[self._doc_id(k)] for k in self._buffer], dtype=np.int64)


def iter_val_batches(shard_dir: Path, batch_size: int, seq_len: int, max_tokens: int) -> Iterator:
    """A deterministic finite pass for evaluation: max(1, max_tokens // (B*T)) batches at most, one epoch at most.

    Same packing as training, one fixed-seed order; the last batch of a short split is padded (targets -1).
    """
    loader = PackingLoader(shard_dir, batch_size, seq_len, epochs=1, seed=0)
    for _ in range(max(1, max_tokens // (batch_size * seq_len))):
        try:
            yield loader.next_batch()
        except StopIteration:
            return
