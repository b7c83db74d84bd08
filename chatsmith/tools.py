"""Tools a chat model can call: a safe calculator and a sandboxed Python runner (opt-in), behind one small registry.

The model writes `<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>` in its turn; the
engine hands the text to `parse_tool_call`, runs `run_tool(name, arguments)` and puts the returned text into a `tool`
turn. Tools never raise: every failure comes back as text that starts with "error: ", so the model can read it and
try again.

    python -m chatsmith.tools '<tool_call>{"name": "calculator", "arguments": {"expression": "0.1+0.2"}}</tool_call>'
    python -m chatsmith.tools --allow-python '{"name": "python", "arguments": {"code": "print(sum(range(10)))"}}'

Calculator (`calculate`). The expression is parsed with `ast.parse(..., mode="eval")` and walked over an allow-list:
number literals, + - * / // % **, unary + -, parentheses, the constants pi and e, and the functions sqrt abs round
min max floor ceil exp log sin cos tan. No eval/exec, no other names, no attribute access, no other calls.
- Numbers are exact rationals (`fractions.Fraction`) as long as every step is rational: a decimal literal is read from
  its text, so 0.1 is exactly 1/10, `0.1+0.2` is `0.3` and `1/3*3` is `1`. Irrational steps (sqrt of a non-square,
  fractional powers, pi, e, exp/log/trig) switch to float, and float stays float.
- Output: integers in full; anything else to 15 significant digits (`1/3` -> `0.333333333333333`, `2/3*1e20` ->
  `6.66666666666667e+19`), which also hides float noise (`sqrt(2)**2` -> `2`).
- Limits: 200 characters; |value| <= 1e300 at every step; a power whose exact result would exceed that is refused
  before it is computed (`9**9**9` answers in microseconds); an exact power that would need more than 4096 bits is
  done in float instead ((1/2)**5000 underflows to 0). `^` is read as `**` (a model asking for 2^10 never means xor).

Python runner (`run_python`, in chatsmith/sandbox.py, re-exported here): off unless asked for (`--allow-python` in
chat, serve and sft checks; `run_tool(..., allow_python=True)`), and then only inside bubblewrap.
"""

from __future__ import annotations

import ast
import dataclasses
import decimal
import json
import math
import sys
from collections.abc import Callable, Mapping
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from .common import UserError
from .sandbox import PythonResult, SandboxUnavailable, check_sandbox, run_python  # noqa: F401 (re-exported)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# ---------------------------------------------------------------------------------------------------------------------
# calculator

MAX_EXPRESSION_CHARS = 200
MAX_ABS = 10**300  # |value| bound at every step (also keeps floats finite)
MAX_LOG2 = math.log2(MAX_ABS)
MAX_EXACT_POW_BITS = 4096  # an exact power costing more bits than this is done in float
MAX_DENOMINATOR_BITS = 1024  # a rational with a larger denominator becomes a float
SIGNIFICANT_DIGITS = 15
FUNCTIONS = ("sqrt", "abs", "round", "min", "max", "floor", "ceil", "exp", "log", "sin", "cos", "tan")
CONSTANTS = MappingProxyType({"pi": math.pi, "e": math.e})

Number = Fraction | float


class CalculatorError(Exception):
    """An expression the calculator refuses; the message goes back to the model after 'error: '."""


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression safely; the result as text, or text starting with 'error: '."""
    if not isinstance(expression, str):
        return "error: the expression must be a string"
    text = expression.strip()
    if not text:
        return "error: the expression is empty"
    if len(text) > MAX_EXPRESSION_CHARS:
        return f"error: the expression is longer than {MAX_EXPRESSION_CHARS} characters"
    text = text.replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return "error: not a valid arithmetic expression"
    try:
        return _format(_eval(tree.body, text))
    except CalculatorError as exc:
        return f"error: {exc}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return "error: the result is too large"
    except RecursionError:
        return "error: the expression is nested too deeply"
    except (ArithmeticError, ValueError, TypeError) as exc:
        return f"error: {exc}"


def _check(value: Number) -> Number:
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_ABS:
            raise CalculatorError("the result is too large")
        return value
    if abs(value) > MAX_ABS:
        raise CalculatorError("the result is too large")
    if value.denominator.bit_length() > MAX_DENOMINATOR_BITS:
        return float(value)
    return value


def _eval(node: ast.AST, source: str) -> Number:
    match node:
        case ast.Constant(value=bool()):
            raise CalculatorError("booleans are not numbers here")
        case ast.Constant(value=int() as value):
            return _check(Fraction(value))
        case ast.Constant(value=float() as value):
            literal = ast.get_source_segment(source, node) or repr(value)
            return _check(Fraction(literal) if math.isfinite(value) else value)  # 0.1 is exactly 1/10
        case ast.Constant():
            raise CalculatorError(f"only real numbers are allowed, not {type(node.value).__name__}")
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return -_eval(operand, source)
        case ast.UnaryOp(op=ast.UAdd(), operand=operand):
            return +_eval(operand, source)
        case ast.BinOp(left=left, op=op, right=right):
            return _binary(op, _eval(left, source), _eval(right, source))
        case ast.Name(id=name) if name in CONSTANTS:
            return CONSTANTS[name]
        case ast.Name(id=name):
            raise CalculatorError(f"unknown name {name!r}; allowed: {', '.join(CONSTANTS)} and {', '.join(FUNCTIONS)}")
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in FUNCTIONS:
            if any(isinstance(a, ast.Starred) for a in args):
                raise CalculatorError("argument unpacking is not allowed")
            return _check(_call(name, [_eval(a, source) for a in args]))
        case ast.Attribute() | ast.Call(func=ast.Attribute()):
            raise CalculatorError("attribute access is not allowed")
        case ast.Call():
            raise CalculatorError(f"only these functions can be called, with plain arguments: {', '.join(FUNCTIONS)}")
        case ast.Tuple():
            raise CalculatorError("commas are not allowed: write 1000 rather than 1,000, and one expression per call")
    raise CalculatorError(f"{type(node).__name__} is not allowed; use numbers, + - * / // % ** and parentheses")


def _binary(op: ast.operator, a: Number, b: Number) -> Number:
    match op:
        case ast.Add():
            return _check(a + b)
        case ast.Sub():
            return _check(a - b)
        case ast.Mult():
            return _check(a * b)
        case ast.Div():
            return _check(a / b)
        case ast.FloorDiv():
            return _check(a // b)
        case ast.Mod():
            return _check(a % b)
        case ast.Pow():
            return _power(a, b)
    raise CalculatorError(f"the operator {type(op).__name__} is not allowed; use + - * / // % **")


def _power(a: Number, b: Number) -> Number:
    if isinstance(a, Fraction) and isinstance(b, Fraction) and b.denominator == 1:
        n = b.numerator
        if a in (0, 1, -1):
            return a**n  # 0**-1 raises ZeroDivisionError
        log2_abs = math.log2(abs(a.numerator)) - math.log2(a.denominator)
        if n * log2_abs > MAX_LOG2:
            raise CalculatorError("the result is too large")
        if abs(n) * max(a.numerator.bit_length(), a.denominator.bit_length()) > MAX_EXACT_POW_BITS:
            return _check(float(a) ** n)
        return _check(a**n)
    x, y = float(a), float(b)
    if x < 0 and not y.is_integer():
        raise CalculatorError("a negative number to a fractional power is not a real number")
    return _check(x**y)


def _call(name: str, args: list[Number]) -> Number:
    arity = {"round": (1, 2), "log": (1, 2), "min": (1, 100), "max": (1, 100)}.get(name, (1, 1))
    if not arity[0] <= len(args) <= arity[1]:
        expected = str(arity[0]) if arity[0] == arity[1] else f"{arity[0]} to {arity[1]}"
        raise CalculatorError(f"{name}() takes {expected} argument(s), got {len(args)}")
    x = args[0]
    match name:
        case "sqrt":
            if x < 0:
                raise CalculatorError("sqrt of a negative number is not a real number")
            if isinstance(x, Fraction):
                num, den = math.isqrt(x.numerator), math.isqrt(x.denominator)
                if num * num == x.numerator and den * den == x.denominator:
                    return Fraction(num, den)
            return math.sqrt(x)
        case "abs":
            return abs(x)
        case "round":
            if len(args) == 1:
                return Fraction(round(x))
            digits = args[1]
            if not (isinstance(digits, Fraction) and digits.denominator == 1 and abs(digits) <= 300):
                raise CalculatorError("round(x, n) needs a whole number n between -300 and 300")
            return round(x, int(digits))
        case "min":
            return min(args)
        case "max":
            return max(args)
        case "floor":
            return Fraction(math.floor(x))
        case "ceil":
            return Fraction(math.ceil(x))
        case "exp":
            return math.exp(x)
        case "log":
            return math.log(x) if len(args) == 1 else math.log(x, args[1])
        case "sin":
            return math.sin(x)
        case "cos":
            return math.cos(x)
        case "tan":
            return math.tan(x)
    raise CalculatorError(f"unknown function {name!r}")


def _format(value: Number) -> str:
    if isinstance(value, float):
        text = format(value, f".{SIGNIFICANT_DIGITS}g")
        return "0" if text in ("0", "-0") else text
    if value.denominator == 1:
        return str(value.numerator)
    with decimal.localcontext() as ctx:
        ctx.prec = SIGNIFICANT_DIGITS
        quotient = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)  # exact if it terminates
        return format(quotient.normalize(), "g")  # normalize: 1.00000000000000 -> 1


# ---------------------------------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One tool: its name, a one-line description, a JSON schema of its arguments, and the function that runs it."""

    name: str
    description: str
    parameters: Mapping[str, Any]  # JSON schema, frozen (MappingProxyType / tuples)
    run: Callable[[Mapping[str, Any]], str] = dataclasses.field(repr=False, compare=False)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI function-tool form: {"type": "function", "function": {name, description, parameters}}."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": _thaw(self.parameters)}}


def _freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


def _thaw(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_thaw(v) for v in obj]
    return obj


def _object_schema(properties: dict[str, dict[str, str]]) -> Mapping[str, Any]:
    return _freeze({"type": "object", "properties": properties, "required": list(properties),
                    "additionalProperties": False})


TOOLS: Mapping[str, ToolSpec] = MappingProxyType({
    "calculator": ToolSpec(
        "calculator",
        "Evaluate an arithmetic expression exactly: + - * / // % ** ( ), sqrt, abs, round, min, max, floor, ceil, "
        "exp, log, sin, cos, tan, pi, e.",
        _object_schema({"expression": {"type": "string", "description": "for example (3 + 4.5) * 2 / 7"}}),
        lambda args: calculate(args["expression"]),
    ),
    "python": ToolSpec(
        "python",
        "Run a Python 3 program in a sandbox (no network, no files kept, 10 s, 512 MB, no input) and get what it "
        "prints; print the results you need.",
        _object_schema({"code": {"type": "string", "description": "the program; print() what you want to see"}}),
        lambda args: run_python(args["code"]).format(),
    ),
})


def _type_ok(value: Any, expected: str) -> bool:
    if isinstance(value, bool):
        return expected == "boolean"
    kinds = {"string": str, "integer": int, "number": (int, float), "object": Mapping, "array": (list, tuple)}
    return isinstance(value, kinds.get(expected, object))


def _validate(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> str | None:
    """The problem with `arguments` under `schema` (flat objects of typed properties), or None."""
    properties = schema["properties"]
    for key in schema.get("required", ()):
        if key not in arguments:
            return f"missing argument {key!r}"
    for key, value in arguments.items():
        if key not in properties:
            return f"unknown argument {key!r}; the arguments are {', '.join(properties)}"
        if not _type_ok(value, properties[key]["type"]):
            return f"argument {key!r} must be a {properties[key]['type']}, not {type(value).__name__}"
    return None


def run_tool(name: str, arguments: Mapping[str, Any] | str, *, allow_python: bool = False) -> str:
    """Run tool `name` with `arguments` (a dict or its JSON text); the text for the tool turn, never an exception.

    The python tool runs only with `allow_python` (the user's --allow-python); otherwise its call gets an error turn."""
    spec = TOOLS.get(name) if isinstance(name, str) else None
    if spec is None:
        return f"error: unknown tool {name!r}; the tools are {', '.join(TOOLS)}"
    if name == "python" and not allow_python:
        return ("error: the python tool is off here (the user can turn it on with --allow-python); "
                "use the calculator for arithmetic")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            return "error: the arguments are not valid JSON"
    if not isinstance(arguments, Mapping):
        return "error: the arguments must be a JSON object"
    problem = _validate(arguments, spec.parameters)
    if problem:
        return f"error: {problem}"
    try:
        return spec.run(arguments)
    except UserError as exc:  # SandboxUnavailable: the sentence says how to install bubblewrap
        return f"error: {exc}"
    except Exception as exc:  # last line of defence: a tool failure is text for the model, not a crash of the engine
        return f"error: {name} failed: {type(exc).__name__}: {exc}"


def parse_tool_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) from the JSON of a tool call, with or without its <tool_call> tags; None if it is not one.

    Accepts "arguments" (or "parameters") as an object, as JSON text of an object, or absent (no arguments).
    """
    if not isinstance(text, str):
        return None
    body = text.strip()
    body = body.removeprefix(TOOL_CALL_OPEN).removesuffix(TOOL_CALL_CLOSE).strip()
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return call["name"].strip(), arguments


def main(argv: list[str] | None = None) -> int:
    """`python -m chatsmith.tools [--allow-python] '<tool_call>{...}</tool_call>'`: run one call, print its result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    allow_python = "--allow-python" in argv
    call = parse_tool_call(" ".join(a for a in argv if a != "--allow-python"))
    if call is None:
        print('usage: python -m chatsmith.tools [--allow-python] '
              '\'{"name": "calculator", "arguments": {"expression": "2+3"}}\'', file=sys.stderr)
        return 2
    print(run_tool(*call, allow_python=allow_python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
