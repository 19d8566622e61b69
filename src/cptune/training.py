"""The CPT training loop: forward -> loss -> backward -> AdamW step -> project -> log."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cptune import reporting
from cptune.cpt.files import STATE_NAME, read_training_state
from cptune.distributed import all_reduce_sum, barrier, process_group

SCHEDULES = ("linear", "constant", "cosine")
DEFAULT_STEPS = 40
"""Optimizer steps when neither ``steps`` nor ``epochs`` is given (the main job's; see docs/results.md)."""


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was NaN or infinite; the last good state was kept."""


@dataclass(frozen=True)
class TrainSettings:
    """Settings of one training run (all checked on construction).

    Args:
        steps: optimizer steps. Left out (``None``) with ``epochs`` left out too:
            :data:`DEFAULT_STEPS` (40), so ``TrainSettings(lr=3e-3)`` changes only the learning rate.
        epochs: passes over the training queries, used only when ``steps`` is not given (a run of
            ``epochs * ceil(queries / batch_size)`` steps); with ``steps`` given it is ignored (and
            stored as ``None``).
        batch_size: queries per step.
        lr: AdamW learning rate (> 0).
        weight_decay: AdamW weight decay (>= 0).
        schedule: ``"linear"`` decay to 0 (the paper's), ``"constant"`` or ``"cosine"``.
        warmup_steps: linear warm-up steps.
        seed: orders the queries; the same seed gives the same batches and the same result.
        max_grad_norm: clip the delta gradient to this norm (``None``: no clipping).
        schedule_steps: the length of the learning-rate schedule, when the run stops before its end:
            ``TrainSettings(steps=20, schedule_steps=40)`` trains the first 20 steps of the 40-step
            schedule, exactly as a 40-step run's first 20 (the batches depend on the step alone).
            ``steps=0`` is then accepted (the context untouched). ``None`` (default): ``steps``. It is
            what :class:`cptune.CPTClassifier` ``choose_steps`` sets: the steps chosen of the schedule
            cross-validated (:func:`cptune.crossval.choose_steps`).
        gradient_checkpointing: recompute the base model's activations in the backward pass
            (less memory, about a third more compute). The base model then runs in train mode
            (dropout, if it has any, is active) and every batch uses PEFT's duplicated-context
            layout, since checkpointed layers cannot read a shared context cache.
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    seed: int = 0
    max_grad_norm: float | None = None
    gradient_checkpointing: bool = False
    schedule_steps: int | None = None

    def __post_init__(self) -> None:
        # Resolved here, so that equal runs compare (and save) equal: a settings object states its
        # steps, or its epochs, never a default that depends on which field was left out.
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)
        elif self.steps is not None:
            object.__setattr__(self, "epochs", None)  # steps win (saves before 0.3 hold both)
        if self.schedule_steps is not None:  # a run stopped early in a longer schedule: 0 steps allowed
            if self.steps is None or self.schedule_steps < 1 or not 0 <= self.steps <= self.schedule_steps:
                raise ValueError(f"schedule_steps={self.schedule_steps!r} must be >= 1 and at least steps "
                                 f"(steps={self.steps!r}, from 0; epochs cannot stop early)")
        elif self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.steps is None and self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be a finite number > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; accepted: {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0 or None")

    def total_steps(self, num_queries: int) -> int:
        """Number of optimizer steps for ``num_queries`` training queries (the run's, not the schedule's)."""
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(num_queries / self.batch_size)


@dataclass
class TrainResult:
    """What a training run did: ``losses[i]`` is the loss of step ``first_step + i``."""

    steps: int
    losses: list[float] = field(default_factory=list)
    first_step: int = 0


def _lr_factor(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def batch_indices(num_queries: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Query rows of optimizer step ``step``: consecutive slices of a per-epoch seeded permutation.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have seen.
    """
    per_epoch = math.ceil(num_queries / batch_size)
    epoch, slot = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_queries, generator=gen)
    return order[slot * batch_size : (slot + 1) * batch_size]


def _take(queries: dict[str, torch.Tensor], rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Rows of the query batch, trimmed to their longest real length (less padding)."""
    width = int(queries["attention_mask"][rows].sum(dim=1).max())
    return {k: v[rows, :width].to(device) for k, v in queries.items()}


def train(
    model,
    queries: dict[str, torch.Tensor],
    settings: TrainSettings | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    compile: bool = False,
) -> TrainResult:
    """Train a :class:`cptune.CPTModel`'s context corrections on labelled queries.

    Each step: forward (context encoded once for the batch), CPT loss, backward, AdamW step,
    then :meth:`CPTModel.project_`. The base model stays frozen and in eval mode (no dropout).

    Launched with N processes (``accelerate launch`` or ``torchrun``), each process takes every
    N-th row of the global batch and the delta gradient is summed across processes, which gives
    the single-process result; only rank 0 writes checkpoints and shows progress.

    Args:
        model: the CPT model.
        queries: the batch from :func:`cptune.render_queries` (``with_labels=True``).
        settings: the run's settings (defaults: 40 steps, batch 4, lr 1e-3, linear decay).
        checkpoint_dir: adapter folder written every ``checkpoint_every`` steps and at the end,
            with the optimizer and schedule state.
        checkpoint_every: steps between checkpoints (``None``: only at the end).
        resume: continue from the state in ``checkpoint_dir`` (same settings required).
        progress: show a progress bar with the loss.
        callback: called as ``callback(step, loss)`` after each optimizer step (``step`` counts
            from 1), after any checkpoint of that step; an exception it raises stops training.
        compile: run the base model's forwards (and so their backward) under ``torch.compile``
            for this run (:meth:`CPTModel.compile_`); the same results up to float rounding. Off by
            default: on the CPU it was measured not to pay (docs/scaling.md, "Compiling"). An
            execution option, not a setting of the run: a checkpoint resumes with or without it.

    Returns:
        The :class:`TrainResult`.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the last good state was checkpointed
            (when ``checkpoint_dir`` is set) and kept in ``model``.
    """
    settings = settings or TrainSettings()
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1 or None")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    rank, world = process_group()
    num_queries = int(queries["input_ids"].shape[0])
    total = settings.total_steps(num_queries)
    delta = model.prompt_encoder.delta
    delta.requires_grad_(True)
    optimizer = torch.optim.AdamW([delta], lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(settings.schedule, settings.warmup_steps, settings.schedule_steps or total)
    )
    start = 0
    if resume:
        start = _restore(model, optimizer, scheduler, checkpoint_dir, settings)
    device = delta.device
    result = TrainResult(steps=total, first_step=start)

    def checkpoint(step: int) -> None:
        if checkpoint_dir is not None and rank == 0:
            model.save_pretrained(
                checkpoint_dir,
                training_state={
                    "step": step,
                    "settings": asdict(settings),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
            )
        barrier()

    model.train()
    if settings.gradient_checkpointing:
        _set_activation_checkpointing(model.base_model, True)
    else:
        model.base_model.eval()
    was_compiled = model.compiled
    model.compile_(compile or was_compiled)
    with reporting.progress(total, "train", unit="step", initial=start, enabled=progress and rank == 0) as bar:
        for step in range(start, total):
            rows = batch_indices(num_queries, settings.batch_size, settings.seed, step)
            optimizer.zero_grad(set_to_none=True)
            if world == 1:
                loss = model(**_take(queries, rows, device), return_logits=False).loss
                loss.backward()
            else:
                loss = _data_parallel_step(model, queries, rows[rank::world], device)
            if not torch.isfinite(loss):
                checkpoint(step)
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {step + 1} of {total}; stopped and kept the state after "
                    f"{reporting.plural(step, 'step')}"
                    + (f" in {checkpoint_dir}" if checkpoint_dir is not None else "")
                )
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([delta], settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            model.project_()
            result.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            done = step + 1
            if checkpoint_every is not None and done % checkpoint_every == 0 and done < total:
                checkpoint(done)
            if callback is not None:
                callback(done, result.losses[-1])
    checkpoint(total)
    if settings.gradient_checkpointing:
        _set_activation_checkpointing(model.base_model, False)
    model.compile_(was_compiled)
    model.eval()
    return result


def _set_activation_checkpointing(base_model, enable: bool) -> None:
    """Turn ``base_model``'s activation checkpointing on or off, under the name its transformers has.

    transformers 5.23 renamed ``gradient_checkpointing_enable``/``_disable`` to ``activation_checkpointing_*``
    (the old names warn ``FutureWarning`` from then on and go in v6); 5.21 and 5.22 have only the old ones.
    """
    renamed = hasattr(base_model, "activation_checkpointing_enable")
    kwargs = {"use_reentrant": False}  # torch's recommended variant of torch.utils.checkpoint
    if enable and renamed:
        base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif enable:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif renamed:
        base_model.activation_checkpointing_disable()
    else:
        base_model.gradient_checkpointing_disable()


def _data_parallel_step(model, queries, local_rows: torch.Tensor, device) -> torch.Tensor:
    """This process's share of the global batch; leaves the global gradient in ``delta.grad``.

    The local summed loss is divided by the global label-token count and differentiated with
    respect to the context embeddings (in the model's dtype); that gradient is summed across
    processes and only then carried back to the float32 delta, so rounding is that of one process.

    Returns:
        The global batch's mean loss (the same on every process).
    """
    context = model.context_embeddings().detach().requires_grad_(True)  # (1, N, d) model dtype
    if len(local_rows):
        out = model(**_take(queries, local_rows, device), return_logits=False, context_embeds=context)
        local_sum, local_count = out.loss * out.num_label_tokens, float(out.num_label_tokens)
    else:  # more processes than rows in this batch: contribute nothing
        local_sum, local_count = (context * 0.0).sum(), 0.0
    # On the loss's device: NCCL, the backend on GPUs, reduces no CPU tensors.
    count = torch.tensor([local_count], dtype=torch.float64, device=local_sum.device)
    total_count = max(float(all_reduce_sum(count).item()), 1.0)
    (grad,) = torch.autograd.grad(local_sum / total_count, context)
    all_reduce_sum(grad)
    model.context_embeddings().backward(grad)
    return all_reduce_sum(local_sum.detach().reshape(1).to(torch.float64))[0] / total_count


def _restore(model, optimizer, scheduler, checkpoint_dir, settings: TrainSettings) -> int:
    """Load delta, optimizer and schedule state from ``checkpoint_dir``; return the step to resume at."""
    from safetensors.torch import load_file

    state = read_training_state(checkpoint_dir)
    if state is None or "step" not in state:
        raise ValueError(f"{checkpoint_dir} holds no training state to resume from")
    saved = TrainSettings(**state["settings"])
    if saved != settings:
        raise ValueError(f"cannot resume: {checkpoint_dir} was trained with {saved}, not {settings}")
    tensors = load_file(str(Path(checkpoint_dir) / STATE_NAME))
    if tensors["base"].shape != model.prompt_encoder.base.shape or not torch.equal(
        tensors["base"].to(model.prompt_encoder.base.device), model.prompt_encoder.base
    ):
        raise ValueError(f"cannot resume: {checkpoint_dir} holds a different context than this model's")
    with torch.no_grad():
        model.prompt_encoder.delta.copy_(tensors["delta"].to(model.prompt_encoder.delta.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
