"""Pure functions for CPT's norm-bounded corrections: per-token radii, the L2-ball projection, and the
epsilon that makes a radius relative to the model's embedding scale."""

from __future__ import annotations

import math

import torch

from cptune.cpt.roles import TokenRole

RADIUS_REFERENCE_DIM = 2048
"""Hidden size at which a radius equals its epsilon; radii scale with ``sqrt(d / 2048)`` (CPT paper)."""

ABSOLUTE = "absolute"
RELATIVE = "relative"
RADIUS_MODES = (ABSOLUTE, RELATIVE)
"""How a recipe's epsilons become radii: ``absolute`` as PEFT does, ``relative`` scaled by
:func:`relative_epsilon`."""

REFERENCE_EMBEDDING_SCALE = 3.1538710594177246
"""The embedding scale (:func:`embedding_scale`) of SmolLM2-135M, cptune's embedded default, in float32:
the median L2 norm of its 49,152 input-embedding rows. A relative radius equals the absolute one on a
model of this scale, so on SmolLM2-135M both modes give the same radii. Measured with
``python benchmarks/embedding_scale.py`` (2-core CPU)."""


def embedding_scale(row_norms: torch.Tensor) -> float:
    """The scale of a model's input embeddings: ``s = median_j ||E_j||_2`` over its vocabulary rows.

    The median (``torch.median``: the lower middle value, an actual row's norm) rather than the mean,
    so that a few rows of untrained or special tokens do not move it.

    Args:
        row_norms: ``(V,)`` L2 norms of the embedding rows as the embedding module outputs them (for
            Gemma, after its ``sqrt(d)`` multiplier).

    Returns:
        ``s`` as a Python float.

    Raises:
        ValueError: no rows, or a norm that is not finite.
    """
    if row_norms.numel() == 0:
        raise ValueError("embedding_scale needs at least one embedding row")
    if not bool(torch.isfinite(row_norms).all()):
        raise ValueError("the embedding rows hold a norm that is not finite (inf or NaN)")
    return float(row_norms.detach().float().median())


def relative_epsilon(eps: float, scale: float, reference: float = REFERENCE_EMBEDDING_SCALE) -> float:
    """The epsilon that gives a radius relative to the model's embedding scale, in PEFT's formula.

    A relative radius is ``r_i = eps * (s / s_ref) * sqrt(d / 2048)``: the absolute radius of
    :func:`token_radii` times the model's embedding scale ``s`` (:func:`embedding_scale`) over
    ``s_ref`` (:data:`REFERENCE_EMBEDDING_SCALE`, SmolLM2-135M's), so a model whose embeddings are
    nine times larger gets radii nine times larger. It returns ``eps' = eps * s / s_ref``: written
    into ``opt_projection_epsilon`` (and ``opt_projection_format_epsilon``), PEFT's own
    ``eps' * sqrt(d / 2048)`` is that radius, so the adapter loads in PEFT unchanged.

    Args:
        eps: the recipe's epsilon (>= 0).
        scale: the model's embedding scale ``s`` (> 0).
        reference: ``s_ref`` (> 0).

    Raises:
        ValueError: a scale or reference that is not a finite number > 0.
    """
    for name, value in (("scale", scale), ("reference", reference)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"embedding {name}={value!r} must be a finite number > 0")
    return eps * (scale / reference)


def token_radii(roles: torch.Tensor, eps_input: float, eps_format: float, hidden_size: int) -> torch.Tensor:
    """L2 radius of each token's embedding correction.

    ``r_i = eps * sqrt(d / 2048)`` with ``eps = eps_format`` for template tokens, ``eps_input`` for
    input text, and ``r_i = 0`` for labels and separators (their correction is frozen at zero).

    Args:
        roles: ``(N,)`` int tensor of :class:`~cptune.cpt.roles.TokenRole`.
        eps_input: epsilon of input-text tokens.
        eps_format: epsilon of template tokens.
        hidden_size: embedding dimension ``d``.

    Returns:
        ``(N,)`` float32 radii.
    """
    scale = math.sqrt(hidden_size / RADIUS_REFERENCE_DIM)
    radii = torch.zeros(roles.shape, dtype=torch.float32, device=roles.device)
    radii[roles == TokenRole.INPUT_TEXT] = eps_input * scale
    radii[(roles == TokenRole.INPUT_TEMPLATE) | (roles == TokenRole.OUTPUT_TEMPLATE)] = eps_format * scale
    return radii


def project_l2_ball(delta: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Project each row of ``delta`` onto the L2 ball of its radius.

    ``delta_i <- delta_i * r_i / max(||delta_i||_2, r_i)``: rows inside their ball are returned
    unchanged (bit for bit), rows outside land on the sphere, rows with radius 0 become zero.

    In floating point the scaled row's norm can round to a few ulps above ``r_i``; such a row's
    scale is lowered until its computed norm is at most ``r_i``. The result is therefore inside
    every ball as :func:`torch.linalg.vector_norm` measures it, and projecting it again returns it
    bit for bit (the projection is idempotent, not only up to rounding).

    Args:
        delta: ``(N, d)`` corrections.
        radii: ``(N,)`` non-negative radii.

    Returns:
        ``(N, d)`` projected corrections (a new tensor).
    """
    norms = torch.linalg.vector_norm(delta, ord=2, dim=-1)  # (N,)
    radii = radii.to(delta.dtype)
    outside = norms > radii
    ones = torch.ones_like(norms)
    scale = torch.where(outside, radii / torch.where(outside, norms, ones), ones)  # (N,)
    projected = delta * scale.unsqueeze(-1)  # (N, d)
    while True:
        out_norms = torch.linalg.vector_norm(projected, ord=2, dim=-1)  # (N,)
        over = outside & (out_norms > radii)
        if not bool(over.any()):
            return projected
        # Shrink by the overshoot, then one more ulp: the scale strictly decreases, so this ends.
        shrunk = torch.nextafter(scale * (radii / torch.where(over, out_norms, ones)), torch.zeros_like(scale))
        scale = torch.where(over, shrunk, scale)
        projected = delta * scale.unsqueeze(-1)
