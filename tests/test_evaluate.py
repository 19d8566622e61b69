import copy

import pytest
import torch

import cptune
from conftest import LABEL_WORDS, TEMPLATE
from cptune.scoring import CONTENT_FREE_TEXTS, classification_metrics, contextual_calibration, score_texts
from cptune.text.template import label_token_ids, render_example
from tiny import ARCHITECTURES, tiny_model

TEXTS = ["a waste of time", "great actors shine in this one", "bad", "the plot is thin but fun"]


def _uncached_scores(base, tok, context_embeds, label_words, length_normalize=False):
    """Reference: the whole sequence (context, query, label) in one forward, no cache, one at a time."""
    ids = label_token_ids(TEMPLATE, tok, label_words)
    rows = []
    for text in TEXTS:
        q = render_example(TEMPLATE, tok, text, None, with_separator=False)[0]
        row = []
        for label in label_words:
            seq = torch.tensor([q + ids[label]])
            emb = base.get_input_embeddings()(seq)
            if context_embeds is not None:
                emb = torch.cat([context_embeds, emb], dim=1)
            logp = torch.log_softmax(base(inputs_embeds=emb).logits[0].float(), dim=-1)
            start = emb.shape[1] - len(ids[label])
            total = sum(logp[start - 1 + j, t].item() for j, t in enumerate(ids[label]))
            row.append(total / len(ids[label]) if length_normalize else total)
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("label_words", [LABEL_WORDS, {"pos": "great and wonderful", "neg": "bad"}])
def test_cached_scores_equal_uncached(arch, label_words, tok):
    base = tiny_model(arch)
    context = cptune.build_context([("fun", "pos"), ("dull", "neg")], TEMPLATE, tok, label_words)
    model = cptune.get_cpt_model(base, context.to_config(opt_projection_epsilon=1.0))
    with torch.no_grad():
        model.prompt_encoder.delta.normal_(0, 0.1)
        model.project_()
        embeds = model.context_embeddings()
    model.eval()
    for ctx in (embeds, None):
        for norm in (False, True):
            with torch.no_grad():
                got = score_texts(base, tok, TEMPLATE, label_words, TEXTS, ctx, batch_size=3, length_normalize=norm)
                want = _uncached_scores(base, tok, ctx, label_words, norm)
            assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
            assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_metrics():
    m = classification_metrics([0, 1, 1, 0, 2], [0, 1, 0, 0, 2], 3)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 0], [0, 0, 1]]
    f1 = [2 * 2 / (2 * 2 + 0 + 1), 2 * 1 / (2 + 1 + 0), 1.0]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_no_texts_give_an_empty_score_matrix(tok):
    base = tiny_model("llama")
    assert score_texts(base, tok, TEMPLATE, LABEL_WORDS, [], None).shape == (0, 2)


def test_queries_without_context_start_with_bos_when_the_tokenizer_adds_one(tok):
    from tokenizers import processors

    from cptune.scoring import query_token_ids

    with_bos = copy.deepcopy(tok)
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", with_bos.bos_token_id)])
    assert with_bos("a")["input_ids"][0] == with_bos.bos_token_id
    ids = query_token_ids(["fun"], TEMPLATE, with_bos, add_bos=True)[0]
    assert ids[0] == with_bos.bos_token_id and ids[1:] == query_token_ids(["fun"], TEMPLATE, tok)[0]
    context = cptune.build_context([("fun", "pos")], TEMPLATE, with_bos, LABEL_WORDS)
    assert context.token_ids[0] == with_bos.bos_token_id  # ICL/CPT contexts start with it too


def test_contextual_calibration_divides_by_the_content_free_probabilities():
    # Zhao et al.: p = (0.7, 0.3), content-free p_cf = mean of (0.9, 0.1) and (0.7, 0.3) = (0.8, 0.2);
    # p / p_cf = (0.875, 1.5) -> (0.368..., 0.631...): the prediction flips to the second label.
    scores = torch.log(torch.tensor([[0.7, 0.3]])) + 5.0  # any offset: scores are renormalised
    content_free = torch.log(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))
    calibrated = contextual_calibration(scores, content_free).exp()
    expected = torch.tensor([[0.875, 1.5]]) / 2.375
    torch.testing.assert_close(calibrated, expected)
    # An unbiased context (uniform p_cf) changes nothing but the normalisation.
    uniform = torch.zeros(3, 2)
    torch.testing.assert_close(contextual_calibration(scores, uniform), torch.log_softmax(scores, dim=-1))


@pytest.mark.parametrize(
    ("scores", "content_free", "message"),
    [
        (torch.zeros(2, 2), torch.zeros(0, 2), "content_free_scores must be \\(m, C\\) with m >= 1; got \\(0, 2\\)"),
        (torch.zeros(2, 3), torch.zeros(1, 2), "scores \\(2, 3\\) and content_free_scores \\(1, 2\\)"),
    ],
)
def test_contextual_calibration_rejects_mismatched_shapes(scores, content_free, message):
    with pytest.raises(ValueError, match=message):
        contextual_calibration(scores, content_free)


@pytest.mark.parametrize("with_context", [False, True])
def test_score_texts_calibrate_uses_the_content_free_inputs_after_the_same_context(tok, with_context):
    base = tiny_model("llama")
    context = None
    if with_context:
        ctx = cptune.build_context([("fun", "pos"), ("dull", "neg")], TEMPLATE, tok, LABEL_WORDS)
        context = base.get_input_embeddings()(ctx.token_ids.view(1, -1)).detach()
    raw = score_texts(base, tok, TEMPLATE, LABEL_WORDS, TEXTS, context)
    content_free = score_texts(base, tok, TEMPLATE, LABEL_WORDS, list(CONTENT_FREE_TEXTS), context)
    calibrated = score_texts(base, tok, TEMPLATE, LABEL_WORDS, TEXTS, context, calibrate=True)
    torch.testing.assert_close(calibrated, contextual_calibration(raw, content_free))
    assert not torch.allclose(calibrated, torch.log_softmax(raw, dim=-1))  # the tiny model is biased
    torch.testing.assert_close(calibrated.exp().sum(-1), torch.ones(len(TEXTS)))
