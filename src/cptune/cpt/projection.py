"""Pure functions for CPT's norm-bounded corrections: per-token radii and the L2-ball projection."""

from __future__ import annotations

import math

import torch

from cptune.cpt.roles import TokenRole

RADIUS_REFERENCE_DIM = 2048
"""Hidden size at which a radius equals its epsilon; radii scale with ``sqrt(d / 2048)`` (CPT paper)."""


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
