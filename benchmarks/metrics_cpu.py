"""Cost per image of the metrics, iscam against TorchCAM 0.5.0: insertion + deletion (RISE), batched and one
frame at a time, and the Average Drop / Increase in Confidence pair.

- **curves**: a Grad-CAM map, then the deletion and insertion curves on the zero (mean-colour) substrate,
  TorchCAM's default baseline, so both libraries do the same work: one clean forward and backward for
  the map, then ``2 x (ceil(H*W / step) + 1)`` frames (450 at 224x224, step 224; TorchCAM shares the
  all-substrate frame of the two curves and reuses the clean score: 447). iscam runs batched
  (``--batch-size`` frames per forward) and one frame at a time (``batch_size=1``, RISE's loop); the two
  must agree up to batch-size-dependent rounding, the largest difference is printed. TorchCAM runs its
  ``DeletionInsertionMetric`` with ``steps = ceil(H*W / step)`` at the same batch size.
- **confidence**: a Grad-CAM map and the clean and masked probability of every image, by
  ``iscam.metrics.confidence`` and by TorchCAM's ``ClassificationMetric``: one clean forward, one backward
  and one masked forward per image in both.

Every (part, mode, allocator) runs in a clean child process of its own (``benchmarks/process_cost.py``):
wall time, user and system CPU time and minor and major page faults per image. ``--allocators default
tuned`` runs each under glibc's default malloc and under :func:`iscam.allocator.tune_allocator`; TorchCAM
runs under the same setting as the iscam rows beside it. Results are hashed, so the table says whether the
allocator changed a single bit (it must not).

``--layouts contiguous channels_last`` runs each in PyTorch's default memory layout and in channels-last
(the model converted, every frame converted in its forward, as ``iscam run`` does with ``channels_last:
true``); TorchCAM runs in the same layout as the iscam rows beside it.

``--model`` (``NAME`` or ``NAME:WEIGHTS`` of ``iscam.models``, see ``benchmarks/workload.py``): a model with
real weights -- the Coral models (``mobilenet_v2_coral``, ``mobilenet_v1_coral_tiny``), the offline
SqueezeNets (``squeezenet1_0:deepcompression``, ``squeezenet1_1:ncnn``) -- runs on real sample images at
its own input size; a torchvision architecture named bare (default ``resnet18``) runs with random weights
on random normalised images at ``--size`` (the cost of a forward does not depend on the weights).

    python benchmarks/metrics_cpu.py          # CPU; writes benchmarks/results/metrics_cpu.{json,md}
    python benchmarks/metrics_cpu.py --model mobilenet_v2_coral --images 2 --out /tmp/metrics_mnv2
    python benchmarks/metrics_cpu.py --model squeezenet1_0:deepcompression --images 2 --single-images 0 \
        --layouts channels_last --allocators tuned --out /tmp/metrics_squeezenet10
    python benchmarks/metrics_cpu.py --device cuda --images 32 --single-images 2 --out /tmp/metrics_cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from functools import partial
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
    cpu_name,
    digest,
    measured,
    report_to_parent,
    run_in_child,
)
from workload import LAYOUTS, ChannelsLast, model_argument, parse_model

from iscam import methods, metrics
from iscam.data import ManifestDataset, iter_batches, sample_manifest

RESULTS = Path(__file__).resolve().parent / "results"
PARTS: tuple[str, ...] = ("curves", "confidence")
LIBRARIES: tuple[str, ...] = ("iscam", "torchcam")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch thread(s)"


def load_inputs(spec: dict[str, Any]) -> tuple[nn.Module, str, Tensor, str]:
    """(model in eval mode on the device and in the spec's layout, Grad-CAM layer, images, what the images
    are) for ``spec``."""
    device, count = torch.device(spec["device"]), spec["count"]
    bench = parse_model(spec["model"])
    torch.manual_seed(0)  # the same random weights in every child
    if bench.real:
        loaded = bench.load(device=device)
        dataset = ManifestDataset(sample_manifest(), loaded.preprocess, limit=count)
        x = next(iter(iter_batches(dataset, count))).x.to(device)
        source = f"{count} imagenet-val-sample image(s)"
    else:
        loaded = bench.load(device=device, input_size=spec["size"])
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(count, 3, spec["size"], spec["size"], generator=generator).to(device)
        source = "random normalised images"
    if spec["layout"] == "channels_last":
        return ChannelsLast(loaded.model), f"model.{loaded.target_layer}", x, source
    return loaded.model, loaded.target_layer, x, source


def child(spec: dict[str, Any]) -> None:
    """One configuration, in this (fresh) process: allocator first, then model, inputs, warm-up, timing."""
    settings = apply_allocator(spec["allocator"])
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, layer, x, source = load_inputs(spec)
    x = x[: spec["images"]]
    height, width = x.shape[-2:]
    intervals = -(-height * width // spec["step"])
    with torch.no_grad():
        target = model(x).argmax(dim=1)  # the paper's protocol: the clean argmax
        model(x[:1].expand(min(spec["batch_size"], 8), -1, -1, -1))  # warm-up (kernels, cuDNN autotune)
    batch_size, extra = spec["batch_size"], {}
    _synchronize(device)
    if spec["library"] == "iscam":
        with measured() as cost:
            with methods.GradCAM(model, layer) as cam:
                saliency = cam(x, target)
            if spec["part"] == "curves":
                curves = [function(model, x, saliency, target, step=spec["step"], substrate="zeros",
                                   batch_size=batch_size)
                          for function in (metrics.deletion_curve, metrics.insertion_curve)]
                result = torch.stack(curves, dim=1)
            else:
                result = torch.stack(metrics.confidence(model, x, saliency, target, batch_size=batch_size))
            _synchronize(device)
        if spec["part"] == "curves":
            extra = {"curves": result.tolist(), "deletion_auc": float(metrics.auc(curves[0]).mean()),
                     "insertion_auc": float(metrics.auc(curves[1]).mean()),
                     "forwards_per_image": 2 * intervals + 2}
        else:
            clean, masked = result
            extra = {"average_drop": float(metrics.average_drop(clean, masked).mean()),
                     "increase_in_confidence": float(metrics.increase_in_confidence(clean, masked).mean()),
                     "forwards_per_image": 2}
    else:
        from torchcam.methods import GradCAM
        from torchcam.metrics import ClassificationMetric, DeletionInsertionMetric

        softmax = partial(torch.softmax, dim=-1)
        with measured() as cost:
            with GradCAM(model, layer) as extractor:
                if spec["part"] == "curves":
                    metric = DeletionInsertionMetric(extractor, softmax, steps=intervals,
                                                     batch_size=batch_size)
                else:
                    metric = ClassificationMetric(extractor, softmax)
                metric.update(x, target.tolist())
                summary = metric.summary()
            _synchronize(device)
        result = torch.tensor(list(summary.values()))
        if spec["part"] == "curves":
            # TorchCAM's points: every ceil(HW / steps) pixels, and all of them; both curves share the
            # all-substrate frame and reuse the clean score
            points = -(-height * width // -(-height * width // intervals)) + 1
            extra = {"deletion_auc": summary["deletion_auc"], "insertion_auc": summary["insertion_auc"],
                     "forwards_per_image": 2 * (points - 2) + 1}
        else:
            extra = {"average_drop": summary["avg_drop"], "increase_in_confidence": summary["conf_increase"],
                     "forwards_per_image": 2}
    report_to_parent({"cost": asdict(cost), "digest": digest(result), "source": source, "settings": settings,
                      **extra})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=parse_model("resnet18"), type=model_argument,
                        help="NAME or NAME:WEIGHTS of iscam.models: real weights run on sample images, "
                             "a bare torchvision architecture with random weights on random images; "
                             "default resnet18")
    parser.add_argument("--images", type=int, default=2, help="images timed with batched frames")
    parser.add_argument("--single-images", type=int, default=1,
                        help="images timed one frame at a time (0: skip that mode)")
    parser.add_argument("--step", type=int, default=224)
    parser.add_argument("--size", type=int, default=224, help="input side of a torchvision model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(DEFAULT_ALLOCATORS),
                        help="allocator settings, each in its own child processes (default: both)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["contiguous"],
                        help="memory layouts, each in its own child processes (default: contiguous)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default because oversubscribed threads on a shared "
                             "machine make small batches far slower, not faster")
    parser.add_argument("--out", type=Path, default=RESULTS / "metrics_cpu",
                        help="output path without suffix (.json and .md are written)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, run by the parent
    args = parser.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0

    base = {"model": args.model.spec, "size": args.size, "step": args.step, "device": args.device,
            "threads": args.threads, "count": max(args.images, args.single_images)}
    configurations = []  # (part, mode, library, batch size, images)
    if "curves" in args.parts:
        configurations += [
            ("curves", f"iscam, batched (batch_size={args.batch_size})", "iscam", args.batch_size,
             args.images),
            ("curves", "iscam, one frame at a time (batch_size=1)", "iscam", 1, args.single_images),
            ("curves", f"TorchCAM DeletionInsertionMetric (batch_size={args.batch_size})", "torchcam",
             args.batch_size, args.images),
        ]
    if "confidence" in args.parts:
        configurations += [
            ("confidence", "iscam confidence", "iscam", args.batch_size, args.images),
            ("confidence", "TorchCAM ClassificationMetric", "torchcam", args.batch_size, args.images),
        ]
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    configurations = [entry for entry in configurations if entry[2] in args.libraries and entry[4] > 0]
    for part, mode, library, batch_size, images in configurations:
        for layout, allocator in [(one, other) for one in args.layouts for other in args.allocators]:
            spec = {**base, "part": part, "library": library, "allocator": allocator, "layout": layout,
                    "batch_size": batch_size, "images": images}
            result = run_in_child(Path(__file__), spec)
            results[mode, layout, allocator] = result
            cost = result["cost"]
            row = {"part": part, "mode": mode, "library": library, "layout": layout, "allocator": allocator,
                   "allocator_settings": result["settings"], "images": images, "source": result["source"],
                   "forwards_per_image": result["forwards_per_image"],
                   **{f"{key}_per_image": cost[key] / images for key in ("wall_s", "user_s", "sys_s",
                                                                         "minor_faults")},
                   "major_faults": cost["major_faults"], "peak_rss_mib": cost["peak_rss_mib"],
                   "digest": result["digest"]}
            for key in ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence"):
                if key in result:
                    row[key] = result[key]
            rows.append(row)
            print(f"{part:<10} {mode:<36} {layout:<13} {allocator:<7} wall {row['wall_s_per_image']:7.2f}  "
                  f"user {row['user_s_per_image']:7.2f}  sys {row['sys_s_per_image']:7.2f} s/img  "
                  f"{row['minor_faults_per_image']:11.0f} faults/img", flush=True)
    load_after = os.getloadavg()
    for row in rows:
        digests = {other["digest"] for other in rows
                   if (other["mode"], other["layout"]) == (row["mode"], row["layout"])}
        row["equal_across_allocators"] = len(digests) == 1 if len(args.allocators) > 1 else None

    max_difference = max_layout_difference = None
    modes = [mode for part, mode, library, _, _ in configurations if part == "curves" and library == "iscam"]
    last = args.allocators[-1]
    if len(modes) == 2:  # batched and one frame at a time, on their common images
        common = min(args.images, args.single_images)
        curves = {(mode, layout): torch.tensor(results[mode, layout, last]["curves"])[:common]
                  for mode in modes for layout in args.layouts}
        max_difference = max(float((curves[modes[0], layout] - curves[modes[1], layout]).abs().max())
                             for layout in args.layouts)
    if modes and len(args.layouts) == 2:  # the same curves in both layouts, up to the kernels' rounding
        contiguous, channels_last = (torch.tensor(results[modes[0], layout, last]["curves"])
                                     for layout in LAYOUTS)
        max_layout_difference = float((contiguous - channels_last).abs().max())

    sources = sorted({row["source"] for row in rows})
    model = args.model.label if args.model.real else f"{args.model.label}, {args.size}x{args.size}"
    result_json: dict[str, Any] = {
        "benchmark": f"insertion + deletion curves (step {args.step}) and the confidence pair",
        "model": model,
        "images": sources,
        "device": _device_name(torch.device(args.device), args.threads),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "load_average_1min": [load_before[0], load_after[0]],
        "rows": rows,
        "max_abs_difference_batched_vs_single": max_difference,
        "max_abs_difference_contiguous_vs_channels_last": max_layout_difference,
    }

    def equal(value: bool | None) -> str:
        return "" if value is None else ("yes" if value else "**NO**")

    table = [
        ("| part | mode | library | layout | allocator | images | forwards/img | wall s/img | user s/img "
         "| sys s/img | sys / user | minor faults/img | major faults | peak RSS MiB "
         "| equal across allocators |"),
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {r['part']} | {r['mode']} | {r['library']} | {r['layout']} | {r['allocator']} | {r['images']} "
          f"| {r['forwards_per_image']} | {r['wall_s_per_image']:.2f} | {r['user_s_per_image']:.2f} "
          f"| {r['sys_s_per_image']:.2f} "
          f"| {100 * r['sys_s_per_image'] / max(r['user_s_per_image'], 1e-9):.0f}% "
          f"| {r['minor_faults_per_image']:,.0f} | {r['major_faults']} | {r['peak_rss_mib']:,.0f} "
          f"| {equal(r['equal_across_allocators'])} |"
          for r in rows],
    ]
    values = "; ".join(
        f"{r['mode']} ({r['layout']}, {r['allocator']}): "
        + (f"deletion AUC {r['deletion_auc']:.4f}, insertion AUC {r['insertion_auc']:.4f}"
           if r["part"] == "curves" else
           f"Average Drop {100 * r['average_drop']:.2f} %, Increase in Confidence "
           f"{100 * r['increase_in_confidence']:.1f} %")
        for r in rows if r["allocator"] == args.allocators[-1])
    settings = {r["allocator"]: r["allocator_settings"] for r in rows}
    summary = (
        f"{model} on {result_json['device']} ({', '.join(sources)}), torch {torch.__version__}. Every row "
        "ran in a clean child process of its own; TorchCAM ran under the same allocator setting and memory "
        "layout as iscam (`channels_last`: the model and every frame converted to channels-last; "
        "`default`: glibc's malloc as it starts, MALLOC_* variables removed; `tuned`: "
        f"iscam.allocator.tune_allocator(); mallopt settings {settings}). Seconds and faults are those of "
        "the timed block "
        "(getrusage of the child), peak RSS that of the child. Load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after the run."
        + (f" Largest curve difference batched vs one frame at a time: {max_difference:.1e}."
           if max_difference is not None else "")
        + (f" Largest curve difference contiguous vs channels-last: {max_layout_difference:.1e}."
           if max_layout_difference is not None else "")
        + f" Mean values ({args.allocators[-1]}): {values}."
    )
    print("\n".join(table))
    print(summary)

    command = " ".join(["python benchmarks/metrics_cpu.py", *(sys.argv[1:] if argv is None else argv)])
    result_json["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix: "--out results/metrics_cpu.cuda-h200" must keep its dotted name.
    Path(f"{args.out}.json").write_text(json.dumps(result_json, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(f"# {result_json['benchmark']}\n\nMade by `{command}`.\n\n"
                                      + "\n".join(table) + "\n\n" + summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
