"""Adapter files: atomic writes, strict loading, clear errors for corrupted or mismatched files."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cptune
from cptune import CPTConfig
from cptune.cpt.files import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, read_config
from cptune.cpt.saving import MANIFEST_NAME, IncompleteSaveError
from tiny import tiny_model


@pytest.fixture
def saved(context, tmp_path):
    model = cptune.get_cpt_model(tiny_model("llama"), context.to_config())
    with torch.no_grad():
        model.prompt_encoder.delta.normal_(0, 0.01)
        model.project_()
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return path


def test_folder_holds_exactly_peft_files_plus_state_and_manifest(saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, MANIFEST_NAME])
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    assert cfg["inference_mode"] is True and cfg["peft_type"] == "CPT" and list(cfg) == sorted(cfg)


def test_save_over_an_existing_adapter_keeps_other_files(saved, context):
    (saved / "notes.txt").write_text("mine")
    model = cptune.get_cpt_model(tiny_model("llama"), context.to_config())
    model.save_pretrained(saved)
    assert (saved / "notes.txt").read_text() == "mine"
    loaded = cptune.CPTModel.from_pretrained(tiny_model("llama"), saved)
    assert torch.equal(loaded.prompt_encoder.delta, torch.zeros_like(loaded.prompt_encoder.delta))  # the new one
    assert not [p for p in saved.iterdir() if p.name.startswith(".")]  # no temporary left


def test_failed_save_leaves_the_old_folder(saved, context, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = cptune.get_cpt_model(tiny_model("llama"), context.to_config())

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cptune.cpt.files.safetensors_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:50]), ValueError, "safetensors"),
        (lambda p: (p / STATE_NAME).write_bytes(b"\x00" * 10), ValueError, "safetensors"),
        (lambda p: (p / CONFIG_NAME).write_text("{not json"), ValueError, "not valid JSON"),
        (lambda p: (p / CONFIG_NAME).write_text("[1, 2]"), ValueError, "JSON object"),
        (lambda p: (p / CONFIG_NAME).unlink(), FileNotFoundError, CONFIG_NAME),
        (lambda p: (p / WEIGHTS_NAME).unlink(), FileNotFoundError, WEIGHTS_NAME),
        (lambda p: (p / CONFIG_NAME).write_text((p / CONFIG_NAME).read_text().replace('"CPT"', '"LORA"')),
         ValueError, "'LORA'"),
        (lambda p: (p / CONFIG_NAME).write_text((p / CONFIG_NAME).read_text().replace(
            '"opt_loss_decay_factor": 1.0', '"opt_loss_decay_factor": 7')), ValueError, "opt_loss_decay_factor"),
    ],
)
def test_corrupted_files_give_clear_errors(saved, corrupt, error, match):
    corrupt(saved)
    # cptune's own folder: the manifest catches the change before any file is parsed
    with pytest.raises(IncompleteSaveError, match="does not match|is missing"):
        cptune.CPTModel.from_pretrained(tiny_model("llama"), saved)
    # a folder without a manifest (as PEFT writes them): the readers' own errors
    (saved / MANIFEST_NAME).unlink()
    with pytest.raises(error, match=match):
        cptune.CPTModel.from_pretrained(tiny_model("llama"), saved)


def test_wrong_base_model_is_refused(saved):
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="differ"):
        cptune.CPTModel.from_pretrained(other, saved)


def test_other_hidden_size_is_refused(saved):
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config
    from tiny import tiny_tokenizer as tt

    cfg = tiny_config("llama", len(tt()))
    cfg.hidden_size = 48
    with pytest.raises(ValueError, match="hidden size"):
        cptune.CPTModel.from_pretrained(AutoModelForCausalLM.from_config(cfg), saved)


def test_token_ids_out_of_vocabulary_are_refused(saved):
    data = json.loads((saved / CONFIG_NAME).read_text())
    data["cpt_token_ids"][0] = 10_000
    (saved / CONFIG_NAME).write_text(json.dumps(data))
    (saved / MANIFEST_NAME).unlink()  # edited by hand, as a PEFT folder could be
    with pytest.raises(ValueError, match="vocabulary"):
        cptune.CPTModel.from_pretrained(tiny_model("llama"), saved)


def test_resume_from_loaded_adapter_keeps_training(saved, queries):
    model = cptune.CPTModel.from_pretrained(tiny_model("llama"), saved, is_trainable=True)
    before = model.prompt_encoder.delta.detach().clone()
    cptune.train(model, queries, cptune.TrainSettings(steps=2, lr=1e-2), progress=False)
    assert not torch.equal(before, model.prompt_encoder.delta.detach())
    frozen = cptune.CPTModel.from_pretrained(tiny_model("llama"), saved)
    assert not frozen.prompt_encoder.delta.requires_grad and not frozen.training


def test_context_longer_than_the_model_is_refused(tok):
    long_text = " ".join(["film"] * 600)
    context = cptune.build_context([(long_text, "a")], cptune.Template(), tok, {"a": "yes"})
    with pytest.raises(ValueError, match="positions"):
        cptune.get_cpt_model(tiny_model("gpt2"), context.to_config())


def test_context_plus_query_too_long_is_refused_in_training_and_scoring(tok):
    from cptune.scoring import query_token_ids, score_texts
    from cptune.text.template import label_token_ids

    base = tiny_model("gpt2")  # 512 positions
    context = cptune.build_context([(" ".join(["film"] * 100), "a")], cptune.Template(), tok, {"a": "yes"})
    model = cptune.get_cpt_model(base, context.to_config())
    batch = cptune.render_queries([(" ".join(["film"] * 200), "a")], cptune.Template(), tok, {"a": "yes"})
    with pytest.raises(ValueError, match=r"plus query \(\d+ tokens\) exceeds the model's 512 positions"):
        model(**batch)
    # scoring: the longest text that fits scores; one word more is refused (GPT-2 would raise IndexError)
    embeds = model.context_embeddings().detach()
    label_inputs = len(label_token_ids(cptune.Template(), tok, {"a": "yes"})["a"]) - 1  # the last is only predicted
    fits = max(n for n in range(1, 400) if len(context) + len(
        query_token_ids([" ".join(["film"] * n)], cptune.Template(), tok)[0]) + label_inputs <= 512)
    scores = score_texts(base, tok, cptune.Template(), {"a": "yes"}, [" ".join(["film"] * fits)], embeds)
    assert scores.shape == (1, 1)
    with pytest.raises(ValueError, match=r"text 1 needs 51[3-9] positions .* more than the model.s 512"):
        score_texts(base, tok, cptune.Template(), {"a": "yes"}, ["short", " ".join(["film"] * (fits + 1))], embeds)


FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.floats(allow_nan=True),
                         st.text(max_size=5), st.lists(st.integers(-2, 12), max_size=6),
                         st.lists(st.text(max_size=2), max_size=3), st.dictionaries(st.text(max_size=3), st.integers()))
FIELDS = ["cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type", "opt_loss_decay_factor",
          "opt_projection_epsilon", "opt_projection_format_epsilon", "task_type", "peft_type", "num_virtual_tokens"]


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUES, max_size=6))
def test_config_json_fuzz_valid_or_documented_error(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg")
    (path / CONFIG_NAME).write_text(json.dumps({"peft_type": "CPT", **data}, default=str))
    try:
        cfg = read_config(path)
    except ValueError:
        return
    # every invariant holds for what was accepted
    n = len(cfg.cpt_token_ids)
    assert n == len(cfg.cpt_mask) == len(cfg.cpt_tokens_type_mask) == cfg.num_virtual_tokens >= 1
    assert cfg.opt_weighted_loss_type in ("none", "decay") and 0 < cfg.opt_loss_decay_factor <= 1
    assert cfg.opt_projection_epsilon >= 0 and cfg.opt_projection_format_epsilon >= 0
    assert CPTConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
