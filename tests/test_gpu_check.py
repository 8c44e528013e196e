"""scripts/gpu_check.py on this machine (the CPU without a GPU), as on a bare CUDA-torch machine: Ray, DeepSpeed,
vLLM and pyarrow made unimportable. Every torch check must PASS, so the GPU check cannot rot unnoticed."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCH_CHECKS = ("bf16_scores", "bf16_losses", "train_steps", "hf_engine", "weight_push")
BARE = ("import runpy, sys\n"
        "for m in ('ray', 'deepspeed', 'vllm', 'pyarrow'): sys.modules[m] = None  # import m raises ImportError\n"
        "sys.argv = ['scripts/gpu_check.py', '--no-job']\n"
        "runpy.run_path('scripts/gpu_check.py', run_name='__main__')\n")


def test_gpu_check_torch_checks_pass_without_ray_deepspeed_vllm():
    p = subprocess.run([sys.executable, "-c", BARE], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = p.stdout.splitlines()
    status = {ln.split()[1].rstrip(":"): ln.split()[0] for ln in lines if ln.startswith(("PASS", "FAIL", "SKIP"))}
    assert p.returncode == 0 and all(status.get(n) == "PASS" for n in TORCH_CHECKS), p.stdout + p.stderr[-3000:]
    assert status.get("gsm8k_job") == "SKIP"
    assert lines[0].startswith(("device cpu: no CUDA GPU", "device cuda:"))  # the header says where they ran
