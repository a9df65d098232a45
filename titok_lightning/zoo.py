"""Print the README's model-zoo table: ``python -m titok_lightning.zoo``."""

import argparse

from titok_lightning.registry import get_spec, list_models


def model_zoo_markdown() -> str:
    """Every registered variant with an official checkpoint, as a markdown table."""
    rows = ["| name | family | class | tokens | official weights |", "|---|---|---|---|---|"]
    for name in list_models():
        spec = get_spec(name)
        if spec.checkpoint:
            rows.append(
                f"| `{name}` | {spec.family} | {spec.model_cls.__name__} | {spec.tokens} | `{spec.checkpoint}` |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m titok_lightning.zoo", description="Print the model-zoo table of the README (markdown)."
    )
    parser.parse_args(argv)  # no options: --help, and an error for anything else
    print(model_zoo_markdown())


if __name__ == "__main__":
    main()
