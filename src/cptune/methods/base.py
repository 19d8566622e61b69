"""What every method shares: :class:`MethodSettings`, :class:`FitInfo`, the :class:`Method` protocol,
:class:`BaseMethod` (shot checks, seeded and side-effect-free fitting, scoring through
:func:`cptune.scoring.score_texts`, label loss) and the training helpers the trained methods use
(:func:`label_batch`, :func:`optimize`, :func:`frozen`, :func:`model_device`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch

from cptune.cpt.projection import RADIUS_MODES
from cptune.cpt.roles import TokenRole
from cptune.recipe import CPTRecipe
from cptune.scoring import score_texts
from cptune.text.context import render_queries
from cptune.text.template import Template, label_token_ids
from cptune.training import NonFiniteLossError, TrainSettings, batch_indices

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MethodSettings:
    """Settings shared by all methods (each method reads the ones it needs); checked on construction.

    Args:
        steps: optimizer steps of every trained method (40: the setting measured in issue 3; with 4
            shots and batch 4 that is 40 passes over the shots).
        batch_size: training queries per step (4: one step sees all 4 shots of the default setting).
        seed: orders the training batches (:func:`cptune.training.batch_indices`) and seeds random
            initialisation (LoRA's A matrices); the same seed gives the same scores.
        cpt_lr: CPT's AdamW learning rate (1e-3: at 40 steps it beat the authors' demo value 1e-4,
            measured in issue 3; the demo used batch 1 and more steps).
        eps_input: CPT's L2 radius for input-text tokens (0.2, the authors' demo).
        eps_format: CPT's L2 radius for template tokens (0.1, the authors' demo).
        decay: CPT's loss decay gamma, in (0, 1] (0.95, the authors' demo; 1 means no decay).
        radius: how CPT's epsilons become radii: ``"absolute"`` (PEFT's; default) or ``"relative"`` to
            the model's embedding scale (:class:`cptune.recipe.CPTRecipe`).
        pt_lr: prompt-tuning (``pt``, ``ipt``) learning rate (3e-2: PEFT's prompt-tuning guide; 0.76
            mean accuracy in issue 3's measurement).
        pt_tokens: number of soft-prompt tokens for ``pt`` and ``ipt`` (16, as measured in issue 3).
        pt_init_text: text whose token embeddings initialise the soft prompt, repeated or cut to
            ``pt_tokens`` (PEFT's ``TEXT`` initialisation; Lester et al. found text/label
            initialisation better than random). ``None``: ``"Classify the text as <w1> or <w2>."``
            built from the label words.
        lora_lr: LoRA learning rate (1e-3: a common PEFT LoRA example value, large enough to move in
            40 steps; not tuned).
        lora_r: LoRA rank (8: the LoRA paper's and PEFT's default rank).
        lora_alpha: LoRA scaling alpha (16 = 2r, the usual choice; scale alpha / r = 2). LoRA
            dropout is always 0 (deterministic training) and the target modules are PEFT's defaults
            for the architecture (attention query/value projections).
        length_normalize: divide each label's log-likelihood by its token count when scoring
            (False: :func:`cptune.scoring.score_texts`' default; only matters for multi-token labels).
        score_batch_size: queries per forward when scoring (8, ``score_texts``' default).

    Raises:
        ValueError: naming the field and the accepted values.
    """

    steps: int = 40
    batch_size: int = 4
    seed: int = 0
    cpt_lr: float = 1e-3
    eps_input: float = 0.2
    eps_format: float = 0.1
    decay: float = 0.95
    radius: str = "absolute"
    pt_lr: float = 3e-2
    pt_tokens: int = 16
    pt_init_text: str | None = None
    lora_lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    length_normalize: bool = False
    score_batch_size: int = 8

    def cpt_recipe(self) -> CPTRecipe:
        """The ``cpt`` method's recipe: these radii, decay, steps, batch, ``cpt_lr`` and seed."""
        return CPTRecipe(eps_input=self.eps_input, eps_format=self.eps_format, decay=self.decay, radius=self.radius,
                         train=TrainSettings(steps=self.steps, batch_size=self.batch_size, lr=self.cpt_lr,
                                             seed=self.seed))

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("seed", 0), ("pt_tokens", 1), ("lora_r", 1),
                              ("lora_alpha", 1), ("score_batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
        for name in ("cpt_lr", "pt_lr", "lora_lr"):
            _check_number(name, getattr(self, name), "a finite number > 0", lambda v: v > 0)
        for name in ("eps_input", "eps_format"):
            _check_number(name, getattr(self, name), "a finite number >= 0", lambda v: v >= 0)
        _check_number("decay", self.decay, "a number in (0, 1]", lambda v: 0 < v <= 1)
        if self.radius not in RADIUS_MODES:
            raise ValueError(f"radius={self.radius!r} must be one of: {', '.join(RADIUS_MODES)}")
        if self.pt_init_text is not None and (not isinstance(self.pt_init_text, str) or not self.pt_init_text.strip()):
            raise ValueError(f"pt_init_text={self.pt_init_text!r} must be a non-empty string or None")
        if not isinstance(self.length_normalize, bool):
            raise ValueError(f"length_normalize={self.length_normalize!r} must be True or False")

    def replace(self, **changes: Any) -> MethodSettings:
        """A copy with ``changes`` applied (validated); unknown names raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown MethodSettings field {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
        return MethodSettings(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def _check_number(name: str, value: Any, accepted: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}={value!r} must be {accepted}")


@dataclass(frozen=True)
class FitInfo:
    """What :meth:`Method.fit` did.

    Attributes:
        losses: the training loss of each optimizer step (empty for ``zero-shot`` and ``icl``).
        seconds: wall-clock seconds of the whole fit (set-up and training).
        trainable_parameters: number of trained scalars (0 for ``zero-shot`` and ``icl``).
    """

    losses: list[float]
    seconds: float
    trainable_parameters: int


@runtime_checkable
class Method(Protocol):
    """A few-shot classifier over a frozen causal LM (see :func:`make_method`)."""

    name: str
    labels: list[str]

    def prepare(self, shots: Sequence[Any]) -> None:
        """Set the method up on ``shots`` in its untrained initial state (no optimizer step)."""

    def fit(self, shots: Sequence[Any]) -> FitInfo:
        """:meth:`prepare`, then train on the shots as queries (methods without training just prepare)."""

    def context_embeddings(self) -> torch.Tensor | None:
        """The ``(1, N, d)`` embeddings placed before every scored query, or ``None``."""

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), C)`` label log-likelihoods, columns in ``labels`` order."""

    def label_loss(self, texts: Sequence[str], labels: Sequence[str], scores: torch.Tensor | None = None) -> float:
        """Mean negative log-likelihood of each text's gold label sequence (``scores``: reuse these)."""


# -- shared helpers ----------------------------------------------------------------------------------


def model_device(model) -> torch.device:
    """The device of ``model``'s input embeddings."""
    return model.get_input_embeddings().weight.device


@contextmanager
def frozen(model, seed: int) -> Iterator[None]:
    """Freeze ``model`` (no gradients, eval mode) and seed a forked RNG; restore flags, modes and RNG after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modules = list(model.modules())
    modes = [m.training for m in modules]
    device = model_device(model)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model.requires_grad_(False)
            model.eval()
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


def label_batch(
    queries: dict[str, torch.Tensor], rows: torch.Tensor, device, prefix_ids: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Rows of a :func:`cptune.render_queries` batch as ``input_ids``/``attention_mask``/``labels``.

    Labels are the token ids at label tokens and -100 elsewhere (the loss is on labels only). The
    batch is trimmed to its longest row; ``prefix_ids`` ``(N,)`` (e.g. demonstrations) is put
    before every row, unscored.
    """
    width = int(queries["attention_mask"][rows].sum(dim=1).max())
    ids = queries["input_ids"][rows, :width]  # (B, T)
    mask = queries["attention_mask"][rows, :width]
    labels = torch.where(queries["input_type_mask"][rows, :width] == TokenRole.LABEL, ids, IGNORE_INDEX)
    if prefix_ids is not None:
        b, n = ids.shape[0], prefix_ids.numel()
        ids = torch.cat([prefix_ids.view(1, n).expand(b, n), ids], dim=1)  # (B, N+T)
        mask = torch.cat([torch.ones(b, n, dtype=mask.dtype), mask], dim=1)
        labels = torch.cat([torch.full((b, n), IGNORE_INDEX, dtype=labels.dtype), labels], dim=1)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def optimize(
    name: str,
    params: list[torch.nn.Parameter],
    loss_of_rows: Callable[[torch.Tensor], torch.Tensor],
    num_queries: int,
    settings: MethodSettings,
    lr: float,
) -> list[float]:
    """AdamW (no weight decay) with linear decay to 0 over ``settings.steps`` seeded batches.

    The same schedule and batches as :func:`cptune.training.train`. Returns the loss of each step.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = settings.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    losses = []
    for step in range(total):
        loss = loss_of_rows(batch_indices(num_queries, settings.batch_size, settings.seed, step))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{name}: loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


# -- the methods --------------------------------------------------------------------------------------


class BaseMethod:
    """Shared behaviour: shot checks, seeded and side-effect-free fitting, scoring and label loss.

    Subclasses set ``name`` and implement :meth:`_prepare` (and :meth:`_train` if they train),
    :meth:`context_embeddings` and, if they score another model, :meth:`_scoring_model`.
    """

    name = ""
    needs_fit = True
    settings_read: tuple[str, ...] = ("length_normalize",)
    """The :class:`MethodSettings` fields that can change this method's scores (besides ``seed``)."""

    def __init__(self, base_model, tokenizer, template: Template, label_words: Mapping[str, str],
                 settings: MethodSettings) -> None:
        if not isinstance(template, Template):
            raise ValueError(f"template must be a cptune.Template; got {type(template).__name__}")
        words = {str(k): str(v) for k, v in dict(label_words).items()}
        if len(words) < 2:
            raise ValueError(f"label_words={words!r} must map at least two labels to words")
        label_token_ids(template, tokenizer, words)  # checks the words tokenize to distinct sequences
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.template = template
        self.label_words = words
        self.settings = settings
        self._ready = not self.needs_fit

    @property
    def labels(self) -> list[str]:
        """Label names in the column order of :meth:`scores`."""
        return list(self.label_words)

    def prepare(self, shots: Sequence[Any], queries: Sequence[Any] | None = None) -> None:
        """Set the method up on ``shots`` in its untrained state (e.g. CPT with delta 0 scores as ICL).

        Args:
            shots: the K labelled demonstrations, ``(text, label)`` pairs or objects with ``.text``
                and ``.label``; labels must be keys of ``label_words``.
            queries: the labelled training queries, likewise; ``None``: the shots themselves (true
                few-shot). Every trained method trains on the same queries.
        """
        shots = list(shots)
        queries = shots if queries is None else list(queries)
        for name, given in (("shots", shots), ("queries", queries)):
            if not given:
                raise ValueError(f"{name} is empty; give at least one (text, label) example")
        self._ready = False
        with frozen(self.base_model, self.settings.seed):
            self._queries = render_queries(queries, self.template, self.tokenizer, self.label_words)
            self._prepare(shots)
        self._ready = True

    def fit(self, shots: Sequence[Any], queries: Sequence[Any] | None = None) -> FitInfo:
        """Prepare on ``shots`` and train on ``queries`` (default: the shots); refitting starts again from scratch.

        Returns:
            The :class:`FitInfo`.
        """
        start = time.perf_counter()
        self.prepare(shots, queries)
        with frozen(self.base_model, self.settings.seed):
            losses = self._train()
        return FitInfo(losses=losses, seconds=time.perf_counter() - start,
                       trainable_parameters=self.trainable_parameters())

    def trainable_parameters(self) -> int:
        """Number of scalars the method trains."""
        return 0

    def _prepare(self, shots: list) -> None:
        pass

    def _train(self) -> list[float]:
        return []

    def _scoring_model(self):
        return self.base_model

    def context_embeddings(self) -> torch.Tensor | None:
        """The ``(1, N, d)`` embeddings placed before every scored query (``None``: no context)."""
        return None

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), C)`` float32 log-likelihood of each label's tokens after context and query.

        Raises:
            RuntimeError: the method needs :meth:`fit` (or :meth:`prepare`) first.
        """
        if not self._ready:
            raise RuntimeError(f"{self.name}: call fit(shots) (or prepare(shots)) before scores()")
        texts = text_list(texts)
        if not texts:
            return torch.zeros(0, len(self.label_words))
        context = self.context_embeddings()
        if context is not None:
            context = context.detach().to(self.base_model.get_input_embeddings().weight.dtype)
        return score_texts(self._scoring_model(), self.tokenizer, self.template, self.label_words, texts,
                           context_embeds=context, batch_size=self.settings.score_batch_size,
                           length_normalize=self.settings.length_normalize)

    def label_loss(self, texts: Sequence[str], labels: Sequence[str], scores: torch.Tensor | None = None) -> float:
        """Mean over texts of ``-scores[i, gold_i]``: the LM's NLL of the gold label tokens.

        Per token if ``length_normalize``. Not normalised over the C labels, so it is comparable to
        the training loss (cross-entropy over the vocabulary); used for the train-vs-test gap.

        Args:
            texts: the texts.
            labels: their gold labels (keys of ``label_words``).
            scores: ``self.scores(texts)`` if already computed (saves scoring the texts again).

        Raises:
            ValueError: for unequal lengths, a label not in ``label_words`` or ``scores`` of the wrong shape.
        """
        return mean_gold_loss(self, texts, labels, scores)


def mean_gold_loss(method, texts: Sequence[str], labels: Sequence[Any], scores: torch.Tensor | None = None) -> float:
    """Mean over texts of ``-scores[i, gold_i]`` for a method with ``label_words``, ``labels`` and
    ``scores(texts)`` (the body of every method's ``label_loss``).

    Raises:
        ValueError: for unequal lengths, a label not in ``label_words`` or ``scores`` of the wrong shape.
    """
    texts, labels = list(texts), [str(label) for label in labels]
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"got {len(texts)} texts and {len(labels)} labels; give the same non-zero number")
    unknown = sorted(set(labels) - set(method.label_words))
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not in label_words; accepted: {', '.join(method.label_words)}")
    if scores is None:
        scores = method.scores(texts)
    elif tuple(scores.shape) != (len(texts), len(method.label_words)):
        want = (len(texts), len(method.label_words))
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected {want} (texts, labels)")
    gold = torch.tensor([method.labels.index(label) for label in labels], device=scores.device)
    return float(-scores.gather(1, gold[:, None]).mean())


def text_list(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list, every one a string (what every method's ``scores`` takes).

    Raises:
        ValueError: naming the first text that is not a string.
    """
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; got {bad[0]!r}")
    return texts
