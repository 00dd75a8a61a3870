"""Optuna studies: a study YAML → arms × (tune trials, final seeds, literature seeds) → results store.

A study has a ``base`` RunConfig, ``arms`` (the factors the tables report; their product is enumerated),
an optional ``tune`` stage (nuisance hyperparameters searched per arm with an equal budget, on validation
classes) and a ``final`` stage (the best config of each arm rerun with every seed; its test metrics are
what reports show); a paper study may add the ``literature`` protocol (the paper's fixed recipe on every
training class). Nothing is ever selected on test classes.

Coordination goes through the Optuna storage only, so any number of worker processes on any number of
machines can share a study. The parts, one job each:

- ``spec``: the YAML sections, their validation, arms and units of work;
- ``space``/``labels``: the tune search space, and readable arm labels;
- ``queue``: the Optuna work queue (claim, heartbeat, reap dead workers, re-queue); knows no training;
- ``objective``: one claimed unit → RunConfig → ``train.run`` → trial values and run record;
- ``runner``: worker processes, progress, ``run_study``.
"""

from harness.study.runner import StudyIncompleteError, run_study
from harness.study.spec import Arm, StudySpec, Unit, load_study, parse_study

__all__ = ["Arm", "StudyIncompleteError", "StudySpec", "Unit", "load_study", "parse_study", "run_study"]
