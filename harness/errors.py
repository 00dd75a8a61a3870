"""Named exceptions for user errors: each says what is wrong and where."""

from __future__ import annotations


class HarnessError(Exception):
    """Base class of every error dml-harness raises for bad input."""


class ConfigError(HarnessError):
    """A config (YAML or overrides) is invalid; the message lists every problem with its path."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


class UnknownComponentError(ConfigError):
    """A component name that is not registered for its kind."""


class DatasetError(HarnessError):
    """A dataset folder is missing or malformed; the message says exactly which file and how to fix it."""


class TrainingError(HarnessError):
    """Training cannot go on (NaN/Inf loss, empty split...)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or Inf."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a study, with how many of its units were finished and stored by then."""

    def __init__(self, finished: int, total: int):
        self.finished, self.total = finished, total
        super().__init__(f"{finished} of {total} runs are finished and stored")
