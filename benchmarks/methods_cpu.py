"""Seconds per image of iscam's ScoreCAM and ISCAM (N=10) against TorchCAM 0.5.0, same model, same images.

Both libraries explain the same real sample images (``imagenet-val-sample`` under the data root; random
normalised images when no data root is set, which the table says) for the clean argmax class, in one
process, one after the other. Models: the Coral MobileNetV2 with its real ImageNet weights (via
``iscam.models``; torchvision's MobileNetV2 with random weights when that is unavailable, which the table
says) at features.18 (1280 channels), and torchvision's ResNet-18 with random weights at layer4 (512).

iscam runs its faithful default (softmax probability, constant channels skipped, duplicate masks forwarded
once) at ``--batch-size`` (default 32, TorchCAM's default, so the comparison isolates the number of
forwards); TorchCAM runs its own protocol and scores every channel. The table gives both the seconds and
the forwards per image, so the source of a speed-up (fewer forwards vs. faster forwards) is visible. This CPU is shared: the default input is 64x64 pixels, one image
and one thread, so that the whole run stays within a few minutes (the number of forwards per image does not
depend on the input size; their cost does). ``--size 224 --images 3`` gives the paper's resolution on a
quiet machine.

    python benchmarks/methods_cpu.py          # writes benchmarks/results/methods_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from iscam import methods
from iscam.data import IMAGENET_MEAN, IMAGENET_STD, ManifestDataset, Preprocess, sample_manifest

RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Row:
    model: str
    method: str
    images: int
    channels: int
    iscam_cpu_s_per_image: float
    torchcam_cpu_s_per_image: float
    speedup: float
    iscam_wall_s_per_image: float
    torchcam_wall_s_per_image: float
    iscam_forwards_per_image: float
    torchcam_forwards_per_image: float
    skipped_constant_share: float
    deduplicated_share: float


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_models(size: int) -> list[tuple[str, nn.Module, str, tuple[float, ...], tuple[float, ...]]]:
    """(label, model, target layer, mean, std) for the Coral MobileNetV2 (or a stand-in) and ResNet-18."""
    loaded = []
    try:
        from iscam import models

        coral = models.load("mobilenet_v2_coral")
        loaded.append(
            (
                "Coral MobileNetV2 (real int8 ImageNet weights)",
                coral.model,
                coral.target_layer,
                coral.preprocess.mean,
                coral.preprocess.std,
            )
        )
    except Exception as exc:  # noqa: BLE001 -- any failure means: use the stand-in and say why
        print(
            f"Coral MobileNetV2 unavailable ({type(exc).__name__}: {exc}); "
            "using torchvision's MobileNetV2 with random weights"
        )
        torch.manual_seed(0)
        loaded.append(
            (
                "torchvision MobileNetV2 (random weights; Coral model unavailable)",
                torchvision.models.mobilenet_v2(weights=None).eval(),
                "features.18",
                IMAGENET_MEAN,
                IMAGENET_STD,
            )
        )
    torch.manual_seed(0)
    loaded.append(
        (
            "torchvision ResNet-18 (random weights)",
            torchvision.models.resnet18(weights=None).eval(),
            "layer4",
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
    )
    return loaded


def load_images(n: int, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, str]:
    try:
        dataset = ManifestDataset(sample_manifest(), Preprocess(size, mean=mean, std=std), limit=n)
        return torch.stack([dataset[i].image for i in range(len(dataset))]), "imagenet-val-sample"
    except Exception as exc:  # noqa: BLE001
        print(f"sample images unavailable ({exc}); using random normalised images")
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)), "random images"


@dataclass
class Clock:
    """Process CPU time and wall time of a block (CPU time leaves out the time other jobs hold the cores)."""

    cpu: float = 0.0
    wall: float = 0.0


@contextmanager
def clocked() -> Iterator[Clock]:
    clock = Clock()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield clock
    finally:
        clock.cpu, clock.wall = time.process_time() - cpu, time.perf_counter() - wall


def time_iscam(
    model: nn.Module, layer: str, x: Tensor, method: str, n_steps: int, batch_size: int
) -> tuple[Clock, dict[str, int]]:
    kwargs = {"N": n_steps} if method == "iscam" else {}
    with methods.get(method, model, layer, batch_size=batch_size, **kwargs) as cam:
        with clocked() as clock:
            cam(x)
        return clock, dict(cam.last_stats)


def time_torchcam(model: nn.Module, layer: str, x: Tensor, method: str, n_steps: int) -> Clock:
    from torchcam.methods import ISCAM, ScoreCAM

    extractor_cls, kwargs = (ISCAM, {"num_samples": n_steps}) if method == "iscam" else (ScoreCAM, {})
    with extractor_cls(model, layer, input_shape=tuple(x.shape[1:]), **kwargs) as extractor:
        with clocked() as clock:
            with torch.no_grad():
                logits = model(x)
            extractor(logits.argmax(1).tolist(), logits)
        return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--images", type=int, default=1, help="images per model (default 1)")
    parser.add_argument("--N", type=int, default=10, help="IS-CAM integration steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="iscam's forward batch (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "methods_cpu", help="output path, no suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows: list[Row] = []
    sources = set()
    for label, model, layer, mean, std in load_models(args.size):
        x, source = load_images(args.images, args.size, mean, std)
        sources.add(source)
        with torch.no_grad():  # build the kernels for this input size before anything is timed
            model(x)
        n = x.shape[0]
        for method in ("scorecam", "iscam"):
            ours, stats = time_iscam(model, layer, x, method, args.N, args.batch_size)
            theirs = time_torchcam(model, layer, x, method, args.N)
            steps = args.N if method == "iscam" else 1
            channels = stats["channels"] // n
            row = Row(
                model=label,
                method=methods.PAPER_NAMES[method] + (f" (N={args.N})" if method == "iscam" else ""),
                images=n,
                channels=channels,
                iscam_cpu_s_per_image=ours.cpu / n,
                torchcam_cpu_s_per_image=theirs.cpu / n,
                speedup=theirs.cpu / ours.cpu,
                iscam_wall_s_per_image=ours.wall / n,
                torchcam_wall_s_per_image=theirs.wall / n,
                iscam_forwards_per_image=stats["forwards"] / n,
                # TorchCAM: the user's clean forward, its own clean forward, and every channel at every step
                torchcam_forwards_per_image=2 + channels * steps,
                skipped_constant_share=stats["skipped_constant"] / stats["channels"],
                deduplicated_share=stats["deduplicated"] / stats["channels"],
            )
            rows.append(row)
            print(
                f"{row.model:<50} {row.method:<16} iscam {row.iscam_cpu_s_per_image:8.2f} CPU s/img   "
                f"torchcam {row.torchcam_cpu_s_per_image:8.2f} CPU s/img   x{row.speedup:.2f}",
                flush=True,
            )

    setting = (
        f"{cpu_name()}, {args.threads} torch thread(s), torch {torch.__version__}; "
        f"input {args.size}x{args.size}, {args.images} image(s) per model ({', '.join(sorted(sources))}); "
        f"iscam batch_size={args.batch_size}, TorchCAM 0.5.0 batch_size=32. Seconds are process CPU time "
        "(one thread on a shared machine: wall time, which also counts waiting for the cores, is shown for "
        "reference); speed-up = TorchCAM CPU time / iscam CPU time"
    )
    header = (
        "| model | method | iscam s/img | TorchCAM s/img | speed-up | wall s/img (iscam / TorchCAM) "
        "| forwards/img iscam | forwards/img TorchCAM | skipped (constant) | forwarded once (duplicate) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r.model} | {r.method} | {r.iscam_cpu_s_per_image:.2f} | {r.torchcam_cpu_s_per_image:.2f} "
        f"| {r.speedup:.2f}x | {r.iscam_wall_s_per_image:.2f} / {r.torchcam_wall_s_per_image:.2f} "
        f"| {r.iscam_forwards_per_image:.0f} | {r.torchcam_forwards_per_image:.0f} "
        f"| {100 * r.skipped_constant_share:.1f}% | {100 * r.deduplicated_share:.1f}% |"
        for r in rows
    ]
    title = "# Score-CAM / IS-CAM: iscam vs TorchCAM on the CPU"
    markdown = "\n".join(
        [title, "", "Made by `python benchmarks/methods_cpu.py`.", "", header, *lines, "", setting + "."]
    )
    print()
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    payload = {
        "setting": setting,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [asdict(r) for r in rows],
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
