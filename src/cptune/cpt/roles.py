"""Token roles in a CPT context and the conversion to/from PEFT's packed type codes.

In memory, cptune keeps a token's *role* and the index of the demonstration it belongs to as two
separate integer tensors. PEFT packs both into one code per token:

    code = 0                       for separators, EOS, padding (no demonstration)
    code = 4 * k + role            for role in {1, 2, 3, 4} of demonstration k (0-based)

so ``role = code mod 4`` (with 0 meaning "label" when ``code > 0``) and ``k = (code - 1) div 4``.
That packing is only used at the PEFT boundary (configs and the forward contract).
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads when a tensor is converted: TokenRole alone (a template's check) needs none
    import torch

ROLES_PER_EXAMPLE = 4
"""Number of distinct non-separator roles; PEFT's code stride between demonstrations."""

NO_EXAMPLE = -1
"""Example index stored for tokens that belong to no demonstration (separators, EOS, padding)."""


class TokenRole(IntEnum):
    """What a context or query token is. Values equal PEFT's role part of the type code."""

    SEPARATOR = 0
    """Separators, BOS/EOS, padding: frozen, never a loss target."""
    INPUT_TEMPLATE = 1
    """Template text around the input (e.g. ``"input:"``): trainable, radius ``eps_format``."""
    INPUT_TEXT = 2
    """The example's input text: trainable, radius ``eps_input``."""
    OUTPUT_TEMPLATE = 3
    """Template text before the label (e.g. ``"output:"``): trainable, radius ``eps_format``."""
    LABEL = 4
    """Label (verbalizer) tokens: frozen, the loss targets."""


TRAINABLE_ROLES = (TokenRole.INPUT_TEMPLATE, TokenRole.INPUT_TEXT, TokenRole.OUTPUT_TEMPLATE)
FORMAT_ROLES = (TokenRole.INPUT_TEMPLATE, TokenRole.OUTPUT_TEMPLATE)


def is_trainable(roles: torch.Tensor) -> torch.Tensor:
    """Bool mask of tokens whose embedding correction is trained (template and input roles)."""
    return (roles == TokenRole.INPUT_TEMPLATE) | (roles == TokenRole.INPUT_TEXT) | (
        roles == TokenRole.OUTPUT_TEMPLATE
    )


def to_peft_codes(roles: torch.Tensor, example_index: torch.Tensor) -> torch.Tensor:
    """Pack roles and example indices into PEFT's type codes.

    Args:
        roles: ``(..., N)`` int tensor of :class:`TokenRole` values.
        example_index: ``(..., N)`` int tensor, the demonstration of each token
            (``NO_EXAMPLE`` for separators).

    Returns:
        ``(..., N)`` int64 tensor: 0 for separators, ``4 * k + role`` otherwise.

    Raises:
        ValueError: if a non-separator token has a negative example index.
    """
    import torch

    roles = roles.long()
    example_index = example_index.long()
    member = roles != TokenRole.SEPARATOR
    if bool((example_index[member] < 0).any()):
        raise ValueError("every non-separator token needs an example index >= 0")
    return torch.where(member, ROLES_PER_EXAMPLE * example_index + roles, torch.zeros_like(roles))


def from_peft_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack PEFT's type codes into ``(roles, example_index)``; the inverse of :func:`to_peft_codes`.

    Raises:
        ValueError: if a code is negative.
    """
    import torch

    codes = torch.as_tensor(codes).long()
    if bool((codes < 0).any()):
        bad = int(codes[codes < 0][0])
        raise ValueError(f"type code {bad} is negative; codes are 0 (separator) or 4*k+role with role 1..4")
    member = codes > 0
    example_index = torch.where(member, (codes - 1) // ROLES_PER_EXAMPLE, torch.full_like(codes, NO_EXAMPLE))
    roles = torch.where(member, (codes - 1) % ROLES_PER_EXAMPLE + 1, torch.zeros_like(codes))
    return roles, example_index
