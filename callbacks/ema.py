"""Exponential moving average (EMA) of the trainable weights.

After optimizer step `s` (`trainer.global_step`, counting from 1) with `s >= start_step` and
`s % update_every_n_steps == 0`, every trainable parameter p updates its average
    ema = decay * ema + (1 - decay) * p
(`decay` applies per update); the first such update sets ema = p. Only parameters that
require grad are averaged: under LoRA that is the adapters and the IITF parts, never the
frozen backbone. The averages are float32 (or wider), on the parameters' device or on the
CPU (`store_on_cpu`).

The averages and the update count live in the callback's state, saved in every checkpoint,
so a resumed run continues the uninterrupted run's average exactly; validation and predict
(`use_for_validation`, `use_for_predict`) run with the averages swapped in and the live
weights back afterwards; `export_dir` writes the averaged weights when training ends
(`lightning_modules.training_levers.export_trained_weights`: LoRA folder, release-layout
transformer or IITF file).

Strategies: single device and DDP keep a whole copy per process (every rank's weights
are equal after a step). DeepSpeed ZeRO-1/2 keep whole parameters on every rank (only
optimizer states and gradients are partitioned), so the same holds; with bf16 the module's
parameters are DeepSpeed's bf16 copies, and the average is of those (in float32). ZeRO-3 and
FSDP partition the parameters themselves: each rank holds a shard, so a per-rank average of
`named_parameters()` would be of empty placeholders. Gathering every parameter at every
update would cost a full all-gather of the trainable weights per update, so the callback
refuses these strategies at setup instead of averaging silently wrong values.

Why not Lightning's `EMAWeightAveraging`: it deep-copies the whole LightningModule (under
LoRA: the frozen 5B backbone too), averages every parameter, and replaces the checkpoint's
`state_dict` with the average.
"""

import logging
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class EMAWeights(pl.Callback):
    """EMA of the trainable weights; swapped in for validation and predict; exported at the end.

    Args:
        decay: weight of the old average in each update, in [0, 1).
        update_every_n_steps: update after every n-th optimizer step.
        start_step: first optimizer step (global step) that updates; the average starts as a
            copy of the weights at the first update.
        use_for_validation: validate with the averaged weights.
        use_for_predict: predict (sample) with the averaged weights.
        store_on_cpu: keep the averages in CPU memory (saves accelerator memory; each update
            then copies the trainable weights to the CPU).
        export_dir: when training ends, write the averaged weights here (global rank 0).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        use_for_validation: bool = True,
        use_for_predict: bool = True,
        store_on_cpu: bool = False,
        export_dir: str | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.use_for_validation = use_for_validation
        self.use_for_predict = use_for_predict
        self.store_on_cpu = store_on_cpu
        self.export_dir = export_dir
        self.averages: dict[str, torch.Tensor] | None = None  # parameter name -> average
        self.num_updates = 0
        self.last_update_step: int | None = None
        self._seen_step: int | None = None
        self._live_weights: dict[str, torch.Tensor] | None = None  # set while the averages are swapped in

    # ------------------------------------------------------------------ averaging
    @staticmethod
    def trainable_parameters(pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def _storage(self, parameter: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        device = torch.device("cpu") if self.store_on_cpu else parameter.device
        return device, torch.promote_types(parameter.dtype, torch.float32)

    def _matched(self, pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters, checked against the averages' names (after a resume the
        checkpoint's averages must be for the same parameters)."""
        parameters = self.trainable_parameters(pl_module)
        if self.averages is not None and set(self.averages) != set(parameters):
            missing, extra = set(parameters) - set(self.averages), set(self.averages) - set(parameters)
            raise RuntimeError(
                "EMAWeights: the averaged parameters differ from the module's trainable ones "
                f"(no average for {sorted(missing)[:5]}; average of unknown {sorted(extra)[:5]}); "
                "did `trainable` or `lora` change since the checkpoint?"
            )
        return parameters

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule, step: int) -> None:
        parameters = self._matched(pl_module)
        if self.averages is None:
            self.averages = {}
            for name, p in parameters.items():
                device, dtype = self._storage(p)
                self.averages[name] = p.detach().to(device=device, dtype=dtype, copy=True)
        else:
            for name, p in parameters.items():
                average = self.averages[name]
                device, dtype = self._storage(p)
                if average.device != device or average.dtype != dtype:  # e.g. just restored from a checkpoint
                    average = self.averages[name] = average.to(device=device, dtype=dtype)
                average.mul_(self.decay).add_(p.detach().to(device=device, dtype=dtype), alpha=1.0 - self.decay)
        self.num_updates += 1
        self.last_update_step = step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if getattr(strategy, "zero_stage_3", False) or "FSDP" in type(strategy).__name__:
            raise RuntimeError(
                f"EMAWeights does not run under {type(strategy).__name__}"
                f"{' (ZeRO-3)' if getattr(strategy, 'zero_stage_3', False) else ''}: parameters are "
                "partitioned across ranks, so each rank sees only its shard, and gathering the trainable "
                "weights at every update would cost a full all-gather each time. Use DeepSpeed ZeRO-2 "
                "(whole parameters on every rank) or remove the EMA callback."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # global_step is restored by now: the next change of it is the next optimizer step.
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:
            return  # gradient accumulation: no optimizer step since the last batch
        self._seen_step = step
        if step >= self.start_step and step % self.update_every_n_steps == 0:
            self.update(pl_module, step)

    # ------------------------------------------------------------------- swapping
    @contextmanager
    def averaged_weights(self, pl_module: pl.LightningModule):
        """Within the block the trainable parameters hold the averages; the live weights
        come back on exit. Copies in place, so optimizer and DeepSpeed views stay valid."""
        self.swap_in(pl_module)
        try:
            yield
        finally:
            self.swap_out(pl_module)

    @torch.no_grad()
    def swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.averages is None or self._live_weights is not None:
            return  # nothing averaged yet, or already swapped in
        parameters = self._matched(pl_module)
        self._live_weights = {}
        for name, p in parameters.items():
            self._live_weights[name] = p.detach().to(self.averages[name].device, copy=True)
            p.copy_(self.averages[name].to(p.device, p.dtype))

    @torch.no_grad()
    def swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._live_weights is None:
            return
        for name, p in self.trainable_parameters(pl_module).items():
            p.copy_(self._live_weights[name].to(p.device, p.dtype))
        self._live_weights = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_for_validation:
            self.swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swap_out(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_for_predict:
            self.swap_in(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swap_out(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.swap_out(pl_module)  # never leave the averages in the live weights

    # --------------------------------------------------------------------- export
    def export(self, pl_module: pl.LightningModule, folder: str | Path) -> Path:
        """Write the averaged weights of `pl_module.transformer` to `folder`."""
        from lightning_modules.training_levers import export_trained_weights

        if self.averages is None:
            raise RuntimeError("EMAWeights.export: no average yet (no update has happened)")
        with self.averaged_weights(pl_module):
            return export_trained_weights(pl_module.transformer, folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is None:
            return
        if self.averages is None:
            log.warning("EMAWeights: training ended before the first update (start_step %d); nothing exported",
                        self.start_step)
            return
        if trainer.is_global_zero:
            folder = self.export(pl_module, self.export_dir)
            log.info("EMA weights (%d updates, last at step %s) exported to %s",
                     self.num_updates, self.last_update_step, folder)
        trainer.strategy.barrier("ema_export")

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "averages": self.averages,
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "decay": self.decay,
            "update_every_n_steps": self.update_every_n_steps,
            "start_step": self.start_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.averages = state_dict.get("averages")
        self.num_updates = state_dict.get("num_updates", 0)
        self.last_update_step = state_dict.get("last_update_step")
        saved = tuple(state_dict.get(key) for key in ("decay", "update_every_n_steps", "start_step"))
        if saved != (self.decay, self.update_every_n_steps, self.start_step):
            log.warning(
                "resuming with changed EMA settings: checkpoint had decay %s, every %s steps from step %s; "
                "now %s, %s, %s (the new values apply from here on)",
                *saved, self.decay, self.update_every_n_steps, self.start_step,
            )
