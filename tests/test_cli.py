"""The command line on bad input: the job ends with one line naming what to fix and a non-zero exit code, no
traceback, before Ray starts."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, last_line", [
    (["train.lrr=1e-5"], "config error: unknown key 'train.lrr' (expected one of: lr, "),
    (["model.name_or_path=/nonexistent/model"],
     "error: model.name_or_path: '/nonexistent/model' is not a folder (expected an HF model folder, a hub id or "
     "'tiny')"),
    (["task.name=gsm8k", "task.data_dir={empty}"],
     "error: {empty}/gsm8k/train.jsonl: not found and openai/gsm8k not reachable on the hub (set task.data_dir "
     "or AFTRAY_DATA_DIR)"),
])
def test_bad_input_ends_the_job_with_one_line(tmp_path, overrides, last_line):
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, str(REPO / "jobs" / "aft_gsm8k.py"), f"output_dir={tmp_path / 'runs'}",
           *(o.format(empty=empty) for o in overrides)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(last_line.format(empty=empty)), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    logs = "".join(p.read_text() for p in (tmp_path / "runs").glob("*/run.log"))  # Ray logs its start there
    assert "Ray instance" not in logs


def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "aftray.cli", "eval", str(tmp_path / "nothing"), f"output_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'nothing'}: not a folder (expected an HF checkpoint folder)"


def test_sample_prints_each_question_with_its_labelled_cots(tmp_path, tiny_model_path):
    """`aftray sample`: the first --questions held-out questions, each with its gold answer and k labelled COTs."""
    cmd = [sys.executable, "-m", "aftray.cli", "sample", str(tiny_model_path), "--config", "configs/arith_cpu.yaml",
           "--questions", "2", f"output_dir={tmp_path}", "rollout.engine=hf", "rollout.k=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    groups = out.stdout.split("=== ")[1:]
    assert len(groups) == 2, out.stdout[-3000:]
    for group in groups:
        assert "(gold " in group.splitlines()[0]
        labels = [line.split()[1] for line in group.splitlines() if line.startswith("--- ")]
        assert len(labels) == 3 and set(labels) <= {"correct", "wrong_answer", "no_answer", "truncated"}, group
