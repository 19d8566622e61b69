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
