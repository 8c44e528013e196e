"""The main job: AFT on GSM8K (online rounds by default; `loop.mode=offline` for the paper's recipe).

    python jobs/aft_gsm8k.py [--config PATH] [key=value ...]
    ray job submit --working-dir . -- python jobs/aft_gsm8k.py --config configs/gsm8k_gpu.yaml

Without --config it picks the GPU preset when GPUs and vLLM are present (GSM8K itself), else
configs/words_cpu.yaml (generated word problems in GSM8K's format, which SmolLM2-135M half-solves: the preset
says why; it was configs/gsm8k_cpu.yaml). Under `ray job submit` it joins the cluster it was submitted to.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's aftray

from aftray import cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: GPU preset if GPUs+vLLM, else words_cpu)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loop.rounds=3")
    args = parser.parse_args()
    return cli.main(["run", str(args.config or cli.default_preset()), *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
