"""A long query scored in slices (prefill in chunks over the context's cache) equals it scored at once.

What ``cptune serve`` relies on to interleave a long text with short requests: ``ContextScorer.begin``,
``prefill`` and ``finish`` give the scores ``ContextScorer.scores`` gives, for any slicing.
"""

import pytest
import torch

import cptune
from cptune.cpt.engine import encode_prefix, extend_prefix
from cptune.scoring import ContextScorer
from tiny import tiny_model, tiny_tokenizer

TEMPLATE = cptune.Template("input: {x} output: {y}")
ONE_TOKEN_WORDS = {"neg": "negative", "pos": "positive", "mid": "neutral"}
MULTI_TOKEN_WORDS = {"neg": "negative", "pos": "very positive"}  # "very positive": 5 tokens after the template
LONG_TEXT = ("the plot is thin but the actors shine; a gripping, funny and moving film, far too long and dull "
             "in the middle, the best movie of the year") * 2
PROBABILITY_ATOL = 1e-5


def scorer_for(arch, words, calibrate, context=True, **options):
    model, tok = tiny_model(arch), tiny_tokenizer()
    embeds = None
    if context:
        demonstration = tok("input: a waste of time output: negative\ninput: great output: positive\n")["input_ids"]
        embeds = model.get_input_embeddings()(torch.tensor([demonstration])).detach()  # (1, N, d)
    return ContextScorer(model, tok, TEMPLATE, words, embeds, calibrate=calibrate, **options)


def in_slices(scorer, ids, cuts):
    """The query's scores with its tokens run up to each cut in turn, then the rest."""
    part = scorer.begin(ids)
    for end in cuts:
        part = scorer.prefill(part, end)
    return scorer.finish(part)


def slice_cuts(length, size):
    """Cuts every ``size`` tokens, the last slice (which holds the last token) at most ``size`` long."""
    return list(range(size, length, size)) if size < length else []


# rotary positions; a sliding window of 16 (the last slice needs the window of keys its prefix cache holds);
# learned positions
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("words", [ONE_TOKEN_WORDS, MULTI_TOKEN_WORDS], ids=["one-token", "multi-token"])
@pytest.mark.parametrize("calibrate", [False, True])
def test_a_query_scored_in_slices_equals_it_scored_at_once(arch, words, calibrate):
    scorer = scorer_for(arch, words, calibrate, length_normalize=True, label_bias=[0.3, -0.1, 0.2][: len(words)])
    ids = scorer.query_ids([LONG_TEXT])[0]
    length = len(ids)
    assert length > 40  # long enough for slices of every size below to differ
    whole = torch.softmax(scorer.scores([ids]), dim=-1)  # (1, C)
    # 1 token a slice; a size that divides the query (the last slice ends exactly at its end); a size
    # that leaves one token for the last slice; the query less its last token in one slice; no slice at all
    divisor = next(d for d in range(7, length) if length % d == 0)
    for size in (1, 5, divisor, length - 1, length - 2, length):
        cuts = slice_cuts(length, size)
        sliced = torch.softmax(in_slices(scorer, ids, cuts), dim=-1)
        assert sliced.shape == whole.shape
        assert torch.allclose(sliced, whole, atol=PROBABILITY_ATOL, rtol=0), (size, (sliced - whole).abs().max())
    uneven = torch.softmax(in_slices(scorer, ids, [3, 4, 20, length - 1]), dim=-1)
    assert torch.allclose(uneven, whole, atol=PROBABILITY_ATOL, rtol=0)


def test_slices_without_a_context_and_the_context_is_left_as_it_was():
    scorer = scorer_for("llama", MULTI_TOKEN_WORDS, calibrate=False, context=False)
    ids = scorer.query_ids([LONG_TEXT])[0]  # BOS first: no context
    whole = torch.softmax(scorer.scores([ids]), dim=-1)
    assert torch.allclose(torch.softmax(in_slices(scorer, ids, [1, 9, 30]), dim=-1), whole,
                          atol=PROBABILITY_ATOL, rtol=0)

    scorer = scorer_for("llama", ONE_TOKEN_WORDS, calibrate=True)
    keys = [layer.keys.clone() for layer in scorer.context.cache.layers]
    length = scorer.context.length
    short = scorer.query_ids(["great"])
    before = scorer.scores(short)
    part = scorer.prefill(scorer.begin(ids), 10)
    again = scorer.prefill(part, 25)
    assert (part.done, again.done) == (10, 25) and part.prefix.length == length + 10  # prefill leaves part as it was
    assert again.prefix.length == length + 25 and again.prefix.cache.layers[0].keys.shape[-2] == length + 25
    scorer.finish(again)
    assert scorer.context.length == length
    assert all(torch.equal(layer.keys, k) for layer, k in zip(scorer.context.cache.layers, keys, strict=True))
    assert torch.equal(scorer.scores(short), before)  # a short query after the slices sees only the context


def test_extend_prefix_equals_encoding_the_whole_prefix():
    model = tiny_model("llama")
    embeds = model.get_input_embeddings()(torch.arange(3, 23)[None]).detach()  # (1, 20, d)
    with torch.no_grad():
        whole = encode_prefix(model, embeds)
        grown = extend_prefix(model, extend_prefix(model, None, embeds[:, :8]), embeds[:, 8:])
    assert grown.length == whole.length == 20 and torch.equal(grown.embeds, embeds)
    for a, b in zip(grown.cache.layers, whole.cache.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)


def test_slices_that_do_not_fit_are_refused():
    scorer = scorer_for("llama", ONE_TOKEN_WORDS, calibrate=False)
    ids = scorer.query_ids(["a fun film"])[0]
    part = scorer.begin(ids)
    for end in (0, len(ids)):  # nothing to run; the last token (it gives the scores: finish)
        with pytest.raises(ValueError, match=f"end={end} must be from 1 to {len(ids) - 1}"):
            scorer.prefill(part, end)
    with pytest.raises(ValueError, match="at least one token"):
        scorer.begin([])
    with pytest.raises(ValueError, match="more than the model's"):
        scorer.begin([5] * 5000)
