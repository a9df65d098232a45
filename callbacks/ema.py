"""Exponential moving average of the trainable network (``pl_module.model``) with the reference's warm-up.

Lightning's ``WeightAveraging`` averages the whole LightningModule (discriminator, frozen teacher, perceptual and
text networks included) with a constant decay, so this is a small dedicated callback instead.

Checkpoint layout (written by ``on_save_checkpoint``):
    checkpoint["state_dict"]["model.*"]        EMA weights: what inference code gets by default
    checkpoint["callbacks"]["EMACallback"]     {"num_updates", "last_global_step", "raw_model_state"}: the training
                                               weights and the EMA step, used only to resume training exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from titok_lightning.lit.sharding import release_gathered_parameters
from titok_lightning.loading import EMA_STATE_KEY
from titok_lightning.tensors import full_tensor, is_sharded, local_tensor, shard_of


class EMACallback(Callback):
    """Keeps an EMA of ``pl_module.model``'s floating-point parameters and evaluates with it.

    The k-th update (k = 1, 2, ... counts optimizer steps; several optimizers stepping on one batch, as in GAN
    training, or gradient accumulation still count one) uses, with s = k - start_step - 1,
    ``decay_k = min(decay, (1 + s) / (10 + s))`` if s > 0 else 0 (the EMA is a copy of the weights); updates happen
    when (k - 1) % update_every_n_steps == 0. Parameters with ``requires_grad=False`` are copied, buffers are not
    averaged (the model's own buffers are used). The EMA lives on the parameters' device (float32 for low-precision
    parameters) and is updated with foreach kernels, without host synchronisation. Under FSDP each rank averages its
    own shard of the sharded parameters; checkpoints hold the gathered full tensors.

    Args:
        decay: the decay cap.
        update_every_n_steps: update the EMA every this many optimizer steps.
        start_step: before this step the EMA copies the weights.
        use_ema_for_validation: swap the EMA weights into the model during validation / test / predict (restored
            afterwards), so metrics, image logging and sampling see them.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        use_ema_for_validation: bool = True,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.use_ema_for_validation = use_ema_for_validation

        self.num_updates = 0  # k above
        self._last_global_step = 0
        self._params: list[torch.nn.Parameter] = []
        self._model: torch.nn.Module | None = None  # pl_module.model, whose FSDP blocks a swap reshards
        self._ema: list[torch.Tensor] | None = None
        self._ema_from_checkpoint: list[torch.Tensor] | None = None
        self._raw_backup: list[torch.Tensor] | None = None  # training weights while the EMA is swapped in

    # -- schedule ----------------------------------------------------------------------------------------------------

    def decay_at(self, update: int) -> float:
        """Decay used at the ``update``-th optimizer step (1-based)."""
        step = update - self.start_step - 1
        if step <= 0:
            return 0.0
        return min(self.decay, (1 + step) / (10 + step))

    # -- tracked tensors -----------------------------------------------------------------------------------------------

    @staticmethod
    def _tracked_parameters(pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise AttributeError(
                "EMACallback averages `pl_module.model`, but the LightningModule has no such nn.Module"
            )
        return [p for p in model.parameters() if p.is_floating_point()]

    @staticmethod
    def _state_dict_keys(pl_module: pl.LightningModule, params: list[torch.nn.Parameter]) -> list[list[str]]:
        """Keys of each parameter in ``pl_module.state_dict()`` (several when tied; prefix-agnostic, e.g. compile)."""
        keys_by_id: dict[int, list[str]] = {}
        for key, value in pl_module.state_dict(keep_vars=True).items():
            keys_by_id.setdefault(id(value), []).append(key)
        return [keys_by_id[id(p)] for p in params]

    @staticmethod
    def _ema_dtype(param: torch.Tensor) -> torch.dtype:
        # Updates of weight (1 - 0.9999) vanish in bf16/fp16 rounding: keep those averages in float32.
        return torch.float32 if param.element_size() < 4 else param.dtype

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and any(
            isinstance(cb, ModelCheckpoint) and cb.save_weights_only for cb in trainer.checkpoint_callbacks
        ):
            rank_zero_warn(
                "ModelCheckpoint(save_weights_only=True) skips callback hooks: those checkpoints hold the raw "
                "training weights, not the EMA weights, and cannot resume the EMA."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the strategy moved the model to its device (and after a checkpoint was restored).
        self._params = self._tracked_parameters(pl_module)
        self._model = pl_module.model
        self._init_ema()

    def _init_ema(self) -> None:
        if self._ema_from_checkpoint is not None:
            self._ema = [
                ema.to(device=p.device, dtype=self._ema_dtype(p), copy=True)
                for ema, p in zip(self._ema_from_checkpoint, self._params)
            ]
            self._ema_from_checkpoint = None
        elif self._ema is None or len(self._ema) != len(self._params):
            self._ema = [local_tensor(p.detach()).to(self._ema_dtype(p), copy=True) for p in self._params]

    def _local_params(self) -> list[torch.Tensor]:
        """The tracked parameters as plain tensors: this rank's shard of those sharded by FSDP."""
        return [local_tensor(p.detach()) for p in self._params]

    # -- update --------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_global_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_global_step = trainer.global_step
        self.num_updates += 1
        if (self.num_updates - 1) % self.update_every_n_steps != 0:
            return
        decay = self.decay_at(self.num_updates)
        # float64: a Python float would be logged as float32
        pl_module.log("train/ema_decay", torch.tensor(decay, dtype=torch.float64), on_step=True, on_epoch=False)
        weight = 1.0 - decay
        trainable_ema, trainable, frozen_ema, frozen = [], [], [], []
        for ema, param, local in zip(self._ema, self._params, self._local_params()):
            if param.requires_grad:
                trainable_ema.append(ema)
                trainable.append(local if local.dtype == ema.dtype else local.to(ema.dtype))
            else:
                frozen_ema.append(ema)
                frozen.append(local)
        if trainable:
            torch._foreach_lerp_(trainable_ema, trainable, weight)
        if frozen:
            torch._foreach_copy_(frozen_ema, frozen)

    # -- evaluation with the EMA weights ------------------------------------------------------------------------------

    @torch.no_grad()
    def _swap_in(self) -> None:
        if not self.use_ema_for_validation or self._ema is None or self._raw_backup is not None:
            return
        self._release_gathered_parameters()
        params = self._local_params()
        self._raw_backup = [p.clone() for p in params]
        torch._foreach_copy_(params, self._ema)

    @torch.no_grad()
    def _swap_out(self) -> None:
        if self._raw_backup is None:
            return
        torch._foreach_copy_(self._local_params(), self._raw_backup)
        self._raw_backup = None
        self._release_gathered_parameters()

    def _release_gathered_parameters(self) -> None:
        # FSDP: a forward runs on gathered copies of the shards, which must not outlive a swap of the shards
        if self._model is not None and any(is_sharded(p) for p in self._params):
            release_gathered_parameters(self._model)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in ``pl_module.model`` inside the block (e.g. sample grids during training)."""
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    # start/end (not epoch_start/epoch_end) so the LightningModule's own epoch-end hooks also see the EMA, and
    # the training weights are back before ModelCheckpoint (always last) saves in on_validation_end.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()

    # -- checkpointing -------------------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return EMA_STATE_KEY  # where titok_lightning.loading finds the training weights in a checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_global_step": self._last_global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
        self._last_global_step = state_dict["last_global_step"]

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._ema is None:  # not fitting: the model's weights are saved as they are
            return
        raw = self._raw_backup if self._raw_backup is not None else self._local_params()
        raw_model_state = {}
        state_dict = checkpoint["state_dict"]
        for keys, param, ema, raw_tensor in zip(
            self._state_dict_keys(pl_module, self._params), self._params, self._ema, raw
        ):
            raw_model_state[keys[0]] = full_tensor(raw_tensor, param)
            ema = full_tensor(ema, param)
            for key in keys:
                state_dict[key] = ema
        checkpoint["callbacks"][self.state_key]["raw_model_state"] = raw_model_state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Outside fitting the model keeps the checkpoint's state_dict, i.e. the EMA weights.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None or "raw_model_state" not in state:
            rank_zero_warn("The checkpoint has no EMACallback state: the EMA restarts from the loaded weights.")
            return
        # The model was just loaded from state_dict (= EMA): keep that as the EMA, put the training weights back.
        params = self._tracked_parameters(pl_module)
        keys = self._state_dict_keys(pl_module, params)
        raw_model_state = state["raw_model_state"]
        if set(raw_model_state) != {k[0] for k in keys}:
            raise KeyError("EMACallback state in the checkpoint does not match the parameters of pl_module.model")
        saved = checkpoint.get("state_dict")  # FSDP's loader consumes it: then the just-loaded parameters hold it
        if saved is not None:
            self._ema_from_checkpoint = [shard_of(saved[k[0]], p) for p, k in zip(params, keys)]
        else:
            self._ema_from_checkpoint = [local_tensor(p.detach()).clone() for p in params]
        with torch.no_grad():
            for param, k in zip(params, keys):
                local_tensor(param).copy_(shard_of(raw_model_state[k[0]], param))
        self._ema = None
        if self._params:  # strategies that restore after setup (FSDP) load after on_fit_start
            self._params = params
            self._init_ema()
