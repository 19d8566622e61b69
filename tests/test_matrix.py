"""Every feature on every tiny architecture: shapes, training, invariants, files."""

import copy

import pytest
import torch

import cptune
from conftest import DEMOS, LABEL_WORDS, QUERIES, TEMPLATE
from cptune.roles import TokenRole
from cptune.training import TrainSettings, train
from tiny import ARCHITECTURES, tiny_model


def _model(arch, context, **cfg):
    base = tiny_model(arch)
    return cptune.get_cpt_model(base, context.to_config(**cfg))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_shapes(arch, context, queries):
    model = _model(arch, context)
    out = model(**queries)
    b, t = queries["input_ids"].shape
    assert out.logits.shape == (b, len(context) + t, model.base_model.config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    no_labels = model(input_ids=queries["input_ids"], attention_mask=queries["attention_mask"])
    assert no_labels.logits.shape == out.logits.shape and no_labels.loss is None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_invariants(arch, context, queries, tmp_path):
    model = _model(arch, context, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95,
                   opt_projection_epsilon=0.5, opt_projection_format_epsilon=0.3)
    before = copy.deepcopy(model.base_model.state_dict())
    model.eval()
    with torch.no_grad():
        loss0 = model(**queries).loss.item()
    result = train(model, queries, TrainSettings(steps=12, batch_size=3, lr=3e-2), progress=False,
                   checkpoint_dir=tmp_path / "ckpt")
    with torch.no_grad():
        loss1 = model(**queries).loss.item()
    assert loss1 < loss0, (loss0, loss1)
    assert len(result.losses) == 12
    # base weights bit-identical
    after = model.base_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    enc = model.prompt_encoder
    norms = enc.delta.detach().norm(dim=-1)
    assert bool((norms <= enc.radii + 1e-6).all())
    frozen = (enc.roles == TokenRole.LABEL) | (enc.roles == TokenRole.SEPARATOR)
    assert torch.count_nonzero(enc.delta.detach()[frozen]) == 0
    assert torch.count_nonzero(enc.delta.detach()[~frozen]) > 0  # it did learn something
    # with lr this large the balls are reached: the projection is doing work
    assert bool((norms[~frozen] >= enc.radii[~frozen] - 1e-5).any())

    # save -> load -> same logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = cptune.CPTModel.from_pretrained(tiny_model(arch), tmp_path / "adapter")
    with torch.no_grad():
        a = model(**queries).logits
        b = loaded(**queries).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_prefix_equals_duplicated_context(arch, dtype, context, queries):
    base = tiny_model(arch, dtype=dtype)
    results = {}
    d0 = torch.randn(len(context), base.get_input_embeddings().weight.shape[-1], dtype=torch.float32) * 0.02
    for mode in ("never", "always"):
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(opt_weighted_loss_type="decay",
                                                                          opt_loss_decay_factor=0.8),
                                     prefix_sharing=mode)
        with torch.no_grad():
            model.prompt_encoder.delta.copy_(d0)
        out = model(**queries)
        out.loss.backward()
        lean = model(**queries, return_logits=False).loss if mode == "always" else out.loss
        results[mode] = (out.loss.detach(), model.prompt_encoder.delta.grad.clone(), out.logits.detach(), lean)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    (l0, g0, z0, _), (l1, g1, z1, lean) = results["never"], results["always"]
    assert torch.allclose(l0, l1, rtol=tol)
    assert torch.allclose(lean.detach(), l0, rtol=tol)
    # delta and its gradient are float32 whatever the model dtype
    assert (g1 - g0).norm() <= max(tol, 1e-6) * g0.norm()
    assert torch.allclose(z0, z1, rtol=tol, atol=tol * 10)


def test_unequal_query_lengths_and_first_token_label(context, tok):
    """A query whose very first token is a label is predicted by the context's last position."""
    base = tiny_model("llama", dtype=torch.float64)
    q = cptune.render_queries(QUERIES[:3], TEMPLATE, tok, LABEL_WORDS)
    q["input_type_mask"][1, 0] = 4  # pretend row 1 starts with a label token
    losses = []
    for mode in ("never", "always"):
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(), prefix_sharing=mode)
        losses.append(model(**q).loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-10)


def test_caller_tensors_are_not_modified(context, queries):
    model = _model("llama", context)
    snapshot = {k: v.clone() for k, v in queries.items()}
    model(**queries)
    model(**queries)
    assert all(torch.equal(snapshot[k], queries[k]) for k in queries)


def test_labels_without_type_mask_is_an_error(context, queries):
    model = _model("llama", context)
    with pytest.raises(ValueError, match="input_type_mask"):
        model(input_ids=queries["input_ids"], labels=queries["labels"])


def test_query_codes_out_of_range_is_an_error(context, queries):
    model = _model("llama", context)
    bad = dict(queries, input_type_mask=queries["input_type_mask"] + 4)
    with pytest.raises(ValueError, match="0..4"):
        model(**bad)


def test_any_adapter_name(context, queries):
    model = cptune.get_cpt_model(tiny_model("llama"), context.to_config(), adapter_name="sst2")
    assert model(**queries).loss is not None and "sst2" in model.peft_config


def test_generate_returns_prompt_then_new_tokens(context, tok):
    model = _model("llama", context)
    ids = torch.tensor([tok("input: good output:")["input_ids"]])
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) and torch.equal(out[:, : ids.shape[1]], ids)


def test_demos_fixture_is_balanced():
    assert sorted({label for _, label in DEMOS}) == sorted(LABEL_WORDS)


def test_length_buckets_partition_and_save_padding():
    from cptune.prefix import length_buckets

    lengths = [60, 20, 22, 58, 21, 59, 40, 41]
    buckets = length_buckets(lengths, overhead_tokens=16)
    assert sorted(i for b in buckets for i in b) == list(range(8))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    assert padded < len(lengths) * max(lengths)
    assert length_buckets([30, 30, 30], overhead_tokens=16) == [[0, 1, 2]]


def test_left_padded_queries_fall_back_to_plain_layout(context, tok):
    base = tiny_model("llama", dtype=torch.float64)
    q = cptune.render_queries(QUERIES[:3], TEMPLATE, tok, LABEL_WORDS)
    # shift every row to the right end (left padding)
    left = {k: torch.zeros_like(v) for k, v in q.items()}
    lengths = q["attention_mask"].sum(1)
    width = q["input_ids"].shape[1]
    for i, n in enumerate(lengths.tolist()):
        for k in q:
            left[k][i, width - n:] = q[k][i, :n]
    left["labels"][left["attention_mask"] == 0] = -100
    model = cptune.get_cpt_model(base, context.to_config(), prefix_sharing="always")
    plain = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(), prefix_sharing="never")
    assert torch.allclose(model(**left).loss, plain(**left).loss, rtol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_every_row_in_its_own_bucket_gives_the_same_loss_and_gradient(arch, context, queries, monkeypatch):
    import cptune.model

    base = tiny_model(arch, dtype=torch.float64)
    d0 = torch.randn(len(context), base.get_input_embeddings().weight.shape[-1]) * 0.02
    grads, losses = [], []
    for split in (False, True):
        if split:
            def one_per_bucket(lengths):
                return [[i] for i in range(len(lengths))][::-1]

            monkeypatch.setattr(cptune.model, "length_buckets", one_per_bucket)
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(opt_weighted_loss_type="decay",
                                                                          opt_loss_decay_factor=0.7),
                                     prefix_sharing="never" if not split else "always")
        with torch.no_grad():
            model.prompt_encoder.delta.copy_(d0)
        loss = model(**queries, return_logits=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.prompt_encoder.delta.grad.clone())
    assert torch.allclose(losses[0], losses[1], rtol=1e-10)
    assert (grads[0] - grads[1]).norm() <= 1e-6 * grads[0].norm()
