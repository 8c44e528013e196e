"""COT scores from one forward pass (docs/method.md §Notation: S(c) = Σ_j log p(c_j | q, c_<j), s = S / |c|).

`collate_groups` turns group rows (docs/internals.md "Group row") into one micro-batch that keeps whole
question groups together: each group contributes its reference COT (the VFT target) and its sampled COTs, each
as one (prompt, COT) sequence whose COT tokens are scored and whose prompt tokens and padding are not.
Layouts:
- padded: [N, T], right-padded, with an attention mask;
- packed (padding-free): whole sequences packed into rows of at most max_seq_len tokens (first-fit
  decreasing), position ids restarting at 0 per sequence, no attention mask. transformers (5.x) then finds the
  sequence boundaries from the position ids and builds a block-diagonal causal mask (sdpa, eager, flex), and
  flash-attention turns them into varlen boundaries: attention never crosses sequences, and rotary positions
  are those of the padded layout. Rows rather than one long row because without varlen kernels attention costs
  the square of the row length (flash-attention, which needs one row, gets them flattened). The few pad tokens
  closing a row restart their positions too, so they form a block of their own.
`score_groups(model, batch)` runs the forward pass and returns the `ScoredBatch` the objectives read.
Pure python/torch (no Ray): the Ray Train loop calls these on its dataset shard's rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from aftray.train.losses import ScoredBatch


@dataclass
class GroupBatch:
    """One micro-batch: N (prompt, COT) sequences of G question groups; K = most sampled COTs of a group."""
    inputs: dict[str, Tensor]  # model kwargs: input_ids + attention_mask (padded) or + position_ids (packed)
    targets: Tensor  # [B, T] bool: a scored COT token (predicted by the logits one position earlier)
    seq_index: Tensor  # [B, T] long: the sequence each token belongs to (read only at targets)
    seq_group: Tensor  # [N] its group
    seq_slot: Tensor  # [N] its sampled-COT slot in the group, -1 for the reference COT
    cot_tokens: Tensor  # [G, K] scored tokens per sampled COT (0 at padding)
    ref_tokens: Tensor  # [G] scored tokens of the reference COT (0 when not included)
    mask: Tensor  # [G, K] bool: a real, non-empty sampled COT
    positive: Tensor  # [G, K] bool (`correct`)
    ranks: Tensor  # [G, K] long (`rank`)
    process: Tensor  # [G, K] float (`process`, NaN when nothing is checkable)
    ref_logp: Tensor  # [G, K] float (`sample_logp`; NaN where truncation made it stale)
    num_truncated: int  # sequences cut to max_seq_len

    def to(self, device) -> GroupBatch:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: v.to(device) for k, v in fields.items() if isinstance(v, Tensor)}
        return dataclasses.replace(self, **moved, inputs={k: v.to(device) for k, v in self.inputs.items()})


def _fit(prompt: list[int], cot: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut a (prompt, COT) pair to max_len tokens: the COT keeps its head, the prompt its tail (as rollout
    left-truncates prompts), and the prompt keeps at least half the budget when it is that long."""
    if len(prompt) + len(cot) <= max_len:
        return prompt, cot
    cot = cot[: max_len - min(len(prompt), max_len // 2)]
    return prompt[len(prompt) - (max_len - len(cot)):], cot


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices per packed row, longest first into the first row with room (first-fit decreasing)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), len(rows))
        if j == len(rows):
            rows.append([])
            room.append(capacity)
        rows[j].append(i)
        room[j] -= lengths[i]
    return rows


def collate_groups(rows: list[dict], max_seq_len: int, packed: bool = False, with_ref: bool = True,
                   with_samples: bool = True, pad_id: int = 0) -> GroupBatch:
    """Group rows -> one micro-batch holding every sequence of every row (whole groups, never split).

    rows: dicts with `prompt_ids`, `ref_cot_ids`, `cot_ids`, `correct`, `rank`, `process`, `sample_logp`
    (lists or numpy arrays, as Ray Data hands them over). with_ref / with_samples: include the reference COT /
    the sampled COTs (see `aftray.train.losses.sequences_needed`)."""
    g_count = len(rows)
    k_max = max((len(r["cot_ids"]) for r in rows), default=0) if with_samples else 0
    mask = torch.zeros(g_count, k_max, dtype=torch.bool)
    positive = torch.zeros(g_count, k_max, dtype=torch.bool)
    ranks = torch.full((g_count, k_max), torch.iinfo(torch.long).max, dtype=torch.long)
    process = torch.full((g_count, k_max), float("nan"))
    ref_logp = torch.full((g_count, k_max), float("nan"))
    cot_tokens = torch.zeros(g_count, k_max, dtype=torch.long)
    ref_tokens = torch.zeros(g_count, dtype=torch.long)
    seqs, seq_group, seq_slot, num_truncated = [], [], [], 0
    for g, row in enumerate(rows):
        prompt = [int(t) for t in row["prompt_ids"]]
        items = [(-1, row["ref_cot_ids"])] if with_ref else []
        if with_samples:
            k = len(row["cot_ids"])
            items += list(enumerate(row["cot_ids"]))
            positive[g, :k] = torch.as_tensor(row["correct"], dtype=torch.bool)
            ranks[g, :k] = torch.as_tensor(row["rank"], dtype=torch.long)
            process[g, :k] = torch.as_tensor(row["process"], dtype=torch.float32)
            ref_logp[g, :k] = torch.as_tensor(row["sample_logp"], dtype=torch.float32)
        for slot, cot in items:
            cot = [int(t) for t in cot]
            p, c = _fit(prompt, cot, max_seq_len)
            n = len(c) - (len(p) == 0)  # without a prompt the first token has nothing to be predicted from
            if n <= 0:
                continue
            cut = len(p) + len(c) < len(prompt) + len(cot)
            num_truncated += cut
            seqs.append((p + c, len(p) + (len(p) == 0)))
            seq_group.append(g)
            seq_slot.append(slot)
            if slot < 0:
                ref_tokens[g] = n
            else:
                mask[g, slot], cot_tokens[g, slot] = True, n
                if cut:
                    ref_logp[g, slot] = float("nan")

    ids = [torch.tensor(s, dtype=torch.long) for s, _ in seqs]
    targets = [torch.arange(len(s)) >= start for s, start in seqs]
    index = [torch.full((len(s),), i, dtype=torch.long) for i, (s, _) in enumerate(seqs)]
    if packed:
        bins = _first_fit([len(x) for x in ids], max_seq_len)
        used = [sum(len(ids[i]) for i in row) for row in bins]

        def pack(parts, pad):  # [rows, width]: each row's sequences, its tail filled by pad(n)
            lines = [[parts[i] for i in row] + [pad(max(used) - n)]
                     for row, n in zip(bins, used, strict=True)]
            return torch.stack([torch.cat(line) for line in lines])

        inputs = {"input_ids": pack(ids, lambda n: torch.full((n,), pad_id)),
                  "position_ids": pack([torch.arange(len(x)) for x in ids], torch.arange)}
        targets = pack(targets, lambda n: torch.zeros(n, dtype=torch.bool))
        index = pack(index, lambda n: torch.zeros(n, dtype=torch.long))
    else:
        inputs = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
                  "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)}
        targets, index = pad_sequence(targets, batch_first=True), pad_sequence(index, batch_first=True)
    return GroupBatch(inputs=inputs, targets=targets, seq_index=index,
                      seq_group=torch.tensor(seq_group, dtype=torch.long),
                      seq_slot=torch.tensor(seq_slot, dtype=torch.long), cot_tokens=cot_tokens,
                      ref_tokens=ref_tokens, mask=mask, positive=positive, ranks=ranks, process=process,
                      ref_logp=ref_logp, num_truncated=num_truncated)


def _model_inputs(model, batch: GroupBatch) -> dict[str, Tensor]:
    """flash-attention reads packed sequences from the position ids of a single row only (transformers
    `_is_packed_sequence`), so it gets the packed rows flattened into one; the other kernels get the rows."""
    flash = "flash" in str(getattr(model.config, "_attn_implementation", ""))
    if flash and "position_ids" in batch.inputs:
        return {k: v.reshape(1, -1) for k, v in batch.inputs.items()}
    return batch.inputs


def token_logps(model, batch: GroupBatch) -> tuple[Tensor, Tensor]:
    """log p of every scored COT token (fp32), in sequence order, and the sequence each belongs to."""
    # use_cache=False also matters for packing: with a cache transformers skips the packed-sequence detection
    logits = model(**_model_inputs(model, batch), use_cache=False).logits.view(*batch.targets.shape, -1)
    targets = batch.targets[:, 1:]  # token t is predicted by the logits at t - 1
    logits = logits[:, :-1][targets].float()  # COT positions only, and the log-softmax in fp32 under bf16
    labels = batch.inputs["input_ids"][:, 1:][targets]
    token_logp = logits.gather(-1, labels[:, None]).squeeze(-1) - logits.logsumexp(-1)
    return token_logp, batch.seq_index[:, 1:][targets]


def sequence_logps(model, batch: GroupBatch) -> Tensor:
    """S of every sequence [N] (fp32), from one forward pass: Σ log p over its COT tokens only."""
    token_logp, seq = token_logps(model, batch)
    return token_logp.new_zeros(len(batch.seq_group)).index_add(0, seq, token_logp)


@torch.no_grad()
def logp_drift(model, rows: list[dict], max_seq_len: int, pad_id: int, device) -> list[float]:
    """|trainer log-prob − sampler log-prob| of every token of the rows' sampled COTs, under the current
    weights (docs/method.md §Sampler–trainer log-prob drift). COTs or prompts cut to max_seq_len are left out:
    their context differs from the sampler's."""
    rows = [r for r in rows if len(r.get("sample_token_logp", ()))]  # rows of older runs have none
    if not rows:
        return []
    batch = collate_groups(rows, max_seq_len, with_ref=False, pad_id=pad_id).to(device)
    if not len(batch.seq_group):  # groups whose COTs were all empty
        return []
    token_logp, seq = token_logps(model, batch)
    diffs = []
    for n, (g, slot) in enumerate(zip(batch.seq_group.tolist(), batch.seq_slot.tolist(), strict=True)):
        sampled = torch.as_tensor(rows[g]["sample_token_logp"][slot], dtype=torch.float32, device=device)
        mine = token_logp[seq == n]
        if len(mine) == len(sampled) and not batch.ref_logp[g, slot].isnan():  # NaN: cut (see collate_groups)
            diffs += (mine - sampled).abs().tolist()
    return diffs


def score_groups(model, batch: GroupBatch) -> ScoredBatch:
    """One forward pass -> the `ScoredBatch` of the micro-batch (S of each sampled COT in its [G, K] slot, the
    reference COT's S as the VFT piece)."""
    logp = sequence_logps(model, batch)
    ref = batch.seq_slot < 0
    g_count, k_max = batch.mask.shape
    cot_logp = logp.new_zeros(g_count, k_max).index_put((batch.seq_group[~ref], batch.seq_slot[~ref]),
                                                        logp[~ref])
    vft_logp = logp.new_zeros(g_count).index_put((batch.seq_group[ref],), logp[ref])
    return ScoredBatch(logp=cot_logp, num_tokens=batch.cot_tokens, mask=batch.mask, positive=batch.positive,
                       ranks=batch.ranks, process=batch.process, ref_logp=batch.ref_logp, vft_logp=vft_logp,
                       vft_tokens=batch.ref_tokens)
