"""Cost of the AFT scores + loss against a plain LM forward/backward of the same tokens; packed vs padded.

On a tiny random Llama (CPU, one thread, so numbers compare across shared machines):
- plain: `model(..., labels=...)` cross-entropy on the COT tokens of the padded batch, forward + backward;
- scores+loss: `score_groups` + `OBJECTIVES["aft_bc"]`, forward + backward, padded and packed layouts;
- loss only: an objective alone on a `ScoredBatch` (its pair math), groups of k and of 64 COTs with distinct
  ranks (the worst case for the ranked losses: one cut per COT).
Usage: python benchmarks/losses.py [--groups 4 --k 8 --reps 5]. Prints a table and writes
benchmarks/results/losses.json.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aftray.config import LossConfig, TinyModelConfig
from aftray.models import TINY_HEAD_DIM, TINY_MLP_RATIO
from aftray.rows import group_row
from aftray.train.losses import OBJECTIVES, ScoredBatch
from aftray.train.scores import collate_groups, score_groups

VOCAB = 256
MAX_SEQ_LEN = 256


def timed(fns: dict, reps: int) -> dict[str, float]:
    """Median wall seconds of each fn() after a warm-up call. The fns take turns within each repetition, so
    load from other processes on a shared machine hits them alike."""
    times = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_rows(groups: int, k: int, gen: torch.Generator) -> list[dict]:
    """Group rows with prompts of 40-80 tokens and COTs of 30-150."""
    def tokens(lo, hi):
        length = int(torch.randint(lo, hi, (), generator=gen))
        return torch.randint(1, VOCAB, (length,), generator=gen).tolist()

    rows = []
    for i in range(groups):
        drawn = dict(prompt_ids=tokens(40, 80), ref_cot_ids=tokens(30, 150),  # in this order: the draws
                     cot_ids=[tokens(30, 150) for _ in range(k)],
                     correct=(torch.rand(k, generator=gen) < 0.5).tolist(), rank=list(range(1, k + 1)),
                     process=[1.0] * k, sample_logp=(-300 * torch.rand(k, generator=gen)).tolist())
        rows.append(group_row(**drawn, id=f"q{i}", prompt="", answer="", ref_cot="", cots=[""] * k,
                              sample_token_logp=[[]] * k, finish_reasons=["stop"] * k, pred=[""] * k,
                              labels=["correct" if c else "wrong_answer" for c in drawn["correct"]],
                              counts=[1] * k, num_sampled=k, weights_version=0))
    return rows


def random_scored(groups: int, k: int, gen: torch.Generator) -> ScoredBatch:
    num_tokens = torch.randint(30, 150, (groups, k), generator=gen)
    logp = (-3 * torch.rand(groups, k, generator=gen) * num_tokens).requires_grad_(True)
    return ScoredBatch(
        logp=logp, num_tokens=num_tokens, mask=torch.ones(groups, k, dtype=torch.bool),
        positive=torch.rand(groups, k, generator=gen) < 0.5,
        ranks=torch.argsort(torch.rand(groups, k, generator=gen), dim=1) + 1,
        process=torch.rand(groups, k, generator=gen),
        ref_logp=logp.detach() + torch.randn(groups, k, generator=gen),
        vft_logp=-100 * torch.rand(groups, generator=gen), vft_tokens=torch.full((groups,), 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "losses.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tiny = TinyModelConfig()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=tiny.hidden_size, intermediate_size=TINY_MLP_RATIO * tiny.hidden_size,
        num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.hidden_size // TINY_HEAD_DIM,
        max_position_embeddings=MAX_SEQ_LEN))
    rows = make_rows(args.groups, args.k, torch.Generator().manual_seed(0))
    padded = collate_groups(rows, MAX_SEQ_LEN)
    packed = collate_groups(rows, MAX_SEQ_LEN, packed=True)
    labels = torch.full_like(padded.inputs["input_ids"], -100)  # HF's loss reads label t at logits t - 1
    labels.view(-1)[padded.logit_index + 1] = padded.labels
    real_tokens = int(padded.inputs["attention_mask"].sum())
    cfg = LossConfig(name="aft_bc")

    def plain():
        model.zero_grad(set_to_none=True)
        model(**padded.inputs, labels=labels, use_cache=False).loss.backward()

    def ours(batch):
        model.zero_grad(set_to_none=True)
        OBJECTIVES["aft_bc"](cfg, score_groups(model, batch))[0].backward()

    results = timed({"plain_fwd_bwd_s": plain, "scores_loss_padded_s": lambda: ours(padded),
                     "scores_loss_packed_s": lambda: ours(packed)}, args.reps)
    results["overhead_vs_plain"] = results["scores_loss_padded_s"] / results["plain_fwd_bwd_s"] - 1
    results["padded_tokens_per_s"] = real_tokens / results["scores_loss_padded_s"]
    results["packed_tokens_per_s"] = real_tokens / results["scores_loss_packed_s"]
    results["packed_speedup"] = results["scores_loss_padded_s"] / results["scores_loss_packed_s"]

    def loss_step(name, batch):
        return lambda: OBJECTIVES[name](LossConfig(name=name), batch)[0].backward()

    names = ("aft_bc", "aft_rank_bc", "dpo_bc", "pro_bc", "rrhf_bc")
    loss_only = timed({f"{name}_k{k}_s": loss_step(name, random_scored(args.groups, k, torch.Generator()))
                       for k in (args.k, 64) for name in names}, args.reps)
    results["loss_only"] = loss_only
    results["loss_only_fraction_of_plain"] = loss_only[f"aft_bc_k{args.k}_s"] / results["plain_fwd_bwd_s"]

    report = {
        "setup": {"groups": args.groups, "cots_per_group": args.k, "sequences": len(padded.seq_group),
                  "real_tokens": real_tokens, "scored_tokens": len(padded.labels),
                  "padded_slots": padded.inputs["input_ids"].numel(),
                  "packed_slots": packed.inputs["input_ids"].numel(), "max_seq_len": MAX_SEQ_LEN,
                  "reps": args.reps, "threads": 1, "torch": torch.__version__,
                  "model": {"vocab": VOCAB, "hidden": tiny.hidden_size, "layers": tiny.num_layers},
                  "machine": platform.machine()},
        "results": results,
    }
    print(f"{'plain forward/backward':30s} {results['plain_fwd_bwd_s'] * 1e3:8.1f} ms")
    print(f"{'scores + aft_bc, padded':30s} {results['scores_loss_padded_s'] * 1e3:8.1f} ms  "
          f"({results['overhead_vs_plain']:+.1%} vs plain, {results['padded_tokens_per_s']:.0f} tok/s)")
    print(f"{'scores + aft_bc, packed':30s} {results['scores_loss_packed_s'] * 1e3:8.1f} ms  "
          f"({results['packed_tokens_per_s']:.0f} tok/s, x{results['packed_speedup']:.2f} vs padded)")
    for key, value in loss_only.items():
        print(f"{'loss only ' + key[:-2]:30s} {value * 1e3:8.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
