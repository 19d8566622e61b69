"""Writing files into a user's folder without touching anything else there.

Every file cptune saves is written to a hidden temporary name in the destination folder, flushed
to disk and renamed over its final name, so a reader sees the old file or the new one, never half
of one. Nothing else in the folder is removed, renamed or rewritten, and new files and folders get
the permissions the process umask gives (0644 / 0755 under umask 022), as ``open`` and ``mkdir``
would.

A save of several files that belong together (an adapter, a classifier) ends with a manifest,
``cptune_manifest.json``, holding each file's size and SHA-256. :func:`check_manifest` compares the
folder against it on load, so a save killed between two files is refused with
:class:`IncompleteSaveError` instead of loading a mix of two saves. Folders without a manifest
(written by PEFT) are not checked. When such a folder already holds files of the new save, the
new manifest is also written first, so a mix of the old foreign files and the new ones is refused
too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MANIFEST_NAME = "cptune_manifest.json"
MANIFEST_FORMAT = "cptune-manifest"
MANIFEST_VERSION = 1
_TMP_MARK = ".cptune-tmp-"


class IncompleteSaveError(ValueError):
    """A folder whose files do not match its manifest: an interrupted save, or files changed since."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else by a swap."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only the fallback
    os.umask(mask)
    return mask


def prepare_folder(directory: str | os.PathLike) -> Path:
    """Create ``directory`` (and its parents) if needed and check that files can be written there.

    Raises:
        NotADirectoryError: ``directory`` or one of its parents is a file.
        PermissionError: the folder exists but cannot be written.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save into {directory}: it is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)  # mode 0o777 less the umask, as mkdir gives
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"cannot save into {directory}: a part of that path is a file") from None
    except PermissionError:
        raise PermissionError(f"cannot create the folder {directory}: permission denied") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save into {directory}: the folder is not writable")
    return directory


def check_can_save(directory: str | os.PathLike) -> Path:
    """Check, without creating anything, that :func:`prepare_folder` would succeed for ``directory``.

    Commands call it before hours of work, so a bad output path fails at once.

    Raises:
        NotADirectoryError: ``directory`` or one of its parents is a file.
        PermissionError: the nearest existing folder cannot be written.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot save into {directory}: "
                                 + ("it is a file, not a folder" if existing == directory else f"{existing} is a file"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save into {directory}: the folder {existing} is not writable")
    return directory


def write_file_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename; return ``path``.

    The temporary file is opened with mode 0o666, so the umask decides the final permissions as it
    does for ``open(path, "w")``. An interrupted write leaves ``path`` as it was; an exception
    removes the temporary file (a SIGKILL can leave one hidden ``.NAME.cptune-tmp-*`` behind).
    """
    path = Path(path)
    folder = prepare_folder(path.parent)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    tmp = folder / f".{path.name}{_TMP_MARK}{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except PermissionError:
        raise PermissionError(f"cannot save into {folder}: permission denied") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_file_atomic` for UTF-8 text."""
    return write_file_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, sort_keys: bool = False) -> Path:
    """:func:`write_file_atomic` for JSON (indented, with a final newline)."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def save_files(directory: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Write ``{name: bytes}`` into ``directory``, one atomic file each, then the manifest.

    Only the named files and :data:`MANIFEST_NAME` are written; everything else in the folder is
    left as it is. See the module docstring for what an interruption leaves.
    """
    directory = prepare_folder(directory)
    for name in files:
        if name == MANIFEST_NAME or Path(name).name != name:
            raise ValueError(f"{name!r} is not a plain file name cptune may save")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                  for name, data in sorted(files.items())},
    }
    if not (directory / MANIFEST_NAME).is_file() and any((directory / name).exists() for name in files):
        # Files of another tool (or an older cptune) are about to be replaced one by one: from the
        # first rename on, only the complete new set may load.
        write_json_atomic(directory / MANIFEST_NAME, manifest, sort_keys=True)
    for name, data in files.items():
        write_file_atomic(directory / name, data)
    write_json_atomic(directory / MANIFEST_NAME, manifest, sort_keys=True)
    return directory


def check_manifest(directory: str | os.PathLike, reading: Iterable[str] = ()) -> bool:
    """Check ``directory`` against its manifest, if it has one; return whether it has one.

    Every file the manifest lists must be there with its recorded size and SHA-256, and every name
    in ``reading`` (the files the caller is about to read) that exists must be listed.

    Raises:
        IncompleteSaveError: a file is missing, differs, or is not part of the last save.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return False
    hint = (f"a save into {directory} was interrupted or its files were changed since; save it again "
            f"(or, for a folder another tool rewrote, delete {MANIFEST_NAME} to load it without this check)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        listed = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(listed, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IncompleteSaveError(f"{path} is damaged; {hint}") from None
    for name, entry in sorted(listed.items()):
        file = directory / name
        if not file.is_file():
            raise IncompleteSaveError(f"{file} is missing but {MANIFEST_NAME} lists it; {hint}")
        data = file.read_bytes()
        if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise IncompleteSaveError(f"{file} does not match {MANIFEST_NAME}; {hint}")
    for name in reading:
        if name not in listed and (directory / name).exists():
            raise IncompleteSaveError(
                f"{directory / name} is not part of the last save in {directory} ({MANIFEST_NAME} does not list "
                f"it); {hint}"
            )
    return True


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_saved_files(directory: str | os.PathLike) -> bool:
    """Delete what the last save wrote into ``directory``, if it is still exactly that.

    The files the manifest lists and the manifest itself are removed, then the folder if nothing
    else is left in it; anything else stays. A folder without a manifest, or whose files no longer
    match it, is left whole. Returns whether the files were removed.
    """
    directory = Path(directory)
    try:
        if not check_manifest(directory):
            return False
    except IncompleteSaveError:
        return False
    listed = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]
    for name in listed:
        (directory / name).unlink()
    (directory / MANIFEST_NAME).unlink()
    if not any(directory.iterdir()):
        directory.rmdir()
    return True


class AtomicOutput:
    """A temporary sibling of ``path`` to write in pieces, renamed over ``path`` when the block ends.

    For output too large for :func:`write_file_atomic`'s one ``bytes`` (a file annotated batch by
    batch)::

        with AtomicOutput("out.csv") as tmp:
            with open(tmp, "w") as f:
                ...  # write and close the file inside the block

    Entering creates the folder if needed (as :func:`prepare_folder`) and an empty hidden temporary
    file ``.NAME.cptune-tmp-*`` there, with the permissions ``open(path, "w")`` would give. A clean
    exit flushes it to disk and renames it over ``path``; an exception (``KeyboardInterrupt``
    included) removes it and leaves ``path`` as it was. A SIGKILL can leave the temporary file behind.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        folder = prepare_folder(self.path.parent)
        if self.path.is_dir():
            raise IsADirectoryError(f"cannot write {self.path}: it is a folder")
        tmp = folder / f".{self.path.name}{_TMP_MARK}{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except PermissionError:
            raise PermissionError(f"cannot save into {folder}: permission denied") from None
        os.close(fd)
        self.tmp = tmp
        return tmp

    def __exit__(self, exc_type, exc, traceback) -> bool:
        tmp, self.tmp = self.tmp, None
        if tmp is None:
            return False
        if exc_type is not None:
            tmp.unlink(missing_ok=True)
            return False
        try:
            fd = os.open(tmp, os.O_RDWR)  # writable: Windows cannot fsync a read-only descriptor
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_folder(tmp.parent)
        return False
