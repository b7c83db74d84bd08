"""One assistant turn over the engine, with the tool-call state machine: the model's tool calls run, and their
results become `tool` turns that the next round of generation sees, until the model answers.

    from chatsmith.turns import chat
    reply = chat(engine, tokenizer, [{"role": "user", "content": "What is 12*34?"}], CHAT_DEFAULTS)
    reply.messages        # the assistant turns (with `tool_calls`) and `tool` turns it added; the last is the answer
    reply.finish_reason   # "stop", "length", "cancelled" or "tool_limit"

The terminal chat (cli.py), the chat evaluations (evaluate.py), the assistant checks and RL rollouts (checks.py,
rl.py) all answer through `chat`; the server does not: its clients run their tools themselves.

Choices:
- A round is one generation with `</tool_call>` as an extra stop string; a result that stopped on it holds the call
  (the closing tag is put back before parsing with `tokenizer.parse_assistant`). The call runs
  (`run_tool(name, arguments) -> text`, default tools.run_tool with the python tool only when `allow_python`), and the
  conversation is resent with the assistant and `tool` turns appended: the engine's prefix cache restores everything
  before the new turns, so a continuation prefills only them.
- One call per round (generation stops at the first closing tag), at most `max_tool_calls` per turn; one more ends
  the turn with "tool_limit". A call that does not parse gets an "error: ..." tool turn, so the model can retry.
- Streamed text (`on_delta`) never shows tool-call markup: it is held back from `<tool_call>` on, with the same
  StopStrings matcher the engine uses for stop strings.
- `drive=True` steps the engine in the calling thread (a terminal chat, one conversation); `drive=False` leaves the
  stepping to another thread's `serve_forever`, so many turns decode batched (evaluation, rollouts).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import tools as tool_registry
from .engine import FINISH_LENGTH, Engine, Result
from .sampling import SamplingParams, StopStrings
from .tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tokenizer, parse_assistant

FINISH_TOOL_LIMIT = "tool_limit"


@dataclass
class ChatReply:
    """What `chat` added: the new messages (assistant turns, with `tool_calls` when they made one, and `tool` turns
    with the results; the last one is the answer), why it ended, and token counts."""
    messages: list[dict]
    finish_reason: str  # "stop", "length" (max_tokens or a full context), "cancelled" or "tool_limit"
    prompt_tokens: int  # of the last round
    completion_tokens: int  # over all rounds
    tool_calls: int
    stop_reason: str | int | None = None  # the stop token id or stop string that ended the last round


def chat(engine: Engine, tokenizer: Tokenizer, messages: Sequence[dict], params: SamplingParams | None = None,
         tools: bool = True, on_delta: Callable[[str], None] | None = None,
         on_tool: Callable[[dict, str], None] | None = None, max_tool_calls: int = 4,
         run_tool: Callable[[str, dict], str] | None = None, drive: bool = True,
         allow_python: bool = False) -> ChatReply:
    """Generate the assistant's reply to `messages`, running the tools it calls (see `chatsmith.tools`).

    Each round renders the conversation (the one chat template) and generates; if the text stops on `</tool_call>`,
    the call is parsed (`parse_assistant`) and run (`run_tool(name, arguments) -> text`, default tools.run_tool: the
    python tool only with `allow_python`, the user's --allow-python), the
    assistant turn (with `tool_calls`) and a `tool` turn with the result are appended, and the next round goes on.
    At most `max_tool_calls` calls run; one more ends the reply with "tool_limit". A call that does not parse gets an
    "error: ..." tool turn, so the model can retry. `params` apply to every round (max_tokens per round).
    `on_delta(text)` streams the assistant's text without tool-call markup (held back from `<tool_call>` on);
    `on_tool(call, result)` reports each call run. With `drive` this thread steps the engine (a terminal chat);
    without, another thread must run `serve_forever`. A KeyboardInterrupt during a round cancels its request and
    propagates. A conversation that outgrows the context ends the reply with "length"; nothing here raises for it."""
    params = params or SamplingParams()
    run_tool = run_tool or functools.partial(tool_registry.run_tool, allow_python=allow_python)
    if tools:  # the call's closing tag is cut from the text (unless the caller includes stops) and put back below
        params = dataclasses.replace(params, stop=(*params.stop, TOOL_CALL_CLOSE))
    history, new = list(messages), []
    completion = calls = 0
    while True:
        prompt = tokenizer.render_for_completion(history)
        if len(prompt) >= engine.max_len:
            return ChatReply(new, FINISH_LENGTH, len(prompt), completion, calls)
        shown = StopStrings((TOOL_CALL_OPEN,))  # what on_delta sees: the text before any call
        result = _run_streamed(engine, prompt, params, drive, functools.partial(_show, shown, tools, on_delta))
        if on_delta is not None and (tail := shown.flush()) and (not tools or shown.matched is None):
            on_delta(tail)
        completion += result.completion_tokens
        is_call = tools and result.stop_reason == TOOL_CALL_CLOSE
        text = result.text
        if is_call and not text.endswith(TOOL_CALL_CLOSE):
            text += TOOL_CALL_CLOSE
        parsed = parse_assistant(text) if is_call else {"content": text, "tool_calls": []}
        if parsed["tool_calls"]:  # one at most: generation stopped at the first closing tag
            message = {"role": "assistant", "content": parsed["content"], "tool_calls": parsed["tool_calls"]}
        else:
            message = {"role": "assistant", "content": text}
        new.append(message)
        history.append(message)
        if not is_call or (not parsed["tool_calls"] and TOOL_CALL_OPEN not in text):  # an answer (or a stray tag)
            return ChatReply(new, result.finish_reason, len(prompt), completion, calls, result.stop_reason)
        if calls >= max_tool_calls:
            return ChatReply(new, FINISH_TOOL_LIMIT, len(prompt), completion, calls)
        if parsed["tool_calls"]:
            call = parsed["tool_calls"][0]
            output = run_tool(call["name"], call["arguments"])
        else:
            call = {"name": "", "arguments": {}}
            output = ('error: the tool call is not valid; write <tool_call>{"name": "calculator", "arguments": '
                      '{"expression": "2+3"}}</tool_call>')
        calls += 1
        if on_tool is not None:
            on_tool(call, output)
        message = {"role": "tool", "content": output}
        new.append(message)
        history.append(message)


def _show(shown: StopStrings, tools: bool, on_delta: Callable[[str], None] | None, piece: str) -> None:
    """Pass a streamed piece on to on_delta, holding back everything from `<tool_call>` on when tools are on."""
    if on_delta is None:
        return
    if not tools:
        on_delta(piece)
    elif shown.matched is None and (text := shown.push(piece)):
        on_delta(text)


def _run_streamed(engine: Engine, prompt: list[int], params: SamplingParams, drive: bool,
                  on_text: Callable[[str], None]) -> Result:
    """Generate `prompt`, calling on_text with each text delta; drive=True steps the engine in this thread."""
    request = engine.submit(prompt, params)
    try:
        if drive:
            while True:
                done = request.done  # read first: the final event is queued before done is set
                for event in request.drain():
                    on_text(event.text)
                if done:
                    break
                engine.step()
        else:
            for event in request.events():
                on_text(event.text)
    except BaseException:
        engine.cancel(request)
        if drive:
            while not request.done:
                engine.step()
        raise
    return request.result()
