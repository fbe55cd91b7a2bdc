"""Seconds per image of ROAD (MoRF + LeRF, 9 fractions each) on the CPU, split into imputation and forwards.

For each Coral model at its own input size (MobileNetV1 0.25 at 128x128, the ``quick`` profile's model;
MobileNetV2 at 224x224) the script explains ``--images`` real sample images with Grad-CAM (the map's
origin does not change the cost much: it sets the shape of the removed regions) and times
``metrics.road_curve`` in both orders at ROAD's fractions 10 %, ..., 90 % with ROAD's noise. It also times
the imputation alone (:func:`iscam.road.linear_imputation` on the same masks), so the forwards' share is
the difference, and projects the cost of the ``quick`` profile (100 images x 7 methods at 128x128).

    python benchmarks/road_cpu.py                 # 3 images per model, one thread; writes results/road_cpu.*
    python benchmarks/road_cpu.py --images 10 --models mobilenet_v1_coral_tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from process_cost import cpu_name

from iscam import methods, metrics, models, road
from iscam.data import ManifestDataset, sample_manifest

RESULTS = REPO / "benchmarks" / "results"
ORDERS = ("morf", "lerf")
QUICK_IMAGES, QUICK_METHODS = 100, 7


def time_road(model: nn.Module, x: Tensor, saliency: Tensor, target: Tensor, noise: tuple[float, ...],
              batch_size: int) -> dict[str, Any]:
    """CPU seconds per image of ``road_curve`` and of the imputation alone, per order, with the curves."""
    count = x.shape[0]
    report: dict[str, Any] = {}
    for order in ORDERS:
        masks = road.removal_masks(saliency, order=order)
        cpu = time.process_time()
        for fraction in range(masks.shape[1]):
            road.linear_imputation(x, masks[:, fraction])
        imputation = time.process_time() - cpu
        cpu, wall = time.process_time(), time.perf_counter()
        curve = metrics.road_curve(model, x, saliency, target, order=order, noise=noise, seed=0,
                                   batch_size=batch_size)
        total, total_wall = time.process_time() - cpu, time.perf_counter() - wall
        report[order] = {
            "road_curve_cpu_s_per_image": total / count,
            "road_curve_wall_s_per_image": total_wall / count,
            "imputation_cpu_s_per_image": imputation / count,
            "mean_curve": curve.mean(dim=0).tolist(),
        }
    report["both_orders_cpu_s_per_image"] = sum(report[order]["road_curve_cpu_s_per_image"]
                                                for order in ORDERS)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v1_coral_tiny", "mobilenet_v2_coral"])
    parser.add_argument("--images", type=int, default=3, help="sample images per model (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="imputed images per forward (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "road_cpu", help="output path, no suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.models:
        loaded = models.load(name)
        dataset = ManifestDataset(sample_manifest(), loaded.preprocess, limit=args.images)
        x = torch.stack([dataset[i].image for i in range(len(dataset))])
        with torch.no_grad():
            target = loaded.model(x).argmax(dim=1)
        with methods.get("gradcam", loaded.model, loaded.target_layer) as cam:
            saliency = cam(x, target)
        noise = road.road_noise(loaded.preprocess.std)
        report = time_road(loaded.model, x, saliency, target, noise, args.batch_size)
        report.update(model=name, size=loaded.preprocess.size, images=x.shape[0])
        rows.append(report)
        seconds = report["both_orders_cpu_s_per_image"]
        print(f"{name} {loaded.preprocess.size}px: ROAD both orders {seconds:.2f} CPU s/image", flush=True)

    header = ("| model | input | order | road_curve CPU s/img | of which imputation | wall s/img |\n"
              "|---|---:|---|---:|---:|---:|")
    lines = [f"| {row['model']} | {row['size']}² | {order} | {row[order]['road_curve_cpu_s_per_image']:.3f} "
             f"| {row[order]['imputation_cpu_s_per_image']:.3f} "
             f"| {row[order]['road_curve_wall_s_per_image']:.3f} |"
             for row in rows for order in ORDERS]
    projections = []
    for row in rows:
        seconds = row["both_orders_cpu_s_per_image"]
        projections.append(f"- {row['model']} ({row['size']}²): both orders {seconds:.2f} CPU s/image; "
                           f"{QUICK_IMAGES} images x {QUICK_METHODS} methods = "
                           f"{QUICK_IMAGES * QUICK_METHODS * seconds / 60:.1f} CPU min")
    setting = (f"{cpu_name()}, {args.threads} torch thread(s), torch {torch.__version__}; "
               f"{args.images} sample image(s) per model, Grad-CAM maps, 9 fractions per order, ROAD noise, "
               f"batch_size={args.batch_size}; seconds are process CPU time")
    markdown = "\n".join(["# ROAD on the CPU", "", "Made by `python benchmarks/road_cpu.py`.", "", header,
                          *lines, "", *projections, "", setting + "."])
    print()
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    payload = {"setting": setting, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
