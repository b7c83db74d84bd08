"""Tests for chatsmith/tools.py: the calculator against Python's own arithmetic (int and fractions.Fraction) on a few
hundred random expressions and its refusals; the registry (the python tool off unless allowed) and the tool-call
parser. The Python runner's sandbox and its escape attempts: tests/test_sandbox.py.

    .venv/bin/pytest tests/test_tools.py -q
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import random
import time
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import pytest

from chatsmith import sandbox, tools
from chatsmith.tools import TOOLS, calculate, parse_tool_call, run_tool

# ---------------------------------------------------------------------------------------------------------------------
# calculator


def random_int_expr(rng: random.Random, depth: int) -> str:
    """Integer arithmetic with + - * // % ** (small exponents) and unary minus; magnitudes stay far below 1e300."""
    if depth == 0 or rng.random() < 0.2:
        return str(rng.randint(0, 99))
    kind = rng.random()
    if kind < 0.1:
        return f"-{random_int_expr(rng, depth - 1)}"
    if kind < 0.25:
        return f"({random_int_expr(rng, depth - 1)})**{rng.randint(0, 3)}"
    op = rng.choice(["+", "-", "*", "//", "%"])
    left, right = random_int_expr(rng, depth - 1), random_int_expr(rng, depth - 1)
    return f"({left} {op} {right})" if rng.random() < 0.7 else f"{left} {op} {right}"


def random_rational_expr(rng: random.Random, depth: int) -> tuple[str, str]:
    """(expression, the same expression over fractions.Fraction) with decimals, / and integer powers (also < 0)."""
    if depth == 0 or rng.random() < 0.2:
        if rng.random() < 0.5:
            n = str(rng.randint(0, 99))
        else:
            n = f"{rng.randint(0, 99)}.{rng.randint(0, 99):02d}"
        return n, f"Fraction('{n}')"
    kind = rng.random()
    if kind < 0.1:
        e, r = random_rational_expr(rng, depth - 1)
        return f"-{e}", f"-{r}"
    if kind < 0.25:
        e, r = random_rational_expr(rng, depth - 1)
        k = rng.randint(-2, 3)
        return f"({e})**{k}", f"({r})**{k}"
    op = rng.choice(["+", "-", "*", "/"])
    (e1, r1), (e2, r2) = random_rational_expr(rng, depth - 1), random_rational_expr(rng, depth - 1)
    return f"({e1} {op} {e2})", f"({r1} {op} {r2})"


def significant_digits(x: Fraction) -> int | None:
    """Significant digits of x's decimal expansion, None if it does not terminate."""
    den = x.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return None
    with localcontext() as ctx:
        ctx.prec = 1000
        d = (Decimal(x.numerator) / Decimal(x.denominator)).normalize()
    return len(d.as_tuple().digits)


def test_calculator_matches_python_integer_arithmetic():
    rng = random.Random(0)
    n_errors = 0
    for _ in range(400):
        expr = random_int_expr(rng, 4)
        try:
            expected = str(eval(expr, {"__builtins__": {}}))  # the test's own generated arithmetic, as reference
        except ZeroDivisionError:
            expected = "error: division by zero"
            n_errors += 1
        assert calculate(expr) == expected, expr
    assert 0 < n_errors < 100  # both branches were exercised


def test_calculator_matches_exact_rational_arithmetic():
    rng = random.Random(1)
    n_exact = 0
    for _ in range(400):
        expr, reference = random_rational_expr(rng, 3)
        got = calculate(expr)
        try:
            expected = eval(reference, {"__builtins__": {}, "Fraction": Fraction})  # Python's own Fraction arithmetic
        except ZeroDivisionError:
            assert got == "error: division by zero", expr
            continue
        value = Fraction(got)
        assert abs(value - expected) <= abs(expected) * Fraction(1, 10**14), (expr, got, expected)
        digits = significant_digits(expected)
        if digits is not None and digits <= 15:  # a short terminating decimal comes out exactly, without float noise
            assert value == expected, (expr, got, expected)
            n_exact += 1
    assert n_exact > 50


@pytest.mark.parametrize("expr, expected", [
    ("0.1+0.2", "0.3"), ("0.1+0.2-0.3", "0"), ("1/3", "0.333333333333333"), ("1/3*3", "1"), ("10/4", "2.5"),
    ("2**-2", "0.25"), ("2/3*1e20", "6.66666666666667e+19"), ("-7 // 2", "-4"), ("-7 % 3", "2"), ("2^10", "1024"),
    ("sqrt(16)", "4"), ("sqrt(9/4)", "1.5"), ("sqrt(2)**2", "2"), ("round(2.675, 2)", "2.68"), ("round(2.5)", "2"),
    ("floor(-2.5)", "-3"), ("ceil(2.1)", "3"), ("max(1, 2.5, -3)", "2.5"), ("abs(-4/5)", "0.8"), ("3 × 4 ÷ 6", "2"),
    ("0.10000000000000000001 * 10", "1"),
    ("(0.10000000000000000001 - 0.1) * 10**20", "1"), ("2**64", str(2**64)), ("10**300", str(10**300)),
    ("  ( 1 +\n 2 ) * 3 ", "9"), ("1" + "+1" * 99, "100"),
])
def test_calculator_values(expr, expected):  # round() halves to even on the exact value: 2.675 -> 2.68
    assert calculate(expr) == expected


def test_calculator_float_functions_match_math():
    rng = random.Random(2)
    for _ in range(100):
        x = rng.randint(1, 10**6) / 1000
        for name, ref in [("sqrt", math.sqrt), ("exp", math.exp), ("log", math.log), ("sin", math.sin),
                          ("cos", math.cos), ("tan", math.tan)]:
            if name == "exp" and x > 690:
                continue
            assert math.isclose(float(calculate(f"{name}({x})")), ref(x), rel_tol=1e-14, abs_tol=1e-14), (name, x)
    assert math.isclose(float(calculate("pi * e")), math.pi * math.e, rel_tol=1e-14)
    assert calculate("log(1000, 10)") == "3"


@pytest.mark.parametrize("expr, words", [
    ("__import__('os')", "only these functions"),
    ("__import__('os').system('true')", "attribute"),
    ("(1).real", "attribute"),
    ("().__class__.__bases__[0].__subclasses__()", "attribute"),
    ("x + 1", "unknown name 'x'"),
    ("open('/etc/passwd')", "only these functions"),
    ("sqrt.__globals__", "attribute"),
    ("lambda: 1", "Lambda is not allowed"),
    ("[i for i in range(10)]", "is not allowed"),
    ("'a' * 10", "only real numbers"),
    ("True + 1", "booleans"),
    ("1 if 1 else 2", "IfExp is not allowed"),
    ("1 < 2", "Compare is not allowed"),
    ("1 << 10000", "operator LShift is not allowed"),
    ("sqrt(x=4)", "only these functions"),
    ("sqrt(*[4])", "unpacking"),
    ("1,000", "commas"),
    ("9**9**9", "too large"),
    ("10**10**10", "too large"),
    ("2**2**2**2**2", "too large"),
    ("(1 + 1e-9)**10**12", "too large"),
    ("10**301", "too large"),
    ("1e308 * 10", "too large"),
    ("exp(1000)", "too large"),
    ("1/0", "division by zero"),
    ("0**-1", "division by zero"),
    ("(-8)**(1/3)", "not a real number"),
    ("sqrt(-1)", "not a real number"),
    ("1+" * 100 + "1", "longer than 200"),
    ("", "empty"),
    ("2 +", "not a valid"),
    ("import os", "not a valid"),
    ("(" * 150 + "1" + ")" * 49, "not a valid"),
])
def test_calculator_refuses(expr, words):
    start = time.perf_counter()
    result = calculate(expr)
    assert time.perf_counter() - start < 0.5  # refused before any big computation (9**9**9 would take minutes)
    assert result.startswith("error: ") and words in result, result


def test_calculator_never_calls_eval_or_exec(monkeypatch):
    source = Path(tools.__file__).read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)]
    called = {n.func.id for n in calls if isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}

    def boom(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    assert calculate("(2 + 3) * 4 / 8") == "2.5"


# ---------------------------------------------------------------------------------------------------------------------
# registry and tool-call parsing


def test_run_tool_dispatches():
    assert run_tool("calculator", {"expression": "2+3"}) == "5"
    assert run_tool("calculator", '{"expression": "0.1 + 0.2"}') == "0.3"
    call = parse_tool_call('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>')
    assert run_tool(*call) == "42"


def test_python_tool_is_off_unless_allowed(monkeypatch):
    ran = []
    monkeypatch.setattr(tools, "run_python", lambda code: ran.append(code))  # nothing may reach the runner
    result = run_tool("python", {"code": "print(1)"})
    assert result.startswith("error: the python tool is off") and "--allow-python" in result and ran == []
    assert tools.main(['{"name": "python", "arguments": {"code": "print(1)"}}']) == 0 and ran == []


def test_allowed_python_tool_runs_in_the_sandbox(monkeypatch):
    seen = []

    def fake_run_python(code, **limits):
        seen.append(code)
        return tools.PythonResult("45\n", "", 0, False, False, False, 0.1, 10.0, 512, 4096)

    monkeypatch.setattr(tools, "run_python", fake_run_python)
    assert run_tool("python", {"code": "print(sum(range(10)))"}, allow_python=True) == "45"
    assert seen == ["print(sum(range(10)))"]


def test_python_tool_without_a_sandbox_is_one_error_sentence(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)  # no bwrap on PATH
    result = run_tool("python", {"code": "print(1)"}, allow_python=True)
    assert result.startswith("error: the python tool runs code only inside bubblewrap")
    assert "apt-get install bubblewrap" in result and "\n" not in result


@pytest.mark.parametrize("name, arguments, words", [
    ("nope", {}, "unknown tool"),
    (None, {}, "unknown tool"),
    ("calculator", "{bad json", "not valid JSON"),
    ("calculator", "[1, 2]", "JSON object"),
    ("calculator", ["2+3"], "JSON object"),
    ("calculator", {}, "missing argument 'expression'"),
    ("calculator", {"expression": 5}, "must be a string"),
    ("calculator", {"expression": "1", "extra": 1}, "unknown argument 'extra'"),
    ("python", {"code": None}, "must be a string"),
    ("calculator", {"expression": "x"}, "unknown name"),
])
def test_run_tool_errors_are_text(name, arguments, words):
    result = run_tool(name, arguments, allow_python=True)  # every case fails before a tool runs
    assert result.startswith("error: ") and words in result, result


def test_run_tool_turns_an_exception_into_text(monkeypatch):
    def broken(expression):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tools, "calculate", broken)
    assert run_tool("calculator", {"expression": "1"}) == "error: calculator failed: RuntimeError: disk on fire"


def test_tools_registry_is_read_only_and_openai_shaped():
    with pytest.raises(TypeError):
        TOOLS["evil"] = TOOLS["calculator"]  # type: ignore[index]
    with pytest.raises(TypeError):
        TOOLS["calculator"].parameters["required"] = []  # type: ignore[index]
    assert set(TOOLS) == {"calculator", "python"}
    for name, spec in TOOLS.items():
        openai = spec.to_openai()
        assert json.loads(json.dumps(openai)) == openai
        function = openai["function"]
        assert function["name"] == name and "\n" not in function["description"]
        schema = function["parameters"]
        assert schema["type"] == "object" and schema["required"] == list(schema["properties"])
        openai["function"]["parameters"]["required"].append("x")  # a copy: the spec stays as it was
        assert "x" not in spec.parameters["required"]


CALL = {"name": "calculator", "arguments": {"expression": "2+3"}}


@pytest.mark.parametrize("text, expected", [
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>', CALL),
    ('  <tool_call>\n  {"name": "calculator",\n "arguments": {"expression": "2+3"}}\n</tool_call>\n', CALL),
    ('{"name": "calculator", "arguments": {"expression": "2+3"}}', CALL),
    ('{"name": "calculator", "arguments": "{\\"expression\\": \\"2+3\\"}"}', CALL),
    ('{"name": "calculator", "parameters": {"expression": "2+3"}}', CALL),
    ('{"name": "python"}', {"name": "python", "arguments": {}}),
])
def test_parse_tool_call(text, expected):
    assert parse_tool_call(text) == (expected["name"], expected["arguments"])


@pytest.mark.parametrize("text", [
    "", "hello", "<tool_call></tool_call>", "<tool_call>{\"name\": 3}</tool_call>", "[1, 2]", '{"arguments": {}}',
    '{"name": "", "arguments": {}}', '{"name": "x", "arguments": [1]}', '{"name": "x", "arguments": "not json"}',
    '{"name": "calculator"', '{"name": "x"} trailing', "[" * 100_000, None,
])
def test_parse_tool_call_rejects_garbage(text):
    assert parse_tool_call(text) is None


def test_parse_tool_call_round_trips_random_calls():
    rng = random.Random(3)
    alphabet = "abc xyz 0123 \"'\\\n{}<>/é中"
    for _ in range(200):
        arguments = {"".join(rng.choices(alphabet, k=rng.randint(1, 5))): rng.choice(
            ["".join(rng.choices(alphabet, k=rng.randint(0, 20))), rng.randint(-10, 10), None, [1, "a"]])
            for _ in range(rng.randint(0, 3))}
        body = json.dumps({"name": "calculator", "arguments": arguments}, ensure_ascii=False)
        text = f"<tool_call>{body}</tool_call>"
        assert parse_tool_call(text) == ("calculator", arguments)
