"""Compare losses on one preset over several seeds, compute-matched (see aftray/experiments/compare.py).

A pre-registered experiment: its preset, overrides, arms, seeds, task seeds, contrasts, primary test and α come
from its declaration (aftray/experiments/declaration.py), committed before the command runs; the comparison
refuses to pool runs of another experiment that the declaration does not name under `reuse`:

    python jobs/compare_losses.py --declaration configs/experiments/testbed.yaml --out runs/testbed \
        --results-md docs/results.md

Ad hoc (not pre-registered: p-values exploratory, nothing marked resolved):

    python jobs/compare_losses.py --config configs/arith_compare.yaml \
        --arms vft_continued,rft,aft_bc --seeds 0,1,2 --out runs/compare [key=value ...]

Writes <out>/comparison.json, comparison.md and plots/, and logs one MLflow parent run with a child run per arm
and seed. `--results-md docs/results.md` also refreshes the generated part of that page; with
`--results-section NAME`, its own section (markers `<!-- generated:NAME:start/end -->`, assets in
docs/results/NAME/), so one page holds several experiments.

Seeds spread over several generated tasks (arith only; seed i runs on task seed i mod their number, each task
seed with its own VFT base) add a task-level test beside the per-seed one; without a declaration the contrasts
are every arm vs VFT-continued and vs its start, aft_bc vs rft, and `--contrast A:B` (B may be `start`):

    python jobs/compare_losses.py --arms vft_continued,rft,aft_bc --seeds 0,1,2,3,4,5 --task-seeds 0,1,2 \
        --contrast aft_bc:aft_dc --out runs/compare_tasks --results-md docs/results.md --results-section tasks

A later experiment that pairs new arms with an earlier one's runs (E2: VFT-continued at lower learning rates,
declared as `variants`, against E1's AFT-BC; its declaration names e1 under `reuse`):

    python jobs/compare_losses.py --declaration configs/experiments/e2.yaml --bases runs/e1 --out runs/e2

A shared hyper-parameter grid (every arm runs at every setting; docs/results.md reports how it was used):

    python jobs/compare_losses.py --arms vft_continued,rft,aft_bc,dpo --seeds 3 --base-seed 0 \
        --bases runs/compare --grid train.lr=3e-4,1e-3 --grid loss.bc_margin=0.1,0.3 --out runs/grid
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aftray.run.console import log_to_file, quiet_ray_data, setup_logging  # noqa: E402


def int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def main() -> int:
    setup_logging()  # before Ray is imported: it reads the log settings then
    from aftray.experiments.compare import ARMS, PAPER_ARMS, run_comparison
    from aftray.experiments.declaration import load_declaration
    from aftray.experiments.report import markers, update_results_page

    quiet_ray_data()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--declaration", help="the experiment's pre-registration (YAML); it sets --config, "
                        "--arms, --seeds, --task-seeds, --contrast and the overrides")
    parser.add_argument("--config", help="default: configs/arith_compare.yaml")
    parser.add_argument("--arms", help=f"comma list of: {', '.join(ARMS)} (default: {','.join(PAPER_ARMS)})")
    parser.add_argument("--seeds", type=int_list, help="default: 0,1,2")
    parser.add_argument("--task-seeds", type=int_list,
                        help="spread the seeds over these task.arith.seed values (default: the preset's task)")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--base-per-seed", action="store_true",
                        help="train a VFT base per seed (default: one base shared by all seeds of a task seed, "
                             "as in the paper)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="run every arm at each value (repeatable: the cartesian product)")
    parser.add_argument("--bases", help="folder of the VFT base runs (default: --out), to share them; with a "
                        "declaration whose `reuse` names their experiment, also its finished arm runs of the same "
                        "name and config (paired, not re-run)")
    parser.add_argument("--base-seed", type=int, help="the shared bases' seed (default: the first seed)")
    parser.add_argument("--contrast", action="append", default=[], metavar="A:B",
                        help="also report arm A minus arm B, paired by seed (repeatable)")
    parser.add_argument("--results-md", help="refresh the generated section of this markdown page")
    parser.add_argument("--results-section", metavar="NAME",
                        help="the page's section NAME (default: its unnamed section)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    grid = {}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            parser.error(f"--grid {item!r}: expected KEY=V1,V2,...")
        grid[key] = values.split(",")
    contrasts = [tuple(item.split(":")) for item in args.contrast]
    if any(len(c) != 2 or not all(c) for c in contrasts):
        parser.error(f"--contrast {args.contrast}: expected A:B, two arms (or an arm and start)")
    declaration = None
    if args.declaration:
        fixed = [f"--{k.replace('_', '-')}" for k in ("config", "arms", "seeds", "task_seeds", "contrast", "grid",
                                                       "base_per_seed", "base_seed")
                 if getattr(args, k) not in (None, False, [], "")] + (["key=value overrides"] if args.overrides else [])
        if fixed:
            parser.error(f"--declaration fixes {', '.join(fixed)}: change the declaration (a new one, if its "
                         "runs have started) instead")
        try:
            declaration = load_declaration(args.declaration)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        args.config, args.arms, args.seeds = declaration.config, ",".join(declaration.arms), declaration.seeds
        args.task_seeds, args.overrides = declaration.task_seeds, declaration.overrides
    args.config = args.config or "configs/arith_compare.yaml"
    args.arms = args.arms or ",".join(PAPER_ARMS)
    args.seeds = args.seeds or [0, 1, 2]
    if args.results_section and not args.results_md:
        parser.error("--results-section needs --results-md")
    try:
        markers(args.results_section)  # a bad name fails now, not after the runs
    except ValueError as e:
        parser.error(str(e))
    log_to_file(Path(args.out) / "compare.log")  # before Ray starts: its workers log there too
    result = run_comparison(args.config, args.arms.split(","), args.seeds, args.out, args.overrides,
                            shared_base=not args.base_per_seed, grid=grid, bases_dir=args.bases,
                            base_seed=args.base_seed, task_seeds=args.task_seeds, contrasts=contrasts,
                            declaration=declaration)
    if args.results_md:
        update_results_page(result, Path(args.out), Path(args.results_md), " ".join(["python", *sys.argv]),
                            args.results_section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
