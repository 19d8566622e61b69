"""Choosing the steps by cross-validation on the rows outside the context (issue 24 item 4): a schedule
stopped early, the folds, the held-out scores at each candidate, and the classifier that trains what
was chosen and keeps the record through save/load."""

import json
from dataclasses import replace

import pytest
import torch

from cptune import CPTClassifier, Template, TrainSettings
from cptune.crossval import MIN_HELD_OUT, StepsChoice, choose_steps, deal_folds, step_candidates
from cptune.recipe import CPTRecipe, context_examples, cpt_model_for
from cptune.scoring import ContextScorer
from cptune.text.context import build_context, render_queries
from cptune.training import train
from tiny import tiny_model, tiny_tokenizer

WORDS = ["fun", "dull", "great", "bad", "joy", "bore", "gripping", "long", "bright", "thin"]
ROWS = [(f"a {w} film, part {i}", "pos" if k % 2 == 0 else "neg") for i in range(2) for k, w in enumerate(WORDS)]
LABEL_WORDS = {"pos": "positive", "neg": "negative"}
TEMPLATE = Template("input: {x} output: {y}")
SCHEDULE = TrainSettings(steps=8, batch_size=4, lr=5e-2, seed=0)


def _context_model(model, tokenizer, rows):
    return cpt_model_for(model, build_context(rows[:4], TEMPLATE, tokenizer, LABEL_WORDS), CPTRecipe(train=SCHEDULE))


# -- a schedule stopped early ----------------------------------------------------------------------

def test_a_run_stopped_early_is_the_first_steps_of_the_full_run():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    queries = render_queries(ROWS, TEMPLATE, tokenizer, LABEL_WORDS)
    full, seen = _context_model(model, tokenizer, ROWS), {}
    train(full, queries, SCHEDULE, progress=False,
          callback=lambda step, _: seen.setdefault(step, full.prompt_encoder.delta.detach().clone()))
    stopped = _context_model(model, tokenizer, ROWS)
    train(stopped, queries, replace(SCHEDULE, steps=3, schedule_steps=8), progress=False)
    assert torch.equal(stopped.prompt_encoder.delta, seen[3])
    assert not torch.equal(seen[3], seen[8])
    short = _context_model(model, tokenizer, ROWS)  # a 3-step schedule decays faster: another result
    train(short, queries, replace(SCHEDULE, steps=3), progress=False)
    assert not torch.equal(short.prompt_encoder.delta, seen[3])
    untouched = _context_model(model, tokenizer, ROWS)
    result = train(untouched, queries, replace(SCHEDULE, steps=0, schedule_steps=8), progress=False)
    assert result.losses == [] and not untouched.prompt_encoder.delta.any()


@pytest.mark.parametrize("fields", [dict(steps=9, schedule_steps=8), dict(steps=0), dict(steps=-1, schedule_steps=8),
                                    dict(steps=None, epochs=2, schedule_steps=8), dict(steps=0, schedule_steps=0)])
def test_a_schedule_shorter_than_the_run_or_without_steps_is_refused(fields):
    with pytest.raises(ValueError, match="steps="):
        TrainSettings(**fields)


# -- folds and candidates --------------------------------------------------------------------------

def test_folds_hold_every_row_once_and_each_label_evenly():
    rows = [(f"t{i}", "a") for i in range(7)] + [(f"u{i}", "b") for i in range(4)]
    folds = deal_folds(rows, 2, seed=3)
    assert sorted(r for fold in folds for r in fold) == sorted(rows)
    for label, count in (("a", 7), ("b", 4)):
        sizes = [sum(r[1] == label for r in fold) for fold in folds]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == count
    assert abs(len(folds[0]) - len(folds[1])) <= 1
    assert deal_folds(rows, 2, seed=3) == folds and deal_folds(rows, 2, seed=4) != folds
    with pytest.raises(ValueError, match="folds=1"):
        deal_folds(rows, 1, seed=0)


def test_the_candidates_are_the_schedule_quarters_from_no_step():
    assert step_candidates(40) == [0, 10, 20, 30, 40]
    assert step_candidates(2) == [0, 1, 2]


# -- the choice ------------------------------------------------------------------------------------

def test_too_few_rows_outside_the_context_keep_the_schedule():
    rows = ROWS[: 4 + MIN_HELD_OUT - 1]
    choice = choose_steps(tiny_model(), tiny_tokenizer(), rows, TEMPLATE, LABEL_WORDS, CPTRecipe(train=SCHEDULE), 4)
    assert (choice.steps, choice.schedule_steps, choice.candidates) == (8, 8, [])
    assert f"{MIN_HELD_OUT - 1} rows outside the context" in choice.reason
    assert choice.settings(SCHEDULE) is SCHEDULE
    none = choose_steps(tiny_model(), tiny_tokenizer(), ROWS, TEMPLATE, LABEL_WORDS, CPTRecipe(train=SCHEDULE), None)
    assert none.reason is not None and none.steps == 8


def test_the_choice_scores_the_held_out_rows_at_each_candidate_and_keeps_the_best():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    recipe = CPTRecipe(train=SCHEDULE)
    choice = choose_steps(model, tokenizer, ROWS, TEMPLATE, LABEL_WORDS, recipe, 4)
    assert choice.held_out == len(ROWS) - 4 and choice.reason is None
    assert [c["steps"] for c in choice.candidates] == [0, 2, 4, 6, 8]
    best = max(choice.candidates, key=lambda c: (c["accuracy"], -c["nll"], -c["steps"]))
    assert choice.steps == best["steps"]
    # step 0 is the ICL context: the held-out rows scored after the untouched demonstrations
    demonstrations = context_examples(ROWS, 4, SCHEDULE.seed)
    rest = [row for row in ROWS if row not in demonstrations]
    held = [row for fold in deal_folds(rest, 2, SCHEDULE.seed) for row in fold]
    context = build_context(demonstrations, TEMPLATE, tokenizer, LABEL_WORDS)
    embeds = model.get_input_embeddings()(context.token_ids.unsqueeze(0))
    scorer = ContextScorer(model, tokenizer, TEMPLATE, LABEL_WORDS, embeds)
    log_probs = torch.log_softmax(scorer.scores(scorer.query_ids([t for t, _ in held])), dim=-1)
    gold = torch.tensor([list(LABEL_WORDS).index(label) for _, label in held])
    icl = choice.candidates[0]
    assert icl["accuracy"] == pytest.approx(float((log_probs.argmax(-1) == gold).float().mean()), abs=1e-4)
    assert icl["nll"] == pytest.approx(float(-log_probs.gather(1, gold[:, None]).mean()), abs=1e-3)
    assert len({c["nll"] for c in choice.candidates}) > 1  # training moved the held-out scores


def test_the_classifier_trains_the_steps_chosen_of_the_same_schedule(tmp_path):
    model, tokenizer = tiny_model(seed=2), tiny_tokenizer()  # (a model whose choice stops mid-schedule)
    clf = CPTClassifier((model, tokenizer), template=TEMPLATE, labels=LABEL_WORDS, train=SCHEDULE,
                        context_size=4, balance_guard=False, verbose=False, choose_steps=True)
    clf.fit(*zip(*ROWS, strict=True))
    chosen = clf.steps_choice_["steps"]
    assert 0 < chosen < 8
    assert clf.steps_choice_["schedule_steps"] == 8 and len(clf.train_result_.losses) == chosen
    same = replace(SCHEDULE, steps=chosen, schedule_steps=8)
    plain = CPTClassifier((model, tokenizer), template=TEMPLATE, labels=LABEL_WORDS, train=same, context_size=4,
                          balance_guard=False, verbose=False, choose_steps=False).fit(*zip(*ROWS, strict=True))
    assert plain.steps_choice_ is None
    assert torch.equal(clf.cpt_model_.prompt_encoder.delta, plain.cpt_model_.prompt_encoder.delta)
    assert plain.cpt_model_.prompt_encoder.delta.any()
    clf.save(tmp_path / "clf")
    info = json.loads((tmp_path / "clf" / "cptune_classifier.json").read_text())
    assert info["choose_steps"] is True and info["steps_choice"]["steps"] == chosen
    assert info["train"]["steps"] == 8 and info["train"]["schedule_steps"] is None  # the settings as given
    loaded = CPTClassifier.load(tmp_path / "clf", model=(model, tokenizer))
    assert loaded.choose_steps is True and loaded.steps_choice_ == clf.steps_choice_
    assert loaded.predict([t for t, _ in ROWS]) == clf.predict([t for t, _ in ROWS])
    del info["choose_steps"], info["steps_choice"]  # a save from before the choice: the schedule as given
    (tmp_path / "clf" / "cptune_classifier.json").write_text(json.dumps(info))
    (tmp_path / "clf" / "cptune_manifest.json").unlink()  # (the file no longer matches it)
    assert CPTClassifier.load(tmp_path / "clf", model=(model, tokenizer)).choose_steps is False


def test_choose_steps_must_be_a_bool():
    with pytest.raises(ValueError, match="choose_steps='yes' must be True or False"):
        CPTClassifier(choose_steps="yes")


def test_a_summary_names_the_choice_and_the_full_schedule():
    choice = StepsChoice(2, 8, 12, [{"steps": 0, "accuracy": 0.5, "nll": 0.7}, {"steps": 2, "accuracy": 0.75,
                                     "nll": 0.6}, {"steps": 8, "accuracy": 0.58, "nll": 0.9}], seconds=1.5)
    assert choice.summary() == ("2 of 8 CPT steps by 2-fold cross-validation on 12 rows outside the context "
                                "(held-out accuracy 0.750, 0.580 after all 8; 1.5 s)")
    assert choice.settings(SCHEDULE) == replace(SCHEDULE, steps=2, schedule_steps=8)


@pytest.mark.parametrize("flag", [["--choose-steps"], []])
def test_the_train_command_chooses_the_steps_when_asked(tiny_dir, tmp_path, capsys, flag):
    from cptune.app.cli import main

    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"{t.replace(',', ' ')},{y}\n" for t, y in ROWS))
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--template", "input: {x} output: {y}",
                 "--label-words", "pos=positive,neg=negative", "--steps", "4", "--context-size", "4",
                 "--output", str(out), *flag]) == 0
    captured = capsys.readouterr()
    info = json.loads((out / "cptune_classifier.json").read_text())
    if not flag:  # off by default
        assert info["choose_steps"] is False and info["steps_choice"] is None
        assert "trained 4 steps" in captured.out and "cptune: steps:" not in captured.err
    else:
        steps = info["steps_choice"]["steps"]
        assert info["choose_steps"] is True and info["steps_choice"]["held_out"] == len(ROWS) - 4
        assert f"cptune: steps: {steps} of 4 CPT steps by 2-fold cross-validation on 16 rows" in captured.err
        assert f"trained {steps} step" in captured.out
