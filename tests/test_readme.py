"""The README: its model-zoo table lists exactly the registered official checkpoints, and its commands work as
printed (parsed from README.md, so the docs and the tests cannot drift)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from tests.test_configs import ROOT, compose_job
from tests.test_train import digits_cache  # noqa: F401 (fixture)
from titok_lightning.zoo import model_zoo_markdown
from train import check_mandatory

README = ROOT / "README.md"


def test_readme_model_zoo_matches_registry():
    table = model_zoo_markdown()
    assert table.count("\n") >= 27, "every official tokenizer and generator is in the registry"
    assert table in README.read_text(), "README model zoo is stale: paste `python -m titok_lightning.zoo`"


# ------------------------------------------------------------------------------------------ the command blocks
# A ```bash block preceded by this comment is only composed (its commands need data, GPUs or a cluster); the
# python commands of every other block are run, with only data paths and step counts swapped for tiny ones.
NOT_RUN = re.compile(r"<!-- not run by tests: (.+?) -->")
BLOCK = re.compile(r"^(?:<!-- not run by tests: (.+?) -->\n)?```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def bash_blocks() -> list[tuple[str | None, str]]:
    """(reason it is not run or None, body) of every ```bash block of the README."""
    return [(match.group(1), match.group(2)) for match in BLOCK.finditer(README.read_text())]


def python_commands(body: str, cwd: Path) -> list[list[str]]:
    """The arguments of each ``python`` command of a block as bash builds them (quotes, braces, $(...), variables,
    comments): the block runs in bash with ``python`` and ``make`` replaced by functions that only record."""
    recorder = "python() { printf '%s\\0' \"$@\"; printf '\\n'; }\nmake() { :; }\n"
    result = subprocess.run(["bash", "-c", recorder + body], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [record.split("\0")[:-1] for record in result.stdout.split("\n") if record]


def split(args: list[str]) -> tuple[str, list[str], list[str]]:
    """python argv -> (script, flags such as -m, overrides)."""
    return args[0], [a for a in args[1:] if a.startswith("-")], [a for a in args[1:] if not a.startswith("-")]


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job of a multirun, as Hydra's basic sweeper splits them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    return jobs


def test_every_block_is_run_or_marked_and_every_command_composes_as_printed(tmp_path):
    blocks = bash_blocks()
    assert len(blocks) == README.read_text().count("```bash"), "a marker that is not right above its block"
    assert len(NOT_RUN.findall(README.read_text())) == sum(reason is not None for reason, _ in blocks)
    composed = 0
    for reason, body in blocks:
        for args in python_commands(body, tmp_path):
            script, flags, overrides = split(args)
            if reason is None:  # run by test_unmarked_blocks_run below, which knows train.py commands only
                assert script == "train.py", f"README command not run by the tests and not marked: {args}"
            if script not in ("train.py", "sample.py"):
                continue
            for job in sweep_jobs(overrides) if "-m" in flags else [overrides]:
                cfg = compose_job(script.removesuffix(".py"), job, tmp_path)
                if script == "train.py":
                    check_mandatory(cfg)  # the command gives every mandatory setting
                if script == "train.py" and cfg.get("reference_global_batch"):  # a recipe, trained as the reference
                    processes = cfg.trainer.devices * cfg.trainer.num_nodes
                    batch = cfg.data.batch_size * cfg.model.accumulate_grad_batches * processes
                    assert batch == cfg.reference_global_batch, f"{args}: global batch {batch}"
                for override in job:  # brace patterns reach the datamodule unexpanded and unquoted
                    key, _, value = override.partition("=")
                    if key.startswith("data.") and "{" in value:
                        assert OmegaConf.select(cfg, key) == value.strip("'\""), override
                composed += 1
    assert composed >= 15


def test_unmarked_blocks_run(tmp_path, digits_cache):  # noqa: F811
    commands = [args for reason, body in bash_blocks() if reason is None for args in python_commands(body, tmp_path)]
    assert len(commands) >= 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PROJECT_ROOT", None)
    for number, args in enumerate(commands):
        _, flags, overrides = split(args)
        swaps = [f"data.cache_dir={digits_cache}", "trainer.limit_val_batches=1"]
        swaps += [] if any(o.startswith("trainer.max_steps=") for o in overrides) else ["trainer.max_steps=2"]
        cwd = tmp_path / f"command{number}"
        cwd.mkdir()
        command = [sys.executable, str(ROOT / "train.py"), *args[1:], *swaps]
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{args}\n{result.stderr[-3000:]}"
        kind = "multiruns" if "-m" in flags else "runs"
        (run,) = (cwd / "outputs" / "demo" / kind).iterdir()
        jobs = [run / "0", run / "1"] if kind == "multiruns" else [run]
        for job in jobs:
            assert (job / "checkpoints" / "last.ckpt").is_file(), args
            assert (job / "train.log").read_text().count("GPU available") == 1, args  # its own messages only
