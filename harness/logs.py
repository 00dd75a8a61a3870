"""How every `dmlh` process logs, in one place: the format, third-party loggers kept at WARNING, each
repeated warning shown once (with its count at the end), and progress bars only on a terminal.

A study or a report used to bury its own lines under third-party INFO lines (fontTools logged every font it
subset for a PDF, faiss which CPU build it loaded, Optuna every study it created) and repeated one warning
per trial; tqdm's bars wrote carriage returns into redirected logs.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Third-party loggers that log at INFO what a user never needs (kept at WARNING unless ``dmlh -v``).
THIRD_PARTY = ("fontTools", "matplotlib", "PIL", "faiss", "optuna", "mlflow", "alembic", "wandb")

T = TypeVar("T")


class RepeatedWarnings(logging.Filter):
    """A handler filter that lets the first of identical warnings (same logger, level and text) through and
    counts the others; ``summary`` logs each repeated one once more with its count."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, int, str]] = Counter()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        with self._lock:
            self.counts[key] += 1
            return self.counts[key] == 1

    def summary(self) -> None:
        """Log every warning that was repeated, with how many times it came in all; then start counting
        anew."""
        with self._lock:
            repeated = [(key, n) for key, n in self.counts.items() if n > 1]
            self.counts.clear()
        for (name, level, message), n in repeated:
            logging.getLogger(name).log(level, "%s [this warning came %d times; shown once]", message, n)


#: The filter of the handler ``setup`` installs (one per process).
_REPEATS = RepeatedWarnings()


def setup(level: int = logging.INFO) -> RepeatedWarnings:
    """Configure this process's logging (the `dmlh` command, a study's worker process, a DDP rank): a stderr
    handler at ``level`` with the harness's format and the repeated-warning filter, unless the process has
    handlers already (as ``logging.basicConfig``: an application embedding the harness, pytest); third-party
    loggers at WARNING unless ``level`` is DEBUG. Returns the filter, whose ``summary`` the command calls at
    its end."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_REPEATS)
        root.addHandler(handler)
        root.setLevel(level)
    quiet = level > logging.DEBUG
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    _optuna_through_root(logging.WARNING if quiet else level)
    return _REPEATS


def _optuna_through_root(level: int) -> None:
    """Optuna logs through a handler of its own at INFO (set on import, so a level set before it is lost):
    send its records to the root handler instead, at ``level``."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(level)


def progress_bar(iterable: Iterable[T] | None = None, *, show: bool = True, **kwargs: Any) -> tqdm[T]:
    """A tqdm bar, shown only when ``show`` and stderr is a terminal (tqdm's ``disable=None``): a redirected
    log gets no carriage returns. Every progress bar of the harness is made here."""
    return tqdm(iterable, disable=None if show else True, **kwargs)
