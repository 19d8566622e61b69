"""CPTModel: wraps any Hugging Face causal LM with a CPT context; PEFT's CPT forward contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from cptune.cpt.config import CPTConfig
from cptune.cpt.embedding import CPTEmbedding
from cptune.cpt.engine import expand_cache, length_buckets, max_positions
from cptune.cpt.files import check_frozen_rows, read_adapter, save_adapter
from cptune.cpt.loss import IGNORE_INDEX, decay_weights, loss_dtype, weighted_token_loss_sum
from cptune.cpt.roles import ROLES_PER_EXAMPLE, TokenRole

PREFIX_SHARING_MODES = ("auto", "always", "never")


@dataclass
class CPTOutput(CausalLMOutputWithPast):
    """A causal-LM output plus the number of label tokens the loss averages over.

    ``loss * num_label_tokens`` is the summed loss, which data-parallel training adds across processes.
    """

    num_label_tokens: int | None = None

# Forward keywords under which the shared-prefix path cannot reproduce the plain one's output.
_PLAIN_ONLY_KWARGS = ("output_attentions", "output_hidden_states", "past_key_values", "position_ids")


class CPTModel(nn.Module):
    """A frozen causal LM plus a trainable CPT context, used like PEFT's ``PeftModelForCausalLM``.

    Args:
        base_model: any Hugging Face causal LM; its parameters are frozen (``requires_grad=False``).
        config: the CPT config; ``token_dim``, ``num_layers``, ``num_attention_heads`` and
            ``base_model_name_or_path`` are filled in from the model.
        adapter_name: any name; kept for PEFT-style code and written nowhere else.
        prefix_sharing: ``"auto"`` (encode the context once per batch when a loss is asked for and
            the batch has more than one row), ``"always"`` or ``"never"`` (PEFT's plain layout).
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: CPTConfig,
        adapter_name: str = "default",
        prefix_sharing: str = "auto",
        base_embeddings: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if prefix_sharing not in PREFIX_SHARING_MODES:
            raise ValueError(f"prefix_sharing={prefix_sharing!r}; accepted: {', '.join(PREFIX_SHARING_MODES)}")
        self.base_model = base_model
        self.base_model.requires_grad_(False)
        self.adapter_name = adapter_name
        self.prefix_sharing = prefix_sharing
        model_config = base_model.config.get_text_config()
        config.token_dim = base_model.get_input_embeddings().weight.shape[-1]
        config.num_layers = getattr(model_config, "num_hidden_layers", None)
        config.num_attention_heads = getattr(model_config, "num_attention_heads", None)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model, "name_or_path", None) or None
        self.max_positions = max_positions(model_config)
        if self.max_positions is not None and config.num_virtual_tokens >= self.max_positions:
            raise ValueError(
                f"the context has {config.num_virtual_tokens} tokens but the model takes at most {self.max_positions} "
                "positions (context plus query); use fewer or shorter demonstrations (Template max_text_tokens)"
            )
        self.prompt_encoder = CPTEmbedding(config, base_model.get_input_embeddings(), base_embeddings)

    # -- accessors -----------------------------------------------------------------------------

    @property
    def config(self) -> CPTConfig:
        """The adapter's :class:`CPTConfig` (``peft_config[adapter_name]`` in PEFT)."""
        return self.prompt_encoder.config

    @property
    def peft_config(self) -> dict[str, CPTConfig]:
        """PEFT-style mapping from adapter name to config."""
        return {self.adapter_name: self.config}

    @property
    def word_embeddings(self) -> nn.Module:
        """The base model's input embedding module."""
        return self.base_model.get_input_embeddings()

    @property
    def num_context_tokens(self) -> int:
        """N, the number of context tokens prepended to every query."""
        return self.prompt_encoder.num_tokens

    def project_(self) -> None:
        """Project the context corrections onto their L2 balls; call after every optimizer step."""
        self.prompt_encoder.project_()

    def context_embeddings(self) -> torch.Tensor:
        """``(1, N, d)`` context embeddings ``E0 + delta`` in the model's dtype."""
        embeddings = self.prompt_encoder()  # (N, d) float32
        return embeddings.to(self.word_embeddings.weight.dtype).unsqueeze(0)

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, as PEFT does."""
        trainable = int(self.prompt_encoder.trainable_mask.sum().item()) * self.prompt_encoder.base.shape[-1]
        total = sum(p.numel() for p in self.base_model.parameters()) + trainable
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        input_type_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_logits: bool = True,
        context_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CPTOutput:
        """PEFT's CPT forward: the context is prepended to every row of the batch.

        Args:
            input_ids: ``(B, T)`` query token ids (right-padded), or give ``inputs_embeds``.
            attention_mask: ``(B, T)`` query mask; ones for the context are prepended.
            labels: ``(B, T)`` query targets; only positions whose ``input_type_mask`` is 4 (label)
                are scored, the rest count as ``-100``.
            input_type_mask: ``(B, T)`` query type codes 0..4 (0 separator/padding, 1 input
                template, 2 input text, 3 output template, 4 label). Required with ``labels``.
            inputs_embeds: ``(B, T, d)`` query embeddings instead of ``input_ids``.
            return_logits: ``False`` computes logits only where the loss needs them and returns
                ``logits=None`` (what :func:`cptune.train` uses).
            context_embeds: ``(1, N, d)`` context embeddings to use instead of computing them from
                the adapter (data-parallel training differentiates with respect to them).
            **kwargs: passed to the base model.

        Returns:
            :class:`CPTOutput` with ``loss`` (when ``labels`` are given), ``logits`` of shape
            ``(B, N + T, V)`` over context and query, and ``num_label_tokens``. Without labels, the
            base model's own output.

        The caller's tensors are never modified.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, T, d)
        batch_size, query_len = inputs_embeds.shape[:2]
        if self.max_positions is not None and self.num_context_tokens + query_len > self.max_positions:
            raise ValueError(
                f"context ({self.num_context_tokens} tokens) plus query ({query_len} tokens) exceeds the model's "
                f"{self.max_positions} positions; shorten the queries or the context"
            )
        if labels is not None:
            input_type_mask = self._checked_query_codes(input_type_mask, labels)
        if context_embeds is None:
            context_embeds = self.context_embeddings()
        context_embeds = context_embeds.to(inputs_embeds.device)
        if labels is not None and self._use_shared_prefix(batch_size, attention_mask, kwargs):
            return self._shared_prefix_forward(
                context_embeds, inputs_embeds, attention_mask, labels, input_type_mask, return_logits
            )
        return self._plain_forward(context_embeds, inputs_embeds, attention_mask, labels, input_type_mask, kwargs)

    def _use_shared_prefix(self, batch_size: int, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
        if self.prefix_sharing == "never" or any(kwargs.get(k) for k in _PLAIN_ONLY_KWARGS):
            return False
        if attention_mask is not None and not _is_right_padded(attention_mask):
            return False  # cached positions would be wrong for left padding; PEFT's layout handles any
        if self.base_model.training and any(getattr(m, "gradient_checkpointing", False)
                                            for m in self.base_model.modules()):
            return False  # checkpointed layers drop past_key_values: the queries would not see the context
        return self.prefix_sharing == "always" or batch_size > 1

    def _checked_query_codes(self, input_type_mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        if input_type_mask is None:
            raise ValueError(
                "labels were given without input_type_mask; pass the query's type codes (0..4, label tokens 4) "
                "so only label tokens are scored (see cptune.render_queries)"
            )
        if input_type_mask.shape != labels.shape:
            raise ValueError(
                f"input_type_mask has shape {tuple(input_type_mask.shape)} but labels {tuple(labels.shape)}"
            )
        codes = input_type_mask.long()
        if bool(((codes < 0) | (codes > ROLES_PER_EXAMPLE)).any()):
            raise ValueError(
                f"input_type_mask holds {sorted(set(codes.flatten().tolist()) - set(range(5)))}; "
                "query codes are 0..4 (one query example per row)"
            )
        return codes

    def _query_targets(self, labels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` query targets: the caller's labels at label tokens, -100 elsewhere (a new tensor)."""
        return torch.where(codes == TokenRole.LABEL, labels.long(), torch.full_like(labels.long(), IGNORE_INDEX))

    def _plain_forward(self, context, inputs_embeds, attention_mask, labels, codes, kwargs) -> CPTOutput:
        batch_size = inputs_embeds.shape[0]
        n = self.num_context_tokens
        embeds = torch.cat([context.expand(batch_size, -1, -1), inputs_embeds], dim=1)  # (B, N+T, d)
        if attention_mask is not None:
            ones = torch.ones(batch_size, n, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, N+T)
        kwargs.setdefault("use_cache", False)
        out = self.base_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        if labels is None:
            return out
        device = out.logits.device
        full_labels = torch.cat(
            [self._context_targets().to(device).expand(batch_size, -1), self._query_targets(labels, codes).to(device)],
            dim=1,
        )  # (B, N+T)
        full_codes = torch.cat(
            [self._context_codes().to(device).expand(batch_size, -1), self._shift_query_codes(codes).to(device)],
            dim=1,
        )
        out = CPTEmbedding.calculate_loss(out, full_labels, full_codes, self.config)
        return CPTOutput(loss=out.loss, logits=out.logits, past_key_values=out.get("past_key_values"),
                         hidden_states=out.get("hidden_states"), attentions=out.get("attentions"),
                         num_label_tokens=int((full_labels[:, 1:] != IGNORE_INDEX).sum()))

    def _context_codes(self) -> torch.Tensor:
        return torch.tensor(self.config.cpt_tokens_type_mask, dtype=torch.long).unsqueeze(0)  # (1, N)

    def _context_targets(self) -> torch.Tensor:
        """``(1, N)`` context token ids at label tokens, -100 elsewhere."""
        ids = torch.tensor(self.config.cpt_token_ids, dtype=torch.long)
        roles = self.prompt_encoder.roles.cpu()
        return torch.where(roles == TokenRole.LABEL, ids, torch.full_like(ids, IGNORE_INDEX)).unsqueeze(0)

    def _shift_query_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Give the query the example index after the context's last one (PEFT shifts by the max code,
        which is only right when that max is a multiple of 4)."""
        shift = ROLES_PER_EXAMPLE * self.config.num_examples
        return torch.where(codes > 0, codes + shift, codes)

    def _shared_prefix_forward(self, context, inputs_embeds, attention_mask, labels, codes, return_logits):
        """Encode the context once, attend every query row to its cache; same loss as the plain path."""
        batch_size, query_len = inputs_embeds.shape[:2]
        n = self.num_context_tokens
        enc = self.prompt_encoder
        num_examples = self.config.num_examples
        # Context label at position p is predicted at p - 1; the last position predicts the query's first token.
        ctx_targets = self._context_targets()[0].to(enc.base.device)  # (N,)
        ctx_label_pos = (ctx_targets[1:] != IGNORE_INDEX).nonzero().flatten()  # positions p - 1
        ctx_keep = torch.cat([ctx_label_pos, torch.tensor([n - 1], device=ctx_label_pos.device)])  # (Mc + 1,)
        context_out = self.base_model(
            inputs_embeds=context,
            use_cache=True,
            logits_to_keep=0 if return_logits else ctx_keep,
        )
        ctx_logits_all = context_out.logits  # (1, N or Mc+1, V)
        ctx_logits = ctx_logits_all[0, ctx_keep] if return_logits else ctx_logits_all[0]  # (Mc + 1, V)

        if attention_mask is None:
            attention_mask = torch.ones(batch_size, query_len, dtype=torch.long, device=inputs_embeds.device)
        query_targets = self._query_targets(labels, codes).to(inputs_embeds.device)  # (B, T)
        predicts_label = query_targets[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts t + 1
        keep_mask = torch.cat([predicts_label, torch.zeros_like(predicts_label[:, :1])], dim=1)  # (B, T)
        lengths = attention_mask.sum(dim=1).tolist()
        # Full logits need one (B, N+T, V) tensor; a loss alone lets rows of similar length run together.
        buckets = [list(range(batch_size))] if return_logits else length_buckets(lengths)
        q_logits_parts, row_order = [], []
        for rows in buckets:
            width = max(int(lengths[r]) for r in rows) if not return_logits else query_len
            idx = torch.tensor(rows, device=inputs_embeds.device)
            mask = attention_mask[idx, :width]
            ones = torch.ones(len(rows), n, dtype=mask.dtype, device=mask.device)
            query_out = self.base_model(
                inputs_embeds=inputs_embeds[idx, :width],
                attention_mask=torch.cat([ones, mask], dim=1),  # (b, N+w)
                past_key_values=expand_cache(context_out.past_key_values, len(rows)),
                use_cache=True,
                logits_to_keep=0 if return_logits else keep_mask[idx, :width],
            )
            part = query_out.logits[keep_mask[idx, :width]] if return_logits else query_out.logits  # (m, V)
            q_logits_parts.append(part)
            row_order.extend(rows)
        q_logits = torch.cat(q_logits_parts, dim=0)  # (Mq, V) rows in bucket order
        order = torch.tensor(row_order, device=query_targets.device)
        query_targets = query_targets[order]
        predicts_label = predicts_label[order]
        device = q_logits.device
        dtype = loss_dtype(q_logits.dtype)
        ctx_logits = ctx_logits.to(device)
        cfg = self.config

        # Context labels: same logits in every row, so their summed loss counts B times.
        ctx_rank = num_examples - enc.example_index[ctx_label_pos + 1].to(device)  # (Mc,)
        ctx_sum = weighted_token_loss_sum(
            ctx_logits[:-1],
            ctx_targets[ctx_label_pos + 1].to(device),
            decay_weights(ctx_rank, cfg.opt_weighted_loss_type, cfg.opt_loss_decay_factor, dtype),
        )
        # Query labels: rank 0. A label at query position 0 is predicted by the context's last position.
        first_is_label = query_targets[:, 0] != IGNORE_INDEX  # (B,)
        q_logits = torch.cat([ctx_logits[-1:].expand(int(first_is_label.sum()), -1), q_logits], dim=0)
        q_targets = torch.cat([query_targets[first_is_label, 0], query_targets[:, 1:][predicts_label]])
        q_sum = weighted_token_loss_sum(
            q_logits,
            q_targets,
            decay_weights(torch.zeros_like(q_targets), cfg.opt_weighted_loss_type, cfg.opt_loss_decay_factor, dtype),
        )
        count = batch_size * ctx_label_pos.numel() + q_targets.numel()
        loss = (batch_size * ctx_sum + q_sum) / max(count, 1)

        logits = None
        if return_logits:
            logits = torch.cat([ctx_logits_all.expand(batch_size, -1, -1).to(device), query_out.logits], dim=1)
        return CPTOutput(loss=loss, logits=logits, num_label_tokens=count)

    # -- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def context_cache(self):
        """Encode the context once (no gradients) and return its batch-1 key/value cache.

        Reuse it for any number of query batches through :func:`cptune.cpt.engine.expand_cache`.
        """
        out = self.base_model(inputs_embeds=self.context_embeddings(), use_cache=True, logits_to_keep=1)
        return out.past_key_values

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate after the learned context, as PEFT's prompt-learning ``generate`` does.

        The context embeddings are prepended to the embedded ``input_ids``; the returned ids are
        ``input_ids`` followed by the generated tokens (the context is not part of them).
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        batch_size = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            context = self.context_embeddings().expand(batch_size, -1, -1)
            embeds = torch.cat([context, self.word_embeddings(input_ids)], dim=1)  # (B, N+T, d)
        ones = torch.ones(batch_size, self.num_context_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        new_tokens = self.base_model.generate(
            inputs_embeds=embeds, attention_mask=torch.cat([ones, attention_mask], dim=1), **kwargs
        )
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)

    # -- files ---------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write PEFT's adapter folder plus cptune's resume state (see :mod:`cptune.cpt.files`)."""
        save_adapter(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, model_id, is_trainable: bool = False, **kwargs) -> CPTModel:
        """Load a CPT adapter folder written by PEFT or cptune onto ``base_model``."""
        return load_adapter(base_model, model_id, is_trainable=is_trainable, **kwargs)


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row's ones come first (then only zeros)."""
    lengths = attention_mask.sum(dim=1, keepdim=True)  # (B, 1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    return bool(torch.equal(attention_mask.bool(), positions < lengths))


def get_cpt_model(base_model: nn.Module, config: CPTConfig, adapter_name: str = "default", **kwargs) -> CPTModel:
    """Wrap ``base_model`` with a fresh CPT context described by ``config`` (PEFT's ``get_peft_model``)."""
    if not isinstance(config, CPTConfig):
        raise ValueError(f"config must be a cptune.CPTConfig; got {type(config).__name__}")
    return CPTModel(base_model, config, adapter_name=adapter_name, **kwargs)


def load_adapter(
    base_model: nn.Module,
    directory,
    is_trainable: bool = False,
    adapter_name: str = "default",
    prefix_sharing: str = "auto",
) -> CPTModel:
    """Load a CPT adapter written by PEFT or cptune onto ``base_model``.

    PEFT folders hold only ``E0 + delta``: that becomes the frozen base with a zero correction (as
    in PEFT). cptune folders also restore E0 and delta separately, so training resumes exactly.

    Raises:
        FileNotFoundError: a missing folder or file.
        cptune.cpt.saving.IncompleteSaveError: the files do not match the folder's manifest.
        ValueError: unreadable files, or an adapter that does not fit ``base_model``.
    """
    config, prompt, state = read_adapter(base_model, directory)
    base = state["base"] if state is not None else prompt
    config.inference_mode = not is_trainable
    model = CPTModel(base_model, config, adapter_name=adapter_name, prefix_sharing=prefix_sharing, base_embeddings=base)
    check_frozen_rows(model, prompt)
    if state is not None:
        with torch.no_grad():
            model.prompt_encoder.delta.copy_(state["delta"].to(model.prompt_encoder.delta.device))
    model.prompt_encoder.delta.requires_grad_(is_trainable)
    if not is_trainable:
        model.eval()
    return model
