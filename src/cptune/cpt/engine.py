"""One context, many queries: encode a prefix once, then run a batch of queries after it.

A causal LM's states for a prefix (a CPT context, a soft prompt, ICL demonstrations) do not depend
on what follows, so the prefix is encoded once (batch 1) and every query attends to its cached keys
and values. With gradients enabled the cache keeps its autograd graph, so the loss of every query
flows back into the one prefix encoding: the gradient of copying the prefix into every row, at a
fraction of the work.

Three layouts run the queries:

- ``packed``: the batch's queries sit one after another in a single sequence after the prefix.
  Each query token has the position it would have right after the prefix (``P + t``) and a mask
  that lets it see the prefix and its own earlier tokens only. Nothing is padded and the prefix's
  keys and values are never copied per query: memory grows with the prefix and the total query
  tokens, not with batch x prefix.
- ``padded``: the queries are right-padded rows (bucketed by length), each attending to the
  prefix cache expanded to the batch (a view, no copy; transformers concatenates it per row).

- ``onepass``: the prefix and the packed queries in ONE forward (and one backward), the sequence
  ``[prefix | q1 | q2 | ...]``: positions as in ``packed``, and a mask that gives every prefix token
  the causal prefix and every query token the whole prefix and its own earlier tokens, nothing else
  (:func:`onepass_mask`). No cache is built or concatenated, and the per-layer kernels launch once
  instead of twice; the price is that the prefix is recomputed by every call, so it pays only where
  the prefix is computed anew anyway: training, where it carries the step's gradient
  (:func:`run_prefixed`). After an already-encoded prefix (scoring, the server) it recomputes the
  prefix each batch; ``auto`` never picks it there.

``auto`` uses only layouts the model passes a self-check for: it takes a custom 4-D mask and
explicit position ids and gives the padded layout's logits with them, checked once per model on a
few random tokens (:func:`layout_for`). Among those it picks by a measured rule per device
(:data:`ONEPASS_PAYS`, docs/scaling.md); the choice and its reason are logged and returned by
:func:`layout_report`.
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

LAYOUTS = ("auto", "packed", "padded", "onepass")
PACKED_ATTENTION = ("sdpa", "eager")  # implementations that read an arbitrary 4-D additive mask
_SELF_CHECK_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}  # of the largest logit; else 3e-2
ONEPASS_PAYS = {"cpu": False, "cuda": False}
"""Whether ``auto`` runs a freshly computed prefix and its queries in one pass, per device type.

From ``benchmarks/layout_rule.py`` (docs/scaling.md, "Query layouts"): on the 2-core CPU the
one-pass step was measured against the packed one; on CUDA it is not measured yet, so ``auto``
keeps the measured-safe two-pass layout there until the GPU benchmark (``benchmarks/gpu_vs_peft.py``,
every layout forced in turn) says otherwise. A device type not listed never gets it from ``auto``.
"""
PREFIX_SEGMENT = -1  # the segment id of prefix tokens in the one-pass mask; queries count from 0

# transformers 5.24 renamed the key/value cache keyword and output field past_key_values to cache; the
# old name warns (FutureWarning) until 5.40 removes it. A model with its own code may keep the old name.
CACHE_NAMES = ("cache", "past_key_values")
TRANSFORMERS_CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

logger = logging.getLogger(__name__)
_layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Prefix:
    """An encoded prefix: its batch-1 key/value cache, its length, and the logits asked for.

    Attributes:
        cache: the prefix's key/value cache (batch 1); never modified by :func:`run_queries`.
        length: P, the number of prefix tokens.
        logits: ``(K, V)`` logits at the positions passed as ``keep`` to :func:`encode_prefix`
            (``None`` if none were asked for).
        embeds: the ``(1, P, d)`` embeddings it was encoded from (what ``layout="onepass"`` reruns).
    """

    cache: Cache
    length: int
    logits: torch.Tensor | None = None
    embeds: torch.Tensor | None = None


def encode_prefix(model, embeds: torch.Tensor, keep: torch.Tensor | None = None) -> Prefix:
    """Encode ``embeds`` ``(1, P, d)`` once; gradients flow through the cache when enabled.

    Args:
        model: a Hugging Face causal LM.
        embeds: the prefix's input embeddings, batch 1.
        keep: 1-D positions of the prefix whose next-token logits are wanted (e.g. those that
            predict a demonstration's label), or ``None``.
    """
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise ValueError(f"the prefix must be (1, P, d) embeddings; got {tuple(embeds.shape)}")
    out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=keep if keep is not None else 1)
    return Prefix(getattr(out, cache_name(model)), embeds.shape[1], out.logits[0] if keep is not None else None,
                  embeds)


def cache_name(model) -> str:
    """The keyword ``model``'s forward takes a key/value cache under, and its output's field for it.

    ``cache`` from transformers 5.24 on, ``past_key_values`` before (and for a model with its own code
    that kept it); a forward that names neither (``**kwargs``) gets the installed transformers' name.
    """
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_NAMES if name in parameters), TRANSFORMERS_CACHE_NAME)


def fresh_cache(cache: Cache, batch_size: int = 1) -> Cache:
    """A new cache viewing ``cache``'s batch-1 tensors, expanded to ``batch_size`` rows (no copy).

    A forward appends to the cache it is given (in place); appending to this one concatenates into
    new tensors and leaves ``cache`` untouched, so one prefix serves any number of batches.
    """
    fresh = copy.copy(cache)
    fresh.layers = []
    for layer in cache.layers:
        view = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() > 0:
            if keys.shape[0] != 1:
                raise ValueError(f"the prefix cache must have batch 1; this one has {keys.shape[0]} rows")
            view.keys = keys.expand(batch_size, -1, -1, -1)  # (B, H, P, hd)
            view.values = layer.values.expand(batch_size, -1, -1, -1)
        fresh.layers.append(view)
    return fresh


def run_queries(
    model,
    prefix: Prefix | None,
    queries: Sequence[torch.Tensor],
    keep: Sequence[torch.Tensor],
    layout: str = "auto",
) -> torch.Tensor:
    """Next-token logits at chosen positions of each query, run after ``prefix``.

    Args:
        model: the causal LM that encoded ``prefix``.
        prefix: from :func:`encode_prefix`, or ``None`` (queries alone, each from position 0).
        queries: each ``(T_i,)`` token ids or ``(T_i, d)`` input embeddings (all of one kind).
        keep: for each query, 1-D positions (``0 <= t < T_i``, increasing) whose logits are wanted.
        layout: ``"auto"``, ``"packed"``, ``"padded"`` or ``"onepass"`` (see the module docstring;
            ``onepass`` reruns the prefix from ``prefix.embeds`` with the queries, and ``auto``,
            the prefix being encoded already, never picks it).

    Returns:
        ``(M, V)`` logits, M the total kept positions, in query order then position order.
    """
    if len(queries) != len(keep):
        raise ValueError(f"{len(queries)} queries but {len(keep)} keep lists")
    if not queries:
        return torch.zeros(0, model.get_output_embeddings().weight.shape[0])
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; accepted: {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = layout_for(model)
    else:
        _require(model, layout)
    if layout == "onepass":
        if prefix is None:  # nothing to run in the same pass: the packed layout is exactly that
            return _run_packed(model, None, list(queries), list(keep))
        return _run_onepass(model, prefix.embeds, None, list(queries), list(keep))[1]
    run = _run_packed if layout == "packed" else _run_padded
    return run(model, prefix, list(queries), list(keep))


def run_prefixed(
    model,
    prefix_embeds: torch.Tensor,
    prefix_keep: torch.Tensor | None,
    queries: Sequence[torch.Tensor],
    keep: Sequence[torch.Tensor],
    layout: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A prefix computed now and a batch of queries after it: :func:`encode_prefix` then :func:`run_queries`,
    or both in one pass (``layout="onepass"``). With gradients enabled they reach ``prefix_embeds``.

    Args:
        model: a Hugging Face causal LM.
        prefix_embeds: ``(1, P, d)`` prefix embeddings.
        prefix_keep: 1-D prefix positions whose next-token logits are wanted, or ``None``.
        queries: as in :func:`run_queries`.
        keep: as in :func:`run_queries`.
        layout: ``"auto"`` (:func:`layout_for` with ``fresh_prefix=True``), ``"packed"``, ``"padded"``
            or ``"onepass"``.

    Returns:
        The prefix's ``(K, V)`` logits at ``prefix_keep`` (``None`` without it) and the queries'
        ``(M, V)`` logits, as :func:`run_queries` returns them.
    """
    if prefix_embeds.ndim != 3 or prefix_embeds.shape[0] != 1:
        raise ValueError(f"the prefix must be (1, P, d) embeddings; got {tuple(prefix_embeds.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; accepted: {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = layout_for(model, fresh_prefix=True)
    else:
        _require(model, layout)
    if layout == "onepass" and queries:
        if len(queries) != len(keep):
            raise ValueError(f"{len(queries)} queries but {len(keep)} keep lists")
        return _run_onepass(model, prefix_embeds, prefix_keep, list(queries), list(keep))
    prefix = encode_prefix(model, prefix_embeds, keep=prefix_keep)
    return prefix.logits, run_queries(model, prefix, queries, keep, "packed" if layout == "onepass" else layout)


def _embed(model, queries: list[torch.Tensor]) -> list[torch.Tensor]:
    if queries[0].ndim == 2:
        return queries
    table = model.get_input_embeddings()
    lengths = [len(q) for q in queries]
    flat = table(torch.cat(queries).to(table.weight.device))  # (S, d)
    return list(flat.split(lengths))


def _packed_tokens(queries: list[torch.Tensor], offset: int):
    """Where each packed query token sits: ``(S,)`` segment (its query's index), position
    (``offset`` + its index in the query), and the ``(Q,)`` start of each query in the packed row."""
    device = queries[0].device
    lengths = torch.tensor([len(q) for q in queries], device=device)
    starts = torch.cumsum(lengths, 0) - lengths  # (Q,)
    segment = torch.repeat_interleave(torch.arange(len(queries), device=device), lengths)  # (S,)
    local = torch.arange(int(lengths.sum()), device=device) - starts[segment]  # (S,) position in its query
    return segment, offset + local, starts


def _run_packed(model, prefix, queries, keep) -> torch.Tensor:
    embeds = _embed(model, queries)
    device, dtype = embeds[0].device, embeds[0].dtype
    p = prefix.length if prefix is not None else 0
    segment, position, starts = _packed_tokens(embeds, p)  # position: where it would sit right after the prefix
    index = torch.cat([starts[i] + k.to(device) for i, k in enumerate(keep)])  # (M,)
    kwargs = {}
    if prefix is not None:
        kwargs[cache_name(model)] = fresh_cache(prefix.cache)

    def cached(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment and position of the keys before the packed tokens in a layer of this kind: the
        cached prefix keys (a sliding-window layer's cache may hold only the prefix's last ones)."""
        count = 0
        if prefix is not None:
            layer_types = getattr(model.config.get_text_config(), "layer_types", None)
            count = prefix.cache.layers[layer_types.index(kind) if layer_types else 0].keys.shape[-2]
        positions = torch.arange(p - count, p, device=device)
        return torch.full_like(positions, PREFIX_SEGMENT), positions

    out = model(
        inputs_embeds=torch.cat(embeds)[None],  # (1, S, d)
        attention_mask=_masks(model, segment, position, cached, dtype),
        position_ids=position[None],  # (1, S)
        use_cache=prefix is not None,
        logits_to_keep=index,
        **kwargs,
    )
    return out.logits[0]  # (M, V)


def _run_onepass(model, prefix_embeds, prefix_keep, queries, keep) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``[prefix | q1 | q2 | ...]`` in one forward: the prefix's logits at ``prefix_keep`` and the queries'."""
    embeds = _embed(model, queries)
    device, dtype = embeds[0].device, embeds[0].dtype
    p = prefix_embeds.shape[1]
    segment, position, starts = _packed_tokens(embeds, p)
    prefix_positions = torch.arange(p, device=device)
    segment = torch.cat([torch.full_like(prefix_positions, PREFIX_SEGMENT), segment])  # (P + S,)
    position = torch.cat([prefix_positions, position])  # (P + S,)
    query_index = torch.cat([p + starts[i] + k.to(device) for i, k in enumerate(keep)])  # (M,)
    prefix_index = prefix_keep.to(device) if prefix_keep is not None else query_index[:0]  # (K,)

    def no_cache(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        return segment[:0], position[:0]

    out = model(
        inputs_embeds=torch.cat([prefix_embeds[0].to(dtype), *embeds])[None],  # (1, P + S, d)
        attention_mask=_masks(model, segment, position, no_cache, dtype),
        position_ids=position[None],  # (1, P + S)
        use_cache=False,
        logits_to_keep=torch.cat([prefix_index, query_index]),
    )
    logits = out.logits[0]  # (K + M, V)
    k = len(prefix_index)
    return (logits[:k] if prefix_keep is not None else None), logits[k:]


def onepass_mask(segment: torch.Tensor, position: torch.Tensor, key_segment: torch.Tensor,
                 key_position: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Which keys each token may attend to, for prefix tokens (segment :data:`PREFIX_SEGMENT`) and
    packed queries (segment = the query's index).

    ``ok[i, j] = pos_j <= pos_i and (seg_j == PREFIX_SEGMENT or seg_j == seg_i)``, and in a
    sliding-window layer also ``pos_i - pos_j < window`` (transformers' ``sliding_window_overlay``,
    on the positions the tokens have, not their index in the sequence). A prefix token thus sees the
    prefix up to itself (causal), a query token the whole prefix and its own earlier tokens.

    Args:
        segment, position: ``(L,)`` of the tokens that attend (the rows).
        key_segment, key_position: ``(K,)`` of the keys (the columns).
        window: the sliding window, or ``None`` for full attention.

    Returns:
        ``(L, K)`` bool.
    """
    ok = key_position[None, :] <= position[:, None]
    ok &= (key_segment[None, :] == PREFIX_SEGMENT) | (key_segment[None, :] == segment[:, None])
    if window is not None:
        ok &= position[:, None] - key_position[None, :] < window
    return ok


def _masks(model, segment, position, cached, dtype):
    """The additive ``(1, 1, S, C + S)`` mask of S tokens after C cached keys, or one per layer type.

    ``cached(kind)`` gives the segment and position of the C cached keys of a layer of that kind;
    the keys are those plus the S tokens themselves, in that order (:func:`onepass_mask`).
    """
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)

    def additive(kind: str) -> torch.Tensor:
        if kind not in ("full_attention", "sliding_attention"):
            raise NotImplementedError(f"layer type {kind!r} has no packed mask")
        key_segment, key_position = cached(kind)
        ok = onepass_mask(segment, position, torch.cat([key_segment, segment]), torch.cat([key_position, position]),
                          window if kind == "sliding_attention" else None)
        zero = torch.zeros((), dtype=dtype, device=ok.device)
        return torch.where(ok, zero, torch.finfo(dtype).min)[None, None]  # (1, 1, S, C + S)

    if not layer_types:
        return additive("full_attention")
    return {kind: additive(kind) for kind in set(layer_types)}


def extend_prefix(model, prefix: Prefix | None, embeds: torch.Tensor) -> Prefix:
    """``prefix`` followed by ``embeds`` ``(1, S, d)``: a new prefix of ``P + S`` tokens (prefill in pieces).

    A long query can be run a slice at a time: each slice extends a per-query prefix (the context and
    the query's tokens so far), so a slice costs what the same tokens would cost in one pass. The
    slice runs after a :func:`fresh_cache` of ``prefix``'s cache, so ``prefix`` (a shared context) is
    never changed and serves any number of queries.

    Args:
        model: the causal LM that encoded ``prefix``.
        prefix: from :func:`encode_prefix` or this function, or ``None`` (``embeds`` start the sequence).
        embeds: the next ``(1, S, d)`` input embeddings.
    """
    if prefix is None:
        return encode_prefix(model, embeds)
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise ValueError(f"the slice must be (1, S, d) embeddings; got {tuple(embeds.shape)}")
    ones = torch.ones(1, embeds.shape[1], dtype=torch.long, device=embeds.device)
    out = _forward_rows(model, prefix, embeds, ones, 1)
    joined = None if prefix.embeds is None else torch.cat([prefix.embeds, embeds.to(prefix.embeds.dtype)], dim=1)
    return Prefix(getattr(out, cache_name(model)), prefix.length + embeds.shape[1], None, joined)


def run_rows(model, prefix: Prefix | None, embeds: torch.Tensor, attention_mask: torch.Tensor,
             keep: torch.Tensor | int = 0) -> torch.Tensor:
    """Right-padded rows ``(B, T, d)`` after ``prefix`` (its cache expanded to B rows, no copy).

    Args:
        model: the causal LM that encoded ``prefix``.
        prefix: from :func:`encode_prefix`, or ``None``.
        embeds: ``(B, T, d)`` right-padded query embeddings.
        attention_mask: ``(B, T)`` ones on real tokens (right padding keeps default positions right).
        keep: a ``(B, T)`` bool mask of positions whose logits are wanted, or 0 for all of them.

    Returns:
        ``(M, V)`` logits in row-major order of ``keep``, or ``(B, T, V)`` for ``keep=0``.
    """
    return _forward_rows(model, prefix, embeds, attention_mask, keep).logits


def _forward_rows(model, prefix, embeds, attention_mask, keep) -> CausalLMOutputWithPast:
    """The forward of :func:`run_rows`: its output, with the cache grown by the rows when there is a prefix."""
    batch = embeds.shape[0]
    kwargs = {}
    if prefix is not None:
        ones = torch.ones(batch, prefix.length, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, P + T): with a cache, past + current
        kwargs[cache_name(model)] = fresh_cache(prefix.cache, batch)
    return model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=prefix is not None,
                 logits_to_keep=keep, **kwargs)


def _run_padded(model, prefix, queries, keep) -> torch.Tensor:
    embeds = _embed(model, queries)
    device = embeds[0].device
    lengths = [len(e) for e in embeds]
    parts: dict[int, torch.Tensor] = {}
    for rows in length_buckets(lengths):
        width = max(lengths[r] for r in rows)
        batch = torch.zeros(len(rows), width, embeds[0].shape[-1], dtype=embeds[0].dtype, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        wanted = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for j, r in enumerate(rows):
            batch[j, : lengths[r]] = embeds[r]
            mask[j, : lengths[r]] = 1
            wanted[j, keep[r].to(device)] = True
        logits = run_rows(model, prefix, batch, mask, wanted)  # (M_b, V) row-major
        for r, part in zip(rows, logits.split(wanted.sum(dim=1).tolist()), strict=True):
            parts[r] = part
    return torch.cat([parts[r] for r in range(len(queries))])


def length_buckets(lengths: list[int], overhead_tokens: int = 32) -> list[list[int]]:
    """Group rows into buckets of similar length so little compute goes to padding.

    Sorts rows by length and splits the sorted order into contiguous runs minimising
    ``sum(len(run) * max_length(run)) + overhead_tokens * num_runs`` (dynamic programming,
    O(B^2)); ``overhead_tokens`` prices one extra forward call in padded-token units.

    Returns:
        Lists of row indices, shortest rows first.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sorted_lengths[j - 1] + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[j] : j])
        j = cut[j]
    return runs[::-1]


def layout_for(model, fresh_prefix: bool = False) -> str:
    """The layout ``auto`` runs for ``model``: after an encoded prefix, or with a prefix computed now.

    After an encoded prefix (``fresh_prefix=False``: scoring, the server): ``"packed"`` if the model
    gives the padded layout's logits with packed queries, else ``"padded"``. With a prefix computed
    in the same call (``fresh_prefix=True``: a training step, :func:`run_prefixed`): ``"onepass"``
    where the model passes its self-check and :data:`ONEPASS_PAYS` says it pays on the model's
    device type, else the former.

    The checks run once per model object: its attention implementation (one that reads an arbitrary
    4-D mask: sdpa, eager), then three short random queries after a short random prefix, each layout
    against the padded one. The choices and their reasons are logged (:func:`layout_report`).
    """
    model = _unwrapped(model)
    if model not in _layouts:
        _layouts[model] = _check_layouts(model)
        logger.info("queries for %s: %s", type(model).__name__, layout_report(model))
    checked = _layouts[model]
    if fresh_prefix and checked["onepass"][0] and _onepass_pays(model):
        return "onepass"
    return "packed" if checked["packed"][0] else "padded"


def _require(model, layout: str) -> None:
    """Refuse a layout the caller asked for that fails its self-check on this model (it would be wrong)."""
    if layout == "padded":
        return
    layout_for(model)  # runs the checks once
    ok, reason = _layouts[_unwrapped(model)][layout]
    if not ok:
        raise ValueError(f"layout={layout!r} does not fit this model ({reason}); use 'auto' or 'padded'")


def compiled(module):
    """``torch.compile(module, dynamic=True)``: for a forward run many times (a training step, a scorer).

    Shapes are dynamic because the query lengths and the batch change from call to call: a
    static-shape graph would be compiled again for every new length. The result (torch's
    ``OptimizedModule``) passes attribute access on to ``module``, so it can stand wherever
    ``module`` does; the layout checks still run on ``module`` itself, uncompiled (:func:`layout_for`).
    Compiling costs time at the first calls of each new kind of shape and pays only where a step is
    bound by kernel launches and Python overhead (docs/scaling.md, "Compiling").
    """
    return torch.compile(module, dynamic=True)


def _unwrapped(model):
    """The module a :func:`compiled` one wraps (``OptimizedModule._orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def _onepass_pays(model) -> bool:
    return ONEPASS_PAYS.get(model.get_input_embeddings().weight.device.type, False)


def layout_report(model) -> str:
    """The layouts :func:`layout_for` chooses for ``model`` and why, e.g. for a benchmark's report.

    For example ``"packed (sdpa attention takes the packed mask; self-check within 3e-05); training:
    packed (onepass passes its self-check within 2e-05 but is not measured to pay on cpu)"``.
    """
    after_cache, training = layout_for(model), layout_for(model, fresh_prefix=True)
    checked = _layouts[_unwrapped(model)]
    head = f"{after_cache} ({checked['packed'][1]})"
    onepass_ok, onepass_reason = checked["onepass"]
    device = model.get_input_embeddings().weight.device.type
    if training == "onepass":
        why = f"{onepass_reason}; measured to pay on {device}"
    elif onepass_ok:
        why = f"onepass {onepass_reason} but is not measured to pay on {device}"
    else:
        why = f"onepass refused: {onepass_reason}"
    return f"{head}; training: {training} ({why})"


@torch.no_grad()
def _check_layouts(model) -> dict[str, tuple[bool, str]]:
    """``{"packed": (ok, reason), "onepass": (ok, reason)}``: each layout's logits against the padded ones."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in PACKED_ATTENTION:
        reason = f"attention implementation {implementation!r} takes no custom mask"
        return {"packed": (False, reason), "onepass": (False, reason)}
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (20,), generator=gen).to(device)
    queries = [ids[6:10], ids[10:13], ids[13:20]]
    keep = [torch.arange(len(q)) for q in queries]
    prefix_keep = torch.arange(6, device=device)
    dtype = model.get_input_embeddings().weight.dtype
    was_training = model.training
    model.eval()
    checked = {}
    try:
        prefix = encode_prefix(model, model.get_input_embeddings()(ids[None, :6]), keep=prefix_keep)
        padded = torch.cat([prefix.logits, _run_padded(model, prefix, queries, keep)]).float()
        runs = {"packed": lambda: torch.cat([prefix.logits, _run_packed(model, prefix, queries, keep)]),
                "onepass": lambda: torch.cat(_run_onepass(model, prefix.embeds, prefix_keep, queries, keep))}
        for layout, run in runs.items():
            checked[layout] = _compare(run, padded, dtype, implementation, layout)
    finally:
        model.train(was_training)
    return checked


def _compare(run, padded: torch.Tensor, dtype, implementation: str, layout: str) -> tuple[bool, str]:
    try:
        logits = run().float()
    except Exception as err:  # noqa: BLE001 - any failure means: not this layout
        return False, f"{layout} queries failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    tolerance = _SELF_CHECK_RTOL.get(dtype, 3e-2) * float(padded.abs().max().clamp(min=1.0))
    error = float((logits - padded).abs().max())
    if not error <= tolerance:
        return False, f"{layout} logits differ from padded ones by {error:.2g} > {tolerance:.2g}"
    if layout == "packed":
        return True, f"{implementation} attention takes the packed mask; self-check within {error:.1g}"
    return True, f"passes its self-check within {error:.1g}"


def max_positions(model_config) -> int | None:
    """The longest sequence the model's position scheme supports, if it states one."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
