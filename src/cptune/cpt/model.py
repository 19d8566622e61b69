"""CPTModel: wraps any Hugging Face causal LM with a CPT context; PEFT's CPT forward contract."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from cptune.cpt.config import CPTConfig
from cptune.cpt.embedding import CPTEmbedding
from cptune.cpt.engine import (
    CACHE_NAMES,
    LAYOUTS,
    TRANSFORMERS_CACHE_NAME,
    Prefix,
    cache_name,
    compiled,
    encode_prefix,
    layout_for,
    layout_report,
    max_positions,
    run_prefixed,
    run_rows,
)
from cptune.cpt.files import check_frozen_rows, read_adapter, save_adapter
from cptune.cpt.hub import CARD_NAME, adapter_card, push_folder, resolve_folder
from cptune.cpt.loss import IGNORE_INDEX, cpt_loss, cpt_loss_from_logits
from cptune.cpt.roles import ROLES_PER_EXAMPLE, TokenRole

PREFIX_SHARING_MODES = ("auto", "always", "never")


@dataclass
class CPTOutput(CausalLMOutputWithPast):
    """A causal-LM output plus the number of label tokens the loss averages over.

    ``loss * num_label_tokens`` is the summed loss, which data-parallel training adds across processes.
    """

    num_label_tokens: int | None = None

# Forward keywords under which the shared-prefix path cannot reproduce the plain one's output.
_PLAIN_ONLY_KWARGS = ("output_attentions", "output_hidden_states", "position_ids", *CACHE_NAMES)


class CPTModel(nn.Module):
    """A frozen causal LM plus a trainable CPT context, used like PEFT's ``PeftModelForCausalLM``.

    Args:
        base_model: any Hugging Face causal LM; its parameters are frozen (``requires_grad=False``).
        config: the CPT config; ``token_dim``, ``num_layers``, ``num_attention_heads`` and
            ``base_model_name_or_path`` are filled in from the model.
        adapter_name: any name; kept for PEFT-style code and written nowhere else.
        prefix_sharing: ``"auto"`` (encode the context once per batch when a loss is asked for and
            the batch has more than one row), ``"always"`` or ``"never"`` (PEFT's plain layout).
        query_layout: how the queries run after a shared context (:mod:`cptune.cpt.engine`):
            ``"auto"`` (the engine's measured choice among the layouts the model passes a
            self-check for), ``"packed"``, ``"padded"`` or ``"onepass"`` (context and queries in
            one forward).
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: CPTConfig,
        adapter_name: str = "default",
        prefix_sharing: str = "auto",
        base_embeddings: torch.Tensor | None = None,
        query_layout: str = "auto",
    ) -> None:
        super().__init__()
        if prefix_sharing not in PREFIX_SHARING_MODES:
            raise ValueError(f"prefix_sharing={prefix_sharing!r}; accepted: {', '.join(PREFIX_SHARING_MODES)}")
        if query_layout not in LAYOUTS:
            raise ValueError(f"query_layout={query_layout!r}; accepted: {', '.join(LAYOUTS)}")
        self.base_model = base_model
        self.base_model.requires_grad_(False)
        # What runs the base model's forwards: itself, or its compiled form (compile_()). In a dict,
        # so nn.Module does not register the compiled wrapper as a second copy of the submodule.
        self._runners = {"active": base_model, "compiled": None}
        self.adapter_name = adapter_name
        self.prefix_sharing = prefix_sharing
        self.query_layout = query_layout
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
        # What the loss needs of the context, computed once: the target id of each label token
        # (-100 elsewhere) and its label group rank, counted back from the query (rank 0): the
        # demonstration k of K has rank K - k.
        enc = self.prompt_encoder
        ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=enc.roles.device)
        is_label = enc.roles == TokenRole.LABEL
        self.register_buffer("context_targets", torch.where(is_label, ids, IGNORE_INDEX), persistent=False)  # (N,)
        ranks = torch.where(is_label, config.num_examples - enc.example_index.long(), 0)
        self.register_buffer("context_ranks", ranks, persistent=False)  # (N,)

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

    def compile_(self, enabled: bool = True) -> None:
        """From now on run the base model's forwards under ``torch.compile`` (``enabled=False``: eagerly again).

        The compiled form (:func:`cptune.cpt.engine.compiled`) is made once and kept; the first
        forwards of each new kind of shape pay for compiling. Results are those of the eager model up
        to float rounding. :func:`cptune.train` does this for ``compile=True``.
        """
        if enabled and self._runners["compiled"] is None:
            self._runners["compiled"] = compiled(self.base_model)
        self._runners["active"] = self._runners["compiled"] if enabled else self.base_model

    @property
    def compiled(self) -> bool:
        """Whether the base model's forwards run compiled (:meth:`compile_`)."""
        return self._runners["active"] is not self.base_model

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
        out = self._runners["active"](inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        if labels is None:
            return out
        device = out.logits.device
        query_targets = self._query_targets(labels, codes).to(device)  # (B, T)
        full_labels = torch.cat([self.context_targets.to(device).expand(batch_size, -1), query_targets], dim=1)
        full_ranks = torch.cat([self.context_ranks.to(device).expand(batch_size, -1), torch.zeros_like(query_targets)],
                               dim=1)  # (B, N+T): the query's label is the newest group
        cfg = self.config
        loss = cpt_loss_from_logits(out.logits, full_labels, full_ranks, cfg.opt_weighted_loss_type,
                                    cfg.opt_loss_decay_factor)
        cache = {TRANSFORMERS_CACHE_NAME: out.get(cache_name(self.base_model))}  # own-code models may differ
        return CPTOutput(loss=loss, logits=out.logits, **cache,
                         hidden_states=out.get("hidden_states"), attentions=out.get("attentions"),
                         num_label_tokens=int((full_labels[:, 1:] != IGNORE_INDEX).sum()))

    def _shared_prefix_forward(self, context, inputs_embeds, attention_mask, labels, codes, return_logits):
        """Encode the context once and run the queries after it (:mod:`cptune.cpt.engine`); same loss
        and gradient as the plain path, which copies the context into every row."""
        batch_size, query_len = inputs_embeds.shape[:2]
        n = self.num_context_tokens
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, query_len, dtype=torch.long, device=device)
        targets = self._query_targets(labels, codes).to(device)  # (B, T)
        predicts = targets[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts the label token t + 1
        ctx_targets = self.context_targets.to(device)
        ctx_scored = (ctx_targets[1:] != IGNORE_INDEX).nonzero().flatten()  # (Mc,) positions p - 1 of labels p
        # The context's last position predicts each query's first token (a label only for label-only queries).
        ctx_keep = torch.cat([ctx_scored, torch.tensor([n - 1], device=device)])  # (Mc + 1,)
        if return_logits:  # every position of every row, padding included, as PEFT's layout returns them
            prefix = encode_prefix(self._runners["active"], context, keep=torch.arange(n, device=device))
            ctx_logits = prefix.logits[ctx_keep]  # (Mc + 1, V)
            query_logits = run_rows(self._runners["active"], prefix, inputs_embeds, attention_mask)  # (B, T, V)
            scored_logits = query_logits[:, :-1][predicts]  # (Mq, V) row-major
        else:
            lengths = attention_mask.sum(dim=1).tolist()
            ctx_logits, scored_logits = run_prefixed(
                self._runners["active"], context, ctx_keep, [inputs_embeds[b, : lengths[b]] for b in range(batch_size)],
                [predicts[b, : lengths[b] - 1].nonzero().flatten() for b in range(batch_size)], self.query_layout,
            )  # (Mc + 1, V); (Mq, V) in query order, the row-major order of `predicts`
        first = targets[:, 0] != IGNORE_INDEX  # (B,)
        first_logits = ctx_logits[-1:].expand(int(first.sum()), -1)
        logits = torch.cat([ctx_logits[:-1], first_logits, scored_logits.to(ctx_logits.device)])  # (M, V)
        device = logits.device
        num_ctx = ctx_scored.numel()
        query_label_targets = torch.cat([targets[first, 0], targets[:, 1:][predicts]]).to(device)
        cfg = self.config
        # A context label's logits are the same in every row: it stands for B rows of PEFT's layout.
        loss = cpt_loss(
            logits,
            torch.cat([ctx_targets[ctx_scored + 1].to(device), query_label_targets]),
            torch.cat([self.context_ranks[ctx_scored + 1].to(device), torch.zeros_like(query_label_targets)]),
            cfg.opt_weighted_loss_type,
            cfg.opt_loss_decay_factor,
            copies=torch.cat([torch.full((num_ctx,), batch_size, device=device),
                              torch.ones(query_label_targets.numel(), dtype=torch.long, device=device)]),
        )
        count = batch_size * num_ctx + query_label_targets.numel()
        full_logits = None
        if return_logits:
            full_logits = torch.cat([prefix.logits.expand(batch_size, -1, -1).to(device), query_logits.to(device)],
                                    dim=1)  # (B, N+T, V)
        return CPTOutput(loss=loss, logits=full_logits, num_label_tokens=count)

    def query_layout_report(self) -> str:
        """How queries run after a shared context on this model, and why (e.g. for a progress line)."""
        if self.query_layout != "auto":
            return f"{self.query_layout} (chosen by the caller)"
        return f"{layout_for(self.base_model, fresh_prefix=True)}: {layout_report(self.base_model)}"

    # -- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_context(self) -> Prefix:
        """Encode the learned context once (no gradients) for any number of query batches.

        Pass the result to :func:`cptune.cpt.engine.run_queries`; it is never modified by them.
        """
        return encode_prefix(self.base_model, self.context_embeddings())

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
    def from_pretrained(
        cls,
        base_model: nn.Module,
        model_id: str | os.PathLike,
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        **kwargs,
    ) -> CPTModel:
        """Load a CPT adapter written by PEFT or cptune onto ``base_model``, from a folder or the hub.

        Args:
            base_model: the causal LM the adapter was trained on.
            model_id: a local adapter folder, or a hub repo id ``owner/name`` (downloaded into the
                Hugging Face cache; offline, read from it: :mod:`cptune.cpt.hub`). An existing folder wins.
            is_trainable: keep the corrections trainable (to resume training).
            revision: the hub repo's branch, tag or commit (default ``main``).
            token: a hub token for a private repo (default: the stored login).
            cache_dir: the hub cache (default: ``HF_HUB_CACHE`` and friends, read now).
            **kwargs: ``adapter_name``, ``prefix_sharing`` (see :func:`load_adapter`).

        Raises:
            FileNotFoundError: no such folder; a repo or revision not on the hub, or not cached while offline.
            cptune.cpt.saving.IncompleteSaveError: the files do not match the folder's manifest.
            ValueError: unreadable files, or an adapter that does not fit ``base_model``.
        """
        folder = resolve_folder(model_id, revision, token=token, cache_dir=cache_dir)
        return load_adapter(base_model, folder, is_trainable=is_trainable, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        metrics: dict[str, Any] | None = None,
    ):
        """Upload the adapter, as :meth:`save_pretrained` writes it, plus a model card ``README.md``.

        The save goes into a temporary folder (so the manifest and PEFT's files are exactly a local
        save's), the card is added beside it, and the folder is uploaded in one commit
        (:func:`cptune.cpt.hub.push_folder`). It loads back with :meth:`from_pretrained` and with
        PEFT's ``PeftModel.from_pretrained``.

        Args:
            repo_id: ``owner/name`` (created if needed).
            private: whether a new repo is private (``None``: the hub's default).
            commit_message: the commit's message.
            revision: the branch to commit to (default ``main``).
            token: a hub token (default: the stored login).
            metrics: evaluation figures ``{name: value}`` for the card.

        Returns:
            huggingface_hub's ``CommitInfo``.
        """
        with tempfile.TemporaryDirectory(prefix="cptune-push-") as tmp:
            self.save_pretrained(tmp)
            files = sorted([*(p.name for p in Path(tmp).iterdir()), CARD_NAME])
            (Path(tmp) / CARD_NAME).write_text(adapter_card(self.config, repo_id, files, metrics), encoding="utf-8")
            return push_folder(tmp, repo_id, private=private, commit_message=commit_message, revision=revision,
                               token=token)


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
