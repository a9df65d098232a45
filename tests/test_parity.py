"""Parity with the reference implementation on golden fixtures and official checkpoint manifests.

Every fixture in ``$TITOK_PARITY_DIR`` (default ``../shared/parity``) is one test; a fixture whose
entry has no runner fails. Every manifest maps key for key and shape for shape onto the registry's
full-size model, built on the meta device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.parity_runners import Fixture, all_manifest_resolvers, all_runners
from titok_lightning.convert import convert_reference_state_dict
from titok_lightning.registry import create_model

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("TITOK_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))
FIXTURES = sorted(PARITY_DIR.glob("*.json"))
MANIFESTS = sorted(p for p in (PARITY_DIR / "manifests").glob("*.json") if p.name != "index.json")


def test_parity_directory_is_not_empty():
    assert FIXTURES, f"no parity fixtures found in {PARITY_DIR} (set TITOK_PARITY_DIR)"


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, spec: dict, atol: float, rtol: float):
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    if spec.get("exact") or not expected.is_floating_point():
        assert torch.equal(actual.to(expected.dtype), expected), f"{name}: integer output differs"
        return
    actual = actual.detach().to(torch.float64)
    expected = expected.to(torch.float64)
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert bool((err <= bound).all()), f"{name}: max |err| {err.max().item():.3e} is {worst:.2f}x the tolerance"


@pytest.mark.parametrize("fixture_path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture(fixture_path: Path):
    fixture = Fixture.load(fixture_path)
    runners = all_runners()
    assert fixture.name in runners, f"no parity runner for fixture entry {fixture.name!r}"
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = runners[fixture.name](fixture)
    declared = fixture.meta["outputs"]
    assert set(outputs) >= set(declared), f"runner did not produce {sorted(set(declared) - set(outputs))}"
    for name, spec in declared.items():
        _compare(name, outputs[name], fixture.outputs[name], spec, fixture.meta["atol"], fixture.meta["rtol"])


@pytest.mark.parametrize("manifest_path", MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_manifest_maps_onto_registry_model(manifest_path: Path):
    manifest = json.loads(manifest_path.read_text())
    resolvers = all_manifest_resolvers()
    assert manifest["reference_class"] in resolvers, f"no resolver for {manifest['reference_class']}"
    variant, overrides = resolvers[manifest["reference_class"]](manifest["config"])
    with torch.device("meta"):
        model = create_model(variant, **overrides)
    entries = manifest["state_dict"]
    entries = entries.items() if isinstance(entries, dict) else entries
    reference = {k: torch.empty(shape, device="meta") for k, shape in entries}
    converted = convert_reference_state_dict(model, reference)
    ours = model.state_dict()
    assert set(converted) == set(ours), (
        f"{variant}: missing {sorted(set(ours) - set(converted))[:10]}, "
        f"unexpected {sorted(set(converted) - set(ours))[:10]}"
    )
    mismatched = [k for k in ours if tuple(ours[k].shape) != tuple(converted[k].shape)]
    assert not mismatched, f"{variant}: shape mismatch in {mismatched[:10]}"
    num_parameters = sum(p.numel() for p in model.parameters())
    assert num_parameters == manifest["num_parameters"], f"{variant}: {num_parameters} parameters"
