"""The README's model-zoo table lists exactly the registered official checkpoints."""

from pathlib import Path

from titok_lightning.zoo import model_zoo_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_zoo_matches_registry():
    table = model_zoo_markdown()
    assert table.count("\n") >= 27, "every official tokenizer and generator is in the registry"
    assert table in README.read_text(), "README model zoo is stale: paste `python -m titok_lightning.zoo`"
