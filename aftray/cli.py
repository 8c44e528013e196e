"""`aftray run|eval|sample`: the command line. `jobs/aft_gsm8k.py` is the same `run` with a default preset."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from aftray.config import ConfigError, InputError, load_config
from aftray.run.console import log_to_file, quiet_ray_data, setup_logging

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def default_preset() -> Path:
    """The GPU preset when GPUs and vLLM are present, else the CPU one (architecture.md)."""
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        pass
    has_vllm = importlib.util.find_spec("vllm") is not None
    return CONFIGS / ("gsm8k_gpu.yaml" if has_gpu and has_vllm else "words_cpu.yaml")


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(argv)
    except InputError as err:  # the user's to fix (a config key, a model path, a data file): no traceback
        kind = "config error" if isinstance(err, ConfigError) else "error"
        sys.exit(f"{kind}: {' '.join(str(err).split())}")


def run_command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="aftray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the AFT loop (offline or online) from a preset")
    run.add_argument("config", nargs="?", help="YAML preset (default: GPU preset if GPUs+vLLM, else CPU)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5")
    ev = sub.add_parser("eval", help="evaluate a checkpoint (greedy accuracy, pass@k, maj@k) on a task")
    ev.add_argument("checkpoint", help="HF folder, e.g. runs/<name>/rounds/<r>/checkpoint")
    ev.add_argument("--config", help="preset for task/rollout settings (default: CPU preset)")
    ev.add_argument("overrides", nargs="*")
    sample = sub.add_parser("sample", help="print k sampled COTs for a few questions, with their labels")
    sample.add_argument("checkpoint")
    sample.add_argument("--config")
    sample.add_argument("--questions", type=int, default=3)
    sample.add_argument("overrides", nargs="*")
    # overrides may also follow the options (`sample ckpt --questions 2 rollout.k=3`), where argparse leaves them
    args, rest = parser.parse_known_args(argv)
    if any("=" not in a for a in rest):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides += rest
    setup_logging()
    # `aftray run key=value` without a preset: argparse puts the first override in `config`
    if args.command == "run" and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    config = args.config or default_preset()
    cfg = load_config(config, args.overrides)
    # Ray, torch and the loop load only now: a bad config or a typo in a key fails in well under a second; a
    # missing model or data file fails before Ray starts (the task and the model are read first)
    from aftray import commands
    from aftray.loop.rounds import run_loop

    quiet_ray_data()
    log_to_file(cfg.run_dir / "run.log" if args.command == "run"
                else Path(cfg.output_dir).absolute() / f"{args.command}.log")
    if args.command == "run":
        run_loop(cfg)
    elif args.command == "eval":
        commands.evaluate_checkpoint(cfg, args.checkpoint)
    else:
        commands.sample_checkpoint(cfg, args.checkpoint, args.questions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
