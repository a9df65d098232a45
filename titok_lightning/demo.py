"""The offline end-to-end demo (``make demo``): tokenizer -> pre-tokenized digits -> class-conditional generator ->
samples -> does it draw the digits it was asked for?

Runs on a CPU with no network, on scikit-learn's embedded handwritten digits (32x32), each stage being the command
a user would type (printed before it runs), all under one folder ``outputs/demo_pipeline/<time>/``:

1. ``python train.py``: the small TiTok of the tokenizer demo (``tokenizer/``);
2. ``python -m titok_lightning.pretokenize``: its tokens of the training digits (``tokens/``);
3. ``python train.py experiment=demo_generator``: a small class-conditional MaskGIT on those tokens
   (``generator/``: checkpoints, sample grids during training, metrics CSV);
4. ``python sample.py``: ``--num-per-class`` digits of every class (``samples/``: PNGs, ``samples.npz``, and
   ``grid.png`` with one row per class);
5. the check: a logistic regression fitted on the real training digits classifies the samples; the share assigned
   to the requested class is printed (about 10% for noise, the bar is 70%) with the same score for real held-out
   digits and for their tokenizer reconstructions as references, and saved to ``demo_metrics.json``.

    python -m titok_lightning.demo                       # everything
    python -m titok_lightning.demo --tokenizer <ckpt>    # reuse a trained demo tokenizer (skips stage 1)

The exit code is 0 when the check passes and 1 when it prints FAIL, so scripts and CI can rely on it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

PASS_ACCURACY = 0.70
# train.py and sample.py live in the checkout next to the package (an editable install: `make install`)
CHECKOUT = Path(__file__).resolve().parents[1]


def run_stage(name: str, command: list[str], timings: dict[str, float]) -> None:
    """Run one stage as a subprocess (its output streams through), timing it; stop the demo if it fails."""
    print(f"\n=== {name}\n$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, check=False)
    timings[name] = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"demo stage {name!r} failed (exit code {result.returncode})")


# ----------------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------------


def digit_features(images: np.ndarray) -> np.ndarray:
    """Images [N, 32, 32, 3] uint8 or [N, 3, 32, 32] float in [0, 1] -> grayscale pooled to 8x8 (the digits'
    native resolution), flattened [N, 64] in [0, 1]: robust to the tokenizer's small blur and shifts."""
    array = np.asarray(images, dtype=np.float32)
    if array.shape[-1] == 3:
        array = array.transpose(0, 3, 1, 2) / 255.0
    gray = torch.from_numpy(array).mean(dim=1, keepdim=True)
    return torch.nn.functional.avg_pool2d(gray, 4).flatten(1).numpy()


def fit_digit_classifier():
    """Logistic regression on the real training digits (the same pixels the tokenizer was trained on)."""
    from sklearn.linear_model import LogisticRegression

    from datamodules.digits import load_digits_arrays

    arrays = load_digits_arrays()
    classifier = LogisticRegression(max_iter=5000)
    classifier.fit(digit_features(arrays.train_images), arrays.train_labels)
    return classifier, arrays


def class_accuracy(classifier, images: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """Share of ``images`` classified as their ``labels``, overall and per class."""
    predicted = classifier.predict(digit_features(images))
    per_class = [float((predicted[labels == c] == c).mean()) for c in range(10)]
    return float((predicted == labels).mean()), per_class


def reconstruction_images(tokenizer_ckpt: Path, images: np.ndarray) -> np.ndarray:
    """Tokenizer reconstructions [N, 3, 32, 32] in [0, 1] of float images [N, 3, 32, 32]."""
    from titok_lightning.frozen_tokenizer import load_frozen_tokenizer

    tokenizer = load_frozen_tokenizer(str(tokenizer_ckpt))
    reconstructions, _ = tokenizer.reconstruct(torch.from_numpy(images))
    return reconstructions.numpy()


def save_class_grid(samples: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 10) -> None:
    """One row per class with its first ``per_class`` samples."""
    from torchvision.utils import save_image

    rows = [samples[labels == c][:per_class] for c in range(10)]
    tiles = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 255.0
    save_image(tiles, path, nrow=per_class, padding=2)


def check(root: Path, tokenizer_ckpt: Path, timings: dict[str, float]) -> dict:
    """Stage 5: classify the samples, print the verdict, write ``demo_metrics.json``."""
    start = time.perf_counter()
    with np.load(root / "samples" / "samples.npz") as data:
        samples = data["arr_0"]
    labels = np.arange(len(samples)) % 10  # sample.py: image i has class i % num_classes
    classifier, arrays = fit_digit_classifier()
    accuracy, per_class = class_accuracy(classifier, samples, labels)
    real_accuracy, _ = class_accuracy(classifier, arrays.val_images, arrays.val_labels)
    recon = reconstruction_images(tokenizer_ckpt, arrays.val_images)
    recon_accuracy, _ = class_accuracy(classifier, recon, arrays.val_labels)
    noise = np.random.default_rng(0).integers(0, 256, samples.shape, dtype=np.uint8)
    noise_accuracy, _ = class_accuracy(classifier, noise, labels)
    save_class_grid(samples, labels, root / "samples" / "grid.png")
    training_grids = sorted((root / "generator").rglob("generated_step_*.png"))
    timings["check"] = time.perf_counter() - start
    metrics = {
        "sample_class_accuracy": accuracy,
        "sample_class_accuracy_per_class": per_class,
        "real_val_accuracy": real_accuracy,
        "tokenizer_reconstruction_val_accuracy": recon_accuracy,
        "noise_accuracy": noise_accuracy,
        "num_samples": len(samples),
        "bar": PASS_ACCURACY,
        "passed": accuracy >= PASS_ACCURACY,
        "seconds": timings,
        "total_seconds": sum(timings.values()),
    }
    (root / "demo_metrics.json").write_text(json.dumps(metrics, indent=1))
    verdict = "PASS" if metrics["passed"] else "FAIL"
    print(
        f"\nClass-conditional samples assigned to the requested digit: {accuracy:.1%} of {len(samples)} "
        f"({verdict}: the bar is {PASS_ACCURACY:.0%})\n"
        f"  same classifier on real held-out digits: {real_accuracy:.1%}, on their tokenizer reconstructions: "
        f"{recon_accuracy:.1%}, on noise: {noise_accuracy:.1%}\n"
        f"  per class: {' '.join(f'{c}:{a:.0%}' for c, a in enumerate(per_class))}\n"
        f"  time: {', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}; "
        f"total {sum(timings.values()) / 60:.1f} min\n"
        f"  pictures: {root / 'samples' / 'grid.png'} (a row per digit), training grids in "
        f"{training_grids[-1].parent if training_grids else root / 'generator'}\n"
        f"  metrics: {root / 'demo_metrics.json'}"
    )
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="demo folder (default outputs/demo_pipeline/<time>)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="reuse this demo tokenizer .ckpt (skip stage 1)")
    parser.add_argument("--num-per-class", type=int, default=50, help="samples per digit")
    parser.add_argument("overrides", nargs="*", help="extra overrides of the generator training (stage 3)")
    args = parser.parse_args(argv)
    root = args.root or Path("outputs") / "demo_pipeline" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    train_py, sample_py = (str(CHECKOUT / name) for name in ("train.py", "sample.py"))
    if not Path(train_py).is_file():
        raise SystemExit(f"the demo runs train.py and sample.py of a checkout; none at {CHECKOUT} (pip install -e .)")
    timings: dict[str, float] = {}

    tokenizer_ckpt = args.tokenizer
    if tokenizer_ckpt is None:
        run_stage("tokenizer", [python, train_py, f"hydra.run.dir={root / 'tokenizer'}"], timings)
        tokenizer_ckpt = root / "tokenizer" / "checkpoints" / "last.ckpt"
    tokenizer_ckpt = tokenizer_ckpt.resolve()

    from datamodules.digits import prepare_digits

    digits = prepare_digits()
    tokens = root / "tokens"
    command = [python, "-m", "titok_lightning.pretokenize", "--tokenizer", str(tokenizer_ckpt), "--data"]
    command += [*digits.train, "--out", str(tokens), "--no-flip"]  # mirrored digits are not digits
    command += ["--num-workers", "0", "--batch-size", "250", "--overwrite", "--accelerator", "cpu"]
    run_stage("pretokenize", command, timings)

    command = [
        python,
        train_py,
        "experiment=demo_generator",
        f"model.tokenizer={tokenizer_ckpt}",
        f"data.train_shards={tokens}",
        f"hydra.run.dir={root / 'generator'}",
        *args.overrides,
    ]
    run_stage("generator", command, timings)

    command = [
        python,
        sample_py,
        f"ckpt_path={root / 'generator' / 'checkpoints' / 'last.ckpt'}",
        f"num_per_class={args.num_per_class}",
        f"output_dir={root / 'samples'}",
        "batch_size=100",
        "metrics.enabled=false",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={root / 'samples' / 'hydra'}",
    ]
    run_stage("sample", command, timings)
    return check(root, tokenizer_ckpt, timings)


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
