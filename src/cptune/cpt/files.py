"""Adapter folders: PEFT's format exactly, plus a separate file with what resuming needs.

Folder layout::

    adapter_config.json          PEFT's config (sorted keys, inference_mode true)
    adapter_model.safetensors    {"prompt_embeddings": (N, d) float32 = E0 + projected delta}
    cptune_state.safetensors     cptune only (PEFT ignores it): E0, delta, roles, example index,
                                 optimizer tensors; its metadata holds step, optimizer and
                                 schedule settings as JSON

plus ``cptune_manifest.json`` (sizes and SHA-256 of the files above, written last; see
:mod:`cptune.cpt.saving`). Each file is written to a temporary name and renamed into place; nothing
else in the folder is touched. Loading checks the manifest, so a save interrupted between files
is refused rather than loaded as a mix; PEFT's folders, which have no manifest, load as they are.
Only JSON and safetensors are ever read (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from cptune.cpt.config import CPTConfig
from cptune.cpt.projection import project_l2_ball
from cptune.cpt.roles import TokenRole
from cptune.cpt.saving import check_manifest, save_files

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STATE_NAME = "cptune_state.safetensors"
PROMPT_KEY = "prompt_embeddings"
_META_KEY = "cptune"
_FROZEN_ROW_RTOL = 1e-2  # bf16 rounding of the base embeddings stays well inside this


def save_adapter(
    model,
    save_directory,
    training_state: dict[str, Any] | None = None,
    extra_json: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s adapter to ``save_directory`` (PEFT format + cptune resume state).

    Args:
        model: a :class:`cptune.CPTModel`.
        save_directory: the folder to write into (created if needed; other files in it are left alone).
        training_state: optional ``{"step": int, "optimizer": state_dict, "scheduler": state_dict,
            ...}`` written into the resume file so ``cptune.train(..., resume=True)`` continues.
        extra_json: ``{file name: JSON-able object}`` written into the same folder and listed in the
            same manifest (e.g. a classifier's template and label words).
    """
    enc = model.prompt_encoder
    with torch.no_grad():
        delta = enc.delta.detach().clone()  # kept as is: resuming must continue from these exact bits
        feasible = project_l2_ball(delta, enc.radii) * enc.trainable_mask
        prompt = (enc.base + feasible).float().cpu().contiguous()  # (N, d) what PEFT prepends
    config_dict = model.config.to_dict()
    config_dict["inference_mode"] = True
    tensors = {
        "base": enc.base.float().cpu().contiguous(),
        "delta": delta.float().cpu().contiguous(),
        "roles": enc.roles.cpu().contiguous(),
        "example_index": enc.example_index.cpu().contiguous(),
    }
    meta: dict[str, Any] = {
        "format_version": 1,
        "vocab_size": int(model.word_embeddings.weight.shape[0]),
        "base_model": model.config.base_model_name_or_path,
    }
    if training_state is not None:
        opt_tensors, opt_meta = _flatten_optimizer(training_state.get("optimizer"))
        tensors.update(opt_tensors)
        meta.update({k: v for k, v in training_state.items() if k != "optimizer"})
        meta["optimizer"] = opt_meta

    files = {
        CONFIG_NAME: (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode(),
        WEIGHTS_NAME: stable_safetensors_bytes({PROMPT_KEY: prompt}, metadata={"format": "pt"}),
        STATE_NAME: stable_safetensors_bytes(tensors, metadata={"format": "pt", _META_KEY: json.dumps(meta)}),
    }
    for name, data in (extra_json or {}).items():
        files[name] = (json.dumps(data, indent=2) + "\n").encode()
    save_files(save_directory, files)


def stable_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes that depend only on the tensors and the metadata, so saving twice gives the same file.

    safetensors keeps the metadata in a hash map whose order changes from one call to the next, so a
    file with two metadata keys came out in either order. The header (8-byte little-endian length,
    then JSON padded with spaces to a multiple of 8) is rewritten here with the metadata keys sorted;
    the tensor data that follows it is unchanged.
    """
    data = safetensors_bytes(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def read_json_object(directory, name: str, what: str) -> dict[str, Any]:
    """``directory/name`` parsed as a JSON object; one-line errors for missing, invalid or non-object files.

    Args:
        directory: the folder.
        name: the file name.
        what: what the folder should be, for the message (e.g. ``"a CPT adapter folder"``).
    """
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"no {name} in {directory}; is it {what}?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def read_config(directory) -> CPTConfig:
    """Read and validate ``adapter_config.json`` from an adapter folder."""
    path = Path(directory) / CONFIG_NAME
    data = read_json_object(directory, CONFIG_NAME, "a CPT adapter folder")
    if data.get("peft_type") != "CPT":
        raise ValueError(f"{path} describes a {data.get('peft_type')!r} adapter; cptune loads 'CPT' adapters")
    return CPTConfig.from_dict(data)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None


def read_adapter(base_model: nn.Module, directory) -> tuple[CPTConfig, torch.Tensor, dict | None]:
    """Read an adapter folder written by PEFT or cptune and check it against ``base_model``.

    :func:`cptune.cpt.model.load_adapter` builds the model from what this returns.

    Returns:
        ``(config, prompt, state)``: the validated config, the ``(N, d)`` float32 ``E0 + delta`` PEFT
        prepends, and cptune's resume tensors (``"base"``, ``"delta"``...) or ``None`` for a PEFT folder.

    Raises:
        FileNotFoundError: a missing folder or file.
        cptune.cpt.saving.IncompleteSaveError: the files do not match the folder's manifest.
        ValueError: unreadable files, or an adapter that does not fit ``base_model``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist" if not directory.exists()
                                else f"{directory} is a file, not an adapter folder")
    check_manifest(directory, reading=(CONFIG_NAME, WEIGHTS_NAME, STATE_NAME))
    config = read_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    weights, _ = _read_safetensors(weights_path)
    if PROMPT_KEY not in weights:
        raise ValueError(f"{weights_path} has no {PROMPT_KEY!r} tensor (found {sorted(weights)})")
    prompt = weights[PROMPT_KEY].float()
    emb = base_model.get_input_embeddings().weight
    expected = (config.num_virtual_tokens, emb.shape[-1])
    if tuple(prompt.shape) != expected:
        raise ValueError(
            f"{PROMPT_KEY} has shape {tuple(prompt.shape)}, but this model needs {expected} "
            f"({config.num_virtual_tokens} context tokens x hidden size {emb.shape[-1]}); wrong base model?"
        )
    vocab = emb.shape[0]
    if max(config.cpt_token_ids) >= vocab:
        raise ValueError(
            f"cpt_token_ids holds id {max(config.cpt_token_ids)}, outside this model's vocabulary of {vocab}; "
            f"wrong base model? (adapter base model: {config.base_model_name_or_path!r})"
        )
    state_path = directory / STATE_NAME
    state, state_meta = _read_safetensors(state_path) if state_path.is_file() else (None, {})
    if state is not None:
        _check_state(state, json.loads(state_meta.get(_META_KEY, "{}")), base_model, config, state_path)
    return config, prompt, state


def _check_state(state: dict, meta: dict, base_model: nn.Module, config: CPTConfig, path: Path) -> None:
    """cptune's resume file: shapes, vocabulary, and E0 against this model's own embedding rows."""
    n, d = config.num_virtual_tokens, base_model.get_input_embeddings().weight.shape[-1]
    for key in ("base", "delta"):
        if key not in state or tuple(state[key].shape) != (n, d):
            raise ValueError(f"{path}: {key!r} is missing or not of shape ({n}, {d})")
    vocab = base_model.get_input_embeddings().weight.shape[0]
    if meta.get("vocab_size") not in (None, vocab):
        raise ValueError(
            f"the adapter was trained on a model with vocabulary {meta['vocab_size']}, this one has {vocab} "
            f"(adapter base model: {meta.get('base_model')!r})"
        )
    emb = base_model.get_input_embeddings()
    ids = torch.tensor(config.cpt_token_ids, device=emb.weight.device)
    with torch.no_grad():
        own = emb(ids).float().cpu()
    saved = state["base"].float()
    if not torch.allclose(own, saved, rtol=_FROZEN_ROW_RTOL, atol=_FROZEN_ROW_RTOL * float(own.abs().mean())):
        raise ValueError(
            "this base model's embeddings of the context tokens differ from the ones the adapter was trained on "
            f"(adapter base model: {meta.get('base_model')!r}); load it onto that model"
        )


def check_frozen_rows(model, prompt: torch.Tensor) -> None:
    """Label and separator rows of a saved context are the base model's own embeddings: compare them.

    ``model`` is the :class:`~cptune.cpt.model.CPTModel` built from ``prompt`` (see :func:`read_adapter`).
    """
    enc = model.prompt_encoder
    frozen = (enc.roles == TokenRole.LABEL) | (enc.roles == TokenRole.SEPARATOR)
    if not bool(frozen.any()):
        return
    ids = torch.tensor(model.config.cpt_token_ids, device=enc.base.device)[frozen]
    with torch.no_grad():
        own = model.word_embeddings(ids.to(model.word_embeddings.weight.device)).float().cpu()
    saved = prompt[frozen.cpu()]
    if not torch.allclose(own, saved, rtol=_FROZEN_ROW_RTOL, atol=_FROZEN_ROW_RTOL * float(own.abs().mean())):
        raise ValueError(
            "the adapter's label/separator embeddings differ from this base model's embeddings of the same "
            f"tokens; it was trained on another model ({model.config.base_model_name_or_path!r})"
        )


def read_training_state(directory) -> dict[str, Any] | None:
    """The resume state saved with an adapter (``None`` if it has none)."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        return None
    check_manifest(directory, reading=(STATE_NAME,))
    tensors, meta = _read_safetensors(path)
    info = json.loads(meta.get(_META_KEY, "{}"))
    if "optimizer" in info:
        info["optimizer"] = _unflatten_optimizer(info["optimizer"], tensors)
    return info


def _flatten_optimizer(state_dict: dict | None) -> tuple[dict[str, torch.Tensor], dict]:
    if state_dict is None:
        return {}, {}
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict] = {}
    for pid, entries in state_dict["state"].items():
        plain_state[str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
                plain_state[str(pid)][key] = {"tensor": f"optimizer.{pid}.{key}"}
            else:
                plain_state[str(pid)][key] = {"value": value}
    return tensors, {"state": plain_state, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    if not meta:
        return {}
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {
            key: tensors[spec["tensor"]] if "tensor" in spec else spec["value"] for key, spec in entries.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}
