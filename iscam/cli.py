"""Command line: ``iscam run | table | claims | explain | compact`` (also ``python -m iscam ...``).

    iscam run CONFIG [--set key=value ...] [--out DIR] [--data-root DIR] [--device auto|cpu|cuda] [--only ...]
    iscam table RESULTS [--config NAME] [--set key=value ...] [--n-boot 10000] [--paper-model vgg16]
    iscam claims RESULTS [--config NAME] [--set key=value ...] [--n-boot 10000] [--seed 0] [--margin 1.0]
    iscam explain IMAGE --model NAME --method NAME [--N 10] --out overlay.png [--target C] [--seed S]
    iscam compact RESULTS

``CONFIG`` is a shipped config (``smoke``, ``quick``, ``mobilenet``, ``paper-vgg16``, ...) or a YAML path.
Multi-GPU: ``torchrun --nproc-per-node K -m iscam run CONFIG``. ``table`` and ``claims`` read the rows of one
config (the latest run's, or ``--config`` / ``--set``) on the images it selects, paired: the images every
compared method has; an incomplete store is flagged with the command that completes it, and the other
setups a store holds (layers, precisions, ...) are listed with the command that tabulates them.
Exit status: 0 success, 2 bad input (unknown config, wrong data root, bad --set or parameter, bad manifest,
unreadable image, stale rows, rows the store lacks, a busy or unwritable store), 130 interrupted (rerun the
same command to resume). A user's mistake is one line, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from .config import ExperimentConfig
    from .tables import Selection

__all__ = ["build_parser", "main"]

log = logging.getLogger("iscam.cli")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iscam", description="IS-CAM paper companion: run experiments, "
                                     "print the paper's tables, explain one image.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run or resume an experiment config",
                              description="Compute every (image, method, params) row the results store lacks.")
    run.add_argument("config", help="config name in configs/ (smoke, quick, mobilenet, paper-vgg16, ...) or a YAML path")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field (dotted key, YAML value), e.g. --set methods.iscam.N=15; repeatable")
    run.add_argument("--out", type=Path, help="results folder (default: results/<config name>)")
    run.add_argument("--data-root", type=Path, help="folder with models/ and the images (default: $ISCAM_DATA)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the config's device")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--compact", action="store_true", help="merge the parts into one file per table at the end")
    run.add_argument("--only", metavar="NAMES", help="run only these studies, comma-separated: base (the paper's "
                     "tables), a variant of the config (n_sweep, protocol, ...), figures")
    run.add_argument("--recompute-stale", action="store_true",
                     help="recompute stored rows computed by other code or weights (otherwise the run stops)")
    run.add_argument("--no-wait", action="store_true",
                     help="fail at once if another run is writing to --out (default: wait for it)")

    table = commands.add_parser("table", help="print the paper's tables from a results store, with CIs")
    table.add_argument("results", type=Path, help="results folder written by 'iscam run'")
    table.add_argument("--config", help="select the rows of this config (default: the latest run's, from run.json)")
    table.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override the selecting config, e.g. --set methods.iscam.N=15")
    table.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    table.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    table.add_argument("--data-root", type=Path, help="where the manifest is, when the store's records do not "
                       "list the images of the selected config (default: $ISCAM_DATA)")
    table.add_argument("--paper-model", help="compare with the paper's column for this CNN (default: same "
                       "model when the paper has it, else vgg16)")

    explain = commands.add_parser("explain", help="explain one image: heat-map overlay PNG and top-5 classes")
    explain.add_argument("image", type=Path)
    explain.add_argument("--model", required=True, help="model name (e.g. mobilenet_v2_coral, vgg16)")
    explain.add_argument("--method", required=True, help="gradcam, gradcampp, smoothgradcampp, scorecam, sscam, iscam, random")
    explain.add_argument("--N", type=int, help="integration steps / noise samples of the method (iscam, sscam, ...)")
    explain.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                         help="another method parameter (YAML value), e.g. --param schedule=paper; repeatable")
    explain.add_argument("--out", type=Path, required=True, help="PNG to write")
    explain.add_argument("--target", type=int, help="class to explain (default: the top-1 prediction)")
    explain.add_argument("--weights", default="default",
                         help="model weights: 'default', a named set (e.g. deepcompression) or a file")
    explain.add_argument("--target-layer", help="layer to explain (default: the model's, e.g. features.29)")
    explain.add_argument("--data-root", type=Path, help="folder with models/ (default: $ISCAM_DATA)")
    explain.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    explain.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity in [0, 1]")
    explain.add_argument("--seed", type=int, default=0, help="seed for stochastic methods")
    explain.add_argument("--save-saliency", type=Path, metavar="NPY", help="also save the map as a .npy array")

    claims = commands.add_parser(
        "claims", help="judge the paper's claims on a results store (paired bootstrap)",
        description="Check each quantitative claim of the paper on the rows of one config, paired by image; "
        "the whole store serves as the N sweep.")
    claims.add_argument("results", type=Path, help="results folder written by 'iscam run'")
    claims.add_argument("--config",
                        help="select the rows of this config (default: the latest run's, from run.json)")
    claims.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the selecting config, e.g. --set methods.iscam.N=15")
    claims.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    claims.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    claims.add_argument("--margin", type=float, help="equivalence margin of the 'close to' / 'ties' claims, "
                        "in percentage points (default: each claim's, 1 point)")
    claims.add_argument("--data-root", type=Path, help="where the manifest is, when the store's records do "
                        "not list the images of the selected config (default: $ISCAM_DATA)")

    compact = commands.add_parser("compact", help="merge a store's parts into one results.parquet")
    compact.add_argument("results", type=Path)
    return parser


def _command_line(args: argparse.Namespace) -> str:
    return "iscam " + " ".join(shlex.quote(a) for a in args.argv)


def _command_run(args: argparse.Namespace) -> int:
    from .config import default_output, load_config
    from .runner import describe, run

    config = load_config(args.config, args.overrides)
    out = args.out if args.out is not None else default_output(config)
    rank = int(os.environ.get("RANK", "0"))
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    command = _command_line(args)
    try:
        summary = run(config, out=out, data_root=args.data_root, device=args.device, progress=not args.no_progress,
                      only=only, recompute_stale=args.recompute_stale, wait=not args.no_wait, command=command)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished batch is saved in {out}; resume with: {command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if rank == 0:
        if args.compact:
            from .store import ResultsStore

            ResultsStore(out).compact()
        lines = describe(summary)
        print(f"{config.name}: {lines[0]}")
        for line in lines[1:]:
            print(line)
    return 0


def _table_config(args: argparse.Namespace, record: dict | None,
                  extra: Sequence[str] = ()) -> ExperimentConfig:
    from .config import apply_overrides, config_from_dict, load_config

    overrides = [*args.overrides, *extra]
    if args.config:
        return load_config(args.config, overrides)
    if record is None:
        raise _UserError(f"{args.results} has no run.json saying which config made it: pass --config NAME")
    return config_from_dict(apply_overrides(record["config"], overrides))


def _run_command(args: argparse.Namespace, record: dict | None, extra: Sequence[str] = ()) -> str:
    """The ``iscam run`` command that computes the base rows ``iscam table``/``claims`` read with ``args``:
    the latest run's command (or ``--config``), with ``--out`` the folder read now, the reader's ``--set`` s
    and ``--only base`` (the rows the tables are made of) in place of the run's ``--only``."""
    if args.config:
        words = ["iscam", "run", args.config]
    elif record is not None and isinstance(record.get("command"), str):
        words = shlex.split(record["command"])
    else:  # a store written before run.json kept the command
        words = ["iscam", "run", str((record or {}).get("config", {}).get("name", "CONFIG"))]
    kept: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("--out", "--only"):
            skip = True
        elif not word.startswith(("--out=", "--only=")):
            kept.append(word)
    for override in (*args.overrides, *extra):
        kept += ["--set", override]
    return shlex.join([*kept, "--out", str(args.results), "--only", "base"])


def _table_command(args: argparse.Namespace, extra: Sequence[str]) -> str:
    """The ``iscam table``/``claims`` command of ``args`` with the overrides ``extra`` added."""
    words = ["iscam", args.command, str(args.results)]
    if args.config:
        words += ["--config", args.config]
    for override in (*args.overrides, *extra):
        words += ["--set", override]
    return shlex.join(words)


@dataclass(frozen=True)
class _Read:
    """What ``iscam table`` and ``iscam claims`` read: the config, its base rows paired, the whole store."""

    config: ExperimentConfig
    chosen: Selection  # the config's base rows on its images, paired
    frame: pd.DataFrame  # every row of the store (no curves, no maps)
    record: dict | None  # run.json
    files: int  # how many images the config selects


def _read_selection(args: argparse.Namespace, extra: Sequence[str] = (), frame: pd.DataFrame | None = None,
                    record: dict | None = None) -> _Read:
    """The base rows of the selected config (``args`` plus the overrides ``extra``) on the images it selects,
    paired (:func:`iscam.tables.selection`); ``frame``/``record``: the store as already read."""
    from . import tables
    from .runner import planned_studies
    from .store import ResultsStore

    store = ResultsStore(args.results)
    if frame is None:
        if not store.exists():
            raise _UserError(f"no results in {args.results} "
                             f"(run 'iscam run CONFIG --out {args.results}' first)")
        record = store.provenance()
        frame = store.read(curves=False, maps=False)
    config = _table_config(args, record, extra)
    (base,) = planned_studies(config, store, data_root=args.data_root, only=["base"])
    chosen = tables.selection(frame, base.study.config, base.files, command=_run_command(args, record, extra))
    if len(base.files) and not chosen.images:
        raise _UserError(f"no image of the {len(base.files)} that config {config.name!r} selects has rows of "
                         f"every method: {chosen.notice()}")
    return _Read(config, chosen, frame, record, len(base.files))


#: The ``--set`` key of each setup column a store may hold several values of, for one model.
_SETUP_KEYS = {"layer": "model.target_layer", "precision": "precision", "weights": "model.weights",
               "resize": "model.resize"}


def _setup_value(column: str, value: str) -> str:
    return "null" if column == "weights" and value == "none" else value


def _other_setups(args: argparse.Namespace, read: _Read) -> list[str]:
    """A line for each other setup (layer, precision, weights, preprocessing) of the tabulated model that the
    store holds, with the command that tabulates it -- tried here, so the command shown works."""
    from .tables import TableError

    frame = read.frame
    shown = read.chosen.frame
    if shown.empty:
        return []
    current = {c: str(shown[c].iloc[0]) for c in _SETUP_KEYS}
    rows = frame[frame["model"] == shown["model"].iloc[0]]
    lines = []
    for values, group in rows.groupby(list(_SETUP_KEYS), sort=True):
        setup = dict(zip(_SETUP_KEYS, map(str, values)))
        if setup == current:
            continue
        extra = [f"{_SETUP_KEYS[c]}={_setup_value(c, v)}" for c, v in setup.items() if v != current[c]]
        what = ", ".join(f"{c} {v}" for c, v in setup.items() if v != current[c])
        try:
            other = _read_selection(args, extra, frame=frame, record=read.record)
        except (_UserError, TableError, ValueError, OSError):
            lines.append(f"also in the store: {len(group)} rows with {what} "
                         "(not every method of this config)")
            continue
        lines.append(f"also in the store: {len(group)} rows with {what}; read them with: "
                     f"{_table_command(args, extra)}" + ("" if other.chosen.complete else " (incomplete)"))
    return lines


def _print_header(args: argparse.Namespace, read: _Read, note: str) -> None:
    from .models import default_target_layer

    config, chosen = read.config, read.chosen
    models = ", ".join(sorted(chosen.frame["model"].unique()))
    print(f"results: {args.results}  model(s): {models}  images: {chosen.images} of the {read.files} the "
          f"config selects  {note}")
    layer = config.model.target_layer or default_target_layer(config.model.name)
    print(f"config: {config.name} ({config.profile or 'no profile'})  layer: {layer}  "
          f"precision: {config.precision}  metrics: {config.metrics.key}")
    for line in _other_setups(args, read):
        print(line)
    status = (read.record or {}).get("status")
    if status == "running":
        print(f"NOTE: a run on this store is in progress or was killed (run.json says 'running', pid "
              f"{read.record.get('pid')})")
    elif status in ("failed", "interrupted"):
        print(f"NOTE: the latest run on this store {status} ({read.record.get('error', 'no reason recorded')}); "
              "its finished rows are kept, rerun its command to complete it")
    if not chosen.complete:
        print(chosen.notice())


def _command_table(args: argparse.Namespace) -> int:
    from . import tables

    read = _read_selection(args)
    _print_header(args, read, f"95% bootstrap CIs ({args.n_boot} resamples)")
    titles = {"table_i": "TABLE I. Insertion / Deletion AUC (%)",
              "table_ii": "TABLE II. Average Drop (%) / Increase in Confidence (%)",
              "win": "Win % of IS-CAM (higher is better)",
              "table_iii": "TABLE III. Energy-based pointing game (%)"}
    made = tables.all_tables(read.chosen.frame, n_boot=args.n_boot, seed=args.seed,
                             paper_model=args.paper_model)
    for key, table in made.items():
        print()
        print(tables.format_table(table, title=f"{titles[key]}   [{tables.PAPER_SOURCES[key]}]"))
    return 0


def _command_claims(args: argparse.Namespace) -> int:
    from . import claims
    from .book import ProfileRun, sanity_flags, sweep_inputs
    from .runner import planned_studies
    from .store import ResultsStore

    read = _read_selection(args)
    _print_header(args, read, f"paired 95% bootstrap intervals ({args.n_boot} resamples)")
    # the same inputs as the book's claims chapter: map similarity of the N sweep, the sanity checks' flags
    store = ResultsStore(args.results)
    run = ProfileRun(read.config.name, read.config, store,
                     planned_studies(read.config, store, data_root=args.data_root), False,
                     _run_command(args, read.record).removesuffix(" --only base"))
    _, similarity = sweep_inputs(run)
    judged = claims.evaluate(read.chosen.frame, sweep=read.frame, similarity=similarity,
                             flags=sanity_flags([run]) or None, n_boot=args.n_boot, seed=args.seed,
                             margin=args.margin)
    print()
    print(claims.format_claims(judged))
    return 0


def _command_explain(args: argparse.Namespace) -> int:
    from .config import parse_override
    from .explain import explain

    params = {}
    for text in args.params:
        path, value = parse_override(text)
        params[".".join(path)] = value
    result = explain(args.image, model=args.model, method=args.method, out=args.out, N=args.N, params=params,
                     target=args.target, weights=args.weights, data_root=args.data_root, device=args.device,
                     alpha=args.alpha, seed=args.seed, target_layer=args.target_layer,
                     saliency_out=args.save_saliency)
    print(f"{args.image}: top-5 classes ({args.model})")
    for rank, (index, name, probability) in enumerate(result.top5, start=1):
        print(f"  {rank}. {index:4d} {name:<30s} {probability:.4f}")
    print(f"explained class {result.target} with {args.method}: wrote {result.out}")
    if args.save_saliency is not None:
        height, width = result.saliency.shape
        print(f"saved the map ({height}x{width}) to {args.save_saliency}")
    return 0


def _command_compact(args: argparse.Namespace) -> int:
    from .store import ResultsStore

    store = ResultsStore(args.results)
    if not store.exists():
        raise _UserError(f"no results in {args.results}")
    written = store.compact()
    print(f"compacted {args.results}: " + ", ".join(p.name for p in written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iscam`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": _command_run, "table": _command_table, "claims": _command_claims,
                "explain": _command_explain, "compact": _command_compact}
    from .claims import ClaimError
    from .config import ConfigError
    from .data import DataSourceError, ManifestError, UnreadableImageError
    from .explain import ExplainError
    from .layers import LayerNotFoundError
    from .models import WeightsUnavailableError
    from .paths import DataRootError
    from .store import StoreError
    from .tables import TableError

    user_errors: tuple[type[BaseException], ...] = (
        _UserError, ConfigError, DataRootError, StoreError, TableError, ExplainError, LayerNotFoundError,
        ClaimError, ManifestError, DataSourceError, UnreadableImageError, WeightsUnavailableError)
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors as error:
        if args.debug:
            raise
        print(f"iscam {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, KeyError, OSError) as error:
        # Unknown model/method names, bad files, unwritable folders surface as these from the library modules.
        if args.debug:
            raise
        if isinstance(error, KeyError) and error.args:
            message: object = error.args[0]
        elif isinstance(error, OSError) and error.strerror and error.filename is None:
            message = error.strerror  # OSError(errno, "cannot write PATH: reason"): without "[Errno n]"
        else:
            message = error
        print(f"iscam {args.command}: error: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
