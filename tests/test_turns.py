"""Turns: one assistant turn with its tool calls run (turns.chat), with a scripted model whose next tokens are keyed by
the exact prompt it is given, so a round only continues when the conversation was rendered exactly as a hand-written
reference (tool result included): a calculator call, a python call stuck in an infinite loop (its timeout text goes
back as the tool turn), a python memory bomb, a malformed call and the call limit, tools off.

    .venv/bin/pytest tests/test_turns.py -q
"""

import json

import pytest
from test_engine import ScriptedModel

from chatsmith import tools
from chatsmith.engine import Engine
from chatsmith.sampling import SamplingParams
from chatsmith.tokenizer import Tokenizer
from chatsmith.turns import chat

TEXT = ("Hello there! What is 12*34? The answer is 408. Let me compute that with a tool call.\n"
        "print(sum(range(10))) while True: pass\n我们今天学习语言模型。\n")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT * 3] * 20, 300, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# the tool loop with a scripted model


def scripted_engine(tok, rounds: list[tuple[list[dict], str]]) -> Engine:
    """rounds: (the conversation the model must be shown, what it then writes)."""
    scripts = {tuple(tok.render_for_completion(msgs)): tok.encode(text) for msgs, text in rounds}
    # ScriptedModel raises KeyError for an unscripted prompt: a conversation rendered differently fails the test
    return Engine(ScriptedModel(tok.vocab_size, scripts, seq_len=512), tok, slots=1, max_len=512)


def call_text(name: str, arguments: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


USER = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 12*34+0.1?"}]


def test_calculator_call_result_goes_back_and_generation_continues(tok):
    call = {"name": "calculator", "arguments": {"expression": "12*34+0.1"}}
    first = {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]}
    result = {"role": "tool", "content": "408.1"}  # the calculator is exact: 12*34+0.1 is 408.1, not 408.09999...
    answer = {"role": "assistant", "content": "It is 408.1."}
    engine = scripted_engine(tok, [
        (USER, "Let me compute.\n" + call_text(**call) + " and text the engine must never reach"),
        (USER + [first, result], "It is 408.1."),
    ])
    deltas, calls = [], []
    reply = chat(engine, tok, USER, SamplingParams(temperature=0), on_delta=deltas.append,
                 on_tool=lambda c, out: calls.append((c, out)))
    assert reply.messages == [first, result, answer]
    assert reply.finish_reason == "stop" and reply.tool_calls == 1
    assert calls == [(call, "408.1")]
    assert "".join(deltas) == "Let me compute.\nIt is 408.1."  # the call markup is never streamed
    assert engine.num_free_slots == 1


def test_python_infinite_loop_times_out_and_the_chat_goes_on(tok):
    call = {"name": "python", "arguments": {"code": "while True:\n    pass"}}

    def runner(name, arguments):  # the registry's python tool, with a short timeout
        assert name == "python"
        return tools.run_python(arguments["code"], timeout_s=0.5).format()

    timeout_text = "[timed out after 0.5 s; the process was killed]"
    engine = scripted_engine(tok, [
        (USER, call_text(**call)),
        (USER + [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": timeout_text}],
         "The program did not finish."),
    ])
    reply = chat(engine, tok, USER, SamplingParams(temperature=0), run_tool=runner)
    assert [m["role"] for m in reply.messages] == ["assistant", "tool", "assistant"]
    assert reply.messages[1]["content"] == timeout_text
    assert reply.messages[2]["content"] == "The program did not finish." and reply.finish_reason == "stop"


def test_python_memory_bomb_is_stopped_and_the_chat_goes_on(tok):
    call = {"name": "python", "arguments": {"code": "x = bytearray(2 * 1024**3)\nprint(len(x))"}}
    outputs = []

    def runner(name, arguments):  # the python tool with a 256 MB limit; its status line goes back (the traceback
        outputs.append(tools.run_python(arguments["code"], timeout_s=10, memory_mb=256))  # names a temp dir)
        return outputs[-1].format().splitlines()[-1]

    status = "[memory limit of 256 MB exceeded]"
    engine = scripted_engine(tok, [
        (USER, call_text(**call)),
        (USER + [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": status}],
         "That was too big."),
    ])
    reply = chat(engine, tok, USER, SamplingParams(temperature=0), run_tool=runner)
    assert outputs[0].memory_exceeded and not outputs[0].timed_out and outputs[0].format().endswith(status)
    assert [m["role"] for m in reply.messages] == ["assistant", "tool", "assistant"]
    assert reply.messages[2]["content"] == "That was too big." and reply.finish_reason == "stop"


def test_malformed_call_gets_an_error_turn_and_the_call_limit_ends_the_reply(tok):
    bad = "Try.\n<tool_call>{\"name\": 7}</tool_call>"
    call = {"name": "calculator", "arguments": {"expression": "1/0"}}
    seen = []

    def runner(name, arguments):
        seen.append((name, arguments))
        return tools.run_tool(name, arguments)

    malformed = {"role": "assistant", "content": bad}  # kept verbatim: parse_assistant finds no call in it
    probe = chat(scripted_engine(tok, [(USER, bad)]), tok, USER, SamplingParams(temperature=0), max_tool_calls=0)
    assert probe.messages == [malformed] and probe.finish_reason == "tool_limit"
    # round 1: a call that does not parse -> an error tool turn; round 2: a real call; round 3: over the limit
    error = {"role": "tool", "content": 'error: the tool call is not valid; write <tool_call>{"name": "calculator", '
                                       '"arguments": {"expression": "2+3"}}</tool_call>'}
    second = {"role": "assistant", "content": "", "tool_calls": [call]}
    division = {"role": "tool", "content": "error: division by zero"}
    engine = scripted_engine(tok, [
        (USER, bad),
        (USER + [malformed, error], call_text(**call)),
        (USER + [malformed, error, second, division], call_text(**call)),
    ])
    reply = chat(engine, tok, USER, SamplingParams(temperature=0), max_tool_calls=2, run_tool=runner)
    assert reply.messages == [malformed, error, second, division, second]
    assert reply.finish_reason == "tool_limit" and reply.tool_calls == 2
    assert seen == [("calculator", {"expression": "1/0"})]  # the malformed call ran nothing


def test_without_tools_a_call_is_plain_text(tok):
    text = "See " + call_text("calculator", {"expression": "2"}) + " done"
    engine = scripted_engine(tok, [(USER, text)])
    deltas = []
    reply = chat(engine, tok, USER, SamplingParams(temperature=0), tools=False, on_delta=deltas.append)
    assert reply.messages == [{"role": "assistant", "content": text}] and "".join(deltas) == text
