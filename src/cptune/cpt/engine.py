"""One context, many queries: share the context's key/value cache across a batch.

A causal LM's states for the context do not depend on what follows it, so the context is encoded
once (batch 1) and every query row attends to its cached keys and values. With gradients enabled
the cache keeps its autograd graph, so the loss of all rows flows back into the one context
encoding: the same gradient as copying the context into every row, at a fraction of the work.
"""

from __future__ import annotations

import copy

from transformers.cache_utils import Cache


def expand_cache(cache: Cache, batch_size: int) -> Cache:
    """A fresh cache whose layers view ``cache``'s batch-1 tensors expanded to ``batch_size`` rows.

    The expansion makes no copy (stride 0); the first forward that appends to the new cache
    concatenates, and ``cache`` itself is never modified, so it can be reused for every batch.

    Args:
        cache: a cache holding the context, batch size 1, e.g. ``(1, heads, N, head_dim)`` tensors.
        batch_size: rows of the batch that will attend to it.

    Returns:
        A new cache object of the same class.
    """
    fresh = copy.copy(cache)
    fresh.layers = []
    for layer in cache.layers:
        view = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() > 0:
            if keys.shape[0] != 1:
                raise ValueError(f"expand_cache needs a batch-1 cache; this one has {keys.shape[0]} rows")
            view.keys = keys.expand(batch_size, -1, -1, -1)  # (B, H, N, hd)
            view.values = layer.values.expand(batch_size, -1, -1, -1)
        fresh.layers.append(view)
    return fresh


def length_buckets(lengths: list[int], overhead_tokens: int = 32) -> list[list[int]]:
    """Group rows into buckets of similar length so little compute goes to padding.

    Sorts rows by length and splits the sorted order into contiguous runs minimising
    ``sum(len(run) * max_length(run)) + overhead_tokens * num_runs`` (dynamic programming,
    O(B^2)); ``overhead_tokens`` prices one extra forward call in padded-token units.

    Args:
        lengths: real (unpadded) length of each row.
        overhead_tokens: cost of an extra forward, in tokens.

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


def max_positions(model_config) -> int | None:
    """The longest sequence the model's position scheme supports, if it states one."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
