"""CPTConfig: PEFT's CPT configuration (same field names, defaults and JSON form), validated.

A config written by ``peft.CPTConfig.save_pretrained`` loads here and the reverse, so adapters
move between the two libraries in both directions.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from cptune.cpt.roles import TokenRole, from_peft_codes

PEFT_FORMAT_VERSION = "0.21.2"
"""The PEFT release whose adapter format cptune reads and writes (recorded as ``peft_version``)."""

LOSS_TYPES = ("none", "decay")


@dataclass
class CPTConfig:
    """Configuration of a CPT adapter, field-for-field compatible with ``peft.CPTConfig``.

    Args:
        cpt_token_ids: Token ids of the context (demonstrations). ``None`` gives PEFT's ``[0]``.
        cpt_mask: Attention mask of the context; PEFT only checks its length. ``None`` gives ones.
        cpt_tokens_type_mask: PEFT's packed type code per context token (see :mod:`cptune.cpt.roles`).
            ``None`` gives ones.
        opt_weighted_loss_type: ``"none"`` (every label token weight 1) or ``"decay"``.
        opt_loss_decay_factor: gamma of the decay weighting, in (0, 1].
        opt_projection_epsilon: L2 radius (before scaling by ``sqrt(d / 2048)``) of input-text tokens.
        opt_projection_format_epsilon: the same for template tokens.
        tokenizer_name_or_path: Tokenizer the context was built with (informational).

    The remaining fields are PEFT's common prompt-learning fields, kept so configs round-trip;
    ``num_virtual_tokens`` always equals ``len(cpt_token_ids)``.

    Raises:
        ValueError: naming the field, for any value PEFT's method cannot use correctly.
    """

    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str = "none"
    opt_loss_decay_factor: float = 1.0
    opt_projection_epsilon: float = 0.1
    opt_projection_format_epsilon: float = 0.1
    tokenizer_name_or_path: str | None = None
    # PEFT's common fields.
    task_type: str = "CAUSAL_LM"
    peft_type: str = "CPT"
    auto_mapping: dict | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    peft_version: str = field(default=PEFT_FORMAT_VERSION)

    def __post_init__(self) -> None:
        self.task_type = _enum_value(self.task_type)
        self.peft_type = _enum_value(self.peft_type)
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"task_type={self.task_type!r} is not supported; CPT needs 'CAUSAL_LM'")
        if self.peft_type != "CPT":
            raise ValueError(f"peft_type={self.peft_type!r}; a CPTConfig has peft_type 'CPT'")
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.cpt_token_ids = _int_list("cpt_token_ids", self.cpt_token_ids, minimum=0)
        n = len(self.cpt_token_ids)
        if n == 0:
            raise ValueError("cpt_token_ids is empty; a CPT context needs at least one token")
        if self.cpt_mask is None:
            self.cpt_mask = [1] * n
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * n
        self.cpt_mask = _int_list("cpt_mask", self.cpt_mask, minimum=0)
        self.cpt_tokens_type_mask = _int_list("cpt_tokens_type_mask", self.cpt_tokens_type_mask, minimum=0)
        if not len(self.cpt_mask) == len(self.cpt_tokens_type_mask) == n:
            raise ValueError(
                "cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length; got "
                f"{n}, {len(self.cpt_mask)} and {len(self.cpt_tokens_type_mask)}"
            )
        if any(v not in (0, 1) for v in self.cpt_mask):
            raise ValueError(f"cpt_mask must hold only 0 and 1; got {sorted(set(self.cpt_mask))}")
        check_whole_demonstrations(self.cpt_tokens_type_mask)
        self.num_virtual_tokens = n
        if self.opt_weighted_loss_type not in LOSS_TYPES:
            raise ValueError(
                f"opt_weighted_loss_type={self.opt_weighted_loss_type!r}; accepted: {', '.join(LOSS_TYPES)}"
            )
        self.opt_loss_decay_factor = _finite("opt_loss_decay_factor", self.opt_loss_decay_factor)
        if not 0.0 < self.opt_loss_decay_factor <= 1.0:
            raise ValueError(f"opt_loss_decay_factor={self.opt_loss_decay_factor} must be in (0, 1]")
        for name in ("opt_projection_epsilon", "opt_projection_format_epsilon"):
            value = _finite(name, getattr(self, name))
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
            setattr(self, name, value)

    # -- views -----------------------------------------------------------------------------

    @property
    def roles(self) -> torch.Tensor:
        """``(N,)`` int64 :class:`TokenRole` of each context token."""
        return from_peft_codes(torch.tensor(self.cpt_tokens_type_mask))[0]

    @property
    def example_index(self) -> torch.Tensor:
        """``(N,)`` int64 demonstration index of each context token (``-1`` for separators)."""
        return from_peft_codes(torch.tensor(self.cpt_tokens_type_mask))[1]

    @property
    def num_examples(self) -> int:
        """Number of demonstrations in the context."""
        return int(self.example_index.max().item()) + 1

    # -- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it (plain JSON types)."""
        return asdict(self)

    def to_json_string(self) -> str:
        """JSON as in PEFT's ``adapter_config.json`` (sorted keys, indent 2)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CPTConfig:
        """Build from a PEFT or cptune config dict; unknown keys are ignored with a warning."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"ignoring config keys cptune does not know: {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


def check_whole_demonstrations(codes: list[int]) -> None:
    """Check that PEFT type codes describe demonstrations 0, 1, ..., K-1 in order, each labelled.

    Separators (code 0) may stand anywhere. PEFT's one-token placeholder context (all codes 1, the
    default when no context is given) is accepted so that default configs round-trip.

    Raises:
        ValueError: naming ``cpt_tokens_type_mask`` and the first offending position.
    """
    roles, example = from_peft_codes(torch.tensor(codes, dtype=torch.long))
    member = roles != TokenRole.SEPARATOR
    if not bool(member.any()):
        return
    ex = example[member]
    positions = member.nonzero().flatten()
    steps = ex[1:] - ex[:-1]
    bad = ((steps < 0) | (steps > 1)).nonzero()
    if int(ex[0]) != 0:
        raise ValueError(
            f"cpt_tokens_type_mask: the first demonstration has index {int(ex[0])} "
            f"(code {codes[int(positions[0])]}); demonstrations must be numbered from 0"
        )
    if len(bad):
        pos = int(positions[int(bad[0]) + 1])
        raise ValueError(
            f"cpt_tokens_type_mask[{pos}]={codes[pos]} breaks the order of demonstrations; codes must "
            "go 4k+1..4k+4 for k = 0, 1, 2, ... without gaps or returns"
        )
    if all(c == 1 for c in codes):
        return  # PEFT's placeholder context
    labelled = set(example[roles == TokenRole.LABEL].tolist())
    missing = [k for k in range(int(ex[-1]) + 1) if k not in labelled]
    if missing:
        raise ValueError(
            f"cpt_tokens_type_mask: demonstration {missing[0]} has no label token (code {4 * missing[0] + 4}); "
            "every demonstration needs its label"
        )


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _int_list(name: str, values: Any, minimum: int) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        out = list(values)
    except TypeError:
        raise ValueError(f"{name} must be a list of integers; got {type(values).__name__}") from None
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}[{i}]={v!r} is not an integer")
        if v < minimum:
            raise ValueError(f"{name}[{i}]={v} must be >= {minimum}")
    return out


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    return float(value)
