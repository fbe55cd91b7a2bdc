"""Cost per image of every method (the paper's six and the random baseline) in iscam against TorchCAM 0.5.0,
same model, same images, one clean child process per configuration.

Both libraries explain the same real sample images (``imagenet-val-sample`` under the data root; random
normalised images when no data root is set, which the table says) for the clean argmax class. Models
(``--models``, ``NAME`` or ``NAME:WEIGHTS`` of ``iscam.models``, see ``benchmarks/workload.py``): the paper's
SqueezeNet 1.0 with its Deep Compression Caffe weights (``squeezenet1_0:deepcompression``) and SqueezeNet 1.1
with torchvision's weights (``squeezenet1_1:ncnn``), both read offline, 512 channels at features.12; the
Coral MobileNetV2 (1280 channels at features.18) and the tiny Coral MobileNetV1 (256 at features.13) with
their real ImageNet weights; torchvision's ResNet-18 with random weights at layer4 (512). Method parameters
come from a shipped config (``--config``, default ``squeezenet``: the paper's N and sigma; ``--set`` as in
``iscam run``).

Every (model, method, layout, allocator, library) runs in a clean child process of its own
(``benchmarks/process_cost.py``), and the table gives its wall time, user and system CPU time and minor
and major page faults per image. ``--allocators default tuned`` runs every configuration under glibc's
default malloc and under :func:`iscam.allocator.tune_allocator`; ``--layouts contiguous channels_last``
in PyTorch's default memory layout and in channels-last (``channels_last: true`` of the shipped configs:
iscam's ``channels_last=True``, TorchCAM on the same model converted to channels-last with its inputs).
TorchCAM always runs under the same allocator and layout as the iscam row beside it. The maps of each
library are hashed, so the table also says whether the allocator changed a single bit (it must not).

iscam runs its faithful default (softmax probability, constant channels skipped, duplicate masks forwarded
once) at ``--batch-size`` (default 32, TorchCAM's default, so the comparison isolates the number of
forwards); TorchCAM runs its own protocol and scores every channel. TorchCAM has no random baseline, so
that method has an iscam row only. Forwards per image are counted (a pre-hook on the model, for both
libraries; for iscam it equals the method's ``forward_count``) and given beside the times, so the source of
a speed-up (fewer forwards vs. cheaper forwards) is visible. This CPU is shared: the default input is 64x64
pixels, one image and one thread (the number of forwards per image does not depend on the input size; their
cost does).

    python benchmarks/methods_cpu.py          # writes benchmarks/results/methods_cpu.{json,md}
    python benchmarks/methods_cpu.py --models mobilenet_v2_coral --size 224 --images 2 --methods scorecam
    python benchmarks/methods_cpu.py --models squeezenet1_0:deepcompression squeezenet1_1:ncnn --size 224 \
        --images 2 --methods all --layouts channels_last --allocators tuned --out /tmp/methods-squeezenet
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from process_cost import (
    ALLOCATORS,
    DEFAULT_ALLOCATORS,
    apply_allocator,
    cpu_name,
    digest,
    measured,
    report_to_parent,
    run_in_child,
)
from workload import (
    LAYOUTS,
    TORCHCAM_METHODS,
    ChannelsLast,
    counted_forwards,
    method_label,
    method_params,
    model_argument,
    parse_model,
    torchcam_explain,
    torchcam_extractor,
)

from iscam import methods
from iscam.data import ManifestDataset, Preprocess, sample_manifest

RESULTS = REPO / "benchmarks" / "results"
LIBRARIES: tuple[str, ...] = ("iscam", "torchcam")
#: ``--methods`` default: the two whose cost issue 7 compared; ``all`` = every method of iscam.methods.
DEFAULT_METHODS: tuple[str, ...] = ("scorecam", "iscam")


@dataclass
class Row:
    model: str
    model_spec: str
    method: str
    method_name: str
    params: dict[str, Any]
    library: str
    layout: str
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


def load_images(n: int, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, str]:
    try:
        dataset = ManifestDataset(sample_manifest(), Preprocess(size, mean=mean, std=std), limit=n)
        return torch.stack([dataset[i].image for i in range(len(dataset))]), "imagenet-val-sample"
    except Exception as exc:  # noqa: BLE001 -- any failure means: random images, and the table says so
        print(f"sample images unavailable ({exc}); using random normalised images")
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)), "random images"


def warm_up(model: nn.Module, x: Tensor) -> None:
    """Build the kernels of this input size and layout before anything is timed: a plain forward, and a
    forward and backward (the gradient methods' first backward sets up autograd's engine)."""
    with torch.no_grad():
        model(x)
    leaf = x.clone().requires_grad_(True)
    torch.autograd.grad(model(leaf).sum(), leaf)


def child(spec: dict[str, Any]) -> None:
    """One configuration, in this (fresh) process: allocator first, then model, images, warm-up, timing."""
    settings = apply_allocator(spec["allocator"])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)  # a random-weight model has the same weights in every child
    loaded = parse_model(spec["model"]).load()
    model, layer = loaded.model, loaded.target_layer
    x, source = load_images(spec["images"], spec["size"], loaded.preprocess.mean, loaded.preprocess.std)
    shapes: list[torch.Size] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _module, _inputs, output: shapes.append(output.shape)
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    name, params = spec["method"], spec["params"]
    channels_last = spec["layout"] == "channels_last"
    stats: dict[str, int] = {}
    if spec["library"] == "iscam":
        options = {"batch_size": spec["batch_size"], "channels_last": channels_last}
        with methods.get(name, model, layer, **options, **params) as cam:  # converts the model's layout
            warm_up(model, x.contiguous(memory_format=torch.channels_last) if channels_last else x)
            with counted_forwards(model) as forwards, measured() as cost:
                maps = cam(x)
            stats = dict(cam.last_stats)
        if forwards.images != stats["forwards"]:  # the two counts must agree, or one of them is wrong
            raise RuntimeError(f"{name}: {forwards.images} images forwarded, forward_count says "
                               f"{stats['forwards']}")
    else:
        explained, where = (ChannelsLast(model), f"model.{layer}") if channels_last else (model, layer)
        warm_up(explained, x)
        extractor = torchcam_extractor(name, params, explained, where, tuple(x.shape[1:]))
        with extractor, counted_forwards(explained) as forwards, measured() as cost:
            maps = torchcam_explain(extractor, name, explained, x)
    report_to_parent(
        {"cost": asdict(cost), "stats": stats, "forwards": forwards.images, "digest": digest(maps),
         "source": source, "settings": settings, "channels": shapes[0][1]}
    )


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every child's spec, in table order; TorchCAM only where it has the method."""
    params = method_params(args.config, args.set, args.methods)
    specs = []
    for model in args.models:
        for name in args.methods:
            for layout in args.layouts:
                for allocator in args.allocators:
                    for library in args.libraries:
                        if library == "torchcam" and name not in TORCHCAM_METHODS:
                            continue
                        specs.append({
                            "model": model.spec, "method": name, "params": params[name], "library": library,
                            "layout": layout, "allocator": allocator, "size": args.size,
                            "images": args.images, "batch_size": args.batch_size, "threads": args.threads,
                        })
    return specs


def measure(args: argparse.Namespace) -> tuple[list[Row], set[str]]:
    rows: list[Row] = []
    sources: set[str] = set()
    for spec in configurations(args):
        result = run_in_child(Path(__file__), spec)
        sources.add(result["source"])
        n, cost, stats = args.images, result["cost"], result["stats"]
        scored = "channels" in stats  # the Score family reports what it skipped and merged
        row = Row(
            model=parse_model(spec["model"]).label,
            model_spec=spec["model"],
            method=method_label(spec["method"], spec["params"]),
            method_name=spec["method"],
            params=spec["params"],
            library=spec["library"],
            layout=spec["layout"],
            allocator=spec["allocator"],
            allocator_settings=result["settings"],
            images=n,
            channels=result["channels"],
            wall_s_per_image=cost["wall_s"] / n,
            user_s_per_image=cost["user_s"] / n,
            sys_s_per_image=cost["sys_s"] / n,
            minor_faults_per_image=cost["minor_faults"] / n,
            major_faults=cost["major_faults"],
            peak_rss_mib=cost["peak_rss_mib"],
            forwards_per_image=result["forwards"] / n,
            skipped_constant_share=stats["skipped_constant"] / stats["channels"] if scored else None,
            deduplicated_share=stats["deduplicated"] / stats["channels"] if scored else None,
            maps_digest=result["digest"],
        )
        rows.append(row)
        print(
            f"{row.model_spec:<32} {row.method:<40} {row.library:<8} {row.layout:<13} {row.allocator:<7} "
            f"wall {row.wall_s_per_image:7.2f}  user {row.user_s_per_image:7.2f}  "
            f"sys {row.sys_s_per_image:7.2f} s/img  {row.forwards_per_image:7.0f} fwd/img  "
            f"{row.minor_faults_per_image:11.0f} faults/img",
            flush=True,
        )
    for row in rows:
        key = (row.model_spec, row.method, row.library, row.layout)
        same = {other.maps_digest for other in rows
                if (other.model_spec, other.method, other.library, other.layout) == key}
        row.maps_equal_across_allocators = len(same) == 1 if len(args.allocators) > 1 else None
    return rows, sources


def _cpu_s(row: Row) -> float:
    return row.user_s_per_image + row.sys_s_per_image


def comparison(rows: list[Row]) -> str:
    """iscam beside TorchCAM per (model, method, layout, allocator): seconds, ratios, forwards per image."""
    header = (
        "| model | method | layout | allocator | iscam wall s/img | iscam CPU s/img | TorchCAM wall s/img "
        "| TorchCAM CPU s/img | speed-up (CPU s) | forwards/img iscam (TorchCAM) |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for ours in (row for row in rows if row.library == "iscam"):
        theirs = next((row for row in rows if row.library == "torchcam" and
                       (row.model_spec, row.method, row.layout, row.allocator)
                       == (ours.model_spec, ours.method, ours.layout, ours.allocator)), None)
        if theirs is None:
            lacking = "TorchCAM lacks it" if ours.method_name not in TORCHCAM_METHODS else "not run"
            lines.append(f"| {ours.model_spec} | {ours.method} | {ours.layout} | {ours.allocator} "
                         f"| {ours.wall_s_per_image:.2f} | {_cpu_s(ours):.2f} | {lacking} | | "
                         f"| {ours.forwards_per_image:.0f} |")
            continue
        lines.append(
            f"| {ours.model_spec} | {ours.method} | {ours.layout} | {ours.allocator} "
            f"| {ours.wall_s_per_image:.2f} | {_cpu_s(ours):.2f} "
            f"| {theirs.wall_s_per_image:.2f} | {_cpu_s(theirs):.2f} "
            f"| {_cpu_s(theirs) / max(_cpu_s(ours), 1e-9):.2f}x "
            f"| {ours.forwards_per_image:.0f} ({theirs.forwards_per_image:.0f}) |"
        )
    return "\n".join(lines)


def markdown(rows: list[Row], setting: str, command: str) -> str:
    header = (
        "| model | method | library | layout | allocator | wall s/img | user s/img | sys s/img | sys / user "
        "| minor faults/img | major faults | peak RSS MiB | forwards/img | skipped (constant) "
        "| forwarded once (duplicate) | maps equal across allocators |\n"
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )

    def share(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.1f}%"

    def equal(value: bool | None) -> str:
        return "" if value is None else ("yes" if value else "**NO**")

    lines = [
        f"| {r.model_spec} | {r.method} | {r.library} | {r.layout} | {r.allocator} "
        f"| {r.wall_s_per_image:.2f} | {r.user_s_per_image:.2f} | {r.sys_s_per_image:.2f} "
        f"| {100 * r.sys_s_per_image / max(r.user_s_per_image, 1e-9):.0f}% "
        f"| {r.minor_faults_per_image:,.0f} | {r.major_faults} | {r.peak_rss_mib:,.0f} "
        f"| {r.forwards_per_image:.0f} "
        f"| {share(r.skipped_constant_share)} | {share(r.deduplicated_share)} "
        f"| {equal(r.maps_equal_across_allocators)} |"
        for r in rows
    ]
    title = "# CAM methods: iscam vs TorchCAM on the CPU"
    labels = {row.model_spec: row.model for row in rows}
    legend = "Models: " + "; ".join(f"`{spec}` = {label}" for spec, label in labels.items()) + "."
    return "\n".join([title, "", f"Made by `{command}`.", "", comparison(rows), "", header, *lines, "",
                      legend, "", setting + "."])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=model_argument,
                        default=[parse_model("mobilenet_v2_coral"), parse_model("resnet18")],
                        help="NAME or NAME:WEIGHTS of iscam.models (default: mobilenet_v2_coral resnet18)")
    parser.add_argument("--methods", nargs="+", choices=[*methods.METHODS, "all"],
                        default=list(DEFAULT_METHODS),
                        help="iscam.methods names or 'all' (default: scorecam iscam)")
    parser.add_argument("--config", default="squeezenet",
                        help="shipped config (or YAML path) whose method parameters are timed "
                             "(default squeezenet)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of that config, as `iscam run --set` (e.g. methods.iscam.N=5)")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["contiguous"],
                        help="memory layouts, each in its own child processes (default: contiguous)")
    parser.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(DEFAULT_ALLOCATORS),
                        help="allocator settings, each in its own child processes (default: both)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--images", type=int, default=1, help="images per model (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="iscam's forward batch (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "methods_cpu", help="output path, no suffix")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, run by the parent
    args = parser.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0
    if "all" in args.methods:
        args.methods = list(methods.METHODS)
    for name, value in (("--size", args.size), ("--images", args.images), ("--batch-size", args.batch_size),
                        ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{name} must be a positive integer, got {value}")

    load_before = os.getloadavg()
    rows, sources = measure(args)
    load_after = os.getloadavg()
    settings = {row.allocator: row.allocator_settings for row in rows}
    setting = (
        f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} torch thread(s), torch {torch.__version__}; "
        f"input {args.size}x{args.size}, {args.images} image(s) per model ({', '.join(sorted(sources))}); "
        f"method parameters of config {args.config!r}{' with ' + ' '.join(args.set) if args.set else ''}; "
        f"iscam batch_size={args.batch_size}, TorchCAM 0.5.0 batch_size=32 (TorchCAM has no random "
        "baseline). "
        "Every row ran in a clean child process of its own; TorchCAM ran under the same allocator setting "
        "and memory layout as iscam (`channels_last`: iscam's channels_last=True; TorchCAM on the model "
        "converted to channels-last, inputs converted in its forward; `default`: glibc's "
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
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("child", "models")},
        "models": [model.spec for model in args.models],
        "rows": [asdict(r) for r in rows],
    }
    Path(f"{args.out}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
