"""The agent's code tool (``stages.lm.agent.sandbox``): it computes what it is for, and every way
out a snippet tries comes back as an observation saying no, never as an exception or an effect."""

from __future__ import annotations

import time

import pytest

from stages.lm.agent.sandbox import Limits, check, run

QUICK = Limits(seconds=0.5, memory_mb=128)


@pytest.mark.parametrize(("code", "text"), [
    ("print(123456789 * 987654321)", "121932631112635269\n"),
    ("total = 0\nfor x in [31, 4159, 26535]:\n    total += x\ntotal", "30725"),
    ("def f(n):\n    return 1 if n < 2 else n * f(n - 1)\nf(20)", "2432902008176640000"),
    ("xs = [3, 1, 2]\nxs.sort()\nxs", "[1, 2, 3]"),
    ("divmod(10**20 + 7, 97)", repr(divmod(10**20 + 7, 97))),
    ("x = 5", ""),
])  # fmt: skip
def test_it_computes_and_returns_what_was_printed_or_the_last_value(code, text):
    obs = run(code, QUICK)
    assert obs.ok and obs.text == text


@pytest.mark.parametrize(("code", "why"), [
    ("import os", "import"),
    ("from os import system", "import"),
    ("__import__('os')", "__import__"),
    ("().__class__.__bases__[0].__subclasses__()", "the attribute .__"),
    ("print.__self__", ".__self__"),
    ("'{0.__class__}'.format(1)", ".format"),
    ("f'{(1).__class__}'", ".__class__"),
    ("open('/etc/passwd')", "open()"),
    ("eval('1 + 1')", "eval()"),
    ("exec('x = 1')", "exec()"),
    ("getattr(1, 'real')", "getattr()"),
    ("globals()", "globals()"),
    ("vars()", "vars()"),
    ("breakpoint()", "breakpoint()"),
    ("_x = 1", "_x"),
    ("class A:\n    pass", "classdef"),
    ("try:\n    pass\nexcept Exception:\n    pass", "try"),
    ("with x:\n    pass", "with"),
    ("global x", "global"),
    ("def f(_a):\n    return 1", "names starting with _"),
])  # fmt: skip
def test_escapes_are_refused_before_anything_runs(code, why):
    reason = check(code)
    assert reason is not None and why in reason
    obs = run(code, QUICK)
    assert not obs.ok and why in obs.text


def test_a_builtin_smuggled_through_a_variable_is_still_not_there():
    obs = run("f = open\nf('/etc/passwd')", QUICK)
    assert not obs.ok and obs.text.startswith("NameError")


def test_runaway_code_is_stopped_by_the_limits_and_reported():
    t0 = time.perf_counter()
    loop = run("while True:\n    pass", QUICK)
    assert not loop.ok and "TimeoutError" in loop.text and time.perf_counter() - t0 < 3
    memory = run("xs = [0] * (10 ** 9)", QUICK)
    assert not memory.ok and "MemoryError" in memory.text
    deep = run("def f(n):\n    return f(n + 1)\nf(0)", QUICK)
    assert not deep.ok and "RecursionError" in deep.text
    zero = run("1 / 0", QUICK)
    assert not zero.ok and zero.text == "ZeroDivisionError: division by zero"


def test_output_is_cut_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flood = run("print('x' * 100000)", Limits(seconds=1, output_chars=50))
    assert flood.ok and len(flood.text) == 50
    assert not run("open('f.txt', 'w')", QUICK).ok and list(tmp_path.iterdir()) == []


def test_syntax_errors_are_observations():
    obs = run("def (:", QUICK)
    assert not obs.ok and obs.text.startswith("SyntaxError")
