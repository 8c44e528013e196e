"""Prompt rendering: a plain "Question: ... Answer:" template, or the tokenizer's chat template.

`prompt_format` "auto" uses the chat template when the tokenizer has one. Shots (few-shot examples) are
rendered as earlier question/answer pairs (chat: earlier user/assistant turns). The COT is everything the
model generates after the prompt, so the plain template ends with "Answer: ".
"""
from __future__ import annotations

from typing import Any

from aftray.tasks.answers import LETTERS

INSTRUCTION = {
    "number": "Solve the problem step by step. End with a last line '#### <number>'.",
    "choice": "Solve the problem step by step. End with a last line '#### <option letter>'.",
}


def format_question(example) -> str:
    options = "".join(f"\n{LETTERS[i]}) {text}" for i, text in enumerate(example.choices))
    return example.question + options


def render_prompt(example, shots: list, answer_kind: str, tokenizer: Any = None,
                  prompt_format: str = "auto") -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise ValueError("task.prompt_format='chat' but the tokenizer has no chat template "
                         "(use 'plain' or 'auto')")
    if prompt_format == "plain" or (prompt_format == "auto" and not has_template):
        blocks = [f"Question: {format_question(s)}\nAnswer: {s.cot}\n\n" for s in shots]
        return "".join(blocks) + f"Question: {format_question(example)}\nAnswer: "
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": f"{format_question(s)}\n\n{INSTRUCTION[answer_kind]}"},
                     {"role": "assistant", "content": s.cot}]
    messages.append({"role": "user", "content": f"{format_question(example)}\n\n{INSTRUCTION[answer_kind]}"})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
