"""Compare losses on one preset over several seeds, compute-matched (see aftray/experiments/compare.py).

    python jobs/compare_losses.py --config configs/arith_compare.yaml \
        --arms vft_continued,rft,aft_bc --seeds 0,1,2 --out runs/compare [key=value ...]

Writes <out>/comparison.json, comparison.md and plots/, and logs one MLflow parent run with a child run per arm
and seed. `--results-md docs/results.md` also refreshes the generated part of that page.

A shared hyper-parameter grid (every arm runs at every setting; docs/results.md reports how it was used):

    python jobs/compare_losses.py --arms vft_continued,rft,aft_bc,dpo --seeds 3 --base-seed 0 \
        --bases runs/compare --grid train.lr=3e-4,1e-3 --grid loss.bc_margin=0.1,0.3 --out runs/grid
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aftray.run.console import quiet_ray_data, setup_logging  # noqa: E402


def main() -> int:
    setup_logging()  # before Ray is imported: it reads the log settings then
    from aftray.experiments.compare import ARMS, PAPER_ARMS, run_comparison
    from aftray.experiments.report import update_results_page

    quiet_ray_data()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/arith_compare.yaml")
    parser.add_argument("--arms", default=",".join(PAPER_ARMS), help=f"comma list of: {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--base-per-seed", action="store_true",
                        help="train a VFT base per seed (default: one base shared by all seeds, as in the paper)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="run every arm at each value (repeatable: the cartesian product)")
    parser.add_argument("--bases", help="folder of the VFT base runs (default: --out), to share them")
    parser.add_argument("--base-seed", type=int, help="the shared base's seed (default: the first seed)")
    parser.add_argument("--results-md", help="refresh the generated section of this markdown page")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    grid = {}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            parser.error(f"--grid {item!r}: expected KEY=V1,V2,...")
        grid[key] = values.split(",")
    result = run_comparison(args.config, args.arms.split(","), [int(s) for s in args.seeds.split(",")], args.out,
                            args.overrides, shared_base=not args.base_per_seed, grid=grid,
                            bases_dir=args.bases, base_seed=args.base_seed)
    if args.results_md:
        update_results_page(result, Path(args.out), Path(args.results_md), " ".join(["python", *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
