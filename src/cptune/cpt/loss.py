"""Pure, vectorised CPT loss: label-token cross-entropy with optional exponential decay.

Every label token is a target: the labels of the K context demonstrations and the query's label.
Label groups are ranked from the query backwards (query 0, last demonstration 1, ..., first K) and
weighted ``gamma ** rank`` under ``"decay"``, or 1 under ``"none"``. As in PEFT, the weighted sum
is divided by the number of label tokens (not by the sum of weights)::

    L = sum_j w_j * CE(logits_j, target_j) / #label_tokens
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cptune.cpt.roles import ROLES_PER_EXAMPLE

IGNORE_INDEX = -100
"""Target value of positions that are not scored (the Hugging Face convention)."""


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Cross-entropy runs in float32 for half precisions and in the model dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def decay_weights(group_rank: torch.Tensor, loss_type: str, gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """Per-token weights ``gamma ** rank`` (``"decay"``) or ones (``"none"``)."""
    if loss_type == "none":
        return torch.ones(group_rank.shape, dtype=dtype, device=group_rank.device)
    # Powers in float64, then cast: the same values PEFT gets from repeated Python multiplication.
    base = torch.tensor(gamma, dtype=torch.float64, device=group_rank.device)
    return torch.pow(base, group_rank.to(torch.float64)).to(dtype)


def weighted_token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j * CE(logits_j, targets_j)`` over ``(M, V)`` logits and ``(M,)`` targets and weights."""
    ce = F.cross_entropy(logits.to(loss_dtype(logits.dtype)), targets, reduction="none")  # (M,)
    return (ce * weights.to(ce.dtype)).sum()


def label_group_rank(type_codes: torch.Tensor) -> torch.Tensor:
    """Rank of each token's label group counted from the newest one, per row.

    Args:
        type_codes: ``(B, L)`` PEFT type codes.

    Returns:
        ``(B, L)`` int64: for label tokens (code > 0, code mod 4 == 0), the number of distinct label
        codes in the same row that are larger than this token's code; 0 elsewhere.
    """
    codes = type_codes.long()
    is_label = (codes > 0) & (codes % ROLES_PER_EXAMPLE == 0)
    num_codes = int(codes.max().item()) + 1 if codes.numel() else 1
    present = torch.zeros(codes.shape[0], num_codes + 1, dtype=torch.long, device=codes.device)
    present.scatter_(1, torch.where(is_label, codes, torch.full_like(codes, num_codes)), 1)
    present[:, num_codes] = 0  # the overflow column collected non-label tokens
    # newer[b, c] = number of label codes in row b strictly greater than c.   # (B, C+1)
    newer = present.flip(-1).cumsum(-1).flip(-1) - present
    return torch.where(is_label, newer.gather(1, codes), torch.zeros_like(codes))


def cpt_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    type_codes: torch.Tensor,
    loss_type: str,
    gamma: float,
) -> torch.Tensor:
    """CPT loss on full sequences in PEFT's layout (context and query in every row).

    Args:
        logits: ``(B, L, V)`` next-token logits.
        labels: ``(B, L)`` target ids, ``-100`` where not scored.
        type_codes: ``(B, L)`` PEFT type codes of the same positions.
        loss_type: ``"none"`` or ``"decay"``.
        gamma: decay factor.

    Returns:
        Scalar loss; NaN-free 0-count is reported as 0 with no gradient path broken.
    """
    shift_logits = logits[:, :-1, :]  # (B, L-1, V) position t predicts token t+1
    shift_labels = labels[:, 1:].to(logits.device)
    shift_codes = type_codes[:, 1:].to(logits.device)
    scored = shift_labels != IGNORE_INDEX  # (B, L-1)
    ranks = label_group_rank(shift_codes)[scored]  # (M,)
    weights = decay_weights(ranks, loss_type, gamma, loss_dtype(logits.dtype))
    total = weighted_token_loss_sum(shift_logits[scored], shift_labels[scored], weights)
    return total / scored.sum().clamp(min=1)
