"""Shared training machinery of every LightningModule in the project (tokenizers and generators).

Manual optimization with one AdamW per *role* (``"model"`` always; GAN modules add ``"discriminator"``):

- ``trainer.global_step`` counts optimizer steps of the ``"model"`` role only (the discriminator's steps
  go through the strategy directly so they do not advance it), so ``max_steps``, ``discriminator_start``
  and checkpoint intervals mean what they mean in the reference;
- gradient accumulation: one training batch is one optimizer step; ``training_step`` splits it into
  ``accumulate_grad_batches`` equal micro-batches (``train.py`` makes training batches that large), runs
  :meth:`micro_step` on each and steps the optimizers after the last (DDP syncs only the last one). Lightning's
  batch counters (log and validation intervals, the logged step, the saved data position, where a stop signal
  saves) therefore count optimizer steps, as the reference's do; schedules are counted in optimizer steps;
- gradient clipping and the grad-norm log happen in ``on_before_optimizer_step``, i.e. after the
  GradScaler has unscaled the gradients (16-mixed) and, under FSDP, with the global norm over all shards;
- under ``trainer=fsdp`` the trainable networks shard their transformer blocks in ``configure_model``;
- a non-finite gradient norm either raises before the weights change (``nonfinite="raise"``) or drops
  the step, counts it and says so (``nonfinite="skip"``; after ``nonfinite_max_consecutive`` dropped steps in a
  row it raises: the run has diverged); under 16-mixed the GradScaler skips such steps itself;
- frozen helper networks (teacher, perceptual net, text encoder) stay in eval mode, get no gradients,
  and are left out of checkpoints: they are rebuilt from their own weight source.

Subclasses set ``self.model`` (the trainable network, the EMA target), implement :meth:`micro_step` with
``with self.optimizing(role): ...; self.backward_and_step(role, loss)``, and may extend
:meth:`optimizer_roles`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from titok_lightning.lit.optim import build_adamw, build_scheduler
from titok_lightning.lit.sharding import set_gradient_sync, shard_blocks, sync_and_clip_gradients

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class OptimizerRole:
    """One optimizer: its parameters, learning rate and the global step its schedule starts at."""

    name: str
    module: nn.Module
    lr: float
    start_step: int = 0


def samples_in(batch: Mapping[str, Any]) -> int:
    """Samples in a batch of per-sample fields (tensors and lists, as the datamodules collate them)."""
    sizes = {len(value) for value in batch.values()}
    if len(sizes) != 1:
        lengths = {name: len(value) for name, value in batch.items()}
        raise ValueError(f"the fields of a batch hold different numbers of samples: {lengths}")
    return sizes.pop()


def split_batch(batch: Mapping[str, Any], parts: int) -> list[Mapping[str, Any]]:
    """``batch`` as ``parts`` equal consecutive micro-batches (views of its tensors)."""
    if parts == 1:
        return [batch]
    total = samples_in(batch)
    if total % parts:
        raise ValueError(
            f"a training batch of {total} samples does not split into accumulate_grad_batches={parts} equal "
            f"micro-batches: give the module batches of {parts} x the micro-batch size (train.py does so)"
        )
    size = total // parts
    return [{name: value[i * size : (i + 1) * size] for name, value in batch.items()} for i in range(parts)]


class HostMirror:
    """A device scalar read by the host one step later, without waiting for the step in flight: ``start`` copies it
    to a reused pinned buffer behind a CUDA event (on the CPU it keeps the tensor itself); ``read`` returns it (None
    when nothing was started since the last read), the event having long passed by then."""

    def __init__(self):
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self._pending = False

    def start(self, value: torch.Tensor) -> None:
        if value.is_cuda:
            if self._host is None:  # one value, of one shape and dtype, at a time
                self._host = torch.empty_like(value, device="cpu").pin_memory()
            self._host.copy_(value, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = value, None
        self._pending = True

    def read(self) -> int | float | bool | None:
        if not self._pending:
            return None
        self._pending = False
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()
        return self._host.item()


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/inf; raised before the optimizer step, so weights and EMA are intact."""


class TrainingModule(L.LightningModule):
    """Base class: optimizers per role, accumulation, clipping, non-finite policy, frozen-module bookkeeping.

    Args:
        optimizer: AdamW settings ``{lr, betas, weight_decay, eps}`` (GAN subclasses read
            ``discriminator_lr`` too).
        scheduler: ``{name: cosine|constant, warmup_steps, end_lr}``; the total is ``trainer.max_steps``.
        max_grad_norm: clip each role's gradient norm to this value (``None``: measure only).
        accumulate_grad_batches: micro-batches per optimizer step (a training batch holds this many).
        nonfinite: ``"raise"`` or ``"skip"`` (see module docstring).
        nonfinite_max_consecutive: under ``"skip"``, stop (raise) after this many skipped steps in a row.
        compile_modules: submodules of ``self.model`` (dotted names) to ``torch.compile`` in place when fitting
            starts; a ``ModuleList`` compiles each of its blocks. Empty (default): eager. In-place compilation
            keeps state-dict keys, so checkpoints, EMA and the converters are unaffected. Skipped on a CPU with
            the ``inductor`` backend (see :meth:`compile_submodules`).
        compile_backend, compile_mode: ``torch.compile``'s ``backend`` and ``mode``.
    """

    def __init__(
        self,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        max_grad_norm: float | None = 1.0,
        accumulate_grad_batches: int = 1,
        nonfinite: str = "raise",
        compile_modules: Sequence[str] = (),
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        nonfinite_max_consecutive: int = 20,
    ):
        super().__init__()
        if isinstance(compile_modules, str):
            raise TypeError(f"compile_modules must be a list of submodule names, got the string {compile_modules!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if nonfinite_max_consecutive < 1:
            raise ValueError(f"nonfinite_max_consecutive must be >= 1, got {nonfinite_max_consecutive}")
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if "lr" not in optimizer:
            raise ValueError(f"optimizer settings need 'lr', got {dict(optimizer)}")
        for key in ("lr", "discriminator_lr"):  # a typo on the command line (lr=abc) arrives as a string
            if key in optimizer and (isinstance(optimizer[key], bool) or not isinstance(optimizer[key], int | float)):
                raise ValueError(f"optimizer.{key} must be a number, got {optimizer[key]!r}")
        self.automatic_optimization = False
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.max_grad_norm = max_grad_norm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.nonfinite = nonfinite
        self.nonfinite_max_consecutive = nonfinite_max_consecutive
        self._consecutive_skips: dict[str, int] = {}  # per role; not checkpointed: a resumed run starts afresh
        self.compile_modules = tuple(compile_modules)
        self.compile_options = {"backend": compile_backend, "mode": compile_mode}
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._frozen: dict[str, nn.Module] = {}
        self._role_index: dict[str, int] = {}
        self._role_of_optimizer: dict[int, str] = {}
        self._last_losses: dict[str, Any] = {}
        self._step_skipped: dict[str, HostMirror] = {}  # per role: whether the GradScaler skipped its last step
        self._completes_step = True  # whether the running micro-batch is its batch's last
        self._batch_starts: deque[tuple[float, int]] = deque()  # (host time, batch size) of recent batches
        self._sharded = False
        self._compiled = False
        self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)

    # ----------------------------------------------------------------------------------- frozen modules
    def freeze(self, name: str) -> nn.Module:
        """Mark submodule ``name`` (dotted path, e.g. ``"loss.perceptual"``) as a frozen helper: eval mode,
        no gradients, left out of checkpoints."""
        module = self.get_submodule(name)
        module.requires_grad_(False).eval()
        self._frozen[name] = module
        return module

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen helpers."""
        return tuple(f"{name}." for name in self._frozen)

    def train(self, mode: bool = True) -> TrainingModule:
        super().train(mode)
        for module in self._frozen.values():
            module.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = self.frozen_prefixes()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(prefixes)]:
            del state[key]
        taken_back = [self._take_back_a_skipped_step(role) for role in self._step_skipped]
        if any(taken_back) and "lr_schedulers" in checkpoint:  # the schedules and rates as the next step will see them
            checkpoint["lr_schedulers"] = [
                config.scheduler.state_dict() for config in self.trainer.lr_scheduler_configs
            ]
            for optimizer, saved in zip(self.trainer.optimizers, checkpoint["optimizer_states"]):
                for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
                    saved_group["lr"] = group["lr"]

    # ------------------------------------------------------------------- sharding (FSDP) and compilation
    def configure_model(self) -> None:
        """Lightning calls this once the processes and devices exist: under ``FullyShardedStrategy`` (``trainer=fsdp``)
        shard the blocks of every trainable network; when fitting, compile ``compile_modules`` (after sharding).
        ``load_from_checkpoint`` calls it too, with no Trainer: then there is nothing to shard or compile."""
        if self._trainer is None:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise TypeError(
                "Lightning's FSDPStrategy (FSDP1) cannot run manual optimization, which every training module here "
                "uses (a backward pass inside training_step; Lightning issue #19685). Use trainer=fsdp, i.e. "
                "titok_lightning.lit.sharding.FullyShardedStrategy (FSDP2)."
            )
        mesh = self.device_mesh
        if mesh is not None and not self._sharded:
            ranks = mesh["data_parallel"].size()
            for role in self.optimizer_roles():
                count = shard_blocks(role.module, mesh["data_parallel"])
                sharded = f"{count} blocks sharded over {ranks} ranks, other layers" if count else "no blocks: all"
                rank_zero_info(f"FSDP: {role.name!r}: {sharded} replicated")
            self._sharded = True
        if self.trainer.state.fn == TrainerFn.FITTING and not self._compiled:
            self.compile_submodules()
            self._compiled = True

    def compile_submodules(self) -> None:
        """Compile each of ``compile_modules`` in place (``nn.Module.compile``); names are checked first. On a CPU
        the default ``inductor`` backend is skipped: the GPU recipes name their submodules, and inductor's C++ code
        generation would cost CPU runs (tests, the demo) minutes; other backends compile on any device."""
        targets = [self._compile_target(name) for name in self.compile_modules]
        on_cpu = self.trainer.strategy.root_device.type == "cpu"
        if targets and on_cpu and self.compile_options["backend"] == "inductor":
            rank_zero_info(f"compile_modules={list(self.compile_modules)}: not compiled on the CPU (inductor backend)")
            return
        for target in targets:
            for module in target if isinstance(target, nn.ModuleList) else [target]:
                module.compile(**self.compile_options)

    @staticmethod
    @contextmanager
    def eager_compiled_modules() -> Iterator[None]:
        """Inside, compiled submodules run their eager code (``torch.compiler.set_stance("force_eager")``, torch >= 2.6;
        before it, compiled as outside). For sampling while training: the recipes compile for the training step's
        shapes, and a sampler's calls (a new shape per step, a KV cache as argument, no grad) would recompile every
        block, costing minutes on the first grid and running into dynamo's recompile limit; the samplers replay
        CUDA graphs of their own instead."""
        set_stance = getattr(torch.compiler, "set_stance", None)
        with set_stance("force_eager") if set_stance is not None else nullcontext():
            yield

    def _compile_target(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name) if name else self.model
        except AttributeError:
            parent = self.model
            for part in name.split(".")[:-1]:
                parent = getattr(parent, part, parent)
            children = ", ".join(child for child, _ in parent.named_children()) or "none"
            raise ValueError(
                f"compile_modules: {name!r} is not a submodule of {type(self.model).__name__}; "
                f"submodules of {type(parent).__name__} are: {children}"
            ) from None

    # ------------------------------------------------------------------------------------- optimizers
    def optimizer_roles(self) -> list[OptimizerRole]:
        """The optimizers to build; subclasses append e.g. a discriminator role."""
        return [OptimizerRole("model", self.model, float(self.optimizer_cfg["lr"]))]

    def configure_optimizers(self):
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            raise ValueError(
                "trainer.max_steps must be set: learning-rate schedules are counted in optimizer steps "
                f"(got max_steps={total_steps})"
            )
        adamw = {k: self.optimizer_cfg[k] for k in ("betas", "weight_decay", "eps") if k in self.optimizer_cfg}
        optimizers, schedulers = [], []
        for index, role in enumerate(self.optimizer_roles()):
            opt = build_adamw(role.module, lr=role.lr, precision=self.trainer.precision, **adamw)
            sched = build_scheduler(
                opt,
                total_steps=total_steps,
                start_step=role.start_step,
                processes=self.trainer.world_size,
                base_lr=float(self.optimizer_cfg["lr"]),  # the reference shapes every schedule with the model's lr
                **self.scheduler_cfg,
            )
            self._role_index[role.name] = index
            optimizers.append(opt)
            schedulers.append({"scheduler": sched, "interval": "step", "name": f"lr/{role.name}"})
        return optimizers, schedulers

    def _optimizer(self, role: str):
        optimizers = self.optimizers(use_pl_optimizer=True)
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return optimizers[self._role_index[role]]

    def _scheduler(self, role: str):
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        return schedulers[self._role_index[role]]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One optimizer step per role: :meth:`micro_step` on each of the batch's ``accumulate_grad_batches``
        micro-batches, the optimizers stepping in the last."""
        micro_batches = split_batch(batch, self.accumulate_grad_batches)
        for index, micro_batch in enumerate(micro_batches):
            self._completes_step = index == len(micro_batches) - 1
            self.micro_step(micro_batch)
        self.log_throughput(samples_in(batch))

    def micro_step(self, batch: Mapping[str, Any]) -> None:
        """Forward and backward of one micro-batch for every role (subclasses implement)."""
        raise NotImplementedError

    def at_accumulation_boundary(self) -> bool:
        """True in the micro-batch that completes the optimizer step (the batch's last)."""
        return self._completes_step

    @contextmanager
    def optimizing(self, role: str) -> Iterator[None]:
        """Context for the forward and backward of ``role``: only its parameters collect gradients, and
        DDP all-reduces (FSDP reduce-scatters) them only on the last micro-batch of an accumulation window."""
        sync = self.at_accumulation_boundary()
        if self._sharded:  # only ``role``'s blocks get gradients here: the setting of the others does not matter
            set_gradient_sync(self, sync)
        with self._optimizer(role).toggle_model(sync_grad=sync):
            yield

    def backward_and_step(self, role: str, loss: torch.Tensor, logs: Mapping[str, Any] | None = None) -> bool:
        """Backward ``loss`` for ``role`` and, at an accumulation boundary, step its optimizer and schedule.

        ``logs`` (the loss terms) are kept for the error message if the gradients turn out non-finite.
        Returns whether the optimizer was stepped (under 16-mixed its GradScaler may have skipped the update).
        """
        self._last_losses[role] = logs if logs is not None else {"loss": loss}
        self.manual_backward(loss / self.accumulate_grad_batches)
        if not self.at_accumulation_boundary():
            return False
        opt = self._optimizer(role)
        self._role_of_optimizer[id(opt.optimizer)] = role
        self._take_back_a_skipped_step(role)
        scale_before = self._grad_scale()
        if role == "model":
            opt.step()  # advances trainer.global_step
        else:
            # Same precision/strategy path as LightningOptimizer.step, without counting a global step.
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure, model=self)
        opt.zero_grad(set_to_none=True)
        self._scheduler(role).step()
        if scale_before is not None:  # the scale shrinks exactly when the GradScaler skipped the step
            self._step_skipped.setdefault(role, HostMirror()).start(self._grad_scale() < scale_before)
        return True

    # 16-mixed: the reference's scheduler (accelerate's) does not advance on a step its GradScaler skipped (inf/nan
    # gradients). Whether it did is the device's answer: the schedule advances at once, and the answer is read when
    # the role steps next (or a checkpoint is written), by then long known, so no step waits for the device; a
    # skipped step's schedule step is taken back before the next optimizer step uses its rate. (Only the logged
    # learning rate of the step right after a skipped one shows the rate taken back.)
    def _grad_scale(self) -> torch.Tensor | None:
        """A copy of the GradScaler's current scale (on the device), or None without one."""
        scale = getattr(getattr(self.trainer.precision_plugin, "scaler", None), "_scale", None)
        return scale.clone() if scale is not None else None

    def _take_back_a_skipped_step(self, role: str) -> bool:
        """If the GradScaler skipped ``role``'s last step, move its schedule (a LambdaLR) and its optimizer's rates
        back one step; returns whether it did."""
        skipped = self._step_skipped.get(role)
        if skipped is None or not skipped.read():
            return False
        scheduler = self._scheduler(role)
        scheduler.last_epoch -= 1
        rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates
        return True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip (after AMP unscaling), log the gradient norm, and apply the non-finite policy."""
        role = self._role_of_optimizer.get(id(optimizer), "model")
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # Lightning leaves it to a fused optimizer's step: clipping must see it first
        norm = self._clip_gradients(optimizer)
        self.log(f"train/grad_norm/{role}", norm, on_step=True, on_epoch=False)
        if scaler is not None:
            return  # 16-mixed: overflow is expected now and then; the GradScaler skips the step and backs off
        if bool(torch.isfinite(norm)):  # one host sync per optimizer step, after the backward pass
            self._consecutive_skips[role] = 0
            return
        terms = {k: float(v) for k, v in self._last_losses.get(role, {}).items()}
        if self.nonfinite == "raise":
            raise NonFiniteLossError(
                f"non-finite gradient norm ({float(norm)}) for the {role!r} optimizer at global step "
                f"{self.global_step}; loss terms: {terms}. The step was not applied, so weights, EMA and "
                "checkpoints are unchanged. Lower the learning rate, train in bf16-mixed or 32-true, or set "
                "model.nonfinite=skip to drop such steps."
            )
        in_a_row = self._consecutive_skips.get(role, 0) + 1
        if in_a_row >= self.nonfinite_max_consecutive:
            raise NonFiniteLossError(
                f"{in_a_row} steps in a row with a non-finite gradient norm for the {role!r} optimizer (global step "
                f"{self.global_step}, loss terms: {terms}): the run has diverged. The weights are those of the last "
                "finite step. Lower the learning rate or resume from an earlier checkpoint (the limit is "
                "model.nonfinite_max_consecutive)."
            )
        self._consecutive_skips[role] = in_a_row
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
        self.skipped_steps += 1
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
        if self.trainer.is_global_zero:
            log.warning(
                "step %d: non-finite gradient norm for the %r optimizer, step skipped (%d in a row, %d in total; "
                "stopping at %d in a row); loss terms: %s",
                self.global_step,
                role,
                in_a_row,
                int(self.skipped_steps),
                self.nonfinite_max_consecutive,
                terms,
            )

    def _clip_gradients(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        max_norm = float("inf") if self.max_grad_norm is None else float(self.max_grad_norm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self._sharded:
            return sync_and_clip_gradients(params, max_norm, self.device_mesh["data_parallel"].get_group(), self.device)
        if not params:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    # ---------------------------------------------------------------------------------------- logging
    def log_losses(self, prefix: str, logs: Mapping[str, Any], batch_size: int, prog_bar: tuple[str, ...] = ()):
        """Log every loss term as ``<prefix>/<name>`` (detached scalars). A Python number logged in training becomes
        a CPU tensor: Lightning would copy it to the device, a copy that waits for every queued kernel."""
        for name, value in logs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean()
            elif prefix == "train":  # (not synchronised across ranks; validation's values are, on the device)
                value = torch.tensor(float(value), dtype=torch.float64)
            self.log(
                f"{prefix}/{name}",
                value,
                on_step=prefix == "train",
                on_epoch=prefix != "train",
                prog_bar=name in prog_bar,
                batch_size=batch_size,
                sync_dist=prefix != "train",
            )

    def log_throughput(self, batch_size: int) -> None:
        """Training samples per second over the last ``log_every_n_steps`` batches (host clock at each batch start:
        one batch's interval shows the host running ahead of the asynchronous device, a window of them its pace),
        and on CUDA the peak memory allocated so far (the allocator's own counter: no device synchronisation).

        Both are host numbers, logged as CPU tensors: Lightning turns a logged Python number into a device tensor,
        a blocking host-to-device copy that waits for every queued kernel, at every step."""
        starts = self._batch_starts
        starts.append((time.perf_counter(), batch_size))
        while len(starts) > self.trainer.log_every_n_steps + 1:
            starts.popleft()
        if len(starts) > 1:
            samples = sum(size for _, size in list(starts)[:-1])  # the batches that ran in the window
            rate = samples / (starts[-1][0] - starts[0][0])
            self.log("train/samples_per_sec", torch.tensor(rate), on_step=True, on_epoch=False)
        if self.device.type == "cuda":
            peak_gib = torch.tensor(torch.cuda.max_memory_allocated(self.device) / 2**30)
            self.log("train/peak_memory_gib", peak_gib, on_step=True, on_epoch=False)

    def on_train_epoch_start(self) -> None:
        self._batch_starts.clear()  # do not count data-loader start-up as training time

    def on_validation_end(self) -> None:
        self._batch_starts.clear()  # nor validation


def _no_closure() -> None:
    return None


def _ignore_missing_frozen_keys(module: TrainingModule, incompatible_keys) -> None:
    """Frozen helpers are not in checkpoints (they are rebuilt from their own weights): not 'missing'."""
    prefixes = module.frozen_prefixes()
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefixes)]
