"""Every loss of aftray side by side, over COT scores (formulas: docs/method.md, cited by section).

Notation (docs/method.md §Notation): for one question's COTs, `S` is the summed log-prob of a COT and `s = S/|c|`
its token-averaged score. Each loss comes twice:
- a per-group reference function (`alignment`, `ranked_alignment`, `dpo`, `rrhf`, `pro`, `orpo`), one question
  at a time, written as the formula reads: `scores`/`logp` 1-D over the group's COTs, `positive` bool, `ranks`
  int (1 = best, ties allowed); it returns a scalar;
- a batched twin (`batched_*`) over groups padded to [G, K] with a mask, used in training without a Python
  loop over questions; it returns the per-group losses [G] and whether each group had any pair [G]. Tests
  check that the two agree.
Both build on the same pieces: `_terms` (the exponents inside a pair's log), `_log1p_sum_exp` (log(1 + Σ exp)
in log-sum-exp form, so scores down to -50 and 64-COT groups neither overflow nor give NaN gradients) and
`_boundary` (the BC boundary B, a stop-gradient constant). The batched AFT and PRO terms sum over (p, n) pairs
inside one log, so `_cuts` factorises those sums (O(K) per cut instead of O(K²)); DPO, ORPO and RRHF keep the
[G, K, K] pair matrix.

`METHODS` maps each method of the loss table (aftray/loss_table.py) to its formula and batched twin, and
`OBJECTIVES` maps each `loss.name` of that table to an `Objective`, `objective(cfg, batch) -> (loss, metrics)`:
`loss = vft_weight * L_VFT + alignment_weight * (the method's per-group term averaged over the groups)`
(docs/method.md §AFT — constrained alignment: L_AFT = L_VFT + λ·L_A*). Groups without pairs add 0 to that mean
and are counted. L_VFT is the token mean over the batch's reference COTs (plus the positive samples for `rft` or
`vft_on_positives`). Both are means over one micro-batch: gradient accumulation should use micro-batches of
equal group counts. To add a loss: its formula and batched twin here, one `METHODS` entry, one table row.

The +constraint baselines (docs/method.md §Baselines: "adds the BC term exp(2B − s_p − s_n) to its negatives").
Where the term attaches is our choice (ours); it always uses the token-averaged scores s and a constant B:
- `dpo_bc`, `orpo_bc`: per (w, l) pair the term joins the pair's own log,
  log(1 + exp(margin) + exp(2B − s_w − s_l)), margin = r_l − r_w (DPO, r = β_dpo(S − S_ref)) or
  log odds(l) − log odds(w) (ORPO, inside its λ); B = min_w s_w − β.
- `pro_bc`: step k (c_k against each COT ranked below it) gets the term for each of those COTs inside its log,
  B_k = min score of the COTs ranked at or above c_k − β (the cut of "AFT with ranking feedback").
- `rrhf_bc`: RRHF's pair term is a hinge, with no log to join, so each ranked pair (i above j) adds the BC
  term in its one-pair log form log(1 + exp(2B_i − s_i − s_j)) (a bare exp would explode for s_j far below B),
  B_i as for PRO.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from aftray.config import LossConfig
from aftray.loss_table import LOSS_TABLE, LossRow

CONSTRAINTS = ("bc", "dc", "none", None)  # AFT's; "none" and None: no constraint (the baselines take None or "bc")


# ---------------------------------------------------------------------------------------- shared pieces
def _log1p_sum_exp(x: Tensor) -> Tensor:
    """log(1 + Σ exp(x)) over the last dim, stable for any x; -inf entries are zero terms.

    The 1 enters as a prepended exp(0), so the log-sum-exp never sees an all -inf row (NaN gradient)."""
    return torch.logsumexp(F.pad(x, (1, 0)), dim=-1)


def _terms(margin: Tensor, constraint=None, s_p=None, s_n=None, boundary=None) -> Tensor:
    """Exponents summed inside a pair's log(1 + Σ exp(·)), stacked on a new last dim: the method's own margin
    and, under BC, the boundary term 2B − s_p − s_n (docs/method.md §AFT — constrained alignment: BC;
    §Baselines: +constraint)."""
    if constraint != "bc":
        return margin.unsqueeze(-1)
    return torch.stack(torch.broadcast_tensors(margin, 2 * boundary - s_p - s_n), dim=-1)


def _boundary(s: Tensor, above: Tensor, bc_margin: float) -> Tensor:
    """BC boundary B = min score over `above` − β, a constant (stop-gradient) (docs/method.md §AFT — constrained alignment: BC).

    s [G, K], above [G, X, K] -> [G, X]; 0 where `above` is empty (no pair reads it then)."""
    low = s.detach().unsqueeze(1).masked_fill(~above, float("inf")).amin(-1)
    return torch.where(torch.isinf(low), torch.zeros_like(low), low) - bc_margin


def _log_odds(s: Tensor) -> Tensor:
    """log(P / (1 − P)) with P = exp(s) (docs/method.md §Baselines: ORPO), in log space: log(1 − e^s) as
    log(−expm1(s)), accurate near 0 as well as far below. s is capped just under 0 because a COT whose every
    token has probability 1 in fp32 would have infinite odds (padding, s = 0, lands there too)."""
    s = s.clamp(max=-1e-6)
    return s - torch.log(-torch.expm1(s))


def _check(constraint, allowed) -> None:
    if constraint not in allowed:
        raise ValueError(f"constraint: expected one of {allowed}, got {constraint!r}")


# ---------------------------------------------------------------------------------------- per-group reference
def vft(logp: Tensor, num_tokens: Tensor) -> Tensor:
    """L_VFT, the token-mean NLL −Σ log p / Σ |c| over target sequences, given their summed log-probs and
    lengths (or per-token log-probs with 0/1 counts) (docs/method.md §VFT)."""
    return -logp.sum() / num_tokens.sum().clamp(min=1)


def alignment(scores: Tensor, positive: Tensor, constraint: str = "bc", bc_margin: float = 0.1) -> Tensor:
    """AFT alignment term of one question (docs/method.md §AFT — constrained alignment); 0 without a positive or a
    negative. none: L_A = log(1 + Σ_p Σ_n exp(s_n − s_p)); dc: L_DC, the same with sg(s_n);
    bc: L_BC = log(1 + Σ_p Σ_n [exp(s_n − s_p) + exp(2B − s_p − s_n)]), B = min_p s_p − β (stop-gradient)."""
    _check(constraint, CONSTRAINTS)
    s_p, s_n = scores[positive][:, None], scores[~positive][None, :]
    if s_p.numel() == 0 or s_n.numel() == 0:
        return scores.sum() * 0
    b = s_p.detach().min() - bc_margin
    margin = (s_n.detach() if constraint == "dc" else s_n) - s_p  # DC: negatives get no gradient
    return _log1p_sum_exp(_terms(margin, constraint, s_p, s_n, b).flatten())


def ranked_alignment(scores: Tensor, ranks: Tensor, constraint: str = "bc", bc_margin: float = 0.1) -> Tensor:
    """AFT with ranking feedback (docs/method.md §AFT with ranking feedback, ours): the binary term summed over every cut between rank levels,
    the COTs above the cut positive, each cut with its own B = min score above the cut − β."""
    cuts = ranks.unique()[:-1]  # sorted levels; nothing lies below the last one
    return sum((alignment(scores, ranks <= r, constraint, bc_margin) for r in cuts), scores.sum() * 0)


def dpo(logp: Tensor, ref_logp: Tensor, positive: Tensor, beta: float, constraint=None, bc_margin=None,
        scores: Tensor | None = None) -> Tensor:
    """DPO (docs/method.md §Baselines): mean over (w ∈ G_P, l ∈ G_N) of
    −log σ(β[(S_w − S_ref(w)) − (S_l − S_ref(l))]) = log(1 + exp(r_l − r_w)), r = β(S − S_ref), on summed
    log-probs. constraint="bc" (ours, see the module doc) needs the token-averaged `scores`: the pair's log
    gains exp(2B − s_w − s_l), B = min_w s_w − bc_margin."""
    _check(constraint, (None, "bc"))
    win, lose = positive, ~positive
    if not win.any() or not lose.any():
        return logp.sum() * 0
    r = beta * (logp - ref_logp)
    s_w, s_l = (scores[win][:, None], scores[lose][None, :]) if constraint == "bc" else (None, None)
    b = s_w.detach().min() - bc_margin if constraint == "bc" else None
    return _log1p_sum_exp(_terms(r[lose][None, :] - r[win][:, None], constraint, s_w, s_l, b)).mean()


def _sft_on_best(scores: Tensor, ranks: Tensor) -> Tensor:
    """VFT on the best COT, −s(c_1) (the token-mean NLL of that COT); ties at the top share it."""
    return -scores[ranks == ranks.min()].mean()


def rrhf(scores: Tensor, ranks: Tensor, constraint=None, bc_margin=None) -> Tensor:
    """RRHF (docs/method.md §Baselines): Σ_{r_i < r_j} max(0, s_j − s_i) + VFT on the best COT (−s of it).
    constraint="bc" (ours, see the module doc): each pair adds log(1 + exp(2B_i − s_i − s_j)),
    B_i = min score of the COTs ranked at or above i − bc_margin."""
    _check(constraint, (None, "bc"))
    above = ranks[:, None] < ranks[None, :]  # [i, j]: i ranked above j
    s_i, s_j = scores[:, None], scores[None, :]
    pair = (s_j - s_i).clamp(min=0)
    if constraint == "bc":
        b = torch.stack([scores[ranks <= r].min() for r in ranks]).detach() - bc_margin
        pair = pair + F.softplus(2 * b[:, None] - s_i - s_j)
    return pair[above].sum() + _sft_on_best(scores, ranks)


def pro(scores: Tensor, ranks: Tensor, constraint=None, bc_margin=None) -> Tensor:
    """PRO (docs/method.md §Baselines): −Σ_k log(exp(s_k) / Σ_{i≥k} exp(s_i)) over the COTs sorted best-first,
    + VFT on c_1. Written per COT as log(1 + Σ_{j ranked below k} exp(s_j − s_k)): the same sum for strict
    ranks, and tied COTs do not compete with each other. constraint="bc" (ours, see the module doc): each j
    adds exp(2B_k − s_k − s_j), B_k = min score of the COTs ranked at or above k − bc_margin."""
    _check(constraint, (None, "bc"))
    loss = _sft_on_best(scores, ranks)
    for k in range(len(scores)):
        s_j = scores[ranks > ranks[k]]
        b = scores[ranks <= ranks[k]].detach().min() - bc_margin if constraint == "bc" else None
        loss = loss + _log1p_sum_exp(_terms(s_j - scores[k], constraint, scores[k], s_j, b).flatten())
    return loss


def orpo(scores: Tensor, positive: Tensor, lam: float, constraint=None, bc_margin=None) -> Tensor:
    """ORPO (docs/method.md §Baselines): mean over (w, l) pairs of L_VFT(w) − λ·log σ(log odds(w) − log odds(l)),
    with L_VFT(w) = −s_w and odds from P = exp(s). constraint="bc" (ours, see the module doc): the λ-weighted
    log gains exp(2B − s_w − s_l), B = min_w s_w − bc_margin."""
    _check(constraint, (None, "bc"))
    win, lose = positive, ~positive
    if not win.any() or not lose.any():
        return scores.sum() * 0
    s_w, s_l = scores[win][:, None], scores[lose][None, :]
    lo = _log_odds(scores)
    b = s_w.detach().min() - bc_margin if constraint == "bc" else None
    odds_term = _log1p_sum_exp(_terms(lo[lose][None, :] - lo[win][:, None], constraint, s_w, s_l, b))
    return (-s_w + lam * odds_term).mean()


# ---------------------------------------------------------------------------------------- batched twins
# s, logp, ref_logp, mask, positive, ranks: [G, K] padded; values at padding are ignored.
def _ranked_above(ranks: Tensor, mask: Tensor) -> Tensor:
    """[G, K, K]: COT i ranked strictly above COT j, both real."""
    return (ranks[:, :, None] < ranks[:, None, :]) & mask[:, :, None] & mask[:, None, :]


def _at_or_above(ranks: Tensor, mask: Tensor) -> Tensor:
    """[G, K, K]: [g, i, k] = real COT k ranked at or above COT i (the COTs that set i's boundary B_i)."""
    return (ranks[:, None, :] <= ranks[:, :, None]) & mask[:, None, :]


def _pair_mean(per_pair: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group mean over the marked (w, l) pairs [G, K, K] -> ([G], has_pairs [G])."""
    n = pairs.sum((1, 2))
    return per_pair.masked_fill(~pairs, 0).sum((1, 2)) / n.clamp(min=1), n > 0


def _lse(x: Tensor, keep: Tensor) -> Tensor:
    """log Σ exp(x) over the last dim's `keep` entries; -inf where none is kept."""
    return torch.logsumexp(x.masked_fill(~keep, float("-inf")), dim=-1)


def _cuts(s: Tensor, above: Tensor, below: Tensor, constraint: str, boundary) -> tuple[Tensor, Tensor]:
    """Σ over cuts of log(1 + Σ_{p above} Σ_{n below} [exp(s_n − s_p) (+ exp(2B − s_p − s_n) under BC)]).

    The double sums factorise, Σ_p Σ_n exp(s_n − s_p) = exp(LSE_n(s_n) + LSE_p(−s_p)) and the BC term
    likewise, so a cut costs O(K), not O(K²) (ranked groups of 64 COTs have up to 64 cuts). An empty side
    gives a -inf exponent, a zero term.
    above/below [G, C, K], boundary [G, C] -> (sum over cuts [G], has_pairs [G])."""
    _check(constraint, CONSTRAINTS)
    s = s[:, None, :]
    lse_minus_p = _lse(-s, above)
    terms = [_lse(s.detach() if constraint == "dc" else s, below) + lse_minus_p]  # sg(s_n) under DC
    if constraint == "bc":
        terms.append(2 * boundary + lse_minus_p + _lse(-s, below))
    per_cut = _log1p_sum_exp(torch.stack(terms, dim=-1))
    return per_cut.sum(1), (above.any(-1) & below.any(-1)).any(-1)


def batched_alignment(s, mask, positive, constraint="bc", bc_margin=0.1) -> tuple[Tensor, Tensor]:
    """`alignment` over padded groups: one cut, positives above, negatives below."""
    above, below = (mask & positive)[:, None], (mask & ~positive)[:, None]
    return _cuts(s, above, below, constraint, _boundary(s, above, bc_margin))


def batched_ranked_alignment(s, mask, ranks, constraint="bc", bc_margin=0.1) -> tuple[Tensor, Tensor]:
    """`ranked_alignment` over padded groups. Cut t (one per COT) puts the COTs ranked at or above r_t above
    it; tied COTs give the same cut, so only the first of each rank level opens one."""
    k = ranks.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=s.device).tril(-1)
    earlier_tie = (ranks[:, :, None] == ranks[:, None, :]) & mask[:, None, :] & earlier
    opens = mask & ~earlier_tie.any(-1)
    above = _at_or_above(ranks, mask) & opens[:, :, None]
    return _cuts(s, above, _ranked_above(ranks, mask), constraint, _boundary(s, above, bc_margin))


def batched_dpo(logp, ref_logp, pairs, beta, constraint=None, bc_margin=None, scores=None):
    """`dpo` over padded groups; pairs [G, K, K] marks the (w, l) pairs used (see `preference_pairs`)."""
    _check(constraint, (None, "bc"))
    r = beta * (logp - ref_logp.nan_to_num())  # an unknown reference is never in a pair
    s_w, s_l, b = None, None, None
    if constraint == "bc":
        s_w, s_l = scores[:, :, None], scores[:, None, :]
        b = _boundary(scores, pairs.any(2)[:, None], bc_margin)[:, :, None]
    return _pair_mean(_log1p_sum_exp(_terms(r[:, None, :] - r[:, :, None], constraint, s_w, s_l, b)), pairs)


def batched_rrhf(s, mask, ranks, constraint=None, bc_margin=None) -> tuple[Tensor, Tensor]:
    """`rrhf` over padded groups."""
    _check(constraint, (None, "bc"))
    pairs = _ranked_above(ranks, mask)
    s_i, s_j = s[:, :, None], s[:, None, :]
    pair = (s_j - s_i).clamp(min=0)
    if constraint == "bc":
        b = _boundary(s, _at_or_above(ranks, mask), bc_margin)[:, :, None]
        pair = pair + F.softplus(2 * b - s_i - s_j)
    loss = pair.masked_fill(~pairs, 0).sum((1, 2)) + _batched_sft_on_best(s, mask, ranks)
    return loss, pairs.flatten(1).any(1)


def batched_pro(s, mask, ranks, constraint=None, bc_margin=None) -> tuple[Tensor, Tensor]:
    """`pro` over padded groups: step k is a cut with c_k alone above and the COTs ranked below it below, its
    boundary taken over the COTs ranked at or above c_k."""
    _check(constraint, (None, "bc"))
    alone = torch.eye(s.shape[1], dtype=torch.bool, device=s.device) & mask[:, :, None]
    boundary = _boundary(s, _at_or_above(ranks, mask), bc_margin) if constraint == "bc" else None
    steps, has_pairs = _cuts(s, alone, _ranked_above(ranks, mask), constraint, boundary)
    return steps + _batched_sft_on_best(s, mask, ranks), has_pairs


def batched_orpo(s, pairs, lam, constraint=None, bc_margin=None) -> tuple[Tensor, Tensor]:
    """`orpo` over padded groups; pairs [G, K, K] marks the (w, l) pairs used (see `preference_pairs`)."""
    _check(constraint, (None, "bc"))
    s_w, s_l = s[:, :, None], s[:, None, :]
    lo = _log_odds(s)
    b = _boundary(s, pairs.any(2)[:, None], bc_margin)[:, :, None] if constraint == "bc" else None
    odds_term = _log1p_sum_exp(_terms(lo[:, None, :] - lo[:, :, None], constraint, s_w, s_l, b))
    return _pair_mean(-s_w + lam * odds_term, pairs)


def _batched_sft_on_best(s: Tensor, mask: Tensor, ranks: Tensor) -> Tensor:
    """`_sft_on_best` per padded group [G]; 0 for a group without COTs."""
    top = ranks.masked_fill(~mask, torch.iinfo(ranks.dtype).max).amin(1, keepdim=True)
    best = mask & (ranks == top)
    return -s.masked_fill(~best, 0).sum(1) / best.sum(1).clamp(min=1)


# ---------------------------------------------------------------------------------------- objectives
@dataclass
class ScoredBatch:
    """What the objectives read: one micro-batch of G question groups, sampled COTs padded to K.

    `aftray.train.scores.score_groups` builds it from one forward pass; float tensors may be bf16 (the
    objectives compute in fp32)."""
    logp: Tensor  # [G, K] S(c) of each sampled COT under the policy (0 at padding)
    num_tokens: Tensor  # [G, K] |c| (0 at padding)
    mask: Tensor  # [G, K] bool: a real COT
    positive: Tensor  # [G, K] bool: final answer correct (group-row `correct`)
    ranks: Tensor  # [G, K] int: 1 = best, ties allowed (group-row `rank`)
    process: Tensor  # [G, K] process score in [0, 1], NaN when nothing is checkable
    ref_logp: Tensor  # [G, K] S_ref(c), group-row `sample_logp` (DPO); NaN = unknown (e.g. a truncated COT)
    vft_logp: Tensor  # [G] S(c*) of the reference COT (0 when it was not scored)
    vft_tokens: Tensor  # [G] |c*| (0 when it was not scored)

    @property
    def scores(self) -> Tensor:
        """s = S / |c| (docs/method.md §Notation), 0 at padding."""
        return self.logp / self.num_tokens.clamp(min=1)

    def fp32(self) -> ScoredBatch:
        """Float tensors upcast to at least fp32 (fp64 stays fp64, for gradcheck)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.float() for k, v in fields.items()
                                            if v.is_floating_point() and v.dtype.itemsize < 4})


def preference_pairs(batch: ScoredBatch, gap: float = 0.0, need_ref: bool = False) -> Tensor:
    """(w, l) pairs for DPO/ORPO [G, K, K]: w positive, l negative, both real; with gap > 0 also
    process(w) − process(l) ≥ gap (docs/method.md §Process feedback: η; a NaN process score makes no pair);
    with need_ref both reference log-probs known."""
    ok = batch.mask & torch.isfinite(batch.ref_logp) if need_ref else batch.mask
    pairs = (ok & batch.positive)[:, :, None] & (ok & ~batch.positive)[:, None, :]
    if gap > 0:
        pairs &= batch.process[:, :, None] - batch.process[:, None, :] >= gap
    return pairs


# `loss.pref_beta` where it is null: DPO's β (the DPO paper's and TRL's default), ORPO's λ (TRL's ORPOConfig.beta)
DEFAULT_BETA = {"dpo": 0.1, "orpo": 1.0}


def beta_of(cfg: LossConfig, method: str) -> float:
    return DEFAULT_BETA[method] if cfg.pref_beta is None else cfg.pref_beta


# method -> its per-group formula and batched twin; the batched side adapted to one signature,
# (b: ScoredBatch, cfg: LossConfig, constraint) -> (per-group term [G], whether each group had a pair [G])
@dataclass(frozen=True)
class Method:
    formula: Callable[..., Tensor]
    batched: Callable[[ScoredBatch, LossConfig, str | None], tuple[Tensor, Tensor]]


METHODS = {
    "aft": Method(alignment, lambda b, cfg, c: batched_alignment(b.scores, b.mask, b.positive, c, cfg.bc_margin)),
    "aft_rank": Method(ranked_alignment,
                       lambda b, cfg, c: batched_ranked_alignment(b.scores, b.mask, b.ranks, c, cfg.bc_margin)),
    "dpo": Method(dpo, lambda b, cfg, c: batched_dpo(b.logp, b.ref_logp, preference_pairs(b, cfg.process_gap, True),
                                                     beta_of(cfg, "dpo"), c, cfg.bc_margin, b.scores)),
    "rrhf": Method(rrhf, lambda b, cfg, c: batched_rrhf(b.scores, b.mask, b.ranks, c, cfg.bc_margin)),
    "pro": Method(pro, lambda b, cfg, c: batched_pro(b.scores, b.mask, b.ranks, c, cfg.bc_margin)),
    "orpo": Method(orpo, lambda b, cfg, c: batched_orpo(b.scores, preference_pairs(b, cfg.process_gap),
                                                        beta_of(cfg, "orpo"), c, cfg.bc_margin)),
}


@dataclass(frozen=True)
class Objective:
    """A row of the loss table (aftray/loss_table.py) with its method: `objective(cfg, batch) -> (loss, metrics)`.

    loss = vft_weight·L_VFT + alignment_weight·(per-group method term averaged over the batch's groups).
    metrics: loss; vft; alignment (the method term, with the baselines' own VFT-on-best/chosen parts);
    constraint (what BC adds to that value; DC acts on gradients only, so 0); pair_acc (the paper's
    assessment accuracy over groups with both labels: fraction of (p, n) pairs with s_p > s_n, averaged per
    group); s_pos, s_neg, s_neg_min; groups, groups_no_pairs (groups whose method term had no pair),
    groups_with_both. Undefined values (e.g. s_neg without negatives) are NaN.

    A stage's job carries the objective the driver resolved (`aftray.train.stage.StageJob.objective`), so its
    workers train exactly that, functions included (pickled by Ray)."""
    row: LossRow
    method: Method | None  # METHODS[row.method]; None: L_VFT alone

    def __call__(self, cfg: LossConfig, batch: ScoredBatch) -> tuple[Tensor, dict[str, float]]:
        b = batch.fp32()
        s = b.scores
        pos, neg = b.mask & b.positive, b.mask & ~b.positive
        on_pos = pos if (self.row.vft_on_positives or cfg.vft_on_positives) else torch.zeros_like(pos)
        l_vft = vft(torch.cat([b.vft_logp, b.logp[on_pos]]), torch.cat([b.vft_tokens, b.num_tokens[on_pos]]))
        g = b.mask.shape[0]
        has_method = self.method is not None and b.mask.shape[1] > 0  # VFT-stage rows carry no samples
        if has_method:
            per_group, has_pairs = self.method.batched(b, cfg, self.row.constraint)
        else:
            per_group, has_pairs = s.new_zeros(g), pos.any(1) & neg.any(1)
        align = per_group.sum() / max(g, 1)
        loss = cfg.vft_weight * l_vft + cfg.alignment_weight * align

        with torch.no_grad():
            bc_adds = align * 0
            if has_method and self.row.constraint == "bc":
                bc_adds = align - self.method.batched(b, cfg, None)[0].sum() / max(g, 1)
            both = pos.any(1) & neg.any(1)
            pairs = pos[:, :, None] & neg[:, None, :]
            right = (pairs & (s[:, :, None] > s[:, None, :])).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
            nan = s.new_tensor(float("nan"))
            values = {
                "loss": loss, "vft": l_vft, "alignment": align, "constraint": bc_adds,
                "pair_acc": right[both].mean() if both.any() else nan,
                "s_pos": s[pos].mean() if pos.any() else nan,
                "s_neg": s[neg].mean() if neg.any() else nan,
                "s_neg_min": s[neg].min() if neg.any() else nan,
                "groups": s.new_tensor(g), "groups_no_pairs": (~has_pairs).sum(), "groups_with_both": both.sum(),
            }
            flat = torch.stack([v.detach().to(s.dtype) for v in values.values()]).tolist()  # one device sync
        return loss, dict(zip(values, flat, strict=True))


OBJECTIVES = {row.name: Objective(row, METHODS[row.method] if row.method else None) for row in LOSS_TABLE}
