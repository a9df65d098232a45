"""scripts/benchmark.py's CPU dry run: every row of issue 12's table at micro sizes, one train.py run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT.parent / "shared" / "bench" / "reference_h200.json"
ROWS = [
    "titok_b64 stage1 full step",
    "titok_b64 stage2 full step",
    "RAR-B training",
    "MaskGIT-L32 training",
    "MaskGIT-L32 training + tokenizer",
    "RAR-B sampling B=128",
    "RAR-B sampling B=64",
    "MaskGIT-L32 sampling B=64",
    "TiTok-L32 reconstruction B=64",
]


def test_dry_run_prints_every_row_with_finite_figures(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "scripts/benchmark.py", "--dry-run", "--train-runs", "rar_b", "--out", str(out)]
    command += ["--profile", "5", "--precision-check", "rar_b", "--budget-s", "1e6"]
    command += ["--reference", str(tmp_path / "no_reference_here")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    table = result.stdout.split("fp32 agreement")[1]
    lines = {line[:34].strip(): line for line in table.splitlines() if line[:34].strip() in ROWS}
    assert sorted(lines) == sorted(ROWS)
    stored = json.loads(STORED.read_text())["results"]
    report = json.loads(out.read_text())
    assert report["reference"].startswith("stored")
    # under a budget the cheapest rows run first; the table and the JSON keep the order
    ran = [line[2:].split(": ours ")[0] for line in result.stdout.splitlines() if ": ours " in line]
    assert ran[:3] == ["RAR-B sampling B=128", "RAR-B sampling B=64", "MaskGIT-L32 sampling B=64"]
    assert [row["row"] for row in report["rows"]] == ROWS and report["skipped"] == []
    for row in report["rows"]:
        assert math.isfinite(row["img_per_s"]) and row["img_per_s"] > 0, row
        assert math.isfinite(row["reference_img_per_s"]) and row["reference_img_per_s"] > 0, row
        assert row["reference_note"].startswith("stored"), row
        assert not row["agreement"].startswith("FAILED"), row
        if "training" in row["row"] or "full step" in row["row"]:
            assert row["flops_per_image"] > 0, row
        # --profile 5: one more call of the row under torch.profiler, its top events and launches
        assert len(row["profile"]) == 5 and row["launches"] > 0, row
        for entry in row["profile"]:
            assert entry["self_ms"] > 0 and 0 < entry["share"] <= 1 and entry["count"] >= 1, row
        assert ("launches_per_step" in row) == ("sampling" in row["row"]), row
        if "reconstruction" in row["row"]:  # the channels-last lever (compiled too on CUDA): speed and same output
            assert row["channels_last_img_per_s"] > 0 and row["channels_last_max_abs_diff"] < 0.05, row
        if "sampling" in row["row"]:  # the CUDA-graph lever: the same call without graphs (eager here), same ids
            assert row["cuda_graph_same_ids"] is True and row["no_cuda_graph_img_per_s"] > 0, row
    profiles = result.stdout.split("Kernel profile:")[1]
    assert sorted(line[3:].split(":")[0] for line in profiles.splitlines() if line.startswith("## ")) == sorted(ROWS)
    # the stored figure of a row measured at the same batch is the JSON's, e.g. stage 1 at batch 32
    stage1 = next(r for r in report["rows"] if r["row"] == "titok_b64 stage1 full step")
    assert stage1["reference_img_per_s"] == stored["titok_b64_stage1_train"]["images_per_s"]
    teacher = report["teacher_option"]  # the bf16 / channels-last teacher option against fp32 codes
    for label in ("fp32", "bf16", "fp32_channels_last", "bf16_channels_last"):
        assert teacher[label]["img_per_s"] > 0 and 0.0 <= teacher[label]["codes_equal_fp32"] <= 1.0
    assert teacher["fp32"]["codes_equal_fp32"] == 1.0
    run = report["train_runs"]["rar_b"]
    assert run["returncode"] == 0 and math.isfinite(run["img_per_s"]) and run["img_per_s"] > 0
    # --precision-check: the recipe's precision (fp32 at micro size) with seeds 0 and 1, bf16-mixed with seed 0
    check = report["precision_check"]
    assert [r["returncode"] for r in check["runs"].values()] == [0, 0, 0]
    assert all(len(curve) == 6 and all(map(math.isfinite, curve)) for curve in check["windows"].values())
    assert check["noise"] > 0 and check["difference"] > 0  # another seed, another precision: other losses
    assert check["trains_the_same"] == (check["difference"] <= check["noise"])
    assert "Precision check: rar_b, 6 steps" in result.stdout


def test_a_budget_leaves_out_what_no_longer_fits_and_says_so(tmp_path):
    """--budget-s 0: every part is skipped by name (nothing is half-run), the JSON lists them, rc 0."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "scripts/benchmark.py", "--dry-run", "--budget-s", "0", "--train-runs", "rar_b"]
    command += ["--out", str(out), "--reference", str(tmp_path / "no_reference_here")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rows"] == [] and report["train_runs"] == {} and report["teacher_option"] == {}
    assert sorted(report["skipped"]) == sorted([*ROWS, "proxy-code teacher", "train.py rar_b"])
    assert "# SKIPPED (--budget-s): RAR-B sampling B=128, " in result.stdout  # the cheapest rows first


def test_overrides_reach_our_training_rows(tmp_path):
    """--override: Hydra overrides of our side of a training row (a lever to measure), here its precision."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "scripts/benchmark.py", "--dry-run", "--rows", "RAR-B training", "--no-train-runs"]
    command += ["--override", "trainer.precision=32-true", "model.max_grad_norm=0.5"]
    command += ["--out", str(out), "--reference", str(tmp_path / "no_reference_here")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["override"] == ["trainer.precision=32-true", "model.max_grad_norm=0.5"]
    (row,) = report["rows"]
    assert row["row"] == "RAR-B training" and row["precision"] == "32-true", row  # the recipe's: bf16-mixed
