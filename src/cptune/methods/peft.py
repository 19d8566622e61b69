"""The PEFT baselines of :mod:`cptune.methods`: prompt tuning, instruction prompt tuning and LoRA.

Each trains on a deep copy of the base model (made with PEFT's ``get_peft_model``), so the caller's
model is never touched, with the loss on the label tokens only: the mean cross-entropy over the
batch's label tokens, the value PEFT's own forward returns for labels that are -100 elsewhere (a test
checks the two agree). Two things make it cheaper than PEFT's forward: logits are computed only at
positions that predict a label token, and the prefix (soft prompt, and for ``ipt`` the
demonstrations) is encoded once per step and the batch's rows run after its key/value cache, with
gradients flowing through it (:mod:`cptune.cpt.engine`). Scoring goes through the same
:func:`cptune.scoring.score_texts` as every other method:

- ``pt``: the trained soft prompt ``(1, n, d)`` is the context of the original base model.
- ``ipt``: the soft prompt followed by the plain embeddings of the demonstrations is the context;
  training puts the demonstrations in every input between prompt and query, and scores only the
  query's label.
- ``lora``: the PEFT model (LoRA active, not merged) is scored with no context.

Requires ``peft`` (``pip install peft==0.21.2``).
"""

from __future__ import annotations

import copy

import torch

from cptune.cpt.engine import run_prefixed, run_queries
from cptune.methods.base import IGNORE_INDEX, BaseMethod, label_batch, model_device, optimize
from cptune.text.context import build_context


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the pt, ipt and lora methods need PEFT: pip install peft==0.21.2") from err
    return peft


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def label_token_loss(model, batch: dict[str, torch.Tensor], prefix_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens of ``batch``, after an optional shared prefix.

    The prefix is encoded once and the rows run after it (:mod:`cptune.cpt.engine`), with gradients
    through both; only positions that predict a label token produce logits.

    Args:
        model: a causal LM (with any LoRA layers active).
        batch: ``input_ids``, ``attention_mask`` (right-padded) and ``labels`` (-100 where not scored),
            each ``(B, T)``, from :func:`cptune.methods.base.label_batch`.
        prefix_embeds: ``(1, P, d)`` embeddings before every row (encoded once), or ``None``.

    Returns:
        The scalar loss, the same as the model's own loss on ``[prefix, row]`` with the prefix unscored.
    """
    labels = batch["labels"]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    predicts = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts the label token t + 1
    keep = [predicts[b, : lengths[b] - 1].nonzero().flatten() for b in range(len(lengths))]
    rows = [batch["input_ids"][b, : lengths[b]] for b in range(len(lengths))]
    targets = labels[:, 1:][predicts]
    if prefix_embeds is None:
        logits = run_queries(model, None, rows, keep)  # (M, V), row-major
        return torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device))
    p = prefix_embeds.shape[1]  # the prefix's last position predicts a row's first token
    last, logits = run_prefixed(model, prefix_embeds, torch.tensor([p - 1], device=prefix_embeds.device), rows, keep)
    first = labels[:, 0] != IGNORE_INDEX
    if bool(first.any()):
        logits = torch.cat([last.expand(int(first.sum()), -1), logits], dim=0)
        targets = torch.cat([labels[first, 0], targets])
    return torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device))


class PromptTuning(BaseMethod):
    """PEFT prompt tuning: ``pt_tokens`` trained virtual tokens before each query.

    The soft prompt starts from the token embeddings of ``settings.pt_init_text`` (default: built
    from the label words), repeated or cut to ``pt_tokens``: PEFT's ``TEXT`` initialisation, done
    here because PEFT's own needs a tokenizer path to load from. After :meth:`prepare` alone the
    context is that initial prompt.
    """

    name = "pt"
    settings_read = (*BaseMethod.settings_read, "steps", "batch_size", "pt_lr", "pt_tokens", "pt_init_text")
    with_demonstrations = False

    def init_text(self) -> str:
        """The text that initialises the soft prompt."""
        if self.settings.pt_init_text is not None:
            return self.settings.pt_init_text
        return f"Classify the text as {' or '.join(self.label_words.values())}."

    def _prepare(self, shots: list) -> None:
        peft = _peft()
        s = self.settings
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.pt_tokens,
                                         prompt_tuning_init="RANDOM")
        self.peft_model = peft.get_peft_model(copy.deepcopy(self.base_model), config)
        embedding = self.peft_model.prompt_encoder[self.peft_model.active_adapter].embedding
        ids = list(self.tokenizer(self.init_text(), add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"pt_init_text={self.init_text()!r} tokenizes to nothing; give a text with words")
        ids = (ids * (s.pt_tokens // len(ids) + 1))[: s.pt_tokens]
        word_embeddings = self.peft_model.get_input_embeddings()
        with torch.no_grad():
            init = word_embeddings(torch.tensor(ids, device=word_embeddings.weight.device))  # (n, d)
            embedding.weight.copy_(init.to(embedding.weight.dtype))
        self.demo_ids = None
        if self.with_demonstrations:
            self.demo_ids = build_context(shots, self.template, self.tokenizer, self.label_words).token_ids
        self._keep_prompt()

    def _keep_prompt(self) -> None:
        with torch.no_grad():
            self.prompt = self.peft_model.get_prompt(batch_size=1).detach().clone()  # (1, n, d)

    def _train(self) -> list[float]:
        model = self.peft_model
        device = model_device(model)
        num = self._queries["input_ids"].shape[0]

        def loss_of_rows(rows: torch.Tensor) -> torch.Tensor:
            return label_token_loss(model.get_base_model(), label_batch(self._queries, rows, device),
                                    self.prefix_embeddings(model.get_prompt(batch_size=1)))

        losses = optimize(self.name, _trainable(model), loss_of_rows, num, self.settings, self.settings.pt_lr)
        self._keep_prompt()
        self.peft_model = None  # the prompt is all scoring needs; free the model copy
        return losses

    def trainable_parameters(self) -> int:
        """``pt_tokens`` times the hidden size."""
        return self.prompt[0].numel()

    def prefix_embeddings(self, prompt: torch.Tensor) -> torch.Tensor:
        """``(1, n [+ N], d)``: ``prompt`` in the model's dtype, for ``ipt`` followed by the demonstrations."""
        embed = self.base_model.get_input_embeddings()
        prompt = prompt.to(device=embed.weight.device, dtype=embed.weight.dtype)
        if self.demo_ids is None:
            return prompt
        with torch.no_grad():
            demos = embed(self.demo_ids.to(embed.weight.device))[None]  # (1, N, d)
        return torch.cat([prompt, demos], dim=1)

    def context_embeddings(self) -> torch.Tensor:
        """``(1, n, d)`` soft prompt (``ipt``: followed by the demonstrations' embeddings)."""
        return self.prefix_embeddings(self.prompt)


class InstructionPromptTuning(PromptTuning):
    """Instruction prompt tuning: soft prompt, then the ICL demonstrations, then the query.

    The demonstrations are the same tokens as ``icl``'s context and are not trained; the loss is on
    the query's label only.
    """

    name = "ipt"
    with_demonstrations = True


class LoRA(BaseMethod):
    """PEFT LoRA (rank ``lora_r``, alpha ``lora_alpha``, dropout 0, PEFT's default target modules).

    Trained on the shots as queries with no context; scored with no context. After :meth:`prepare`
    alone, LoRA's B matrices are zero and the scores equal ``zero-shot``'s.
    """

    name = "lora"
    settings_read = (*BaseMethod.settings_read, "steps", "batch_size", "lora_lr", "lora_r", "lora_alpha")

    def _prepare(self, shots: list) -> None:
        peft = _peft()
        s = self.settings
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0)
        model = copy.deepcopy(self.base_model)
        if getattr(model.config, "model_type", "") == "gpt2":
            config.fan_in_fan_out = True  # GPT-2's Conv1D stores weights transposed (PEFT would warn and set it)
        self.peft_model = peft.get_peft_model(model, config)
        self.peft_model.eval()

    def _train(self) -> list[float]:
        model = self.peft_model
        device = model_device(model)
        num = self._queries["input_ids"].shape[0]

        def loss_of_rows(rows: torch.Tensor) -> torch.Tensor:
            return label_token_loss(model.get_base_model(), label_batch(self._queries, rows, device))

        return optimize(self.name, _trainable(model), loss_of_rows, num, self.settings, self.settings.lora_lr)

    def trainable_parameters(self) -> int:
        """Scalars in the LoRA matrices."""
        return sum(p.numel() for p in _trainable(self.peft_model))

    def _scoring_model(self):
        return self.peft_model.get_base_model()
