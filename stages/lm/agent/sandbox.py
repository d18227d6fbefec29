"""The code tool of agent distillation (Kang et al., "Distilling LLM Agent into Small Models with
Retrieval and Code Tools", 2025): a model writes a short Python snippet, the sandbox runs it and
returns what it printed (or its last expression's value) as the observation.

Two walls, each enough alone for what the tool is for, arithmetic and small loops:

1. **What the code may say**, checked on its syntax tree before anything runs: no imports, no
   ``global`` / ``nonlocal``, no class definitions, no names or attributes starting with ``_``
   (the ``__class__`` / ``__subclasses__`` / ``__globals__`` ladders out of every Python
   sandbox), attributes only from a short list of list, dict and str methods (``format`` is not
   among them: its ``{0.__class__}`` fields read attributes), and calls only to a whitelist of
   builtins (no ``open``, ``eval``, ``exec``, ``getattr``, ``globals``, ``input``, ...).
2. **Where it runs**: a fresh interpreter (``python -I -S``: no site, no user paths) with only
   those builtins in its namespace, in a child process with CPU-time, memory, file-size and
   open-file limits (``resource``) and a wall-clock timeout, its working directory an empty
   temporary one. A snippet that loops forever, allocates too much or raises comes back as an
   observation naming what happened; ``run`` never raises for the snippet's sake.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass

BUILTINS = ("abs", "all", "any", "bool", "dict", "divmod", "enumerate", "float", "int", "len", "list", "max", "min",
            "pow", "print", "range", "reversed", "round", "set", "sorted", "str", "sum", "tuple", "zip")  # fmt: skip
"""The only names the code may call beyond its own functions and variables."""

METHODS = frozenset({"append", "extend", "pop", "insert", "sort", "reverse", "index", "count", "items", "keys", "values",
                     "get", "split", "strip", "join", "upper", "lower", "replace", "isdigit", "startswith", "endswith"})  # fmt: skip
"""The only attributes the code may read: methods of lists, dicts and strings that compute."""

FORBIDDEN = (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.ClassDef, ast.AsyncFunctionDef, ast.Await,
             ast.AsyncFor, ast.AsyncWith, ast.With, ast.Try, ast.Raise, ast.Delete, ast.Yield, ast.YieldFrom)  # fmt: skip
if sys.version_info >= (3, 11):
    FORBIDDEN += (ast.TryStar,)


@dataclass(frozen=True)
class Limits:
    seconds: float = 2.0
    """Wall-clock limit of one run (the CPU-time limit is the same, rounded up)."""
    memory_mb: int = 256
    """Address-space limit of the child process."""
    output_chars: int = 2000
    """The observation is cut to this many characters."""


@dataclass(frozen=True)
class Observation:
    ok: bool
    text: str
    """What the snippet printed, else its last expression's value; on failure one line saying why."""


def check(code: str) -> str | None:
    """Why ``code`` may not run (one line), or None when its syntax tree passes wall 1."""
    try:
        tree = ast.parse(code, mode="exec")
    except SyntaxError as exc:
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda)) and hasattr(n, "name")}
    for node in ast.walk(tree):
        if isinstance(node, FORBIDDEN):
            return f"not allowed: {type(node).__name__.lower()} statements"
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            return f"not allowed: the name {node.id}"
        if isinstance(node, (ast.FunctionDef, ast.arg)) and (getattr(node, "name", None) or node.arg).startswith("_"):
            return "not allowed: names starting with _"
        if isinstance(node, ast.Attribute) and node.attr not in METHODS:
            return f"not allowed: the attribute .{node.attr}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            if name not in BUILTINS and name not in defined and not _assigned(tree, name):
                return f"not allowed: calling {name}()"
    return None


def _assigned(tree: ast.AST, name: str) -> bool:
    """Whether the snippet binds ``name`` itself (a variable holding one of its own functions)."""
    return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store) for n in ast.walk(tree))


_RUNNER = r"""
import builtins, json, resource, sys
seconds, memory, chars, names = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
code = sys.stdin.read()
out = []
def say(*args, sep=" ", end="\n"):
    out.append(sep.join(str(a) for a in args) + end)
safe = {n: getattr(builtins, n) for n in names}
safe["print"] = say
env = {"__builtins__": safe}
import ast
tree = ast.parse(code)
last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
try:
    exec(compile(tree, "<tool>", "exec"), env)
    value = eval(compile(ast.Expression(last.value), "<tool>", "eval"), env) if last is not None else None
    text = "".join(out) if out else ("" if value is None else repr(value))
    result = {"ok": True, "text": text[:chars]}
except MemoryError:
    result = {"ok": False, "text": "MemoryError: the code used more memory than the tool allows"}
except RecursionError:
    result = {"ok": False, "text": "RecursionError: maximum recursion depth exceeded"}
except Exception as exc:
    result = {"ok": False, "text": f"{type(exc).__name__}: {exc}"[:chars]}
sys.stdout.write(json.dumps(result))
"""


def run(code: str, limits: Limits = Limits()) -> Observation:
    """Run ``code`` behind both walls (see the module docstring); the observation, never an exception."""
    why = check(code)
    if why is not None:
        return Observation(False, why)
    cpu = max(1, int(limits.seconds + 0.999))
    args = json.dumps([cpu, limits.memory_mb * 2**20, limits.output_chars, BUILTINS])
    with tempfile.TemporaryDirectory(prefix="distil-tool-") as cwd:
        try:
            done = subprocess.run([sys.executable, "-I", "-S", "-c", _RUNNER, args], input=code, capture_output=True,
                                  text=True, timeout=limits.seconds, cwd=cwd, env={})  # fmt: skip
        except subprocess.TimeoutExpired:
            return Observation(False, f"TimeoutError: the code ran longer than {limits.seconds:g} s")
    if done.returncode != 0 or not done.stdout:
        if done.returncode in (-9, -24, 137, 152):  # SIGKILL / SIGXCPU: the CPU-time limit
            return Observation(False, f"TimeoutError: the code used more than {cpu} s of CPU")
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Observation(False, f"the tool's process failed: {tail}"[: limits.output_chars])
    result = json.loads(done.stdout)
    return Observation(bool(result["ok"]), str(result["text"])[: limits.output_chars])
