"""Process scores: how sound the steps of a COT are, not only its final answer.

- `arith_process_score`: re-evaluates the arithmetic a COT states — GSM8K calculator annotations
  `<<48/2=24>>` and plain equations `48/2 = 24`, `0.2 x 50 = $10` — exactly, with Fractions and a tiny
  recursive-descent parser (+ - * x × / ÷, parentheses, unary minus; never eval). Score = fraction of
  checkable steps whose equations are all right; NaN when no step holds a checkable equation.
- `mc_step_values`: Monte-Carlo step values (Self-Iterative Process Feedback): step i's value is the fraction
  of M continuations sampled from the prefix c_<=i that reach the gold answer; the rollout engine is plugged
  in as a `ContinuationSampler`: `sample_continuations(prefixes, m) -> m continuations per prefix`.

Checking rules (see `check_equation`): a stated result with d >= 1 decimals may be the exact value rounded or
truncated to d places ("10/3 = 3.33" and "2/3 = 0.66" are right, "10/3 = 3.4" is not); an integer result must
be exact ("7/2 = 3" is wrong). Equations with
"%" are skipped (is "20% * 50" 0.2*50 or a unit?), and so is anything the parser does not understand. A plain
equation's left side is the run of arithmetic characters just before "=", so prose inside an expression
("half of 50 + 5 = 30") is read as "50 + 5" — annotations, when present, are the reliable signal.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Callable, Optional

from aftray.tasks.answers import extract_answer, is_correct

MAX_CHARS = 16_384  # only the first MAX_CHARS characters of a COT are step-checked
_ANNOTATION_RE = re.compile(r"<<([^<>]{1,200})>>")
_STEP_SEP_RE = re.compile(r"\s*\n\s*|(?<=[.!?])\s+")  # newlines, and sentence ends (not "0.5": no space)
_LHS_RE = re.compile(r"[0-9$.,()+\-*/x×÷ ]{1,80}\Z")  # the arithmetic run just left of an "="
_NUMBER = r"(?:(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)"
# Result right of "=": a whole number or fraction, not glued to a unit or a variable ("5A"), not part of a
# mixed number ("1 1/2"), and not followed by another operator and operand ("= 24 x 2" is not a result).
_RHS_RE = re.compile(rf"\s*\$?\s*(-?{_NUMBER}(?:\s?/\s?{_NUMBER})?)(?![0-9A-Za-z%]|[.,][0-9])(?!\s?[0-9])"
                     r"(?!\s*[+\-*/x×÷]\s*[0-9(])(?!\s*%)")
# "x" is a times sign only between spaces or digits ("0.2 x 50", "3x4"), not in algebra ("3x-5").
_TOKEN_RE = re.compile(rf"\s*(?:({_NUMBER})|([-+*/×÷()]|(?<=[\s0-9])x(?=[\s0-9])))\s*")
_OPS = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}


# ---------------------------------------------------------------------------------------------- parser
def _tokenize(expr: str) -> list:
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read {expr[pos:pos + 10]!r}")
        num, op = m.groups()
        if num is not None:
            if len(num) > 40:
                raise ValueError("number too long")
            tokens.append(Fraction(num.replace(",", "")))
        else:
            tokens.append(_OPS.get(op, op))
        pos = m.end()
    return tokens


def evaluate_arithmetic(expr: str) -> tuple[Fraction, int]:
    """Exact value of an arithmetic expression and its number of binary operators.

    Raises ValueError when the text is not an expression, ZeroDivisionError on a division by zero.
    """
    tokens = _tokenize(expr.replace("$", ""))
    pos, binary_ops = 0, 0

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1] if pos <= len(tokens) else None

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def expression() -> Fraction:
        nonlocal binary_ops
        value = term()
        while peek() in ("+", "-"):
            op, binary_ops = take(), binary_ops + 1
            value = value + term() if op == "+" else value - term()
        return value

    def term() -> Fraction:
        nonlocal binary_ops
        value = factor()
        while peek() in ("*", "/"):
            op, binary_ops = take(), binary_ops + 1
            value = value * factor() if op == "*" else value / factor()
        return value

    def factor() -> Fraction:
        token = take()
        if token == "-":
            return -factor()
        if token == "(":
            value = expression()
            if take() != ")":
                raise ValueError("unbalanced parenthesis")
            return value
        if isinstance(token, Fraction):
            return token
        raise ValueError(f"unexpected {token!r}")

    value = expression()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r}")
    return value, binary_ops


def check_equation(lhs: str, rhs: str) -> Optional[bool]:
    """Is `lhs = rhs` arithmetically right? None when not checkable (unreadable, or no operator at all)."""
    if "%" in lhs or "%" in rhs:
        return None
    try:
        claimed = Fraction(re.sub(r"[\s,$]", "", rhs))
        value, binary_ops = evaluate_arithmetic(lhs)
    except (ValueError, RecursionError):  # deep parentheses hit the recursion limit: not checkable
        return None
    except ZeroDivisionError:
        return False
    if binary_ops == 0:
        return None
    decimals = len(rhs.partition(".")[2].strip())
    if value == claimed or decimals == 0:
        return value == claimed
    scaled, stated = value * 10**decimals, claimed * 10**decimals  # stated is whole: it has `decimals` places
    return abs(scaled - stated) <= Fraction(1, 2) or stated == math.trunc(scaled)  # rounded, or truncated


# ---------------------------------------------------------------------------------------------- steps
def step_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each non-empty step: lines and sentences, separators excluded."""
    spans, start = [], 0
    for m in _STEP_SEP_RE.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
        start = m.end()
    if len(text) > start:
        spans.append((start, len(text)))
    return spans


def _plain_equations(text: str) -> list[tuple[str, str]]:
    equations = []
    for eq in re.finditer("=", text):
        rhs = _RHS_RE.match(text, eq.end())
        lhs = _LHS_RE.search(text, max(0, eq.start() - 80), eq.start())
        if not rhs or not lhs or (lhs.start() > 0 and _LHS_RE.match(text, lhs.start() - 1, lhs.start())):
            continue  # no result, no expression, or an expression too long to be sure where it starts
        expr = lhs.group().rsplit(", ", 1)[-1].lstrip()
        if not expr or expr[0] not in "0123456789$(.":
            continue  # starts with an operator: the expression goes on left of a word ("72 cm * 2/3")
        while expr.startswith("(") and expr.count("(") > expr.count(")"):
            expr = expr[1:]
        equations.append((expr, rhs.group(1)))
    return equations


def _normalize(text: str) -> str:
    return text.replace("\u2212", "-").replace("\u2013", "-")  # minus sign, en dash (GSM8K writes "5 – 1")


def step_checks(step: str) -> list[bool]:
    """Results of every checkable equation in one step: calculator annotations, then plain equations."""
    results = []
    for ann in _ANNOTATION_RE.finditer(step):
        lhs, _, rhs = ann.group(1).rpartition("=")
        results.append(check_equation(lhs, rhs) if lhs else None)
    for lhs, rhs in _plain_equations(_ANNOTATION_RE.sub(" ", step)):
        results.append(check_equation(lhs, rhs))
    return [r for r in results if r is not None]


def arith_process_score(cot) -> float:
    """Fraction of checkable steps whose equations are all right; NaN when no step is checkable."""
    text = _normalize(cot[:MAX_CHARS]) if isinstance(cot, str) else ""
    checked = [all(c) for c in (step_checks(text[a:b]) for a, b in step_spans(text)) if c]
    return sum(checked) / len(checked) if checked else math.nan


# ---------------------------------------------------------------------------------------------- Monte Carlo
# sample_continuations(prefixes, m) -> m sampled continuations per prefix (the pool's: PoolContinuationSampler)
ContinuationSampler = Callable[[list[str], int], list[list[str]]]


def mc_step_values(prompt: str, cots: list[str], gold: str, answer_kind: str,
                   sample_continuations: ContinuationSampler, m: int, choices: Optional[list[str]] = None
                   ) -> list[list[float]]:
    """Step values of each COT from M sampled continuations per step prefix (one `sample_continuations` call).

    The last step's value is the COT's own correctness (its prefix is the whole COT: nothing to sample), so a
    COT with n steps costs (n - 1) * M continuations.
    """
    def correct(text: str) -> float:
        pred = extract_answer(text, answer_kind, choices)
        return float(is_correct(pred, gold, answer_kind))

    prefixes, owners = [], []
    for i, cot in enumerate(cots):
        for _, end in step_spans(cot[:MAX_CHARS])[:-1]:
            prefixes.append(cot[:end])
            owners.append(i)
    continuations = sample_continuations([prompt + p for p in prefixes], m) if prefixes else []
    values: list[list[float]] = [[] for _ in cots]
    for owner, prefix, conts in zip(owners, prefixes, continuations, strict=True):
        values[owner].append(sum(correct(prefix + c) for c in conts) / max(len(conts), 1))
    for i, cot in enumerate(cots):
        values[i].append(correct(cot))
    return values
