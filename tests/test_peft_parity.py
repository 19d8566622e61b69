"""Parity with the reference implementation, peft==0.21.2: loss, gradient, training, adapter files."""

import copy
import json
import math
import warnings

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

import cptune
from cptune.cpt.roles import TokenRole
from cptune.training import TrainSettings, batch_indices, train
from tiny import ARCHITECTURES, tiny_model

warnings.filterwarnings("ignore", message=".*loss_type.*")
CFG = dict(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.9, opt_projection_epsilon=0.4,
           opt_projection_format_epsilon=0.2)


def _peft_model(base, context):
    cfg = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=context.token_ids.tolist(),
                         cpt_mask=[1] * len(context), cpt_tokens_type_mask=context.type_codes.tolist(), **CFG)
    return get_peft_model(copy.deepcopy(base), cfg)


def _fresh(batch):
    # PEFT shifts input_type_mask in place: give it a fresh clone every call.
    return {k: v.clone() for k, v in batch.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradient_equal_peft(arch, dtype, context, queries):
    base = tiny_model(arch, dtype=dtype)
    theirs = _peft_model(base, context)
    ours = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(**CFG))
    enc = ours.prompt_encoder
    delta = torch.randn_like(enc.delta) * 0.05 * enc.trainable_mask
    with torch.no_grad():
        theirs.prompt_encoder["default"].delta_embedding.weight.copy_(delta)
        enc.delta.copy_(delta)
    theirs.train()
    ours.train()
    out_t = theirs(**_fresh(queries))
    out_t.loss.backward()
    g_t = theirs.prompt_encoder["default"].delta_embedding.weight.grad
    for mode in ("never", "always"):
        ours.prefix_sharing = mode
        enc.delta.grad = None
        out_o = ours(**queries)
        out_o.loss.backward()
        assert torch.allclose(out_o.loss.double(), out_t.loss.double(), rtol=1e-5), mode
        assert (enc.delta.grad - g_t).norm() <= 1e-5 * g_t.norm(), mode


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_twenty_adamw_steps_give_peft_delta(arch, context, queries):
    base = tiny_model(arch)
    settings = TrainSettings(steps=20, batch_size=2, lr=2e-2, weight_decay=0.01, seed=3)
    n = queries["input_ids"].shape[0]

    # PEFT: its own forward projects; a plain loop with the same batches and schedule.
    theirs = _peft_model(base, context)
    theirs.train()
    weight = theirs.prompt_encoder["default"].delta_embedding.weight
    opt = torch.optim.AdamW([weight], lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / settings.steps))
    for step in range(settings.steps):
        rows = batch_indices(n, settings.batch_size, settings.seed, step)
        width = int(queries["attention_mask"][rows].sum(1).max())
        loss = theirs(**{k: v[rows, :width].clone() for k, v in queries.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    peft_delta = theirs.prompt_encoder["default"].get_projection()

    ours = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(**CFG))
    train(ours, queries, settings, progress=False)
    ours_delta = ours.prompt_encoder.delta.detach()
    assert peft_delta.abs().max() > 1e-3  # training moved it
    assert (ours_delta - peft_delta).norm() <= 1e-5 * peft_delta.norm()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_cptune_adapter_loads_in_peft(arch, context, queries, tmp_path):
    base = tiny_model(arch)
    ours = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(**CFG))
    train(ours, queries, TrainSettings(steps=5, batch_size=3, lr=5e-2), progress=False)
    ours.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.eval()
    batch = {"input_ids": queries["input_ids"], "attention_mask": queries["attention_mask"]}
    with torch.no_grad():
        a = ours(**batch).logits
        b = theirs(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_peft_adapter_loads_in_cptune(arch, context, queries, tmp_path):
    base = tiny_model(arch)
    theirs = _peft_model(base, context)
    with torch.no_grad():
        enc = theirs.prompt_encoder["default"]
        enc.delta_embedding.weight.copy_(torch.randn_like(enc.delta_embedding.weight) * 0.05)
    theirs.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.eval()
    ours = cptune.CPTModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = {"input_ids": queries["input_ids"], "attention_mask": queries["attention_mask"]}
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, theirs(**batch).logits)
    assert ours.config.cpt_tokens_type_mask == context.type_codes.tolist()


def test_transformers_trainer_gives_peft_result(context, queries, tmp_path):
    """A Trainer script never calls project_(): the training forward keeps the delta feasible, as PEFT's does."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Rows(Dataset):
        def __len__(self):
            return queries["input_ids"].shape[0]

        def __getitem__(self, i):
            return {k: v[i].clone() for k, v in queries.items()}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=10,
                             learning_rate=2e-2, report_to=[], save_strategy="no", logging_strategy="no", seed=0,
                             data_seed=0, remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    base = tiny_model("llama")
    ours = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(**CFG))
    Trainer(model=ours, args=args, train_dataset=Rows()).train()
    theirs = _peft_model(base, context)
    Trainer(model=theirs, args=args, train_dataset=Rows()).train()
    ours.project_()
    a = ours.prompt_encoder.delta.detach()
    b = theirs.prompt_encoder["default"].get_projection()
    assert b.abs().max() > 1e-3
    assert (a - b).norm() <= 1e-5 * b.norm()


def _trainable_radii_match_peft(ours, folder, base):
    """PEFT, loading ``folder``, computes from the recorded epsilons the radii ``ours`` trained with, and its
    projection of a large correction lands every trainable row on them."""
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder)  # PEFT loads prompt adapters frozen
    enc = theirs.prompt_encoder["default"]
    trainable = ours.prompt_encoder.trainable_mask.squeeze(-1).bool().cpu()
    radii = ours.prompt_encoder.radii.cpu()
    assert torch.allclose(enc.get_epsilon()[trainable], radii[trainable], rtol=1e-6)
    with torch.no_grad():
        enc.delta_embedding.weight.copy_(torch.randn_like(enc.delta_embedding.weight) * 100 * radii.max())
    projected = enc.get_projection().norm(dim=-1)
    assert torch.allclose(projected[trainable], radii[trainable], rtol=1e-5)


@pytest.mark.parametrize("arch, factor", [("llama", 7.0), ("gemma3_text", 1.0), ("qwen2", 0.25)])
def test_relative_radius_is_recorded_as_the_epsilon_peft_applies(arch, factor, context, queries, tmp_path):
    from cptune.cpt.projection import RADIUS_REFERENCE_DIM, REFERENCE_EMBEDDING_SCALE
    from cptune.recipe import CPTRecipe, cpt_model_for, model_embedding_scale

    base = tiny_model(arch)
    with torch.no_grad():  # embeddings of another scale (Gemma's tiny model also multiplies by sqrt(d) itself)
        base.get_input_embeddings().weight.mul_(factor)
    scale = model_embedding_scale(base)
    recipe = CPTRecipe(eps_input=0.4, eps_format=0.2, radius="relative",
                       train=TrainSettings(steps=4, batch_size=3, lr=0.5))  # lr large: rows reach their spheres
    ours = cpt_model_for(copy.deepcopy(base), context, recipe)
    train(ours, queries, recipe.train, progress=False)
    ours.save_pretrained(tmp_path)
    d = base.config.hidden_size
    want = {TokenRole.INPUT_TEXT: 0.4, TokenRole.INPUT_TEMPLATE: 0.2, TokenRole.OUTPUT_TEMPLATE: 0.2}
    roles, radii = ours.prompt_encoder.roles, ours.prompt_encoder.radii
    for role, eps in want.items():  # r_i = eps * (s / s_ref) * sqrt(d / 2048)
        expected = torch.tensor(eps * scale / REFERENCE_EMBEDDING_SCALE * math.sqrt(d / RADIUS_REFERENCE_DIM))
        assert torch.allclose(radii[roles == role], expected, rtol=1e-6), role
    norms = ours.prompt_encoder.delta.detach().norm(dim=-1)
    assert bool((norms <= radii * (1 + 1e-6)).all()) and bool((norms[roles == TokenRole.INPUT_TEXT] > 0).all())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["opt_projection_epsilon"] == pytest.approx(0.4 * scale / REFERENCE_EMBEDDING_SCALE, rel=1e-12)
    _trainable_radii_match_peft(ours, tmp_path, base)


def test_a_relative_radius_classifier_saves_loads_and_loads_in_peft(tiny_dir, tmp_path):
    from cptune.cpt.projection import REFERENCE_EMBEDDING_SCALE
    from cptune.recipe import CPTRecipe, model_embedding_scale

    recipe = CPTRecipe(radius="relative", train=TrainSettings(steps=2, batch_size=2, lr=1e-2))
    clf = cptune.CPTClassifier(str(tiny_dir), template="input: {x} output: {y}", recipe=recipe,
                               labels={"neg": "negative", "pos": "positive"})
    clf.fit(["a joy", "a bore", "great fun", "too long"], ["pos", "neg", "pos", "neg"])
    clf.save(tmp_path / "clf")
    base = clf._base()[0]
    ratio = model_embedding_scale(base) / REFERENCE_EMBEDDING_SCALE
    assert abs(ratio - 1) > 0.1  # the tiny model's scale is not SmolLM2's, so the modes differ here
    config = json.loads((tmp_path / "clf" / "adapter_config.json").read_text())
    assert config["opt_projection_epsilon"] == pytest.approx(0.2 * ratio, rel=1e-12)
    assert config["opt_projection_format_epsilon"] == pytest.approx(0.1 * ratio, rel=1e-12)
    again = cptune.CPTClassifier.load(tmp_path / "clf")
    assert again._recipe().radius == "relative" and again._recipe().eps_input == 0.2  # the recipe as given
    assert torch.equal(again.cpt_model_.prompt_encoder.radii, clf.cpt_model_.prompt_encoder.radii)
    _trainable_radii_match_peft(clf.cpt_model_, tmp_path / "clf", base)
