"""The ``cpt`` method: Context-aware Prompt Tuning on the ICL context (:mod:`cptune.cpt`, :func:`cptune.train`)."""

from __future__ import annotations

import torch

from cptune.methods.icl import ICL
from cptune.recipe import cpt_model_for
from cptune.training import train


class CPT(ICL):
    """Context-aware Prompt Tuning: the ICL context with trained, norm-bounded embedding corrections.

    Built and trained by the same recipe as :class:`cptune.CPTClassifier` (:mod:`cptune.recipe`,
    from :meth:`MethodSettings.cpt_recipe`): decay-weighted loss on every label in context and
    query, projection after every step. After :meth:`prepare` alone, delta is zero and the scores
    equal ``icl``'s exactly.
    """

    name = "cpt"
    settings_read = (*ICL.settings_read, "steps", "batch_size", "cpt_lr", "eps_input", "eps_format", "decay",
                                        "radius")

    def _prepare(self, shots: list) -> None:
        super()._prepare(shots)
        self.model = cpt_model_for(self.base_model, self.context, self.settings.cpt_recipe())
        self.model.eval()

    def _train(self) -> list[float]:
        return train(self.model, self._queries, self.settings.cpt_recipe().train, progress=False).losses

    def trainable_parameters(self) -> int:
        """Trainable context rows times the hidden size."""
        enc = self.model.prompt_encoder
        return int(enc.trainable_mask.sum()) * enc.base.shape[-1]

    def context_embeddings(self) -> torch.Tensor:
        """``(1, N, d)`` learned context ``E0 + delta``."""
        with torch.no_grad():
            return self.model.context_embeddings()
