"""The balance guard: batch calibration (pure, property-tested) and a collapse made by a tiny model's
chosen weights, detected, corrected, reported and kept through save/load."""

import json
import logging
import math

import pytest
import torch

import cptune
from conftest import DEMOS, LABEL_WORDS, QUERIES
from cptune.app.classifier import CPTClassifier
from cptune.app.cli import main
from cptune.balance import (
    DOMAIN_TEXTS,
    BalanceCheck,
    balance_inputs,
    collapse_limit,
    collapsed_label,
    domain_texts,
    label_shares,
    smallest_correction,
)
from cptune.scoring import batch_calibration, label_bias, remove_label_bias
from tiny import biased_gpt2, tiny_model, tiny_tokenizer

TEXTS = [t for t, _ in DEMOS + QUERIES]
LABELS = [label for _, label in DEMOS + QUERIES]
UNLABELED = ["a bore", "a delight", "thin and dull", "great fun", "far too long", "the actors shine bright"]
BALANCED_SEED = 8  # the tiny GPT-2 whose fitted classifier below is balanced as it is (checked in each test)


# -- pure functions ------------------------------------------------------------------------------

def test_collapse_limit_meets_the_issue_goals():
    assert collapse_limit(0.5) == pytest.approx(0.75)  # two balanced classes
    assert collapse_limit(1 / 3) == pytest.approx(2 / 3)
    assert collapse_limit(0.2) == pytest.approx(0.4)  # five: twice the balanced share
    assert collapse_limit(0.125) == pytest.approx(0.25)
    assert collapse_limit(0.9) == pytest.approx(0.95)  # a majority label may grow, never to everything


def test_collapsed_label_is_the_top_label_past_its_limit():
    balanced = [0.5, 0.5]
    assert collapsed_label([0, 0, 0, 1], balanced) is None  # 75% is the limit, not past it
    assert collapsed_label([1, 1, 1, 1, 1, 0], balanced) == 1
    assert collapsed_label([0] * 8 + [1] * 2, [0.9, 0.1]) is None  # as the labelled data is
    assert collapsed_label([], balanced) is None
    assert label_shares([2, 2, 0], 3) == [1 / 3, 0.0, 2 / 3]


def test_batch_calibration_balances_the_batch_mean_per_label():
    torch.manual_seed(0)
    batch = torch.randn(20, 4) * 3 + torch.tensor([5.0, 0.0, -2.0, 1.0])  # a strong bias to label 0
    calibrated = batch_calibration(batch, batch)
    means = calibrated.mean(dim=0)  # (C,)
    assert torch.allclose(means, means[0].expand(4), atol=1e-5)
    assert torch.allclose(calibrated.exp().sum(dim=-1), torch.ones(20), atol=1e-5)
    assert not torch.allclose(torch.log_softmax(batch, -1).mean(0), torch.log_softmax(batch, -1).mean(0)[0].expand(4),
                              atol=0.5)  # it was not balanced before


def test_batch_calibration_ignores_a_constant_per_row():
    torch.manual_seed(1)
    scores, batch = torch.randn(5, 3), torch.randn(7, 3)
    shifted = batch_calibration(scores + torch.randn(5, 1) * 10, batch + torch.randn(7, 1) * 10)
    assert torch.allclose(shifted, batch_calibration(scores, batch), atol=1e-5)


def test_remove_label_bias_by_hand():
    scores = torch.tensor([[math.log(0.9), math.log(0.1)], [math.log(0.6), math.log(0.4)]])
    bias = label_bias(scores)
    expected = [(math.log(0.9) + math.log(0.6)) / 2, (math.log(0.1) + math.log(0.4)) / 2]
    assert torch.allclose(bias, torch.tensor(expected))
    # row 2: p / exp(b) = (0.6 / sqrt(0.54), 0.4 / sqrt(0.04)), renormalised
    a, b = 0.6 / math.sqrt(0.54), 0.4 / math.sqrt(0.04)
    assert torch.allclose(remove_label_bias(scores, bias)[1].exp(), torch.tensor([a / (a + b), b / (a + b)]))
    with pytest.raises(ValueError, match="one number per label"):
        remove_label_bias(scores, torch.zeros(3))
    with pytest.raises(ValueError, match="m >= 1"):
        label_bias(torch.zeros(0, 2))


def test_the_correction_removes_as_little_bias_as_ends_the_collapse():
    torch.manual_seed(2)
    scores = torch.randn(40, 2) + torch.tensor([2.0, 0.0])  # most rows lean to label 0
    assert collapsed_label(scores.argmax(-1).tolist(), [0.5, 0.5]) == 0
    scale, bias = smallest_correction(scores, [0.5, 0.5])
    assert 0 < scale < 1 and torch.allclose(bias, scale * label_bias(scores))
    assert collapsed_label(remove_label_bias(scores, bias).argmax(-1).tolist(), [0.5, 0.5]) is None
    less = (scale - 0.05) * label_bias(scores)
    assert collapsed_label(remove_label_bias(scores, less).argmax(-1).tolist(), [0.5, 0.5]) == 0
    stuck = torch.tensor([[5.0, 0.0]] * 9 + [[0.0, 0.0]])  # only one row can move: never balanced
    assert smallest_correction(stuck, [0.5, 0.5])[0] == 1.0


def test_the_strict_limit_is_the_limit_of_the_limit():
    assert collapse_limit(0.5, strict=True) == pytest.approx(0.875)
    assert collapse_limit(0.2, strict=True) == pytest.approx(0.7)
    assert collapsed_label([0] * 17 + [1] * 3, [0.5, 0.5]) == 0  # 85%: past 75%
    assert collapsed_label([0] * 17 + [1] * 3, [0.5, 0.5], strict=True) is None  # within 87.5%


def test_still_collapsed_reads_the_corrected_shares():
    kept = BalanceCheck({"x": 4}, [0.5, 0.5], [1.0, 0.0], [0.75, 0.25], [0.0, 0.0])
    left = BalanceCheck({"x": 4}, [0.5, 0.5], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0])
    assert not kept.still_collapsed and left.still_collapsed
    assert "removed the label bias" in kept.summary(["a", "b"])


def test_domain_texts_are_seeded_draws_of_the_texts_words_at_their_mean_length():
    texts = ["a fine film", "dull and far too long", "great"]  # 9 words, mean 3
    made = domain_texts(texts, count=50, seed=3)
    assert len(made) == 50 and all(len(t.split()) == 3 for t in made)
    words = {w for t in texts for w in t.split()}
    assert {w for t in made for w in t.split()} <= words
    assert len({w for t in made for w in t.split()}) > 4  # draws, not one repeated text
    assert made == domain_texts(texts, count=50, seed=3) and made != domain_texts(texts, count=50, seed=4)
    assert domain_texts(["", "  "]) == [] and domain_texts(texts, count=0) == []
    assert len(domain_texts(texts)) == DOMAIN_TEXTS


def test_domain_context_inputs_only_stand_in_for_missing_held_out_rows():
    rows = list(zip(TEXTS, LABELS, strict=True))
    alone, labelled = balance_inputs(rows, rows, ["an unlabeled text here"], seed=2)
    assert list(alone) == ["training rows (in the context: optimistic)", "domain-context", "content-free",
                           "unlabeled"] and labelled == rows
    assert alone["domain-context"] == domain_texts(TEXTS + ["an unlabeled text here"], seed=2)
    held, labelled = balance_inputs(rows, rows[:4])
    assert "domain-context" not in held and labelled == rows[4:]


# -- a collapse made by chosen weights -------------------------------------------------------------

def _classifier(model, **kwargs) -> CPTClassifier:
    return CPTClassifier((model, tiny_tokenizer()), template="input: {x} output: {y}", labels=LABEL_WORDS,
                         train=cptune.TrainSettings(steps=5, batch_size=2), **kwargs)


def _biased_gpt2(word: str):
    return biased_gpt2(word, seed=BALANCED_SEED)


def test_a_collapse_is_detected_corrected_reported_and_saved(tmp_path, caplog):
    clf = _classifier(_biased_gpt2("positive"))
    with caplog.at_level(logging.INFO, logger="cptune"):
        clf.fit(TEXTS, LABELS, unlabeled=UNLABELED)
    pos = clf.classes_.index("pos")
    assert clf.balance_["shares"][pos] > collapse_limit(0.5)  # the weights made "positive" win
    assert clf.label_bias_ is not None and clf.label_bias_[pos] > clf.label_bias_[1 - pos]
    assert max(clf.balance_["corrected_shares"]) <= collapse_limit(0.5)
    assert clf.balance_["inputs"] == {"training rows (in the context: optimistic)": len(TEXTS),
                                      "domain-context": DOMAIN_TEXTS, "content-free": 3, "unlabeled": len(UNLABELED)}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("balance:")]
    assert len(lines) == 1 and "of the label bias" in lines[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    probe = TEXTS + UNLABELED
    unguarded = _classifier(_biased_gpt2("positive"), balance_guard=False).fit(TEXTS, LABELS)
    assert unguarded.label_bias_ is None
    assert sum(p == "pos" for p in unguarded.predict(probe)) > collapse_limit(0.5) * len(probe)
    predicted = clf.predict(probe)
    assert sum(p == "pos" for p in predicted) <= collapse_limit(0.5) * len(probe)  # the correction is used
    clf.save(tmp_path / "clf")
    loaded = CPTClassifier.load(tmp_path / "clf", model=(clf.model[0], tiny_tokenizer()))
    assert loaded.label_bias_ == clf.label_bias_ and loaded.balance_ == clf.balance_
    assert torch.equal(loaded.decision_scores(probe), clf.decision_scores(probe))


def test_held_out_rows_are_scored_when_the_context_leaves_some_out():
    clf = _classifier(_biased_gpt2("negative"), context_size=4).fit(TEXTS, LABELS)
    assert clf.balance_["inputs"] == {"held-out labelled rows": len(TEXTS) - 4, "content-free": 3, "unlabeled": 0}
    assert clf.label_bias_ is not None


def test_a_balanced_classifier_is_left_untouched():
    model = tiny_model("gpt2", seed=BALANCED_SEED)
    guarded = _classifier(model).fit(TEXTS, LABELS, unlabeled=UNLABELED)
    assert guarded.balance_["corrected_shares"] is None and guarded.label_bias_ is None
    assert max(guarded.balance_["shares"]) <= collapse_limit(0.5)
    plain = _classifier(model, balance_guard=False).fit(TEXTS, LABELS)
    assert plain.balance_ is None
    probe = TEXTS + UNLABELED
    assert torch.equal(guarded.decision_scores(probe), plain.decision_scores(probe))


def test_bad_unlabeled_and_guard_values_are_refused():
    with pytest.raises(ValueError, match="balance_guard"):
        CPTClassifier(balance_guard="yes")
    with pytest.raises(ValueError, match="unlabeled texts must be strings"):
        _classifier(tiny_model("gpt2")).fit(TEXTS, LABELS, unlabeled=["fine", 3])


def test_train_reads_unlabeled_texts_and_reports_the_balance(tiny_dir, tmp_path, capsys):
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"{t.replace(',', ' ')},{y}\n" for t, y in DEMOS + QUERIES))
    unlabeled = tmp_path / "to_label.txt"
    unlabeled.write_text("\n".join(UNLABELED) + "\n\n")
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--template", "input: {x} output: {y}",
                 "--label-words", "pos=positive,neg=negative", "--steps", "2", "--unlabeled", str(unlabeled),
                 "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{len(UNLABELED)} unlabeled" in err and "cptune: balance: " in err
    info = json.loads((out / "cptune_classifier.json").read_text())
    assert info["balance"]["inputs"]["unlabeled"] == len(UNLABELED)
    assert info["balance_guard"] is True


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.txt", None, "does not exist"),
    ("rows.csv", "text\na\n", "is a .csv data file"),
    ("empty.txt", "\n \n", "holds no text"),
])
def test_train_refuses_a_bad_unlabeled_file(tiny_dir, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    data = tmp_path / "train.csv"
    data.write_text("text,label\na fun film,pos\na dull film,neg\n")
    code = main(["train", "--model", str(tiny_dir), "--data", str(data), "--label-words", "pos=positive,neg=negative",
                 "--unlabeled", str(path), "--output", str(tmp_path / "clf")])
    err = capsys.readouterr().err
    assert code == 2 and f"cptune: error: --unlabeled {path} {message}" in err
    assert not (tmp_path / "clf").exists()


def test_the_demo_reports_what_its_saved_classifier_predicts(tmp_path):
    from cptune.app.classifier import shared_model
    from cptune.app.demo import DemoSettings, run_demo
    from cptune.data import load_dataset, sample_splits
    from cptune.scoring import classification_metrics, score_texts
    from cptune.text.template import Template

    folder = tmp_path / "biased"
    _biased_gpt2("positive").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    settings = DemoSettings(model=str(folder), template="input: {x} output: {y}", shots=2, test_size=12, steps=2,
                            output=str(tmp_path / "demo"))
    report = run_demo(settings, progress=False)
    cpt = next(row for row in report["results"] if row["method"] == "CPT")
    assert report["balance"]["bias"] is not None  # the biased model collapsed and the guard fired
    clf = CPTClassifier.load(tmp_path / "demo" / "classifier", model=str(folder), verbose=False)
    _, _, test = sample_splits(load_dataset(settings.dataset), settings.shots, settings.test_size, settings.seed)
    labels = list(clf.classes_)
    gold = [labels.index(ex.label) for ex in test]
    saved = [labels.index(label) for label in clf.predict([ex.text for ex in test])]
    assert cpt["confusion"] == classification_metrics(saved, gold, len(labels))["confusion"]
    base, tokenizer = shared_model(str(folder), settings.device, settings.dtype, None)
    with torch.no_grad():
        raw = score_texts(base, tokenizer, Template(settings.template), clf.label_words_, [ex.text for ex in test],
                          clf.cpt_model_.context_embeddings()).argmax(-1).tolist()
    assert raw != saved  # without the guard's bias the demo would report other predictions


@pytest.mark.parametrize("counts, reference, expected", [
    ([28, 2], None, "'a' was given to 93% of these 30 texts, against its 50% of the labelled rows"),
    ([20, 10], None, None),  # 67%: under the 75% limit
    ([19, 0], None, None),  # fewer than SHARE_NOTE_TEXTS texts
    ([9, 3, 3, 3, 2], None, "'a' was given to 45% of these 20 texts, against its 20%"),  # past 2/5
    ([27, 3], [0.8, 0.2], None),  # 90%: a label that had 80% of the rows may take up to 90%
    ([2, 28], [0.8, 0.2], "'b' was given to 93% of these 30 texts, against its 20%"),
])
def test_share_note_names_a_label_past_its_collapse_limit(counts, reference, expected):
    from cptune.balance import share_note

    note = share_note(counts, ["a", "b", "c", "d", "e"][:len(counts)], reference)
    assert (note is None) if expected is None else note.startswith(expected)

