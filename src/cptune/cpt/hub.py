"""The Hugging Face hub: a repo id resolved to a local folder, a folder uploaded, and the model card.

Loading (:func:`resolve_folder`): an existing local folder wins; otherwise a string shaped like a
hub repo id (``owner/name``, see :func:`is_hub_id`) is downloaded with ``huggingface_hub``'s
``snapshot_download`` into its cache, and the snapshot folder is read like any local folder (the
manifest check included). The cache and offline mode are read when the call is made, not when
``huggingface_hub`` was imported:

- cache: ``cache_dir=``, else ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``,
  else ``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub`` (huggingface_hub's order);
- offline: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to 1/ON/YES/TRUE: only the cache is
  read, and a repo (or revision) missing from it is a one-line ``FileNotFoundError`` naming the repo,
  the revision, the cache and the variable.

Pushing (:func:`push_folder`): ``HfApi.create_repo(..., exist_ok=True)``, ``create_branch`` for a
``revision``, ``model_info`` for the branch's files and commit, then one ``create_commit`` on that
commit: the folder's files go up as they are, and the files an earlier cptune push wrote that this
one does not are deleted in the same commit (:func:`stale_files`: those the branch's
``cptune_manifest.json`` lists, and the manifest; files cptune did not write are never touched). The callers
(``CPTModel.push_to_hub``, ``CPTClassifier.push_to_hub``) save into a temporary folder with their
ordinary save, add the model card ``README.md`` (:func:`card_front_matter` and the section helpers
here) and push that folder. The card is not listed in ``cptune_manifest.json``: the manifest check
only refuses files it lists that differ, and files cptune is about to read that it does not list, so
a README.md (or the ``.gitattributes`` the hub adds) beside a save loads as before.

This module imports only the standard library and the manifest's name from :mod:`cptune.cpt.saving` (CPTConfig
for type hints); ``huggingface_hub`` (0.7 s) is imported by the functions that reach the hub or its cache, so a
command can check a name's shape (:func:`is_hub_id`) and refuse a missing folder at once.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptune.cpt.saving import MANIFEST_NAME

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from cptune.cpt.config import CPTConfig

CARD_NAME = "README.md"
"""The model card's file name; written beside a save that goes to the hub, never listed in its manifest."""
LIBRARY_NAME = "cptune"
CARD_TAGS = ("cpt", "few-shot", "peft")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables that keep hub look-ups in the local cache (either one, set to 1/ON/YES/TRUE)."""
DEFAULT_REVISION = "main"
logger = logging.getLogger("cptune")

_TRUE = {"1", "ON", "YES", "TRUE"}
# owner/name: each part starts with a letter, digit or underscore (so no "./x", "/x", "~/x") and holds
# letters, digits, "_", "-" and "."; the hub also refuses "--" and "..".
_HUB_ID = re.compile(r"\w[\w.-]{0,95}/\w[\w.-]{0,95}", re.ASCII)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub repo id, ``owner/name`` (it may still not exist)."""
    return isinstance(name, str) and bool(_HUB_ID.fullmatch(name)) and "--" not in name and ".." not in name


def offline_variable() -> str | None:
    """The offline variable set now (``HF_HUB_OFFLINE`` first), or ``None`` when look-ups may go online."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in _TRUE:
            return name
    return None


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder as the environment says now (see the module docstring for the order)."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def cptune_version() -> str | None:
    """The installed cptune's version (from its package metadata), or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(LIBRARY_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_folder(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local folder for a folder path or a hub repo id (downloaded into the cache when needed).

    An existing path is returned as it is; a string shaped like ``owner/name`` that is not one is
    downloaded (:func:`download`); anything else comes back as a ``Path``, for the caller's own
    "does not exist" error.

    Args:
        name_or_path: a local folder or a hub repo id (a ``Path`` is always a local path).
        revision: a branch, tag or commit of the hub repo (default ``main``); refused for a local folder.
        token: a hub token (default: the one ``hf auth login`` stored), for private repos.
        cache_dir: the hub cache folder (default: :func:`hub_cache_dir`).

    Raises:
        ValueError: a ``revision`` for a local folder; an invalid repo id.
        FileNotFoundError: a repo or revision that is not on the hub, or not in the cache while offline.
        ConnectionError: the hub could not be reached and the repo is not in the cache.
    """
    path = Path(name_or_path)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for hub repos, but {path} is a local folder")
        return path
    if isinstance(name_or_path, str) and is_hub_id(name_or_path):
        return download(name_or_path, revision, token=token, cache_dir=cache_dir)
    return path


def download(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """``snapshot_download`` of a model repo, honouring the cache and offline mode as set now; one-line errors.

    Returns:
        The snapshot folder in the cache (its files link to the cache's blobs).

    Raises:
        ValueError: an invalid repo id.
        FileNotFoundError: the repo or revision is not on the hub, or, offline, not in the cache.
        ConnectionError: the hub could not be reached and the repo is not in the cache.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = offline_variable()
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    shown = revision or DEFAULT_REVISION
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, token=token,
                                   local_files_only=offline is not None, library_name=LIBRARY_NAME,
                                   library_version=cptune_version())
    except HFValidationError as err:
        raise ValueError(f"{json.dumps(repo_id)} is not a valid hub repo id ({_one_line(err)})") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"hub repo {repo_id} has no revision {shown!r}") from None
    except GatedRepoError:
        raise FileNotFoundError(f"hub repo {repo_id} is gated: accept its conditions on huggingface.co, then log in "
                                "(`hf auth login`) or pass token=") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id} is neither a local folder nor a hub repo this account can read (a private "
                                "repo needs `hf auth login` or token=)") from None
    except IncompleteSnapshotError as err:
        raise FileNotFoundError(_one_line(err)) from None
    except LocalEntryNotFoundError as err:
        if offline is not None or isinstance(err.__cause__, OfflineModeIsEnabled):
            name = offline or OFFLINE_VARIABLES[0]
            raise FileNotFoundError(
                f"{repo_id} is not a local folder, and hub repo {repo_id} (revision {shown}) is not in the "
                f"Hugging Face cache {cache} while {name} is set; download it once online or unset {name}"
            ) from None
        raise ConnectionError(f"could not reach the Hugging Face hub for {repo_id} (revision {shown}) and it is not "
                              f"in the cache {cache}: {_one_line(err.__cause__ or err)}") from None
    return Path(folder)


MODEL_CHECK_TIMEOUT_S = 10.0
"""Seconds :func:`check_model_id` waits for the hub before saying it cannot be reached."""
_MODEL_ID = re.compile(r"\w[\w.-]{0,95}(/\w[\w.-]{0,95})?", re.ASCII)  # owner/name, or a legacy bare name (gpt2)


def check_model_id(name: str, cache_dir: str | os.PathLike | None = None,
                   timeout: float = MODEL_CHECK_TIMEOUT_S) -> bool:
    """Check, in seconds and in one line, that ``name`` is a hub model that can be loaded from here.

    The local Hugging Face cache is read first (its ``config.json``); only a model missing from it asks
    the hub, once, with ``timeout`` and no retries (``model_info``), so a mistyped name fails at once
    instead of after transformers' retries.

    Returns:
        Whether the model is in the cache (``from_pretrained`` may then read it without the network).

    Raises:
        ValueError: ``name`` is not shaped like a hub model id (``owner/name`` or ``name``).
        FileNotFoundError: not in the cache while offline, or not on the hub (or not readable).
        ConnectionError: not in the cache and the hub cannot be reached.
    """
    if not isinstance(name, str) or not _MODEL_ID.fullmatch(name) or "--" in name or ".." in name:
        raise ValueError(f"model {name!r} is not a local folder, a .gguf file or a hub model id (owner/name)")
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache), str):
        return True
    offline = offline_variable()
    if offline is not None:
        raise FileNotFoundError(f"model {name} is not a local folder, and hub model {name} is not in the Hugging "
                                f"Face cache {cache} while {offline} is set; download it once online or unset "
                                f"{offline}")
    try:
        HfApi(library_name=LIBRARY_NAME, library_version=cptune_version()).model_info(name, timeout=timeout)
    except (RepositoryNotFoundError, GatedRepoError, HFValidationError):
        raise FileNotFoundError(f"model {name} is neither a local folder or .gguf file nor a hub model this account "
                                "can read (a private one needs `hf auth login`)") from None
    except Exception as err:  # noqa: BLE001 - httpx's connection errors, timeouts, HTTP errors: all "unreachable"
        raise ConnectionError(f"model {name} is not a local folder and not in the Hugging Face cache {cache}, and "
                              f"the hub could not be reached ({_one_line(err)}); set HF_HUB_OFFLINE=1 to work "
                              "from the cache") from None
    return False


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
):
    """Commit every file of ``folder`` to the model repo ``repo_id`` (created if needed), removing in the same
    commit the files an earlier cptune push wrote that ``folder`` does not hold (:func:`stale_files`).

    The commit is made on the commit the branch's files were read from (``parent_commit``), so a push that
    lands in between makes the hub refuse this one rather than delete files by a stale list.

    Args:
        folder: the folder to upload (its files, as they are).
        repo_id: ``owner/name`` (or ``name``: the token's own account).
        private: for a new repo, whether it is private (``None``: the hub's default); an existing repo keeps its
            visibility.
        commit_message: the commit's message (default: ``"Upload with cptune <version>"``).
        revision: the branch to commit to (created from ``main`` if needed); default ``main``.
        token: a hub token (default: the one ``hf auth login`` stored).

    Returns:
        ``huggingface_hub``'s ``CommitInfo`` (its ``commit_url``, ``oid``...).

    Raises:
        ValueError: offline mode is set (nothing can be pushed).
    """
    offline = offline_variable()
    if offline is not None:
        raise ValueError(f"cannot push to the Hugging Face hub while {offline} is set; unset it to push {repo_id}")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=cptune_version())
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(url, "repo_id", None) or repo_id  # "name" alone becomes "owner/name"
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    message = commit_message or f"Upload with {LIBRARY_NAME} {cptune_version() or ''}".rstrip()
    files = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    info = api.model_info(repo_id, revision=revision)
    there = [sibling.rfilename for sibling in info.siblings or []]
    stale = stale_files(there, _manifest_names(api, repo_id, info.sha) if MANIFEST_NAME in there else None, files)
    operations = [*(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name)) for name in files),
                  *(CommitOperationDelete(path_in_repo=name) for name in stale)]
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                             parent_commit=info.sha)


def stale_files(there: Iterable[str], manifest: Iterable[str] | None, pushing: Iterable[str]) -> list[str]:
    """The files of a repo that an earlier cptune push wrote and a push of ``pushing`` does not: to delete.

    cptune knows what it wrote by the repo's ``cptune_manifest.json`` (every file of the save it pushed);
    the manifest itself and the card ``README.md`` are its too, but every push writes both. Anything else
    (a file the user added, the hub's ``.gitattributes``) is never in the list.

    Args:
        there: the repo's file paths now.
        manifest: the file names the repo's manifest lists; ``None`` when it has none (nothing is deleted).
        pushing: the names the push writes.
    """
    if manifest is None:
        return []
    there, pushing = set(there), set(pushing)
    ours = {*manifest, MANIFEST_NAME}
    return sorted(name for name in ours if name in there and name not in pushing)


def _manifest_names(api: HfApi, repo_id: str, commit: str) -> list[str] | None:
    """The file names the repo's manifest (at ``commit``) lists; ``None`` when it is damaged (nothing is deleted)."""
    from huggingface_hub.errors import EntryNotFoundError

    with tempfile.TemporaryDirectory(prefix="cptune-manifest-") as tmp:
        try:
            path = api.hf_hub_download(repo_id, MANIFEST_NAME, revision=commit, local_dir=tmp)
            listed = json.loads(Path(path).read_text(encoding="utf-8"))["files"]
        except EntryNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            listed = None
    if not isinstance(listed, dict):
        logger.warning("%s's %s is damaged; this push deletes none of the files an earlier push wrote",
                       repo_id, MANIFEST_NAME)
        return None
    return [name for name in listed if isinstance(name, str)]


# -- the model card ---------------------------------------------------------------------------------


def card_front_matter(base_model: str | None, pipeline_tag: str | None = None) -> str:
    """The card's YAML metadata between ``---`` lines (huggingface_hub's ``ModelCardData`` writes it).

    ``base_model`` is written only when it is a hub repo id (``owner/name``) and not a local path here: the
    hub takes only repo ids there, and a local folder or cptune's embedded ``smollm2-135m`` is none.
    """
    from huggingface_hub import ModelCardData

    hub_base = base_model if base_model and is_hub_id(base_model) and not Path(base_model).exists() else None
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=hub_base, pipeline_tag=pipeline_tag,
                         tags=list(CARD_TAGS))
    return f"---\n{data.to_yaml()}\n---\n"


def context_lines(config: CPTConfig) -> list[str]:
    """Markdown bullet lines on the adapter: its context size, projection radii and loss."""
    loss = (f"label tokens weighted by decay {config.opt_loss_decay_factor:g} per demonstration back from the query"
            if config.opt_weighted_loss_type == "decay" else "every label token weighted equally")
    return [
        f"- context: {config.num_examples} demonstrations, {config.num_virtual_tokens} tokens",
        f"- projection radii (epsilon): {config.opt_projection_epsilon:g} for input text, "
        f"{config.opt_projection_format_epsilon:g} for template tokens",
        f"- loss: {loss}",
    ]


def peft_snippet(base_model: str | None, repo_id: str) -> str:
    """A fenced Python block that loads the adapter with PEFT onto its base model."""
    if not base_model:
        load_base = "base = AutoModelForCausalLM.from_pretrained(...)  # the model it was trained on (not recorded)"
        imports = "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
    elif is_hub_id(base_model) and not Path(base_model).exists():
        load_base = f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base_model)})"
        imports = "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
    else:  # cptune's embedded model or a local folder: cptune.load_model reads either
        load_base = f"base, tokenizer = cptune.load_model({json.dumps(base_model)})  # the model it was trained on"
        imports = "import cptune\nfrom peft import PeftModel\n"
    return f"```python\n{imports}\n{load_base}\nmodel = PeftModel.from_pretrained(base, {json.dumps(repo_id)})\n```"


def metrics_table(metrics: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines: a ``| metric | value |`` table (floats to 4 places, lists and dicts as JSON); none when empty.

    Raises:
        ValueError: ``metrics`` is not a mapping with string keys.
    """
    if not metrics:
        return []
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise ValueError(f"metrics must be a {{name: value}} dict with string names; got {metrics!r}")
    rows = ["| metric | value |", "|---|---|"]
    for name, value in metrics.items():
        if isinstance(value, float):
            shown = f"{value:.4f}"
        elif isinstance(value, (int, str, bool)) or value is None:
            shown = str(value)
        else:
            shown = f"`{json.dumps(value, default=str)}`"
        shown = shown.replace("|", "\\|")  # a bar would end the table cell
        rows.append(f"| {name} | {shown} |")
    return rows


def files_lines(names: list[str], more: Mapping[str, str] | None = None) -> list[str]:
    """Markdown bullet lines saying what each uploaded file is (``more``: ``{name: meaning}`` of other files)."""
    meaning = {
        "adapter_config.json": "PEFT's CPT config (the context's token ids and roles, the radii)",
        "adapter_model.safetensors": "PEFT's weights: the learned context embeddings",
        "cptune_state.safetensors": "cptune's resume state (frozen embeddings, corrections, roles); PEFT ignores it",
        "cptune_manifest.json": "size and SHA-256 of each file of the save, checked on load",
        CARD_NAME: "this card (not in the manifest)",
        **(more or {}),
    }
    return [f"- `{name}`: {meaning.get(name, 'another file')}" for name in names]


def adapter_card(config: CPTConfig, repo_id: str, files: list[str], metrics: Mapping[str, Any] | None = None) -> str:
    """The model card of a bare CPT adapter (``CPTModel.push_to_hub``): what it is, its numbers, how to load it.

    Args:
        config: the adapter's config.
        repo_id: the repo it goes to (for the loading snippets).
        files: the names of the files uploaded with it.
        metrics: evaluation figures, ``{name: value}``, written as a table when given.
    """
    base = config.base_model_name_or_path
    version = cptune_version()
    lines = [
        card_front_matter(base),
        f"# {repo_id}",
        "",
        "A Context-aware Prompt Tuning (CPT; Blau et al., arXiv 2410.17222) adapter: labelled demonstrations form "
        "a frozen causal LM's context, and training learned small, norm-bounded corrections to their embeddings.",
        "",
        f"Made with cptune {version or '(version unknown)'}.",
        "",
        "## The adapter",
        "",
        f"- base model: `{base or 'not recorded'}`",
        *context_lines(config),
        "",
    ]
    table = metrics_table(metrics)
    if table:
        lines += ["## Evaluation", "", *table, ""]
    lines += [
        "## Use it",
        "",
        "With cptune (`pip install cptune`):",
        "",
        "```python",
        "import cptune",
        "",
        f"model = cptune.CPTModel.from_pretrained(base, {json.dumps(repo_id)})  # base: the causal LM named above",
        "```",
        "",
        "With PEFT (the files are PEFT's CPT format):",
        "",
        peft_snippet(base, repo_id),
        "",
        "## Files",
        "",
        *files_lines(files),
        "",
    ]
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
