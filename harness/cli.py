"""`dmlh` command line: run | study | report | table | bench | list | data.

Every subcommand is a thin shell over a library function; user errors (HarnessError) print a clear
message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from harness import logs
from harness.errors import HarnessError, Interrupted

log = logging.getLogger("harness")


def _cmd_run(args: argparse.Namespace) -> None:
    from harness import config, distributed, train
    from harness.rundir import claimed, format_metrics, write_run
    from harness.tracking import Tracking
    from harness.tracking import parse as parse_track

    cfg = config.load(args.config, args.overrides)
    if args.name:  # the run's name: its folder, its log lines and its saved config say the same
        cfg.name = args.name
    out = Path(args.results) / "runs" / cfg.name
    tracking = Tracking(parse_track(args.track, args.results))  # a missing client fails before training
    if distributed.env_rank() != 0:  # a torchrun rank other than 0: rank 0 claims and writes the run
        train.run(cfg)
        return
    with claimed(out, args.overwrite):
        result = train.run(cfg)
        write_run(result, out, save_checkpoint=cfg.train.save_checkpoint)
    tracking.log_run(out, out.name, {"run": out.name})
    print(format_metrics(result))
    print(f"run written to {out}")


def _cmd_list(args: argparse.Namespace) -> None:
    from harness import registry

    kinds = [args.kind] if args.kind else None
    if args.kind and args.kind not in registry.kinds():
        raise HarnessError(f"unknown kind {args.kind!r} (kinds: {', '.join(registry.kinds())})")
    print(registry.describe(kinds))


def _cmd_data_check(args: argparse.Namespace) -> None:
    from harness.data import check_dataset

    train_classes = None
    if args.train_classes is not None:
        from harness.config import parse_yaml

        text = args.train_classes.strip()
        if "," in text and not text.startswith("["):
            text = f"[{text}]"
        train_classes = parse_yaml(text)
    print(
        check_dataset(args.name, args.root, args.workers, train_classes=train_classes, min_side=args.min_side)
    )


def _cmd_study_run(args: argparse.Namespace) -> None:
    from harness import study

    incomplete = None
    try:
        out = study.run_study(
            _study_yaml(args.study),
            storage=args.storage,
            workers=args.workers,
            gpus=args.gpus,
            trials_per_gpu=args.trials_per_gpu,
            gpus_per_trial=args.gpus_per_trial,
            name=args.name,
            results=args.results,
            overrides=args.overrides,
            protocol=args.protocol,
            track=args.track,
        )
    except study.StudyIncompleteError as e:  # the report is written: show it, then fail with the reason
        out, incomplete = e.report, e
    if out is not None:
        comparison = out / "tables" / "comparison.md"
        if comparison.is_file():
            print(f"\n{comparison.read_text()}")
        print(f"tables: {out / 'tables'}\nplots: {out / 'plots'}\noverview: {out / 'report.md'}")
        if (out / "report.html").is_file():
            print(f"report (tables and figures on one page): {out / 'report.html'}")
    if incomplete is not None:
        raise incomplete


def _study_yaml(name_or_yaml: str) -> str:
    """The study file a command names by its path or by its name (``studies/<name>.yaml``)."""
    if Path(name_or_yaml).is_file():
        return name_or_yaml
    found = Path("studies") / f"{name_or_yaml}.yaml"
    if found.is_file():
        return str(found)
    raise HarnessError(f"{name_or_yaml}: no such study file (nor {found})")


def _study_name(name_or_yaml: str) -> str:
    """A study's name, given as such or as the study YAML `dmlh study run` took."""
    path = Path(name_or_yaml)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from harness.config import load_yaml

        return str(load_yaml(path).get("name") or path.stem)
    return name_or_yaml


def _cmd_study_status(args: argparse.Namespace) -> None:
    from harness.reporting.status import status

    print(status(_study_name(args.name), storage=args.storage, results=args.results))


def _cmd_report(args: argparse.Namespace) -> None:
    from harness import report

    name = _study_name(args.name)
    out = report.write_report(name, storage=args.storage, results=args.results, baseline=args.baseline)
    print(f"tables and plots written to {out}")


def _cmd_table(args: argparse.Namespace) -> None:
    from harness.reporting.combined import write_combined

    out, text = write_combined(args.file, storage=args.storage, results=args.results, out=args.out)
    print(f"{text}\ntable written to {out} (.md, .csv, .tex, _wide.tex, .html)")


def _cmd_bench(args: argparse.Namespace) -> None:
    from harness import bench

    bench.main(args.what, args.options)


def build_parser() -> argparse.ArgumentParser:
    """The `dmlh` parser: global options, then one helper per subcommand (group)."""
    p = argparse.ArgumentParser(
        prog="dmlh", description="Deep metric learning benchmarking and ablation harness"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--results", default="results", help="results folder (default: ./results)")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_command(sub)
    _add_list_command(sub)
    _add_data_commands(sub)
    _add_study_commands(sub)
    _add_report_command(sub)
    _add_table_command(sub)
    _add_bench_command(sub)
    return p


def _add_run_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dmlh run CONFIG [overrides]`: train and evaluate one config."""
    r = sub.add_parser("run", help="train and evaluate one config")
    r.add_argument("config", help="RunConfig YAML")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.margin=0.1 train.epochs=3")
    r.add_argument("--name", help="the run's name: its folder and its log lines (default: the config's name)")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier run of that name")
    _add_track_option(r)
    r.set_defaults(func=_cmd_run)


def _add_track_option(parser: argparse.ArgumentParser) -> None:
    """``--track`` (repeatable) of `dmlh run` and `dmlh study run` (``harness.tracking``)."""
    parser.add_argument(
        "--track",
        action="append",
        metavar="TRACKER",
        help="log runs to an experiment tracker: mlflow[:URI], tensorboard[:DIR] (default DIR: "
        "<results>/tensorboard) or wandb[:PROJECT]; repeat for several (needs pip install "
        "'dml-harness[mlflow]' etc.; a study's --track replaces its track:)",
    )


def _add_list_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dmlh list [KIND]`: the registered components."""
    ls = sub.add_parser("list", help="list registered components with their parameters")
    ls.add_argument("kind", nargs="?", help="only this kind (loss, miner, backbone, ...)")
    ls.set_defaults(func=_cmd_list)


def _add_data_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dmlh data check NAME`: dataset tools."""
    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser(
        "check",
        help="decode every image of a dataset folder: images and classes per split, or the bad files",
        description="Check a dataset folder: decode every image, then print the images and classes per "
        "split, or each bad file with the reason (exit code 2).",
    )
    dc.add_argument("name")
    dc.add_argument("--root", default=None)
    dc.add_argument("--workers", type=int, default=None, help="decoding threads (default: all CPUs)")
    dc.add_argument(
        "--train-classes",
        default=None,
        metavar="N|LIST",
        help="the dataset's train_classes split parameter, as data.dataset.train_classes of a run config "
        "(cub200 50: class ids 1..50 train; digits 0,1,2: those classes train)",
    )
    dc.add_argument(
        "--min-side",
        type=int,
        default=8,
        metavar="PX",
        help="an image with a side shorter than PX pixels is bad, as data.min_side (default 8)",
    )
    dc.set_defaults(func=_cmd_data_check)


def _add_study_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dmlh study run STUDY [overrides]` and `dmlh study status NAME`: Optuna studies."""
    s = sub.add_parser("study", help="Optuna studies")
    ssub = s.add_subparsers(dest="study_command", required=True)
    sr = ssub.add_parser("run", help="run (or resume) a study")
    sr.add_argument("study", help="the study's YAML, or its name (studies/<name>.yaml)")
    sr.add_argument(
        "overrides", nargs="*", help="dotted overrides of the study YAML, e.g. base.train.epochs=1"
    )
    sr.add_argument(
        "--storage", default=None, help="Optuna storage URL (default: journal file in results/<study>/)"
    )
    sr.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help="worker processes on this machine: a number, or auto (default): one per visible GPU "
        "(× --trials-per-gpu), 1 without a GPU",
    )
    sr.add_argument(
        "--gpus", default=None, help="device indices to use, e.g. 0,2,5 (default: every visible GPU)"
    )
    sr.add_argument(
        "--trials-per-gpu", type=int, default=1, help="workers sharing one GPU (small trials; default 1)"
    )
    sr.add_argument(
        "--gpus-per-trial",
        type=int,
        default=1,
        help="GPUs of one trial, trained with DDP (train.distributed.world_size; default 1)",
    )
    sr.add_argument("--name", default=None, help="study name (default: from the YAML)")
    sr.add_argument(
        "--protocol",
        choices=["fair", "literature", "both"],
        default=None,
        help="fair (tuned on validation classes), literature (the paper's recipe) or both (default: the "
        "study file's protocol)",
    )
    _add_track_option(sr)
    sr.set_defaults(func=_cmd_study_run)
    ss = ssub.add_parser("status", help="counts by state, best arms, time spent")
    ss.add_argument("name", help="the study's name or its YAML")
    ss.add_argument("--storage", default=None)
    ss.set_defaults(func=_cmd_study_status)

    def _cmd_study_check(args: argparse.Namespace) -> None:
        from harness.study.recipe import cmd_check

        args.studies = [a if "=" in a else _study_yaml(a) for a in args.studies]
        cmd_check(args)

    sc = ssub.add_parser(
        "check",
        help="validate study files (every arm's config, a paper study's recipe) without loading data",
        description="Validate study files without loading data: every arm's config, and a paper study's "
        "recipe against the literature config of every arm.",
    )
    sc.add_argument(
        "studies", nargs="+", help="study YAML files or names, then dotted overrides (base.seed=1)"
    )
    sc.set_defaults(func=_cmd_study_check)


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto (got {text!r})") from None


def _add_report_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dmlh report NAME`: the tables and plots of a study."""
    rp = sub.add_parser("report", help="write comparison tables and plots of a study")
    rp.add_argument("name", help="the study's name or its YAML")
    rp.add_argument("--storage", default=None)
    rp.add_argument("--baseline", default=None, help="baseline arm for the ablation tables")
    rp.set_defaults(func=_cmd_report)


def _add_table_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dmlh table FILE.yaml`: one methods × datasets table across studies."""
    t = sub.add_parser(
        "table",
        help="one methods x datasets table across studies (Markdown, CSV, LaTeX, HTML) from a table file "
        "such as studies/tables/seed_papers.yaml",
    )
    t.add_argument("file", help="table YAML: studies, methods (row label: arm), datasets, metrics, protocols")
    t.add_argument("--storage", default=None, help="Optuna storage URL of the studies (default: journals)")
    t.add_argument("--out", default=None, help="output folder (default: <results>/tables/<table name>)")
    t.set_defaults(func=_cmd_table)


def _add_bench_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`dmlh bench WHAT [options]`: the options, --help included, go to the benchmark's own parser."""
    from harness.bench import BENCHES

    b = sub.add_parser("bench", help="speed benchmarks against reference implementations")
    bsub = b.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what, (_, text) in BENCHES.items():
        # no arguments here: `main` hands everything after WHAT, --help included, to the benchmark's parser
        bsub.add_parser(what, help=text, add_help=False)
    b.set_defaults(func=_cmd_bench)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":  # `dmlh bench WHAT ...`: the rest, in order, is the benchmark's to parse
        args.options, extra = extra, []
    # dotted overrides may also follow the options: `dmlh study run S.yaml --workers 2 base.train.epochs=1`
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) < len(extra) or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    repeats = logs.setup(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.func(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dmlh list | head`: the reader left; exit quietly like other tools
        # Python would report the failed flush of stdout at exit: point stdout at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # the journal and run folders are written all-or-nothing (harness.journal, harness.rundir)
        where = e.filename or "the results folder"
        print(
            f"error: disk full writing {where}: nothing finished was lost; free space and rerun",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:
        stored = (
            f"{e.finished} of {e.total} runs are finished and"
            if isinstance(e, Interrupted)
            else "every finished run is"
        )
        print(f"interrupted: {stored} stored; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        repeats.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
