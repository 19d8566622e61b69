"""template="auto": the choice follows its stated score, stays within its budget, sees only the labelled
examples, and is recorded with the classifier; on the tiny model."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from cptune import CPTClassifier, CPTRecipe, TrainSettings
from cptune.balance import DOMAIN_TEXTS, collapse_limit
from cptune.scoring import score_texts
from cptune.selection import (
    TEMPLATE_CATALOGUE,
    TemplateChoice,
    choose_finalist,
    choose_template,
    halves,
    held_out_log_probs,
    word_candidates,
)
from cptune.text.context import build_context
from tiny import biased_gpt2, tiny_model, tiny_tokenizer

EXAMPLES = [("a gripping, funny and moving film", "pos"), ("dull, lifeless and far too long", "neg"),
            ("the best movie of the year", "pos"), ("a waste of time", "neg"), ("wonderful", "pos"),
            ("terrible, bad", "neg"), ("great", "pos"), ("the plot is thin", "neg")]
WORDS = {"pos": "positive", "neg": "negative"}
TEST_TEXTS = ["an unseen test review about sports", "another held-out sentence"]


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama"), tiny_tokenizer()


def test_word_candidates_are_the_given_words_and_their_case_variants():
    assert word_candidates({"a": "Good", "b": "bad"}) == [{"a": "Good", "b": "bad"}, {"a": "good", "b": "bad"},
                                                          {"a": "Good", "b": "Bad"}]
    assert word_candidates({"a": "good", "b": "bad"}) == [{"a": "good", "b": "bad"}, {"a": "Good", "b": "Bad"}]


def test_halves_are_balanced_and_disjoint():
    a, b = halves(EXAMPLES, seed=3)
    assert sorted(a + b) == sorted(EXAMPLES) and not set(a) & set(b)
    assert Counter(label for _, label in a) == Counter(label for _, label in b) == {"pos": 2, "neg": 2}


def test_the_choice_is_the_best_held_out_log_likelihood_computed_as_stated(pair):
    base, tok = pair
    choice = choose_template(base, tok, EXAMPLES, WORDS, seed=1)
    scored = [s for s in choice.scores if "log_prob" in s]
    assert len(scored) == len(choice.scores) == len(TEMPLATE_CATALOGUE) * 2  # every candidate within the budget
    best = max(scored, key=lambda s: s["log_prob"])  # max keeps the first of equals, as the choice does
    assert (choice.template.format, choice.words_text()) == (best["format"], best["words"])
    # one candidate recomputed by hand: each half an ICL context for the other half
    entry = scored[3]
    template = dict((t.format, t) for _, t in TEMPLATE_CATALOGUE)[entry["format"]]
    a, b = halves(EXAMPLES, seed=1)
    log_probs, gold = [], []
    for ctx, queries in ((a, b), (b, a)):
        ids = build_context(ctx, template, tok, entry["words"]).token_ids
        with torch.no_grad():
            embeds = base.get_input_embeddings()(ids.unsqueeze(0))
        scores = score_texts(base, tok, template, entry["words"], [t for t, _ in queries], embeds)
        log_probs.append(torch.log_softmax(scores, dim=-1))
        gold += [list(entry["words"]).index(label) for _, label in queries]
    by_hand = torch.cat(log_probs).gather(1, torch.tensor(gold)[:, None]).squeeze(1)
    assert entry["log_prob"] == pytest.approx(float(by_hand.mean()), abs=1e-4)
    public, public_gold = held_out_log_probs(base, tok, template, entry["words"], (a, b))  # what the study reads
    assert public_gold.tolist() == gold
    torch.testing.assert_close(public.gather(1, public_gold[:, None]).squeeze(1), by_hand, atol=1e-5, rtol=0)
    assert choice.forward_passes > 0 and choice.examples == len(EXAMPLES)
    assert choose_template(base, tok, EXAMPLES, WORDS, seed=1).scores == choice.scores  # deterministic


def test_the_budget_bounds_the_forward_passes(pair):
    base, tok = pair
    full = choose_template(base, tok, EXAMPLES, WORDS)
    per_candidate = full.forward_passes // len(full.scores)
    one = choose_template(base, tok, EXAMPLES, WORDS, budget=per_candidate)
    assert one.forward_passes == per_candidate and sum("log_prob" in s for s in one.scores) == 1
    assert all("over the budget" in s["skipped"] for s in one.scores[1:])
    none = choose_template(base, tok, EXAMPLES, WORDS, budget=0)
    assert none.forward_passes == 0 and none.template == TEMPLATE_CATALOGUE[0][1] and none.label_words == WORDS
    with pytest.raises(ValueError, match="budget=-1"):
        choose_template(base, tok, EXAMPLES, WORDS, budget=-1)


def test_one_example_cannot_be_held_out(pair):
    choice = choose_template(*pair, EXAMPLES[:1], WORDS)
    assert choice.template == TEMPLATE_CATALOGUE[0][1] and choice.scores == [] and choice.forward_passes == 0


class RecordingTokenizer:
    """The real tokenizer, recording every text it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.texts: list[str] = []

    def __call__(self, text, *args, **kwargs):
        self.texts.extend([text] if isinstance(text, str) else list(text))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_the_choice_sees_only_the_labelled_examples(pair):
    base, tok = pair
    recorder = RecordingTokenizer(tok)
    choice = choose_template(base, recorder, EXAMPLES, WORDS)
    pieces = {piece.strip() for _, t in TEMPLATE_CATALOGUE for piece in (*t.parts(), t.example_separator)}
    words = {w for candidate in word_candidates(WORDS) for w in candidate.values()}
    allowed = {text for text, _ in EXAMPLES} | pieces | words | {"a", ""}  # "a": the tokenizer's BOS probe
    seen = {text.strip() for text in recorder.texts}
    assert seen <= allowed, seen - allowed
    assert {text for text, _ in EXAMPLES} <= seen and not seen & set(TEST_TEXTS)
    # and the same examples give the same choice whatever is scored afterwards
    clf = CPTClassifier((base, tok), template="auto", labels=WORDS, train=TrainSettings(steps=1, batch_size=2))
    clf.fit([t for t, _ in EXAMPLES], [label for _, label in EXAMPLES])
    clf.predict(TEST_TEXTS)
    assert clf.template_choice_["format"] == choice.template.format


def test_the_classifier_records_the_choice_and_loads_it_back(tiny_dir, tmp_path):
    clf = CPTClassifier(str(tiny_dir), template="auto", labels=WORDS, train=TrainSettings(steps=1, batch_size=2))
    clf.fit([t for t, _ in EXAMPLES], [label for _, label in EXAMPLES])
    assert clf.template_.format == clf.template_choice_["format"]
    assert clf.label_words_ == {k: v for k, v in clf.template_choice_["words"].items()}
    clf.save(tmp_path / "clf")
    info = json.loads((tmp_path / "clf" / "cptune_classifier.json").read_text())
    assert info["template"]["format"] == clf.template_.format and info["template_choice"] == clf.template_choice_
    again = CPTClassifier.load(tmp_path / "clf")
    assert again.template_ == clf.template_ and again.template_choice_ == clf.template_choice_
    np.testing.assert_allclose(again.predict_proba(TEST_TEXTS), clf.predict_proba(TEST_TEXTS), atol=1e-6)


def test_a_fixed_template_is_used_as_given(tiny_dir):
    clf = CPTClassifier(str(tiny_dir), template="{x} => {y}", labels=WORDS, train=TrainSettings(steps=1, batch_size=2))
    clf.fit([t for t, _ in EXAMPLES], [label for _, label in EXAMPLES])
    assert clf.template_.format == "{x} => {y}" and clf.template_choice_ is None and clf.label_words_ == WORDS


def test_the_command_line_chooses_when_asked_and_records_it(tiny_dir, tmp_path, capsys):
    import csv

    from cptune.app.cli import main

    data = tmp_path / "d.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *EXAMPLES])
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--template", "auto", "--steps", "1",
                 "--output", str(out)]) == 0
    assert "cptune: chose template" in capsys.readouterr().err
    info = json.loads((out / "cptune_classifier.json").read_text())
    assert info["template_choice"]["format"] == info["template"]["format"]
    grid = tmp_path / "grid"
    assert main(["compare", "--data", str(data), "--shots", "2", "--train-size", "6", "--seeds", "0", "--methods",
                 "icl", "--template", "auto", "--test-size", "2", "--model", str(tiny_dir), "--output", str(grid)]) == 0
    row = json.loads((grid / "results.jsonl").read_text().splitlines()[0])
    assert row["template"] == "auto" and row["template_choice"]["examples"] == 6  # the cell's labelled data only


def test_auto_is_the_default_of_the_classifier_the_train_command_and_the_demo(tiny_dir, tmp_path, capsys):
    import csv

    from cptune.app.cli import main
    from cptune.app.demo import DemoSettings
    from cptune.models import load_model

    texts, labels = [t for t, _ in EXAMPLES], [label for _, label in EXAMPLES]
    clf = CPTClassifier(str(tiny_dir), labels=WORDS, train=TrainSettings(steps=1, batch_size=2)).fit(texts, labels)
    expected = choose_template(*load_model(str(tiny_dir), device="cpu", dtype="float32"), EXAMPLES, WORDS)
    assert clf.template_choice_ is not None and clf.template_.format == expected.template.format
    assert clf.label_words_ == expected.label_words
    data = tmp_path / "d.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *EXAMPLES])
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--steps", "1", "--output",
                 str(tmp_path / "clf")]) == 0
    info = json.loads((tmp_path / "clf" / "cptune_classifier.json").read_text())
    assert info["template_choice"]["format"] == info["template"]["format"] and info["template_choice"]["scores"]
    assert "cptune: chose template" in capsys.readouterr().err
    assert DemoSettings().template == "auto"


# -- finalists: the best few candidates judged after a few CPT steps ---------------------------------

FINALIST_TEMPLATE = TEMPLATE_CATALOGUE[0][1]
LOWER, CAPITAL = {"pos": "positive", "neg": "negative"}, {"pos": "Positive", "neg": "Negative"}


def _labelled():
    from conftest import DEMOS, QUERIES

    return DEMOS + QUERIES


def _ranked_choice() -> TemplateChoice:
    """A choice whose ICL ranking puts the lower-case words first (numbers made up for the test)."""
    return TemplateChoice(FINALIST_TEMPLATE, dict(LOWER),
                          candidates=[(-0.1, FINALIST_TEMPLATE, dict(LOWER)), (-0.2, FINALIST_TEMPLATE, dict(CAPITAL))])


def test_a_finalist_that_cpt_collapses_loses_to_one_that_it_does_not():
    model = biased_gpt2("positive", seed=1)  # " positive" gains 30 nats after every input; " Positive" does not
    recipe = CPTRecipe(train=TrainSettings(steps=40, batch_size=2))
    out = choose_finalist(model, tiny_tokenizer(), _labelled(), _ranked_choice(), recipe, finalists=2, steps=2)
    assert out.label_words == CAPITAL and out.template == FINALIST_TEMPLATE
    lower, capital = out.finalists
    assert lower["words"] == LOWER and lower["collapsed"] and lower["top_share"] > collapse_limit(0.5)
    assert lower["nll"] > capital["nll"]
    assert all(f["steps"] == 2 for f in out.finalists)
    assert lower["inputs"] == {"training rows (in the context: optimistic)": len(_labelled()),
                               "domain-context": DOMAIN_TEXTS, "content-free": 3, "unlabeled": 0}
    assert "2 finalists after 2 CPT steps" in out.summary() and out.to_json()["finalists"] == out.finalists


def test_finalists_are_judged_on_the_rows_outside_the_context():
    model = biased_gpt2("positive", seed=1)
    recipe = CPTRecipe(train=TrainSettings(steps=40, batch_size=2, seed=3))
    out = choose_finalist(model, tiny_tokenizer(), _labelled(), _ranked_choice(), recipe, finalists=2, steps=1,
                          context_size=4, unlabeled=["a bore", "great fun"])
    assert out.label_words == CAPITAL
    assert [f["inputs"] for f in out.finalists] == [{"held-out labelled rows": len(_labelled()) - 4,
                                                     "content-free": 3, "unlabeled": 2}] * 2


def test_fewer_than_two_finalists_keep_the_icl_choice():
    model = biased_gpt2("positive", seed=1)
    choice = _ranked_choice()
    assert choose_finalist(model, tiny_tokenizer(), _labelled(), choice, CPTRecipe(), finalists=1) is choice
    single = TemplateChoice(FINALIST_TEMPLATE, dict(LOWER), candidates=choice.candidates[:1])
    assert choose_finalist(model, tiny_tokenizer(), _labelled(), single, CPTRecipe(), finalists=3) is single
    with pytest.raises(ValueError, match="finalists=-1 must be an integer >= 0"):
        choose_finalist(model, tiny_tokenizer(), _labelled(), choice, CPTRecipe(), finalists=-1)
    with pytest.raises(ValueError, match="steps=0"):
        choose_finalist(model, tiny_tokenizer(), _labelled(), choice, CPTRecipe(), finalists=2, steps=0)


def test_the_classifier_runs_the_finalists_when_asked_and_saves_what_they_measured(tmp_path):
    texts, labels = zip(*_labelled(), strict=True)
    clf = CPTClassifier((biased_gpt2("positive", seed=1), tiny_tokenizer()), labels=LOWER, finalists=3,
                        train=TrainSettings(steps=2, batch_size=2), verbose=False).fit(list(texts), list(labels))
    records = clf.template_choice_["finalists"]
    assert len(records) == 3
    won = min(records, key=lambda f: (f["collapsed"], f["nll"]))
    assert (clf.template_.format, {str(k): v for k, v in clf.label_words_.items()}) == (won["format"], won["words"])
    clf.save(tmp_path / "clf")
    loaded = CPTClassifier.load(tmp_path / "clf", model=clf.model)
    assert loaded.template_choice_["finalists"] == records and loaded.template_ == clf.template_
    with pytest.raises(ValueError, match="finalists=2 chooses among template='auto' candidates"):
        CPTClassifier(template="input: {x} output: {y}", finalists=2)
    with pytest.raises(ValueError, match="finalists=True must be an integer"):
        CPTClassifier(finalists=True)


def test_the_summary_tells_a_runner_up_of_the_same_format_by_its_words():
    from cptune.selection import TemplateChoice
    from cptune.text.template import Template

    fmt = "Review: {x}\nSentiment: {y}"
    scores = [{"format": fmt, "words": {"0": "negative", "1": "positive"}, "log_prob": -0.193, "accuracy": 0.94},
              {"format": fmt, "words": {"0": "Negative", "1": "Positive"}, "log_prob": -0.350, "accuracy": 0.9},
              {"format": "input: {x} output: {y}", "words": {"0": "negative", "1": "positive"}, "log_prob": -0.5,
               "accuracy": 0.8}]
    choice = TemplateChoice(Template(fmt), {0: "negative", 1: "positive"}, scores, examples=16)
    assert f"; next {fmt!r} with words {{'0': 'Negative', '1': 'Positive'}} -0.350)" in choice.summary()
    other = TemplateChoice(Template(fmt), {0: "negative", 1: "positive"}, [scores[0], scores[2]], examples=16)
    assert "; next 'input: {x} output: {y}' -0.500)" in other.summary()  # another format: its name says it
