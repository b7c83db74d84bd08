"""Byte-level BPE tokenizer (HF `tokenizers`), special tokens, exact byte-level decoding, and the tokenizer stages.

    chatsmith tokenizer train --preset cpu      # run_dir/tokenizer/tokenizer.json (+ config.json); skipped if current
    chatsmith tokenizer eval --preset cpu       # bytes/token beside GPT-2/cl100k/o200k (tokenizer_eval.py)

    tok = Tokenizer.load(run_dir("cpu") / "tokenizer")
    ids = tok.encode("你好, world", bos=True)        # [bos] + ids; every document is encoded like this
    tok.decode(ids[1:]) == "你好, world"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids, loss_mask = tok.render_conversation(messages)  # SFT rows: mask 1 on assistant text and its <|im_end|>
    prompt = tok.render_for_completion(messages[:1])   # ends with <|im_start|>assistant + newline: the engine goes on
    parse_assistant(reply_text)                         # {"content": ..., "tool_calls": [{"name", "arguments"}]}

Choices:
- Pipeline = no normalizer → split by the Qwen2 regex (digits one at a time, so llama.cpp's `qwen2` pre-tokenizer
  matches at GGUF export) → GPT-2 byte-to-unicode mapping → BPE; decoder = byte level. Nothing rewrites the text
  (no NFC, no prefix space), so decode(encode(s)) == s for every str without lone surrogates (property-tested).
- Special tokens occupy ids 0..15: `<|endoftext|>` (0: the document separator and BOS), `<|im_start|>`,
  `<|im_end|>` (ChatML), then `<|reserved_3|>`..`<|reserved_15|>` kept free so that later tokens (tool calls, ...)
  can be named without retraining. The 256 byte tokens and the merges follow; `vocab_size` counts all of them.
  An imported tokenizer (`chatsmith import hf`, e.g. Qwen3's) keeps its own layout: its ChatML specials are found by
  name, wherever they sit.
- Plain-text encoding never produces a special id: the literal string "<|im_end|>" in user text is encoded as
  ordinary bytes (`encode_special_tokens = True` in `tokenizers`). Specials enter a sequence only as ids
  (`special_id`), which is how the chat template will insert them: a user cannot forge a turn boundary.
- The one chat template (ChatML, BOS first, tool calls as `<tool_call>{json}</tool_call>` lines) lives here with its
  Jinja twin `CHAT_TEMPLATE` for exports; section "chat template" below says what is decided and why. Parity with
  transformers' apply_chat_template (ids and loss mask) is property-tested in tests/test_chat_template.py.
- Decoding is done here, not by `tokenizers`: each id maps to its bytes (specials to their UTF-8 literal), the bytes
  are joined and decoded with errors="replace". `IncrementalDecoder` runs the same bytes through Python's incremental
  UTF-8 decoder, so streaming gives exactly the full decode and never a premature U+FFFD (property-tested, and the
  full decode is checked against `tokenizers`' own). Ids outside the vocabulary (a model vocabulary padded beyond the
  tokenizer's) decode to nothing, as in `tokenizers`.
- Training sample (`train_main`): the sources are read side by side and the next document always comes from the
  source with the fewest characters taken so far, until `train_chars`. Every source thus gets an equal share of
  characters until it runs out and its share passes on to the others; reading them in order would give the BPE
  almost only ShareGPT English and leave People's Daily Chinese in byte tokens.
- Measured (2-core EPYC, default sources, vocab 32768, held-out = 1 % val: 1.1 MB English, People's Daily Chinese;
  bytes/token, higher is better; training wall time includes reading the sources):
      train_chars   train s   English (GPT-2 4.011)   Chinese (cl100k 2.433)
       10 M          36        3.817 (95.2 %)          5.177
       30 M          40        4.201 (104.7 %)         4.783
       60 M          50        4.324 (107.8 %)         4.491   <- preset cpu; peak RSS 1.6 GB
  The 1.8 M chars of People's Daily + 3.0 M of idioms + 0.2 M of chatterbot are all taken from 10 M on; more
  ShareGPT then buys English merges at a small cost in Chinese. At 60 M chars: vocab 8192 gives 3.644 / 3.253,
  16384 gives 4.041 / 3.855 (o200k: 4.642 / 3.832).
- `encode_batch` uses `tokenizers`' encode_batch_fast (no offsets): 3.12 MB/s vs 2.76 MB/s for encode_batch on
  ShareGPT text, 2 threads.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config
from .common import UserError, atomic_write_text, log, progress, run_dir
from .config import DataConfig

if TYPE_CHECKING:
    import torch

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_SPECIAL = 16  # ids 0..15: SPECIAL_TOKENS, then <|reserved_3|>..<|reserved_15|>
ALL_SPECIALS = SPECIAL_TOKENS + tuple(f"<|reserved_{i}|>" for i in range(len(SPECIAL_TOKENS), N_SPECIAL))

# Qwen2's pre-tokenizer regex (tokenizer.json of Qwen/Qwen2-7B; llama.cpp pre-tokenizer `qwen2`)
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map byte -> printable unicode char, the alphabet of byte-level BPE token strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """A trained byte-level BPE: encode (plain text → ids, never specials), decode (exact, byte level)."""

    def __init__(self, hf_tokenizer) -> None:
        hf_tokenizer.encode_special_tokens = True  # literal "<|im_end|>" in text stays text (not saved in the json)
        self._tok = hf_tokenizer
        vocab = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        # ours: ALL_SPECIALS at ids 0..15; imported (`chatsmith import hf`, e.g. Qwen3): the ChatML specials by name
        added = {t.content: i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        if all(hf_tokenizer.token_to_id(name) == i for i, name in enumerate(ALL_SPECIALS)):
            self._specials = {name: i for i, name in enumerate(ALL_SPECIALS)}
        elif all(name in added for name in SPECIAL_TOKENS):
            self._specials = added
        else:
            raise UserError(f"this tokenizer.json has no special tokens {', '.join(SPECIAL_TOKENS)}, so it was not "
                            "written by chatsmith nor is it a ChatML one; run `chatsmith tokenizer train` to make one")
        special_ids = set(self._specials.values())
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        try:
            table = [hf_tokenizer.id_to_token(i).encode("utf-8") if i in special_ids
                     else bytes(byte_of[c] for c in hf_tokenizer.id_to_token(i)) for i in range(vocab)]
        except (KeyError, TypeError, AttributeError):
            raise UserError("this tokenizer.json is not a byte-level BPE written by chatsmith; run "
                            "`chatsmith tokenizer train` to make one") from None
        self._bytes: tuple[bytes, ...] = tuple(table)  # id -> the bytes it decodes to
        self._special_ids = frozenset(special_ids)

    # -- building, saving, loading -------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
        """Train on `texts` to `vocab_size` ids (specials and the 256 bytes included; fewer if the text runs out)."""
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        if vocab_size < N_SPECIAL + 256:
            raise UserError(f"--vocab-size must be at least {N_SPECIAL + 256} (specials + 256 bytes), not {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(ALL_SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress, min_frequency=2)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `path`: a directory holding tokenizer.json, or the file itself."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"no tokenizer at {file}; run `chatsmith tokenizer train` first")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise UserError(f"{file} is not a valid tokenizer.json ({str(e)[:120]}); delete it and rerun "
                            "`chatsmith tokenizer train`") from None
        return cls(hf)

    def save(self, directory: str | Path) -> Path:
        """Write `directory`/tokenizer.json atomically; returns its path."""
        path = Path(directory) / "tokenizer.json"
        atomic_write_text(path, self._tok.to_str(pretty=True))
        return path

    # -- ids ------------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def bos_id(self) -> int:
        return self._specials[SPECIAL_TOKENS[0]]

    def special_id(self, token: str) -> int:
        try:
            return self._specials[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a special token; they are: {', '.join(ALL_SPECIALS)}") from None

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], bos: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (the library's threads; off when TOKENIZERS_PARALLELISM=false)."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        if bos:
            return [[self.bos_id, *e.ids] for e in encodings]
        return [e.ids for e in encodings]

    # -- bytes and text -------------------------------------------------------------------------------------------

    def id_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for (a special: its UTF-8 literal; outside the vocabulary: nothing)."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`: their bytes joined, decoded as UTF-8 with invalid bytes → U+FFFD."""
        return b"".join([self.id_bytes(int(i)) for i in ids]).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab]: UTF-8 bytes each id decodes to, 0 for the specials (for bits per byte)."""
        import torch

        return torch.tensor([0 if i in self._special_ids else len(b) for i, b in enumerate(self._bytes)],
                            dtype=torch.int64)

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    # -- the chat template (see "chat template" below) ------------------------------------------------------------

    def render_conversation(self, messages: Sequence[Mapping[str, Any]],
                            max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation in ChatML; mask 1 on the tokens of assistant content (tool calls
        included) and on each assistant `<|im_end|>`; cut to the first `max_tokens` ids when given."""
        if max_tokens is not None and max_tokens < 1:
            raise ConversationError(f"max_tokens must be at least 1, not {max_tokens}.")
        start, end, newline = self.special_id(IM_START), self.special_id(IM_END), self.encode("\n")
        ids, mask = [self.bos_id], [0]
        for role, text in chat_turns(messages):
            header = role + "\n"
            turn = self._encode_turn(header + text)
            ids += [start, *turn, end, *newline]
            if role == "assistant":  # a token is trained on when it holds any content byte (see the section notes)
                header_bytes, seen, turn_mask = len(header.encode("utf-8")), 0, []
                for i in turn:
                    seen += len(self.id_bytes(i))
                    turn_mask.append(int(seen > header_bytes))
                mask += [0, *turn_mask, 1, *[0] * len(newline)]
            else:
                mask += [0] * (len(turn) + 2 + len(newline))
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def _encode_turn(self, text: str) -> list[int]:
        """The text between two specials, encoded as a tokenizer that splits the template's output on the specials
        does; a special literal inside it is text, encoded apart from its neighbours (transformers' sanitizing)."""
        if "<|" not in text:
            return self.encode(text)
        literals = "|".join(re.escape(s) for s in sorted(ALL_SPECIALS, key=len, reverse=True))
        return [i for piece in re.split(f"({literals})", text) if piece for i in self.encode(piece)]

    def render_for_completion(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The ids of the conversation, then `<|im_start|>` and "assistant" + newline: the prompt the model answers."""
        ids, _ = self.render_conversation(messages)
        return [*ids, self.special_id(IM_START), *self.encode("assistant\n")]


class IncrementalDecoder:
    """Streaming decode: push ids one at a time, get text as soon as its UTF-8 characters are complete.

    The concatenation of every `push` and the final `flush` equals `Tokenizer.decode` of all the ids; an incomplete
    character at the end (at most 3 bytes) is held back, so no U+FFFD appears that the full decode does not have.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.id_bytes(int(token_id)), final=False)

    def flush(self) -> str:
        """The held-back bytes (U+FFFD for what is left of an incomplete character); the decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---------------------------------------------------------------------------------------------------------------------
# chat template
#
# The one place that formats chat turns: every module that renders a conversation calls these. It renders as
#
#     <|endoftext|><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n
#     <|im_start|>assistant\nHello!\n<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call><|im_end|>\n
#     <|im_start|>tool\n{"y": 2}<|im_end|>\n
#
# - BOS (`<|endoftext|>`, id 0) opens every conversation, as it opens every pretraining document, so SFT rows and
#   prompts start in the state the model knows from pretraining. CHAT_TEMPLATE writes it as a literal (not
#   `bos_token`), so it does not depend on what an exported tokenizer_config calls its BOS; exports must keep
#   `add_bos_token` false so no runtime adds a second one. Generation stops at `<|im_end|>` (the exported eos).
# - Specials enter as ids only; role names, "\n", content and tool calls are encoded as text, one `encode` per stretch
#   between two specials. That is exactly what a tokenizer that first splits the template's text on the special
#   literals (HF, vLLM, llama.cpp) does, hence identical ids (tested against transformers' apply_chat_template).
#   A special literal typed by a user ("<|im_end|>") stays text here, encoded apart from the text around it; that is
#   what transformers does with `apply_chat_template(..., sanitize_control_tokens=True)` (ids identical, tested).
#   Without sanitizing, the Jinja template's text turns such a literal into the special: a forged turn boundary.
# - An assistant turn's text = its content, then one `<tool_call>{json}</tool_call>` per call, joined by "\n" (no
#   "\n" before the first call when the content is empty). The json is json.dumps({"name", "arguments"},
#   ensure_ascii=False, separators=(", ", ": ")) in insertion order: what transformers' `tojson` filter writes.
#   Calls may come as {"name", "arguments": {...}} or in the OpenAI shape {"type": "function", "function": {"name",
#   "arguments": "<json string>"}}; a JSON-string `arguments` is parsed here and written canonically, while Jinja
#   (which cannot parse JSON) writes the string as given: the two agree when the string is canonical (vLLM parses
#   such strings into dicts before rendering, so it agrees always). Tool definitions (`tools`) are not rendered.
# - Loss mask: 1 on assistant tokens holding any content byte and on the assistant `<|im_end|>`; 0 on BOS, every
#   `<|im_start|>`, role header, system/user/tool turn and the "\n" after `<|im_end|>`. The header "assistant\n" and
#   the content are one encode; the boundary is clean unless the content starts with whitespace that holds a line
#   break (the Qwen2 regex joins "\n" + "\n..." into one piece), and then the token holding the header's "\n" is
#   trained on too (the rule of transformers' `return_assistant_tokens_mask`).
# - `max_tokens` keeps the first `max_tokens` ids (a plain cut, as for packed rows; the mask may then be all zeros).

IM_START, IM_END = SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
CHAT_ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

# The same format for HF-style runtimes (tokenizer_config.json "chat_template"): transformers' sandboxed Jinja
# (trim_blocks, lstrip_blocks, its own `tojson` = json.dumps(ensure_ascii=False)); only standard tests and filters so
# llama.cpp and other reimplementations can run it. Every tag trims the whitespace around it: the layout is free.
CHAT_TEMPLATE = r"""
{{- '<|endoftext|>' -}}
{%- for message in messages -%}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] -%}
        {{- raise_exception('a message role must be system, user, assistant or tool') -}}
    {%- endif -%}
    {{- '<|im_start|>' + message.role + '\n' -}}
    {%- if message.content is string -%}
        {{- message.content -}}
    {%- endif -%}
    {%- if message.role == 'assistant' and message.tool_calls -%}
        {%- for tool_call in message.tool_calls -%}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call -%}
            {%- if not loop.first or (message.content is string and message.content) -%}
                {{- '\n' -}}
            {%- endif -%}
            {{- '<tool_call>{"name": ' + (call.name | tojson) + ', "arguments": ' -}}
            {%- if call.arguments is not defined -%}
                {{- '{}' -}}
            {%- elif call.arguments is string -%}
                {{- call.arguments -}}
            {%- else -%}
                {{- call.arguments | tojson -}}
            {%- endif -%}
            {{- '}</tool_call>' -}}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


class ConversationError(UserError, ValueError):
    """A conversation the chat template cannot render; the message says which message is wrong and how."""


def normalize_tool_call(call: Any, where: str) -> dict[str, Any]:
    """{"name": str, "arguments": dict} from either accepted shape (see the section notes)."""
    if not isinstance(call, Mapping):
        raise ConversationError(f"{where} must be an object with a name and arguments, not {type(call).__name__}.")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise ConversationError(f"{where}.function must be an object with a name and arguments.")
    name, arguments = function.get("name"), function.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ConversationError(f"{where} needs a non-empty string name.")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ConversationError(f"{where}.arguments is a string but not valid JSON; pass a JSON object.") from None
    if not isinstance(arguments, Mapping):
        raise ConversationError(f"{where}.arguments must be a JSON object, not {type(arguments).__name__}.")
    return {"name": name, "arguments": dict(arguments)}


def format_tool_call(call: Mapping[str, Any]) -> str:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` for a normalized call."""
    body = json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False,
                      separators=(", ", ": "))
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def assistant_text(content: str, tool_calls: Sequence[Mapping[str, Any]] = ()) -> str:
    """An assistant turn's text: the content, then one tool call per line (the inverse of `parse_assistant`)."""
    lines = [content] if content else []
    return "\n".join(lines + [format_tool_call(c) for c in tool_calls])


def chat_turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, text between the role header and `<|im_end|>`) per message, after checking every message."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ConversationError("a conversation must be a list of messages like {'role': 'user', 'content': 'Hi'}.")
    if not messages:
        raise ConversationError("the conversation is empty; pass at least one message.")
    turns = []
    for n, message in enumerate(messages):
        where = f"message {n}"
        if not isinstance(message, Mapping):
            raise ConversationError(f"{where} must be an object with a role and content, not {type(message).__name__}.")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ConversationError(f"{where} has role {role!r}; use one of {', '.join(CHAT_ROLES)}.")
        if content is None:
            content = ""
        elif not isinstance(content, str):
            raise ConversationError(f"{where} content must be a string, not {type(content).__name__}.")
        tool_calls = message.get("tool_calls") or []
        if tool_calls and role != "assistant":
            raise ConversationError(f"{where} is a {role} message with tool_calls; only assistant messages make calls.")
        if isinstance(tool_calls, (str, Mapping)) or not isinstance(tool_calls, Sequence):
            raise ConversationError(f"{where} tool_calls must be a list of calls.")
        calls = [normalize_tool_call(c, f"{where} tool_calls[{k}]") for k, c in enumerate(tool_calls)]
        turns.append((role, assistant_text(content, calls) if role == "assistant" else content))
    return turns


def parse_assistant(text: str) -> dict[str, Any]:
    """{"content": str, "tool_calls": [{"name", "arguments"}]} from a generated assistant reply.

    A call is `<tool_call>` + a JSON object with a non-empty string name and an object (or no) arguments +
    `</tool_call>`, whitespace allowed inside the tags; the "\\n" the renderer puts before a call is dropped. Anything
    else, malformed or unclosed blocks included, stays content verbatim. Inverse of `assistant_text` when the content
    holds no call of its own. Other keys of a call are dropped."""
    decoder, space = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")  # JSON's whitespace
    content, calls, pos, search = [], [], 0, 0
    while (start := text.find(TOOL_CALL_OPEN, search)) != -1:
        search = start + len(TOOL_CALL_OPEN)
        try:  # raw_decode: a "</tool_call>" inside a JSON string does not end the block
            call, end = decoder.raw_decode(text, space.match(text, search).end())
        except json.JSONDecodeError:
            continue
        end = space.match(text, end).end()
        if not (text.startswith(TOOL_CALL_CLOSE, end) and isinstance(call, dict) and isinstance(call.get("name"), str)
                and call["name"] and isinstance(call.get("arguments", {}), dict)):
            continue
        before = text[pos:start]
        content.append(before[:-1] if before.endswith("\n") else before)
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
        pos = search = end + len(TOOL_CALL_CLOSE)
    content.append(text[pos:])
    return {"content": "".join(content), "tool_calls": calls}


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer train


def interleave_by_chars(streams: dict[str, Iterator[str]], max_chars: int) -> Iterator[tuple[str, str]]:
    """(stream name, text) pairs, always the next text of the stream with the fewest characters taken so far, until
    `max_chars` characters in all (the last text may cross it) or every stream is exhausted."""
    taken = dict.fromkeys(streams, 0)
    live = dict(streams)
    while live and sum(taken.values()) < max_chars:
        name = min(live, key=taken.__getitem__)
        try:
            text = next(live[name])
        except StopIteration:
            del live[name]
            continue
        taken[name] += len(text)
        yield name, text


def source_texts(data: DataConfig, split: str) -> dict[str, Iterator[str]]:
    """One lazy text stream per source of `data` (each read by iter_documents with that source alone)."""
    from .data import sources

    def texts(source: str) -> Iterator[str]:
        for doc in sources.iter_documents(dataclasses.replace(data, sources=(source,)), split):
            yield doc.text

    return {source: texts(source) for source in data.sources}


def train_main(cfg: config.TokenizerStage) -> None:
    """Train the run's tokenizer on up to `train_chars` characters of its train documents (see the module docstring
    for how sources are mixed); skipped when tokenizer/ already holds one made with the same data and settings."""
    out = run_dir(cfg.run.run) / "tokenizer"
    file, cfg_file = out / "tokenizer.json", out / "config.json"
    if file.is_file() and cfg_file.is_file():
        try:
            saved_dict = json.loads(cfg_file.read_text(encoding="utf-8"))["tokenizer"]
            saved = config.from_dict(config.TokenizerStage, saved_dict)
            if (saved.data, saved.tokenizer) == (cfg.data, cfg.tokenizer):
                Tokenizer.load(file)
                log(f"tokenizer: {file} is up to date for this data and tokenizer config; skipping")
                return
        except (UserError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
            pass
        log(f"tokenizer: {file} was made with another config or is damaged; retraining")

    budget = cfg.tokenizer.train_chars
    taken = dict.fromkeys(cfg.data.sources, 0)
    bar = progress(total=budget, unit="char", unit_scale=True, desc="tokenizer sample")

    def sample() -> Iterator[str]:
        for name, text in interleave_by_chars(source_texts(cfg.data, "train"), budget):
            taken[name] += len(text)
            bar.update(len(text))
            yield text

    t0 = time.perf_counter()
    try:
        tok = Tokenizer.train(sample(), cfg.tokenizer.vocab_size)
    finally:
        bar.close()  # before any error message, so the message is the last line
    seconds = time.perf_counter() - t0
    total = sum(taken.values())
    if total == 0:
        raise UserError("the train split has no documents; add documents to --sources or change --val-fraction")
    shares = ", ".join(f"{name} {n:,}" for name, n in taken.items())
    log(f"tokenizer: vocab {tok.vocab_size} trained in {seconds:.1f}s on {total:,} chars ({shares})")
    if tok.vocab_size < cfg.tokenizer.vocab_size:
        log(f"tokenizer: the text ran out of pairs to merge before --vocab-size {cfg.tokenizer.vocab_size}")
    path = tok.save(out)
    config.save(cfg, cfg_file, "tokenizer")
    log(f"tokenizer: wrote {path}")
