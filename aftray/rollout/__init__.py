"""Rollout: engines that sample COTs (hf, vllm) and the Ray pool that runs them over a question dataset."""
from aftray.rollout.engine import Completion, Engine, SamplingParams, derive_seed
from aftray.rollout.pool import PoolContinuationSampler, RolloutPool, Weights, make_engine
from aftray.rollout.questions import encode_prompts, question_rows

__all__ = ["Completion", "Engine", "PoolContinuationSampler", "RolloutPool", "SamplingParams", "Weights",
           "derive_seed", "encode_prompts", "make_engine", "question_rows"]
