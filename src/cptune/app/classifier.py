"""CPTClassifier: few-shot text classification with CPT behind fit / predict / save / load."""

from __future__ import annotations

import inspect
import math
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptune.app.card import write_classifier_card
from cptune.app.trained_texts import CONTEXT_ONLY, KEPT, TRAINING_DATA, TrainedTexts
from cptune.balance import balance_inputs, check_balance, label_shares
from cptune.cpt.files import CONFIG_NAME, read_config, read_json_object, save_adapter
from cptune.cpt.hub import push_folder, resolve_folder
from cptune.cpt.model import load_adapter
from cptune.cpt.saving import check_manifest
from cptune.crossval import choose_steps
from cptune.data.types import label_sort_key
from cptune.models import AUTO, DEFAULT_MODEL, load_model, placement, resolve_dtype
from cptune.recipe import CPTRecipe, context_examples, fit_cpt
from cptune.reporting import CptuneWarning, notice, quiet
from cptune.scoring import ContextScorer, score_texts
from cptune.selection import AUTO as AUTO_TEMPLATE
from cptune.selection import DEFAULT_BUDGET, choose_finalist, choose_template
from cptune.text.template import Template, words_needed_error
from cptune.training import TrainSettings

CLASSIFIER_FILE = "cptune_classifier.json"
LABEL_TYPES = (str, int, float, bool)
"""The label values a classifier keeps as they are (and writes to its JSON file as they are)."""


class NotFittedError(ValueError, AttributeError):
    """The classifier is used before :meth:`CPTClassifier.fit` (or ``load``). When scikit-learn is
    installed, scikit-learn's own ``NotFittedError`` (the same two bases) is raised instead."""


def _not_fitted(what: str) -> Exception:
    message = f"this CPTClassifier is not fitted yet; call fit() or CPTClassifier.load() before {what}"
    try:
        from sklearn.exceptions import NotFittedError as SklearnNotFitted
    except ImportError:
        return NotFittedError(message)
    return SklearnNotFitted(message)


class CPTClassifier:
    """A few-shot classifier: labelled examples become the CPT context and its training queries.

    A scikit-learn estimator (scikit-learn itself stays optional): the constructor stores its
    arguments as given (:meth:`get_params`, :meth:`set_params`, ``sklearn.clone``), :meth:`fit`
    sets the fitted attributes, which end in ``_`` (:attr:`classes_`, :attr:`label_words_`,
    :attr:`cpt_model_`, :attr:`examples_`, :attr:`context_examples_`, :attr:`trained_texts_`,
    :attr:`training_size_`, :attr:`holds_training_data_`, :attr:`train_result_`, :attr:`placement_`,
    :attr:`balance_`, :attr:`label_bias_`, :attr:`steps_choice_`), and
    :meth:`score` is accuracy, so ``cross_val_score`` and ``GridSearchCV`` work. Texts are the
    samples: ``X`` is a list (or array, Series) of strings.

    ``evaluation_`` (``None`` after :meth:`fit`) is a ``{name: value}`` dict of evaluation figures
    you may set; :meth:`save` keeps it, :meth:`load` reads it back and :meth:`push_to_hub` writes it
    into the model card.

    What a save holds of the training data: after :meth:`fit`, :attr:`examples_` holds every
    ``(text, label)`` row and :attr:`context_examples_` the context's. :meth:`save` and
    :meth:`push_to_hub` write only the context's examples (they are in the adapter's token ids
    anyway) and :attr:`trained_texts_`, salted hashes of the training texts that let ``cptune eval``
    leave them out of a test set (:mod:`cptune.app.trained_texts`); ``keep_training_data=True``
    writes every row. A loaded classifier's :attr:`examples_` is what its save held
    (:attr:`holds_training_data_` says whether that is every row; an older save, without a
    ``training_data`` field, always is).

    Args:
        model: embedded default name, local folder, ``.gguf`` file or hub id; or a
            ``(model, tokenizer)`` pair already loaded. A name is loaded on first use and the last
            one loaded is shared by classifiers with the same name, device and dtype (so clones in
            a grid search do not reload it); a pair is used as it is (``sklearn.clone`` deep-copies it).
        template: ``"auto"`` (default): chosen with the label words from the labelled examples
            alone by :func:`cptune.selection.choose_template` (a catalogue of general and per-task
            templates, the words' case variants; two-fold cross-validated label log-likelihood),
            recorded as :attr:`template_choice_` (the candidates' scores and the cost; with fewer
            than two examples nothing can be scored and the generic ``"input: {x} output: {y}"``
            is used); or a :class:`Template` or its format string, used as it is.
        selection_budget: forward passes ``"auto"`` may spend choosing (candidates past it are
            not scored).
        finalists: with ``"auto"``, train the best ``finalists`` candidates (by the ICL score) for a
            few CPT steps each and keep the one that is not collapsed with the lowest label NLL on
            the rows outside the context, else on the training rows
            (:func:`cptune.selection.choose_finalist`); recorded in :attr:`template_choice_`. ``0``
            (default): the ICL score alone. Not the default: not yet measured to help.
        choose_steps: with a ``context_size`` that leaves at least
            :data:`cptune.crossval.MIN_HELD_OUT` labelled rows outside the context, choose how many of
            the schedule's steps to train (0, a quarter, ..., all) by two-fold cross-validation on
            those rows (:func:`cptune.crossval.choose_steps`: the held-out accuracy, as the classifier
            scores), then train on every row for that many steps of the same schedule; recorded as
            :attr:`steps_choice_` (``None`` without a ``context_size``; with too few rows outside it, a
            record that says so and keeps the whole schedule) and logged in one line. It costs
            two more trainings of the whole schedule. ``False`` (default): the schedule as given. Not the
            default: on 6 dev cells (N=64, k=8) it cost 0.008 accuracy on average at 2.2 times the fit time
            (benchmarks/grids/issue24/train-size/README.md).
        labels: ``{label: label word}``, a list of labels (each written as itself), or ``None``
            (the labels seen in :meth:`fit`, written as themselves). Labels are str, int, float or
            bool and keep their type: :attr:`classes_` and :meth:`predict` give them back as given.
            A label written as itself must be a word (:func:`cptune.text.template.label_word_problem`:
            it has a letter and is no code like ``LABEL_0``); for labels such as ``0``/``1``,
            :meth:`fit` refuses and asks for a mapping, ``labels={0: "negative", 1: "positive"}``
            (a mapping's words are used as given).
        train: the loop alone, replacing ``recipe.train`` (a shortcut; the parameter to search over
            in a grid: ``{"train": [TrainSettings(lr=1e-3), TrainSettings(lr=1e-2)]}``).
        recipe: how CPT builds and trains the adapter (:class:`cptune.recipe.CPTRecipe`: radii, loss
            decay, and the loop: 40 steps, batch 4, AdamW lr 1e-3, linear decay;
            ``CPTRecipe(radius="relative")`` scales the radii to the model's embeddings).
        context_size: demonstrations in the context; ``None`` (default): every example given to
            :meth:`fit`. With ``k``, k balanced examples drawn with the training seed form the
            context and every example (those k included) is a training query, so more labelled
            examples than fit in the context are used.
        length_normalize: score labels by mean instead of total token log-likelihood.
        calibrate: contextual calibration (Zhao et al. 2021) of the label probabilities: divide them
            by those of content-free inputs after the same learned context
            (:func:`cptune.scoring.contextual_calibration`).
        balance_guard: after training, measure the label balance of the predictions
            (:func:`cptune.balance.check_balance`) on the labelled rows outside the context (when
            there are none, the training rows scored as queries, optimistic since they are in the
            context, and domain-context random-word inputs, :func:`cptune.balance.domain_texts`),
            the content-free inputs and ``fit(..., unlabeled=)`` texts; when the most-predicted
            label's share exceeds :func:`cptune.balance.collapse_limit` of its share of the labelled
            rows (75% for two balanced classes, twice the balanced share with more; the strict limit
            with random-word inputs), remove the smallest share of the label bias measured on those
            inputs that ends the collapse (batch calibration, :func:`cptune.balance.check_balance`)
            from every prediction, say so in one log line, and warn if a collapse remains. The result is
            :attr:`balance_` and :attr:`label_bias_` (``None``: nothing removed; then predictions
            are exactly those without the guard). The bias applies with the ``calibrate`` setting
            it was measured with only (:meth:`applied_label_bias`); a PEFT adapter folder alone
            does not hold it (it is in ``cptune_classifier.json``).
        batch_size: texts per forward when predicting.
        verbose: report as the command line does (:mod:`cptune.reporting`): one line for where the
            model runs, one for the template and words chosen and the context's size, and progress
            bars for template selection, training and scoring. ``False`` silences them for this
            classifier; ``logging.getLogger("cptune").setLevel(logging.WARNING)`` for the process.
        device: where a model loaded by name runs: ``"auto"`` (default: CUDA, else MPS, else CPU),
            ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        dtype: the base model's dtype when it is loaded by name: ``"auto"`` (default: bfloat16 on a
            GPU that supports it, else float32), ``float32``, ``bfloat16``, ``float16``, ``float64``;
            the context and its corrections stay float32 whatever it is.
        device_map: spread a model loaded by name over several devices (e.g. ``"auto"``, through
            accelerate); exclusive with an explicit ``device``.

    Raises:
        ValueError: a bad argument, named (checked again by :meth:`set_params` and :meth:`fit`).

    Example::

        clf = CPTClassifier(labels={"neg": "negative", "pos": "positive"})
        clf.fit(["a dull film", "a joy"], ["neg", "pos"])
        clf.predict(["what a bore"])  # ['neg']

        clf = CPTClassifier(labels={0: "negative", 1: "positive"}, context_size=8)
        clf.fit(texts, labels)  # 200 labelled texts: 8 in the context, all 200 as training queries
    """

    def __init__(
        self,
        model: str | tuple = DEFAULT_MODEL,
        template: Template | str = AUTO_TEMPLATE,
        labels: Mapping[Any, str] | Sequence[Any] | None = None,
        train: TrainSettings | None = None,
        recipe: CPTRecipe | None = None,
        context_size: int | None = None,
        length_normalize: bool = False,
        calibrate: bool = False,
        balance_guard: bool = True,
        batch_size: int = 8,
        verbose: bool = True,
        device: str = AUTO,
        dtype: str = AUTO,
        device_map: str | dict | None = None,
        selection_budget: int = DEFAULT_BUDGET,
        finalists: int = 0,
        choose_steps: bool = False,
    ) -> None:
        self.model = model
        self.template = template
        self.labels = labels
        self.train = train
        self.recipe = recipe
        self.context_size = context_size
        self.length_normalize = length_normalize
        self.calibrate = calibrate
        self.balance_guard = balance_guard
        self.batch_size = batch_size
        self.verbose = verbose
        self.device = device
        self.dtype = dtype
        self.device_map = device_map
        self.selection_budget = selection_budget
        self.finalists = finalists
        self.choose_steps = choose_steps
        self._check_params()

    # -- the estimator contract -------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as given (``deep`` is accepted for scikit-learn; nothing nests)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> CPTClassifier:
        """Change constructor arguments (checked as the constructor checks them); fitted state is kept
        until the next :meth:`fit`.

        Raises:
            ValueError: an unknown name or a bad value (the arguments are then unchanged).
        """
        names = self._param_names()
        unknown = [name for name in params if name not in names]
        if unknown:
            raise ValueError(f"CPTClassifier has no parameter {unknown[0]!r}; parameters: {', '.join(names)}")
        before = self.get_params()
        for name, value in params.items():
            setattr(self, name, value)
        try:
            self._check_params()
        except ValueError:
            for name, value in before.items():
                setattr(self, name, value)
            raise
        return self

    def __sklearn_tags__(self):
        """scikit-learn's description: a classifier of 1-d arrays of strings (read only by scikit-learn)."""
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags(), non_deterministic=False,
                    input_tags=InputTags(one_d_array=True, two_d_array=False, string=True))

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items() if v is not _DEFAULTS.get(k, _MISSING)
                   and v != _DEFAULTS.get(k, _MISSING)}
        shown = ", ".join(f"{k}={v!r}" for k, v in changed.items() if k != "model" or isinstance(v, str))
        return f"CPTClassifier({shown})"

    def _check_params(self) -> None:
        if not self._auto():
            self._template()
        if not isinstance(self.selection_budget, int) or isinstance(self.selection_budget, bool) \
                or self.selection_budget < 0:
            raise ValueError(f"selection_budget={self.selection_budget!r} must be a number of forward passes >= 0")
        if not isinstance(self.finalists, int) or isinstance(self.finalists, bool) or self.finalists < 0:
            raise ValueError(f"finalists={self.finalists!r} must be an integer >= 0 (0: the ICL choice alone)")
        if self.finalists and not self._auto():
            raise ValueError(f"finalists={self.finalists} chooses among template='auto' candidates; with a given "
                             "template pass finalists=0")
        label_table(self.labels)
        self._recipe()
        size = self.context_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"context_size={size!r} must be a positive integer or None (every example)")
        for name in ("calibrate", "balance_guard", "verbose", "choose_steps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an integer >= 1")
        if str(self.dtype).strip().lower() != AUTO:
            resolve_dtype(self.dtype)
        if not isinstance(self.model, str) and not (isinstance(self.model, tuple) and len(self.model) == 2):
            raise ValueError(f"model={self.model!r} must be a name or path, or a (model, tokenizer) pair")

    def _auto(self) -> bool:
        return isinstance(self.template, str) and self.template.strip().lower() == AUTO_TEMPLATE

    def _template(self) -> Template:
        """The fixed template (for ``"auto"``, the chosen one once fitted)."""
        if self._auto():
            return self.template_
        return self.template if isinstance(self.template, Template) else Template(self.template)

    def _recipe(self) -> CPTRecipe:
        recipe = self.recipe if self.recipe is not None else CPTRecipe()
        return replace(recipe, train=self.train) if self.train is not None else recipe

    # -- fitted state -----------------------------------------------------------------------

    def _fitted(self, what: str):
        model = getattr(self, "cpt_model_", None)
        if model is None:
            raise _not_fitted(what)
        return model

    def _words(self) -> dict[str, str]:
        """The label words keyed as the text layer keys them (``str(label)``)."""
        return {str(label): word for label, word in self.label_words_.items()}

    def _set_labels(self, table: dict[Any, str]) -> None:
        self.label_words_ = dict(table)
        self.classes_ = list(table)

    def _base(self):
        if getattr(self, "_base_pair", None) is None:
            if isinstance(self.model, str):
                self._base_pair = shared_model(self.model, self.device, self.dtype, self.device_map)
            else:
                self._base_pair = tuple(self.model)
        self.placement_ = placement(self._base_pair[0])
        return self._base_pair

    def _model_name(self) -> str:
        if isinstance(self.model, str):
            return self.model
        return getattr(self.model[0], "name_or_path", None) or "custom"

    # -- training ---------------------------------------------------------------------------

    def fit(
        self,
        X: Sequence[str] | Any,
        y: Sequence[Any] | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        callback: Callable[[int, float], None] | None = None,
        unlabeled: Sequence[str] | None = None,
    ) -> CPTClassifier:
        """Train on labelled examples: the context's demonstrations and the training queries.

        Args:
            X: the texts (a list, an array, a pandas Series); or, with ``y`` None, a labelled data
                source :func:`cptune.data.load_dataset` reads (a DataFrame or ``datasets.Dataset``
                with ``text`` and ``label`` columns, a file path, a list of ``(text, label)`` pairs,
                ...; its ``train`` split where it has splits).
            y: one label per text (str, int, float or bool; types are kept).
            checkpoint_dir, checkpoint_every, resume: passed to :func:`cptune.train`.
            callback: called with ``(step, loss)`` after every step.
            unlabeled: texts without labels (e.g. those to be labelled), scored by the balance guard
                (``balance_guard``) with the labelled ones; never trained on.

        Every example is a training query after the context (as in the paper). With
        ``context_size`` None every example is also a demonstration; with ``k`` the context holds
        k of them (:func:`cptune.recipe.fit_cpt`). Refitting starts from scratch.

        Raises:
            ValueError: unequal lengths, no example, a label without a label word or of an
                unsupported type, labels that are not words and no ``{label: word}`` mapping for
                them, or a context longer than the model's positions (the message gives its token
                count).
        """
        self._check_params()
        if y is None:
            X, y = _labelled_source(X)
        texts, labels = list(X), [plain_label(label) for label in y]
        if len(texts) != len(labels):
            raise ValueError(f"fit got {len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("fit needs at least one (text, label) example")
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"texts must be strings; got {bad!r} ({type(bad).__name__})")
        unlabeled = [] if unlabeled is None else list(unlabeled)
        bad = next((t for t in unlabeled if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"unlabeled texts must be strings; got {bad!r} ({type(bad).__name__})")
        table = label_table(self.labels)
        if table is None:
            table = label_table(sorted(set(labels), key=label_sort_key))
        if not isinstance(self.labels, Mapping):  # each label written as itself: it must be a word
            error = words_needed_error(list(table), "labels=")
            if error is not None:
                raise error
        unknown = [label for label in dict.fromkeys(labels) if label not in table]
        if unknown:
            raise ValueError(f"label {unknown[0]!r} has no label word; known labels: {list(table)}")
        if self.context_size is not None and self.context_size > len(texts):
            raise ValueError(f"context_size={self.context_size} but fit got {len(texts)} labelled examples; "
                             f"give at least {self.context_size} or a smaller context_size")
        with quiet(not self.verbose):
            return self._fit(texts, labels, table, checkpoint_dir, checkpoint_every, resume, callback, unlabeled)

    def _fit(self, texts, labels, table, checkpoint_dir, checkpoint_every, resume, callback,
             unlabeled) -> CPTClassifier:
        base, tokenizer = self._base()
        self.examples_ = list(zip(texts, labels, strict=True))
        self.context_examples_ = context_examples(self.examples_, self.context_size, self._recipe().train.seed)
        self.trained_texts_ = TrainedTexts.of(texts)  # a fresh salt per fit
        self.training_size_, self.holds_training_data_ = len(texts), True
        self.template_choice_ = None
        if self._auto():  # from the labelled examples alone
            choice = choose_template(base, tokenizer, self.examples_, table, seed=self._recipe().train.seed,
                                     budget=self.selection_budget)
            if self.finalists:
                choice = choose_finalist(base, tokenizer, self.examples_, choice, self._recipe(), self.finalists,
                                         context_size=self.context_size, unlabeled=unlabeled,
                                         length_normalize=self.length_normalize, calibrate=self.calibrate)
            notice("chose %s", choice.summary())
            table, self.template_, self.template_choice_ = choice.label_words, choice.template, choice.to_json()
        else:
            self.template_ = self._template()
        self._set_labels(table)
        self.model_name_ = self._model_name()
        self.evaluation_ = None  # figures of an earlier fit do not describe this one
        recipe, self.steps_choice_ = self._recipe(), None
        if self.choose_steps and self.context_size is not None:  # rows outside the context to ask
            steps = choose_steps(base, tokenizer, self.examples_, self._template(), self._words(), recipe,
                                 self.context_size, length_normalize=self.length_normalize,
                                 calibrate=self.calibrate, batch_size=self.batch_size)
            notice("steps: %s", steps.summary())
            recipe, self.steps_choice_ = replace(recipe, train=steps.settings(recipe.train)), steps.to_json()
        self.cpt_model_, self.train_result_ = fit_cpt(
            base, tokenizer, self.examples_, self._template(), self._words(), recipe,
            model_name=self.model_name_, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
            resume=resume, progress=True, callback=callback, context_size=self.context_size,  # shown unless quiet
        )
        self.label_bias_, self.balance_ = None, None
        if self.balance_guard:
            self._guard_balance(unlabeled)
        return self

    def _guard_balance(self, unlabeled: list[str]) -> None:
        """Measure the fitted context's label balance and remove a collapse (``balance_guard``)."""
        inputs, _ = balance_inputs(self.examples_, self.context_examples_, unlabeled, seed=self._recipe().train.seed)
        index = {label: i for i, label in enumerate(self.classes_)}
        reference = label_shares([index[label] for _, label in self.examples_], len(self.classes_))
        base, tokenizer = self._base()
        with torch.no_grad():
            context = self.cpt_model_.context_embeddings()  # (1, N, d)
        scorer = ContextScorer(base, tokenizer, self._template(), self._words(), context, batch_size=self.batch_size,
                               length_normalize=self.length_normalize, calibrate=self.calibrate)
        check = check_balance(scorer, inputs, reference)
        # the bias is measured on scores of this calibrate setting, and applies to those only (applied_label_bias)
        self.balance_, self.label_bias_ = check.to_json() | {"calibrate": self.calibrate}, check.bias
        notice("%s", check.summary(self.classes_))
        if check.still_collapsed:
            warnings.warn(f"the classifier still gives one label to most inputs ({check.summary(self.classes_)}); "
                          "pass unlabeled texts (fit(unlabeled=) or --unlabeled), more labelled rows or another "
                          "template", CptuneWarning, stacklevel=2)

    # -- inference --------------------------------------------------------------------------

    def decision_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """``(n, C)`` label log-likelihoods after the learned context (calibrated log-probabilities
        when :attr:`calibrate` is set or the balance guard removed a label bias: :meth:`applied_label_bias`)."""
        model = self._fitted("decision_scores()")
        with quiet(not self.verbose):
            base, tokenizer = self._base()
            with torch.no_grad():
                context = model.context_embeddings()
            return score_texts(base, tokenizer, self._template(), self._words(), list(texts), context,
                               batch_size=self.batch_size, length_normalize=self.length_normalize,
                               calibrate=self.calibrate, progress=True, label_bias=self.applied_label_bias())

    def applied_label_bias(self) -> list[float] | None:
        """The balance guard's :attr:`label_bias_` as scoring applies it: only with the ``calibrate``
        setting it was measured with (the fit's). Turning contextual calibration on or off after the
        fit (``predict --calibrate`` / ``--no-calibrate``) replaces the guard's correction instead of
        stacking a bias measured on other scores; ``None`` then, and when the guard removed nothing."""
        bias, balance = getattr(self, "label_bias_", None), getattr(self, "balance_", None) or {}
        return bias if bias is not None and balance.get("calibrate", False) == self.calibrate else None

    def predict_proba(self, X: Sequence[str]) -> np.ndarray:
        """``(n, C)`` class probabilities (softmax over the label scores), columns as :attr:`classes_`."""
        self._fitted("predict_proba()")  # the error names the method the user called
        return torch.softmax(self.decision_scores(X), dim=-1).cpu().numpy()

    def predict(self, X: Sequence[str]) -> list:
        """The most likely label of each text."""
        self._fitted("predict()")
        scores = self.decision_scores(X)
        return [self.classes_[i] for i in scores.argmax(dim=-1).tolist()]

    def score(self, X: Sequence[str], y: Sequence[Any]) -> float:
        """Accuracy of :meth:`predict` on ``X`` against the labels ``y`` (scikit-learn's ``score``)."""
        gold = [plain_label(label) for label in y]
        predicted = self.predict(list(X))
        if len(predicted) != len(gold):
            raise ValueError(f"score got {len(predicted)} texts but {len(gold)} labels")
        return sum(p == g for p, g in zip(predicted, gold, strict=True)) / max(len(gold), 1)

    # -- files ------------------------------------------------------------------------------

    def data_held(self, keep_training_data: bool = False) -> dict:
        """What a save with ``keep_training_data`` holds of the training data, as the card and ``/info`` say it.

        Returns:
            ``{"training_data": "context only" | "kept", "examples": rows written, "training_size": rows trained
            on}``.

        Raises:
            ValueError: ``keep_training_data`` for a classifier loaded from a save without its training rows.
        """
        self._fitted("save()")
        if not isinstance(keep_training_data, bool):
            raise ValueError(f"keep_training_data={keep_training_data!r} must be True or False")
        if keep_training_data and not self.holds_training_data_:
            raise ValueError(f"keep_training_data=True, but this classifier was loaded from a save that holds only "
                             f"its context's {len(self.examples_)} examples, not the {self.training_size_} training "
                             "rows; fit it again on them to keep them")
        return {"training_data": KEPT if keep_training_data else CONTEXT_ONLY,
                "examples": len(self._saved_rows(keep_training_data)), "training_size": self.training_size_}

    def _saved_rows(self, keep_training_data: bool) -> list[tuple]:
        return self.examples_ if keep_training_data else self.context_examples_

    def _description(self, keep_training_data: bool = False) -> dict:
        held = self.data_held(keep_training_data)
        recipe = self._recipe()
        return {
            "model": self.model_name_,
            "template": asdict(self._template()),
            "template_choice": getattr(self, "template_choice_", None),
            "labels": [[label, word] for label, word in self.label_words_.items()],
            "train": asdict(recipe.train),
            "cpt": recipe.adapter_fields(),
            "length_normalize": self.length_normalize,
            "calibrate": self.calibrate,
            "balance_guard": self.balance_guard,
            "choose_steps": self.choose_steps,
            "steps_choice": getattr(self, "steps_choice_", None),
            "label_bias": getattr(self, "label_bias_", None),
            "balance": getattr(self, "balance_", None),
            "context_size": self.context_size,
            "trained_on": getattr(self, "placement_", None),
            "training_data": held["training_data"],
            "training_size": held["training_size"],
            "examples": [list(pair) for pair in self._saved_rows(keep_training_data)],
            "trained_texts": self.trained_texts_.to_json(),
            **({"evaluation": dict(self.evaluation_)} if getattr(self, "evaluation_", None) is not None else {}),
        }

    def save(self, directory: str | Path, keep_training_data: bool = False) -> None:
        """Write the adapter (PEFT format, loadable by PEFT) plus ``cptune_classifier.json``.

        The folder is created if needed; files in it that the save does not write are left alone. An
        earlier save in the folder is replaced without asking, as ``save_pretrained`` does (each file
        atomically, the manifest last: :mod:`cptune.cpt.saving`); ``cptune train --output`` is the one
        that refuses an existing classifier without ``--overwrite``.

        Args:
            directory: the folder.
            keep_training_data: write every training row (text and label) into ``cptune_classifier.json``,
                to reproduce the run. By default it holds only the context's examples (which the
                adapter's token ids hold anyway) and salted hashes of the training texts.

        Raises:
            ValueError: ``keep_training_data`` for a classifier loaded without its training rows.
        """
        model = self._fitted("save()")
        save_adapter(model, directory, extra_json={CLASSIFIER_FILE: self._description(keep_training_data)})

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        metrics: Mapping[str, Any] | None = None,
        keep_training_data: bool = False,
    ):
        """Upload the classifier, as :meth:`save` writes it, plus a model card ``README.md``, to a hub repo.

        The save goes into a temporary folder, the card (:mod:`cptune.app.card`) is written beside
        it and the folder goes up in one commit that also deletes the files an earlier cptune push
        wrote and this one does not (:func:`cptune.cpt.hub.push_folder`). It loads back with
        ``CPTClassifier.load(repo_id)``, and its adapter with PEFT. Only the context's examples go
        up, unless ``keep_training_data`` (see docs/hub.md); the card says which.

        Args:
            repo_id: ``owner/name`` (created if needed).
            private: whether a new repo is private (``None``: the hub's default).
            commit_message: the commit's message.
            revision: the branch to commit to (default ``main``).
            token: a hub token (default: the stored login).
            metrics: evaluation figures ``{name: value}`` for the card (default: :attr:`evaluation_`).
            keep_training_data: push every training row too (as :meth:`save`).

        Returns:
            huggingface_hub's ``CommitInfo``.
        """
        self._fitted("push_to_hub()")
        with tempfile.TemporaryDirectory(prefix="cptune-push-") as tmp:
            self.save(tmp, keep_training_data=keep_training_data)
            write_classifier_card(tmp, repo_id, self._description(keep_training_data), metrics,
                                  info_file=CLASSIFIER_FILE)
            return push_folder(tmp, repo_id, private=private, commit_message=commit_message, revision=revision,
                               token=token)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        model: str | tuple | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        **kwargs,
    ) -> CPTClassifier:
        """Load a saved classifier, from a folder or a hub repo; ``model`` overrides the base model recorded in it.

        Args:
            directory: the folder :meth:`save` wrote, or a hub repo id ``owner/name`` that
                :meth:`push_to_hub` wrote (downloaded into the Hugging Face cache; offline, read from
                it: :mod:`cptune.cpt.hub`). An existing local folder wins.
            model: the base model (default: the one recorded).
            revision: the hub repo's branch, tag or commit (default ``main``).
            token: a hub token for a private repo (default: the stored login).
            cache_dir: the hub cache (default: ``HF_HUB_CACHE`` and friends, read now).
            **kwargs: other constructor arguments (``device``, ``dtype``, ``batch_size``, ...).

        Raises:
            FileNotFoundError: no such folder or repo (offline: not in the cache), or a folder without
                ``cptune_classifier.json`` (for a plain CPT adapter folder the message says to use
                :meth:`from_adapter`).
            cptune.cpt.saving.IncompleteSaveError: an interrupted or altered save.
        """
        folder = resolve_folder(directory, revision, token=token, cache_dir=cache_dir)
        directory = _existing_folder(folder, "classifier folder")
        check_manifest(directory, reading=(CLASSIFIER_FILE,))
        if not (directory / CLASSIFIER_FILE).is_file() and (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{directory} holds a CPT adapter but no {CLASSIFIER_FILE} (the template and label words a "
                f"classifier needs); use it with CPTClassifier.from_adapter({str(directory)!r}, template=..., "
                f"labels=...) or `cptune eval/predict {directory} --template ... --label-words ...`"
            )
        info = read_json_object(directory, CLASSIFIER_FILE, "a folder saved by CPTClassifier")
        labels = info["labels"] if "labels" in info else info["label_words"]  # before 0.2: a {label: word} object
        clf = cls(
            model=model if model is not None else info["model"],
            template=Template(**info["template"]),
            labels=dict(map(tuple, labels)) if isinstance(labels, list) else labels,
            recipe=CPTRecipe(**info["cpt"], train=TrainSettings(**info["train"])),
            length_normalize=info.get("length_normalize", False),
            calibrate=info.get("calibrate", False),
            balance_guard=info.get("balance_guard", True),
            choose_steps=info.get("choose_steps", False),  # saves before it: the schedule as given
            **{"context_size": info.get("context_size"), **kwargs},
        )
        clf._load_adapter(directory, [tuple(pair) for pair in info.get("examples", [])])
        clf._load_training_data(info, directory / CLASSIFIER_FILE)
        clf.template_choice_ = info.get("template_choice")  # how "auto" chose the saved template, if it did
        clf.evaluation_ = info.get("evaluation")
        clf.steps_choice_ = info.get("steps_choice")
        clf.label_bias_, clf.balance_ = info.get("label_bias"), info.get("balance")  # None in older saves
        return clf

    @classmethod
    def from_adapter(
        cls,
        directory: str | Path,
        template: Template | str,
        labels: Mapping[Any, str] | Sequence[Any],
        model: str | tuple | None = None,
        **kwargs,
    ) -> CPTClassifier:
        """A classifier from a CPT adapter folder (e.g. written by PEFT) and the template and label
        words its context was built with.

        Args:
            directory: the adapter folder.
            template: the template of the context's demonstrations.
            labels: ``{label: label word}`` (or labels written as themselves), in the order the
                probability columns should take.
            model: the base model; default: the adapter's ``base_model_name_or_path``.
            **kwargs: other :class:`CPTClassifier` arguments (``calibrate``, ``device``, ``dtype``, ...).
        """
        directory = _existing_folder(directory, "adapter folder")
        if model is None:
            model = read_config(directory).base_model_name_or_path
            if not model:
                raise ValueError(f"{directory / CONFIG_NAME} names no base model; pass model=")
        if isinstance(template, str) and template.strip().lower() == AUTO_TEMPLATE:
            raise ValueError("from_adapter needs the template the adapter's context was built with, not 'auto'")
        clf = cls(model=model, template=template, labels=labels, **kwargs)
        clf._load_adapter(directory, [])
        return clf

    def _load_adapter(self, directory: Path, examples: list) -> None:
        with quiet(not self.verbose):
            base, _ = self._base()
        self._set_labels(label_table(self.labels))
        self.template_ = self._template()
        self.template_choice_ = None
        self.examples_ = examples
        self.context_examples_ = list(examples)
        self.trained_texts_ = TrainedTexts.of(text for text, _ in examples)
        self.training_size_, self.holds_training_data_ = len(examples), True
        self.model_name_ = self._model_name()
        self.train_result_ = None
        self.evaluation_ = None
        self.label_bias_, self.balance_ = None, None  # an adapter alone: no balance check was made
        self.cpt_model_ = load_adapter(base, directory)

    def _load_training_data(self, info: dict, path: Path) -> None:
        """What ``cptune_classifier.json`` holds of the training data (after :meth:`_load_adapter` set ``examples_``).

        An older save, without ``training_data``, holds every training row: the context's
        are drawn from them again, as :meth:`fit` drew them, and the hashes are computed from them.
        """
        held = info.get("training_data", KEPT)
        if held not in TRAINING_DATA:
            raise ValueError(f"{path}: training_data={held!r} is none of {list(TRAINING_DATA)}")
        self.holds_training_data_ = held == KEPT
        self.training_size_ = info.get("training_size", len(self.examples_))
        if not isinstance(self.training_size_, int) or self.training_size_ < len(self.examples_):
            raise ValueError(f"{path}: training_size={self.training_size_!r} must be a number of rows, at least the "
                             f"{len(self.examples_)} examples it holds")
        if "trained_texts" in info:
            try:
                self.trained_texts_ = TrainedTexts.from_json(info["trained_texts"])
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        self.context_examples_ = (context_examples(self.examples_, self.context_size, self._recipe().train.seed)
                                  if self.holds_training_data_ else list(self.examples_))


_MISSING = object()
_DEFAULTS = {name: p.default for name, p in inspect.signature(CPTClassifier.__init__).parameters.items()
             if name != "self"}
_SHARED: dict[tuple, tuple] = {}  # the last base model loaded by name: (name, device, dtype, map) -> pair


def shared_model(name: str, device: str, dtype: str, device_map: str | dict | None) -> tuple:
    """``load_model(name, ...)``, keeping the last model loaded so that classifiers with the same
    name, device and dtype (clones in a grid search, a reloaded classifier) share it instead of
    loading it again. The base model is never modified by CPT (its parameters are frozen)."""
    key = (name, str(device), str(dtype), repr(device_map))
    if key not in _SHARED:
        _SHARED.clear()  # one model at a time: a process that moves on to another frees the last
        _SHARED[key] = load_model(name, dtype=dtype, device=device, device_map=device_map)
    return _SHARED[key]


def _existing_folder(directory: str | Path, what: str) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{what} {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a {what}")
    return directory


def plain_label(label: Any) -> Any:
    """A label as the classifier keeps it: numpy scalars become Python ones; other types are refused.

    Raises:
        ValueError: a label that is not a str, int, float or bool (after that conversion).
    """
    if isinstance(label, np.generic):
        label = label.item()
    if not isinstance(label, LABEL_TYPES) or (isinstance(label, float) and not math.isfinite(label)):
        raise ValueError(f"label {label!r} ({type(label).__name__}) is not accepted; labels are str, int, float "
                         "or bool (a finite float: JSON has no NaN or infinity)")
    return label


def label_table(labels: Mapping[Any, str] | Iterable[Any] | None) -> dict[Any, str] | None:
    """``{label: label word}`` from a mapping, a list of labels (each written as itself) or None.

    Raises:
        ValueError: an unsupported label, a label word that is not a non-empty string, or two labels
            that would be written the same in the context (``1`` and ``"1"``).
    """
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise ValueError(f"labels={labels!r} must be a {{label: word}} mapping or a list of labels")
    items = list(labels.items()) if isinstance(labels, Mapping) else [(label, None) for label in labels]
    table: dict[Any, str] = {}
    spelled: dict[str, Any] = {}
    for label, word in items:
        label = plain_label(label)
        word = str(label) if word is None else word
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"the label word of {label!r} must be a non-empty string; got {word!r}")
        if label in table or str(label) in spelled:
            other = spelled.get(str(label), label)
            raise ValueError(f"labels {other!r} and {label!r} are the same label or written the same; "
                             "give distinct labels")
        table[label] = word
        spelled[str(label)] = label
    return table


def _labelled_source(source: Any) -> tuple[list[str], list]:
    """Texts and labels of a data source :func:`cptune.data.load_dataset` reads (``fit(data)``)."""
    from cptune.data import load_dataset

    dataset = load_dataset(source, default_split="train")
    return [ex.text for ex in dataset.examples], [ex.label for ex in dataset.examples]
