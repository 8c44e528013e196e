"""Engine interface: what a rollout engine takes and returns.

An engine holds one copy of the policy weights and samples COTs for token-id prompts. The rollout pool
(`pool.py`, which also builds them: `make_engine`) wraps each engine in a long-lived Ray actor; benchmarks and
tests also call engines in-process.
Two engines implement it: `vllm` (its CUDA build on GPUs, its CPU build on CPUs: the presets' default; imported
only when asked for, so `import aftray.rollout` works without vLLM installed) and `hf` (transformers
`generate`: the fallback where vLLM is not installed, and the tiny test models).
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aftray.config import RolloutConfig


@dataclass(frozen=True)
class SamplingParams:
    """Sampling for one prompt. `n` lives here (not in the call) so every prompt carries its own seed."""
    n: int = 1  # samples for this prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None  # None: unseeded (not reproducible)
    logprobs: bool = True  # the sampled tokens' log-probs; False: an engine may leave them out (greedy evaluation)

    @classmethod
    def from_config(cls, cfg: RolloutConfig) -> SamplingParams:
        return cls(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                   seed=cfg.seed or 0)  # null (a config built without load_config): the root seed's default


@dataclass
class Completion:
    text: str  # decoded COT, special tokens (EOS) left out
    token_ids: list[int]  # generated ids, EOS included when the COT stopped
    # log p(token) of each generated token under the sampling weights at temperature 1 (raw logits, before
    # temperature/top-p): the DPO reference and the AFT score, whatever temperature sampled it
    logprobs: list[float] | None  # None where the params asked for none
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens)


def derive_seed(seed: int, *keys: object) -> int:
    """A 31-bit seed from a base seed and keys, e.g. (seed, round, question id); stable across processes
    (Python's hash() is salted per process) and across batches, so a question samples the same COTs wherever
    it lands."""
    digest = hashlib.sha256("/".join(map(str, (seed, *keys))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


class Engine(ABC):
    """One model replica. `version` names the weights it holds (the pool sets the label of the initial model:
    0 by default, −1 in the loop, where version r is the weights after round r)."""
    version: int = 0
    tokenizer: object  # HF tokenizer of the model (the pool encodes text prefixes with it)

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[list[Completion]]:
        """`params`: one per prompt, or one for all. Returns `params.n` completions per prompt, in order."""

    @abstractmethod
    def score(self, prompt_ids: list[list[int]], cot_ids: list[list[int]]) -> list[float]:
        """Summed log-prob of each COT given its prompt (T = 1), from one forward pass per batch."""

    @abstractmethod
    def update_weights(self, state_dict: dict, version: int) -> None:
        """Copy `state_dict` (HF parameter names) into the live model in place; `self.version = version`."""

    @abstractmethod
    def load_weights(self, path: str | Path, version: int) -> None:
        """Load the safetensors of an HF checkpoint folder in place (no engine restart)."""

    def close(self) -> None:
        """Free what outlives the object's memory (processes, pinned cores); nothing for an in-process model."""


def per_prompt(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)
