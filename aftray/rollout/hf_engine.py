"""HF engine: transformers `generate` with KV cache; the CPU default and the GPU fallback.

A question's COTs must not depend on which questions share its batch (a retried or resumed batch samples the
same COTs). So prompts are left-padded to a multiple of BUCKET tokens and only prompts of one width share a
`generate` call: a question's padding then depends on its own length alone, and its logits are the same bits in
any batch (the amount of padding changes the last bits of the logits, enough to flip a sample now and then).
Each prompt draws its n samples from its own seeded `torch.Generator` in a logits processor (`_Sampler`), which
also reads the drawn token's T = 1 log-prob instead of keeping every step's logits. The buckets' cost is in the
README (Benchmarks). On a GPU, kernels chosen by batch size can break bit-exactness: there vLLM is the path.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from aftray.config import RolloutConfig
from aftray.models import load_model, load_tokenizer
from aftray.rollout.engine import Completion, Engine, SamplingParams, per_prompt

BUCKET = 64  # prompts are left-padded to a multiple of this many tokens
MAX_ROWS = 64  # sample rows per generate call
SCORE_BATCH = 8  # (prompt, COT) pairs per forward pass in `score`


class _Sampler(LogitsProcessor):
    """Draws the next token of every row (temperature, top-p; greedy at T = 0), each prompt's n rows from that
    prompt's own generator, and records the drawn token's T = 1 log-prob."""

    def __init__(self, p: SamplingParams, seeds: list[int | None], device: torch.device):
        self.p = p
        self.generators = [torch.Generator(device=device).manual_seed(s) if s is not None else None
                           for s in seeds]
        self.logprobs: list[torch.Tensor] = []  # per step: [rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()  # the raw logits: ours is the only processor (see HFEngine.__init__)
        if self.p.temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = (logits / self.p.temperature).softmax(-1)
            if self.p.top_p < 1:
                probs = _top_p(probs, self.p.top_p)
            token = torch.cat([torch.multinomial(rows, 1, generator=g) for rows, g in
                               zip(probs.split(self.p.n), self.generators, strict=True)]).squeeze(-1)
        self.logprobs.append(logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
        return torch.full_like(scores, -torch.inf).scatter_(-1, token[:, None], 0.0)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches top_p (the top token stays)."""
    sorted_p, order = probs.sort(-1, descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


class HFEngine(Engine):
    def __init__(self, model_path: str | Path, cfg: RolloutConfig):
        torch.set_num_threads(cfg.threads_per_actor)  # per process: one actor = one process
        self.device = torch.device("cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.model = load_model(model_path, dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_path)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos = sorted(t for t in eos if t is not None)
        # A clean generation config: the checkpoint's own (repetition penalty, top-k, ...) would add logits
        # processors ahead of `_Sampler`, which must see the raw logits.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos,
                                                        pad_token_id=self.tokenizer.pad_token_id)
        self.version = 0

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[list[Completion]]:
        params = per_prompt(params, len(prompt_ids))
        calls = defaultdict(list)  # (padded width, sampling settings but the seed) -> prompt indices
        for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True)):
            calls[(-(-len(ids) // BUCKET) * BUCKET, replace(p, seed=None))].append(i)
        out: list = [None] * len(prompt_ids)
        for (width, shared), members in calls.items():
            per_call = max(1, MAX_ROWS // shared.n)
            for start in range(0, len(members), per_call):
                chunk = members[start:start + per_call]
                done = self._sample([prompt_ids[i] for i in chunk], width, shared,
                                    [params[i].seed for i in chunk])
                for i, completions in zip(chunk, done, strict=True):
                    out[i] = completions
        return out

    def _sample(self, prompts: list[list[int]], width: int, p: SamplingParams, seeds: list[int | None]
                ) -> list[list[Completion]]:
        pad = self.tokenizer.pad_token_id
        rows = [ids for ids in prompts for _ in range(p.n)]
        x = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        sampler = _Sampler(p, seeds, self.device)
        gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=p.max_new_tokens,
                               eos_token_id=self.eos, pad_token_id=pad)
        out = self.model.generate(input_ids=x, attention_mask=mask, generation_config=gen,
                                  logits_processor=LogitsProcessorList([sampler]))
        logprobs = torch.stack(sampler.logprobs, 1).tolist()
        completions = [self._completion(row, lp)
                       for row, lp in zip(out[:, width:].tolist(), logprobs, strict=True)]
        return [completions[j * p.n:(j + 1) * p.n] for j in range(len(prompts))]

    def _completion(self, row: list[int], logprobs: list[float]) -> Completion:
        # rows that stopped early are padded to the longest row; cut after the first EOS
        end = next((i + 1 for i, t in enumerate(row) if t in self.eos), None)
        ids = row[:end] if end else row
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, logprobs[:len(ids)],
                          "stop" if end else "length")

    @torch.inference_mode()
    def score(self, prompt_ids: list[list[int]], cot_ids: list[list[int]]) -> list[float]:
        out = []
        for i in range(0, len(prompt_ids), SCORE_BATCH):
            pairs = list(zip(prompt_ids[i:i + SCORE_BATCH], cot_ids[i:i + SCORE_BATCH], strict=True))
            seqs = [p + c for p, c in pairs]
            width = max(map(len, seqs))
            x = torch.full((len(seqs), width), self.tokenizer.pad_token_id, device=self.device)
            mask = torch.zeros_like(x)
            for j, s in enumerate(seqs):  # right padding: positions stay 0..len-1 without position ids
                x[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            # logits only from the shortest prompt's last token on: every COT token is predicted in there
            keep = width - min(len(p) for p, _ in pairs) + 1
            logits = self.model(input_ids=x, attention_mask=mask, logits_to_keep=keep).logits
            for j, (p, c) in enumerate(pairs):
                start = len(p) - 1 - (width - keep)  # column predicting the first COT token
                lp = logits[j, start:start + len(c)].float().log_softmax(-1)
                target = torch.tensor(c, dtype=torch.long, device=self.device)
                out.append(float(lp.gather(-1, target[:, None]).sum()))
        return out

    @torch.no_grad()
    def update_weights(self, state_dict: dict, version: int) -> None:
        params = self.model.state_dict()
        loaded = {params[k].data_ptr() for k in state_dict if k in params}
        missing = [k for k in params if k not in state_dict and params[k].data_ptr() not in loaded]  # tied ok
        unexpected = [k for k in state_dict if k not in params]
        if missing or unexpected:  # checked before copying anything: never half-updated weights
            raise ValueError(f"weights do not match the rollout model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.model.load_state_dict(state_dict, strict=False)  # copy_ into the live tensors
        self.version = version

    def load_weights(self, path: str | Path, version: int) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors (expected an HF checkpoint folder)")
        state_dict = {}
        for f in files:
            state_dict.update(load_file(f))  # memory-mapped; copied once, into the live parameters
        self.update_weights(state_dict, version)
