"""Label scoring after a (learned) context, and classification metrics.

The context is encoded once; its key/value cache is reused, expanded without copying, for every
batch of queries. A label is scored by the log-likelihood of its full token sequence after the
query (optionally divided by its length). When every label is a single token, one forward of the
query prefix gives all scores at once.

Contextual calibration (Zhao et al. 2021, "Calibrate Before Use") is available on top of any scores:
score a few content-free inputs (:data:`CONTENT_FREE_TEXTS`) after the same context, average their
label probabilities into ``p_cf``, and divide every query's label probabilities by ``p_cf``
(:func:`contextual_calibration`). It removes the bias a context gives some labels (the majority or
the last demonstration's label, or a label word the model simply prefers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cptune.cpt.engine import expand_cache, max_positions
from cptune.text.context import default_bos
from cptune.text.template import label_token_ids, render_example

CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")
"""The content-free inputs of Zhao et al. (2021), scored to estimate the context's label bias."""


@torch.no_grad()
def encode_context(base_model, context_embeds: torch.Tensor | None):
    """The batch-1 key/value cache of ``context_embeds`` ``(1, N, d)``, or ``None`` for no context."""
    if context_embeds is None or context_embeds.shape[1] == 0:
        return None
    return base_model(inputs_embeds=context_embeds, use_cache=True, logits_to_keep=1).past_key_values


@torch.no_grad()
def label_log_likelihoods(
    base_model,
    context_cache,
    query_ids: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    length_normalize: bool = False,
    pad_id: int = 0,
) -> torch.Tensor:
    """Log-likelihood of each label after each query.

    Args:
        base_model: the frozen causal LM.
        context_cache: from :func:`encode_context` (``None``: no context).
        query_ids: token ids of each query, ending with the output template.
        label_ids: token ids of each label (as placed after the output template).
        batch_size: queries per forward.
        length_normalize: divide each label's log-likelihood by its number of tokens.
        pad_id: id used for right padding (never attended).

    Returns:
        ``(num_queries, num_labels)`` float32 scores.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not query_ids:
        return torch.zeros(0, len(label_ids))
    single = all(len(ids) == 1 for ids in label_ids)
    scores = []
    for start in range(0, len(query_ids), batch_size):
        chunk = query_ids[start : start + batch_size]
        if single:
            scores.append(_score_single_token(base_model, context_cache, chunk, label_ids, pad_id))
        else:
            scores.append(_score_sequences(base_model, context_cache, chunk, label_ids, pad_id, length_normalize))
    return torch.cat(scores).float()


def _forward(base_model, context_cache, rows: Sequence[Sequence[int]], pad_id: int, keep):
    device = base_model.get_input_embeddings().weight.device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    kwargs = {}
    if context_cache is not None:
        n = context_cache.get_seq_length()
        kwargs["past_key_values"] = expand_cache(context_cache, len(rows))
        mask = torch.cat([torch.ones(len(rows), n, dtype=mask.dtype, device=device), mask], dim=1)  # (B, N+T)
    return base_model(input_ids=ids, attention_mask=mask, use_cache=context_cache is not None,
                      logits_to_keep=keep.to(device), **kwargs).logits


def _score_single_token(base_model, cache, rows, label_ids, pad_id) -> torch.Tensor:
    last = torch.tensor([[len(r) - 1] for r in rows])  # (B, 1) position of each row's last token
    logits = _forward(base_model, cache, rows, pad_id, last)[:, 0]  # (B, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[:, [ids[0] for ids in label_ids]]  # (B, C)


def _score_sequences(base_model, cache, rows, label_ids, pad_id, length_normalize) -> torch.Tensor:
    seqs, spans, targets = [], [], []
    for r in rows:
        for lab in label_ids:
            seqs.append(list(r) + list(lab[:-1]))  # the last label token is only predicted, never read
            spans.append((len(r), len(lab)))
            targets.extend(lab)
    width = max(len(s) for s in seqs)
    keep = torch.zeros(len(seqs), width, dtype=torch.bool)  # positions predicting a label token
    for i, (start, length) in enumerate(spans):
        keep[i, start - 1 : start - 1 + length] = True
    logits = _forward(base_model, cache, seqs, pad_id, keep)  # (M, V), row-major over keep
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(1, torch.tensor(targets, device=logp.device).unsqueeze(1)).squeeze(1)
    out = torch.zeros(len(seqs), dtype=torch.float32, device=logp.device)
    owner = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([n for _, n in spans])).to(logp.device)
    out.index_add_(0, owner, token_logp)
    if length_normalize:
        out = out / torch.tensor([n for _, n in spans], dtype=out.dtype, device=out.device)
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


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], num_labels: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows gold, columns predicted)."""
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for p, g in zip(predicted, gold, strict=True):
        confusion[g, p] += 1
    total = int(confusion.sum())
    accuracy = float(confusion.diag().sum()) / max(total, 1)
    f1s = []
    for c in range(num_labels):
        tp = float(confusion[c, c])
        fp = float(confusion[:, c].sum()) - tp
        fn = float(confusion[c, :].sum()) - tp
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / num_labels, "confusion": confusion.tolist()}


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
    """
    ids = label_token_ids(template, tokenizer, label_words)
    cache = encode_context(base_model, context_embeds)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = list(texts)
    queries = query_token_ids(texts + list(CONTENT_FREE_TEXTS) * calibrate, template, tokenizer,
                              add_bos=cache is None)
    _check_lengths(base_model, 0 if context_embeds is None else context_embeds.shape[1], queries,
                   max(len(ids[label]) for label in label_words))
    scores = label_log_likelihoods(
        base_model,
        cache,
        queries,
        [ids[label] for label in label_words],
        batch_size=batch_size,
        length_normalize=length_normalize,
        pad_id=pad,
    )
    if not calibrate:
        return scores
    return contextual_calibration(scores[: len(texts)], scores[len(texts) :])


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
