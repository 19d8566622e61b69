"""More labelled examples than the context holds, labels of any type, devices: on a tiny model."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from cptune import CPTClassifier, Template, TrainSettings
from cptune.recipe import CPTRecipe, context_examples, cpt_model_for, fit_cpt
from cptune.text.context import build_context, render_queries
from cptune.text.template import label_word_problem, words_needed_error
from tiny import tiny_model, tiny_tokenizer

WORDS = ["fun", "dull", "great", "bad", "joy", "bore", "gripping", "long", "moving", "thin", "best", "waste"]
LABELLED = [(f"a {word} film number {i}", "pos" if k % 2 == 0 else "neg") for i in range(3)
            for k, word in enumerate(WORDS)]  # 36 examples, 18 per class


def _pair():
    return tiny_model("llama"), tiny_tokenizer()


# -- choosing the context ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 5, 8, 35])
@pytest.mark.parametrize("seed", [0, 3])
def test_context_examples_balanced_seeded_and_unsorted(size, seed):
    chosen = context_examples(LABELLED, size, seed)
    assert len(chosen) == size and len(set(chosen)) == size and set(chosen) <= set(LABELLED)
    counts = Counter(label for _, label in chosen)
    assert max(counts.values()) - min(counts.get("pos", 0), counts.get("neg", 0)) <= 1  # balanced
    assert chosen == context_examples(LABELLED, size, seed)  # the same seed draws the same context
    if size >= 4:  # rounds of one example per class: never all of one class first
        assert [label for _, label in chosen[:2]].count("pos") == 1


def test_context_examples_fill_from_other_classes_when_one_runs_out():
    data = [("a", "x"), ("b", "y"), ("c", "y"), ("d", "y"), ("e", "y")]
    chosen = context_examples(data, 4, 0)
    assert Counter(label for _, label in chosen) == {"x": 1, "y": 3}
    assert context_examples(data, None, 0) == data and context_examples(data, 5, 1) == data  # all: given order


@pytest.mark.parametrize("size", [0, -1, 37, 2.5, True])
def test_context_examples_refuse_bad_sizes(size):
    with pytest.raises(ValueError, match="context_size"):
        context_examples(LABELLED, size, 0)


def test_every_example_is_a_query_and_k_of_them_the_context():
    base, tok = _pair()
    template, words = Template("input: {x} output: {y}"), {"pos": "positive", "neg": "negative"}
    recipe = CPTRecipe(train=TrainSettings(steps=1, batch_size=len(LABELLED), lr=1e-2, seed=5))
    model, result = fit_cpt(base, tok, LABELLED, template, words, recipe, context_size=6)
    demos = context_examples(LABELLED, 6, seed=5)
    assert model.config.cpt_token_ids == build_context(demos, template, tok, words).token_ids.tolist()
    # step 1 sees one batch holding every query: its loss is the untrained model's loss on all 36
    fresh = cpt_model_for(base, build_context(demos, template, tok, words), recipe)
    with torch.no_grad():
        expected = fresh(**render_queries(LABELLED, template, tok, words)).loss
    assert result.losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_a_context_too_long_for_the_model_says_how_many_tokens():
    base, tok = _pair()
    base.config.max_position_embeddings = 64
    clf = CPTClassifier((base, tok), labels={"pos": "positive", "neg": "negative"},
                        train=TrainSettings(steps=1, batch_size=2))
    with pytest.raises(ValueError, match=r"context of 36 demonstrations is \d+ tokens.*more than the model's 64.*"
                                         r"context_size"):
        clf.fit([t for t, _ in LABELLED], [label for _, label in LABELLED])
    clf.context_size = 2
    clf.fit([t for t, _ in LABELLED], [label for _, label in LABELLED])  # 2 demonstrations fit
    assert len({i for i in clf.cpt_model_.prompt_encoder.example_index.tolist() if i >= 0}) == 2


def test_context_size_larger_than_the_data_is_refused():
    clf = CPTClassifier(_pair(), context_size=10)
    with pytest.raises(ValueError, match="context_size=10 but fit got 4"):
        clf.fit(["a", "b", "c", "d"], ["x", "y", "x", "y"])
    with pytest.raises(ValueError, match="context_size=0"):
        CPTClassifier(_pair(), context_size=0)


# -- labels keep their type ----------------------------------------------------------------------

def _texts_labels(labels):
    texts = [t for t, _ in LABELLED[:8]]
    return texts, [labels[0] if lab == "pos" else labels[1] for _, lab in LABELLED[:8]]


@pytest.mark.parametrize("labels", [(1, 0), (True, False), (1.5, -2.0), ("pos", "neg")])
def test_labels_come_back_with_their_type_and_survive_save_and_load(labels, tmp_path, tiny_dir):
    texts, y = _texts_labels(labels)
    clf = CPTClassifier(str(tiny_dir), labels={labels[0]: "positive", labels[1]: "negative"},
                        train=TrainSettings(steps=2, batch_size=2, lr=1e-2))
    clf.fit(texts, y)
    assert clf.classes_ == list(labels) and all(type(c) is type(labels[0]) for c in clf.classes_)
    predicted = clf.predict(texts)
    assert set(predicted) <= set(labels) and all(type(p) is type(labels[0]) for p in predicted)
    clf.save(tmp_path / "clf")
    again = CPTClassifier.load(tmp_path / "clf")
    assert again.classes_ == clf.classes_ and [type(c) for c in again.classes_] == [type(c) for c in clf.classes_]
    assert again.predict(texts) == predicted
    assert again.examples_ == clf.examples_
    np.testing.assert_allclose(again.predict_proba(texts), clf.predict_proba(texts), atol=1e-6)


def test_labels_seen_in_fit_are_sorted_and_numpy_scalars_become_python(tiny_dir):
    texts, y = _texts_labels((np.str_("pos"), np.str_("neg")))
    clf = CPTClassifier(str(tiny_dir), train=TrainSettings(steps=1, batch_size=2)).fit(texts, y)
    assert clf.classes_ == ["neg", "pos"] and all(type(c) is str for c in clf.classes_)
    assert clf.label_words_ == {"neg": "neg", "pos": "pos"}  # words: written as themselves
    texts, y = _texts_labels((np.int64(2), np.int64(0)))  # sorted and plain ints in the refusal too
    with pytest.raises(ValueError, match=r"^labels 0, 2 are not words .* labels=\{0: 'negative', 2: 'positive'\}$"):
        CPTClassifier(str(tiny_dir), train=TrainSettings(steps=1, batch_size=2)).fit(texts, y)


# -- labels that are not words -------------------------------------------------------------------

@pytest.mark.parametrize("word, problem", [
    ("0", "has no letter"), ("-3", "has no letter"), ("4.5", "has no letter"), (" ", "has no letter"),
    ("LABEL_0", "is a code"), ("class1", "is a code"), ("c-2", "is a code"), ("id42", "is a code"),
    ("positive", None), ("neg", None), ("A", None), ("Sci/Tech", None), ("4 stars", None), ("True", None),
    ("très bien", None), ("体育", None),
])
def test_the_label_word_rule(word, problem):
    found = label_word_problem(word)
    assert (found is None) if problem is None else found.startswith(problem), found


@pytest.mark.parametrize("labels, shown", [
    ([0, 1], "labels 0, 1 are not words"),
    (["LABEL_0", "LABEL_1"], "labels 'LABEL_0', 'LABEL_1' are not words"),
    ([0.5, 1.5], "labels 0.5, 1.5 are not words"),
    (["c2", "good"], "label 'c2' is not a word the model can answer with: 'c2' is a code"),  # only it is named
])
def test_fit_refuses_labels_that_are_not_words_and_says_how_to_give_words(labels, shown):
    texts, y = _texts_labels(labels)
    clf = CPTClassifier(_pair(), template="input: {x} output: {y}", train=TrainSettings(steps=1, batch_size=2))
    for given in (None, list(labels)):  # nothing given, or a list: each label would be written as itself
        clf.set_params(labels=given)
        with pytest.raises(ValueError) as err:
            clf.fit(texts, y)
        message = str(err.value)
        assert message.startswith(shown) and "\n" not in message, message
        assert message.endswith(f"labels={{{labels[0]!r}: 'negative', {labels[1]!r}: 'positive'}}"), message
        assert not hasattr(clf, "cpt_model_")  # refused before any training


def test_words_for_labels_that_are_not_words_are_used_as_given():
    texts, y = _texts_labels((1, 0))
    fast = TrainSettings(steps=1, batch_size=2)
    clf = CPTClassifier(_pair(), template="input: {x} output: {y}", labels={0: "negative", 1: "positive"},
                        train=fast).fit(texts, y)
    assert clf.classes_ == [0, 1] and clf.label_words_ == {0: "negative", 1: "positive"}
    clf = CPTClassifier(_pair(), template="input: {x} output: {y}", labels={0: "0", 1: "1"}, train=fast)
    assert clf.fit(texts, y).label_words_ == {0: "0", 1: "1"}  # a mapping is the user's explicit choice


def test_every_built_in_dataset_and_the_demo_have_label_words():
    from cptune.app.demo import DATASET_TEMPLATES
    from cptune.data import DATASET_DEFAULTS
    from cptune.data.builtin import BUILTIN_NAMES

    assert set(BUILTIN_NAMES) <= set(DATASET_DEFAULTS)  # compare's built-ins: none falls back to its labels
    for name, (_, words) in {**DATASET_DEFAULTS, **DATASET_TEMPLATES}.items():
        assert words, name
        assert all(label_word_problem(word) is None for word in words.values()), (name, words)


def test_more_labels_than_the_message_spells_out():
    error = words_needed_error(list(range(6)), "--label-words")
    assert str(error).endswith("e.g. --label-words 0=WORD,1=WORD,2=WORD,3=WORD,...")
    assert str(error).startswith("labels 0, 1, 2, 3, ... are not words")
    assert words_needed_error(["negative", "positive"], "--label-words") is None


@pytest.mark.parametrize("labels, message", [
    ({1: "one", "1": "uno"}, "written the same"),
    ([1, True], "same label"),
    ({(1, 2): "pair"}, "tuple"),
    ([float("inf"), 1.0], "finite"),
    ({"a": ""}, "non-empty"),
    ("ab", "mapping or a list"),
])
def test_ambiguous_or_unsupported_labels_are_refused(labels, message):
    with pytest.raises(ValueError, match=message):
        CPTClassifier(_pair(), labels=labels)


def test_an_unknown_label_in_fit_names_it():
    clf = CPTClassifier(_pair(), labels={0: "negative", 1: "positive"})
    with pytest.raises(ValueError, match="label 2 has no label word; known labels: \\[0, 1\\]"):
        clf.fit(["a", "b"], [0, 2])


def test_a_classifier_saved_before_typed_labels_still_loads(tmp_path, tiny_dir):
    clf = CPTClassifier(str(tiny_dir), labels={"pos": "positive", "neg": "negative"},
                        train=TrainSettings(steps=1, batch_size=2)).fit(["fun", "dull"], ["pos", "neg"])
    clf.save(tmp_path / "clf")
    info_path = tmp_path / "clf" / "cptune_classifier.json"
    info = json.loads(info_path.read_text())
    info["label_words"] = dict(info.pop("labels"))  # the 0.1 layout: a {label: word} object
    info_path.write_text(json.dumps(info))
    (tmp_path / "clf" / "cptune_manifest.json").unlink()  # as a 0.1 folder edited by hand: no manifest
    assert CPTClassifier.load(tmp_path / "clf").classes_ == ["pos", "neg"]


def test_fit_takes_a_labelled_source_alone(tiny_dir):
    pairs = LABELLED[:6]
    a = CPTClassifier(str(tiny_dir), train=TrainSettings(steps=1, batch_size=2)).fit(pairs)
    b = CPTClassifier(str(tiny_dir), train=TrainSettings(steps=1, batch_size=2)).fit(
        [t for t, _ in pairs], [label for _, label in pairs])
    assert a.examples_ == b.examples_
    np.testing.assert_array_equal(a.predict_proba(["fun"]), b.predict_proba(["fun"]))
