"""Command line: ``iscam run | table | explain | compact`` (also ``python -m iscam ...``).

    iscam run CONFIG [--set key=value ...] [--out DIR] [--data-root DIR] [--device auto|cpu|cuda]
    iscam table RESULTS [--n-boot 10000] [--paper-model vgg16]
    iscam explain IMAGE --model NAME --method NAME [--N 10] --out overlay.png [--target C]
    iscam compact RESULTS

``CONFIG`` is a name from ``configs/`` (``smoke``, ``quick``, ``mobilenet``, ``paper-vgg16``, ...) or a
YAML path. Multi-GPU: ``torchrun --nproc-per-node K -m iscam run CONFIG``. Exit status: 0 success,
2 bad input (unknown config, wrong data root, bad --set, unreadable image), 130 interrupted (rerun the
same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "explain"]

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
    run.add_argument("--compact", action="store_true", help="merge the parts into results.parquet at the end")

    table = commands.add_parser("table", help="print the paper's tables from a results store, with CIs")
    table.add_argument("results", type=Path, help="results folder written by 'iscam run'")
    table.add_argument("--config", help="select the rows of this config (default: the latest run's, from run.json)")
    table.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override the selecting config, e.g. --set methods.iscam.N=15")
    table.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default 10000)")
    table.add_argument("--seed", type=int, default=0, help="bootstrap seed")
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
    explain.add_argument("--weights", default="default", help="model weights ('default' or a path)")
    explain.add_argument("--data-root", type=Path, help="folder with models/ (default: $ISCAM_DATA)")
    explain.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    explain.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity in [0, 1]")
    explain.add_argument("--seed", type=int, default=0, help="seed for stochastic methods")
    explain.add_argument("--save-saliency", type=Path, metavar="NPY", help="also save the map as a .npy array")

    compact = commands.add_parser("compact", help="merge a store's parts into one results.parquet")
    compact.add_argument("results", type=Path)
    return parser


def _command_run(args: argparse.Namespace) -> int:
    from .experiment import load_config, run

    config = load_config(args.config, args.overrides)
    out = args.out if args.out is not None else Path("results") / config.name
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = run(config, out=out, data_root=args.data_root, device=args.device, progress=not args.no_progress)
    except KeyboardInterrupt:
        command = " ".join(shlex.quote(a) for a in sys.argv[1:]) or f"run {args.config}"
        print(f"\ninterrupted: every finished batch is saved in {out}; resume with: iscam {command}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if rank == 0:
        if args.compact:
            from .store import ResultsStore

            ResultsStore(out).compact()
        print(f"{config.name}: {summary.rows_written} rows computed, {summary.rows_skipped} already present "
              f"-> {out}")
        for label, seconds in summary.seconds_per_image.items():
            print(f"  {label}: {seconds:.3f} s/image")
        if summary.images_skipped:
            print(f"  skipped {len(summary.images_skipped)} unreadable image(s): {', '.join(summary.images_skipped[:10])}")
    return 0


def _command_table(args: argparse.Namespace) -> int:
    from . import tables
    from .experiment import config_from_dict, load_config
    from .store import ResultsStore

    store = ResultsStore(args.results)
    if not store.exists():
        raise _UserError(f"no results in {args.results} (run 'iscam run CONFIG --out {args.results}' first)")
    frame = store.read(curves=False)
    if args.config:
        config = load_config(args.config, args.overrides)
    else:
        provenance = store.provenance()
        config = None
        if provenance is not None:
            config = config_from_dict(provenance["config"])
            if args.overrides:
                from .experiment import apply_overrides

                config = config_from_dict(apply_overrides(provenance["config"], args.overrides))
    selected = tables.select(frame, config) if config is not None else frame
    if selected.empty:
        raise _UserError(f"{args.results} has {len(frame)} rows but none for the selected config; "
                         "pass --config/--set to choose which rows to tabulate")
    titles = {"table_i": "TABLE I. Insertion / Deletion AUC (%)",
              "table_ii": "TABLE II. Average Drop (%) / Increase in Confidence (%)",
              "win": "Win % of IS-CAM (higher is better)",
              "table_iii": "TABLE III. Energy-based pointing game (%)"}
    models = ", ".join(sorted(selected["model"].unique()))
    print(f"results: {args.results}  model(s): {models}  images: {selected['file'].nunique()}  "
          f"95% bootstrap CIs ({args.n_boot} resamples)")
    if config is not None:
        print(f"config: {config.name} ({config.profile or 'no profile'})  metrics: {config.metrics.key}")
    made = tables.all_tables(selected, n_boot=args.n_boot, seed=args.seed, paper_model=args.paper_model)
    for key, table in made.items():
        print()
        print(tables.format_table(table, title=f"{titles[key]}   [{tables.PAPER_SOURCES[key]}]"))
    return 0


def explain(image: str | os.PathLike[str], *, model: str, method: str, out: str | os.PathLike[str],
            N: int | None = None, params: dict | None = None, target: int | None = None,
            weights: str | None = "default", data_root: str | os.PathLike[str] | None = None,
            device: str = "auto", alpha: float = 0.5, seed: int = 0) -> dict:
    """Explain one image file; write the overlay PNG. Returns a dict with ``top5`` (list of
    (class, name, probability)), ``target``, ``saliency`` (``[H, W]`` tensor on the CPU, model input
    frame), ``input`` (the denormalised input ``[3, H, W]``) and ``out``."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from . import methods as iscam_methods
    from . import models as iscam_models
    from .paths import data_root as resolve_root
    from .plots import overlay, save_png

    path = Path(image)
    if not path.is_file():
        raise _UserError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as handle:
            picture = handle.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise _UserError(f"cannot read image {str(path)!r}: {error}") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = iscam_models.load(model, weights, data_root=resolve_root(data_root), device=device)
    x = loaded.preprocess(picture)[None].to(device)
    with torch.no_grad():
        probabilities = torch.softmax(loaded.model(x).float(), dim=1)[0]
    top = torch.topk(probabilities, 5)
    top5 = [(int(c), loaded.categories[int(c)], float(p)) for p, c in zip(top.values, top.indices)]
    chosen = int(top.indices[0]) if target is None else int(target)
    if not 0 <= chosen < probabilities.numel():
        raise _UserError(f"--target must be a class index in [0, {probabilities.numel() - 1}], got {chosen}")
    kwargs = dict(params or {})
    if N is not None:
        kwargs["N"] = N
    torch.manual_seed(seed)
    with iscam_methods.get(method, loaded.model, target_layer=loaded.target_layer, **kwargs) as cam:
        saliency = cam(x, chosen)[0].detach().float().cpu()
    shown = loaded.preprocess.denormalize(x[0].cpu()).clamp(0, 1)
    written = save_png(overlay(shown, saliency, alpha=alpha), out)
    return {"top5": top5, "target": chosen, "saliency": saliency, "input": shown, "out": written}


def _command_explain(args: argparse.Namespace) -> int:
    import numpy as np

    from .experiment import parse_override

    params = {}
    for text in args.params:
        path, value = parse_override(text)
        params[".".join(path)] = value
    result = explain(args.image, model=args.model, method=args.method, out=args.out, N=args.N, params=params,
                     target=args.target, weights=args.weights, data_root=args.data_root, device=args.device,
                     alpha=args.alpha, seed=args.seed)
    print(f"{args.image}: top-5 classes ({args.model})")
    for rank, (index, name, probability) in enumerate(result["top5"], start=1):
        print(f"  {rank}. {index:4d} {name:<30s} {probability:.4f}")
    print(f"explained class {result['target']} with {args.method}: wrote {result['out']}")
    if args.save_saliency is not None:
        np.save(args.save_saliency, result["saliency"].numpy())
    return 0


def _command_compact(args: argparse.Namespace) -> int:
    from .store import ResultsStore

    store = ResultsStore(args.results)
    if not store.exists():
        raise _UserError(f"no results in {args.results}")
    path = store.compact()
    print(f"compacted {args.results} -> {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iscam`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": _command_run, "table": _command_table, "explain": _command_explain,
                "compact": _command_compact}
    from .paths import DataRootError
    from .experiment import ConfigError
    from .store import StoreError
    from .tables import TableError

    user_errors: tuple[type[BaseException], ...] = (_UserError, ConfigError, DataRootError, StoreError, TableError)
    try:
        from .layers import LayerNotFoundError

        user_errors += (LayerNotFoundError,)
    except ImportError:  # pragma: no cover
        pass
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
    except (ValueError, KeyError, FileNotFoundError) as error:
        # Unknown model/method names and bad files surface as these from the library modules.
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"iscam {args.command}: error: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
