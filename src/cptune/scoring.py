"""Label scoring after a (learned) context, and classification metrics.

The context is encoded once; every batch of queries runs after its key/value cache
(:mod:`cptune.cpt.engine`: packed into one sequence where the model allows, else padded rows).
A label is scored by the log-likelihood of its full token sequence after the query (optionally
divided by its length). When every label is a single token, one forward of the query prefix gives
all scores at once.

Contextual calibration (Zhao et al. 2021, "Calibrate Before Use") is available on top of any scores:
score a few content-free inputs (:data:`CONTENT_FREE_TEXTS`) after the same context, average their
label probabilities into ``p_cf``, and divide every query's label probabilities by ``p_cf``
(:func:`contextual_calibration`). It removes the bias a context gives some labels (the majority or
the last demonstration's label, or a label word the model simply prefers).

Batch calibration (after Zhou et al., ICLR 2024) removes the same kind of bias estimated from a batch
of real inputs instead: the mean label log-probability over the batch is the bias
(:func:`label_bias`), subtracted from every row (:func:`remove_label_bias`). The classifier's
balance guard (:mod:`cptune.balance`) applies it when the learned context gives one label to nearly
every input; a :class:`ContextScorer` built with that ``label_bias`` applies it to every query.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cptune import reporting
from cptune.cpt.engine import Prefix, compiled, encode_prefix, extend_prefix, max_positions, run_queries
from cptune.text.context import default_bos
from cptune.text.template import label_token_ids, render_example

CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")
"""The content-free inputs of Zhao et al. (2021), scored to estimate the context's label bias."""
BAR_DELAY_S = 1.0
"""Seconds of scoring before its progress bar appears: ``cptune eval`` on a file gets one, one quick
``predict`` leaves none behind."""


@torch.no_grad()
def encode_context(base_model, context_embeds: torch.Tensor | None) -> Prefix | None:
    """``context_embeds`` ``(1, N, d)`` encoded once for any number of query batches; ``None`` for no context."""
    if context_embeds is None or context_embeds.shape[1] == 0:
        return None
    return encode_prefix(base_model, context_embeds)


@torch.no_grad()
def label_log_likelihoods(
    base_model,
    context: Prefix | None,
    query_ids: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    length_normalize: bool = False,
    layout: str = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """Log-likelihood of each label after each query.

    Args:
        base_model: the frozen causal LM.
        context: from :func:`encode_context` (``None``: no context).
        query_ids: token ids of each query, ending with the output template.
        label_ids: token ids of each label (as placed after the output template).
        batch_size: queries per forward.
        length_normalize: divide each label's log-likelihood by its number of tokens.
        layout: how the queries run after the context (:func:`cptune.cpt.engine.run_queries`).
        progress: a progress bar over the queries (:func:`cptune.reporting.progress`), drawn once the
            scoring has taken :data:`BAR_DELAY_S`.

    Returns:
        ``(num_queries, num_labels)`` float32 scores.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not query_ids:
        return torch.zeros(0, len(label_ids))
    scores = []
    with reporting.progress(len(query_ids), "score", unit="text", delay=BAR_DELAY_S, enabled=progress) as bar:
        for start in range(0, len(query_ids), batch_size):
            rows = query_ids[start : start + batch_size]
            scores.append(_score_chunk(base_model, context, rows, label_ids, length_normalize, layout))
            bar.update(len(rows))
    return torch.cat(scores).float()


def _score_chunk(base_model, context, rows, label_ids, length_normalize, layout) -> torch.Tensor:
    """``(len(rows), C)`` scores of one batch: a single forward after the context."""
    if all(len(ids) == 1 for ids in label_ids):  # one query each; its last position predicts the label
        seqs = [torch.tensor(list(r)) for r in rows]
        logits = run_queries(base_model, context, seqs, [torch.tensor([len(r) - 1]) for r in rows], layout)  # (B, V)
        return torch.log_softmax(logits.float(), dim=-1)[:, [ids[0] for ids in label_ids]]  # (B, C)
    seqs, keep, targets, lengths = [], [], [], []
    for r in rows:
        for lab in label_ids:  # the query, then the label but its last token (only predicted, never read)
            seqs.append(torch.tensor(list(r) + list(lab[:-1])))
            keep.append(torch.arange(len(r) - 1, len(r) - 1 + len(lab)))
            targets.extend(lab)
            lengths.append(len(lab))
    logits = run_queries(base_model, context, seqs, keep, layout)  # (M, V): every label token, in order
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(1, torch.tensor(targets, device=logp.device).unsqueeze(1)).squeeze(1)  # (M,)
    owner = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths)).to(logp.device)
    out = torch.zeros(len(seqs), dtype=torch.float32, device=logp.device).index_add_(0, owner, token_logp)
    if length_normalize:
        out = out / torch.tensor(lengths, dtype=out.dtype, device=out.device)
    return out.view(len(rows), len(label_ids))


def contextual_calibration(scores: torch.Tensor, content_free_scores: torch.Tensor) -> torch.Tensor:
    """Calibrated label log-probabilities (Zhao et al. 2021).

    Both inputs are label scores from the same context (``(n, C)`` and ``(m, C)``); each row is turned
    into label probabilities with a softmax over the C labels. With ``p_cf`` the mean probability
    of the ``m`` content-free rows, every row ``p`` becomes ``p / p_cf``, renormalised.

    Returns:
        ``(n, C)`` log-probabilities; each row's exponentials sum to 1.

    Raises:
        ValueError: if the label counts differ or there is no content-free row.
    """
    if content_free_scores.ndim != 2 or content_free_scores.shape[0] == 0:
        raise ValueError(f"content_free_scores must be (m, C) with m >= 1; got {tuple(content_free_scores.shape)}")
    if scores.ndim != 2 or scores.shape[1] != content_free_scores.shape[1]:
        raise ValueError(f"scores {tuple(scores.shape)} and content_free_scores {tuple(content_free_scores.shape)} "
                         "must have the same number of labels")
    log_p_cf = torch.logsumexp(torch.log_softmax(content_free_scores.float(), dim=-1), dim=0) - math.log(
        content_free_scores.shape[0])  # (C,) log of the mean probability
    return torch.log_softmax(torch.log_softmax(scores.float(), dim=-1) - log_p_cf, dim=-1)


def label_bias(batch_scores: torch.Tensor) -> torch.Tensor:
    """The label bias of a batch: the mean label log-probability per label.

    With ``log p_i = log_softmax(s_i)`` the label log-probabilities of row ``i`` of the ``(m, C)``
    batch scores, ``b_c = (1/m) sum_i log p_i(c)``. This is the log-space form of Zhou et al.'s (2024)
    estimate (their mean is over probabilities): with it the calibrated batch is exactly balanced in
    the sense of :func:`remove_label_bias`.

    Returns:
        ``(C,)`` float32.

    Raises:
        ValueError: not an ``(m, C)`` tensor with ``m >= 1``.
    """
    if batch_scores.ndim != 2 or batch_scores.shape[0] == 0:
        raise ValueError(f"batch_scores must be (m, C) with m >= 1; got {tuple(batch_scores.shape)}")
    return torch.log_softmax(batch_scores.float(), dim=-1).mean(dim=0)


def remove_label_bias(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Batch-calibrated label log-probabilities: ``log_softmax(log_softmax(s) - b)`` per row.

    Each row ``s`` of the ``(n, C)`` scores becomes label log-probabilities, the ``(C,)`` bias ``b``
    (:func:`label_bias`) is subtracted and the row is renormalised. Adding a constant to a row of
    ``scores`` changes nothing; on the batch that gave ``b``, every label's mean calibrated
    log-probability is the same (the renormalisation subtracts one number per row, from every label).

    Returns:
        ``(n, C)`` log-probabilities; each row's exponentials sum to 1.

    Raises:
        ValueError: a bias that is not one number per label.
    """
    if scores.ndim != 2 or bias.shape != (scores.shape[1],):
        raise ValueError(f"bias {tuple(bias.shape)} must hold one number per label of scores {tuple(scores.shape)}")
    return torch.log_softmax(torch.log_softmax(scores.float(), dim=-1) - bias.to(scores.device).float(), dim=-1)


def batch_calibration(scores: torch.Tensor, batch_scores: torch.Tensor) -> torch.Tensor:
    """``(n, C)`` scores calibrated by the ``(m, C)`` batch's bias: ``remove_label_bias(scores, label_bias(batch))``."""
    return remove_label_bias(scores, label_bias(batch_scores))


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], num_labels: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows gold, columns predicted)."""
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for p, g in zip(predicted, gold, strict=True):
        confusion[g, p] += 1
    total = int(confusion.sum())
    accuracy = float(confusion.diag().sum()) / max(total, 1)
    f1s = [row["f1"] for row in per_class_metrics(confusion.tolist())]
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / num_labels, "confusion": confusion.tolist()}


def per_class_metrics(confusion: Sequence[Sequence[int]]) -> list[dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows gold, columns predicted).

    precision_c = tp / (tp + fp), recall_c = tp / (tp + fn), F1_c = 2 tp / (2 tp + fp + fn); each is 0
    when its denominator is (no prediction of c, no example of c).
    """
    rows = []
    for c in range(len(confusion)):
        tp = confusion[c][c]
        predicted = sum(row[c] for row in confusion)
        support = sum(confusion[c])
        rows.append({
            "precision": tp / predicted if predicted else 0.0,
            "recall": tp / support if support else 0.0,
            "f1": 2 * tp / (predicted + support) if tp else 0.0,
            "support": support,
        })
    return rows


def query_token_ids(texts: Sequence[str], template, tokenizer, add_bos: bool = False) -> list[list[int]]:
    """Token ids of each text rendered as a query up to its output template.

    ``add_bos`` starts each query with the BOS token when the tokenizer adds one by default (for
    queries scored without a context; a context starts with it already).
    """
    bos = default_bos(tokenizer) if add_bos else None
    prefix = [bos] if bos is not None else []
    return [prefix + render_example(template, tokenizer, t, None, with_separator=False)[0] for t in texts]


def score_texts(
    base_model,
    tokenizer,
    template,
    label_words: dict[str, str],
    texts: Sequence[str],
    context_embeds: torch.Tensor | None = None,
    batch_size: int = 8,
    length_normalize: bool = False,
    calibrate: bool = False,
    progress: bool = False,
    label_bias: Sequence[float] | None = None,
) -> torch.Tensor:
    """``(len(texts), num_labels)`` label log-likelihoods after an optional context.

    Args:
        base_model: the frozen causal LM.
        tokenizer: its tokenizer.
        template: how queries are written.
        label_words: label -> word, in the order of the returned columns.
        texts: the texts to classify.
        context_embeds: ``(1, N, d)`` context embeddings (a CPT context, or plain token
            embeddings for ICL); ``None`` for zero-shot.
        batch_size: queries per forward.
        length_normalize: divide each label's score by its token count.
        calibrate: apply :func:`contextual_calibration` with :data:`CONTENT_FREE_TEXTS` scored after
            the same context; the result is then calibrated log-probabilities over the labels.
        progress: a progress bar over the texts (see :func:`label_log_likelihoods`).
        label_bias: ``(C,)`` bias removed after that (:func:`remove_label_bias`); ``None``: none.
    """
    scorer = ContextScorer(base_model, tokenizer, template, label_words, context_embeds, batch_size=batch_size,
                           length_normalize=length_normalize, calibrate=calibrate, label_bias=label_bias)
    return scorer.scores(scorer.query_ids(texts), progress=progress)


def _check_lengths(base_model, context_len: int, queries: Sequence[Sequence[int]], label_len: int) -> None:
    """Refuse a query that, after the context and with its longest label, needs more positions than
    the model has (GPT-2 style models would fail with an IndexError, rotary ones silently degrade)."""
    limit = max_positions(base_model.config)
    if limit is None or not queries:
        return
    longest = max(range(len(queries)), key=lambda i: len(queries[i]))
    needed = context_len + len(queries[longest]) + label_len - 1  # the last label token is only predicted
    if needed > limit:
        raise ValueError(
            f"text {longest} needs {needed} positions (context {context_len} + query {len(queries[longest])} + "
            f"label {label_len} - 1 tokens), more than the model's {limit}; shorten the text or the context"
        )


@dataclass(frozen=True)
class PartialQuery:
    """A query being scored a slice at a time (:meth:`ContextScorer.prefill`, :meth:`ContextScorer.finish`).

    Attributes:
        ids: the whole query's token ids.
        done: how many of them have run (``0 <= done < len(ids)``).
        prefix: the context followed by ``ids[:done]`` (the context itself, or ``None`` for no context,
            while ``done == 0``); its own cache, never the context's.
    """

    ids: tuple[int, ...]
    done: int
    prefix: Prefix | None


class ContextScorer:
    """:func:`score_texts` with everything that does not depend on the texts done once.

    Built once: the label token ids, the context's key/value cache (:func:`encode_context`) and, with
    ``calibrate``, the content-free inputs' label scores after it. Each call then pays only for its own
    query tokens, which is what a server answering many requests after one learned context wants.
    ``scorer.scores(scorer.query_ids(texts))`` equals ``score_texts(...)`` with the same arguments
    (up to float rounding: the queries are batched differently).

    Args:
        base_model: the frozen causal LM.
        tokenizer: its tokenizer.
        template: how queries are written.
        label_words: label -> word, in the order of the returned columns.
        context_embeds: ``(1, N, d)`` context embeddings; ``None`` for zero-shot.
        batch_size: queries per forward.
        length_normalize: divide each label's score by its token count.
        calibrate: contextual calibration against :data:`CONTENT_FREE_TEXTS`, scored here once.
        layout: how the queries run after the context (:func:`cptune.cpt.engine.run_queries`;
            ``"auto"``: the engine's choice for a cached context).
        compile: run the query forwards under ``torch.compile`` (:func:`cptune.cpt.engine.compiled`);
            the same scores up to float rounding. Off by default: it does not pay on the CPU
            (docs/scaling.md, "Compiling").
        label_bias: ``(C,)`` bias removed from every score after any contextual calibration
            (:func:`remove_label_bias`; a classifier's balance guard sets it); ``None``: none.
    """

    @torch.no_grad()
    def __init__(
        self,
        base_model,
        tokenizer,
        template,
        label_words: dict[str, str],
        context_embeds: torch.Tensor | None = None,
        batch_size: int = 8,
        length_normalize: bool = False,
        calibrate: bool = False,
        layout: str = "auto",
        compile: bool = False,
        label_bias: Sequence[float] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.base_model, self.tokenizer, self.template = base_model, tokenizer, template
        self.batch_size, self.length_normalize, self.layout = batch_size, length_normalize, layout
        ids = label_token_ids(template, tokenizer, label_words)
        self.label_ids = [ids[label] for label in label_words]
        self.context_tokens = 0 if context_embeds is None else int(context_embeds.shape[1])
        self.context = encode_context(base_model, context_embeds)
        self.runner = compiled(base_model) if compile else base_model  # what runs the queries
        self.content_free_scores = None  # (len(CONTENT_FREE_TEXTS), C) when calibrating
        self.label_bias = None if label_bias is None else torch.tensor(list(label_bias), dtype=torch.float32)  # (C,)
        if self.label_bias is not None and self.label_bias.shape != (len(self.label_ids),):
            raise ValueError(f"label_bias has {self.label_bias.numel()} numbers for {len(self.label_ids)} labels")
        if calibrate:
            self.content_free_scores = self._raw_scores(self.query_ids(CONTENT_FREE_TEXTS))

    def query_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text as a query (:func:`query_token_ids`, BOS first when there is no context)."""
        return query_token_ids(list(texts), self.template, self.tokenizer, add_bos=self.context is None)

    def check_lengths(self, query_ids: Sequence[Sequence[int]]) -> None:
        """Refuse a query longer than the model's positions allow after the context.

        Raises:
            ValueError: naming the first longest query's index, the positions it needs and the model's.
        """
        _check_lengths(self.base_model, self.context_tokens, query_ids, max(len(ids) for ids in self.label_ids))

    @torch.no_grad()
    def scores(self, query_ids: Sequence[Sequence[int]], progress: bool = False) -> torch.Tensor:
        """``(len(query_ids), C)`` label scores (calibrated log-probabilities when calibrating or
        removing a label bias), after :meth:`check_lengths`; ``progress``: a bar over the queries
        (:func:`label_log_likelihoods`)."""
        self.check_lengths(query_ids)
        return self._calibrated(self._raw_scores(query_ids, progress))

    def begin(self, query_ids: Sequence[int]) -> PartialQuery:
        """A query to score in slices (a long one, so that other queries can run between its slices):
        nothing run yet. Then :meth:`prefill` any number of times and :meth:`finish` once.

        Raises:
            ValueError: an empty query, or one longer than the model's positions allow (:meth:`check_lengths`).
        """
        if not query_ids:
            raise ValueError("a query to score in slices needs at least one token")
        self.check_lengths([query_ids])
        return PartialQuery(tuple(query_ids), 0, self.context)

    @torch.no_grad()
    def prefill(self, part: PartialQuery, end: int) -> PartialQuery:
        """Run the query's tokens ``part.done .. end - 1`` after ``part.prefix``; ``part`` is left as it was.

        Only tokens before the last one can be prefilled: the last one's logits give the label scores
        (:meth:`finish`).

        Raises:
            ValueError: ``end`` not in ``part.done + 1 .. len(part.ids) - 1``.
        """
        if not part.done < end < len(part.ids):
            raise ValueError(f"end={end} must be from {part.done + 1} to {len(part.ids) - 1} (the query has "
                             f"{len(part.ids)} tokens, {part.done} run)")
        table = self.base_model.get_input_embeddings()
        embeds = table(torch.tensor([part.ids[part.done : end]], device=table.weight.device))  # (1, S, d)
        return PartialQuery(part.ids, end, extend_prefix(self.base_model, part.prefix, embeds))

    @torch.no_grad()
    def finish(self, part: PartialQuery) -> torch.Tensor:
        """``(1, C)`` label scores of the query, from its tokens not run yet after ``part.prefix``: the
        scores :meth:`scores` gives the whole query (up to float rounding), the labels' tokens,
        calibration and label bias included."""
        if part.done == 0:
            return self.scores([part.ids])
        return self._calibrated(self._raw_scores([part.ids[part.done :]], prefix=part.prefix))

    def _calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        """Raw label scores after contextual calibration and the label bias, where they are set."""
        if self.content_free_scores is not None:
            scores = contextual_calibration(scores, self.content_free_scores)
        if self.label_bias is not None:
            scores = remove_label_bias(scores, self.label_bias)
        return scores

    def _raw_scores(self, query_ids: Sequence[Sequence[int]], progress: bool = False,
                    prefix: Prefix | None = None) -> torch.Tensor:
        """Label log-likelihoods after the context, or after ``prefix`` (a query's earlier tokens after it)."""
        return label_log_likelihoods(self.runner, self.context if prefix is None else prefix, query_ids,
                                     self.label_ids, batch_size=self.batch_size,
                                     length_normalize=self.length_normalize, layout=self.layout,
                                     progress=progress)
