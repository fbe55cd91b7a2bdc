"""Images per second for insertion + deletion (RISE, step 224): batched frames vs one frame at a time.

Each image costs 2 x 225 forward passes at 224x224 (n = ceil(224*224/224) = 224 steps, 225 frames per
curve). "batched" sends the frames of all images through the model ``--batch-size`` at a time;
"one frame at a time" is the same code with ``batch_size=1``, i.e. RISE's loop. The two must give the
same curves; the largest difference is printed as a check.

The model has random weights (no downloads here) and the inputs are random normalised images with
random saliency maps: the cost of the metric does not depend on what the map shows.

    python benchmarks/metrics_cpu.py          # CPU; writes benchmarks/results/metrics_cpu.{json,md}
    python benchmarks/metrics_cpu.py --device cuda --images 32 --single-images 2 --out /tmp/metrics_cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision

from iscam import metrics

RESULTS = Path(__file__).resolve().parent / "results"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_curves(model, x, saliency, target, step: int, batch_size: int) -> tuple[float, torch.Tensor]:
    device = x.device
    _synchronize(device)
    start = time.perf_counter()
    deletion = metrics.deletion_curve(model, x, saliency, target, step=step, batch_size=batch_size)
    insertion = metrics.insertion_curve(model, x, saliency, target, step=step, batch_size=batch_size)
    _synchronize(device)
    return time.perf_counter() - start, torch.stack([deletion, insertion], dim=1).cpu()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {torch.get_num_threads()} torch thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="torchvision classifier, random weights")
    parser.add_argument("--images", type=int, default=2, help="images timed with batched frames")
    parser.add_argument("--single-images", type=int, default=1, help="images timed one frame at a time")
    parser.add_argument("--step", type=int, default=224)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default because oversubscribed threads on a shared "
                             "machine make small batches far slower, not faster")
    parser.add_argument("--out", type=Path, default=RESULTS / "metrics_cpu",
                        help="output path without suffix (.json and .md are written)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = getattr(torchvision.models, args.model)(weights=None).eval().to(device)
    generator = torch.Generator().manual_seed(0)
    count = max(args.images, args.single_images)
    x = torch.randn(count, 3, args.size, args.size, generator=generator).to(device)
    saliency = torch.rand(count, args.size, args.size, generator=generator).to(device)
    with torch.no_grad():
        target = model(x).argmax(dim=1)  # the paper's protocol: the clean argmax
        model(x[:1].expand(min(args.batch_size, 8), -1, -1, -1))  # warm-up (allocator, cuDNN autotune)

    frames = 2 * (-(-args.size * args.size // args.step) + 1)
    batched_s, batched_curves = _time_curves(model, x[: args.images], saliency[: args.images],
                                             target[: args.images], args.step, args.batch_size)
    single_s, single_curves = _time_curves(model, x[: args.single_images], saliency[: args.single_images],
                                           target[: args.single_images], args.step, 1)
    common = min(args.images, args.single_images)
    max_difference = float((batched_curves[:common] - single_curves[:common]).abs().max())

    rows = [
        {"mode": f"batched (batch_size={args.batch_size})", "images": args.images, "seconds": batched_s,
         "images_per_s": args.images / batched_s, "frames_per_s": args.images * frames / batched_s},
        {"mode": "one frame at a time (batch_size=1)", "images": args.single_images, "seconds": single_s,
         "images_per_s": args.single_images / single_s,
         "frames_per_s": args.single_images * frames / single_s},
    ]
    speedup = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    result = {
        "benchmark": "insertion + deletion curves (iscam.metrics), step %d" % args.step,
        "model": f"torchvision {args.model} (random weights), {args.size}x{args.size}",
        "device": _device_name(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "frames_per_image": frames,
        "rows": rows,
        "speedup": speedup,
        "max_abs_difference_batched_vs_single": max_difference,
    }

    table = [
        "| mode | images | seconds | images/s | frames/s |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['mode']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | "
          f"{r['frames_per_s']:.1f} |" for r in rows],
    ]
    summary = (f"{result['model']} on {result['device']}, torch {torch.__version__}; {frames} forward passes "
               f"per image; batched / one-at-a-time = {speedup:.2f}x; largest curve difference "
               f"{max_difference:.1e}.")
    print("\n".join(table))
    print(summary)

    command = " ".join(["python benchmarks/metrics_cpu.py", *sys.argv[1:]])
    result["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix: "--out results/metrics_cpu.cuda-h200" must keep its dotted name.
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(
        f"# {result['benchmark']}\n\nMade by `{command}`.\n\n"
        + "\n".join(table) + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
