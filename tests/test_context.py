"""Property tests of the template and context builder on every tokenizer family we ship in tests."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cptune
from cptune.cpt.roles import NO_EXAMPLE, TokenRole, from_peft_codes
from tiny import TOKENIZER_FAMILIES, tiny_tokenizer

texts = st.one_of(st.text(min_size=0, max_size=40), st.text(min_size=300, max_size=1500))
labels = st.sampled_from(["a", "b c", "d, e!?"])
words = {"a": "positive", "b c": "negative", "d, e!?": "so-so, maybe!"}


def _roles_in_order(roles):
    order = [TokenRole.INPUT_TEMPLATE, TokenRole.INPUT_TEXT, TokenRole.OUTPUT_TEMPLATE, TokenRole.LABEL]
    seen = [r for r in roles if r != TokenRole.SEPARATOR]
    return [order.index(r) for r in seen] == sorted(order.index(r) for r in seen)


@pytest.mark.parametrize("family", TOKENIZER_FAMILIES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(examples=st.lists(st.tuples(texts, labels), min_size=1, max_size=5),
       fmt=st.sampled_from(["input: {x} output: {y}", "Review: {x}\nSentiment: {y}", "{x} => {y}.", "{x}{y}"]))
def test_context_invariants(family, examples, fmt):
    tok = tiny_tokenizer(family)
    tpl = cptune.Template(fmt)
    ctx = cptune.build_context(examples, tpl, tok, words)
    n = len(ctx)
    assert ctx.token_ids.shape == ctx.roles.shape == ctx.example_index.shape == (n,)
    # roles and example index align; separators carry no example
    assert torch.equal(ctx.example_index == NO_EXAMPLE, ctx.roles == TokenRole.SEPARATOR)
    assert sorted(set(ctx.example_index[ctx.example_index >= 0].tolist())) == list(range(len(examples)))
    # PEFT codes: lossless and accepted by the config validation
    roles, index = from_peft_codes(ctx.type_codes)
    assert torch.equal(roles, ctx.roles) and torch.equal(index, ctx.example_index)
    cfg = ctx.to_config()
    assert cfg.num_examples == len(examples)
    for k, (text, label) in enumerate(examples):
        rows = ctx.example_index == k
        ex_roles = ctx.roles[rows].tolist()
        assert _roles_in_order(ex_roles)
        # the label tokens of demonstration k are the label's ids
        assert ctx.token_ids[rows & (ctx.roles == TokenRole.LABEL)].tolist() == ctx.label_ids[label]
        # the same example rendered as a training query has the same ids and roles
        q = cptune.render_queries([(text, label)], tpl, tok, words)
        q_len = int(q["attention_mask"].sum())
        assert q["input_ids"][0, :q_len].tolist() == ctx.token_ids[rows].tolist()
        assert q["input_type_mask"][0, :q_len].tolist() == ex_roles
    if family != "bytelevel_bpe":
        return  # only byte-level BPE represents every text exactly
    # decoding the context gives back the rendered text
    expected = "".join(fmt.replace("{x}", t).replace("{y}", words[lab]) + "\n" for t, lab in examples)
    assert tok.decode(ctx.token_ids.tolist()) == expected


def test_label_tokens_are_leading_space_tokens():
    tok = tiny_tokenizer()
    ctx = cptune.build_context([("fine", "a")], cptune.Template("input: {x} output: {y}"), tok, {"a": "positive"})
    natural = tok("input: fine output: positive", add_special_tokens=False)["input_ids"]
    assert ctx.token_ids.tolist()[: len(natural)] == natural


@pytest.mark.parametrize(
    "fmt, match",
    [("input: {x}", "exactly one"), ("{y} {x}", "before"), ("{x} {y} {x}", "exactly one"), ("{x} {z}", "exactly")],
)
def test_bad_templates(fmt, match):
    with pytest.raises(ValueError, match=match):
        cptune.Template(fmt)


@pytest.mark.parametrize(
    "label_words, match",
    [({"a": "yes", "b": "yes"}, "must differ"), ({"a": "yes", "b": "   "}, "tokenizes to nothing"),
     ({"a": "yes", "b": ""}, "tokenizes to nothing"), ({"a": "yes"}, "no label word")],
)
def test_bad_label_words(label_words, match):
    with pytest.raises(ValueError, match=match):
        cptune.build_context([("x", "a"), ("y", "b")], cptune.Template(), tiny_tokenizer(), label_words)


def test_truncation_rule_keeps_first_tokens():
    tok = tiny_tokenizer()
    tpl = cptune.Template("input: {x} output: {y}", max_text_tokens=3)
    ctx = cptune.build_context([("one two three four five six", "a")], tpl, tok, {"a": "positive"})
    assert int((ctx.roles == TokenRole.INPUT_TEXT).sum()) == 3
