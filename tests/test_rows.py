"""aftray.rows: the group-row contract. verify's rows fit GROUP_SCHEMA and survive parquet; a bad row or
table is refused naming the column."""
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aftray.config import VerifyConfig
from aftray.rows import (GROUP_SCHEMA, SAMPLE_COLUMNS, TRAIN_COLUMNS, RowError, check_group_table, group_row,
                         is_mixed, question_group_row, reference_only, type_name)
from aftray.verify import verify_group

QUESTION = {"id": "q17", "prompt": "Q: 3+4?\nA: ", "prompt_ids": [5, 6, 7], "answer": "7",
            "ref_cot": "3+4=7\n#### 7", "ref_cot_ids": [8, 9, 0]}


def completion(text, finish_reason="stop"):
    ids = list(text.encode())
    return SimpleNamespace(text=text, token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason=finish_reason)


def verified(question=QUESTION, texts=("3+4=7\n#### 7", "3+4=8\n#### 8", "I am not sure."), process="arith"):
    return verify_group({**question, "weights_version": 2, "choices": None}, [completion(t) for t in texts],
                        VerifyConfig(process=process), "number")


def same(a: dict, b: dict) -> bool:
    """Rows equal, NaN == NaN."""
    def plain(v):
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        return [plain(x) for x in v] if isinstance(v, list) else v

    return {k: plain(v) for k, v in a.items()} == {k: plain(v) for k, v in b.items()}


def test_schema_is_the_documented_table():
    text = (Path(__file__).parents[1] / "docs" / "internals.md").read_text()
    table = text.split("## Group row", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \| ([\w\[\]]+) \|", table, flags=re.MULTILINE)
    assert documented == [(f.name, type_name(f.type)) for f in GROUP_SCHEMA]


def test_verified_row_fits_and_round_trips_through_parquet(tmp_path):
    rows = [verified(), verified({**QUESTION, "id": "q18"}, texts=()), verified(process="none")]
    assert list(rows[0]) == GROUP_SCHEMA.names and rows[0]["rank"] == [1, 2, 3]
    assert all(same(group_row(**row), row) for row in rows)  # a made row is its own normal form
    table = pa.Table.from_pylist(rows, schema=GROUP_SCHEMA)
    pq.write_table(table, tmp_path / "samples.parquet")
    back = pq.read_table(tmp_path / "samples.parquet")
    check_group_table(back, "samples.parquet")
    assert all(same(group_row(**r), row) for r, row in zip(back.to_pylist(), rows, strict=True))
    assert set(TRAIN_COLUMNS) <= set(GROUP_SCHEMA.names) and set(SAMPLE_COLUMNS) <= set(GROUP_SCHEMA.names)


def test_rows_from_ray_data_are_normalised():
    row = verified()
    as_numpy = {k: np.asarray(v) if isinstance(v, list) and k not in ("cot_ids", "sample_token_logp") else v
                for k, v in row.items()}
    for name in ("cot_ids", "sample_token_logp"):  # ragged lists come as object arrays of arrays
        as_numpy[name] = np.empty(len(row[name]), dtype=object)
        for i, item in enumerate(row[name]):
            as_numpy[name][i] = np.asarray(item)
    as_numpy.update(num_sampled=np.int64(3), weights_version=np.int32(2), id=np.str_("q17"))
    out = group_row(**as_numpy)
    assert same(out, row)
    assert type(out["num_sampled"]) is int and type(out["cot_ids"][0][0]) is int and type(out["id"]) is str
    assert type(out["correct"][0]) is bool and type(out["rank"][0]) is int


def test_missing_or_unknown_column_is_refused_by_name():
    row = verified()
    del row["rank"]
    with pytest.raises(RowError, match=r"^group row 'q17': missing column 'rank'$"):
        group_row(**row)
    with pytest.raises(RowError, match=r"'q17': unknown column 'choices'"):
        group_row(**verified(), choices=["A", "B"])


@pytest.mark.parametrize("column,value,expected", [
    ("cot_ids", ["3+4=7", "3+4=8", "no"], r"column 'cot_ids': expected list\[list\[int\]\], got list\[str\]"),
    ("cot_ids", [[1], [2], ["3"]],
     r"column 'cot_ids': expected list\[list\[int\]\], got list\[list\[str\]\]"),
    ("correct", ["True", False, False], r"column 'correct': expected list\[bool\], got list\[str\]"),
    ("rank", [1.0, 2.0, 3.0], r"column 'rank': expected list\[int\], got list\[float\]"),
    ("rank", np.array([1.0, 2.0, 3.0]), r"column 'rank': expected list\[int\], got list\[float\]"),
    ("counts", [True, 1, 1], r"column 'counts': expected list\[int\], got list\[bool\]"),
    ("process", [None, 1.0, 0.0], r"column 'process': expected list\[float\], got list\[NoneType\]"),
    ("num_sampled", 3.0, r"column 'num_sampled': expected int, got float"),
    ("prompt", None, r"column 'prompt': expected str, got NoneType"),
    ("prompt_ids", "5 6 7", r"column 'prompt_ids': expected list\[int\], got str"),
])
def test_wrong_type_is_refused_naming_the_column(column, value, expected):
    with pytest.raises(RowError, match=r"^group row 'q17': " + expected):
        group_row(**{**verified(), column: value})


def test_ints_and_nan_are_floats():
    row = group_row(**{**verified(), "sample_logp": [-3, math.nan, np.float32(-1.5)]})
    assert row["sample_logp"][0] == -3.0 and type(row["sample_logp"][0]) is float
    assert math.isnan(row["sample_logp"][1]) and row["sample_logp"][2] == -1.5


@pytest.mark.parametrize("column", SAMPLE_COLUMNS)
def test_per_cot_lists_of_another_length_are_refused(column):
    row = verified()
    if column == "cot_ids":
        row["cot_ids"] = row["cot_ids"][:2]
        expected = r"column '\w+': expected 2 items \(one per COT of 'cot_ids'\), got 3"
    else:
        row[column] = row[column][:2]
        expected = rf"column '{column}': expected 3 items \(one per COT of 'cot_ids'\), got 2"
    with pytest.raises(RowError, match=r"^group row 'q17': " + expected):
        group_row(**row)


def test_question_and_reference_only_rows():
    vft = question_group_row({**QUESTION, "choices": ["A"]}, weights_version=3)
    assert list(vft) == GROUP_SCHEMA.names
    assert {k: vft[k] for k in QUESTION} == QUESTION
    assert vft["num_sampled"] == 0 and vft["weights_version"] == 3
    assert all(vft[c] == [] for c in SAMPLE_COLUMNS) and not is_mixed(vft)
    with pytest.raises(RowError, match="'q17': column 'prompt_ids'"):
        question_group_row({**QUESTION, "prompt_ids": ["5"]})

    row = verified()
    ref = reference_only(row)
    assert list(ref) == GROUP_SCHEMA.names and same(group_row(**ref), ref)
    assert all(ref[c] == [] for c in SAMPLE_COLUMNS)
    assert all(ref[c] == row[c] for c in GROUP_SCHEMA.names if c not in SAMPLE_COLUMNS)
    assert ref["num_sampled"] == 3 and ref["weights_version"] == 2
    assert len(row["cots"]) == 3  # the input is left as it was
    train = reference_only({c: row[c] for c in TRAIN_COLUMNS})  # what the trainer holds
    assert list(train) == list(TRAIN_COLUMNS) and train["cot_ids"] == train["rank"] == []
    assert train["ref_cot_ids"] == row["ref_cot_ids"]


def test_is_mixed():
    assert is_mixed(verified())  # one right, two wrong
    assert not is_mixed(verified(texts=("#### 7", "3+4=7\n#### 7")))
    assert not is_mixed(verified(texts=("#### 8",)))
    assert is_mixed({"correct": np.array([False, True])})


def test_check_group_table_refuses_a_missing_or_retyped_column():
    table = pa.Table.from_pylist([verified()], schema=GROUP_SCHEMA)
    check_group_table(table.append_column("scores", pa.array([[0.5, 0.1, 0.0]])), "extra.parquet")  # allowed
    with pytest.raises(RowError, match=r"^samples\.parquet: group rows: missing column 'rank'$"):
        check_group_table(table.drop_columns(["rank"]), "samples.parquet")
    retyped = {
        "rank": pa.array([[1.0, 2.0, 3.0]]),
        "cot_ids": pa.array([["a", "b", "c"]]),
        "correct": pa.array([["yes", "no", "no"]]),
        "num_sampled": pa.array([3.0]),
        "prompt_ids": pa.array([[5, 6, 7]], type=pa.list_(pa.int32())),
        "process": pa.array([None], type=pa.null()),
    }
    for name, column in retyped.items():
        bad = table.set_column(GROUP_SCHEMA.get_field_index(name), name, column)
        with pytest.raises(RowError, match=rf"^r3\.parquet: group rows: column '{name}': expected "):
            check_group_table(bad, "r3.parquet")


def test_check_group_table_accepts_rows_written_with_or_without_the_schema(tmp_path):
    rows = [verified(), verified(process="none")]
    vft = [question_group_row(QUESTION), question_group_row({**QUESTION, "id": "q2", "prompt_ids": []})]
    no_token_logp = [group_row(**{**verified(), "sample_token_logp": [[], [], []]})]
    batches = {"samples": rows, "vft": vft, "no_token_logp": no_token_logp, "mixed": rows + vft}
    for name, batch in batches.items():
        for schema in (GROUP_SCHEMA, None):
            table = pa.Table.from_pylist(batch, schema=schema)
            check_group_table(table, name)
            path = tmp_path / f"{name}-{schema is None}.parquet"
            pq.write_table(table, path)
            check_group_table(pq.read_table(path), str(path))
    # what the check lets through: pyarrow's type for lists that are empty in every row
    assert pa.Table.from_pylist(vft).schema.field("cot_ids").type == pa.list_(pa.null())
