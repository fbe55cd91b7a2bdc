"""Cost per image of iscam's ScoreCAM and ISCAM (N=10) against TorchCAM 0.5.0, same model, same images.

Both libraries explain the same real sample images (``imagenet-val-sample`` under the data root; random
normalised images for a random-weight model when no data root is set, which the table says) for the clean
argmax class. Models (``--models``): the Coral MobileNetV2 (1280 channels at features.18) and the tiny
Coral MobileNetV1 (256 channels at features.13) with their real ImageNet weights via ``iscam.models``, and
torchvision's ResNet-18 with random weights at layer4 (512).

Every (model, method, library, allocator) runs in a clean child process of its own
(``benchmarks/process_cost.py``), and the table gives its wall time, user and system CPU time and minor
and major page faults per image. ``--allocators default tuned`` runs every configuration under glibc's
default malloc and under :func:`iscam.allocator.tune_allocator`; TorchCAM always runs under the same
allocator setting as the iscam row beside it. The maps of each library are hashed, so the table also says
whether the allocator changed a single bit (it must not).

iscam runs its faithful default (softmax probability, constant channels skipped, duplicate masks forwarded
once) at ``--batch-size`` (default 32, TorchCAM's default, so the comparison isolates the number of
forwards); TorchCAM runs its own protocol and scores every channel. Forwards per image are given beside
the times, so the source of a speed-up (fewer forwards vs. cheaper forwards) is visible. This CPU is
shared: the default input is 64x64 pixels, one image and one thread, so the whole run stays within a few
minutes (the number of forwards per image does not depend on the input size; their cost does).

    python benchmarks/methods_cpu.py          # writes benchmarks/results/methods_cpu.{json,md}
    python benchmarks/methods_cpu.py --models mobilenet_v2_coral --size 224 --images 2 --methods scorecam
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from process_cost import (
    ALLOCATORS,
    DEFAULT_ALLOCATORS,
    apply_allocator,
    digest,
    measured,
    report_to_parent,
    run_in_child,
)

from iscam import methods, models
from iscam.data import IMAGENET_MEAN, IMAGENET_STD, ManifestDataset, Preprocess, sample_manifest

RESULTS = REPO / "benchmarks" / "results"
#: ``--models`` choices: the Coral models with real weights, and a random-weight torchvision ResNet-18.
MODELS: dict[str, str] = {
    "mobilenet_v2_coral": "Coral MobileNetV2 (real int8 ImageNet weights)",
    "mobilenet_v1_coral_tiny": "Coral MobileNetV1 0.25 (real int8 ImageNet weights)",
    "resnet18": "torchvision ResNet-18 (random weights)",
}
LIBRARIES: tuple[str, ...] = ("iscam", "torchcam")
METHODS: tuple[str, ...] = ("scorecam", "iscam")


@dataclass
class Row:
    model: str
    method: str
    library: str
    allocator: str
    allocator_settings: dict[str, int]
    images: int
    channels: int
    wall_s_per_image: float
    user_s_per_image: float
    sys_s_per_image: float
    minor_faults_per_image: float
    major_faults: int
    peak_rss_mib: float
    forwards_per_image: float
    skipped_constant_share: float | None
    deduplicated_share: float | None
    maps_digest: str
    maps_equal_across_allocators: bool | None = None


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_model(name: str) -> tuple[nn.Module, str, tuple[float, ...], tuple[float, ...]]:
    """(model in eval mode, target layer, mean, std) for one of :data:`MODELS`."""
    if name == "resnet18":
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).eval(), "layer4", IMAGENET_MEAN, IMAGENET_STD
    loaded = models.load(name)
    return loaded.model, loaded.target_layer, loaded.preprocess.mean, loaded.preprocess.std


def load_images(n: int, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, str]:
    try:
        dataset = ManifestDataset(sample_manifest(), Preprocess(size, mean=mean, std=std), limit=n)
        return torch.stack([dataset[i].image for i in range(len(dataset))]), "imagenet-val-sample"
    except Exception as exc:  # noqa: BLE001 -- any failure means: random images, and the table says so
        print(f"sample images unavailable ({exc}); using random normalised images")
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)), "random images"


def child(spec: dict[str, Any]) -> None:
    """One configuration, in this (fresh) process: allocator first, then model, images, warm-up, timing."""
    settings = apply_allocator(spec["allocator"])
    torch.set_num_threads(spec["threads"])
    model, layer, mean, std = load_model(spec["model"])
    x, source = load_images(spec["images"], spec["size"], mean, std)
    shapes: list[torch.Size] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _module, _inputs, output: shapes.append(output.shape)
    )
    with torch.no_grad():  # build the kernels for this input size before anything is timed
        model(x)
    handle.remove()
    method, n_steps = spec["method"], spec["N"]
    stats: dict[str, int] = {}
    if spec["library"] == "iscam":
        kwargs = {"N": n_steps} if method == "iscam" else {}
        with methods.get(method, model, layer, batch_size=spec["batch_size"], **kwargs) as cam:
            with measured() as cost:
                maps = cam(x)
            stats = dict(cam.last_stats)
    else:
        from torchcam.methods import ISCAM, ScoreCAM

        extractor_cls, kwargs = (ISCAM, {"num_samples": n_steps}) if method == "iscam" else (ScoreCAM, {})
        extractor = extractor_cls(model, layer, input_shape=tuple(x.shape[1:]), **kwargs)
        with extractor, measured() as cost:
            with torch.no_grad():
                logits = model(x)
            (maps,) = extractor(logits.argmax(1).tolist(), logits)
    report_to_parent(
        {"cost": asdict(cost), "stats": stats, "digest": digest(maps), "source": source, "settings": settings,
         "channels": shapes[0][1]}
    )


def measure(args: argparse.Namespace) -> tuple[list[Row], set[str]]:
    rows: list[Row] = []
    sources: set[str] = set()
    for model in args.models:
        for method in args.methods:
            for allocator in args.allocators:
                for library in args.libraries:
                    spec = {
                        "model": model, "method": method, "library": library, "allocator": allocator,
                        "size": args.size, "images": args.images, "N": args.N,
                        "batch_size": args.batch_size, "threads": args.threads,
                    }
                    result = run_in_child(Path(__file__), spec)
                    sources.add(result["source"])
                    n, cost, stats = args.images, result["cost"], result["stats"]
                    steps = args.N if method == "iscam" else 1
                    channels = result["channels"]
                    if library == "iscam":
                        forwards = stats["forwards"] / n
                        skipped = stats["skipped_constant"] / stats["channels"]
                        deduplicated = stats["deduplicated"] / stats["channels"]
                    else:
                        # the user's clean forward, TorchCAM's own clean forward, every channel at every step
                        forwards, skipped, deduplicated = 2 + channels * steps, None, None
                    row = Row(
                        model=MODELS[model],
                        method=methods.PAPER_NAMES[method] + (f" (N={args.N})" if method == "iscam" else ""),
                        library=library,
                        allocator=allocator,
                        allocator_settings=result["settings"],
                        images=n,
                        channels=channels,
                        wall_s_per_image=cost["wall_s"] / n,
                        user_s_per_image=cost["user_s"] / n,
                        sys_s_per_image=cost["sys_s"] / n,
                        minor_faults_per_image=cost["minor_faults"] / n,
                        major_faults=cost["major_faults"],
                        peak_rss_mib=cost["peak_rss_mib"],
                        forwards_per_image=forwards,
                        skipped_constant_share=skipped,
                        deduplicated_share=deduplicated,
                        maps_digest=result["digest"],
                    )
                    rows.append(row)
                    print(
                        f"{row.model:<50} {row.method:<14} {library:<8} {allocator:<7} "
                        f"wall {row.wall_s_per_image:7.2f}  user {row.user_s_per_image:7.2f}  "
                        f"sys {row.sys_s_per_image:7.2f} s/img  "
                        f"{row.minor_faults_per_image:11.0f} faults/img",
                        flush=True,
                    )
    for row in rows:
        same = {other.maps_digest for other in rows if (other.model, other.method, other.library)
                == (row.model, row.method, row.library)}
        row.maps_equal_across_allocators = len(same) == 1 if len(args.allocators) > 1 else None
    return rows, sources


def markdown(rows: list[Row], setting: str, command: str) -> str:
    header = (
        "| model | method | library | allocator | wall s/img | user s/img | sys s/img | sys / user "
        "| minor faults/img | major faults | peak RSS MiB | forwards/img | skipped (constant) "
        "| forwarded once (duplicate) | maps equal across allocators |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )

    def share(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.1f}%"

    def equal(value: bool | None) -> str:
        return "" if value is None else ("yes" if value else "**NO**")

    lines = [
        f"| {r.model} | {r.method} | {r.library} | {r.allocator} | {r.wall_s_per_image:.2f} "
        f"| {r.user_s_per_image:.2f} | {r.sys_s_per_image:.2f} "
        f"| {100 * r.sys_s_per_image / max(r.user_s_per_image, 1e-9):.0f}% "
        f"| {r.minor_faults_per_image:,.0f} | {r.major_faults} | {r.peak_rss_mib:,.0f} "
        f"| {r.forwards_per_image:.0f} "
        f"| {share(r.skipped_constant_share)} | {share(r.deduplicated_share)} "
        f"| {equal(r.maps_equal_across_allocators)} |"
        for r in rows
    ]
    title = "# Score-CAM / IS-CAM: iscam vs TorchCAM on the CPU"
    return "\n".join([title, "", f"Made by `{command}`.", "", header, *lines, "", setting + "."])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["mobilenet_v2_coral", "resnet18"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(DEFAULT_ALLOCATORS),
                        help="allocator settings, each in its own child processes (default: both)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--images", type=int, default=1, help="images per model (default 1)")
    parser.add_argument("--N", type=int, default=10, help="IS-CAM integration steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="iscam's forward batch (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "methods_cpu", help="output path, no suffix")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, run by the parent
    args = parser.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0

    load_before = os.getloadavg()
    rows, sources = measure(args)
    load_after = os.getloadavg()
    settings = {row.allocator: row.allocator_settings for row in rows}
    setting = (
        f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} torch thread(s), torch {torch.__version__}; "
        f"input {args.size}x{args.size}, {args.images} image(s) per model ({', '.join(sorted(sources))}); "
        f"iscam batch_size={args.batch_size}, TorchCAM 0.5.0 batch_size=32. Every row ran in a clean child "
        "process of its own; TorchCAM ran under the same allocator setting as iscam (`default`: glibc's "
        "malloc as it starts, MALLOC_* variables removed; `tuned`: iscam.allocator.tune_allocator(); "
        f"mallopt settings {settings}). Seconds and faults "
        "are those of the timed call (getrusage of the child), peak RSS that of the child. Load average "
        f"(1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after the run: wall time also counts "
        "waiting for the cores, user + system time does not"
    )
    command = " ".join(["python benchmarks/methods_cpu.py", *(sys.argv[1:] if argv is None else argv)])
    text = markdown(rows, setting, command)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text + "\n", encoding="utf-8")
    payload = {
        "command": command,
        "setting": setting,
        "load_average_1min": [load_before[0], load_after[0]],
        "args": {k: str(v) for k, v in vars(args).items() if k != "child"},
        "rows": [asdict(r) for r in rows],
    }
    Path(f"{args.out}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
