"""The import graph keeps its floors: no module imports from a floor above its own.

Every ``import`` statement of the project's Python files (inside functions too) is parsed with ``ast``. The one
sanctioned way up, the registry importing ``titok_lightning.models`` so that the model files register their
variants, goes through ``importlib`` and is not an import statement.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("titok_lightning", "callbacks", "datamodules")
SCRIPTS = ("train.py", "sample.py", "scripts")

# lowest first; a module belongs to the floor of its longest listed prefix
FLOORS: list[tuple[str, ...]] = [
    (
        "titok_lightning",  # the package's __init__: the registry's names
        "titok_lightning.registry",
        "titok_lightning.cli",
        "titok_lightning.convert",
        "titok_lightning.tensors",
        "titok_lightning.schedules",
        "titok_lightning.sampling",
        "titok_lightning.text_encoder",
        "titok_lightning.metrics",
        "titok_lightning.torch_files",
    ),
    ("titok_lightning.models",),
    ("titok_lightning.losses",),
    ("titok_lightning.loading", "titok_lightning.frozen_tokenizer"),
    ("titok_lightning.lit",),
    ("callbacks", "datamodules"),
    (
        "titok_lightning.hub",
        "titok_lightning.export",
        "titok_lightning.pretokenize",
        "titok_lightning.demo",
        "titok_lightning.zoo",
        "train",
        "sample",
        "scripts",
    ),
]


def floor_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, floor)
    for floor, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), floor)
    return None if best is None else best[1]


def project_files() -> list[Path]:
    files = [p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")]
    for script in SCRIPTS:
        path = REPO_ROOT / script
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return sorted(files)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = REPO_ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[int, str, bool]]:
    """(line, project module, at module level) of every import statement of ``path`` that names this project."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from package import submodule`` imports the submodule
            names = [
                f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module for a in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((node.lineno, name, id(node) in top_level))
    return found


def test_every_project_module_has_a_floor():
    unplaced = [module_name(p) for p in project_files() if floor_of(module_name(p)) is None]
    assert not unplaced, f"place these modules in a floor of tests/test_layers.py: {unplaced}"


def test_no_import_runs_up_a_floor():
    violations = []
    for path in project_files():
        module = module_name(path)
        own = floor_of(module)
        for line, name, _ in imported_modules(path):
            target = floor_of(name)
            if target is not None and own is not None and target > own:
                violations.append(
                    f"{path.relative_to(REPO_ROOT)}:{line} ({module}, floor {own}) imports {name} (floor {target})"
                )
    assert not violations, "imports up a floor:\n" + "\n".join(violations)


def test_library_does_not_import_callbacks_or_datamodules_at_import_time():
    """``import titok_lightning...`` must work without the training-side packages."""
    violations = []
    for path in project_files():
        if module_name(path).split(".")[0] != "titok_lightning":
            continue
        for line, name, top in imported_modules(path):
            if top and name.split(".")[0] in ("callbacks", "datamodules"):
                violations.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {name}")
    assert not violations, violations


def test_the_floor_check_sees_an_upward_import(tmp_path):
    """The parser finds imports inside functions and resolves ``from package import submodule``."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from titok_lightning import loading\n    import callbacks.ema\n")
    names = [(name, top) for _, name, top in imported_modules(source)]
    assert names == [("titok_lightning.loading", False), ("callbacks.ema", False)]
    assert floor_of("titok_lightning.loading") < floor_of("callbacks.ema") < floor_of("train")
    assert floor_of("titok_lightning.lit.base") > floor_of("titok_lightning.loading")
