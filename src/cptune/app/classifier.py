"""CPTClassifier: few-shot text classification with CPT behind fit / predict / save / load."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptune.cpt.files import CONFIG_NAME, read_config, read_json_object, save_adapter
from cptune.cpt.model import load_adapter
from cptune.cpt.saving import check_manifest
from cptune.data.types import label_sort_key
from cptune.models import AUTO, DEFAULT_MODEL, load_model, placement, resolve_dtype
from cptune.recipe import CPTRecipe, fit_cpt
from cptune.scoring import score_texts
from cptune.text.template import Template
from cptune.training import TrainResult, TrainSettings

CLASSIFIER_FILE = "cptune_classifier.json"
LABEL_TYPES = (str, int, float, bool)
"""The label values a classifier keeps as they are (and writes to its JSON file as they are)."""


class CPTClassifier:
    """A few-shot classifier: labelled examples become the CPT context and its training queries.

    Args:
        model: embedded default name, local folder, ``.gguf`` file or hub id; or a
            ``(model, tokenizer)`` pair already loaded.
        template: a :class:`Template` or its format string (``"input: {x} output: {y}"``).
        labels: ``{label: label word}``, a list of labels (each written as itself), or ``None``
            (the labels seen in :meth:`fit`, written as themselves). Labels are str, int, float or
            bool and keep their type: :attr:`classes_` and :meth:`predict` give them back as given.
        recipe: how CPT builds and trains the adapter (:class:`cptune.recipe.CPTRecipe`: radii, loss
            decay, and the loop: 40 steps, batch 4, AdamW lr 1e-3, linear decay).
        train: the loop alone, replacing ``recipe.train`` (a shortcut).
        context_size: demonstrations in the context; ``None`` (default): every example given to
            :meth:`fit`. With ``k``, k balanced examples drawn with ``recipe.train.seed`` form the
            context and every example (those k included) is a training query, so more labelled
            examples than fit in the context are used.
        length_normalize: score labels by mean instead of total token log-likelihood.
        calibrate: contextual calibration (Zhao et al. 2021) of the label probabilities: divide them
            by those of content-free inputs after the same learned context
            (:func:`cptune.scoring.contextual_calibration`).
        batch_size: texts per forward when predicting.
        progress: show a progress bar while training.
        device: where a model loaded by name runs: ``"auto"`` (default: CUDA, else MPS, else CPU),
            ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        dtype: the base model's dtype when it is loaded by name: ``"auto"`` (default: bfloat16 on a
            GPU that supports it, else float32), ``float32``, ``bfloat16``, ``float16``, ``float64``;
            the context and its corrections stay float32 whatever it is.
        device_map: spread a model loaded by name over several devices (e.g. ``"auto"``, through
            accelerate); exclusive with an explicit ``device``.

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
        template: Template | str = "input: {x} output: {y}",
        labels: Mapping[Any, str] | Sequence[Any] | None = None,
        train: TrainSettings | None = None,
        recipe: CPTRecipe | None = None,
        context_size: int | None = None,
        length_normalize: bool = False,
        calibrate: bool = False,
        batch_size: int = 8,
        progress: bool = False,
        device: str = AUTO,
        dtype: str = AUTO,
        device_map: str | dict | None = None,
    ) -> None:
        self.template = template if isinstance(template, Template) else Template(template)
        self.label_words: dict[Any, str] | None = label_table(labels)
        self.recipe = recipe or CPTRecipe()
        if train is not None:
            self.recipe = replace(self.recipe, train=train)
        if context_size is not None and (not isinstance(context_size, int) or isinstance(context_size, bool)
                                         or context_size < 1):
            raise ValueError(f"context_size={context_size!r} must be a positive integer or None (every example)")
        self.context_size = context_size
        self.length_normalize = length_normalize
        if not isinstance(calibrate, bool):
            raise ValueError(f"calibrate={calibrate!r} must be True or False")
        self.calibrate = calibrate
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.progress = progress
        if str(dtype).strip().lower() != AUTO:
            dtype = str(resolve_dtype(dtype)).removeprefix("torch.")
        self.device, self.dtype, self.device_map = device, dtype, device_map
        self.placement_: str | None = None
        self.model_name = model if isinstance(model, str) else getattr(model[0], "name_or_path", "custom")
        self._loaded = None if isinstance(model, str) else tuple(model)
        self.cpt_model = None
        self.examples: list[tuple[str, Any]] = []
        self.train_result: TrainResult | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def classes_(self) -> list:
        """Class labels (the user's values, types kept), in the column order of :meth:`predict_proba`."""
        if self.label_words is None:
            raise ValueError("the classifier has no labels yet; call fit() or pass labels=")
        return list(self.label_words)

    def _words(self) -> dict[str, str]:
        """The label words keyed as the text layer keys them (``str(label)``)."""
        return {str(label): word for label, word in self.label_words.items()}

    def _base(self):
        if self._loaded is None:  # load_model reports where the model runs, once
            self._loaded = load_model(self.model_name, dtype=self.dtype, device=self.device,
                                      device_map=self.device_map)
        if self.placement_ is None:
            self.placement_ = placement(self._loaded[0])
        return self._loaded

    # -- training ---------------------------------------------------------------------------

    def fit(
        self,
        texts: Sequence[str] | Any,
        labels: Sequence[Any] | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        callback: Callable[[int, float], None] | None = None,
    ) -> CPTClassifier:
        """Train on labelled examples: the context's demonstrations and the training queries.

        Args:
            texts: the texts (a list, a pandas Series, ...); or, with ``labels`` None, a labelled
                data source :func:`cptune.data.load_dataset` reads (a DataFrame or
                ``datasets.Dataset`` with ``text`` and ``label`` columns, a file path, a list of
                ``(text, label)`` pairs, ...; its ``train`` split where it has splits).
            labels: one label per text (str, int, float or bool; types are kept).
            checkpoint_dir, checkpoint_every, resume: passed to :func:`cptune.train`.
            callback: called with ``(step, loss)`` after every step.

        Every example is a training query after the context (as in the paper). With
        ``context_size`` None every example is also a demonstration; with ``k`` the context holds
        k of them (:func:`cptune.recipe.fit_cpt`).

        Raises:
            ValueError: unequal lengths, no example, a label without a label word or of an
                unsupported type, or a context longer than the model's positions (the message
                gives its token count).
        """
        if labels is None:
            texts, labels = _labelled_source(texts)
        texts, labels = list(texts), [plain_label(label) for label in labels]
        if len(texts) != len(labels):
            raise ValueError(f"fit got {len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("fit needs at least one (text, label) example")
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"texts must be strings; got {bad!r} ({type(bad).__name__})")
        if self.label_words is None:
            self.label_words = label_table(sorted(set(labels), key=label_sort_key))
        unknown = [label for label in dict.fromkeys(labels) if label not in self.label_words]
        if unknown:
            raise ValueError(f"label {unknown[0]!r} has no label word; known labels: {self.classes_}")
        if self.context_size is not None and self.context_size > len(texts):
            raise ValueError(f"context_size={self.context_size} but fit got {len(texts)} labelled examples; "
                             f"give at least {self.context_size} or a smaller context_size")
        base, tokenizer = self._base()
        self.examples = list(zip(texts, labels, strict=True))
        self.cpt_model, self.train_result = fit_cpt(
            base, tokenizer, self.examples, self.template, self._words(), self.recipe, model_name=self.model_name,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume, progress=self.progress,
            callback=callback, context_size=self.context_size,
        )
        return self

    # -- inference --------------------------------------------------------------------------

    def _require_fitted(self):
        if self.cpt_model is None:
            raise ValueError("the classifier is not fitted; call fit() or CPTClassifier.load()")
        return self.cpt_model

    def decision_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """``(n, C)`` label log-likelihoods after the learned context (calibrated log-probabilities
        when :attr:`calibrate` is set)."""
        model = self._require_fitted()
        base, tokenizer = self._base()
        with torch.no_grad():
            context = model.context_embeddings()
        return score_texts(base, tokenizer, self.template, self._words(), list(texts), context,
                           batch_size=self.batch_size, length_normalize=self.length_normalize,
                           calibrate=self.calibrate)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, C)`` class probabilities (softmax over the label scores), columns as :attr:`classes_`."""
        return torch.softmax(self.decision_scores(texts), dim=-1).cpu().numpy()

    def predict(self, texts: Sequence[str]) -> list:
        """The most likely label of each text."""
        scores = self.decision_scores(texts)
        return [self.classes_[i] for i in scores.argmax(dim=-1).tolist()]

    # -- files ------------------------------------------------------------------------------

    def _description(self) -> dict:
        return {
            "model": self.model_name,
            "template": asdict(self.template),
            "labels": [[label, word] for label, word in self.label_words.items()],
            "train": asdict(self.recipe.train),
            "cpt": self.recipe.adapter_fields(),
            "length_normalize": self.length_normalize,
            "calibrate": self.calibrate,
            "context_size": self.context_size,
            "trained_on": self.placement_,
            "examples": [list(pair) for pair in self.examples],
        }

    def save(self, directory: str | Path) -> None:
        """Write the adapter (PEFT format, loadable by PEFT) plus ``cptune_classifier.json``.

        The folder is created if needed; files in it that the save does not write are left alone.
        """
        save_adapter(self._require_fitted(), directory, extra_json={CLASSIFIER_FILE: self._description()})

    @classmethod
    def load(cls, directory: str | Path, model: str | tuple | None = None, **kwargs) -> CPTClassifier:
        """Load a saved classifier; ``model`` overrides the base model recorded in it.

        Raises:
            FileNotFoundError: no such folder, or a folder without ``cptune_classifier.json`` (for
                a plain CPT adapter folder the message says to use :meth:`from_adapter`).
            cptune.cpt.saving.IncompleteSaveError: an interrupted or altered save.
        """
        directory = _existing_folder(directory, "classifier folder")
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
            **{"context_size": info.get("context_size"), **kwargs},
        )
        clf.examples = [tuple(pair) for pair in info.get("examples", [])]
        base, _ = clf._base()
        clf.cpt_model = load_adapter(base, directory)
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
        clf = cls(model=model, template=template, labels=labels, **kwargs)
        base, _ = clf._base()
        clf.cpt_model = load_adapter(base, directory)
        return clf


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
    if not isinstance(label, LABEL_TYPES) or (isinstance(label, float) and label != label):
        raise ValueError(f"label {label!r} ({type(label).__name__}) is not accepted; labels are str, int, float "
                         "or bool (not NaN)")
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
