"""GPU smoke check of tokenizer training: a few hundred steps of a reference recipe per precision, plus FSDP.

    python scripts/gpu_check.py                          # titok_s128 stage 1, 300 steps per run
    python scripts/gpu_check.py --experiment titok_b64 --steps 500 --runs bf16 fp16

Runs ``train.py`` as a user would (one process per run, Hydra overrides) on synthetic ImageNet-layout shards that
it writes first with the project's converter (random smooth 288px JPEGs, so data loading and the reference's
preprocessing are exercised), with random teacher weights (no download). Each run's CSV metrics give the figures
printed at the end: median training samples/s after warm-up, peak CUDA memory allocated, final loss, wall time.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# name -> extra overrides; every run gets the common ones of run_overrides()
RUNS: dict[str, list[str]] = {
    "bf16": ["trainer.precision=bf16-mixed"],
    "fp16": ["trainer.precision=16-mixed"],
    "bf16_compile": ["trainer.precision=bf16-mixed", "model.compile_modules=[encoder,decoder]"],
    "fsdp_bf16": ["trainer=fsdp", "trainer.devices=1", "trainer.precision=bf16-mixed"],
    "fsdp_bf16_compile": [
        "trainer=fsdp",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        "model.compile_modules=[encoder,decoder]",
    ],
}


def write_image_folder(folder: Path, num_images: int, num_classes: int, size: int, seed: int) -> None:
    """Class-per-folder JPEGs of upsampled noise (smooth enough to compress like photos)."""
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        class_dir = folder / f"n{index % num_classes:08d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(class_dir / f"{index:06d}.jpg", quality=90)


def make_shards(workdir: Path, num_train: int, num_val: int) -> tuple[Path, Path]:
    train_dir, val_dir = workdir / "shards" / "train", workdir / "shards" / "val"
    if not train_dir.is_dir():
        for split, count, seed, out in (("train", num_train, 0, train_dir), ("val", num_val, 1, val_dir)):
            write_image_folder(workdir / "images" / split, count, num_classes=8, size=288, seed=seed)
            out.mkdir(parents=True)
            command = [
                sys.executable,
                "-m",
                "datamodules.convert",
                "folder",
                str(workdir / "images" / split),
                str(out / f"{split}-%06d.tar"),
                "--maxcount",
                "256",
                "--no-progress",
            ]
            if split == "val":
                command += ["--classes-from", str(train_dir / "classes.json")]
            subprocess.run(command, check=True, cwd=ROOT)
    return train_dir, val_dir


def run_overrides(args, train_dir: Path, val_dir: Path, run_dir: Path) -> list[str]:
    return [
        f"experiment={args.experiment}",
        f"data.train_shards={train_dir}",
        f"data.val_shards={val_dir}",
        f"data.num_workers={args.num_workers}",
        "model.teacher.pretrained=null",  # random teacher: the machine may be offline
        "logger=csv",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=10",
        "callbacks.progress_bar.refresh_rate=100",
        "callbacks.reconstruction_metrics.compute_fid=false",  # Inception weights need the network
        "callbacks.reconstruction_metrics.compute_is=false",
        f"callbacks.image_logger.every_n_steps={args.steps}",
        f"hydra.run.dir={run_dir}",
    ]


def summarize(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv", encoding="utf-8")))

    def series(key: str) -> list[float]:
        return [float(row[key]) for row in rows if row.get(key) not in (None, "")]

    speeds = series("train/samples_per_sec")
    steady = speeds[len(speeds) // 5 :] or speeds  # drop warm-up (allocator, cudnn autotune, compilation)
    memory = series("train/peak_memory_gib")
    losses = series("train/total_loss") or series("train/loss")
    return {
        "img_per_s": statistics.median(steady) if steady else math.nan,
        "peak_gib": max(memory) if memory else math.nan,
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "losses": losses,
        "logged_steps": len(speeds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="titok_s128")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--workdir", type=Path, default=ROOT / ".device" / "gpu_check")
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    train_dir, val_dir = make_shards(args.workdir, args.num_train, args.num_val)
    results = {}
    for name in args.runs:
        run_dir = args.workdir / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a folder with checkpoints would resume instead of starting
        command = [
            sys.executable,
            "train.py",
            *run_overrides(args, train_dir, val_dir, run_dir),
            *RUNS[name],
            *args.overrides,
        ]
        print(f"\n=== {name}: {' '.join(command[2:])}", flush=True)
        start = time.perf_counter()
        try:
            returncode = subprocess.run(command, cwd=ROOT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
        wall = time.perf_counter() - start
        try:
            figures = summarize(run_dir)
        except FileNotFoundError:
            figures = {}
        results[name] = {"returncode": returncode, "wall_s": wall, **figures}
        print(f"=== {name}: {results[name]}", flush=True)

    print(f"\n{args.experiment}, {args.steps} steps per run")
    print(f"{'run':<14}{'rc':>8}{'img/s':>10}{'peak GiB':>10}{'loss first->last':>22}{'wall s':>9}")
    for name, result in results.items():
        losses = f"{result.get('first_loss', math.nan):.4f} -> {result.get('last_loss', math.nan):.4f}"
        print(
            f"{name:<14}{result['returncode']!s:>8}{result.get('img_per_s', math.nan):>10.1f}"
            f"{result.get('peak_gib', math.nan):>10.2f}{losses:>22}{result['wall_s']:>9.0f}"
        )
    if any(result["returncode"] != 0 for result in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
