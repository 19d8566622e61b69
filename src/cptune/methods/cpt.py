"""The ``cpt`` method: Context-aware Prompt Tuning on the ICL context (:mod:`cptune.cpt`, :func:`cptune.train`)."""

from __future__ import annotations

import torch

from cptune.cpt.model import get_cpt_model
from cptune.methods.icl import ICL
from cptune.training import TrainSettings, train


class CPT(ICL):
    """Context-aware Prompt Tuning: the ICL context with trained, norm-bounded embedding corrections.

    Trained with :func:`cptune.training.train` (decay-weighted loss on every label in context and
    query; projection after every step). After :meth:`prepare` alone, delta is zero and the scores
    equal ``icl``'s exactly.
    """

    name = "cpt"

    def _prepare(self, shots: list) -> None:
        super()._prepare(shots)
        s = self.settings
        config = self.context.to_config(
            opt_weighted_loss_type="decay", opt_loss_decay_factor=s.decay,
            opt_projection_epsilon=s.eps_input, opt_projection_format_epsilon=s.eps_format,
        )
        self.model = get_cpt_model(self.base_model, config)
        self.model.eval()

    def _train(self) -> list[float]:
        s = self.settings
        result = train(self.model, self._queries, TrainSettings(steps=s.steps, batch_size=s.batch_size,
                                                                lr=s.cpt_lr, seed=s.seed), progress=False)
        return result.losses

    def trainable_parameters(self) -> int:
        """Trainable context rows times the hidden size."""
        enc = self.model.prompt_encoder
        return int(enc.trainable_mask.sum()) * enc.base.shape[-1]

    def context_embeddings(self) -> torch.Tensor:
        """``(1, N, d)`` learned context ``E0 + delta``."""
        with torch.no_grad():
            return self.model.context_embeddings()
