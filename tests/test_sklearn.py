"""CPTClassifier as a scikit-learn estimator, on the tiny model: parameters, clone, fitted state, score,
cross-validation and grid search."""

import numpy as np
import pytest
from sklearn.base import clone, is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score

from cptune import CPTClassifier, Template, TrainSettings
from cptune.app import classifier as classifier_module

WORDS = ["fun", "dull", "great", "bad", "joy", "bore", "gripping", "long"]
TEXTS = [f"a {w} film, part {i}" for i in range(2) for w in WORDS]  # 16 texts
LABELS = [1 - k % 2 for _ in range(2) for k in range(len(WORDS))]  # 1 = positive, 0 = negative: ints stay ints
FAST = TrainSettings(steps=2, batch_size=4, lr=1e-2, seed=0)


@pytest.fixture
def estimator(tiny_dir):
    return CPTClassifier(str(tiny_dir), labels={0: "negative", 1: "positive"}, train=FAST, context_size=4)


def test_get_params_are_the_constructor_arguments_as_given(estimator, tiny_dir):
    params = estimator.get_params()
    assert params["model"] == str(tiny_dir) and params["train"] is FAST and params["context_size"] == 4
    assert params["labels"] == {0: "negative", 1: "positive"} and params["template"] == "auto"
    assert set(params) == {"model", "template", "labels", "train", "recipe", "context_size", "length_normalize",
                           "calibrate", "balance_guard", "batch_size", "verbose", "device", "dtype", "device_map",
                           "selection_budget", "finalists", "choose_steps"}
    assert is_classifier(estimator)


def test_set_params_checks_values_and_keeps_the_old_ones_on_error(estimator):
    assert estimator.set_params(context_size=2, template=Template("{x} => {y}")) is estimator
    assert estimator.context_size == 2
    with pytest.raises(ValueError, match="context_size=0"):
        estimator.set_params(context_size=0, batch_size=3)
    assert estimator.context_size == 2 and estimator.batch_size == 8  # nothing of the failed call stuck
    with pytest.raises(ValueError, match="no parameter 'lr'.*parameters: model, template"):
        estimator.set_params(lr=1e-3)


def test_unfitted_use_raises_sklearns_not_fitted_error(estimator, tmp_path):
    for call, name in ((lambda: estimator.predict(["x"]), "predict()"),
                       (lambda: estimator.predict_proba(["x"]), "predict_proba()"),
                       (lambda: estimator.save(tmp_path / "c"), "save()")):
        with pytest.raises(NotFittedError, match="not fitted") as err:
            call()
        assert str(err.value).endswith(f"before {name}"), err.value  # the method called, not an inner one
    assert not hasattr(estimator, "classes_")


def test_clone_is_an_unfitted_copy_with_equal_parameters(estimator):
    estimator.fit(TEXTS, LABELS)
    copy = clone(estimator)
    assert copy is not estimator and not hasattr(copy, "cpt_model_") and not hasattr(copy, "classes_")
    assert copy.get_params().keys() == estimator.get_params().keys()
    assert all(copy.get_params()[k] == v for k, v in estimator.get_params().items())
    # the same data and seed give the same fit
    copy.fit(TEXTS, LABELS)
    np.testing.assert_array_equal(copy.predict_proba(TEXTS), estimator.predict_proba(TEXTS))


def test_fitted_attributes_end_in_an_underscore_and_score_is_accuracy(estimator):
    estimator.fit(TEXTS, LABELS)
    fitted = {k for k in vars(estimator) if k.endswith("_") and not k.startswith("_")}
    assert {"classes_", "label_words_", "cpt_model_", "examples_", "train_result_", "placement_"} <= fitted
    assert estimator.classes_ == [0, 1]
    predicted = estimator.predict(TEXTS)
    assert estimator.score(TEXTS, LABELS) == pytest.approx(np.mean(np.array(predicted) == np.array(LABELS)))


def test_clones_share_the_base_model_loaded_by_name(estimator):
    a = clone(estimator).fit(TEXTS, LABELS)
    b = clone(estimator).fit(TEXTS, LABELS)
    assert a._base()[0] is b._base()[0]  # one load for both
    assert len(classifier_module._SHARED) == 1


def test_cross_val_score_with_two_folds(estimator):
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=0)
    scores = cross_val_score(estimator, np.array(TEXTS, dtype=object), np.array(LABELS), cv=folds)
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    # each fold's score is that of a clone fitted on the other fold
    for (train, test), score in zip(folds.split(TEXTS, LABELS), scores, strict=True):
        model = clone(estimator).fit([TEXTS[i] for i in train], [LABELS[i] for i in train])
        assert score == pytest.approx(model.score([TEXTS[i] for i in test], [LABELS[i] for i in test]))


def test_grid_search_over_two_learning_rates(estimator):
    grid = {"train": [TrainSettings(steps=2, batch_size=4, lr=1e-3, seed=0), FAST]}
    search = GridSearchCV(estimator, grid, cv=StratifiedKFold(n_splits=2, shuffle=True, random_state=0))
    search.fit(TEXTS, LABELS)
    assert len(search.cv_results_["params"]) == 2
    best = search.best_params_["train"]
    assert best.lr in (1e-3, 1e-2)
    assert search.best_estimator_.train == best and hasattr(search.best_estimator_, "cpt_model_")
    assert search.predict(TEXTS[:3]) == search.best_estimator_.predict(TEXTS[:3])


def test_train_settings_with_only_lr_keep_the_default_steps():
    from cptune.training import DEFAULT_STEPS

    assert DEFAULT_STEPS == 40
    assert TrainSettings(lr=3e-3).steps == DEFAULT_STEPS and TrainSettings(lr=3e-3).total_steps(16) == 40
    assert TrainSettings(epochs=2, batch_size=4).steps is None
    assert TrainSettings(epochs=2, batch_size=4).total_steps(16) == 8  # an explicit epoch count still counts
    assert TrainSettings(steps=40, epochs=1) == TrainSettings()  # saves before 0.3 stored both


def test_the_readme_grid_search_example_runs_and_changes_only_the_learning_rate(tiny_dir):
    import dataclasses
    import functools
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "GridSearchCV(" in b)
    assert "from cptune import CPTClassifier, TrainSettings" in block
    # the README's code as written, with the tiny model (and a fixed template, to save time) as the default
    on_tiny = functools.partial(CPTClassifier, str(tiny_dir), template="input: {x} output: {y}", verbose=False)
    namespace = {"texts": TEXTS, "labels": LABELS, "on_tiny": on_tiny}
    exec(block.replace("from cptune import CPTClassifier, TrainSettings",  # noqa: S102 - the README's own code
                       "from cptune import TrainSettings\nCPTClassifier = on_tiny"), namespace)
    search = namespace["search"]
    settings = [p["train"] for p in search.cv_results_["params"]]
    assert [s.lr for s in settings] == [1e-3, 3e-3]
    assert all(dataclasses.replace(s, lr=1e-3) == TrainSettings() for s in settings)  # nothing else changed
    assert len(search.best_estimator_.train_result_.losses) == 40
