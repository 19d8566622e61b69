"""What cptune tells its user while it works, in its own voice: notices, progress bars, warnings.

One mechanism for the Python API and the command line alike:

- notices (where the model runs, the template chosen, the context's size) are ``logging`` records of
  the ``cptune`` logger (:func:`notice`), written to standard error as ``cptune: ...``;
- progress bars (template selection, training, scoring, annotating) are ``tqdm`` bars (:func:`progress`),
  which a notebook renders as widgets; only the outermost one is drawn, and a notice that comes while it is
  drawn is written above it (``tqdm.write``), not into its line;
- warnings about the user's data are ``warnings.warn(..., CptuneWarning)``, shown as one line
  ``cptune: warning: ...`` without the source line.

Silencing: ``logging.getLogger("cptune").setLevel(logging.WARNING)`` turns off notices and bars for the
process; :func:`quiet` (``CPTClassifier(verbose=False)``) for a block of work in this thread or task.

Importing this module installs the defaults (:func:`install`): the logger's level INFO unless one was
set, a standard-error handler unless logging is configured already (the logger or the root logger has a
handler: records then go to those handlers), and the one-line format of :class:`CptuneWarning`. It
imports only the standard library (tqdm when a bar is made), so the command line can report before
torch loads.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from contextvars import ContextVar

LOGGER_NAME = "cptune"
PREFIX = "cptune: "
logger = logging.getLogger(LOGGER_NAME)

_QUIET: ContextVar[bool] = ContextVar("cptune_quiet", default=False)
_BAR_OPEN: ContextVar[bool] = ContextVar("cptune_bar_open", default=False)


class CptuneWarning(UserWarning):
    """A warning about the user's data or settings (e.g. skipped blank rows), shown as one line
    ``cptune: warning: ...``; filter it like any warning (``warnings.simplefilter("ignore", CptuneWarning)``)."""


def showing() -> bool:
    """Whether notices and progress bars are shown here: not inside :func:`quiet`, and the ``cptune``
    logger lets INFO records through."""
    return not _QUIET.get() and logger.isEnabledFor(logging.INFO)


def notice(message: str, *args) -> None:
    """One line for the user (``logging`` INFO on the ``cptune`` logger), unless :func:`quiet` is on."""
    if not _QUIET.get():
        logger.info(message, *args)


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """No notices and no progress bars in this block (for this thread or asyncio task only).

    Args:
        enabled: ``False`` makes the block report as usual (so callers can pass ``not verbose``).
    """
    token = _QUIET.set(_QUIET.get() or enabled)
    try:
        yield
    finally:
        _QUIET.reset(token)


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, delay: float = 0.0,
             enabled: bool = True):
    """A ``tqdm`` bar on standard error, shown when :func:`showing` and no other cptune bar is open
    (a bar inside another's loop, e.g. scoring inside template selection, is not drawn).

    Args:
        total: the number of units (``None``: unknown).
        desc: the bar's label.
        unit: what it counts.
        initial: units already done (a resumed run).
        delay: seconds before the bar appears (quick work then leaves no bar behind).
        enabled: ``False`` never draws it.

    Yields:
        The ``tqdm`` object: call ``update(n)`` and ``set_postfix`` on it.
    """
    from tqdm.auto import tqdm

    shown = enabled and showing() and not _BAR_OPEN.get()
    token = _BAR_OPEN.set(_BAR_OPEN.get() or shown)
    try:
        with tqdm(total=total, desc=desc, unit=unit, initial=initial, delay=delay, disable=not shown,
                  file=sys.stderr) as bar:
            yield bar
    finally:
        _BAR_OPEN.reset(token)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``"1 step"``, ``"2 steps"``: a count with its noun (``nouns``: an irregular plural)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (tests and notebooks swap it); while a cptune bar
    is drawn, through ``tqdm.write``, which takes the bar off its line, writes the record and draws the bar
    again below it (a record written plainly would land after the bar's text, on its line)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not _BAR_OPEN.get():
            super().emit(record)
            return
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - as logging's own handlers: report through handleError, never raise
            self.handleError(record)


def _has_own_handler() -> bool:
    return any(isinstance(h, _StderrHandler) for h in logger.handlers)


def install(handler: bool | None = None) -> None:
    """cptune's defaults: INFO level (unless a level was set), the stderr handler, the warning format.

    Args:
        handler: ``True`` adds the ``cptune: ...`` handler whatever is configured (the command line);
            ``None`` (on import) adds it only when neither the ``cptune`` logger nor the root logger
            has a handler yet.
    """
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    configured = bool(logger.handlers) or bool(logging.getLogger().handlers)
    if not _has_own_handler() and (handler or (handler is None and not configured)):
        own = _StderrHandler()
        own.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
        own.addFilter(lambda record: not _QUIET.get())  # also the records of cptune.cpt's own loggers
        logger.addHandler(own)
    if not getattr(warnings.formatwarning, "_cptune", False):
        warnings.formatwarning = _one_line_format(warnings.formatwarning)


def _one_line_format(previous):
    def formatwarning(message, category, filename, lineno, line=None):
        if isinstance(category, type) and issubclass(category, CptuneWarning):
            return f"{PREFIX}warning: {message}\n"
        return previous(message, category, filename, lineno, line)

    formatwarning._cptune = True
    return formatwarning


install()
