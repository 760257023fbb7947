"""Task pyout's data: a tiny generated Python snippet, what it prints, and close wrong prints."""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import re

PYOUT_QUESTION = "Question: What does this Python code print?\n{code}\nAnswer:"
INTEGER = re.compile(r"(?<![\w.])\d+(?![\w.])")


def snippet(rng: random.Random) -> str:
    """A tiny Python program of 1-6 lines whose one printed line is the answer."""
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 5)
    nums = rng.sample(range(1, 20), rng.randint(3, 5))
    word = rng.choice(["banana", "python", "fusion", "letter", "coffee", "mississippi", "rocket"])
    kind = rng.randrange(8)
    if kind == 0:
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        return f"a = {a}\nb = {b}\nc = a {op1} b {op2} {c}\nprint(c)"
    if kind == 1:
        return (
            f"total = 0\nfor i in range({c}, {c + rng.randint(2, 4)}):\n"
            f"    total += i * {a}\nprint(total)"
        )
    if kind == 2:
        expr = rng.choice(
            [
                "sum(nums) - max(nums)",
                "sorted(nums)[1]",
                "len(nums) + nums[-1]",
                "max(nums) - min(nums)",
                "nums[1] * nums[0]",
            ]
        )
        return f"nums = {nums}\nprint({expr})"
    if kind == 3:
        expr = rng.choice(
            [
                f"s.count('{rng.choice(word)}')",
                f"s[{c % 3}:{c % 3 + 3}]",
                "s[::-1]",
                "len(s) * 2",
                "s.upper()[:3]",
            ]
        )
        return f"s = '{word}'\nprint({expr})"
    if kind == 4:
        x = rng.randint(10, 40)
        return f"x = {x}\nif x % {b} == 0:\n    x = x // {b}\nelse:\n    x = x + {c}\nprint(x)"
    if kind == 5:
        return f"print([i * {a} for i in range({c + 1})])"
    if kind == 6:
        return f"x = {a * 10 + b}\nprint(x // {c + 1}, x % {c + 1})"
    return f"nums = {nums}\nprint([n for n in nums if n % 2 == {c % 2}])"


def run_snippet(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})  # our own generated code, never user input
    return out.getvalue().strip()


def pyout_row(rng: random.Random) -> dict:
    code = snippet(rng)
    output = run_snippet(code)
    return {
        "prompt": PYOUT_QUESTION.format(code=code),
        "completion": " " + output,
        "code": code,
        "output": output,
    }


def pyout_choices(code: str, output: str, rng: random.Random) -> list[str] | None:
    """Three wrong options for a multiple-choice question about `code`: what the same snippet
    prints with one integer changed by 1 or 2 (well-formed and close, so only tracing the code
    tells them apart); None when the snippet does not yield three distinct ones."""
    literals = list(INTEGER.finditer(code))
    rng.shuffle(literals)
    wrong: dict[str, None] = {}
    for literal, delta in itertools.product(literals, (1, -1, 2)):
        changed = (
            code[: literal.start()] + str(int(literal.group()) + delta) + code[literal.end() :]
        )
        try:
            printed = run_snippet(changed)
        except Exception:  # a changed bound may index past a list or divide by zero: skip it
            continue
        if printed != output:
            wrong.setdefault(printed)
        if len(wrong) == 3:
            return list(wrong)
    return None
