"""Final-answer extraction and comparison, robust to real model output.

Numbers: looked for after the last `####`, then in the last `\\boxed{...}`, then after the last "answer is" /
"answer:", then (configurable) the last number anywhere. Equivalence is exact, on fractions.Fraction:
- "0.5" == ".5" == "1/2" == "\\frac{1}{2}"; "1,000" == "1000"; "$5.00" == "5"; "-3" == "−3" (unicode minus).
- "%" is a unit, not a scale: "50%" == "50" != "0.5" (GSM8K asks "what percent..." with gold "50").
- Not understood: mixed numbers ("4 1/3" reads as 1/3), scientific notation, number words ("five").
Multiple choice: a stated option letter ("#### C", "The answer is (C)", "Answer: Option C", "C is correct", a
last line "C"), else the stated answer text/number matched back to exactly one option.

Robustness: functions take any string and never raise; only the last MAX_CHARS characters are scanned (answers
sit at the end) and every regex is linear (no nested unbounded quantifiers), so huge or binary input is cheap.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

MAX_CHARS = 16_384
MAX_NUMBER_CHARS = 40  # longer digit runs are not answers (and int() refuses > 4300 digits)
LETTERS = "ABCDEFGHIJ"

# A number: a sign only where it cannot be a binary minus ("43-26" is 43 and 26), thousands commas only in
# valid groups ("3,4" is 3 and 4), decimals, and an optional "/ denominator". Every alternative either
# matches or fails within a few characters, so finditer stays linear on any input.
_NUM = r"(?:(?<![\w)])-)?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|(?<![0-9])\.[0-9]+)"
NUMBER_RE = re.compile(rf"{_NUM}(?:\s?/\s?{_NUM})?")
_ANSWER_RE = re.compile(r"(?i)\banswer\b\W{0,3}(?:is\b|was\b|would be\b|will be\b|[:=])")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]{0,40})\}\{([^{}]{0,40})\}")
# Stated option letters (uppercase only: "the answer is a number" states nothing).
_STATED_RE = [
    re.compile(r"(?i:\b(?:answer|ans)\b)[^A-Za-z0-9]{0,6}"
               r"(?:(?i:is|will be|would be|should be|choice|option|=)[^A-Za-z0-9\n]{0,6}){0,2}"
               r"([A-J])(?![A-Za-z0-9])"),
    re.compile(r"(?i:\b(?:option|choice)(?:\s{1,3}is)?)[^A-Za-z0-9\n]{0,4}([A-J])(?![A-Za-z0-9])"),
    re.compile(r"\b([A-J])\)?\s{0,3}(?i:is\s{1,3}(?:the\s{1,3})?(?:correct|right|answer))"),
]
# Last resort: the text ends with a standalone letter ("Thus A", "= 250 = D", a last line "C").
_FINAL_LETTER_RE = re.compile(r"(?<![A-Za-z0-9'])([A-J])[)\].*]*\s*\Z")
_LETTER_ONLY_RE = re.compile(r"[\s(\[*]*([A-J])(?![A-Za-z0-9])[)\].*]*\s*")


def _clip(text) -> str:
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    return text[-MAX_CHARS:].replace("\u2212", "-")


# ---------------------------------------------------------------------------------------------- numbers
def _to_fraction(token: str) -> Optional[Fraction]:
    token = token.replace(" ", "").replace(",", "")
    if len(token) > MAX_NUMBER_CHARS:
        return None
    num, _, den = token.partition("/")
    try:
        value = Fraction(num)
        return value / Fraction(den) if den else value
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text) -> Optional[Fraction]:
    """The first number in `text` as an exact Fraction, None when there is none."""
    for m in NUMBER_RE.finditer(_clip(text)):
        value = _to_fraction(m.group())
        if value is not None:
            return value
    return None


def _last_number(text: str) -> Optional[Fraction]:
    last = None
    for m in NUMBER_RE.finditer(text):
        value = _to_fraction(m.group())
        last = value if value is not None else last
    return last


def format_number(value: Fraction) -> str:
    """Canonical text: "1000", "-3", "0.25", "1/3" (decimal when it terminates); equal values vote alike."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1 or max(twos, fives) > 20:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    sign = "-" if value < 0 else ""
    return f"{sign}{scaled // 10**places}.{scaled % 10**places:0{places}d}".rstrip("0")


def _boxed(text: str) -> Optional[str]:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    begin = end = start + len("\\boxed{")
    depth = 1
    while end < min(len(text), begin + 200):  # to the matching brace (an unclosed box: what there is)
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
        end += 1
    return _FRAC_RE.sub(r"\1/\2", text[begin:end])


def _answer_windows(text: str) -> list[str]:
    """Text after the final-answer markers, most trusted first: `####`, `\\boxed{}`, "answer is"."""
    windows = []
    i = text.rfind("####")
    if i >= 0:
        windows.append(text[i + 4:i + 104])
    boxed = _boxed(text)
    if boxed is not None:
        windows.append(boxed)
    stated = list(_ANSWER_RE.finditer(text))
    if stated:
        windows.append(text[stated[-1].end():stated[-1].end() + 60])
    return windows


def extract_number(text) -> str:
    """Canonical final number of a COT ("" when none): the stated answer, else the COT's last number."""
    text = _clip(text)
    for window in _answer_windows(text):
        value = parse_number(window)
        if value is not None:
            return format_number(value)
    value = _last_number(text)
    return format_number(value) if value is not None else ""


# ---------------------------------------------------------------------------------------------- choices
def _norm_words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text[:200].lower()))


def match_option(candidate: str, choices: list[str]) -> str:
    """Option letter whose text (or sole number) equals `candidate`; "" unless exactly one option matches."""
    words = _norm_words(candidate.split("\n", 1)[0])
    hits = {LETTERS[i] for i, c in enumerate(choices) if words and _norm_words(c) == words}
    value = parse_number(candidate)
    if not hits and value is not None:
        for i, c in enumerate(choices):
            numbers = NUMBER_RE.findall(c[:200])
            if len(numbers) == 1 and _to_fraction(numbers[0]) == value:
                hits.add(LETTERS[i])
    return hits.pop() if len(hits) == 1 else ""


def stated_letter(text, num_choices: int = 5) -> str:
    """The option letter a text states ("" when none); no matching of option texts."""
    text = _clip(text)
    allowed = LETTERS[:num_choices]
    i = text.rfind("####")
    if i >= 0:
        m = _LETTER_ONLY_RE.match(text, i + 4)
        if m and m.group(1) in allowed:
            return m.group(1)
    boxed = _boxed(text)
    if boxed is not None:
        m = _LETTER_ONLY_RE.fullmatch(boxed)
        if m and m.group(1) in allowed:
            return m.group(1)
    best, best_end = "", -1
    for pattern in _STATED_RE:
        for m in pattern.finditer(text):
            if m.group(1) in allowed and m.end() > best_end:
                best, best_end = m.group(1), m.end()
    if best:
        return best
    m = _FINAL_LETTER_RE.search(text, max(0, len(text) - 20))
    return m.group(1) if m and m.group(1) in allowed else ""


def extract_choice(text, choices: Optional[list[str]] = None) -> str:
    """Option letter of a COT: a stated letter, else the stated answer text/number matched to one option."""
    text = _clip(text)
    letter = stated_letter(text, len(choices) if choices else 5)
    if letter or not choices:
        return letter
    for window in _answer_windows(text):
        letter = match_option(window, choices)
        if letter:
            return letter
    value = _last_number(text)
    return match_option(format_number(value), choices) if value is not None else ""


# ---------------------------------------------------------------------------------------------- top level
def extract_answer(text, answer_kind: str, choices: Optional[list[str]] = None) -> str:
    if answer_kind == "choice":
        return extract_choice(text, choices)
    return extract_number(text)


def is_correct(pred: str, gold: str, answer_kind: str) -> bool:
    """Exact match: letters by identity, numbers as Fractions (see the module docstring)."""
    if not pred or not gold:
        return False
    if answer_kind == "choice":
        return pred.strip().upper() == gold.strip().upper()
    p, g = parse_number(pred), parse_number(gold)
    return p is not None and p == g
