"""Verifier: answer extraction, step checks, MC step values, ranks, group rows; robustness on any string."""
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aftray.config import VerifyConfig
from aftray.verify import (arith_process_score, extract_answer, is_correct, mc_step_values, rank_cots,
                           verify_group)
from aftray.tasks.answers import extract_choice, extract_number, format_number, parse_number
from aftray.verify.process import check_equation, evaluate_arithmetic, step_checks, step_spans

AQUA = ["32400", "6000", "600", "60000", "10"]


@dataclass
class Completion:  # the rollout engine's shape; verify_group accepts any object with these attributes
    text: str
    token_ids: list
    logprobs: list
    finish_reason: str = "stop"


def completion(text, finish_reason="stop"):
    ids = list(text.encode("utf-8", "replace"))
    return Completion(text, ids, [-0.5] * len(ids), finish_reason)


# ---------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("text,expected", [
    ("43-26=17. 17+30=47. 47+28=75. #### 75", "75"),
    ("#### 1,000", "1000"),
    ("She earned $10.\n#### $1,234.50.", "1234.5"),
    ("#### -5", "-5"),
    ("The answer is 42.", "42"),
    ("So the answer is: $3.50 per hour", "3.5"),
    ("**Answer:** 12 apples", "12"),
    ("Thus \\boxed{\\frac{3}{4}}.", "0.75"),
    ("Final: $\\boxed{18}$ dollars", "18"),
    ("It rose by 50%.", "50"),
    ("the value is \u22127", "-7"),
    ("1/3 of them, so 2/3 remain", "2/3"),
    ("x = .5", "0.5"),
    ("3,4 and 12,345,678", "12345678"),
    ("#### 7 apples, not 8", "7"),
    ("The answer is 5. Then I kept going: 6, 7, 8", "5"),
    ("nothing to see here", ""),
    ("", ""),
    ("5 / 0", ""),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_last_number_is_the_fallback():
    assert extract_number("so 3+4=7") == "7"
    assert extract_number("#### 7 and then 9") == "7"  # a stated answer comes first


@pytest.mark.parametrize("a,b,equal", [
    ("0.5", "1/2", True), (".5", "0.50", True), ("1,000", "1000", True), ("$5.00", "5", True),
    ("-3", "\u22123", True), ("50%", "50", True), ("50%", "0.5", False), ("1/3", "0.333", False),
    ("10", "10.0001", False), ("", "0", False), ("7", "", False),
])
def test_number_equivalence(a, b, equal):
    assert is_correct(a, b, "number") is equal


def test_format_number_is_canonical():
    assert [format_number(parse_number(s)) for s in ("1,000", "0.50", "-2.5", "3/9", "7/8", "4/2")] == \
        ["1000", "0.5", "-2.5", "1/3", "0.875", "2"]


# ---------------------------------------------------------------------------------------------- choices
@pytest.mark.parametrize("text,expected", [
    ("#### C", "C"), ("#### (B)", "B"), ("The answer is (D).", "D"), ("Answer: Option B", "B"),
    ("ANSWER:E", "E"), ("so option A is correct", "A"), ("Hence (C) is the correct answer", "C"),
    ("steps...\nC", "C"), ("Thus A", "A"), ("\\boxed{B}", "B"),
    ("#### 600", "C"),  # option text matched back to its letter
    ("The answer is 60,000 miles", "D"),
    ("so 60 * 540 = 32400", "A"),  # last number fallback, matched to an option
    ("the answer is a number", ""), ("#### 7", ""), ("#### F", ""),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, AQUA) == expected


def test_choice_text_options():
    options = ["bread box", "oven", "garden", "bath tub", "mailbox"]
    assert extract_answer("Keep it dry.\n#### Bath tub", "choice", options) == "D"
    assert extract_answer("#### garden.", "choice", options) == "C"
    assert extract_answer("#### A", "choice", options) == "A"
    assert extract_answer("#### kitchen", "choice", options) == ""
    assert extract_answer("#### 5", "choice", ["5 m", "5", "6", "7", "8"]) == "B"  # exact text first
    assert extract_answer("#### 5", "choice", ["5 m", "5 km", "6", "7", "8"]) == ""  # two options say 5


# ---------------------------------------------------------------------------------------------- step checks
@pytest.mark.parametrize("lhs,rhs,expected", [
    ("48/2", "24", True), ("0.2*50", "10", True), ("100-50-30-15", "5", True), ("(10+5)*2", "30", True),
    ("-3+5", "2", True), ("0.2 x 50", "10", True), ("12 × 3", "36", True), ("12 ÷ 4", "3", True),
    ("$1,200 + $300", "1,500", True), ("2+3", "6", False), ("7/2", "3", False), ("5/0", "1", False),
    ("10/3", "3.33", True), ("10/3", "3.3", True), ("10/3", "3.4", False), ("2/3", "0.67", True),
    ("2/3", "0.66", True), ("2/3", "0.7", True), ("2/3", "0.8", False), ("-2/3", "-0.66", True),
    ("12", "12", None),  # no operator: nothing to check
    ("3x-5", "16", None), ("20% * 50", "10", None), ("__import__('os')", "0", None), ("2**10", "1024", None),
    ("(((1+2)", "3", None), ("1" * 60 + "+1", "2", None), ("(" * 5000 + "1" + ")" * 5000 + "+1", "2", None),
])
def test_check_equation(lhs, rhs, expected):
    assert check_equation(lhs, rhs) is expected


def test_evaluate_arithmetic_counts_binary_operators():
    assert evaluate_arithmetic("-(2+3)*4") == (-20, 2)
    with pytest.raises(ZeroDivisionError):
        evaluate_arithmetic("1/(2-2)")
    with pytest.raises(ValueError):
        evaluate_arithmetic("os.system('x')")


def test_step_spans_split_lines_and_sentences_not_decimals():
    text = "43-26=17. 17+30=47.\nIt costs $0.5 each. #### 47"
    steps = [text[a:b] for a, b in step_spans(text)]
    assert steps == ["43-26=17.", "17+30=47.", "It costs $0.5 each.", "#### 47"]


@pytest.mark.parametrize("text,expected", [
    ("43-26=17. 17+30=47. 47+28=75. #### 75", 1.0),
    ("43-26=17. 17+30=48. 48+28=76. #### 76", 2 / 3),  # steps are checked locally: 48+28=76 is right
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\nThen 48+24 = <<48+24=72>>72.\n#### 72", 1.0),
    ("She pays 3 x 4 = $12.\nThen 12 + 5 = 18.\n#### 18", 0.5),
    ("He read 12 pages * 2 = 24 pages.", math.nan),  # "* 2" continues left of a word: not checkable
    ("There are 10 apples.\n#### 10", math.nan),
    ("", math.nan),
])
def test_arith_process_score(text, expected):
    score = arith_process_score(text)
    assert (math.isnan(score) and math.isnan(expected)) or score == pytest.approx(expected)


def test_plain_equation_boundaries():
    assert step_checks("so 3 + 4 = 7 + 1 = 8") == [True]  # "= 7 + 1" is not a result; "7 + 1 = 8" is
    assert step_checks("2 - 1/2 = 1 1/2 cups") == []  # a mixed number is not read as 1
    assert step_checks("24 + 2 = 26, so 26 x 3 = 78") == [True, True]
    assert step_checks("6 + 3 = 9 = 3 x 3") == [True]
    assert step_checks("1/2 + 1/4 = 3/4") == [True]


# ---------------------------------------------------------------------------------------------- real data
def test_step_checker_on_gsm8k_reference_annotations(data_dir):
    """Every checkable calculator annotation of the 8792 references checks out; plain equations nearly all."""
    from aftray.verify.process import _ANNOTATION_RE, _plain_equations

    annotations = right = unreadable = plain = plain_right = 0
    for split in ("train", "test"):
        for line in (data_dir / "gsm8k" / f"{split}.jsonl").read_text().splitlines():
            answer = json.loads(line)["answer"]
            for m in _ANNOTATION_RE.finditer(answer):
                lhs, _, rhs = m.group(1).rpartition("=")
                result = check_equation(lhs, rhs)
                annotations += 1
                right += result is True
                unreadable += result is None
            for lhs, rhs in _plain_equations(_ANNOTATION_RE.sub("", answer)):
                result = check_equation(lhs, rhs)
                plain += result is not None
                plain_right += result is True
    print(f"\nGSM8K annotations: {right}/{annotations} check out ({right / annotations:.2%}), "
          f"{unreadable} not checkable, {annotations - right - unreadable} wrong; "
          f"plain equations: {plain_right}/{plain} ({plain_right / plain:.2%})")
    assert annotations == 27998 and right + unreadable == annotations and unreadable < 0.02 * annotations
    assert plain > 20000 and plain_right / plain > 0.995


# ---------------------------------------------------------------------------------------------- MC steps
def _extend_correctly(prefixes, m):
    """A stand-in policy: finishes right from a prefix whose last equation is right, else guesses 0."""
    out = []
    for p in prefixes:
        last = re.findall(r"(\d+)([+-])(\d+)=(\d+)\.$", p)
        ok = bool(last) and eval("".join(last[-1][:3])) == int(last[-1][3])  # test helper only
        out.append([" #### 75" if ok and "=17." in p else " #### 0"] * m)
    return out


def test_mc_step_values_one_batched_call():
    calls = []

    def sample_continuations(prefixes, m):
        calls.append((list(prefixes), m))
        return _extend_correctly(prefixes, m)

    cots = ["43-26=17. 17+30=47. 47+28=75. #### 75", "43-26=18. 18+30=48. #### 48", "#### 75"]
    values = mc_step_values("Q: ", cots, "75", "number", sample_continuations, m=3)
    assert len(calls) == 1 and calls[0][1] == 3
    assert calls[0][0][0] == "Q: 43-26=17." and len(calls[0][0]) == 3 + 2 + 0
    assert values == [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0]]


def test_mc_continuations_must_match_prefixes():
    with pytest.raises(ValueError):
        mc_step_values("Q", ["1+1=2. #### 2"], "2", "number", lambda prefixes, m: [], m=2)


# ---------------------------------------------------------------------------------------------- ranks
def test_rank_correct_then_process_then_shorter_with_ties():
    correct = [True, True, True, False, False, True]
    process = [1.0, 0.5, 1.0, 1.0, math.nan, math.nan]
    lengths = [30, 10, 20, 5, 5, 1]
    assert rank_cots(correct, process, lengths) == [2, 3, 1, 5, 6, 4]
    assert rank_cots([True, True, False], [1.0, 1.0, 0.0], [5, 5, 5]) == [1, 1, 2]
    assert rank_cots([], [], []) == []


# ---------------------------------------------------------------------------------------------- group rows
def _row(answer="75", **extra):
    return {"id": "q1", "prompt": "Q: ", "prompt_ids": [1, 2], "answer": answer, "ref_cot": "ref",
            "ref_cot_ids": [3, 0], "weights_version": 4, **extra}


def _documented_columns():
    text = (Path(__file__).parents[1] / "docs" / "internals.md").read_text()
    table = text.split("## Group row", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)


def test_group_row_has_exactly_the_documented_columns():
    out = verify_group(_row(), [completion("#### 75")], VerifyConfig(), "number")
    assert list(out) == _documented_columns()
    empty = verify_group(_row(), [], VerifyConfig(), "number")
    assert empty["cots"] == [] and empty["rank"] == [] and empty["num_sampled"] == 0


def test_group_dedup_labels_and_ranks():
    completions = [
        completion("43-26=17. 17+30=47. 47+28=75. #### 75"),
        completion("43-26=17.  17+30=47.\n47+28=75. ####   75"),  # same text up to whitespace
        completion("43+30=73. 73+28=100. 100-25=75. #### 75"),  # another order, an arithmetic slip
        completion("43-26=17. 17+30=47. #### 47"),
        completion("I am not sure."),
        completion("43-26=17. 17+30=", finish_reason="length"),
    ]
    out = verify_group(_row(), completions, VerifyConfig(), "number")
    assert out["num_sampled"] == 6 and len(out["cots"]) == 5
    assert out["counts"] == [2, 1, 1, 1, 1]  # the whitespace duplicate votes with its kept copy
    assert out["labels"] == ["correct", "correct", "wrong_answer", "no_answer", "truncated"]
    assert out["pred"] == ["75", "75", "47", "", "30"]
    assert out["correct"] == [True, True, False, False, False]
    assert out["process"][:2] == [1.0, pytest.approx(2 / 3)] and math.isnan(out["process"][3])
    assert out["rank"][0] == 1 and out["rank"][1] == 2 and max(out["rank"][2:]) > 2
    assert out["sample_logp"][0] == pytest.approx(-0.5 * len(out["cot_ids"][0]))
    assert out["weights_version"] == 4 and out["finish_reasons"][-1] == "length"
    unscored = verify_group(_row(), completions, VerifyConfig(process="none"), "number")
    assert all(math.isnan(p) for p in unscored["process"])


def test_group_choice_task_uses_row_choices():
    import numpy as np

    for choices in (AQUA, np.array(AQUA)):  # Ray Data hands list columns over as numpy arrays
        out = verify_group(_row(answer="C", choices=choices), [completion("#### 600"), completion("#### B")],
                           VerifyConfig(), "choice")
        assert out["pred"] == ["C", "B"] and out["labels"] == ["correct", "wrong_answer"]
        assert "choices" not in out


def test_group_mc_process():
    with pytest.raises(ValueError, match="sample_continuations"):
        verify_group(_row(), [completion("#### 75")], VerifyConfig(process="mc"), "number")
    out = verify_group(_row(), [completion("43-26=17. 17+30=47. 47+28=75. #### 75"), completion("#### 3")],
                       VerifyConfig(process="mc", mc_samples=2), "number", sample_continuations=_extend_correctly)
    assert out["process"] == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------- robustness
junk = st.one_of(st.text(max_size=2000), st.binary(max_size=2000).map(lambda b: b.decode("latin-1")),
                 st.text(alphabet="0123456789.,/-+*x=<>#$%()\\{}boxedanswer is \n", max_size=500))


@settings(max_examples=300, deadline=2000)
@given(junk)
def test_extraction_never_raises(text):
    for kind in ("number", "choice"):
        pred = extract_answer(text, kind, AQUA)
        assert isinstance(pred, str)
        is_correct(pred, "5", kind)
    assert extract_answer(text, "choice") in ("", "A", "B", "C", "D", "E")


@settings(max_examples=300, deadline=2000)
@given(junk)
def test_process_score_never_raises(text):
    score = arith_process_score(text)
    assert math.isnan(score) or 0.0 <= score <= 1.0


@settings(max_examples=100, deadline=3000)
@given(st.lists(st.tuples(junk, st.sampled_from(["stop", "length"])), max_size=8))
def test_verify_group_never_raises(items):
    completions = [completion(text, reason) for text, reason in items]
    out = verify_group(_row(), completions, VerifyConfig(), "number")
    assert len(out["rank"]) == len(out["cots"]) <= len(items) and set(out["labels"]) <= {
        "correct", "wrong_answer", "no_answer", "truncated"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", [
    "1" * 2_000_000, "<<" * 500_000, "=" * 1_000_000, "(" * 500_000 + "1", "####" * 500_000,
    "answer is " * 200_000, "\\boxed{" * 300_000, "1," * 1_000_000, "1 + " * 300_000 + "= 5",
    "9" * 5000 + "/" + "9" * 5000, "." * 1_000_000, "\x00\xff\ufffd" * 300_000, "A " * 1_000_000,
])
def test_huge_adversarial_strings_are_fast(text):
    start = time.perf_counter()
    for kind in ("number", "choice"):
        extract_answer(text, kind, AQUA)
    arith_process_score(text)
    verify_group(_row(), [completion(text[:200_000])], VerifyConfig(), "number")
    assert time.perf_counter() - start < 3.0
