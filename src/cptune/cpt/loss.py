"""Pure, vectorised CPT loss: label-token cross-entropy with optional exponential decay.

Every label token is a target: the labels of the K context demonstrations and the query's label.
Label groups are ranked from the query backwards (query 0, last demonstration 1, ..., first K) and
weighted ``gamma ** rank`` under ``"decay"``, or 1 under ``"none"``. As in PEFT, the weighted sum
is divided by the number of label tokens in the batch (not by the sum of weights)::

    L = sum_j c_j * w_j * CE(logits_j, target_j) / sum_j c_j

where ``c_j`` is how many rows of the batch hold target j: 1 for a query's label, B for a context
label when the context is encoded once for B rows (:func:`cpt_loss`), so every layout gives PEFT's
value. Ranks come from the demonstration index of each label token (:func:`label_ranks`); PEFT's
packed type codes are unpacked only in :func:`label_group_rank`, at the boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cptune.cpt.roles import TokenRole, from_peft_codes

IGNORE_INDEX = -100
"""Target value of positions that are not scored (the Hugging Face convention)."""


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Cross-entropy runs in float32 for half precisions and in the model dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def label_ranks(example_index: torch.Tensor, is_label: torch.Tensor) -> torch.Tensor:
    """Rank of each label token's demonstration, counted from the newest one in its row.

    Args:
        example_index: ``(B, L)`` demonstration index of each token (the query is the newest).
        is_label: ``(B, L)`` bool, which tokens are label tokens.

    Returns:
        ``(B, L)`` int64: for a label token, the number of distinct demonstrations with label
        tokens in the same row whose index is larger; 0 elsewhere.
    """
    index = torch.where(is_label, example_index.long(), torch.zeros_like(example_index, dtype=torch.long))
    size = int(index.max().item()) + 1 if index.numel() else 1
    present = torch.zeros(index.shape[0], size + 1, dtype=torch.long, device=index.device)  # (B, K+1)
    present.scatter_(1, torch.where(is_label, index, torch.full_like(index, size)), 1)
    present[:, size] = 0  # the overflow column collected the tokens that are not labels
    newer = present.flip(-1).cumsum(-1).flip(-1) - present  # newer[b, k]: label groups after k in row b
    return torch.where(is_label, newer.gather(1, index), torch.zeros_like(index))


def label_group_rank(type_codes: torch.Tensor) -> torch.Tensor:
    """:func:`label_ranks` of tokens given as PEFT type codes ``(B, L)`` (label codes: ``4k + 4``)."""
    roles, example_index = from_peft_codes(type_codes)
    return label_ranks(example_index, roles == TokenRole.LABEL)


def decay_weights(rank: torch.Tensor, loss_type: str, gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """Per-token weights ``gamma ** rank`` (``"decay"``) or ones (``"none"``)."""
    if loss_type == "none":
        return torch.ones(rank.shape, dtype=dtype, device=rank.device)
    # Powers in float64, then cast: the same values PEFT gets from repeated Python multiplication.
    base = torch.tensor(gamma, dtype=torch.float64, device=rank.device)
    return torch.pow(base, rank.to(torch.float64)).to(dtype)


def cpt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ranks: torch.Tensor,
    loss_type: str,
    gamma: float,
    copies: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CPT loss of M scored positions: ``sum c * w * CE / sum c`` (the module's formula).

    Args:
        logits: ``(M, V)`` next-token logits at positions that predict a label token.
        targets: ``(M,)`` the label token ids.
        ranks: ``(M,)`` the label group rank of each target (0: the query).
        loss_type: ``"none"`` or ``"decay"``.
        gamma: decay factor.
        copies: ``(M,)`` how many batch rows each target stands for (default: 1 each).

    Returns:
        Scalar loss; 0 (still connected to ``logits``) when nothing is scored.
    """
    dtype = loss_dtype(logits.dtype)
    ce = F.cross_entropy(logits.to(dtype), targets.to(logits.device), reduction="none")  # (M,)
    weights = decay_weights(ranks.to(logits.device), loss_type, gamma, dtype)
    if copies is None:
        return (ce * weights).sum() / max(targets.numel(), 1)
    copies = copies.to(device=logits.device, dtype=dtype)
    return (ce * weights * copies).sum() / copies.sum().clamp(min=1)


def cpt_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ranks: torch.Tensor,
    loss_type: str,
    gamma: float,
) -> torch.Tensor:
    """:func:`cpt_loss` on full sequences (PEFT's layout: context and query in every row).

    Args:
        logits: ``(B, L, V)`` next-token logits.
        labels: ``(B, L)`` target ids, ``-100`` where not scored.
        ranks: ``(B, L)`` label group rank of each position (see :func:`label_ranks`).
        loss_type: ``"none"`` or ``"decay"``.
        gamma: decay factor.
    """
    shift_labels = labels[:, 1:].to(logits.device)  # position t predicts token t + 1
    scored = shift_labels != IGNORE_INDEX  # (B, L-1)
    return cpt_loss(logits[:, :-1][scored], shift_labels[scored], ranks[:, 1:].to(logits.device)[scored],
                    loss_type, gamma)
