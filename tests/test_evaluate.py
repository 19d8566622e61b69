import copy

import pytest
import torch

import cptune
from conftest import LABEL_WORDS, TEMPLATE
from cptune.evaluate import classification_metrics, score_texts
from cptune.template import label_token_ids, render_example
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

    from cptune.evaluate import query_token_ids

    with_bos = copy.deepcopy(tok)
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", with_bos.bos_token_id)])
    assert with_bos("a")["input_ids"][0] == with_bos.bos_token_id
    ids = query_token_ids(["fun"], TEMPLATE, with_bos, add_bos=True)[0]
    assert ids[0] == with_bos.bos_token_id and ids[1:] == query_token_ids(["fun"], TEMPLATE, tok)[0]
    context = cptune.build_context([("fun", "pos")], TEMPLATE, with_bos, LABEL_WORDS)
    assert context.token_ids[0] == with_bos.bos_token_id  # ICL/CPT contexts start with it too
