"""Every GPU check this machine can run, one line each: `PASS name: detail`, `FAIL name: ...`, `SKIP name: why`.

    bash scripts/gpu_check.sh [--with-job] [--no-job]     # exit 1 when a check FAILs; <= 8 min on one GPU

The torch checks need torch, transformers and yaml only (no Ray, DeepSpeed, vLLM, pyarrow, network): COT scores
and every objective of aftray.train.losses in bf16 autocast against fp32, AdamW steps of a tiny model with
gradient checkpointing, the HF engine generating and scoring, a trained state dict pushed into that engine.
Without a GPU they run on the CPU (the header says so; tests/test_gpu_check.py runs them there). With CUDA, Ray,
DeepSpeed and vLLM (or --with-job) a one-round GSM8K job on the GPU preset runs too.
"""
import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402

import aftray  # noqa: E402,F401

# aftray.rollout's __init__ imports the Ray pool; the engine modules need only torch: load them without it
sys.modules.setdefault("aftray.rollout", types.ModuleType("aftray.rollout")).__path__ = [str(REPO / "aftray/rollout")]
from aftray.config import LossConfig, RolloutConfig, TinyModelConfig  # noqa: E402
from aftray.models import build_tiny_model, load_model, load_tokenizer  # noqa: E402
from aftray.rollout.engine import SamplingParams  # noqa: E402
from aftray.rollout.hf_engine import HFEngine  # noqa: E402
from aftray.train.losses import OBJECTIVES  # noqa: E402
from aftray.train.scores import collate_groups, score_groups, sequence_logps, token_logps  # noqa: E402

try:
    from aftray.rows import group_row  # checks the row against the schema; needs pyarrow
except ImportError:
    def group_row(**columns):
        return columns

TOL = 0.05  # nats per token, bf16 against fp32 (tests/test_vllm.py::test_cuda_build bounds vLLM alike)


class Skip(Exception):
    pass


def need(cond, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def group_rows(tok) -> list[dict]:
    """Group rows (docs/internals.md): three mixed groups and one all right."""
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    rows = []
    for a, b in [(2, 3), (7, 4), (5, 5), (9, 1)]:
        right, prompt = f"{a}+{b}={a + b}\n#### {a + b}", f"Q: {a}+{b}?\nA:"
        cots = [right, f"{b}+{a}={a + b}\n#### {a + b}"] if a == 9 else \
            [right, f"{a}+{b}={a + b + 1}\n#### {a + b + 1}", f"{a} plus {b} is hard"]
        ok, cot_ids, k = [c.endswith(f"#### {a + b}") for c in cots], [ids(c) for c in cots], len(cots)
        rows.append(group_row(
            id=f"q{a}{b}", prompt=prompt, prompt_ids=tok(prompt)["input_ids"], answer=str(a + b), ref_cot=right,
            ref_cot_ids=ids(right), cots=cots, cot_ids=cot_ids, sample_logp=[-4.0 * len(x) for x in cot_ids],
            sample_token_logp=[[-4.0] * len(x) for x in cot_ids], finish_reasons=["stop"] * k,
            pred=[x.split("#### ")[-1] for x in cots], labels=["correct" if r else "wrong_answer" for r in ok],
            correct=ok, process=[math.nan] * k, rank=[1 if r else 2 for r in ok], counts=[1] * k, num_sampled=k,
            weights_version=0))
    return rows


def per_token(a, b, n) -> float:
    """Largest |a - b| / tokens over sequences (a, b: summed log-probs of n tokens)."""
    return max(abs(float(x) - float(y)) / max(int(k), 1) for x, y, k in zip(a, b, n, strict=True))


def batch_of(c, **kw):
    return collate_groups(c.rows, 128, pad_id=c.tok.pad_token_id, **kw).to(c.dev)


def check_bf16_scores(c):
    model, batch, packed = load_model(c.path).to(c.dev).eval(), batch_of(c), batch_of(c, packed=True)
    with torch.no_grad():
        t32, p32 = token_logps(model, batch), token_logps(model, packed)
        s32, sp = batch.label_seq, packed.label_seq
        shared = sequence_logps(model, batch_of(c, shared_prefix=True))  # the 4D-mask layout on this device
        with torch.autocast(c.dev.type, dtype=torch.bfloat16):
            t16 = token_logps(model, batch)
        shared_diff = (shared - sequence_logps(model, batch)).abs().max().item()
    diff = (t16 - t32).abs()
    packed_diff = (p32[sp.argsort(stable=True)] - t32[s32.argsort(stable=True)]).abs().max().item()
    need(diff.mean() < TOL, f"bf16 log-probs off by {diff.mean():.4f} nats/token on average")
    need(packed_diff < 1e-3, f"packed vs padded fp32 log-probs differ by {packed_diff:.1e}")
    need(shared_diff < 1e-3, f"shared-prefix vs padded fp32 sequence scores differ by {shared_diff:.1e}")
    return (f"{len(t32)} tokens, |bf16-fp32| log-prob mean {diff.mean():.4f} max {diff.max():.4f}; "
            f"|packed-padded| fp32 max {packed_diff:.1e}; |shared-padded| fp32 max {shared_diff:.1e}")


def check_bf16_losses(c):
    model, batch = load_model(c.path).to(c.dev).train(), batch_of(c)
    s32 = score_groups(model, batch)
    with torch.autocast(c.dev.type, dtype=torch.bfloat16):
        s16 = score_groups(model, batch)
    worst = (0.0, "")
    for name, fn in OBJECTIVES.items():
        (l32, _), (l16, _) = fn(LossConfig(name=name), s32), fn(LossConfig(name=name), s16)
        grads = torch.autograd.grad(l16, list(model.parameters()), retain_graph=True, allow_unused=True)
        need(all(g is None or bool(torch.isfinite(g).all()) for g in grads), f"{name}: non-finite bf16 gradient")
        need(abs(l16.item() - l32.item()) < TOL * max(1.0, abs(l32.item())), f"{name}: bf16 {l16.item():.4f} "
             f"vs fp32 {l32.item():.4f}")
        worst = max(worst, (abs(l16.item() - l32.item()), name))
    return f"{len(OBJECTIVES)} objectives, max |bf16-fp32| {worst[0]:.1e} ({worst[1]}), bf16 gradients finite"


def check_train_steps(c, steps: int = 8):
    """aft_bc, AdamW, gradient checkpointing on (bf16 autocast on a GPU); its gradient against the plain one."""
    plain, model = load_model(c.path).to(c.dev).train(), load_model(c.path, gradient_checkpointing=True)
    model = model.to(c.dev).train()
    need(model.is_gradient_checkpointing and not model.config.use_cache, "gradient checkpointing is off")
    batch, cfg = batch_of(c), LossConfig(name="aft_bc")

    def loss_of(m):
        return OBJECTIVES["aft_bc"](cfg, score_groups(m, batch))[0]

    ckpt = max((a - b).abs().max().item() for a, b in zip(
        *(torch.autograd.grad(loss_of(m), [m.model.layers[0].mlp.up_proj.weight]) for m in (model, plain))))
    need(ckpt < 1e-5, f"checkpointed gradient differs from the plain one by {ckpt:.1e}")
    opt, losses = torch.optim.AdamW(model.parameters(), lr=1e-3), []
    for _ in range(steps):
        with torch.autocast(c.dev.type, dtype=torch.bfloat16, enabled=c.dev.type == "cuda"):
            loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    need(losses[-1] < losses[0] - 0.1, f"loss did not go down: {[round(x, 3) for x in losses]}")
    c.trained = model.eval()
    return f"{steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; checkpointed vs plain gradient {ckpt:.1e}"


def engine(c):
    if c.engine is None:
        c.engine = HFEngine(c.path, RolloutConfig(resources_per_actor={"CPU": torch.get_num_threads(),
                                                                       "GPU": float(c.dev.type == "cuda")}))
    return c.engine


def check_hf_engine(c):
    e, prompts = engine(c), [r["prompt_ids"] for r in c.rows[:2]]
    need(e.device.type == c.dev.type, f"engine on {e.device}, expected {c.dev}")
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=7)
    out, again = e.generate(prompts, params), e.generate(prompts, params)
    cots = [x.token_ids for x in out[0]]
    need([x.token_ids for x in again[0]] == cots, "the same seeds sampled other COTs")
    d = per_token([sum(x.logprobs) for x in out[0]], e.score([prompts[0]] * len(cots), cots), map(len, cots))
    need(d < (TOL if c.dev.type == "cuda" else 1e-3), f"sampling vs scoring log-probs differ by {d:.4f}/token")
    return f"{sum(map(len, cots))} tokens sampled on {e.device}, |sampled-scored| log-prob {d:.1e}/token max"


def check_weight_push(c):
    if c.trained is None:
        raise Skip("train_steps left no trained model")
    e, pairs = engine(c), [(r["prompt_ids"], cot) for r in c.rows for cot in r["cot_ids"]]
    with torch.no_grad():
        mine, n = sequence_logps(c.trained, batch_of(c, with_ref=False)).tolist(), [len(x) for _, x in pairs]
    before = per_token(e.score(*zip(*pairs)), mine, n)
    e.update_weights({k: v.detach() for k, v in c.trained.state_dict().items()}, 1)
    after = per_token(e.score(*zip(*pairs)), mine, n)
    need(e.version == 1 and after < (TOL if c.dev.type == "cuda" else 1e-4) < before,
         f"engine vs trainer {after:.4f} nats/token after the push ({before:.4f} before)")
    return f"{len(pairs)} COTs, |engine-trainer| log-prob {after:.1e}/token max after the push ({before:.3f} before)"


def local_model() -> str | None:
    """$AFTRAY_GPU_CHECK_MODEL, else SmolLM2 from the hub cache or converted from its GGUF (no network)."""
    from huggingface_hub import snapshot_download

    from aftray.models import cache_dir

    try:
        return os.environ.get("AFTRAY_GPU_CHECK_MODEL") or snapshot_download(
            "HuggingFaceTB/SmolLM2-135M-Instruct", local_files_only=True)
    except Exception:  # noqa: BLE001 -- not in the hub cache
        path = cache_dir() / "HuggingFaceTB--SmolLM2-135M-Instruct"
        return str(path) if (path / "config.json").is_file() else None


def check_gsm8k_job(c):
    missing = [m for m in ("ray", "deepspeed", "vllm") if importlib.util.find_spec(m) is None]
    if c.args.no_job or not (c.args.with_job or (c.dev.type == "cuda" and not missing)):
        raise Skip("needs CUDA, Ray, DeepSpeed and vLLM, or --with-job" + (f" (missing {', '.join(missing)})"
                                                                          if missing else ""))
    data, model = Path(os.environ.get("AFTRAY_DATA_DIR") or REPO.parent / "shared/data"), local_model()
    if not (data / "gsm8k").is_dir() or model is None:
        raise Skip(f"no local {'GSM8K ($AFTRAY_DATA_DIR)' if model else 'SmolLM2 ($AFTRAY_GPU_CHECK_MODEL)'}")
    out, gpu = Path(c.tmp) / "runs", c.dev.type == "cuda"
    cmd = [sys.executable, "jobs/aft_gsm8k.py", "--config", f"configs/{'gsm8k_gpu' if gpu else 'words_cpu'}.yaml",
           f"output_dir={out}", "run_name=gpu_check", f"model.name_or_path={model}", "loop.rounds=1",
           "task.num_train=64", "task.num_test=50", "loop.questions_per_round=32",
           "tracking.experiment=null", "cluster.precheck_timeout_s=0"]
    if gpu:  # samplers and trainer share the one GPU
        cmd += ["loop.overlap=false", "rollout.num_actors=1", "rollout.k=4",
                "rollout.resources_per_actor={CPU: 1, GPU: 0.45, rollout: 0}",
                "rollout.vllm.gpu_memory_utilization=0.3", "rollout.max_new_tokens=256",
                "train.num_workers=1", "train.resources_per_worker={CPU: 1, GPU: 0.45, trainer: 0}",
                "train.questions_per_step=16"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=c.args.job_timeout)
    tail = [ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip()][-3:]
    need(p.returncode == 0 and (out / "gpu_check/summary.json").is_file(), f"rc {p.returncode}: {' | '.join(tail)}")
    return next((ln for ln in reversed(tail) if "accuracy" in ln), tail[-1])


CHECKS = [("bf16_scores", check_bf16_scores), ("bf16_losses", check_bf16_losses), ("train_steps", check_train_steps),
          ("hf_engine", check_hf_engine), ("weight_push", check_weight_push), ("gsm8k_job", check_gsm8k_job)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--with-job", action="store_true", help="run the GSM8K job without a GPU too")
    ap.add_argument("--no-job", action="store_true", help="skip the GSM8K job")
    ap.add_argument("--job-timeout", type=int, default=270, help="seconds")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if dev.type == "cuda" else \
        "no CUDA GPU, the torch checks run on the CPU"
    print(f"device {dev.type}: {where}; torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="aftray-gpu-check-") as tmp:
        path = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=2, seed=0),
                                Path(tmp))
        tok = load_tokenizer(path)
        c = types.SimpleNamespace(args=args, dev=dev, tmp=tmp, path=path, tok=tok, rows=group_rows(tok),
                                  trained=None, engine=None)
        for name, fn in CHECKS:
            start = time.monotonic()
            try:
                status, detail = "PASS", fn(c)
            except Skip as e:
                status, detail = "SKIP", str(e)
            except Exception as e:  # noqa: BLE001 -- reported; the other checks still run
                traceback.print_exc(file=sys.stderr)
                status, detail = "FAIL", f"{type(e).__name__}: {e}"
            failed += status == "FAIL"
            took = "" if status == "SKIP" else f" ({time.monotonic() - start:.1f} s)"
            print(f"{status} {name}: {detail}{took}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
