"""The group row: one question with its sampled COTs, labels and ranks (docs/internals.md, "Group row").

`GROUP_SCHEMA` is the contract between verify (which makes the rows), the loop (which writes them to
`rounds/<r>/samples.parquet` and picks the training rows), the trainer (`TRAIN_COLUMNS`), the round
metrics, and the tests and benchmarks that make rows by hand. `group_row` is the one constructor: a row
missing a column, or with a value of the wrong type, is refused where it is made, naming the column.
pyarrow and numpy only (no torch, no Ray): the three stages import it.
"""
from __future__ import annotations

import numbers
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

GROUP_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("prompt_ids", pa.list_(pa.int64())),
    ("answer", pa.string()),
    ("ref_cot", pa.string()),
    ("ref_cot_ids", pa.list_(pa.int64())),
    ("cots", pa.list_(pa.string())),
    ("cot_ids", pa.list_(pa.list_(pa.int64()))),
    ("sample_logp", pa.list_(pa.float64())),
    ("sample_token_logp", pa.list_(pa.list_(pa.float64()))),
    ("finish_reasons", pa.list_(pa.string())),
    ("pred", pa.list_(pa.string())),
    ("labels", pa.list_(pa.string())),
    ("correct", pa.list_(pa.bool_())),
    ("process", pa.list_(pa.float64())),
    ("rank", pa.list_(pa.int64())),
    ("counts", pa.list_(pa.int64())),
    ("num_sampled", pa.int64()),
    ("weights_version", pa.int64()),
])
COLUMNS = tuple(GROUP_SCHEMA.names)
# A question row's columns: copied through unchanged from the task row to the group row.
QUESTION_COLUMNS = ("id", "prompt", "prompt_ids", "answer", "ref_cot", "ref_cot_ids")
# One item per kept COT; all empty in a row without samples.
SAMPLE_COLUMNS = ("cots", "cot_ids", "sample_logp", "sample_token_logp", "finish_reasons", "pred", "labels",
                  "correct", "process", "rank", "counts")
# What the trainer reads (aftray/train/worker.py).
TRAIN_COLUMNS = ("id", "prompt_ids", "ref_cot_ids", "cot_ids", "sample_logp", "sample_token_logp", "correct",
                 "rank", "process")


class RowError(ValueError):
    """A group row (or table) that does not fit GROUP_SCHEMA; the message names the column."""


class _Mismatch(Exception):
    def __init__(self, got: str):
        self.got = got


def type_name(t: pa.DataType) -> str:
    """The Python spelling of a column type: list[list[int]]."""
    if pa.types.is_list(t):
        return f"list[{type_name(t.value_type)}]"
    return {pa.string(): "str", pa.int64(): "int", pa.float64(): "float", pa.bool_(): "bool"}[t]


_KIND = {"i": "int", "u": "int", "f": "float", "b": "bool", "U": "str"}  # numpy dtype kinds, as Python names


def _found(value: Any) -> str:
    """What a value is, spelled like type_name: list[str]."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind != "O":
        return f"list[{_KIND.get(value.dtype.kind, str(value.dtype))}]" if len(value) else "list"
    if isinstance(value, (list, tuple, np.ndarray)):
        return f"list[{_found(value[0])}]" if len(value) else "list"
    if isinstance(value, np.generic):
        return _KIND.get(value.dtype.kind, str(value.dtype))
    return type(value).__name__


_PLAIN = {pa.string(): str, pa.int64(): int, pa.float64(): float, pa.bool_(): bool}


def _plain(value: Any, t: pa.DataType) -> Any:
    """`value` as plain Python of type `t` (numpy values from Ray Data become lists, ints, floats), or
    _Mismatch saying what was found."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if pa.types.is_list(t):
        if isinstance(value, np.ndarray):
            kind = value.dtype.kind
            if len(value) == 0:  # np.asarray([]) is float64: an empty list of anything
                return []
            if value.ndim == 1 and kind != "O":  # a fast path for long token-id and log-prob arrays
                want = t.value_type
                if (want == pa.int64() and kind in "iu") or (want == pa.float64() and kind in "iuf") or \
                        (want == pa.bool_() and kind == "b") or (want == pa.string() and kind == "U"):
                    return value.astype(float).tolist() if want == pa.float64() else value.tolist()
                raise _Mismatch(_found(value))
        elif not isinstance(value, (list, tuple)):
            raise _Mismatch(_found(value))
        else:  # a fast path for plain Python lists (verify's rows): token ids and log-probs are most of a row
            plain = _PLAIN.get(t.value_type)
            if plain is not None and all(type(x) is plain for x in value):
                return list(value)
        out = []
        for item in value:
            try:
                out.append(_plain(item, t.value_type))
            except _Mismatch as e:
                raise _Mismatch(f"list[{e.got}]") from None
        return out
    if t == pa.string():
        if isinstance(value, str):
            return str(value)
    elif t == pa.int64():
        # numbers.Integral covers numpy's integers, and bool, which is an int in Python: a flag is not a count
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return int(value)
    elif t == pa.float64():
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            return float(value)
    elif t == pa.bool_():
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    else:
        raise AssertionError(f"no check for {t}")
    raise _Mismatch(_found(value))


def _where(columns: dict) -> str:
    row_id = columns.get("id")
    return f"group row {row_id!r}" if isinstance(row_id, str) else "group row"


def _names(names: Iterable[str]) -> str:
    names = list(names)
    return ("column " if len(names) == 1 else "columns ") + ", ".join(repr(n) for n in names)


def group_row(**columns: Any) -> dict[str, Any]:
    """The group row with these columns, checked against GROUP_SCHEMA, as a plain dict in schema order.

    Every column must be given and no other; each value must have its column's type (ints for int columns,
    numpy integers included, bools not; floats or ints for float columns, NaN included), and the per-COT
    columns (SAMPLE_COLUMNS) one item per COT of `cot_ids`. Raises RowError naming the row and the column."""
    where = _where(columns)
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise RowError(f"{where}: missing {_names(missing)}")
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise RowError(f"{where}: unknown {_names(unknown)} (the group row's columns are GROUP_SCHEMA's)")
    row = {}
    for field in GROUP_SCHEMA:
        try:
            row[field.name] = _plain(columns[field.name], field.type)
        except _Mismatch as e:
            raise RowError(f"{where}: column {field.name!r}: expected {type_name(field.type)}, got {e.got}") \
                from None
    k = len(row["cot_ids"])
    for name in SAMPLE_COLUMNS:
        if len(row[name]) != k:
            raise RowError(f"{where}: column {name!r}: expected {k} items (one per COT of 'cot_ids'), got "
                           f"{len(row[name])}")
    return row


def question_group_row(row: dict, weights_version: int = 0) -> dict[str, Any]:
    """The group row of a question row without samples: what the VFT stage trains on (its reference COT)."""
    return group_row(**{c: row[c] for c in QUESTION_COLUMNS}, **{c: [] for c in SAMPLE_COLUMNS},
                     num_sampled=0, weights_version=weights_version)


def reference_only(row: dict) -> dict[str, Any]:
    """The same row with its samples left out (its SAMPLE_COLUMNS emptied, num_sampled and the rest kept): a
    group that gives the alignment term no pair trains its reference COT alone. Not checked again: the trainer
    calls it on its subset of the columns (TRAIN_COLUMNS), and emptying lists cannot break a row's types."""
    return {**row, **{c: [] for c in SAMPLE_COLUMNS if c in row}}


def is_mixed(row: dict) -> bool:
    """Has both a right and a wrong COT: the groups a pairwise loss learns from."""
    correct = [bool(c) for c in row["correct"]]
    return any(correct) and not all(correct)


def mixed_first(rows: Iterable[dict], limit: int | None = None) -> list[dict]:
    """The mixed groups, then the others, each kept in its order; `limit` at most."""
    return sorted(rows, key=lambda row: not is_mixed(row))[:limit]  # a stable sort keeps each part's order


def mixed_or_reference(rows: Iterable[dict], limit: int | None = None) -> list[dict]:
    """Dynamic sampling's training rows under a pairwise loss: a mixed group whole, any other group with its
    reference COT alone (for the VFT term); its samples would give the alignment term no pair, yet cost k
    forward and backward passes. With `limit`: that many rows at most, the mixed groups first, so that a round
    trains the groups it planned however many questions it sampled to find its pairs (DAPO's fixed batch)."""
    return [row if is_mixed(row) else reference_only(row) for row in mixed_first(rows, limit)]


def _fits(found: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_list(want):
        # pyarrow infers `null` items for lists that are empty in every row (a VFT-only table's COT columns,
        # or sample_token_logp when the engine gave no per-token log-probs): no value contradicts the schema.
        return pa.types.is_list(found) and (pa.types.is_null(found.value_type) or
                                            _fits(found.value_type, want.value_type))
    return found == want  # list field names and nullability aside (parquet names items "element")


def check_group_table(table: pa.Table, where: str) -> None:
    """Refuses (RowError) a table of group rows missing a GROUP_SCHEMA column or holding one of another type;
    other columns are allowed. `where` (a file) goes into the message."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise RowError(f"{where}: group rows: missing {_names(missing)}")
    for field in GROUP_SCHEMA:
        found = table.schema.field(field.name).type
        if not _fits(found, field.type):
            raise RowError(f"{where}: group rows: column {field.name!r}: expected {field.type} "
                           f"({type_name(field.type)}), found {found}")
