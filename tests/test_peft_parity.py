"""Parity with the reference implementation, peft==0.21.2: loss, gradient, training, adapter files."""

import copy
import warnings

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

import cptune
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
