"""Every feature on every tiny architecture: shapes, training, invariants, files."""

import copy
import inspect
import logging
import warnings

import pytest
import torch

import cptune
from conftest import LABEL_WORDS, QUERIES, TEMPLATE
from cptune.cpt.roles import TokenRole
from cptune.training import TrainSettings, train
from tiny import ARCHITECTURES, tiny_model


def _model(arch, context, **cfg):
    base = tiny_model(arch)
    return cptune.get_cpt_model(base, context.to_config(**cfg))


def _reference_forward(base, context, queries):
    """Logits and CPT loss (loss type "none", delta 0) from one plain forward of context + query ids.

    Every label token is a target, the context's demonstration labels and the query's label: the
    loss is the mean cross-entropy of the logits one position before each of them.
    """
    b = queries["input_ids"].shape[0]
    ids = torch.cat([context.token_ids.expand(b, -1), queries["input_ids"]], dim=1)  # (B, N + T)
    mask = torch.cat([torch.ones(b, len(context), dtype=queries["attention_mask"].dtype),
                      queries["attention_mask"]], dim=1)
    is_label = torch.cat([(context.roles == TokenRole.LABEL).expand(b, -1),
                          queries["input_type_mask"] == TokenRole.LABEL], dim=1)  # (B, N + T)
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask).logits  # (B, N + T, V)
    rows, cols = is_label.nonzero(as_tuple=True)
    loss = torch.nn.functional.cross_entropy(logits[rows, cols - 1], ids[rows, cols])
    return logits, loss


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_shapes(arch, context, queries):
    model = _model(arch, context)
    out = model(**queries)
    b, t = queries["input_ids"].shape
    assert out.logits.shape == (b, len(context) + t, model.base_model.config.vocab_size)
    logits, loss = _reference_forward(model.base_model, context, queries)
    real = torch.cat([torch.ones(b, len(context), dtype=torch.bool), queries["attention_mask"].bool()], dim=1)
    torch.testing.assert_close(out.logits[real], logits[real], rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{arch}: CPT logits differ from a plain forward of context + query\n{m}")
    assert out.loss.ndim == 0
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5), f"{arch}: CPT loss != hand cross-entropy"
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


# Architectures whose RMSNorm computes in float32 whatever the model dtype (transformers up-casts).
_FLOAT32_NORM_ARCHS = ("llama", "qwen2", "gemma3_text")
_EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_prefix_equals_duplicated_context(arch, dtype, context, queries):
    """The shared-prefix layout gives the duplicated layout's loss, logits and gradient.

    In float64 the two agree to float64 rounding, except the gradient on architectures whose
    RMSNorm up-casts to float32 (Llama, Qwen2, Gemma3: ``hidden_states.to(torch.float32)`` in
    their ``*RMSNorm.forward``), where they differ by ~eps32 (6e-8 to 2e-7 here), with or without
    padding. The norm's forward is per row, so forward values agree exactly; its backward rounds
    the incoming gradient to float32. The duplicated layout rounds each row's gradient of the
    context states separately and sums afterwards; the shared layout sums the rows' gradients
    first (at the expanded cache) and rounds once. Minimal reproduction::

        import torch
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        torch.manual_seed(0)
        norm = LlamaRMSNorm(64).double()
        x = torch.randn(1, 64, dtype=torch.float64, requires_grad=True)   # one context state
        g = torch.randn(2, 64, dtype=torch.float64)                       # gradients from two rows
        dup, = torch.autograd.grad(norm(x.expand(2, -1)), x, g)            # per row, then summed
        shared, = torch.autograd.grad(norm(x), x, g.sum(0, keepdim=True))  # summed, then once
        print(((dup - shared).norm() / shared.norm()).item())              # 6.8e-08, not ~1e-16

    Computing the norm in float64 instead brings the tiny Llama's gradients to 6e-16 relative.
    """
    base = tiny_model(arch, dtype=dtype)
    results = {}
    d0 = torch.randn(len(context), base.get_input_embeddings().weight.shape[-1], dtype=torch.float32) * 0.02
    for mode in ("never", "always"):
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(opt_weighted_loss_type="decay",
                                                                          opt_loss_decay_factor=0.8),
                                     prefix_sharing=mode)
        with torch.no_grad():
            model.prompt_encoder.delta.copy_(d0)
        # What forward computes itself, kept to read the gradient in the model's dtype as well.
        context_embeds = model.context_embeddings()
        context_embeds.retain_grad()
        out = model(**queries, context_embeds=context_embeds)
        out.loss.backward()
        lean = model(**queries, return_logits=False).loss if mode == "always" else out.loss
        results[mode] = (out.loss.detach(), context_embeds.grad, model.prompt_encoder.delta.grad.clone(),
                         out.logits.detach(), lean)
    (l0, c0, g0, z0, _), (l1, c1, g1, z1, lean) = results["never"], results["always"]
    if dtype == torch.float64:
        # Summation order only: a few hundred float64 roundings, ~1e-15 relative. (A float32 norm
        # in the forward could flip one float32 rounding, but only for inputs within 1e-16 of a
        # float32 rounding boundary; these fixed inputs have none.)
        tol = grad_tol = 1e-12
        if arch in _FLOAT32_NORM_ARCHS:
            # Each float32 norm backward the gradient crosses rounds it (eps32/2 relative) at a
            # different point in the two layouts; independent roundings add like a random walk.
            num_norms = sum("RMSNorm" in type(m).__name__ for m in base.modules())
            grad_tol = 4 * _EPS32 * num_norms**0.5
    else:
        tol = grad_tol = 1e-5
    assert torch.allclose(l0, l1, rtol=tol, atol=0)
    assert torch.allclose(lean.detach(), l0, rtol=tol, atol=0)
    assert torch.allclose(z0, z1, rtol=tol, atol=tol * z0.abs().max())
    assert (c1 - c0).norm() <= grad_tol * c0.norm()
    # delta and its gradient are float32 whatever the model dtype: one more rounding (eps32/2).
    assert (g1 - g0).norm() <= (grad_tol + _EPS32) * g0.norm()


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


def test_length_buckets_partition_and_save_padding():
    from cptune.cpt.engine import length_buckets

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


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("layout", ["packed", "padded", "onepass"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_padded_and_onepass_give_the_plain_layouts_loss_and_gradient(arch, layout, dtype, context, queries):
    """The training forward's three query layouts (:mod:`cptune.cpt.engine`) against PEFT's layout
    (the context copied into every row); tolerances as in the test above. The context (longer than
    the tiny Gemma3's sliding window of 16) puts the window's edge inside the context for the queries."""
    base = tiny_model(arch, dtype=dtype)
    if arch == "gemma3_text":
        assert len(context) > 2 * base.config.sliding_window  # the window's edge falls inside the context
    d0 = torch.randn(len(context), base.get_input_embeddings().weight.shape[-1]) * 0.02
    results = []
    for mode in ("never", "always"):
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(opt_weighted_loss_type="decay",
                                                                          opt_loss_decay_factor=0.8),
                                     prefix_sharing=mode, query_layout=layout)
        with torch.no_grad():
            model.prompt_encoder.delta.copy_(d0)
        context_embeds = model.context_embeddings()
        context_embeds.retain_grad()
        loss = model(**queries, context_embeds=context_embeds, return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), context_embeds.grad))
    (l0, c0), (l1, c1) = results
    tol = grad_tol = 1e-5
    if dtype == torch.float64:
        tol = grad_tol = 1e-12
        if arch in _FLOAT32_NORM_ARCHS:
            grad_tol = 4 * _EPS32 * sum("RMSNorm" in type(m).__name__ for m in base.modules()) ** 0.5
    assert torch.allclose(l0, l1, rtol=tol, atol=0), (l0, l1)
    assert (c1 - c0).norm() <= grad_tol * c0.norm(), ((c1 - c0).norm() / c0.norm()).item()


@pytest.mark.parametrize("pays", [False, True])
def test_auto_layout_is_packed_or_onepass_for_sdpa_and_eager_and_padded_otherwise(pays, monkeypatch):
    import cptune.cpt.engine
    from cptune.cpt.engine import layout_for, layout_report

    monkeypatch.setitem(cptune.cpt.engine.ONEPASS_PAYS, "cpu", pays)
    for implementation in ("sdpa", "eager"):
        model = tiny_model("llama")
        model.config._attn_implementation = implementation
        assert layout_for(model) == "packed", layout_report(model)
        assert layout_for(model, fresh_prefix=True) == ("onepass" if pays else "packed"), layout_report(model)
        assert f"training: {'onepass' if pays else 'packed'}" in layout_report(model)
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    assert layout_for(model) == layout_for(model, fresh_prefix=True) == "padded"
    assert "takes no custom mask" in layout_report(model) and "onepass refused" in layout_report(model)


def test_a_layout_the_model_fails_is_refused(context, queries):
    """Asked for by name on a model whose attention takes no custom mask, packed and onepass refuse."""
    for layout in ("packed", "onepass"):
        base = tiny_model("llama")
        base.config._attn_implementation = "flex_attention"
        model = cptune.get_cpt_model(base, context.to_config(), prefix_sharing="always", query_layout=layout)
        with pytest.raises(ValueError, match=f"layout='{layout}' does not fit this model"):
            model(**queries, return_logits=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_every_row_in_its_own_bucket_gives_the_same_loss_and_gradient(arch, context, queries, monkeypatch):
    import cptune.cpt.engine

    base = tiny_model(arch, dtype=torch.float64)
    d0 = torch.randn(len(context), base.get_input_embeddings().weight.shape[-1]) * 0.02
    grads, losses = [], []
    for split in (False, True):
        if split:
            def one_per_bucket(lengths):
                return [[i] for i in range(len(lengths))][::-1]

            monkeypatch.setattr(cptune.cpt.engine, "length_buckets", one_per_bucket)
        model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(opt_weighted_loss_type="decay",
                                                                          opt_loss_decay_factor=0.7),
                                     prefix_sharing="never" if not split else "always", query_layout="padded")
        with torch.no_grad():
            model.prompt_encoder.delta.copy_(d0)
        loss = model(**queries, return_logits=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.prompt_encoder.delta.grad.clone())
    assert torch.allclose(losses[0], losses[1], rtol=1e-10)
    assert (grads[0] - grads[1]).norm() <= 1e-6 * grads[0].norm()


class _WarningRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_no_deprecated_cache_name(arch, layout, context, queries, tok):
    """Training and scoring never use a name transformers deprecates for the key/value cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache``: the old forward keyword raises a
    ``FutureWarning`` (an error here), the old output field logs a warning once (recorded here, with
    transformers' once-only memory cleared). Before 5.24 ``past_key_values`` is the only name and
    nothing warns; the cache must still reach the model (the logits are checked elsewhere in this file).
    """
    from cptune.cpt.engine import cache_name
    from cptune.scoring import encode_context, label_log_likelihoods
    from cptune.text.template import label_token_ids, render_example

    base = tiny_model(arch)
    assert cache_name(base) in inspect.signature(base.forward).parameters
    records = _WarningRecords()
    hf_logger = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once: else a warning seen before is silent
    hf_logger.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
            for sharing in ("never", "always"):
                model = cptune.get_cpt_model(copy.deepcopy(base), context.to_config(), prefix_sharing=sharing,
                                             query_layout=layout)
                model(**queries).loss.backward()
                with torch.no_grad():
                    prefix = encode_context(model.base_model, model.context_embeddings())
                query_ids = [render_example(TEMPLATE, tok, text, None, False)[0] for text, _ in QUERIES]
                label_ids = list(label_token_ids(TEMPLATE, tok, LABEL_WORDS).values())
                scores = label_log_likelihoods(model.base_model, prefix, query_ids, label_ids, batch_size=4)
                assert scores.shape == (len(QUERIES), len(LABEL_WORDS))
    finally:
        hf_logger.removeHandler(records)
    assert not [m for m in records.messages if "past_key_values" in m], records.messages


def test_cache_name_follows_the_forward_signature():
    """A forward that names ``past_key_values`` (a model with its own code) gets it; one with only
    ``**kwargs`` gets the installed transformers' name."""
    from cptune.cpt.engine import TRANSFORMERS_CACHE_NAME, cache_name

    class OldStyle(torch.nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None, **kwargs):
            return inputs_embeds

    class KwargsOnly(torch.nn.Module):
        def forward(self, **kwargs):
            return kwargs

    assert cache_name(OldStyle()) == "past_key_values"
    assert cache_name(KwargsOnly()) == TRANSFORMERS_CACHE_NAME
    import transformers.modeling_outputs as outputs

    assert TRANSFORMERS_CACHE_NAME in outputs.CausalLMOutputWithPast.__dataclass_fields__
