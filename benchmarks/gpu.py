"""How close the CAM methods, above all the Score-CAM family, run to the hardware floor, measured against
TorchCAM in the same run.

For each model (``--models``, ``NAME`` or ``NAME:WEIGHTS``, see ``benchmarks/workload.py``: VGG-16, ResNet-18
and SqueezeNet1.0 with random weights on random inputs; the Coral MobileNetV2 and the two offline
SqueezeNets, ``squeezenet1_0:deepcompression`` and ``squeezenet1_1:ncnn``, with their real ImageNet weights on
real sample images) the script measures, in one process and on one device:

1. the plain forward floor: images per second at batch 512 in fp32, bf16 + channels_last, and compiled;
2. seconds per image of every method of ``--methods`` (default: the paper's six and the random baseline,
   with the parameters of ``--config``, default ``squeezenet``: the paper's N and sigma) in each precision;
3. seconds per image of TorchCAM's counterpart at its default batch size (32), one image at a time as it
   is used (TorchCAM has no random baseline), and the ratios;
4. forwards per image of both libraries, and the share of channels iscam skipped (constant maps) or
   forwarded once (duplicate masks);
5. the fidelity of bf16 / fp16 maps against fp32 maps: max abs difference, Spearman rank correlation of
   the pixels, and the change of insertion/deletion AUC (flagged when an image's AUC moves by more than
   0.005; the change of the mean AUC over the images is reported too).

The process runs under :func:`iscam.allocator.tune_allocator` (as ``iscam run`` does; see "The page-fault
storm" in ``benchmarks/README.md``). It prints a table and writes ``benchmarks/results/<device>.json``.
``--device cpu --small`` runs a reduced version on the CPU (small batches, one image, no compilation: the
two offline SqueezeNets at 224x224 on a real image) so the script is tested here.

    python benchmarks/gpu.py                      # on a GPU: the full table, < 5 minutes on one H100
    python benchmarks/gpu.py --device cpu --small --threads 1   # the SqueezeNets on a CPU, ~25 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from workload import (
    TORCHCAM_METHODS,
    BenchModel,
    counted_forwards,
    method_params,
    model_argument,
    parse_model,
    torchcam_explain,
    torchcam_extractor,
)

from iscam import methods, metrics, models
from iscam.allocator import tune_allocator
from iscam.data import ManifestDataset, iter_batches, sample_manifest

RANDOM_MODELS = ("vgg16", "resnet18", "squeezenet1_0")
CORAL_MODEL = "mobilenet_v2_coral"
#: The paper's SqueezeNet 1.0 (Deep Compression Caffe weights) and SqueezeNet 1.1 (torchvision's), offline.
SQUEEZENETS = ("squeezenet1_0:deepcompression", "squeezenet1_1:ncnn")
AUC_TOLERANCE = 0.005


@dataclass
class ModelReport:
    model: str  #: the ``--models`` spelling
    weights: str  #: the registry's exact label of the weights
    images: int
    channels: int
    input_size: int = 0
    inputs: str = ""  #: real sample images or random normalised inputs
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)  #: method -> parameters
    floor_ms_per_image: dict[str, float] = field(default_factory=dict)
    iscam_s_per_image: dict[str, float] = field(default_factory=dict)
    torchcam_s_per_image: dict[str, float] = field(default_factory=dict)
    speedup_vs_torchcam: dict[str, float] = field(default_factory=dict)
    forwards_per_image: dict[str, float] = field(default_factory=dict)
    torchcam_forwards_per_image: dict[str, float] = field(default_factory=dict)
    skipped_share: float = math.nan
    skipped_or_duplicate_share: float = math.nan
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> tuple[float, Any]:
    """Median wall-clock seconds of ``fn`` (device synchronised around it) and its last result."""
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], result


def forward_floor(
    model: nn.Module, x: Tensor, batch: int, compile_model: bool, small: bool
) -> dict[str, float]:
    """Milliseconds per image of a plain no-grad forward at ``batch`` images: the floor under any CAM."""
    device = x.device
    inputs = x[torch.arange(batch, device=device) % x.shape[0]]
    repeats = 2 if small else 5
    floors: dict[str, float] = {}

    def run(m: nn.Module, inp: Tensor, amp: bool) -> Callable[[], Tensor]:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()

        def call() -> Tensor:
            with torch.inference_mode(), autocast:
                return m(inp)

        return call

    call = run(model, inputs, amp=False)
    call()
    floors["fp32"] = timed(call, device, repeats)[0] / batch * 1e3

    channels_last = model.to(memory_format=torch.channels_last)
    cl_inputs = inputs.contiguous(memory_format=torch.channels_last)
    call = run(channels_last, cl_inputs, amp=True)
    call()
    floors["bf16+cl"] = timed(call, device, repeats)[0] / batch * 1e3

    if compile_model:
        try:
            compiled = torch.compile(channels_last)
            call = run(compiled, cl_inputs, amp=True)
            call()
            call()
            floors["bf16+cl+compile"] = timed(call, device, repeats)[0] / batch * 1e3
        except Exception as error:  # noqa: BLE001 -- compilation is an optional extra: report, never abort
            floors["bf16+cl+compile"] = math.nan
            print(f"  torch.compile failed: {type(error).__name__}: {error}", file=sys.stderr)
    model.to(memory_format=torch.contiguous_format)
    return floors


def iscam_run(
    name: str, params: dict[str, Any], model: nn.Module, layer: str, x: Tensor, target: Tensor,
    precision: str, batch_size: int | None,
) -> tuple[float, Tensor, dict[str, int], int]:
    """Seconds per image, maps, the method's ``last_stats`` and forwards per image (its ``forward_count``).

    ``precision``: ``fp32`` (eager), ``bf16`` / ``fp16`` (autocast + channels_last), optionally with
    ``+compile`` (the Score family's perturbed forwards through torch.compile). On CUDA a warm-up on the
    same batch keeps compilation, cuDNN's algorithm choice and allocator growth out of the timing; the CPU
    needs none, and a CPU run is long enough without doing everything twice.
    """
    amp, _, compiled = precision.partition("+")
    options: dict[str, Any] = {"batch_size": batch_size}
    if compiled:
        options["compile"] = True
    if amp != "fp32":
        options.update(amp=amp, channels_last=True)
    with methods.get(name, model, layer, **options, **params) as cam:
        if x.device.type == "cuda" or compiled:
            cam(x, target)
        before = cam.forward_count
        seconds, maps = timed(lambda: cam(x, target), x.device)
        forwards = (cam.forward_count - before) / x.shape[0]
        stats = dict(cam.last_stats)
    model.to(memory_format=torch.contiguous_format)
    return seconds / x.shape[0], maps, stats, int(forwards)


def torchcam_run(
    name: str, params: dict[str, Any], model: nn.Module, layer: str, x: Tensor, target: Tensor
) -> tuple[float, float]:
    """Seconds and forwards per image of TorchCAM's counterpart of ``name`` at its default batch size, one
    image at a time as it is used (the user's forward included)."""
    with torchcam_extractor(name, params, model, layer, tuple(x.shape[1:])) as extractor:

        def explain(index: int) -> Tensor:
            return torchcam_explain(extractor, name, model, x[index : index + 1], target[index : index + 1])

        if x.device.type == "cuda":  # the same warm-up rule as iscam's runs
            explain(0)
        with counted_forwards(model) as forwards:
            seconds, _ = timed(lambda: [explain(i) for i in range(x.shape[0])], x.device)
    return seconds / x.shape[0], forwards.images / x.shape[0]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two maps' pixels (average ranks for ties)."""

    def ranks(values: Tensor) -> Tensor:
        flat = values.flatten().double()
        order = flat.argsort(stable=True)
        sorted_values = flat[order]
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)
        # average the ranks of tied values so constant regions do not create spurious order
        unique, inverse, counts = torch.unique_consecutive(
            sorted_values, return_inverse=True, return_counts=True
        )
        sums = torch.zeros_like(unique).index_add_(0, inverse, rank[order])
        rank[order] = (sums / counts)[inverse]
        return rank

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = ra.norm() * rb.norm()
    return float((ra @ rb) / denominator) if denominator > 0 else float(torch.equal(a, b))


def fidelity(
    model: nn.Module, x: Tensor, target: Tensor, reference: Tensor, candidate: Tensor, step: int
) -> dict[str, float]:
    """How far low-precision maps are from fp32 maps, on the maps themselves and on the AUCs they produce."""
    reference, candidate = reference.float(), candidate.float()
    rho = [spearman(r, c) for r, c in zip(reference, candidate)]
    result: dict[str, float] = {
        "max_abs_diff": float((reference - candidate).abs().max()),
        "spearman_min": min(rho),
        "spearman_mean": sum(rho) / len(rho),
    }
    for kind, curve in (("insertion", metrics.insertion_curve), ("deletion", metrics.deletion_curve)):
        auc_reference = metrics.auc(curve(model, x, reference, target, step=step))
        auc_candidate = metrics.auc(curve(model, x, candidate, target, step=step))
        result[f"{kind}_auc_max_change"] = float((auc_reference - auc_candidate).abs().max())
        # what a table of mean AUCs would see: per-image changes of either sign partly cancel
        result[f"{kind}_mean_auc_change"] = float((auc_candidate - auc_reference).mean())
    result["auc_within_tolerance"] = float(
        max(result["insertion_auc_max_change"], result["deletion_auc_max_change"]) <= AUC_TOLERANCE
    )
    return result


def sample_images(
    loaded: models.LoadedModel, count: int, data_root: str | None, device: torch.device
) -> Tensor | None:
    """``count`` real sample images preprocessed for the model, or None when no data root is available."""
    try:
        dataset = ManifestDataset(sample_manifest(data_root), loaded.preprocess, limit=count)
    except Exception as error:  # noqa: BLE001 -- no data root: random inputs, and the report says so
        print(f"  no sample images ({error}); using random inputs", file=sys.stderr)
        return None
    batch = next(iter(iter_batches(dataset, batch_size=count)))
    return batch.x.to(device)


def benchmark_model(bench: BenchModel, args: argparse.Namespace, device: torch.device) -> ModelReport:
    """Everything of the module docstring for one model; real-weight models explain real sample images."""
    torch.manual_seed(0)  # random weights: the same model (and so the same skipped channels) in every run
    size = args.input_size or (64 if args.small and not bench.real else None)
    loaded = bench.load(data_root=args.data_root, device=str(device), input_size=size)
    model = loaded.model
    x = sample_images(loaded, args.images, args.data_root, device) if bench.real else None
    inputs = "imagenet-val-sample"
    if x is None:
        side = loaded.preprocess.size
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(args.images, 3, side, side, generator=generator).to(device)
        inputs = "random normalised inputs"
    size = x.shape[-1]
    with torch.no_grad():
        target = model(x).argmax(1)
    layer = loaded.target_layer
    weights = models.weights_label(bench.name, bench.weights)
    report = ModelReport(bench.spec, weights, x.shape[0], 0, size, inputs, dict(args.method_params))
    print(f"\n== {bench.spec} ({report.weights}), {x.shape[0]} images at {size}x{size} ({inputs}), "
          f"layer {layer}", flush=True)

    compile_here = bench.spec in args.compile_models
    report.floor_ms_per_image = forward_floor(
        model, x, args.floor_batch, args.compile and args.floor_compile and compile_here, args.small
    )
    print(f"  forward floor (ms/image): {report.floor_ms_per_image}", flush=True)

    maps: dict[tuple[str, str], Tensor] = {}
    for method, params in args.method_params.items():
        precisions = list(args.precisions)
        if args.compile and compile_here and method == "iscam" and device.type == "cuda":
            precisions.append(f"{precisions[-1]}+compile")
        for precision in precisions:
            seconds, saliency, stats, forwards = iscam_run(
                method, params, model, layer, x, target, precision, args.batch_size
            )
            report.iscam_s_per_image[f"{method}/{precision}"] = seconds
            report.forwards_per_image[method] = forwards
            maps[(method, precision)] = saliency
            if "channels" in stats and precision == "fp32" and report.channels == 0:  # the Score family's
                report.channels = stats["channels"] // x.shape[0]
                report.skipped_share = stats["skipped_constant"] / stats["channels"]
                report.skipped_or_duplicate_share = (
                    (stats["skipped_constant"] + stats["deduplicated"]) / stats["channels"]
                )
            print(f"  iscam {method:15s} {precision}: {seconds:.4f} s/image, {forwards} forwards/image",
                  flush=True)

    if not args.skip_torchcam:
        for method, params in args.method_params.items():
            if method not in TORCHCAM_METHODS:
                print(f"  torchcam {method:15s}: TorchCAM has no such method", flush=True)
                continue
            seconds, forwards = torchcam_run(
                method, params, model, layer, x[: args.torchcam_images], target[: args.torchcam_images]
            )
            report.torchcam_s_per_image[method] = seconds
            report.torchcam_forwards_per_image[method] = forwards
            for key, ours in report.iscam_s_per_image.items():
                if key.startswith(f"{method}/"):
                    report.speedup_vs_torchcam[key] = seconds / ours
            print(f"  torchcam {method:15s} fp32: {seconds:.4f} s/image, {forwards:.0f} forwards/image",
                  flush=True)

    if "fp32" in args.precisions:
        for method in args.method_params:
            if not methods.METHODS[method].uses_layer:  # the random baseline: no model, nothing to compare
                continue
            for precision in args.precisions:
                if precision == "fp32":
                    continue
                key = f"{method}/{precision}"
                report.fidelity[key] = fidelity(
                    model, x, target, maps[(method, "fp32")], maps[(method, precision)], step=args.metric_step
                )
                print(f"  {precision} fidelity {method}: {report.fidelity[key]}", flush=True)
    return report


def device_label(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


def render_table(reports: list[ModelReport], precisions: list[str]) -> str:
    keys = {key.split("/", 1)[1] for report in reports for key in report.iscam_s_per_image}
    precisions = [*precisions, *sorted(keys - set(precisions))]
    header = ["model", "method", *[f"iscam {p} s/img" for p in precisions], "torchcam s/img",
              *[f"speed-up {p}" for p in precisions], "fwd/img", "torchcam fwd/img", "floor bf16 s"]
    rows = [header]
    for report in reports:
        floor_ms = report.floor_ms_per_image.get("bf16+cl+compile", math.nan)
        if not math.isfinite(floor_ms):
            floor_ms = report.floor_ms_per_image.get("bf16+cl", math.nan)
        for method in report.methods:
            forwards = report.forwards_per_image.get(method, 0)
            theirs = report.torchcam_forwards_per_image.get(method)
            speedups = report.speedup_vs_torchcam
            rows.append([
                report.model, method,
                *[f"{report.iscam_s_per_image.get(f'{method}/{p}', math.nan):.4f}" for p in precisions],
                f"{report.torchcam_s_per_image[method]:.4f}" if method in report.torchcam_s_per_image
                else "-",
                *[f"{speedups[f'{method}/{p}']:.2f}x" if f"{method}/{p}" in speedups else "-"
                  for p in precisions],
                str(forwards), "-" if theirs is None else f"{theirs:.0f}", f"{forwards * floor_ms / 1e3:.4f}",
            ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = ["", ("channels skipped (constant) / skipped or duplicate; "
                  "fidelity against fp32 (min Spearman, max |dAUC|):")]
    for report in reports:
        fid = ", ".join(
            f"{m}: rho>={f['spearman_min']:.4f} "
            f"dAUC<={max(f['insertion_auc_max_change'], f['deletion_auc_max_change']):.4f}"
            for m, f in report.fidelity.items()
        )
        extra.append(
            f"  {report.model}: {report.skipped_share:.1%} / {report.skipped_or_duplicate_share:.1%} of "
            f"{report.channels} channels; {fid or 'n/a'}"
        )
    return "\n".join(lines + extra)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--small", action="store_true",
                        help="CI-sized run: few images, small batches, no compile")
    parser.add_argument("--models", nargs="+", default=None, type=model_argument,
                        help="NAME or NAME:WEIGHTS of iscam.models (default: vgg16 resnet18 squeezenet1_0 "
                        f"with random weights, {CORAL_MODEL} and {' '.join(SQUEEZENETS)}; small: the two "
                        "SqueezeNets)")
    parser.add_argument("--methods", nargs="+", default=list(methods.METHODS), choices=list(methods.METHODS),
                        help="iscam.methods names (default: all seven)")
    parser.add_argument("--config", default="squeezenet",
                        help="shipped config (or YAML path) whose method parameters are timed "
                        "(default squeezenet)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of that config, as `iscam run --set` (e.g. methods.iscam.N=5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--images", type=int, default=None, help="images per model (default 8, small: 1)")
    parser.add_argument("--torchcam-images", type=int, default=None,
                        help="images timed for TorchCAM (default 2)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: fp32, bf16 and fp16 (small: fp32)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="iscam forward batch (default: automatic)")
    parser.add_argument("--floor-batch", type=int, default=None,
                        help="batch of the forward floor (default 512)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="input side of every model (default: the model's own, 224; small: 64 for the "
                        "random-weight models, real-weight models at their own size on real images)")
    parser.add_argument("--compile-models", nargs="+", default=["vgg16"],
                        help="models whose compiled forward floor and compiled IS-CAM are measured on CUDA "
                        "(compiling costs a minute or more each)")
    parser.add_argument("--no-floor-compile", dest="floor_compile", action="store_false",
                        help="skip the compiled forward floor (keep the compiled IS-CAM)")
    parser.add_argument("--metric-step", type=int, default=224, help="insertion/deletion pixels per step")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled floor")
    parser.add_argument("--skip-torchcam", action="store_true")
    parser.add_argument("--data-root", default=None, help="data root (default: $ISCAM_DATA)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/<device>.json)")
    args = parser.parse_args(argv)
    args.models_default, args.precisions_default = args.models is None, args.precisions is None
    args.models = args.models or [parse_model(spec) for spec in (*RANDOM_MODELS, CORAL_MODEL, *SQUEEZENETS)]
    args.method_params = method_params(args.config, args.set, args.methods)
    args.precisions = args.precisions or ["fp32", "bf16", "fp16"]
    args.images = args.images or (1 if args.small else 8)
    args.torchcam_images = min(args.torchcam_images or 2, args.images)
    args.floor_batch = args.floor_batch or (16 if args.small else 512)
    if args.small:
        # Minutes on a 2-core CPU: one image, fp32 (bf16 pays only on CPUs with AMX or AVX512-BF16: there
        # pass --precisions fp32 bf16, 2-3x faster), no compilation, random-weight models at 64x64 but
        # real-weight ones at their own 224x224 on a real image, where the iscam/TorchCAM ratio is
        # meaningful (their constant and duplicate channels are those of real data).
        args.compile = False
        if args.models_default:
            args.models = [parse_model(spec) for spec in SQUEEZENETS]
        if args.precisions_default:
            args.precisions = ["fp32"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    allocator = tune_allocator()  # before the first large tensor, as iscam run does
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    started, load_before = time.time(), os.getloadavg()[0]
    label = device_label(device)
    out = args.out or REPO / "benchmarks" / "results" / f"{label}{'-small' if args.small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    reports: list[ModelReport] = []
    failures: dict[str, str] = {}
    for bench in args.models:
        try:
            reports.append(benchmark_model(bench, args, device))
        except Exception as error:  # noqa: BLE001 -- one model failing must not lose the others' rows
            failures[bench.spec] = f"{type(error).__name__}: {error}"
            print(f"  {bench.spec} FAILED: {failures[bench.spec]}", file=sys.stderr, flush=True)
        table = render_table(reports, args.precisions)
        payload = {
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else platform.processor() or "cpu"),
            "torch": torch.__version__,
            "small": args.small,
            "threads": torch.get_num_threads(),
            "allocator": allocator,
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "seconds_total": time.time() - started,
            "arguments": {k: str(v) for k, v in vars(args).items() if k not in ("models", "method_params")},
            "model_specs": [bench.spec for bench in args.models],
            "models": [asdict(r) for r in reports],
            "failures": failures,
            "table": table,
        }
        out.write_text(json.dumps(payload, indent=2))  # after every model: an interrupted run keeps its rows
    print(f"\n{table}\n\nwritten to {out} ({payload['seconds_total']:.0f} s in all, "
          f"device {payload['device']})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
