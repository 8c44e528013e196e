"""Tasks: real GSM8K / AQuA-RAT files, the ECQA fixture, bad rows, the arith generator, prompts."""
import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from aftray.config import ArithConfig, TaskConfig, VerifyConfig
from aftray.tasks import DataError, load_task
from aftray.tasks.arith import cot_for, generate
from aftray.tasks.base import hub_reachable
from aftray.tasks.gsm8k import strip_calculator
from aftray.verify import verify_group
from aftray.tasks.answers import extract_answer, extract_choice, is_correct, stated_letter
from aftray.verify.process import arith_process_score

FIXTURES = str(Path(__file__).parent / "fixtures")


@pytest.fixture(scope="module")
def gsm8k(data_dir):
    return load_task(TaskConfig(name="gsm8k", data_dir=str(data_dir)))


@pytest.fixture(scope="module")
def aqua(data_dir):
    return load_task(TaskConfig(name="aqua_rat", data_dir=str(data_dir)))


# ---------------------------------------------------------------------------------------------- GSM8K
def test_gsm8k_loads_both_splits(gsm8k):
    assert (len(gsm8k.train), len(gsm8k.test)) == (7473, 1319)
    assert gsm8k.answer_kind == "number"
    e = gsm8k.train[0]
    assert e.id == "gsm8k-train-1" and e.answer == "72"
    assert "<<" not in e.cot and "<<48/2=24>>" in e.raw_cot
    assert e.cot.endswith("\n#### 72") and strip_calculator(e.raw_cot) == e.cot


def test_gsm8k_references_are_labelled_correct(data_dir):
    """Every reference — the file's own text and both COT forms — is labelled correct: 8792/8792."""
    from aftray.tasks.gsm8k import parse_row

    cfg, ok, total = VerifyConfig(process="none"), 0, 0
    for split in ("train", "test"):
        for n, line in enumerate((data_dir / "gsm8k" / f"{split}.jsonl").read_text().splitlines(), 1):
            raw = json.loads(line)
            e = parse_row(raw, n, split)
            row = {"id": e.id, "prompt": "", "prompt_ids": [], "answer": e.answer, "ref_cot": e.cot,
                   "ref_cot_ids": [], "weights_version": 0}
            completions = [SimpleNamespace(text=t, token_ids=[], logprobs=None, finish_reason="stop")
                           for t in (raw["answer"], e.cot, e.raw_cot)]
            out = verify_group(row, completions, cfg, "number")
            total += 1
            ok += set(out["labels"]) == {"correct"} and is_correct(e.answer, raw["answer"].split("####")[-1],
                                                                   "number")
    print(f"\nGSM8K references labelled correct: {ok}/{total}")
    assert (ok, total) == (8792, 8792)


def test_gsm8k_commas_in_gold_are_stripped(gsm8k):
    with_comma = [e for e in gsm8k.train + gsm8k.test if "," in e.raw_cot.rsplit("####", 1)[1]]
    assert with_comma == []  # canonicalised: "#### 1,000" became "#### 1000"
    assert any(len(e.answer) >= 4 for e in gsm8k.train)


def test_gsm8k_max_steps_keeps_short_solutions(data_dir):
    from aftray.tasks import num_steps

    task = load_task(TaskConfig(name="gsm8k", data_dir=str(data_dir), max_steps=2, num_test=200))
    assert (len(task.train), len(task.test)) == (1961, 200)  # 326 test questions have 2 steps (none fewer)
    assert all(num_steps(e) == 2 for e in task.train + task.test)
    assert num_steps(task.train[0]) == task.train[0].raw_cot.count("\n")  # one line a step, then "#### N"


# ---------------------------------------------------------------------------------------------- AQuA-RAT
def test_aqua_loads(aqua):
    assert (len(aqua.train), len(aqua.test)) == (254, 254)
    assert aqua.answer_kind == "choice"
    for e in aqua.train + aqua.test:
        assert len(e.choices) == 5 and e.answer in "ABCDE"
        assert e.cot.endswith(f"\n#### {e.answer}")
        assert extract_answer(e.cot, "choice", e.choices) == e.answer
    assert aqua.train[0].choices[0] == "32400"


def test_aqua_rationales_that_state_their_option_map_to_it(aqua):
    rationales = [(e.cot.rsplit("\n#### ", 1)[0], e) for e in aqua.train + aqua.test]
    stated = [(stated_letter(r), e.answer) for r, e in rationales if stated_letter(r)]
    right = sum(s == a for s, a in stated)
    mapped = sum(extract_choice(r, e.choices) == e.answer for r, e in rationales)
    print(f"\nAQuA: {len(stated)}/{len(rationales)} rationales state a letter, {right} the right one; "
          f"with option-text matching {mapped}/{len(rationales)} map to the gold letter")
    assert len(stated) >= 470 and right / len(stated) >= 0.99
    assert mapped >= 490


def test_aqua_bad_options_row(tmp_path):
    good = {"question": "q?", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"], "rationale": "r",
            "correct": "B"}
    (tmp_path / "aqua_rat").mkdir()
    rows = [good, {**good, "options": ["B)1", "A)2"]}, {**good, "correct": "F"}]
    for name in ("dev.json", "test.json"):
        (tmp_path / "aqua_rat" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"aqua_rat/dev.json:2: options: "):
        load_task(TaskConfig(name="aqua_rat", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- ECQA
def test_ecqa_fixture():
    task = load_task(TaskConfig(name="ecqa", data_dir=FIXTURES))
    assert (len(task.train), len(task.test)) == (3, 2) and task.answer_kind == "choice"
    assert [e.answer for e in task.train] == ["A", "B", "C"]  # q_ans matched case-insensitively ("Library")
    e = task.train[1]
    assert e.choices == ["sunglasses", "umbrella", "sand", "kite", "candle"]
    assert e.cot.startswith("Rain makes people wet.") and e.cot.endswith("\n#### B")
    assert extract_answer("People carry an umbrella.\n#### umbrella", "choice", e.choices) == "B"
    assert "\nB) umbrella\n" in task.prompt(e)


def test_ecqa_answer_not_an_option_is_a_bad_row(tmp_path):
    rows = [json.loads(line) for line in Path(f"{FIXTURES}/ecqa/train.jsonl").read_text().splitlines()]
    rows[0]["q_ans"] = "toaster"
    (tmp_path / "ecqa").mkdir()
    (tmp_path / "ecqa" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ecqa" / "test.jsonl").write_text(Path(f"{FIXTURES}/ecqa/test.jsonl").read_text())
    with pytest.raises(DataError, match=r"ecqa/train.jsonl:1: q_ans: 'toaster'"):
        load_task(TaskConfig(name="ecqa", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- bad rows
GOOD = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3 = <<2+3=5>>5\n#### 5"}
BAD_LINES = [
    (json.dumps({"answer": "#### 5"}).encode(), "question: missing"),
    (json.dumps({"question": "q", "answer": "no final line"}).encode(), "answer: no number after '####'"),
    (json.dumps({"question": "q", "answer": "#### many"}).encode(), "answer: no number after '####'"),
    (b'{"question": "caf\xe9", "answer": "#### 1"}', "<line>: not UTF-8"),
    (b"   ", "<line>: empty line"),
    (b'{"question": "q", "answer": ', "<line>: not JSON"),
    (json.dumps({"question": 3, "answer": "#### 1"}).encode(), "question: expected a non-empty str"),
]


def _gsm8k_dir(tmp_path, bad: bytes):
    lines = [json.dumps(GOOD).encode(), bad, json.dumps(GOOD).encode()]
    (tmp_path / "gsm8k").mkdir(exist_ok=True)
    (tmp_path / "gsm8k" / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n")
    return str(tmp_path)


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_bad_row_raises_naming_file_line_and_field(tmp_path, bad, reason):
    with pytest.raises(DataError, match=re.escape("train.jsonl:2: " + reason)):
        load_task(TaskConfig(name="gsm8k", data_dir=_gsm8k_dir(tmp_path, bad)))


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="gsm8k/train.jsonl"):
        load_task(TaskConfig(name="gsm8k", data_dir=str(tmp_path)))


def test_offline_mode_skips_the_hub_and_reads_the_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AFTRAY_DATA_DIR", _gsm8k_dir(tmp_path, json.dumps(GOOD).encode()))
    hub_reachable.cache_clear()
    try:
        assert hub_reachable() is False
        task = load_task(TaskConfig(name="gsm8k"))  # no data_dir: hub refused, then $AFTRAY_DATA_DIR
    finally:
        hub_reachable.cache_clear()
    assert len(task.train) == 3


# ---------------------------------------------------------------------------------------------- arith
def _valid_cots(question_start, ops):
    cots = set()
    for perm in itertools.permutations(ops):
        totals = list(itertools.accumulate(perm, initial=question_start))
        if min(totals) >= 0:
            cots.add(cot_for(question_start, list(perm)))
    return cots


def _story(e):
    """(start, signed events) read back from the question text."""
    start = int(re.match(r"\w+ has (\d+)", e.question).group(1))
    name = e.question.split()[0]
    ops = [int(n) * (1 if verb in ("gets", "finds", "buys") else -1)
           for verb, n in re.findall(rf"{name} (gets|finds|buys|loses|sells|gives away) (\d+)\.", e.question)]
    return start, ops


def test_arith_deterministic_by_seed():
    a, b, c = (generate(ArithConfig(seed=s), 50, 10) for s in (3, 3, 4))
    assert a == b and a != c


def test_arith_several_valid_orders_and_reference_is_one():
    train, test = generate(ArithConfig(seed=0), 300, 50)
    story_order = 0
    for e in train + test:
        start, ops = _story(e)
        assert start + sum(ops) == int(e.answer)
        valid = _valid_cots(start, ops)
        assert len(valid) >= 2 and e.cot in valid
        story_order += e.cot == cot_for(start, ops)
    assert story_order < 0.6 * len(train + test)  # the reference is often not the story order


def test_arith_reference_verifies_correct_with_full_process_score():
    task = load_task(TaskConfig(name="arith", num_train=500, num_test=100, arith=ArithConfig(seed=0)))
    for e in task.train + task.test:
        assert is_correct(extract_answer(e.cot, "number"), e.answer, "number")
        assert arith_process_score(e.cot) == 1.0
        assert e.cot.endswith(f"#### {e.answer}") and e.raw_cot == e.cot


def test_arith_knobs():
    cfg = ArithConfig(steps=[3, 5], max_value=20, seed=1)
    train, test = generate(cfg, 200, 20)
    assert len(train) == 200 and len(test) == 20
    assert not {e.question for e in train} & {e.question for e in test}
    for e in train:
        _, ops = _story(e)
        assert 3 <= len(ops) <= 5 and e.cot.count("=") == len(ops)
        numbers = [int(n) for n in re.findall(r"\d+", e.question)]
        assert max(numbers) < 20 and len(numbers) == 1 + len(ops)  # the start, the events
    chars = set("".join(e.question + e.cot for e in train))
    assert len(chars) <= 50, sorted(chars)
    one_step, _ = generate(ArithConfig(steps=[1, 1], seed=0), 20, 0)
    assert all(e.cot.count("=") == 1 for e in one_step)
    with pytest.raises(ValueError, match="distinct"):
        generate(ArithConfig(steps=[1, 1], max_value=3, seed=0), 5000, 0)


def test_arith_words_style_draws_the_same_problems():
    cfg = ArithConfig(seed=0)
    equations, words = generate(cfg, 200, 20), generate(ArithConfig(**{**cfg.__dict__, "style": "words"}), 200, 20)
    for e, w in zip(equations[0] + equations[1], words[0] + words[1]):
        assert w.answer == e.answer and w.cot.endswith(f"\n#### {w.answer}")
        assert arith_process_score(w.cot) == 1.0 and is_correct(extract_answer(w.cot, "number"), w.answer, "number")
        assert len(w.cot.splitlines()) == 2 + w.cot.count("=")  # the start, one line per event, the answer
        name = w.question.split()[0]
        for line in w.cot.splitlines()[1:-1]:  # each step names an event of the story, as the story does
            assert line.split(", so")[0] + "." in w.question and line.startswith(name)
    assert sum(e.question == w.question for e, w in zip(equations[0], words[0])) > 150

def test_arith_splits_follow_task_num_train_and_num_test():
    """task.num_train / num_test slice the generated splits (4000 / 500 problems), or ask for more; a held-out
    question does not move with either size below those."""
    def task(**kw):
        return load_task(TaskConfig(name="arith", arith=ArithConfig(seed=0), **kw))

    small, full = task(num_train=7, num_test=3), task(num_train=None, num_test=None)
    assert (len(small.train), len(small.test)) == (7, 3) and (len(full.train), len(full.test)) == (4000, 500)
    assert small.test == full.test[:3] and small.train == full.train[:7]
    assert len(task(num_test=600).test) == 600


# ---------------------------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def chat_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def test_plain_prompts_zero_and_few_shot():
    task = load_task(TaskConfig(name="arith", num_train=10, num_test=2, arith=ArithConfig(seed=0)))
    e = task.test[0]
    assert task.prompt(e) == f"Question: {e.question}\nAnswer: "
    task.cfg.few_shot = 2
    shots = task.prompt(e)
    assert shots.count("Question: ") == 3 and task.train[0].cot in shots and shots.endswith("\nAnswer: ")
    assert task.prompt(task.train[0]).count(task.train[0].question) == 1  # never its own shot


def test_chat_prompt_uses_the_template(chat_tokenizer):
    task = load_task(TaskConfig(name="arith", few_shot=1, num_train=10, num_test=2, arith=ArithConfig(seed=0)))
    e = task.test[0]
    prompt = task.prompt(e, chat_tokenizer)  # auto -> chat
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
    assert f"<|assistant|>{task.train[0].cot}\n" in prompt and "'#### <number>'" in prompt
    task.cfg.prompt_format = "plain"
    assert task.prompt(e, chat_tokenizer).startswith("Question: ")
    task.cfg.prompt_format = "chat"
    with pytest.raises(ValueError, match="no chat template"):
        task.prompt(e, tokenizer=None)
