"""Question rows: the rollout's input, one per task Example (docs/internals.md, group-row columns)."""
from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt. A chat template already writes the BOS token as text; adding it again
    would double it, so special tokens are added only when the text does not start with BOS."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def question_rows(examples: list, task: Any, tokenizer: Any) -> list[dict]:
    """{id, prompt, prompt_ids, answer, ref_cot, ref_cot_ids (EOS appended), choices} per Example.

    Prompts are not truncated here: the pool left-truncates them to `rollout.max_prompt_tokens` (and counts
    or rejects them) wherever the rows come from.
    """
    rows = []
    for ex in examples:
        prompt = task.prompt(ex, tokenizer)
        ref_cot_ids = tokenizer(ex.cot, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"id": ex.id, "prompt": prompt, "prompt_ids": encode_prompt(tokenizer, prompt),
                     "answer": ex.answer, "ref_cot": ex.cot, "ref_cot_ids": ref_cot_ids,
                     "choices": list(ex.choices)})
    return rows
