"""Examples, tasks, and the row reading every dataset shares.

A bad row (a missing or empty field, an unparsable final answer, a non-UTF-8, non-JSON or empty line) raises
`DataError` naming file, line, field and what was expected: the full GSM8K and AQuA-RAT splits have none, so one
means a damaged or foreign file, not noise to skip. Local files are read line by line with `json` rather than
through `datasets`' json loader: that loader fails a whole file on one bad line and cannot say which line.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse

from aftray.config import InputError, MissingInputError, TaskConfig
from aftray.tasks.prompts import render_prompt

log = logging.getLogger(__name__)


@dataclass
class Example:
    id: str
    question: str
    answer: str  # canonical gold answer: a number ("1000", "0.5", "1/3") or an option letter
    cot: str  # reference COT, the text the model learns; ends with "#### <answer>"
    choices: list[str] = field(default_factory=list)  # multiple choice: option texts, lettered A, B, ...
    raw_cot: str = ""  # the reference as the dataset has it (GSM8K: with <<a*b=c>> calculator annotations)


@dataclass
class Task:
    name: str
    answer_kind: str  # "number" | "choice"
    train: list[Example]
    test: list[Example]
    cfg: TaskConfig

    def prompt(self, example: Example, tokenizer: Any = None) -> str:
        """Rendered prompt; the COT is everything generated after it. Shots: the first training examples."""
        shots = [e for e in self.train[:self.cfg.few_shot + 1] if e.id != example.id][:self.cfg.few_shot]
        return render_prompt(example, shots, self.answer_kind, tokenizer, self.cfg.prompt_format)


class DataError(InputError, ValueError):
    """A bad dataset row: `<file>:<line>: <field>: <reason>`."""


class RowError(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field, self.reason = field_name, reason


def get_field(row: dict, name: str, kind: type = str) -> Any:
    """row[name], checked to be a `kind` (and non-blank for str), else RowError naming the field."""
    if name not in row or row[name] is None:
        raise RowError(name, "missing")
    value = row[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise RowError(name, f"expected a non-empty {kind.__name__}, got {str(value)[:40]!r}")
    return value


def jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, dict) per line; a RowError in place of the dict for a line that cannot be read."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, RowError("<line>", f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                yield lineno, RowError("<line>", "empty line")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, RowError("<line>", f"not JSON ({e.msg})")
                continue
            yield lineno, row if isinstance(row, dict) else RowError("<line>", "not a JSON object")


def build_examples(source: str, rows: Iterable[tuple[int, Any]], parse: Callable[[dict, int], Example]
                   ) -> list[Example]:
    """parse(row, line) over the rows; the first bad row raises `DataError`."""
    examples = []
    for lineno, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            examples.append(parse(row, lineno))
        except RowError as e:
            raise DataError(f"{source}:{lineno}: {e.field}: {e.reason}") from None
    return examples


# ---------------------------------------------------------------------------------------------- hub or local
def default_data_dir() -> Path:
    """Local dataset copies: $AFTRAY_DATA_DIR, else ../shared/data next to the repository."""
    env = os.environ.get("AFTRAY_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


@functools.cache
def hub_reachable(timeout_s: float = 2.0) -> bool:
    """False at once when HF offline mode is set; else a TCP connect to the hub (no hanging retries)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                               "HF_DATASETS_OFFLINE")):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def split_rows(cfg: TaskConfig, hub: tuple[str, Optional[str], str], local: str) -> tuple[str, Iterable]:
    """(source, rows) of one split: an explicit `task.data_dir` is read locally; otherwise the hub copy when
    reachable, else `$AFTRAY_DATA_DIR` / ../shared/data.

    `hub` = (name, config, split); `local` = the file relative to the data dir.
    """
    name, config, split = hub
    if cfg.data_dir is None and hub_reachable():
        try:
            import datasets

            ds = datasets.load_dataset(name, config, split=split)
            return f"hub:{name}/{split}", ((i + 1, row) for i, row in enumerate(ds))
        except Exception as e:  # load_dataset raises many types (HTTP, auth, not found); all mean "use local"
            log.warning("could not load %s from the hub (%s); reading the local copy", name, e)
    path = Path(cfg.data_dir or default_data_dir()) / local
    if not path.is_file():
        raise MissingInputError(f"{path}: not found and {name} not reachable on the hub "
                                "(set task.data_dir or AFTRAY_DATA_DIR)")
    return str(path), jsonl_rows(path)


def load_split(cfg: TaskConfig, hub: tuple[str, Optional[str], str], local: str,
               parse: Callable[[dict, int], Example]) -> list[Example]:
    source, rows = split_rows(cfg, hub, local)
    return build_examples(source, rows, parse)
