"""COT scores from one forward pass (docs/method.md §Notation: S(c) = Σ_j log p(c_j | q, c_<j), s = S / |c|).

`collate_groups` turns group rows (docs/internals.md "Group row") into one micro-batch that keeps whole
question groups together: each group contributes its reference COT (the VFT target) and its sampled COTs, each
scored as the continuation of the group's prompt. The unit of layout is a *segment*: a prompt and one COT,
or (shared prefix) a tree of prompt parts and COTs (`_Segment`). Layouts:
- padded: one segment of one COT per row, right-padded, with an attention mask;
- packed (padding-free): one-COT segments packed into rows of at most max_seq_len tokens (first-fit
  decreasing), position ids restarting at 0 per segment, no attention mask. transformers (5.x) then finds the
  boundaries from the position ids and builds a block-diagonal causal mask (sdpa, eager, flex), and
  flash-attention turns them into varlen boundaries: attention never crosses sequences, and rotary positions
  are those of the padded layout. Rows rather than one long row because without varlen kernels attention costs
  the square of the row length (flash-attention, which needs one row, gets them flattened). The few pad tokens
  closing a row restart their positions too, so they form a block of their own.
- shared prefix (`train.layout=shared_prefix`, the default): every prompt token once, as a prefix tree. Its
  root is the longest common prefix of the micro-batch's prompts (under a few-shot prompt: the chat template
  and the worked examples, most of each sequence); under it, each group's rest of its prompt (its question),
  and under that each of the group's COTs. Every token keeps the position it has in the unshared layouts (root
  0..R-1, rest R..P-1, each COT P, P+1, ...), and a 4D attention mask lets it see the root, its group's rest
  and the earlier tokens of its own COT only, so each COT's scores are those of the unshared layouts while a
  prompt part is forwarded once, not once per COT, and its gradient sums over the COTs that read it. The
  groups go first-fit into trees of at most twice the row width (`_prefix_trees`), each with its own copy of
  the root; without a common prefix, one tree per group. COTs cut by max_seq_len become one-COT segments with
  their own cut prompt. Segments are packed first-fit into rows as long as the longest.
  Needs an attention kernel that takes an arbitrary mask (sdpa, eager): see `takes_custom_masks`; the trainer
  falls back to packed where the model's kernel takes none (flash-attention, flex). Under sdpa the forward pass
  attends block by block (`tree_attention`: a group's question and COTs meet the root's keys and their own, not
  the other groups'), which the dense mask would compute and then mask.
Every scored token is read from the logits at the position that predicts it (`logit_index`): the previous
token of its COT, or the prompt's last token for a COT's first token. Only those positions' logits are computed.
`score_groups(model, batch)` runs the forward pass and returns the `ScoredBatch` the objectives read; the trainer's
first step also reads the sampler↔trainer drift from that pass (`token_logps`, `sampled_drift`, `scored_batch`).
Pure python/torch (no Ray): the Ray Train loop calls these on its dataset shard's rows.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

from aftray.train.losses import ScoredBatch


@dataclass
class GroupBatch:
    """One micro-batch: N (prompt, COT) sequences of G question groups; K = most sampled COTs of a group."""
    inputs: dict[str, Tensor]  # model kwargs: input_ids [B, T] + attention_mask (2D padded, 4D shared prefix)
    #                            and/or position_ids (packed, shared prefix)
    logit_index: Tensor  # [M] flat position in [B * T] of the logits that predict each scored COT token
    labels: Tensor  # [M] that token
    label_seq: Tensor  # [M] the sequence it belongs to
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
    forward_tokens: int  # tokens the forward pass runs over (padding excluded)
    sequence_tokens: int  # Σ (prompt + COT) over the sequences: what a layout without sharing forwards
    # shared prefix: per row, its attention blocks (start, end, root start, root end), in order (`tree_attention`)
    blocks: list[list[tuple[int, int, int, int]]] | None = None

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
    """Item indices per packed row, longest first into the first row with room (first-fit decreasing)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), len(rows))
        if j == len(rows):
            rows.append([])
            room.append(capacity)
        rows[j].append(i)
        room[j] -= lengths[i]
    return rows


@dataclass
class _Segment:
    """A prompt tree: a root (a prefix of every prompt in it) and its groups, each the rest of its prompt and
    the COTs that continue it, laid out as root, rest 1, COTs of group 1, rest 2, COTs of group 2, ..."""
    root: list[int]
    groups: list[tuple[list[int], list[tuple[int, list[int]]]]]  # (prompt rest, [(sequence number, COT)])

    def __len__(self) -> int:
        return len(self.root) + sum(len(rest) + sum(len(c) for _, c in cots) for rest, cots in self.groups)

    def blocks(self) -> list[tuple[int, int, int, int]]:
        """(start, end, root start, root end) of each attention block: the root (no keys beyond its own), then
        each group's prompt rest and COTs (the root's keys and its own)."""
        r, start = len(self.root), len(self.root)
        out = [(0, r, 0, 0)] if r else []
        for rest, cots in self.groups:
            end = start + len(rest) + sum(len(c) for _, c in cots)
            out.append((start, end, 0, r))
            start = end
        return out

    def tensors(self) -> dict[str, Tensor]:
        """Per token: ids, positions, group (0: the root, g: the g-th group), branch (0: a prompt part, b: the
        b-th COT of the segment); per scored token: the local position of the logits that predict it, the
        token, its sequence."""
        r = len(self.root)
        spans = [(self.root, 0, 0, 0)]  # (tokens, first position, group, branch)
        logit, labels, seqs = [], [], []
        start, b = r, 0  # where the next span starts in the segment, the COTs so far
        for g, (rest, cots) in enumerate(self.groups, 1):
            p = r + len(rest)  # the group's prompt length: its COTs' first position
            spans.append((rest, r, g, 0))
            start += len(rest)
            last = start - 1 if rest else r - 1  # the prompt's last token: in the rest, or the root's last
            for seq, cot in cots:
                b += 1
                spans.append((cot, p, g, b))
                first = 0 if p else 1  # without a prompt the first token has nothing to be predicted from
                logit += [start + j - 1 if j else last for j in range(first, len(cot))]
                labels += cot[first:]
                seqs += [seq] * (len(cot) - first)
                start += len(cot)
        per_token = [(t, at + i, gr, br) for tokens, at, gr, br in spans for i, t in enumerate(tokens)]
        ids, pos, group, branch = torch.tensor(per_token, dtype=torch.long).reshape(-1, 4).T
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        return {"ids": ids, "pos": pos, "group": group, "branch": branch, "logit": as_long(logit),
                "labels": as_long(labels), "seq": as_long(seqs)}


def _prefix_trees(groups: list[tuple[list[int], list]], max_seq_len: int) -> list[_Segment]:
    """The shared-prefix segments of a micro-batch's (prompt, COTs) groups: the prompts' longest common prefix
    is the root, under which the groups are packed first-fit into trees of at most twice the row width of the
    one-group layout (max_seq_len, or a longer group). The bound keeps any two groups in one tree (a
    micro-batch of two: one tree) while the dense mask's attention, the square of a row's length, stays within
    a small factor of the one-group layout's. Without a common prefix each group is a tree of its own."""
    root = os.path.commonprefix([prompt for prompt, _ in groups])
    rests = [(prompt[len(root):], cots) for prompt, cots in groups]
    sizes = [len(_Segment([], [g])) for g in rests]
    width = max([max_seq_len] + [len(root) + n for n in sizes])
    trees = _first_fit(sizes, 2 * width - len(root)) if root else [[i] for i in range(len(groups))]
    return [_Segment(root, [rests[i] for i in sorted(tree)]) for tree in trees]


def collate_groups(rows: list[dict], max_seq_len: int, packed: bool = False, with_ref: bool = True,
                   with_samples: bool = True, pad_id: int = 0, shared_prefix: bool = False) -> GroupBatch:
    """Group rows -> one micro-batch holding every sequence of every row (whole groups, never split).

    rows: dicts with `prompt_ids`, `ref_cot_ids`, `cot_ids`, `correct`, `rank`, `process`, `sample_logp`
    (lists or numpy arrays, as Ray Data hands them over). with_ref / with_samples: include the reference COT /
    the sampled COTs (see `aftray.loss_table.LossRow.sequences_needed`). shared_prefix: each prompt part once,
    as a prefix tree (the layout in the module docstring); `packed` is then implied."""
    g_count = len(rows)
    k_max = max((len(r["cot_ids"]) for r in rows), default=0) if with_samples else 0
    mask = torch.zeros(g_count, k_max, dtype=torch.bool)
    positive = torch.zeros(g_count, k_max, dtype=torch.bool)
    ranks = torch.full((g_count, k_max), torch.iinfo(torch.long).max, dtype=torch.long)
    process = torch.full((g_count, k_max), float("nan"))
    ref_logp = torch.full((g_count, k_max), float("nan"))
    cot_tokens = torch.zeros(g_count, k_max, dtype=torch.long)
    ref_tokens = torch.zeros(g_count, dtype=torch.long)
    segments, shared, seq_group, seq_slot, num_truncated, sequence_tokens = [], [], [], [], 0, 0
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
        cots = []  # the group's COTs that share its prompt
        for slot, cot in items:
            cot = [int(t) for t in cot]
            p, c = _fit(prompt, cot, max_seq_len)
            n = len(c) - (len(p) == 0)
            if n <= 0:
                continue
            cut = len(p) + len(c) < len(prompt) + len(cot)
            num_truncated += cut
            sequence_tokens += len(p) + len(c)
            seq = len(seq_group)
            seq_group.append(g)
            seq_slot.append(slot)
            if slot < 0:
                ref_tokens[g] = n
            else:
                mask[g, slot], cot_tokens[g, slot] = True, n
                if cut:
                    ref_logp[g, slot] = float("nan")
            if shared_prefix and p and not cut:  # a cut COT keeps its own cut prompt, as unshared
                cots.append((seq, c))
            else:
                segments.append(_Segment(p, [([], [(seq, c)])]))
        if cots:
            shared.append((prompt, cots))
    segments += _prefix_trees(shared, max_seq_len)

    parts = [s.tensors() for s in segments]
    lengths = [len(s) for s in segments]
    if shared_prefix:
        bins = _first_fit(lengths, max(lengths + [max_seq_len]))
    elif packed:
        bins = _first_fit(lengths, max_seq_len)
    else:
        bins = [[i] for i in range(len(segments))]
    width = max((sum(lengths[i] for i in row) for row in bins), default=1)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    pos = torch.zeros(len(bins), width, dtype=torch.long)
    block = torch.zeros(len(bins), width, dtype=torch.long)  # the segment (1...) a token is in, 0: padding
    group = torch.zeros(len(bins), width, dtype=torch.long)  # in the segment: 0 the root, g its g-th group
    branch = torch.zeros(len(bins), width, dtype=torch.long)  # in the segment: 0 a prompt part, b a COT
    logit_index, labels, label_seq = [], [], []
    blocks = [[] for _ in bins]
    for r, row in enumerate(bins):
        at = 0
        for i in row:
            n, part = lengths[i], parts[i]
            blocks[r] += [(at + a, at + b, at + c, at + d) for a, b, c, d in segments[i].blocks()]
            ids[r, at:at + n], pos[r, at:at + n] = part["ids"], part["pos"]
            group[r, at:at + n], branch[r, at:at + n] = part["group"], part["branch"]
            block[r, at:at + n] = i + 1
            logit_index.append(part["logit"] + r * width + at)
            labels.append(part["labels"])
            label_seq.append(part["seq"])
            at += n
        pos[r, at:] = torch.arange(width - at)  # the padding closing a packed row is a block of its own
    if shared_prefix:
        inputs = {"input_ids": ids, "position_ids": pos,
                  "attention_mask": _shared_prefix_mask(block, group, branch)}
    elif packed:
        inputs = {"input_ids": ids, "position_ids": pos}
    else:
        inputs = {"input_ids": ids, "attention_mask": (block > 0).long()}
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return GroupBatch(inputs=inputs, logit_index=cat(logit_index), labels=cat(labels), label_seq=cat(label_seq),
                      seq_group=torch.tensor(seq_group, dtype=torch.long),
                      seq_slot=torch.tensor(seq_slot, dtype=torch.long), cot_tokens=cot_tokens,
                      ref_tokens=ref_tokens, mask=mask, positive=positive, ranks=ranks, process=process,
                      ref_logp=ref_logp, num_truncated=num_truncated, forward_tokens=sum(lengths),
                      sequence_tokens=sequence_tokens, blocks=blocks if shared_prefix else None)


def _shared_prefix_mask(block: Tensor, group: Tensor, branch: Tensor) -> Tensor:
    """[B, 1, T, T] bool, True where query i may attend to key j: the same segment, j <= i, and j in the root,
    in the prompt rest of i's group or in i's own COT. A padding token attends to itself only (a row of no
    keys would give NaN)."""
    t = block.shape[1]
    same = lambda x: x[:, :, None] == x[:, None, :]  # noqa: E731
    key_in_root, key_in_prompt = (group == 0)[:, None, :], (branch == 0)[:, None, :]
    in_reach = key_in_root | (same(group) & (key_in_prompt | same(branch)))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = same(block) & in_reach & causal & (block > 0)[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool) & (block == 0)[:, :, None]
    return allowed[:, None]


def takes_custom_masks(model) -> bool:
    """Whether the model's attention kernel takes the shared-prefix layout's 4D mask: sdpa and eager do;
    flash-attention (varlen boundaries only) and flex (block masks) do not."""
    return str(getattr(model.config, "_attn_implementation", "sdpa")) in ("sdpa", "eager")


TREE_ATTENTION = "sdpa_tree"


def tree_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                   dropout: float = 0.0, scaling: float | None = None, tree_blocks=None, **kwargs):
    """sdpa block by block over a shared-prefix micro-batch (`GroupBatch.blocks`), as a transformers attention
    function: the queries of a block (the root, or one group's prompt rest and COTs) meet the keys of the root
    and of their own block, not every key of the row, where the dense mask would mask most of them (the other
    groups'). Each block keeps its slice of the 4D mask, so the outputs are the dense mask's; padding gets
    zeros (nothing reads it). query [B, H, T, D], key and value [B, H_kv, T, D]; returns [B, T, H, D]."""
    repeat = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, repeat), repeat_kv(value, repeat)
    rows = []
    for b, blocks in enumerate(tree_blocks):
        pieces, end = [], 0
        for start, end, root_start, root_end in blocks:
            spans = [slice(root_start, root_end)] if root_end > root_start else []
            spans.append(slice(start, end))
            k, v = (torch.cat([x[b:b + 1, :, span] for span in spans], 2) for x in (key, value))
            mask = torch.cat([attention_mask[b:b + 1, :, start:end, span] for span in spans], -1)
            pieces.append(torch.nn.functional.scaled_dot_product_attention(
                query[b:b + 1, :, start:end], k, v, attn_mask=mask, dropout_p=dropout, scale=scaling))
        pieces.append(query.new_zeros(1, query.shape[1], query.shape[2] - end, query.shape[3]))
        rows.append(torch.cat(pieces, 2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(TREE_ATTENTION, tree_attention)


def _model_inputs(model, batch: GroupBatch) -> dict[str, Tensor]:
    """flash-attention reads packed sequences from the position ids of a single row only (transformers
    `_is_packed_sequence`), so it gets the packed rows flattened into one; eager attention adds its mask to the
    scores, so a 4D mask goes in as 0 / -inf there; the other kernels get the rows as they are."""
    inputs = batch.inputs
    attn = str(getattr(model.config, "_attn_implementation", ""))
    if "flash" in attn and "position_ids" in inputs:
        return {k: v.reshape(1, -1) for k, v in inputs.items()}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4 and attn == "eager":
        dtype = next(model.parameters()).dtype
        return {**inputs, "attention_mask": torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)}
    return inputs


def token_logps(model, batch: GroupBatch) -> Tensor:
    """log p of every scored COT token (fp32), in sequence order (`batch.label_seq`: the sequence of each)."""
    inputs = _model_inputs(model, batch)
    width = inputs["input_ids"].shape[1]
    # The LM head runs only at the columns that predict a scored token: on a few-shot prompt most positions are
    # prompt, whose logits nothing reads (a fifth of the model's FLOPs at each of them, forward and backward).
    # use_cache=False also matters for packing: with a cache transformers skips the packed-sequence detection.
    columns, at = torch.unique(batch.logit_index % width, return_inverse=True)
    config = getattr(model, "module", model).config  # a DeepSpeed engine's model
    tree = batch.blocks is not None and config._attn_implementation == "sdpa"
    if tree:  # the forward pass only: the backward pass reads no attention function
        config._attn_implementation, inputs = TREE_ATTENTION, {**inputs, "tree_blocks": batch.blocks}
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=columns).logits  # [rows, len(columns), vocab]
    finally:
        if tree:
            config._attn_implementation = "sdpa"
    kept = (batch.logit_index // width) * len(columns) + at
    logits = logits.reshape(-1, logits.shape[-1])[kept].float()  # the log-softmax in fp32 under bf16
    return logits.gather(-1, batch.labels[:, None]).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(model, batch: GroupBatch) -> Tensor:
    """S of every sequence [N] (fp32), from one forward pass: Σ log p over its COT tokens only."""
    return _sequence_sums(batch, token_logps(model, batch))


def _sequence_sums(batch: GroupBatch, token_logp: Tensor) -> Tensor:
    return token_logp.new_zeros(len(batch.seq_group)).index_add(0, batch.label_seq, token_logp)


def has_samples(row: dict) -> bool:
    """The row carries sampled COTs with the sampler's per-token log-probs (not a reference-only row, nor one
    of a run from before the rows recorded them)."""
    return any(map(len, row.get("sample_token_logp", ())))


@torch.no_grad()
def logp_drift(model, rows: list[dict], max_seq_len: int, pad_id: int, device, shared_prefix: bool = False
               ) -> list[float]:
    """`sampled_drift` from a forward pass of its own over the rows' sampled COTs, under the current weights
    (docs/method.md §Sampler–trainer log-prob drift): for a stage whose first step's micro-batches carry no
    sampled COT to read it from."""
    rows = [r for r in rows if has_samples(r)]
    if not rows:
        return []
    batch = collate_groups(rows, max_seq_len, with_ref=False, pad_id=pad_id, shared_prefix=shared_prefix).to(device)
    if not len(batch.seq_group):  # groups whose COTs were all empty
        return []
    return sampled_drift(batch, token_logps(model, batch), rows)


def sampled_drift(batch: GroupBatch, token_logp: Tensor, rows: list[dict]) -> list[float]:
    """|trainer log-prob − sampler log-prob| of every token of the batch's sampled COTs (`rows`: the rows it was
    collated from; `token_logp`: `token_logps` of it). The reference COTs, and COTs or prompts cut to
    max_seq_len (their context differs from the sampler's), are left out."""
    token_logp, diffs = token_logp.detach().float(), []
    for n, (g, slot) in enumerate(zip(batch.seq_group.tolist(), batch.seq_slot.tolist(), strict=True)):
        sampled = rows[g].get("sample_token_logp") or ()
        if slot < 0 or slot >= len(sampled) or not len(sampled[slot]) or batch.ref_logp[g, slot].isnan():
            continue  # NaN: cut (see collate_groups)
        mine = token_logp[batch.label_seq == n]
        theirs = torch.as_tensor(sampled[slot], dtype=torch.float32, device=mine.device)
        if len(mine) == len(theirs):
            diffs += (mine - theirs).abs().tolist()
    return diffs


def scored_batch(batch: GroupBatch, token_logp: Tensor) -> ScoredBatch:
    """The `ScoredBatch` of a micro-batch from its scored tokens' log-probs (`token_logps`): S of each sampled
    COT in its [G, K] slot, the reference COT's S as the VFT piece."""
    logp = _sequence_sums(batch, token_logp)
    ref = batch.seq_slot < 0
    g_count, k_max = batch.mask.shape
    cot_logp = logp.new_zeros(g_count, k_max).index_put((batch.seq_group[~ref], batch.seq_slot[~ref]),
                                                        logp[~ref])
    vft_logp = logp.new_zeros(g_count).index_put((batch.seq_group[ref],), logp[ref])
    return ScoredBatch(logp=cot_logp, num_tokens=batch.cot_tokens, mask=batch.mask, positive=batch.positive,
                       ranks=batch.ranks, process=batch.process, ref_logp=batch.ref_logp, vft_logp=vft_logp,
                       vft_tokens=batch.ref_tokens)


def score_groups(model, batch: GroupBatch) -> ScoredBatch:
    """One forward pass -> the `ScoredBatch` of the micro-batch."""
    return scored_batch(batch, token_logps(model, batch))
