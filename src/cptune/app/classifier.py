"""CPTClassifier: few-shot text classification with CPT behind fit / predict / save / load."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from cptune.cpt.files import CONFIG_NAME, read_config, read_json_object, save_adapter
from cptune.cpt.model import load_adapter
from cptune.cpt.saving import check_manifest
from cptune.models import DEFAULT_MODEL, load_model, resolve_dtype
from cptune.recipe import CPTRecipe, fit_cpt
from cptune.scoring import score_texts
from cptune.text.template import Template
from cptune.training import TrainResult, TrainSettings

CLASSIFIER_FILE = "cptune_classifier.json"


class CPTClassifier:
    """A few-shot classifier: the training examples become the CPT context, then CPT trains it.

    Args:
        model: embedded default name, local folder, ``.gguf`` file or hub id; or a
            ``(model, tokenizer)`` pair already loaded.
        template: a :class:`Template` or its format string (``"input: {x} output: {y}"``).
        labels: ``{label: label word}``, a list of labels (each written as itself), or ``None``
            (the labels seen in :meth:`fit`, written as themselves).
        recipe: how CPT builds and trains the adapter (:class:`cptune.recipe.CPTRecipe`: radii, loss
            decay, and the loop: 40 steps, batch 4, AdamW lr 1e-3, linear decay).
        train: the loop alone, replacing ``recipe.train`` (a shortcut).
        length_normalize: score labels by mean instead of total token log-likelihood.
        calibrate: contextual calibration (Zhao et al. 2021) of the label probabilities: divide them
            by those of content-free inputs after the same learned context
            (:func:`cptune.scoring.contextual_calibration`).
        batch_size: texts per forward when predicting.
        progress: show a progress bar while training.
        dtype: the base model's dtype when it is loaded by name (``float32``, ``bfloat16``,
            ``float16``, ``float64``); the context corrections stay float32 whatever it is.

    Example::

        clf = CPTClassifier(labels={"neg": "negative", "pos": "positive"})
        clf.fit(["a dull film", "a joy"], ["neg", "pos"])
        clf.predict(["what a bore"])  # ['neg']
    """

    def __init__(
        self,
        model: str | tuple = DEFAULT_MODEL,
        template: Template | str = "input: {x} output: {y}",
        labels: Mapping[str, str] | Sequence[str] | None = None,
        train: TrainSettings | None = None,
        recipe: CPTRecipe | None = None,
        length_normalize: bool = False,
        calibrate: bool = False,
        batch_size: int = 8,
        progress: bool = False,
        dtype: str = "float32",
    ) -> None:
        self.template = template if isinstance(template, Template) else Template(template)
        if labels is not None and not isinstance(labels, Mapping):
            labels = {str(label): str(label) for label in labels}
        self.label_words: dict[str, str] | None = dict(labels) if labels is not None else None
        self.recipe = recipe or CPTRecipe()
        if train is not None:
            self.recipe = replace(self.recipe, train=train)
        self.length_normalize = length_normalize
        if not isinstance(calibrate, bool):
            raise ValueError(f"calibrate={calibrate!r} must be True or False")
        self.calibrate = calibrate
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.progress = progress
        self.dtype = str(resolve_dtype(dtype)).removeprefix("torch.")
        self.model_name = model if isinstance(model, str) else getattr(model[0], "name_or_path", "custom")
        self._loaded = None if isinstance(model, str) else tuple(model)
        self.cpt_model = None
        self.examples: list[tuple[str, str]] = []
        self.train_result: TrainResult | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def classes_(self) -> list[str]:
        """Class labels, in the column order of :meth:`predict_proba`."""
        if self.label_words is None:
            raise ValueError("the classifier has no labels yet; call fit() or pass labels=")
        return list(self.label_words)

    def _base(self):
        if self._loaded is None:
            self._loaded = load_model(self.model_name, dtype=self.dtype)
        return self._loaded

    # -- training ---------------------------------------------------------------------------

    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        callback: Callable[[int, float], None] | None = None,
    ) -> CPTClassifier:
        """Use ``(texts, labels)`` as the context's demonstrations and train CPT on them.

        Each demonstration is also a training query after the context, as in the paper's
        few-shot setting (:func:`cptune.recipe.fit_cpt`). ``checkpoint_dir``/``resume`` are passed
        to :func:`cptune.train`.
        """
        texts, labels = list(texts), [str(label) for label in labels]
        if len(texts) != len(labels):
            raise ValueError(f"fit got {len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("fit needs at least one (text, label) example")
        if self.label_words is None:
            self.label_words = {label: label for label in sorted(set(labels))}
        unknown = sorted(set(labels) - set(self.label_words))
        if unknown:
            raise ValueError(f"label {unknown[0]!r} has no label word; known labels: {self.classes_}")
        base, tokenizer = self._base()
        self.examples = list(zip(texts, labels, strict=True))
        self.cpt_model, self.train_result = fit_cpt(
            base, tokenizer, self.examples, self.template, self.label_words, self.recipe, model_name=self.model_name,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume, progress=self.progress,
            callback=callback,
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
        return score_texts(base, tokenizer, self.template, self.label_words, list(texts), context,
                           batch_size=self.batch_size, length_normalize=self.length_normalize,
                           calibrate=self.calibrate)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, C)`` class probabilities (softmax over the label scores), columns as :attr:`classes_`."""
        return torch.softmax(self.decision_scores(texts), dim=-1).numpy()

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely label of each text."""
        scores = self.decision_scores(texts)
        return [self.classes_[i] for i in scores.argmax(dim=-1).tolist()]

    # -- files ------------------------------------------------------------------------------

    def _description(self) -> dict:
        return {
            "model": self.model_name,
            "template": asdict(self.template),
            "label_words": self.label_words,
            "train": asdict(self.recipe.train),
            "cpt": self.recipe.adapter_fields(),
            "length_normalize": self.length_normalize,
            "calibrate": self.calibrate,
            "dtype": self.dtype,
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
        clf = cls(
            model=model if model is not None else info["model"],
            template=Template(**info["template"]),
            labels=info["label_words"],
            recipe=CPTRecipe(**info["cpt"], train=TrainSettings(**info["train"])),
            length_normalize=info.get("length_normalize", False),
            calibrate=info.get("calibrate", False),
            **{"dtype": info.get("dtype", "float32"), **kwargs},
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
        labels: Mapping[str, str] | Sequence[str],
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
            **kwargs: other :class:`CPTClassifier` arguments (``calibrate``, ``dtype``, ...).
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
