"""The GPU results job: one command computes the GPU profiles' stores and packs them to bring back.

    python book/gpu_results.py --out gpu-results            # what `make gpu-results OUT=gpu-results` runs
    make book RESULTS=gpu-results                           # then, on any CPU machine: render the book

For each profile (default: ``mobilenet``, ``squeezenet``, ``squeezenet11``, every chapter's variants
included) the job first measures what one image costs on this device (a calibration run on
``--calibrate`` images, whose rows are kept: they are the first images of the real run), then chooses the
number of images so that all profiles together fit the ``--budget`` (seconds of compute, default 480 =
8 minutes), prints the counts, runs each profile on them and packs its compacted store into
``<out>/<profile>.tar`` (rows, traces, images, sanity; ``run.json``, ``runs.jsonl``): one file per profile
plus ``<out>/job.json`` -- at most 8 files, each checked to be at most 16 MiB. A store brought back this way
can be committed as a published store (``published/<profile>/``, unpacked), which every ``make book``
renders beside its local profile.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROFILES = ("mobilenet", "squeezenet", "squeezenet11")
MAX_FILES = 8
MAX_BYTES = 16 * 2**20


class JobError(RuntimeError):
    """The job cannot run or its output would break the limits; the message says what to change."""


def _variant_overrides(config, images: int) -> list[str]:
    """Overrides that cap every variant (and the figures) of ``config`` at ``images`` images."""
    changes = [f"data.num_images={images}"]
    for variant in config.variants:
        changes.append(f"variants.{variant.name}.images={min(images, variant.images or images)}")
    if config.figures is not None:
        changes.append(f"figures.images={min(images, config.figures.images)}")
    return changes


def _timed_run(name: str, changes: Sequence[str], out: Path, *, device: str, data_root: str | None) -> float:
    """Run profile ``name`` with ``changes`` into ``out``; seconds spent computing rows (model load excluded)."""
    from iscam.config import load_config
    from iscam.runner import run

    config = load_config(name, list(changes))
    command = f"iscam run {name} --out {out}" + "".join(f" --set {c}" for c in changes)
    summary = run(config, out=out, device=device, data_root=data_root, progress=False, command=command)
    return sum(cost["seconds"] * cost["images"] for cost in summary.cost.values())


def choose_images(per_image: dict[str, float], budget: float, *, limits: dict[str, int]) -> dict[str, int]:
    """Images per profile: the budget shared equally, each share divided by the profile's measured seconds per
    image (at least 1, at most the profile's own number of images)."""
    share = budget / max(1, len(per_image))
    return {name: max(1, min(limits[name], math.floor(share / max(seconds, 1e-9))))
            for name, seconds in per_image.items()}


def pack(store_folder: Path, target: Path) -> Path:
    """Compact ``store_folder`` and write its files (not the lock, not temporary files) into one tar."""
    from iscam.store import ResultsStore, atomic_write_bytes

    store = ResultsStore(store_folder)
    store.compact()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(store_folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                archive.add(path, arcname=str(Path(store_folder.name) / path.relative_to(store_folder)))
    atomic_write_bytes(target, buffer.getvalue())
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the packed stores")
    parser.add_argument("--profiles", default=",".join(DEFAULT_PROFILES), help="comma-separated configs")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds of compute for all profiles")
    parser.add_argument("--calibrate", type=int, default=2, help="images of the calibration run per profile")
    parser.add_argument("--device", default="cuda", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--data-root", help="models and sample images (default: $ISCAM_DATA)")
    parser.add_argument("--work", type=Path, help="where the stores are computed (default: a temporary folder "
                        "outside --out, so that only the packed files come back)")
    args = parser.parse_args(argv)

    from iscam.config import ConfigError, load_config

    names = [n.strip() for n in args.profiles.split(",") if n.strip()]
    if not names or len(names) + 1 > MAX_FILES:
        raise JobError(f"give 1 to {MAX_FILES - 1} profiles (one packed file each, plus job.json)")
    try:
        configs = {name: load_config(name) for name in names}
    except ConfigError as error:
        raise JobError(str(error)) from None
    work = args.work or Path(tempfile.mkdtemp(prefix="iscam-gpu-results-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    per_image, limits = {}, {}
    for name, config in configs.items():
        limits[name] = config.data.num_images or 300
        images = min(args.calibrate, limits[name])
        seconds = _timed_run(name, _variant_overrides(config, images), work / name, device=args.device,
                             data_root=args.data_root)
        per_image[name] = seconds / images
        print(f"[gpu-results] {name}: {per_image[name]:.2f} s per image (every study) on {args.device}",
              file=sys.stderr, flush=True)
    spent = time.perf_counter() - started
    counts = choose_images(per_image, max(0.0, args.budget - spent), limits=limits)
    for name, count in counts.items():
        print(f"[gpu-results] {name}: {count} images (~{count * per_image[name]:.0f} s)", file=sys.stderr)
    runs = {}
    for name, config in configs.items():
        begin = time.perf_counter()
        _timed_run(name, _variant_overrides(config, counts[name]), work / name, device=args.device,
                   data_root=args.data_root)
        runs[name] = time.perf_counter() - begin
    args.out.mkdir(parents=True, exist_ok=True)
    written = [pack(work / name, args.out / f"{name}.tar") for name in names]
    job = {"profiles": names, "images": counts, "seconds_per_image": per_image, "seconds": runs,
           "budget": args.budget, "device": args.device, "total_seconds": time.perf_counter() - started}
    (args.out / "job.json").write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    written.append(args.out / "job.json")
    too_big = [f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in written if p.stat().st_size > MAX_BYTES]
    if too_big or len(written) > MAX_FILES:
        raise JobError(f"the packed stores break the limits ({len(written)} files; too big: {too_big})")
    for path in written:
        print(f"[gpu-results] {path} ({path.stat().st_size / 2**20:.2f} MiB)", file=sys.stderr)
    print(f"[gpu-results] done in {job['total_seconds']:.0f} s; render with: make book RESULTS={args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main())
    except JobError as exc:
        print(f"gpu-results: error: {exc}", file=sys.stderr)
        sys.exit(2)
