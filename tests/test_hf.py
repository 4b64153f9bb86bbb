"""Hugging Face interop: llmopt logits equal `transformers.LlamaForCausalLM`'s on the same weights."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmopt.models import ModelConfig, build_model  # noqa: E402
from llmopt.models.hf import (config_from_hf, config_to_hf, from_hf, state_dict_from_hf,  # noqa: E402
                              state_dict_to_hf, to_hf)

CASES = {
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-untied-theta500k": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "head-dim-12-tied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True),
    "mha-theta10k-eps1e-6": dict(num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def hf_llama(seed: int = 0, **overrides):
    """A tiny random `LlamaForCausalLM`, every weight (norms included) drawn from N(0, 0.1) around its init."""
    values = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64,
                  num_attention_heads=4, num_key_value_heads=2, hidden_act="silu")
    values.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def idx(vocab: int = 97, T: int = 23):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_from_hf_logits_match_transformers(case):
    hf = hf_llama(**CASES[case])
    model = from_hf(hf).eval()
    x = idx()
    expected = hf(x).logits
    got = model(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    assert (model.lm_head.weight is model.embed_tokens.weight) == model.config.tie_embeddings
    # a copy, not a view: changing the llmopt model leaves transformers' untouched
    model.norm.weight.add_(1.0)
    assert not torch.equal(model.norm.weight, hf.model.norm.weight)


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_round_trip_state_dicts_equal(case):
    hf = hf_llama(**CASES[case])
    back = to_hf(from_hf(hf))
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    x = idx()
    assert torch.equal(back(x).logits, hf(x).logits)


@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_to_hf_from_llmopt_model(tie):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny", tie_embeddings=tie, head_dim=12, rope_theta=500000.0)).eval()
    hf = to_hf(model)
    x = idx(vocab=256)
    assert (hf(x).logits - model(x)).abs().max().item() < 1e-5
    assert config_from_hf(config_to_hf(model.config)).to_dict() == {**model.config.to_dict(), "name": "hf-llama"}


def test_state_dict_name_mapping():
    sd = {"model.embed_tokens.weight": 1, "model.layers.3.self_attn.q_proj.weight": 2, "model.norm.weight": 3,
          "lm_head.weight": 4, "model.layers.0.self_attn.rotary_emb.inv_freq": 5}
    ours = state_dict_from_hf(sd)
    assert ours == {"embed_tokens.weight": 1, "layers.3.self_attn.q_proj.weight": 2, "norm.weight": 3,
                    "lm_head.weight": 4}
    assert state_dict_to_hf(ours) == {k: v for k, v in sd.items() if "inv_freq" not in k}
    with pytest.raises(ValueError, match="unexpected key 'score.weight'"):
        state_dict_from_hf({"score.weight": 1})


def test_config_from_plain_dicts_both_rope_styles():
    base = dict(model_type="llama", vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-6)
    old = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": None, "tie_word_embeddings": True})
    new = config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.head_dim == 8 and old.n_kv_head == 2 and old.max_seq_len == 512 and old.tie_embeddings
    assert not new.tie_embeddings
    mistral = config_from_hf({**base, "model_type": "mistral", "sliding_window": None})
    assert mistral.n_layer == 3


@pytest.mark.parametrize("bad, match", [
    (dict(model_type="qwen2"), "unsupported model_type 'qwen2'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope scaling 'llama3'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling 'linear'"),
    (dict(model_type="mistral", sliding_window=16), "sliding_window=16"),
])
def test_unsupported_configs_are_refused(bad, match):
    cfg = dict(model_type="llama", vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64)
    cfg.update(bad)
    with pytest.raises(ValueError, match=match) as info:
        config_from_hf(cfg)
    assert "\n" not in str(info.value)


def test_unsupported_transformers_config_object_refused():
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf(transformers.LlamaConfig(attention_bias=True))
    with pytest.raises(ValueError, match="qwen2"):
        config_from_hf(transformers.Qwen2Config())


@torch.no_grad()
def test_hf_directory_loads_with_equal_logits(tmp_path):
    from llmopt.models import load_pretrained

    hf = hf_llama(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _write_tokenizer_json(tmp_path, vocab=97)
    assert (tmp_path / "model.safetensors").is_file()
    model, tokenizer = load_pretrained(tmp_path)
    x = idx()
    assert (model(x) - hf(x).logits).abs().max().item() < 1e-5
    assert model.lm_head.weight is model.embed_tokens.weight
    assert tokenizer.encode("a b") == [1, 2]
    # untied, in bfloat16
    hf = hf_llama(seed=3, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "untied")
    _write_tokenizer_json(tmp_path / "untied", vocab=97)
    model, _ = load_pretrained(tmp_path / "untied", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight is not model.embed_tokens.weight
    assert (model(x).float() - hf(x).logits).abs().max().item() < 0.5


def test_hf_directory_with_unsupported_config_is_refused(tmp_path):
    from llmopt.models import load_pretrained

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'qwen2'"):
        load_pretrained(tmp_path)


def _write_tokenizer_json(directory, vocab: int):
    """A word-level tokenizer: 'a' -> 1, 'b' -> 2, ...; enough for a loader test."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    words.update({f"w{i}": i for i in range(27, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
