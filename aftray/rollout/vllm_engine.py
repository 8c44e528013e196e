"""vLLM engine (GPU), written against vLLM 0.32's public API. vLLM is an optional extra (`aftray[vllm]`):
this module imports it only inside `VLLMEngine`, so `import aftray.rollout` works without it.

What is used, and where it is documented:
- `vllm.LLM(model, gpu_memory_utilization, seed, logprobs_mode, generation_config, worker_extension_cls)`
  (vllm/entrypoints/llm.py; EngineArgs). `logprobs_mode="raw_logprobs"` makes the returned log-probs those of
  the raw logits, before temperature/top-p (the v1 Sampler's documented order), as `Completion.logprobs`
  requires. `generation_config="vllm"` keeps the checkpoint's generation_config.json (repetition penalty,
  ...) out of sampling, as the HF engine does.
- `vllm.SamplingParams(n, temperature, top_p, max_tokens, seed, logprobs=0)`: `logprobs=0` returns the sampled
  token's log-prob at each step; with a seed, the n child requests use seed, seed + 1, ...
  (vllm/v1/engine/parallel_sampling.py), so COTs are a function of the question's seed. Bit-exact batch
  independence on GPU further needs vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT=1`, Hopper and newer).
- `SamplingParams(prompt_logprobs=0)` for `score`: the log-prob of every prompt token.
- In-place weight update: `worker_extension_cls` ("the worker extension class is dynamically inherited by the
  worker class ... for use in collective_rpc calls", vllm/config/parallel.py) adds `aftray_load_weights`
  to each GPU worker, and `LLM.collective_rpc("aftray_load_weights", args=(path,))` runs it; it feeds the
  checkpoint's tensors to `model_runner.model.load_weights`, the model's own HF-name-aware loader (the
  pattern of vLLM's RLHF examples, examples/offline_inference/rlhf_utils.py). `collective_rpc`'s docstring
  asks to keep bulk data off it, so a state dict is staged as a safetensors file in shared memory and loaded
  by path. Then `LLM.reset_prefix_cache()`: cached KV blocks were computed with the old weights.
  (vLLM's NCCL/IPC `LLM.update_weights` transfer engines need a trainer on the same GPUs or an NCCL group with
  it; the checkpoint path fits the trainer here, which writes HF checkpoints each round.)
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aftray.config import RolloutConfig
from aftray.rollout.engine import Completion, Engine, SamplingParams, per_prompt


class WeightLoader:
    """vLLM worker extension (`worker_extension_cls`): runs inside each GPU worker; `self` is the worker."""

    def aftray_load_weights(self, path: str) -> None:
        from safetensors.torch import load_file

        for f in sorted(Path(path).glob("*.safetensors")):
            self.model_runner.model.load_weights(weights=load_file(f).items())


class VLLMEngine(Engine):
    def __init__(self, model_path: str | Path, cfg: RolloutConfig):
        try:
            import vllm
        except ImportError as e:
            raise ImportError("rollout.engine='vllm' needs vLLM: pip install 'aftray[vllm]' (GPU only); "
                              "use rollout.engine='hf' otherwise") from e
        self.llm = vllm.LLM(model=str(model_path), gpu_memory_utilization=cfg.gpu_memory_utilization,
                            seed=cfg.seed, logprobs_mode="raw_logprobs", generation_config="vllm",
                            worker_extension_cls=f"{__name__}.WeightLoader")
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0

    def generate(self, prompt_ids: list[list[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[list[Completion]]:
        import vllm
        from vllm.inputs import TokensPrompt

        sampling = [vllm.SamplingParams(n=p.n, temperature=p.temperature, top_p=p.top_p,
                                        max_tokens=p.max_new_tokens, seed=p.seed, logprobs=0)
                    for p in per_prompt(params, len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sampling,
                                    use_tqdm=False)
        return [[_completion(o) for o in out.outputs] for out in outputs]

    def score(self, prompt_ids: list[list[int]], cot_ids: list[list[int]]) -> list[float]:
        import vllm
        from vllm.inputs import TokensPrompt

        sampling = vllm.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        prompts = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompt_ids, cot_ids, strict=True)]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        # prompt_logprobs[j]: {token id: Logprob} of prompt token j (None for j = 0)
        return [sum(out.prompt_logprobs[len(p) + i][t].logprob for i, t in enumerate(c))
                for out, p, c in zip(outputs, prompt_ids, cot_ids, strict=True)]

    def update_weights(self, state_dict: dict, version: int) -> None:
        from safetensors.torch import save_file

        seen, unique = set(), {}
        for name, t in state_dict.items():  # safetensors refuses shared storage (tied embeddings)
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                unique[name] = t.detach().cpu().contiguous()
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            save_file(unique, os.path.join(tmp, "model.safetensors"))
            self.load_weights(tmp, version)

    def load_weights(self, path: str | Path, version: int) -> None:
        if not list(Path(path).glob("*.safetensors")):
            raise FileNotFoundError(f"{path}: no *.safetensors (expected an HF checkpoint folder)")
        self.llm.collective_rpc("aftray_load_weights", args=(str(path),))
        self.llm.reset_prefix_cache()
        self.version = version


def _completion(out) -> Completion:
    # out.logprobs: one {token id: Logprob} per generated token, holding at least the sampled token
    logprobs = [step[t].logprob for t, step in zip(out.token_ids, out.logprobs, strict=True)]
    finish = "stop" if out.finish_reason == "stop" else "length"
    return Completion(out.text, list(out.token_ids), logprobs, finish)
