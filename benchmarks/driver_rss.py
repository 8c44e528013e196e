"""The driver's peak memory as a round's questions grow (16 -> 128 -> 1,024): the driver holds configs, object
refs and metrics, never the round's rows, so its peak RSS stays flat while the rows it does not hold grow.
Prints and writes benchmarks/results/driver_rss.json.

Each size runs the arith testbed (tiny model, HF samplers, k = 4, two rounds, 2 optimizer steps a stage) in a
child process of its own and reads that process's peak RSS (`ru_maxrss`) at the end; the round's rows are
measured as what reading rounds/2/samples.parquet back into Python would take.

    .venv/bin/python benchmarks/driver_rss.py [--sizes 16,128,1024]
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "driver_rss.json"


def child(questions: int, out_dir: str) -> None:
    import tracemalloc

    from aftray.config import load_config
    from aftray.loop.rounds import run_loop
    from aftray.run.rundir import read_parquet_rows

    cfg = load_config(REPO / "configs" / "arith_cpu.yaml", [
        f"output_dir={out_dir}", "run_name=rss", f"loop.questions_per_round={questions}", "loop.rounds=2",
        "train.vft.steps=2", "train.steps_per_stage=2", "task.num_test=20",
        "loop.assessment_questions=10", "tracking.experiment=null"])
    start = time.perf_counter()
    summary = run_loop(cfg)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()  # what the round's rows would cost a driver that read them (Python objects)
    rows = read_parquet_rows(cfg.run_dir / "rounds" / "2" / "samples.parquet")
    rows_mb = tracemalloc.get_traced_memory()[0] / 2**20
    print(json.dumps({"questions_per_round": questions, "driver_peak_rss_mb": round(peak_mb, 1),
                      "round_rows": len(rows), "round_rows_in_python_mb": round(rows_mb, 2),
                      "samples": summary["rounds"][2]["num_samples"], "wall_s": round(wall, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16,128,1024")
    ap.add_argument("--child", type=int)
    ap.add_argument("--out-dir")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.out_dir)
    runs = []
    for n in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="aftray-rss-") as tmp:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--out-dir", tmp],
                                 capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    peaks = [r["driver_peak_rss_mb"] for r in runs]
    results = {"runs": runs, "peak_rss_growth_mb": round(peaks[-1] - peaks[0], 1),
               "rows_growth_mb": round(runs[-1]["round_rows_in_python_mb"] - runs[0]["round_rows_in_python_mb"], 2)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
