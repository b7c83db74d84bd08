"""Terminal chat with a trained model: streamed replies, tool calls, a few slash commands.

    chatsmith chat                          # the latest chat checkpoint of the most recent run
    chatsmith chat --run cpu --temperature 0.3
    chatsmith chat --checkpoint ~/.cache/chatsmith/runs/cpu/chat/checkpoints/step_000400
    chatsmith chat --prompt "What is 12*34?"   # one-shot: prints the reply on stdout and exits 0
    chatsmith chat --allow-python           # the model may also run Python it writes, in the bubblewrap sandbox

Which model: `checkpoint.load_model` decides (its docstring says how): `--checkpoint PATH`, else the newest chat
checkpoint of `--run` (default: the newest run that has one), else that run's base model with a warning (it continues
text rather than answering).

Input: Enter sends. A line ending in a backslash continues on the next line; a line holding only three double quotes
(`\"\"\"`) starts paste mode, which ends at the next such line (for pasting code). Commands: /help, /clear (forget the
conversation, keep the system prompt), /system TEXT (set the system prompt; empty removes it), /temp X (sampling
temperature, 0 = greedy), /tools on|off, /quit (or Ctrl-D). Ctrl-C during a reply stops it; at the prompt it quits.

Context: before each reply the oldest exchanges (a user message and the turns that answer it) are dropped until the
prompt leaves room for `min(--max-tokens, context / 4)` tokens of reply; the system prompt is always kept, and a
notice says how many were dropped. A message too long on its own is refused with a notice; nothing here crashes.

Threads: decoding a small model is a chain of tiny matmuls, and on a busy machine a second intra-op thread mostly
waits for the other core, so `--threads` defaults to 1, which degrades gracefully under load; raise it on an idle
machine or for big models (`chatsmith bench decode --threads 1` and `--threads 2` measure the difference).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from .checkpoint import LoadConfig, load_model
from .common import UserError
from .config import opt
from .sampling import CHAT_DEFAULTS

PASTE = '"""'
HELP = """commands:
  /help          this list
  /clear         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone removes it)
  /temp X        sampling temperature (0 = greedy)
  /tools on|off  let the model call tools: the calculator, and python when started with --allow-python
  /quit          leave (or Ctrl-D)
input: end a line with \\ to continue on the next one; a line of three double quotes starts and ends paste mode"""


@dataclass(frozen=True)
class ChatConfig:
    prompt: str = opt("", "one-shot: answer this prompt, print the reply and exit", alias="-p")
    system: str = opt("", "system prompt")
    temperature: float = opt(CHAT_DEFAULTS.temperature, "sampling temperature; 0 = greedy", min=0.0,
                              max=100.0)
    top_k: int = opt(CHAT_DEFAULTS.top_k, "sample from the k most likely tokens; 0 = off", min=0,
                      max=2**24)
    top_p: float = opt(CHAT_DEFAULTS.top_p, "nucleus sampling mass; 1 = off", min=1e-6, max=1.0)
    repetition_penalty: float = opt(CHAT_DEFAULTS.repetition_penalty, "penalise tokens already in the conversation "
                                    "by this factor (llama.cpp's and Ollama's default; small models loop without "
                                    "it); 1 = off", min=0.01, max=100.0)
    max_tokens: int = opt(CHAT_DEFAULTS.max_tokens, "most tokens per reply (per round when tools are called)",
                          min=1, max=2**20)
    seed: int = opt(-1, "sampling seed (each reply adds its number); -1 = random", min=-1, max=2**32 - 1)
    tools: bool = opt(True, "let the model call tools: the calculator, and python with --allow-python")
    allow_python: bool = opt(False, "let the model run Python it writes, inside the bubblewrap sandbox (no network, "
                             "private /tmp, limits; chatsmith/sandbox.py); needs bwrap")
    max_tool_calls: int = opt(4, "most tool calls in one reply", min=0, max=100)


@dataclass(frozen=True)
class ChatStage:
    load: LoadConfig = LoadConfig()
    chat: ChatConfig = ChatConfig()


# ---------------------------------------------------------------------------------------------------------------------
# the conversation


def exchanges(messages: Sequence[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, the rest cut into exchanges: each a user message and the turns after it)."""
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    groups: list[list[dict]] = []
    for message in messages[n:]:
        if message["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(message)
    return list(messages[:n]), groups


def fit_context(count: Callable[[list[dict]], int], messages: Sequence[dict], limit: int) -> tuple[list[dict], int]:
    """Drop the oldest exchanges (never the system prompt or the last exchange) until count(messages) <= limit.
    Returns (kept messages, exchanges dropped); the result may still be too long when the last exchange is."""
    system, groups = exchanges(messages)
    dropped = 0
    while len(groups) > 1 and count([*system, *(m for g in groups for m in g)]) > limit:
        groups.pop(0)
        dropped += 1
    return [*system, *(m for g in groups for m in g)], dropped


class ChatSession:
    """One terminal conversation over an engine; reads from `stdin`, replies on `stdout`, notices on `stderr`."""

    def __init__(self, engine, tokenizer, cfg: ChatConfig, stdin: TextIO, stdout: TextIO, stderr: TextIO):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.system, self.temperature, self.tools = cfg.system, cfg.temperature, cfg.tools
        self.messages: list[dict] = []  # user / assistant / tool turns; the system prompt is kept apart
        self.replies = 0

    # -- output ---------------------------------------------------------------------------------------------------

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def notice(self, text: str) -> None:
        self.stderr.write(f"[{text}]\n")
        self.stderr.flush()

    # -- one reply ------------------------------------------------------------------------------------------------

    def conversation(self) -> list[dict]:
        return [{"role": "system", "content": self.system}, *self.messages] if self.system else list(self.messages)

    def reply(self, text: str) -> bool:
        """Answer the user message `text` (streamed to stdout); False when it could not be answered."""
        from .sampling import SamplingParams
        from .turns import chat

        room = min(self.cfg.max_tokens, max(1, self.engine.max_len // 4))  # tokens left free for the reply
        limit = self.engine.max_len - room

        def count(messages: list[dict]) -> int:
            return len(self.tokenizer.render_for_completion(messages))

        kept, dropped = fit_context(count, [*self.conversation(), {"role": "user", "content": text}], limit)
        if dropped:
            self.notice(f"the conversation outgrew the {self.engine.max_len}-token context: dropped the oldest "
                        f"{dropped} exchange{'s' if dropped > 1 else ''}")
        if (n := count(kept)) > limit:
            self.notice(f"that message needs {n} tokens with the system prompt, more than the {limit} the "
                        f"{self.engine.max_len}-token context leaves for it; shorten it (or the /system prompt)")
            return False
        self.messages = kept[1:] if self.system else kept
        seed = None if self.cfg.seed < 0 else self.cfg.seed + self.replies
        params = SamplingParams(max_tokens=self.cfg.max_tokens, temperature=self.temperature, top_k=self.cfg.top_k,
                                top_p=self.cfg.top_p, repetition_penalty=self.cfg.repetition_penalty, seed=seed)
        self.replies += 1
        try:
            result = chat(self.engine, self.tokenizer, kept, params, tools=self.tools, on_delta=self.write,
                          allow_python=self.cfg.allow_python,
                          on_tool=self._show_tool, max_tool_calls=self.cfg.max_tool_calls)
        except KeyboardInterrupt:
            self.write("\n")
            self.notice("stopped; that exchange is forgotten")
            self.messages.pop()
            return False
        self.write("\n")
        self.messages += result.messages
        if result.finish_reason == "length":
            self.notice("the reply was cut: it reached --max-tokens or the end of the context")
        elif result.finish_reason == "tool_limit":
            self.notice(f"the reply was cut: it asked for more than {self.cfg.max_tool_calls} tool calls")
        return True

    def _show_tool(self, call: dict, output: str) -> None:
        import json

        args = json.dumps(call["arguments"], ensure_ascii=False)
        self.write(f"\n[{call['name'] or 'tool'} {args} -> {output}]\n")

    # -- the loop -------------------------------------------------------------------------------------------------

    def read_line(self, prompt: str) -> str | None:
        """One line without its newline, or None at end of input."""
        if self.stdin is sys.stdin and sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            try:
                return input(prompt)
            except EOFError:
                return None
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n").removesuffix("\r")

    def read_message(self) -> str | None:
        """The next message: one line, backslash-continued lines, or a paste-mode block; None at end of input."""
        line = self.read_line("you> ")
        if line is None:
            return None
        if line.strip() == PASTE:
            lines = []
            while (line := self.read_line("... ")) is not None and line.strip() != PASTE:
                lines.append(line)
            return "\n".join(lines)
        lines = []
        while line is not None and line.endswith("\\"):
            lines.append(line[:-1])
            line = self.read_line("... ")
        return "\n".join([*lines, line or ""])

    def command(self, text: str) -> bool:
        """Run a slash command; False for /quit."""
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.write(HELP + "\n")
        elif name == "/clear":
            self.messages = []
            self.notice("conversation cleared" + (" (the system prompt stays)" if self.system else ""))
        elif name == "/system":
            self.system = arg
            self.notice(f"system prompt set: {arg}" if arg else "system prompt removed")
        elif name == "/temp":
            try:
                value = float(arg)
                if not 0 <= value < float("inf"):
                    raise ValueError
            except ValueError:
                self.notice(f"/temp needs a number >= 0 (0 = greedy), not {arg!r}")
            else:
                self.temperature = value
                self.notice(f"temperature {value:g}")
        elif name == "/tools" and arg in ("on", "off"):
            self.tools = arg == "on"
            self.notice(f"tools {arg}")
        else:
            self.notice(f"unknown command {text.strip()!r}; /help lists the commands")
        return True

    def run(self) -> int:
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.write("\n")
                return 0
            if text is None:
                return 0
            if not text.strip():
                continue
            if text.lstrip().startswith("/") and "\n" not in text.strip():
                if not self.command(text):
                    return 0
                continue
            self.write("assistant> " if self.stdin is sys.stdin and sys.stdin.isatty() else "")
            self.reply(text)


# ---------------------------------------------------------------------------------------------------------------------
# the command


def main(cfg: ChatStage, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """`chatsmith chat`: one-shot with --prompt (exit 0 after the reply), else an interactive session until /quit or
    end of input. The streams default to the process's; tests pass their own."""
    from .engine import Engine
    from .sampling import SamplingParams

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    SamplingParams(max_tokens=cfg.chat.max_tokens, temperature=cfg.chat.temperature, top_k=cfg.chat.top_k,
                   top_p=cfg.chat.top_p, repetition_penalty=cfg.chat.repetition_penalty)  # bad flags fail early
    if cfg.chat.max_tool_calls < 0:
        raise UserError(f"--max-tool-calls must be >= 0, not {cfg.chat.max_tool_calls}")
    if cfg.chat.allow_python:
        from .sandbox import check_sandbox

        check_sandbox()  # one sentence saying how to install bubblewrap, before the model loads
    loaded = load_model(cfg.load)
    max_len = cfg.load.context or loaded.model.config.seq_len
    engine = Engine(loaded.model, loaded.tokenizer, slots=1, max_len=max_len, autocast_dtype=loaded.autocast_dtype)
    session = ChatSession(engine, loaded.tokenizer, cfg.chat, stdin, stdout, stderr)
    if cfg.chat.prompt:
        return 0 if session.reply(cfg.chat.prompt) else 1
    kind = "chat model" if loaded.is_chat else "BASE model (not fine-tuned for chat)"
    session.notice(f"run {loaded.run.name}, {kind} {loaded.checkpoint.name}, context {engine.max_len} tokens; "
                   f"/help lists the commands")
    return session.run()
