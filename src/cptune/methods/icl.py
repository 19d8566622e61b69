"""The methods without training: ``zero-shot`` (the query alone) and ``icl`` (the shots before every query)."""

from __future__ import annotations

import torch

from cptune.methods.base import BaseMethod
from cptune.text.context import build_context


class ZeroShot(BaseMethod):
    """The query alone, no context, no training; scores without :meth:`fit`."""

    name = "zero-shot"
    needs_fit = False


class ICL(BaseMethod):
    """In-context learning: the shots, rendered as in CPT's context, before every query; no training."""

    name = "icl"

    def _prepare(self, shots: list) -> None:
        self.context = build_context(shots, self.template, self.tokenizer, self.label_words)

    def context_embeddings(self) -> torch.Tensor:
        """``(1, N, d)`` plain token embeddings of the demonstrations."""
        embed = self.base_model.get_input_embeddings()
        with torch.no_grad():
            return embed(self.context.token_ids.to(embed.weight.device)[None])
