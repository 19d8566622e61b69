"""One context, many queries: encode a prefix once, then run a batch of queries after it.

A causal LM's states for a prefix (a CPT context, a soft prompt, ICL demonstrations) do not depend
on what follows, so the prefix is encoded once (batch 1) and every query attends to its cached keys
and values. With gradients enabled the cache keeps its autograd graph, so the loss of every query
flows back into the one prefix encoding: the gradient of copying the prefix into every row, at a
fraction of the work.

Two layouts run the queries:

- ``packed``: the batch's queries sit one after another in a single sequence after the prefix.
  Each query token has the position it would have right after the prefix (``P + t``) and a mask
  that lets it see the prefix and its own earlier tokens only. Nothing is padded and the prefix's
  keys and values are never copied per query: memory grows with the prefix and the total query
  tokens, not with batch x prefix.
- ``padded``: the queries are right-padded rows (bucketed by length), each attending to the
  prefix cache expanded to the batch (a view, no copy; transformers concatenates it per row).

``auto`` picks ``packed`` when the model takes a custom 4-D mask and explicit position ids and
gives the padded layout's logits with them; that is checked once per model on a few random tokens
(:func:`layout_for`), and the choice and its reason are logged.
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

LAYOUTS = ("auto", "packed", "padded")
PACKED_ATTENTION = ("sdpa", "eager")  # implementations that read an arbitrary 4-D additive mask
_SELF_CHECK_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}  # of the largest logit; else 3e-2

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
    """

    cache: Cache
    length: int
    logits: torch.Tensor | None = None


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
    return Prefix(getattr(out, cache_name(model)), embeds.shape[1], out.logits[0] if keep is not None else None)


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
        layout: ``"auto"``, ``"packed"`` or ``"padded"`` (see the module docstring).

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
    run = _run_packed if layout == "packed" else _run_padded
    return run(model, prefix, list(queries), list(keep))


def _embed(model, queries: list[torch.Tensor]) -> list[torch.Tensor]:
    if queries[0].ndim == 2:
        return queries
    table = model.get_input_embeddings()
    lengths = [len(q) for q in queries]
    flat = table(torch.cat(queries).to(table.weight.device))  # (S, d)
    return list(flat.split(lengths))


def _run_packed(model, prefix, queries, keep) -> torch.Tensor:
    embeds = _embed(model, queries)
    device, dtype = embeds[0].device, embeds[0].dtype
    p = prefix.length if prefix is not None else 0
    lengths = torch.tensor([len(e) for e in embeds], device=device)
    starts = torch.cumsum(lengths, 0) - lengths  # (Q,) offset of each query in the packed row
    segment = torch.repeat_interleave(torch.arange(len(embeds), device=device), lengths)  # (S,)
    local = torch.arange(int(lengths.sum()), device=device) - starts[segment]  # (S,) position in its query
    position = p + local  # (S,) where the token would sit right after the prefix
    # (S, P + S): the prefix, then the packed tokens of the same query up to this one.
    own = (segment[:, None] == segment[None, :]) & (local[None, :] <= local[:, None])  # (S, S)
    index = torch.cat([starts[i] + k.to(device) for i, k in enumerate(keep)])  # (M,)
    kwargs = {}
    if prefix is not None:
        kwargs[cache_name(model)] = fresh_cache(prefix.cache)
    out = model(
        inputs_embeds=torch.cat(embeds)[None],  # (1, S, d)
        attention_mask=_masks(model, prefix, own, position, dtype),
        position_ids=position[None],  # (1, S)
        use_cache=prefix is not None,
        logits_to_keep=index,
        **kwargs,
    )
    return out.logits[0]  # (M, V)


def _masks(model, prefix, own, position, dtype):
    """The additive ``(1, 1, S, C + S)`` mask (C cached prefix keys), or one per layer type.

    Every query token sees all cached prefix keys and the tokens of its own query up to itself;
    in a sliding-window layer only keys less than the window behind it (by position, as
    transformers' sliding mask has it), and the cache of such a layer may hold only the prefix's
    last keys.
    """
    device = own.device
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)

    def additive(kind: str) -> torch.Tensor:
        cached = 0
        if prefix is not None:
            layer = layer_types.index(kind) if layer_types else 0
            cached = prefix.cache.layers[layer].keys.shape[-2]  # a sliding layer keeps only the last keys
        key_position = torch.cat([torch.arange(prefix.length - cached, prefix.length, device=device)
                                  if prefix is not None else position[:0], position])  # (C + S,)
        ok = torch.cat([torch.ones(len(position), cached, dtype=torch.bool, device=device), own], dim=1)
        if kind == "sliding_attention":
            ok &= position[:, None] - key_position[None, :] < window  # transformers' sliding_window_overlay
        elif kind != "full_attention":
            raise NotImplementedError(f"layer type {kind!r} has no packed mask")
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(ok, zero, torch.finfo(dtype).min)[None, None]  # (1, 1, S, C + S)

    if not layer_types:
        return additive("full_attention")
    return {kind: additive(kind) for kind in set(layer_types)}


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
    batch = embeds.shape[0]
    kwargs = {}
    if prefix is not None:
        ones = torch.ones(batch, prefix.length, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, P + T): with a cache, past + current
        kwargs[cache_name(model)] = fresh_cache(prefix.cache, batch)
    return model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=prefix is not None,
                 logits_to_keep=keep, **kwargs).logits


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


def layout_for(model) -> str:
    """``"packed"`` if this model gives the padded layout's logits with packed queries, else ``"padded"``.

    Decided once per model object: by its attention implementation (one that reads an arbitrary
    4-D mask: sdpa, eager), then by running three short random queries after a short random prefix
    both ways. The choice and its reason are logged (:func:`layout_report` returns them).
    """
    if model not in _layouts:
        layout, reason = _layouts[model] = _check_packed(model)
        logger.info("%s queries for %s (%s)", layout, type(model).__name__, reason)
    return _layouts[model][0]


def layout_report(model) -> str:
    """The layout :func:`layout_for` chooses for ``model`` and why, e.g. for a benchmark's report."""
    layout = layout_for(model)
    return f"{layout} ({_layouts[model][1]})"


@torch.no_grad()
def _check_packed(model) -> tuple[str, str]:
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in PACKED_ATTENTION:
        return "padded", f"attention implementation {implementation!r} takes no custom mask"
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (20,), generator=gen).to(device)
    queries = [ids[6:10], ids[10:13], ids[13:20]]
    keep = [torch.arange(len(q)) for q in queries]
    was_training = model.training
    model.eval()
    try:
        prefix = encode_prefix(model, model.get_input_embeddings()(ids[None, :6]))
        packed = _run_packed(model, prefix, queries, keep).float()
        padded = _run_padded(model, prefix, queries, keep).float()
    except Exception as err:  # noqa: BLE001 - any failure means: not this layout
        return "padded", f"packed queries failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    finally:
        model.train(was_training)
    dtype = model.get_input_embeddings().weight.dtype
    tolerance = _SELF_CHECK_RTOL.get(dtype, 3e-2) * float(padded.abs().max().clamp(min=1.0))
    error = float((packed - padded).abs().max())
    if not error <= tolerance:
        return "padded", f"packed logits differ from padded ones by {error:.2g} > {tolerance:.2g}"
    return "packed", f"{implementation} attention takes the packed mask; self-check within {error:.1g}"


def max_positions(model_config) -> int | None:
    """The longest sequence the model's position scheme supports, if it states one."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
