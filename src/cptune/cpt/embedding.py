"""CPTEmbedding: frozen context embeddings E0 plus a trainable, norm-bounded correction delta."""

from __future__ import annotations

import torch
from torch import nn

from cptune.cpt.config import CPTConfig
from cptune.cpt.loss import cpt_loss_from_logits, label_group_rank
from cptune.cpt.projection import project_l2_ball, token_radii
from cptune.cpt.roles import is_trainable

FEASIBLE_RTOL = 1e-6
"""Relative slack under which a row counts as inside its ball. :func:`project_l2_ball` already lands
every row at or inside its radius as ``vector_norm`` measures it; the slack keeps a delta loaded
from elsewhere (e.g. computed in another precision) from being re-projected by an ulp, which would
break bit-exact resume."""


ROW_NORM_CHUNK = 16384
"""Vocabulary rows embedded at a time by :func:`embedding_row_norms` (Gemma's 262,144 x 640 table in 16
pieces of 42 MB in float32, not one of 671 MB)."""


@torch.no_grad()
def embedding_row_norms(word_embeddings: nn.Module) -> torch.Tensor:
    """``(V,)`` float32 L2 norm of every vocabulary row as ``word_embeddings`` outputs it (so a model that
    scales its embeddings inside the module, as Gemma does by ``sqrt(d)``, is measured after the scaling,
    the same rows CPT's ``E0`` is read from); the input of :func:`cptune.cpt.projection.embedding_scale`."""
    weight = word_embeddings.weight
    norms = []
    for start in range(0, weight.shape[0], ROW_NORM_CHUNK):
        ids = torch.arange(start, min(start + ROW_NORM_CHUNK, weight.shape[0]), device=weight.device)
        rows = word_embeddings(ids).float()  # (chunk, d)
        norms.append(torch.linalg.vector_norm(rows, dim=-1).cpu())
    return torch.cat(norms)


class CPTEmbedding(nn.Module):
    """The context of a CPT adapter: ``E0 + delta`` for each of its N tokens.

    ``E0`` (the base model's embeddings of the context tokens) is a frozen float32 buffer. ``delta``
    is a float32 parameter initialised to zero; rows of label and separator tokens get no gradient
    (they are multiplied by a constant 0/1 mask in :meth:`forward`, so they stay exactly zero).
    :meth:`project_` projects every row onto its L2 ball; call it after each optimizer step.

    Args:
        config: the adapter's config (token ids, type codes, epsilons).
        word_embeddings: the base model's input embedding module; read once to build ``E0``.
        base_embeddings: optional ``(N, d)`` tensor to use as ``E0`` instead (PEFT-saved adapters
            store ``E0 + delta`` and no separate base).
    """

    def __init__(
        self,
        config: CPTConfig,
        word_embeddings: nn.Module,
        base_embeddings: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        weight = word_embeddings.weight
        ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=weight.device)
        if int(ids.max()) >= weight.shape[0]:
            raise ValueError(
                f"cpt_token_ids holds id {int(ids.max())}, outside the model's vocabulary of {weight.shape[0]}"
            )
        if base_embeddings is None:
            with torch.no_grad():
                base_embeddings = word_embeddings(ids).detach()
        base = base_embeddings.to(device=weight.device, dtype=torch.float32).clone()  # (N, d)
        roles = config.roles.to(weight.device)
        self.register_buffer("base", base)
        self.register_buffer("roles", roles)
        self.register_buffer("example_index", config.example_index.to(weight.device))
        self.register_buffer("trainable_mask", is_trainable(roles).to(torch.float32).unsqueeze(-1))  # (N, 1)
        self.register_buffer(
            "radii",
            token_radii(roles, config.opt_projection_epsilon, config.opt_projection_format_epsilon, base.shape[-1]),
        )
        self.delta = nn.Parameter(torch.zeros_like(base))  # (N, d) float32

    @property
    def num_tokens(self) -> int:
        """Number of context tokens N."""
        return self.base.shape[0]

    @torch.no_grad()
    def project_(self) -> None:
        """Project ``delta`` in place onto its balls (``delta_i * r_i / max(||delta_i||, r_i)``)."""
        self.delta.copy_(project_l2_ball(self.delta, self.radii))

    def is_feasible(self, rtol: float = FEASIBLE_RTOL) -> bool:
        """Whether every delta row lies within its radius, up to a relative ``rtol`` (rounding)."""
        norms = torch.linalg.vector_norm(self.delta.detach(), dim=-1)
        return bool((norms <= self.radii * (1 + rtol)).all())

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Context embeddings ``E0 + mask * delta``.

        In training mode with gradients enabled, a stored ``delta`` outside its balls is first
        projected (:meth:`project_`), as PEFT does at every forward. This makes scripts that never
        call ``project_()`` (PEFT-style loops, ``transformers.Trainer``) train the same feasible
        corrections PEFT trains; after a ``project_()`` it changes nothing, not even rounding.

        Args:
            indices: optional ``(..., n)`` positions into the context (PEFT passes
                ``arange(N)``); ``None`` returns all N rows.

        Returns:
            ``(N, d)`` or ``(..., n, d)`` float32 embeddings.
        """
        if self.training and torch.is_grad_enabled() and not self.is_feasible():
            self.project_()
        embeddings = self.base + self.delta * self.trainable_mask  # (N, d)
        if indices is None:
            return embeddings
        return embeddings[indices.to(embeddings.device)]

    @staticmethod
    def calculate_loss(base_model_output, labels: torch.Tensor, cpt_type_mask: torch.Tensor, config: CPTConfig):
        """Set ``base_model_output.loss`` to the CPT loss, as PEFT's documented method does.

        Args:
            base_model_output: a model output with ``logits`` of shape ``(B, L, V)``.
            labels: ``(B, L)`` targets, ``-100`` where not scored.
            cpt_type_mask: ``(B, L)`` PEFT type codes (context then shifted query codes).
            config: supplies ``opt_weighted_loss_type`` and ``opt_loss_decay_factor``.

        Returns:
            ``base_model_output`` with its ``loss`` set.
        """
        base_model_output.loss = cpt_loss_from_logits(
            base_model_output.logits,
            labels,
            label_group_rank(cpt_type_mask),  # PEFT's packed codes end here
            config.opt_weighted_loss_type,
            config.opt_loss_decay_factor,
        )
        return base_model_output
