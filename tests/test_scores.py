"""aftray.train.scores: collate of group rows, one-pass COT scores, packed == padded."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aftray.config import LossConfig
from aftray.rows import group_row
from aftray.train.losses import OBJECTIVES
from aftray.train.scores import (TREE_ATTENTION, _fit, collate_groups, logp_drift, score_groups, sequence_logps,
                                 tree_attention)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 40


def tiny_llama(attn="sdpa", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_rows(gen, sizes=(3, 1, 4, 0)):
    """Group rows of random tokens, one per size (its number of COTs)."""
    rand = lambda n: torch.randint(1, VOCAB, (n,), generator=gen).tolist()  # noqa: E731
    rows = []
    for k in sizes:
        drawn = dict(  # in this order: the generator's draws
            prompt_ids=rand(int(torch.randint(3, 9, (), generator=gen))), ref_cot_ids=rand(7),
            cot_ids=[rand(int(torch.randint(2, 12, (), generator=gen))) for _ in range(k)],
            correct=(torch.rand(k, generator=gen) < 0.5).tolist(),
            rank=torch.randint(1, 4, (k,), generator=gen).tolist(),
            process=torch.rand(k, generator=gen).tolist(),
            sample_logp=(-20 * torch.rand(k, generator=gen)).tolist())
        rows.append(group_row(
            **drawn, id=f"q{len(rows)}", prompt="", answer="", ref_cot="", cots=[""] * k,
            sample_token_logp=[[]] * k, finish_reasons=["stop"] * k, pred=[""] * k,
            labels=["correct" if c else "wrong_answer" for c in drawn["correct"]], counts=[1] * k,
            num_sampled=k, weights_version=0))
    return rows


def naive_logps(model, prompt, cot):
    """S(c) of one sequence alone: no padding, no packing."""
    ids = torch.tensor([prompt + cot])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    token_logp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token_logp[len(prompt) - 1:].sum()


def test_collate_keeps_groups_and_labels():
    rows = make_rows(torch.Generator().manual_seed(0))
    batch = collate_groups(rows, max_seq_len=64)
    assert batch.mask.shape == (4, 4) and batch.mask.sum(1).tolist() == [3, 1, 4, 0]
    assert len(batch.seq_group) == 4 + 8  # one reference COT per group, every sampled COT
    assert batch.seq_group.tolist() == sorted(batch.seq_group.tolist())  # a group's sequences stay together
    for g, row in enumerate(rows):
        k = len(row["cot_ids"])
        assert batch.positive[g, :k].tolist() == row["correct"] and batch.ranks[g, :k].tolist() == row["rank"]
        assert torch.allclose(batch.ref_logp[g, :k], torch.tensor(row["sample_logp"]))
        assert batch.cot_tokens[g, :k].tolist() == [len(c) for c in row["cot_ids"]]
        assert batch.ref_tokens[g] == len(row["ref_cot_ids"])
    # scored tokens are exactly the COT tokens, each read from the logits one position earlier in its row
    assert len(batch.labels) == batch.cot_tokens.sum() + batch.ref_tokens.sum() and batch.num_truncated == 0
    ids, att = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert ids.flatten()[batch.logit_index + 1].tolist() == batch.labels.tolist()
    assert att.flatten()[batch.logit_index].all() and ids[~att.bool()].eq(0).all()
    assert batch.forward_tokens == batch.sequence_tokens == att.sum()


def test_collate_flags_and_numpy_rows():
    rows = make_rows(torch.Generator().manual_seed(1))
    as_numpy = [{k: np.asarray(v) for k, v in r.items() if k != "cot_ids"} for r in rows]
    for r, src in zip(as_numpy, rows, strict=True):  # Ray Data hands ragged lists as object arrays of arrays
        r["cot_ids"] = np.empty(len(src["cot_ids"]), dtype=object)
        for i, cot in enumerate(src["cot_ids"]):
            r["cot_ids"][i] = np.asarray(cot)
    a, b = collate_groups(rows, 64, packed=True), collate_groups(as_numpy, 64, packed=True)
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"]) and torch.equal(a.ranks, b.ranks)
    only_ref = collate_groups(rows, 64, with_samples=False)
    assert only_ref.mask.shape == (4, 0) and len(only_ref.seq_group) == 4
    only_samples = collate_groups(rows, 64, with_ref=False)
    assert (only_samples.seq_slot >= 0).all() and only_samples.ref_tokens.sum() == 0


def test_packing_fills_rows_of_max_seq_len():
    rows = make_rows(torch.Generator().manual_seed(8), sizes=(6, 5, 7))
    batch = collate_groups(rows, 32, packed=True)
    ids, pos = batch.inputs["input_ids"], batch.inputs["position_ids"]
    assert ids.shape[1] <= 32 and 1 < ids.shape[0] < len(batch.seq_group)
    scored = torch.zeros(ids.numel(), dtype=torch.bool)
    scored[batch.logit_index + 1] = True
    scored, seq_at = scored.view(ids.shape), torch.full((ids.numel(),), -1).index_put_(
        (batch.logit_index + 1,), batch.label_seq).view(ids.shape)
    seen = []
    for r in range(ids.shape[0]):  # each block starts at position 0: a whole sequence or a row's tail padding
        starts = torch.nonzero(pos[r] == 0).flatten().tolist() + [ids.shape[1]]
        for a, e in zip(starts, starts[1:], strict=False):
            assert pos[r, a:e].tolist() == list(range(e - a))
            if scored[r, a:e].any():
                assert len(seq_at[r, a:e][scored[r, a:e]].unique()) == 1  # one sequence per block
                seen += seq_at[r, a:e][scored[r, a:e]].unique().tolist()
            else:
                assert (ids[r, a:e] == 0).all()
    assert sorted(seen) == list(range(len(batch.seq_group)))


def test_fit_truncation_rule():
    p, c = list(range(10)), list(range(100, 200))
    assert _fit(p, c, 200) == (p, c)
    assert _fit(p, c, 64) == (p, c[:54])  # the COT keeps its head
    long_p = list(range(100))
    assert _fit(long_p, c[:10], 64) == (long_p[-54:], c[:10])  # the prompt keeps its tail
    assert _fit(long_p, c, 64) == (long_p[-32:], c[:32])  # the prompt keeps half the budget


def test_truncated_cots_lose_their_dpo_reference():
    rows = make_rows(torch.Generator().manual_seed(2), sizes=(2,))
    rows[0]["cot_ids"][1] = list(range(1, 31))
    batch = collate_groups(rows, max_seq_len=len(rows[0]["prompt_ids"]) + 12)
    assert batch.num_truncated == 1 and batch.cot_tokens[0, 1] == 12
    assert torch.isfinite(batch.ref_logp[0, 0]) and torch.isnan(batch.ref_logp[0, 1])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_equals_naive(attn):
    model = tiny_llama(attn)
    rows = make_rows(torch.Generator().manual_seed(3))
    with torch.no_grad():
        padded = sequence_logps(model, collate_groups(rows, 64))
        packed_batch = collate_groups(rows, 64, packed=True)
        packed = sequence_logps(model, packed_batch)
        naive = []
        for row in rows:
            for cot in [row["ref_cot_ids"]] + row["cot_ids"]:
                naive.append(naive_logps(model, row["prompt_ids"], cot))
    assert packed_batch.inputs["input_ids"].shape[0] > 1 and "attention_mask" not in packed_batch.inputs
    one_row = sequence_logps(model, collate_groups(rows, 512, packed=True))
    assert torch.allclose(one_row, padded, atol=1e-5)
    assert torch.allclose(padded, torch.stack(naive), atol=1e-5)
    assert torch.allclose(packed, padded, atol=1e-5)


class FlashLabelled(torch.nn.Module):
    """The sdpa model under a flash-attention label (sdpa builds the block mask over one row just as well)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.shapes = model, []
        self.config = SimpleNamespace(_attn_implementation="flash_attention_2")

    def forward(self, **inputs):
        self.shapes.append(tuple(inputs["input_ids"].shape))
        return self.model(**inputs)


def test_flash_attention_gets_packed_rows_as_one_row(model):
    """flash-attention detects packing in a single row only, so the packed rows go in flattened."""
    rows = make_rows(torch.Generator().manual_seed(9))
    packed = collate_groups(rows, 32, packed=True)
    flash = FlashLabelled(model)
    with torch.no_grad():
        flat, padded = sequence_logps(flash, packed), sequence_logps(model, collate_groups(rows, 32))
    assert packed.inputs["input_ids"].shape[0] > 1 and flash.shapes == [(1, packed.inputs["input_ids"].numel())]
    assert torch.allclose(flat, padded, atol=1e-5)


def test_packed_attention_does_not_cross_sequences(model):
    rows = make_rows(torch.Generator().manual_seed(4), sizes=(2, 2))
    with torch.no_grad():
        before = sequence_logps(model, collate_groups(rows, 64, packed=True))
        rows[0]["cot_ids"][0] = [(t % (VOCAB - 1)) + 1 for t in rows[0]["cot_ids"][0]]  # change one sequence
        after = sequence_logps(model, collate_groups(rows, 64, packed=True))
    changed = (before - after).abs() > 1e-6
    assert changed.tolist() == [False, True, False, False, False, False]


def test_score_groups_fills_the_scored_batch(model):
    rows = make_rows(torch.Generator().manual_seed(5))
    batch = collate_groups(rows, 64, packed=True)
    scored = score_groups(model, batch)
    with torch.no_grad():
        for g, row in enumerate(rows):
            want = naive_logps(model, row["prompt_ids"], row["ref_cot_ids"])
            assert scored.vft_logp[g].item() == pytest.approx(want.item(), abs=1e-5)
            for k, cot in enumerate(row["cot_ids"]):
                want = naive_logps(model, row["prompt_ids"], cot)
                assert scored.logp[g, k].item() == pytest.approx(want.item(), abs=1e-5)
    assert (scored.logp[~scored.mask] == 0).all() and (scored.scores <= 0).all()
    model.zero_grad()
    loss, _ = OBJECTIVES["aft_bc"](LossConfig(), scored)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_model_scores_in_fp32():
    model = tiny_llama().to(torch.bfloat16)
    rows = make_rows(torch.Generator().manual_seed(6))
    with torch.no_grad():
        scored = score_groups(model, collate_groups(rows, 64))
        loss, metrics = OBJECTIVES["aft_bc"](LossConfig(), scored)
    assert scored.logp.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_vft_stage_rows(model):
    rows = make_rows(torch.Generator().manual_seed(7), sizes=(0, 0))
    scored = score_groups(model, collate_groups(rows, 64, packed=True))
    loss, metrics = OBJECTIVES["vft"](LossConfig(name="vft"), scored)
    assert scored.mask.shape == (2, 0) and loss.item() == pytest.approx(
        (-scored.vft_logp.sum() / scored.vft_tokens.sum()).item())


def naive_token_logps(model, prompt, cot) -> list[float]:
    ids = torch.tensor([prompt + cot])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:].tolist()


@torch.no_grad()
def test_logp_drift_is_per_token(model):
    """The sampler's own log-probs give ~0 drift; shifting one COT's tokens by 0.5 shows as 0.5 on those
    tokens; a COT cut to max_seq_len is left out."""
    rows = make_rows(torch.Generator().manual_seed(3), sizes=(3, 2))
    for row in rows:
        row["sample_token_logp"] = [naive_token_logps(model, row["prompt_ids"], c) for c in row["cot_ids"]]
    same = logp_drift(model, rows, 64, 0, "cpu")
    assert len(same) == sum(len(c) for r in rows for c in r["cot_ids"]) and max(same) < 1e-4
    rows[1]["sample_token_logp"][0] = [x + 0.5 for x in rows[1]["sample_token_logp"][0]]
    shifted = logp_drift(model, rows, 64, 0, "cpu")
    assert sorted(shifted)[-len(rows[1]["cot_ids"][0]):] == pytest.approx([0.5] * len(rows[1]["cot_ids"][0]),
                                                                            abs=1e-4)
    longest = max(len(r["prompt_ids"]) + len(c) for r in rows for c in r["cot_ids"])
    assert len(logp_drift(model, rows, longest - 1, 0, "cpu")) < len(same)


def test_first_step_reads_the_drift_from_its_training_pass(model):
    """The trainer's first step reads the drift from its own forward pass (`sampled_drift` on a training batch:
    reference COTs included, shared prefix, gradients on), the same tokens and values as the pass of its own
    (`logp_drift`); its scores are `score_groups`'."""
    from aftray.train.scores import sampled_drift, scored_batch, token_logps

    rows = few_shot_rows(14, (3, 2))
    for row in rows:
        row["sample_token_logp"] = [naive_token_logps(model, row["prompt_ids"], c) for c in row["cot_ids"]]
    rows[0]["sample_token_logp"][1] = [x - 0.25 for x in rows[0]["sample_token_logp"][1]]
    batch = collate_groups(rows, 64, packed=True, with_ref=True, shared_prefix=True)
    token_logp = token_logps(model, batch)
    assert token_logp.requires_grad
    read = sampled_drift(batch, token_logp, rows)
    with torch.no_grad():
        own = logp_drift(model, rows, 64, 0, "cpu", shared_prefix=True)
        scored = score_groups(model, batch)
    assert len(read) == len(own) == sum(len(c) for r in rows for c in r["cot_ids"])
    assert sorted(read) == pytest.approx(sorted(own), abs=1e-5)
    assert max(read) == pytest.approx(0.25, abs=1e-4)
    assert torch.allclose(scored_batch(batch, token_logp).logp, scored.logp, atol=1e-5)
    assert torch.allclose(scored_batch(batch, token_logp).vft_logp, scored.vft_logp, atol=1e-5)


def unshared_and_shared(model, rows, max_seq_len=64, **flags):
    """S of every sequence under the unshared (padded) and the shared-prefix layouts, with the batches."""
    plain, shared = (collate_groups(rows, max_seq_len, **flags, shared_prefix=s) for s in (False, True))
    return sequence_logps(model, plain), sequence_logps(model, shared), plain, shared


SHOT = 12  # tokens of the exemplar few_shot_rows puts before every question


def few_shot_rows(seed, sizes, prompt_is_shot=None):
    """make_rows under one exemplar, as a few-shot prompt puts it before every question; the group at
    prompt_is_shot has the exemplar alone as its prompt (the prefix tree's root is then its whole prompt)."""
    gen = torch.Generator().manual_seed(seed)
    rows, shot = make_rows(gen, sizes), torch.randint(1, VOCAB, (SHOT,), generator=gen).tolist()
    for g, row in enumerate(rows):
        row["prompt_ids"] = shot + ([] if g == prompt_is_shot else row["prompt_ids"])
    return rows


def no_prefix_rows(seed, sizes):
    """make_rows whose prompts share no first token: no common prefix."""
    rows = make_rows(torch.Generator().manual_seed(seed), sizes)
    for g, row in enumerate(rows):
        row["prompt_ids"][0] = g + 1
    return rows


def with_cut_cot(rows, g=0):
    """A 30-token COT in group g, which max_seq_len=40 cuts (the prompts have at most 20 tokens)."""
    rows[g]["cot_ids"][-1] = list(range(1, 31))
    return rows


SHARED_CASES = {  # name: rows, max_seq_len
    "no common prefix": (lambda: no_prefix_rows(10, (3, 1, 4, 0, 2)), 64),
    "one tree": (lambda: few_shot_rows(16, (3, 1, 4, 0, 2), prompt_is_shot=3), 128),
    "a cut COT": (lambda: with_cut_cot(few_shot_rows(17, (3, 0, 2))), 40),
    "several trees": (lambda: few_shot_rows(18, (6, 5, 7, 6, 1)), 32),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", sorted(SHARED_CASES))
def test_shared_prefix_scores_equal_unshared(case, attn):
    """Each prompt part once, each COT scored as if alone: same S per sequence (fp32, 1e-5), fewer tokens than
    one prompt per group (each group alone in its micro-batch) where the groups share a prefix."""
    model = tiny_llama(attn)
    rows, max_len = SHARED_CASES[case][0](), SHARED_CASES[case][1]
    with torch.no_grad():
        plain, shared, a, b = unshared_and_shared(model, rows, max_len)
    assert torch.allclose(shared, plain, atol=1e-5)
    assert b.sequence_tokens == a.sequence_tokens and b.num_truncated == a.num_truncated
    n_rows, width = b.inputs["input_ids"].shape
    assert b.inputs["attention_mask"].shape == (n_rows, 1, width, width)
    one_group = [collate_groups([r], max_len, shared_prefix=True) for r in rows]
    per_group = sum(x.forward_tokens for x in one_group)  # one prompt per group, as before the prefix tree
    if case == "no common prefix":  # one tree per group
        prompts = sum(len(r["prompt_ids"]) * len(r["cot_ids"]) for r in rows)  # k + 1 copies become one
        assert b.forward_tokens == per_group == a.forward_tokens - prompts
    elif case == "several trees":  # at most twice the one-group layout's row width, a root in each
        one_group_width = max([max_len] + [x.inputs["input_ids"].shape[1] for x in one_group])
        assert n_rows > 1 and width <= 2 * one_group_width
        assert b.forward_tokens < per_group
    else:  # the micro-batch's groups under one root; a cut COT keeps its own prompt
        assert b.forward_tokens == per_group - (len(rows) - 1) * SHOT
        assert b.num_truncated == (case == "a cut COT")


def test_tree_attention_equals_the_dense_mask(monkeypatch):
    """Block by block (the root; each group's question and COTs) equals sdpa under the dense 4D mask at every
    real token (grouped-query heads, several trees in a row, a cut COT in a segment of its own), padding gets
    zeros; and an sdpa model's shared-prefix forward pass goes through it, in every layer, leaving the model's
    attention setting as it was."""
    from transformers import AttentionInterface

    batch = collate_groups(with_cut_cot(few_shot_rows(18, (6, 5, 7, 6, 1))), 40, shared_prefix=True)
    mask, (n_rows, width) = batch.inputs["attention_mask"], batch.inputs["input_ids"].shape
    real = torch.zeros(n_rows, width, dtype=torch.bool)
    for r, blocks in enumerate(batch.blocks):
        real[r, :blocks[-1][1]] = True
    assert n_rows > 1 and (~real).any() and any(c < d for blocks in batch.blocks for _, _, c, d in blocks)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n_rows, h, width, 8, generator=gen) for h in (4, 2, 2))
    out, _ = tree_attention(None, q, k, v, mask, scaling=0.3, tree_blocks=batch.blocks)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             attn_mask=mask, scale=0.3).transpose(1, 2)
    assert torch.allclose(out[real], dense[real], atol=1e-6) and not out[~real].any()

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["tree_blocks"])
        return tree_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, TREE_ATTENTION, counted)
    model = tiny_llama("sdpa")
    with torch.no_grad():
        sequence_logps(model, batch)
    assert calls == [batch.blocks] * model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"


def test_shared_prefix_attention_stays_in_its_cot(model):
    """Changing one COT changes its own score only; changing a group's question changes its COTs' scores only
    (COTs see their group's prompt, not each other nor another group's question); changing the exemplar, the
    root every group reads, changes every score."""
    rows = few_shot_rows(11, (3, 2))

    def scores():
        batch = collate_groups(rows, 64, shared_prefix=True)
        per_group = sum(collate_groups([r], 64, shared_prefix=True).forward_tokens for r in rows)
        assert batch.forward_tokens < per_group
        return sequence_logps(model, batch)

    bump = lambda tokens: [(t % (VOCAB - 1)) + 1 for t in tokens]  # noqa: E731
    with torch.no_grad():
        before = scores()
        rows[0]["cot_ids"][1] = bump(rows[0]["cot_ids"][1])
        new_cot = scores()
        rows[0]["prompt_ids"][-1:] = bump(rows[0]["prompt_ids"][-1:])
        new_question = scores()
        for row in rows:
            row["prompt_ids"][:1] = bump(row["prompt_ids"][:1])
        new_shot = scores()
    assert ((before - new_cot).abs() > 1e-6).tolist() == [False, False, True, False, False, False, False]
    assert ((new_cot - new_question).abs() > 1e-6).tolist() == [True] * 4 + [False] * 3
    assert ((new_question - new_shot).abs() > 1e-6).all()


GRADIENT_CASES = {"few-shot": lambda: with_cut_cot(few_shot_rows(13, (3, 0, 4, 2), prompt_is_shot=3), g=2),
                  "no common prefix": lambda: no_prefix_rows(13, (3, 4, 2))}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_shared_prefix_gradients_equal_unshared(name, case):
    """Every objective: the same loss and parameter gradients (fp32, rtol 1e-4) from either layout, on groups
    under one exemplar (one with only its reference COT, one whose prompt is the exemplar, a cut COT) and on
    groups with no common prefix."""
    model = tiny_llama().float()
    model.train()
    rows = GRADIENT_CASES[case]()
    cfg = LossConfig(name=name)
    with_ref, with_samples = OBJECTIVES[name].row.sequences_needed(cfg)
    grads = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        batch = collate_groups(rows, 40, with_ref=with_ref, with_samples=with_samples, shared_prefix=shared)
        loss, _ = OBJECTIVES[name](cfg, score_groups(model, batch))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, ga), (loss_b, gb) = grads
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6) and len(ga) == len(gb) > 0
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (x - y).abs().max()


def test_shared_prefix_drift_matches(model):
    rows = few_shot_rows(14, (3, 2))
    for row in rows:
        row["sample_token_logp"] = [naive_token_logps(model, row["prompt_ids"], c) for c in row["cot_ids"]]
    with torch.no_grad():
        drift = logp_drift(model, rows, 64, 0, "cpu", shared_prefix=True)
    assert len(drift) == sum(len(c) for r in rows for c in r["cot_ids"]) and max(drift) < 1e-4


def test_shared_prefix_on_smollm2():
    """The real model (rotary, GQA, tied embeddings), three groups of a 1-shot prompt under one root (one with
    only its reference COT): scores within 1e-5, gradients within rtol 1e-4."""
    from aftray.config import ModelConfig
    from aftray.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    tok, model = load_tokenizer(path), load_model(path)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    shot = "Question: Ann has 3 pens and buys 4 more. How many pens?\nAnswer: 3 + 4 = 7.\n#### 7\n\n"
    cots = ["5 + 6 = 11.\n#### 11", "5 + 6 = 12.\n#### 12", "She has 5, then 6 more: 11.\n#### 11"]
    rows = make_rows(torch.Generator().manual_seed(15), sizes=(3, 2, 0))
    questions = ["Bo has 5 cars and gets 6. How many cars?", "Cy reads 9 pages, then 2. Pages?", "Di runs 8 km."]
    for row, q in zip(rows, questions, strict=True):
        row["prompt_ids"], row["ref_cot_ids"] = ids(shot + f"Question: {q}\nAnswer:"), ids(" " + cots[0])
        row["cot_ids"] = [ids(" " + c) for c in cots[:len(row["cot_ids"])]]
    cfg = LossConfig(name="aft_bc")
    out = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        batch = collate_groups(rows, 256, shared_prefix=shared, pad_id=tok.pad_token_id)
        scored = score_groups(model, batch)
        OBJECTIVES["aft_bc"](cfg, scored)[0].backward()
        out.append((scored.logp.detach(), scored.vft_logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (logp_a, vft_a, ga), (logp_b, vft_b, gb) = out
    per_group = sum(collate_groups([r], 256, shared_prefix=True).forward_tokens for r in rows)
    root = len(os.path.commonprefix([r["prompt_ids"] for r in rows]))  # the exemplar and "Question:"
    assert root > 20 and batch.forward_tokens == per_group - 2 * root
    assert torch.allclose(logp_a, logp_b, atol=1e-5) and torch.allclose(vft_a, vft_b, atol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * x.abs().max().item()), (x - y).abs().max()
