"""aftray.train.losses: hand values, gradients, batched == per group, numerics, objectives, learning."""
import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from aftray.config import LossConfig
from aftray.loss_table import LOSS_ROWS, LOSS_TABLE
from aftray.rows import group_row
from aftray.train import losses as L

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


def t(*values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def b(*values):
    return torch.tensor(values, dtype=torch.bool)


def log1p_sum_exp(*xs):
    return math.log(1 + sum(math.exp(x) for x in xs))


def log_odds(s):
    return s - math.log(1 - math.exp(s))


# ------------------------------------------------------------------------------------- hand-computed values
def test_alignment_values():
    s, pos = t(-1, -2, -3), b(1, 0, 0)
    plain = log1p_sum_exp(-1, -2)
    assert L.alignment(s, pos, "none").item() == pytest.approx(plain)
    assert L.alignment(s, pos, "dc").item() == pytest.approx(plain)  # DC changes gradients, not the value
    # B = -1 - 0.5 = -1.5: 2B - s_p - s_n = -3 + 1 + 2 = 0 for n = -2 and 1 for n = -3
    assert L.alignment(s, pos, "bc", bc_margin=0.5).item() == pytest.approx(log1p_sum_exp(-1, 0, -2, 1))
    # two positives, B = min s_p - 0 = -1.5: pairs (-1, -2) -> -1, 0 and (-1.5, -2) -> -0.5, 0.5
    assert L.alignment(t(-1, -1.5, -2), b(1, 1, 0), "bc", bc_margin=0.0).item() == pytest.approx(
        log1p_sum_exp(-1, 0, -0.5, 0.5))
    for labels in (b(1, 1, 1), b(0, 0, 0)):  # no pair: zero, with a (zero) gradient
        s.requires_grad_(True)
        loss = L.alignment(s, labels, "bc")
        loss.backward()
        assert loss.item() == 0 and s.grad.abs().sum() == 0
        s.grad = None


def test_ranked_alignment_values():
    s, ranks = t(-1, -2, -3), torch.tensor([1, 2, 3])
    # cut 1: {-1} over {-2, -3}, B = -1; cut 2: {-1, -2} over {-3}, B = -2 (beta = 0)
    cut1 = log1p_sum_exp(-1, 1, -2, 2)
    cut2 = log1p_sum_exp(-2, 0, -1, 1)
    assert L.ranked_alignment(s, ranks, "bc", bc_margin=0.0).item() == pytest.approx(cut1 + cut2)
    assert L.ranked_alignment(s, ranks, "none").item() == pytest.approx(2 * log1p_sum_exp(-1, -2))
    # two levels (ties) is exactly the binary loss
    for c in L.CONSTRAINTS:
        assert L.ranked_alignment(s, torch.tensor([1, 1, 4]), c, 0.2).item() == pytest.approx(
            L.alignment(s, b(1, 1, 0), c, 0.2).item())
    assert L.ranked_alignment(s, torch.tensor([2, 2, 2]), "bc").item() == 0


def test_dpo_values():
    logp, ref, pos = t(-10, -12), t(-11, -11), b(1, 0)
    # r = 0.1 * (S - S_ref) = (0.1, -0.1): -log sigmoid(0.2)
    assert L.dpo(logp, ref, pos, beta=0.1).item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))))
    # BC on scores (-1, -2), B = -1.5: 2B - s_w - s_l = 0
    got = L.dpo(logp, ref, pos, 0.1, constraint="bc", bc_margin=0.5, scores=t(-1, -2))
    assert got.item() == pytest.approx(log1p_sum_exp(-0.2, 0))
    # mean over the two (w, l) pairs
    got = L.dpo(t(-10, -9, -12), t(-11, -11, -11), b(1, 1, 0), beta=1.0)
    assert got.item() == pytest.approx((log1p_sum_exp(-2) + log1p_sum_exp(-3)) / 2)
    assert L.dpo(logp, ref, b(1, 1), 0.1).item() == 0


def test_rrhf_values():
    s, ranks = t(-1, -2, -0.5), torch.tensor([1, 2, 3])
    # hinge: (1,2) 0, (1,3) 0.5, (2,3) 1.5; VFT on the best: -s_1 = 1
    assert L.rrhf(s, ranks).item() == pytest.approx(3.0)
    # BC, beta = 0: B_1 = -1, B_2 = min(-1, -2) = -2
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    bc = sp(-2 + 1 + 2) + sp(-2 + 1 + 0.5) + sp(-4 + 2 + 0.5)
    assert L.rrhf(s, ranks, "bc", 0.0).item() == pytest.approx(3.0 + bc)


def test_pro_values():
    s, ranks = t(-1, -2, -0.5), torch.tensor([2, 1, 3])  # best-first: -2, -1, -0.5
    a, c, d = -2, -1, -0.5
    published = -math.log(math.exp(a) / (math.exp(a) + math.exp(c) + math.exp(d))) \
        - math.log(math.exp(c) / (math.exp(c) + math.exp(d))) - a
    assert L.pro(s, ranks).item() == pytest.approx(published)
    # BC, beta = 0.1: step 1 B = -2.1 over {-1, -0.5}; step 2 B = min(-2, -1) - 0.1 = -2.1 over {-0.5}
    step1 = log1p_sum_exp(c - a, -4.2 - a - c, d - a, -4.2 - a - d)
    step2 = log1p_sum_exp(d - c, -4.2 - c - d)
    assert L.pro(s, ranks, "bc", 0.1).item() == pytest.approx(step1 + step2 - a)
    # ties do not compete: two tied best COTs over one worse
    tied = L.pro(t(-1, -2, -3), torch.tensor([1, 1, 2])).item()
    assert tied == pytest.approx(log1p_sum_exp(-2) + log1p_sum_exp(-1) + 1.5)


def test_orpo_values():
    s, pos = t(-0.5, -1.0), b(1, 0)
    margin = log_odds(-1.0) - log_odds(-0.5)
    assert L.orpo(s, pos, lam=0.5).item() == pytest.approx(0.5 + 0.5 * log1p_sum_exp(margin))
    # BC, B = -0.5 - 0.2: 2B - s_w - s_l = -1.4 + 1.5 = 0.1
    assert L.orpo(s, pos, 0.5, "bc", 0.2).item() == pytest.approx(0.5 + 0.5 * log1p_sum_exp(margin, 0.1))
    # stable near 0 and far below
    assert torch.isfinite(L.orpo(t(-1e-9, -50.0), pos, 1.0))


def test_vft_is_token_mean_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11, dtype=F64), torch.randint(0, 11, (2, 5))
    lengths = torch.tensor([5, 3])
    keep = torch.arange(5)[None] < lengths[:, None]
    token_logp = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    summed = token_logp.masked_fill(~keep, 0).sum(1)
    expected = F.cross_entropy(logits[keep], labels[keep])
    assert L.vft(summed, lengths).item() == pytest.approx(expected.item())


# ---------------------------------------------------------------------------------------- gradients
def test_dc_sends_no_gradient_to_negatives():
    s = t(-1, -2, -1.5, -3).requires_grad_(True)
    pos = b(1, 0, 1, 0)
    L.alignment(s, pos, "dc").backward()
    assert torch.all(s.grad[~pos] == 0) and torch.all(s.grad[pos] < 0)  # positives pushed up
    s.grad = None
    L.alignment(s, pos, "none").backward()
    assert torch.all(s.grad[~pos] > 0)  # without sg the negatives are pushed down


def test_bc_pair_term_is_minimal_at_the_boundary():
    s_p, beta = -1.0, 0.5
    boundary = s_p - beta

    def grad_at(s_n):
        s = t(s_p, s_n).requires_grad_(True)
        loss = L.alignment(s, b(1, 0), "bc", beta)
        loss.backward()
        return loss.item(), s.grad[1].item()

    assert grad_at(boundary)[1] == pytest.approx(0, abs=1e-12)
    assert grad_at(boundary - 1)[1] < 0  # below B: descent pulls s_n back up
    assert grad_at(boundary + 1)[1] > 0  # above B: pushed down
    grid = torch.linspace(-4, 1, 501, dtype=F64)
    values = [grad_at(x.item())[0] for x in grid]
    assert grid[int(torch.tensor(values).argmin())].item() == pytest.approx(boundary, abs=0.011)
    # unconstrained: always pushed down
    s = t(s_p, boundary - 3).requires_grad_(True)
    L.alignment(s, b(1, 0), "none").backward()
    assert s.grad[1] > 0


def test_dpo_gradient_matches_closed_form():
    beta = 0.3
    logp = t(-10, -9, -12, -14).requires_grad_(True)
    ref = t(-11, -10, -11, -13)
    pos = b(1, 1, 0, 0)
    L.dpo(logp, ref, pos, beta).backward()
    r = beta * (logp.detach() - ref)
    # d/dS_w of mean_pairs -log sigma(r_w - r_l) = -beta/P * sum_l sigma(r_l - r_w)
    sig = torch.sigmoid(r[~pos][None, :] - r[pos][:, None])  # [w, l]
    n_pairs = sig.numel()
    assert torch.allclose(logp.grad[pos], -beta * sig.sum(1) / n_pairs)
    assert torch.allclose(logp.grad[~pos], beta * sig.sum(0) / n_pairs)


# ---------------------------------------------------------------------------------------- gradcheck
def _boundary_setters(s, ranks):
    """COTs whose score sets some boundary B (the prefix minima over rank levels): a stop-gradient moves with
    them, so finite differences there would not match autograd by design."""
    out = torch.zeros_like(ranks, dtype=torch.bool)
    for r in ranks.unique():
        above = torch.nonzero(ranks <= r).flatten()
        out[above[s[above].argmin()]] = True
    return out


def _free(s, positive, ranks, constraint, binary):
    """Entries gradcheck may perturb: not the boundary setters under BC; under DC only the COTs that are never
    a negative (the positives, or the top rank level)."""
    ranks = (~positive).long() + 1 if binary else ranks  # binary losses: positives are the top level
    if constraint == "bc":
        return ~_boundary_setters(s, ranks)
    if constraint == "dc":
        return ranks == ranks.min()
    return torch.ones_like(ranks, dtype=torch.bool)


# name -> (per-group fn(s, positive, ranks, ref), batched fn(S, mask, positive, ranks, ref), constraint,
#          binary: whether the loss reads labels (else ranks))
CASES = {
    "align_none": (lambda s, p, r, x: L.alignment(s, p, "none", 0.3),
                   lambda s, m, p, r, x: L.batched_alignment(s, m, p, "none", 0.3), "none", True),
    "align_dc": (lambda s, p, r, x: L.alignment(s, p, "dc", 0.3),
                 lambda s, m, p, r, x: L.batched_alignment(s, m, p, "dc", 0.3), "dc", True),
    "align_bc": (lambda s, p, r, x: L.alignment(s, p, "bc", 0.3),
                 lambda s, m, p, r, x: L.batched_alignment(s, m, p, "bc", 0.3), "bc", True),
    "rank_none": (lambda s, p, r, x: L.ranked_alignment(s, r, "none", 0.3),
                  lambda s, m, p, r, x: L.batched_ranked_alignment(s, m, r, "none", 0.3), "none", False),
    "rank_dc": (lambda s, p, r, x: L.ranked_alignment(s, r, "dc", 0.3),
                lambda s, m, p, r, x: L.batched_ranked_alignment(s, m, r, "dc", 0.3), "dc", False),
    "rank_bc": (lambda s, p, r, x: L.ranked_alignment(s, r, "bc", 0.3),
                lambda s, m, p, r, x: L.batched_ranked_alignment(s, m, r, "bc", 0.3), "bc", False),
    "dpo": (lambda s, p, r, x: L.dpo(s, x, p, 0.7),
            lambda s, m, p, r, x: L.batched_dpo(s, x, _pairs(m, p), 0.7), "none", True),
    "dpo_bc": (lambda s, p, r, x: L.dpo(s, x, p, 0.7, "bc", 0.3, scores=s),
               lambda s, m, p, r, x: L.batched_dpo(s, x, _pairs(m, p), 0.7, "bc", 0.3, s), "bc", True),
    "rrhf": (lambda s, p, r, x: L.rrhf(s, r),
             lambda s, m, p, r, x: L.batched_rrhf(s, m, r), "none", False),
    "rrhf_bc": (lambda s, p, r, x: L.rrhf(s, r, "bc", 0.3),
                lambda s, m, p, r, x: L.batched_rrhf(s, m, r, "bc", 0.3), "bc", False),
    "pro": (lambda s, p, r, x: L.pro(s, r),
            lambda s, m, p, r, x: L.batched_pro(s, m, r), "none", False),
    "pro_bc": (lambda s, p, r, x: L.pro(s, r, "bc", 0.3),
               lambda s, m, p, r, x: L.batched_pro(s, m, r, "bc", 0.3), "bc", False),
    "orpo": (lambda s, p, r, x: L.orpo(s, p, 0.5),
             lambda s, m, p, r, x: L.batched_orpo(s, _pairs(m, p), 0.5), "none", True),
    "orpo_bc": (lambda s, p, r, x: L.orpo(s, p, 0.5, "bc", 0.3),
                lambda s, m, p, r, x: L.batched_orpo(s, _pairs(m, p), 0.5, "bc", 0.3), "bc", True),
}


def _pairs(mask, positive):
    return (mask & positive)[:, :, None] & (mask & ~positive)[:, None, :]


def _group(k, gen, dtype=F64, low=-3.0):
    """Scores spread apart (no hinge kinks, no near-ties of the minima), random labels and ranks with ties."""
    s = (torch.randperm(4 * k, generator=gen)[:k].to(dtype) / (4 * k)) * low - 0.05
    ranks = torch.randint(1, 4, (k,), generator=gen)
    positive = torch.rand(k, generator=gen) < 0.5
    ref = s + torch.randn(k, generator=gen, dtype=dtype)
    return s, positive, ranks, ref


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_per_group(name):
    fn, _, constraint, binary = CASES[name]
    gen = torch.Generator().manual_seed(1)
    s, positive, ranks, ref = _group(5, gen)
    positive[:2], positive[2:] = True, False
    free = _free(s, positive, ranks, constraint, binary)
    assert gradcheck(lambda z: fn(s.masked_scatter(free, z), positive, ranks, ref),
                     (s[free].clone().requires_grad_(),))


def _padded(groups, dtype=F64):
    k = max(len(g[0]) for g in groups)
    out = [torch.zeros(len(groups), k, dtype=dtype), torch.zeros(len(groups), k, dtype=torch.bool),
           torch.zeros(len(groups), k, dtype=torch.bool), torch.full((len(groups), k), 10**9),
           torch.full((len(groups), k), float("nan"), dtype=dtype)]
    for i, (s, positive, ranks, ref) in enumerate(groups):
        n = len(s)
        for padded, value in zip(out, (s, True, positive, ranks, ref), strict=True):
            padded[i, :n] = value
    return out


def _random_groups(gen, count=7, k_max=6, dtype=F64):
    groups = [_group(int(torch.randint(1, k_max + 1, (), generator=gen)), gen, dtype) for _ in range(count)]
    groups[0][1][:] = True  # an all-positive group
    groups[1][1][:] = False  # an all-negative group
    groups[2][2][:] = 2  # a single rank level
    return groups


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_batched(name):
    _, fn, constraint, binary = CASES[name]
    gen = torch.Generator().manual_seed(2)
    groups = _random_groups(gen, count=4, k_max=4)
    s, mask, positive, ranks, ref = _padded(groups)
    free = torch.zeros_like(mask)
    for i, (sg, pg, rg, _) in enumerate(groups):
        free[i, :len(sg)] = _free(sg, pg, rg, constraint, binary)
    assert gradcheck(lambda z: fn(s.masked_scatter(free, z), mask, positive, ranks, ref)[0],
                     (s[free].clone().requires_grad_(),))


# ------------------------------------------------------------------------------------- batched == per group
@pytest.mark.parametrize("name", CASES)
def test_batched_equals_per_group(name):
    per_group, batched, _, binary = CASES[name]
    gen = torch.Generator().manual_seed(3)
    groups = _random_groups(gen, count=9, k_max=8)
    s, mask, positive, ranks, ref = _padded(groups)
    s.requires_grad_(True)
    got, has_pairs = batched(s, mask, positive, ranks, ref)
    got.sum().backward()
    expected_grad = torch.zeros_like(s)
    for i, (sg, pg, rg, xg) in enumerate(groups):
        sg = sg.clone().requires_grad_(True)
        want = per_group(sg, pg, rg, xg)
        want.backward()
        assert got[i].item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12), i
        expected_grad[i, :len(sg)] = sg.grad
        pairs = (pg.any() and (~pg).any()) if binary else len(rg.unique()) > 1
        assert bool(has_pairs[i]) == bool(pairs)
    assert torch.allclose(s.grad, expected_grad, atol=1e-12)


# ---------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", CASES)
def test_numerics_low_scores_and_64_cots(name):
    _, fn, _, _ = CASES[name]
    gen = torch.Generator().manual_seed(4)
    g, k = 3, 64
    s64 = -torch.rand(g, k, generator=gen, dtype=F64) * 50
    s64[0, :32] = -0.01 - 0.1 * torch.rand(32, generator=gen, dtype=F64)  # positives near 0, negatives to -50
    s64[1, 32:] = -torch.rand(32, generator=gen, dtype=F64)  # and the reverse: exp(s_n - s_p) up to e^50
    positive = torch.zeros(g, k, dtype=torch.bool)
    positive[:, :32] = True
    ranks = torch.randint(1, 9, (g, k), generator=gen)
    ranks[0] = torch.arange(1, k + 1)
    mask = torch.ones(g, k, dtype=torch.bool)
    mask[2, 40:] = False
    ref = s64 + torch.randn(g, k, generator=gen, dtype=F64)
    results = {}
    for dtype in (torch.float32, F64):
        s = s64.to(dtype).requires_grad_(True)
        loss, _ = fn(s, mask, positive, ranks, ref.to(dtype))
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all(), dtype
        results[dtype] = loss.detach().double()
    assert torch.allclose(results[torch.float32], results[F64], rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------- objectives
def _scored(gen, groups_k=(3, 4, 2, 3), dtype=torch.float32):
    g, k = len(groups_k), max(groups_k)
    mask = torch.arange(k)[None] < torch.tensor(groups_k)[:, None]
    num_tokens = torch.randint(3, 20, (g, k), generator=gen) * mask
    scores = -0.2 - 2 * torch.rand(g, k, generator=gen)
    positive = torch.rand(g, k, generator=gen) < 0.5
    positive[0, 0], positive[0, 1] = True, False  # group 0 has pairs
    positive[1] = True  # group 1 is all-positive
    return L.ScoredBatch(
        logp=(scores * num_tokens).to(dtype), num_tokens=num_tokens, mask=mask, positive=positive & mask,
        ranks=torch.randint(1, 4, (g, k), generator=gen), process=torch.rand(g, k, generator=gen),
        ref_logp=(scores * num_tokens + torch.randn(g, k, generator=gen)).to(dtype),
        vft_logp=(-torch.rand(g, generator=gen) * 30).to(dtype),
        vft_tokens=torch.randint(5, 15, (g,), generator=gen))


METRICS = {"loss", "vft", "alignment", "constraint", "pair_acc", "s_pos", "s_neg", "s_neg_min", "groups",
           "groups_no_pairs", "groups_with_both"}


@pytest.mark.parametrize("name", sorted(L.OBJECTIVES))
def test_objectives_run(name):
    batch = _scored(torch.Generator().manual_seed(5))
    batch.logp.requires_grad_(True)
    loss, metrics = L.OBJECTIVES[name](LossConfig(name=name), batch)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(batch.logp.grad).all()
    assert set(metrics) == METRICS and metrics["groups"] == 4
    assert metrics["loss"] == pytest.approx(loss.item())
    # the all-positive group 1 (and any other one-label group) has no pair for binary methods
    if LOSS_ROWS[name].pairwise:
        assert metrics["groups_no_pairs"] == 4 - metrics["groups_with_both"] >= 1


def test_objective_composition_and_vft_targets():
    batch = _scored(torch.Generator().manual_seed(6))
    cfg = LossConfig(name="aft_bc", bc_margin=0.2, alignment_weight=0.5, vft_weight=2.0)
    loss, metrics = L.OBJECTIVES["aft_bc"](cfg, batch)
    s = batch.scores
    per_group = [L.alignment(s[i][m], batch.positive[i][m], "bc", 0.2) for i, m in enumerate(batch.mask)]
    vft_ref = -batch.vft_logp.sum() / batch.vft_tokens.sum()
    assert metrics["vft"] == pytest.approx(vft_ref.item())
    assert loss.item() == pytest.approx(2.0 * vft_ref.item() + 0.5 * sum(per_group).item() / 4, rel=1e-6)
    # rft (and vft_on_positives) add the positive samples to the token mean
    pos = batch.positive & batch.mask
    with_pos = -(batch.vft_logp.sum() + batch.logp[pos].sum()) / (
        batch.vft_tokens.sum() + batch.num_tokens[pos].sum())
    assert L.OBJECTIVES["rft"](cfg, batch)[1]["vft"] == pytest.approx(with_pos.item())
    on_pos = LossConfig(name="aft_bc", vft_on_positives=True)
    assert L.OBJECTIVES["aft_bc"](on_pos, batch)[1]["vft"] == pytest.approx(with_pos.item())
    assert L.OBJECTIVES["vft"](cfg, batch)[0].item() == pytest.approx(2.0 * vft_ref.item())


def test_objectives_take_their_loss_keys():
    """loss.pref_beta (DPO's β, ORPO's λ; null: 0.1 and 1.0) and loss.process_gap reach the method terms (as
    per-group sums)."""
    batch = _scored(torch.Generator().manual_seed(6))
    groups = [(batch.positive[i][m], m, i) for i, m in enumerate(batch.mask)]

    def alignment(**kw):
        return L.OBJECTIVES[kw["name"]](LossConfig(**kw), batch)[1]["alignment"]

    for beta, dpo_beta, orpo_lambda in ((None, 0.1, 1.0), (0.3, 0.3, 0.3)):
        dpo = sum(L.dpo(batch.logp[i][m], batch.ref_logp[i][m], p, dpo_beta).item() for p, m, i in groups) / 4
        assert alignment(name="dpo", pref_beta=beta) == pytest.approx(dpo, rel=1e-5)
        orpo = sum(L.orpo(batch.scores[i][m], p, orpo_lambda).item() for p, m, i in groups) / 4
        assert alignment(name="orpo", pref_beta=beta) == pytest.approx(orpo, rel=1e-5)
    # process scores lie in [0, 1]: a required gap of 2 leaves no pair
    assert alignment(name="dpo", process_gap=2.0) == 0 and alignment(name="dpo") > 0


def test_groups_without_pairs_contribute_only_vft():
    batch = _scored(torch.Generator().manual_seed(7))
    batch.positive[:] = batch.mask  # every group all-positive
    for name in ("aft_bc", "aft_dc", "align_none", "dpo_bc", "orpo"):
        loss, metrics = L.OBJECTIVES[name](LossConfig(name=name), batch)
        assert metrics["alignment"] == 0 and metrics["groups_no_pairs"] == 4
        assert math.isnan(metrics["pair_acc"])
        assert loss.item() == pytest.approx(metrics["vft"])


def test_pair_accuracy_metric():
    batch = L.ScoredBatch(
        logp=t(-1, -2, -3, -1, -2, -0.5, dtype=torch.float32).view(2, 3),
        num_tokens=torch.ones(2, 3, dtype=torch.long), mask=torch.ones(2, 3, dtype=torch.bool),
        positive=torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool),
        ranks=torch.ones(2, 3, dtype=torch.long), process=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3),
        vft_logp=torch.zeros(2), vft_tokens=torch.ones(2, dtype=torch.long))
    metrics = L.OBJECTIVES["aft_bc"](LossConfig(), batch)[1]
    assert metrics["pair_acc"] == pytest.approx((1.0 + 0.0) / 2)  # group 0: 2/2, group 1: 0/2
    assert metrics["s_neg_min"] == -3 and metrics["s_pos"] == pytest.approx(-4 / 3)


def test_process_gap_and_unknown_reference_drop_pairs():
    batch = _scored(torch.Generator().manual_seed(8))
    base = L.preference_pairs(batch)
    gap = L.preference_pairs(batch, gap=0.3)
    assert (gap <= base).all() and gap.sum() < base.sum()
    diff = batch.process[:, :, None] - batch.process[:, None, :]
    assert torch.equal(gap, base & (diff >= 0.3))
    batch.ref_logp[0, 1] = float("nan")
    assert not L.preference_pairs(batch, need_ref=True)[0, :, 1].any()
    assert torch.isfinite(L.OBJECTIVES["dpo"](LossConfig(name="dpo"), batch)[0])


def test_bf16_scores_give_fp32_loss():
    batch32 = _scored(torch.Generator().manual_seed(9))
    batch16 = dataclasses.replace(batch32, logp=batch32.logp.bfloat16(), ref_logp=batch32.ref_logp.bfloat16(),
                                  vft_logp=batch32.vft_logp.bfloat16())
    for name in ("aft_bc", "dpo_bc", "orpo_bc"):
        loss16 = L.OBJECTIVES[name](LossConfig(name=name), batch16)[0]
        assert loss16.dtype == torch.float32
        loss32 = L.OBJECTIVES[name](LossConfig(name=name), batch32)[0]
        assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)


def test_vft_stage_batch_without_samples():
    batch = L.ScoredBatch(
        logp=torch.zeros(2, 0), num_tokens=torch.zeros(2, 0, dtype=torch.long),
        mask=torch.zeros(2, 0, dtype=torch.bool),
        positive=torch.zeros(2, 0, dtype=torch.bool), ranks=torch.zeros(2, 0, dtype=torch.long),
        process=torch.zeros(2, 0), ref_logp=torch.zeros(2, 0), vft_logp=t(-10, -20, dtype=torch.float32),
        vft_tokens=torch.tensor([5, 5]))
    for name, fn in L.OBJECTIVES.items():
        loss, metrics = fn(LossConfig(name=name), batch)
        assert loss.item() == pytest.approx(3.0) and metrics["groups_no_pairs"] == 2, name


@pytest.mark.parametrize("name", sorted(L.OBJECTIVES))
def test_needs_pairs_means_unpaired_samples_change_nothing(name):
    """What dynamic sampling relies on (rows.mixed_or_reference): under a pairwise loss the samples of an
    all-right or all-wrong group can be left out and the loss stays the same; under the others they count."""
    batch = _scored(torch.Generator().manual_seed(8))
    batch.positive[2] = False  # group 0 mixed, group 1 all right, group 2 all wrong, group 3 drawn at random
    batch.positive[3] = batch.mask[3] & (torch.arange(batch.mask.shape[1]) == 0)
    unpaired = ~(batch.positive.any(1) & (batch.mask & ~batch.positive).any(1))
    cut = dataclasses.replace(batch, mask=batch.mask & ~unpaired[:, None])
    cfg, row = LossConfig(name=name), LOSS_ROWS[name]
    full, left = (L.OBJECTIVES[name](cfg, b)[0].item() for b in (batch, cut))
    if row.needs_pairs(cfg):
        assert left == pytest.approx(full, rel=1e-6)
    elif row.sequences_needed(cfg)[1]:  # vft reads no samples at all
        assert left != pytest.approx(full, rel=1e-6)
    assert not LOSS_ROWS["aft_bc"].needs_pairs(LossConfig(name="aft_bc", vft_on_positives=True))
    assert not LOSS_ROWS["dpo"].needs_pairs(LossConfig(name="dpo", vft_weight=0))  # no reference to keep


def test_sequences_needed():
    vft, dpo = LOSS_ROWS["vft"], LOSS_ROWS["dpo"]
    assert vft.sequences_needed(LossConfig(name="vft")) == (True, False)
    assert vft.sequences_needed(LossConfig(name="vft", vft_on_positives=True)) == (True, True)
    assert LOSS_ROWS["rft"].sequences_needed(LossConfig(name="rft")) == (True, True)
    assert dpo.sequences_needed(LossConfig(name="dpo", vft_weight=0.0)) == (False, True)  # pure DPO


# ------------------------------------------------------------------------------------- learning (tiny Llama)
def _train(model, batch, name, steps, lr=3e-3):
    """AdamW steps of one objective on fixed groups; metrics before the first and after the last step."""
    from aftray.train.scores import score_groups

    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    cfg = LossConfig(name=name, bc_margin=0.1)
    history = []
    for _ in range(steps):
        loss, metrics = L.OBJECTIVES[name](cfg, score_groups(model, batch))
        history.append(metrics)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return history[0], L.OBJECTIVES[name](cfg, score_groups(model, batch))[1]


def _tiny_llama_and_groups():
    """A random tiny Llama and 4 group rows of random tokens, each with 2 right and 2 wrong COTs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=128))
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(1, 40, (n,), generator=gen).tolist()  # noqa: E731
    rows = [group_row(id=f"q{i}", prompt="", prompt_ids=rand(6), answer="", ref_cot="", ref_cot_ids=rand(10),
                      cots=[""] * 4, cot_ids=[rand(10) for _ in range(4)], sample_logp=[0.0] * 4,
                      sample_token_logp=[[]] * 4, finish_reasons=["stop"] * 4, pred=[""] * 4,
                      labels=["correct", "wrong_answer"] * 2, correct=[True, False, True, False],
                      process=[1.0] * 4, rank=[1, 2, 1, 2], counts=[1] * 4, num_sampled=4, weights_version=0)
            for i in range(4)]
    return model, rows


def test_learning_aft_bc_raises_pair_accuracy_and_align_none_collapses_negatives():
    from aftray.train.scores import collate_groups

    model, rows = _tiny_llama_and_groups()
    batch = collate_groups(rows, max_seq_len=64)
    bc_first, bc_last = _train(model, batch, "aft_bc", steps=12)
    _, none_last = _train(model, batch, "align_none", steps=12)
    assert bc_first["pair_acc"] < 0.8 and bc_last["pair_acc"] == 1.0
    assert bc_last["vft"] < bc_first["vft"] + 0.1  # the VFT term does not blow up
    # unconstrained: the negatives' scores fall (further every step); BC holds them near the positives
    assert none_last["s_neg"] < bc_first["s_neg"] - 1.0 and none_last["s_neg"] < bc_last["s_neg"] - 1.5
    assert bc_last["s_neg"] > bc_first["s_neg"] - 0.5 and bc_last["s_neg_min"] > bc_last["s_pos"] - 2.0


def test_pure_dpo_reads_no_reference_and_learns_without_a_vft_term():
    """compare's `dpo_pure` arm, `loss.vft_weight=0`: collate leaves the reference COTs out (its L_VFT, reported
    whatever the weight, is then 0) and the loss is DPO's term alone, which training lowers."""
    from aftray.train.scores import collate_groups, score_groups

    model, rows = _tiny_llama_and_groups()
    cfg = LossConfig(name="dpo", vft_weight=0)
    with_ref, with_samples = LOSS_ROWS["dpo"].sequences_needed(cfg)
    batch = collate_groups(rows, 64, with_ref=with_ref, with_samples=with_samples)
    assert (batch.seq_slot >= 0).all() and batch.ref_tokens.sum() == 0 and batch.mask.all()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(6):
        loss, metrics = L.OBJECTIVES["dpo"](cfg, score_groups(model, batch))
        history.append(metrics)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m["vft"] == 0 and m["loss"] == pytest.approx(m["alignment"]) for m in history)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05


def test_every_row_of_the_table_is_an_objective():
    """The table (aftray/loss_table.py) is the registry: each row trains through its method's batched twin, and
    each method's formula is tested against that twin (CASES)."""
    assert list(L.OBJECTIVES) == [row.name for row in LOSS_TABLE]
    assert {row.method for row in LOSS_TABLE} - {None} == set(L.METHODS)
    tested = {name for formula, *_ in CASES.values() for name in formula.__code__.co_names}
    assert {m.formula.__name__ for m in L.METHODS.values()} <= tested


def test_readme_lists_the_table():
    """README's list of losses is the table's: each row's name and one line, in its order."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Losses (`loss.name`)\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(\w+)`: (.+)$", section, re.MULTILINE)
    assert listed == [(row.name, row.about) for row in LOSS_TABLE]
