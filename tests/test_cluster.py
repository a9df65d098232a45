"""Clusters simulated on one CPU machine: SLURM preemption (SLURM's environment variables set by the test, the signal
sent by the test, scontrol present or not) resumes exactly; two "nodes" of one process each, started with the
variables a cluster sets, under DDP and FSDP: the ranks' weights agree, each sample is seen once per epoch across
ranks (validation included), and the run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.test_configs import needs_fsdp2
from tests.test_resume import (
    assert_same_run,
    checkpoint,
    finish,
    start,
    wait_for,
)
from tests.test_train import digits_cache, tiny_overrides  # noqa: F401 (digits_cache: a fixture)
from titok_lightning.tensors import is_sharded

ROOT = Path(__file__).resolve().parents[1]
SLURM_TRAINER = ["trainer=slurm", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]


def slurm_env(tasks: int = 1, procid: int = 0, port: int | None = None, **extra: str) -> dict[str, str]:
    """What srun sets for task ``procid`` of a job with one task per node on ``tasks`` nodes (here all localhost)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": str(tasks),
        "SLURM_NNODES": str(tasks),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(procid),
        "SLURM_NODELIST": "localhost",
        **extra,
    }
    if port is not None:
        env["MASTER_PORT"] = str(port)
    return env


def test_slurm_preemption_signals_save_requeue_and_resume_exactly(tmp_path, digits_cache):  # noqa: F811
    steps = ["trainer.num_nodes=1"]
    reference = tmp_path / "reference"  # the same job never preempted (DDP draws other random numbers than cpu)
    finish(start(reference, digits_cache, *SLURM_TRAINER, *steps, env=slurm_env()))
    run_dir = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)

    # SLURM's warning before the time limit, with scontrol: the job is requeued, the process ends with 0
    env = slurm_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    process = start(run_dir, digits_cache, *SLURM_TRAINER, *steps, env=env)
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000006.ckpt").exists(), process, "step 6")
    os.killpg(process.pid, signal.SIGUSR1)
    output = finish(process, expected_rc=0)
    assert "requeued SLURM job 4242" in output
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    first_stop = checkpoint(run_dir)["global_step"]

    # the requeued job; where scontrol is missing the run says so in one line and exits with the checkpoint
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "scontrol").exists())
    process = start(run_dir, digits_cache, *SLURM_TRAINER, *steps, env=slurm_env(PATH=path))
    wait_for(lambda: checkpoint(run_dir)["global_step"] >= first_stop + 5, process, "five more steps")
    os.killpg(process.pid, signal.SIGUSR2)
    output = finish(process, expected_rc=128 + signal.SIGUSR2)
    (line,) = [line for line in output.splitlines() if "scontrol is not available" in line]
    assert line.startswith("SIGUSR2: saved") and "resubmit" in line

    finish(start(run_dir, digits_cache, *SLURM_TRAINER, *steps, env=slurm_env(PATH=path)))
    assert_same_run(run_dir, reference)


class DataAndWeightLog(L.Callback):
    """Each rank appends the keys of its training and validation batches to ``<folder>/keys-rank<r>.jsonl`` and, at
    the end of training, writes its full model weights (FSDP shards gathered) to ``<folder>/weights-rank<r>.pt``."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def _append(self, trainer, record: dict) -> None:
        with open(self.folder / f"keys-rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._append(trainer, {"epoch": trainer.current_epoch, "keys": list(batch["key"])})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._append(trainer, {"validation": trainer.global_step, "keys": list(batch["key"])})

    def on_train_end(self, trainer, pl_module):
        weights = {}
        for name, value in pl_module.model.state_dict().items():
            weights[name] = value.full_tensor() if is_sharded(value) else value
        torch.save(weights, self.folder / f"weights-rank{trainer.global_rank}.pt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_nodes(run_dir: Path, cache: str, overrides: list[str], node_env) -> None:
    """Both "nodes" of one job (the same command and run folder, each with its node's variables)."""
    port = free_port()
    processes = [start(run_dir, cache, *overrides, env=node_env(node, port)) for node in (0, 1)]
    for process in processes:
        finish(process)


def ddp_node_env(node: int, port: int) -> dict[str, str]:
    return slurm_env(tasks=2, procid=node, port=port)


def fsdp_node_env(node: int, port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node), "WORLD_SIZE": "2"}


@pytest.mark.parametrize(
    "strategy, node_env",
    [
        pytest.param(SLURM_TRAINER, ddp_node_env, id="ddp-slurm-variables"),
        pytest.param(
            ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1"],
            fsdp_node_env,
            id="fsdp-torch-variables",
            marks=needs_fsdp2,
        ),
    ],
)
def test_two_nodes_agree_see_each_sample_once_and_resume(strategy, node_env, tmp_path, digits_cache):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = [
        *strategy,
        "trainer.num_nodes=2",
        "trainer.precision=32-true",
        "data.num_workers=0",
        "data.batch_size=32",  # 1497 // 2 ranks // 32 = 23 batches per rank and epoch
        "++data.samples_per_epoch=null",
        "trainer.val_check_interval=20",
        "trainer.limit_val_batches=null",
        "++model.tokenizer.clustering_vq=false",  # its codebook refresh draws different numbers on each rank
        f"+callbacks.log={{_target_:tests.test_cluster.DataAndWeightLog,folder:{run_dir}}}",
    ]
    run_two_nodes(run_dir, digits_cache, [*overrides, "trainer.max_steps=12"], node_env)
    assert checkpoint(run_dir)["global_step"] == 12
    run_two_nodes(run_dir, digits_cache, [*overrides, "trainer.max_steps=30"], node_env)  # resumes at step 12
    assert checkpoint(run_dir)["global_step"] == 30

    weights = [torch.load(run_dir / f"weights-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name
    records = [json.loads(line) for rank in (0, 1) for line in open(run_dir / f"keys-rank{rank}.jsonl")]
    epoch0 = [key for record in records if record.get("epoch") == 0 for key in record["keys"]]
    assert len(epoch0) == len(set(epoch0)) == 2 * 23 * 32  # the whole epoch, across ranks and both runs, once each
    epoch1 = [key for record in records if record.get("epoch") == 1 for key in record["keys"]]
    assert len(epoch1) == len(set(epoch1)) == 2 * (30 - 23) * 32
    validations = sorted({record["validation"] for record in records if "validation" in record})
    assert validations == [20]
    validated = [key for record in records if record.get("validation") == 20 for key in record["keys"]]
    assert len(validated) == len(set(validated)) == 300  # every held-out digit once, over both ranks
