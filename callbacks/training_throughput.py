"""Training speed under `perf/`: samples, tokens and FLOPs per second, MFU, memory, loader wait.

Every figure is the whole run's over a window of optimizer steps (default: the trainer's
`log_every_n_steps`), so one slow step does not dominate a point. The GPU is synchronised
only at window ends, where the clock is read for the figures; between them the callback
reads a clock and adds up shapes, nothing that waits for the GPU.
"""

import contextlib
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from datamodules import batch as keys
from lightning_modules.flops import ParameterCounts, count_parameters, training_flops_per_sample

# Dense (no 2:4 sparsity) BF16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets,
# which print the sparse figure (marked "*"): half of it is the dense one.
#   H100 SXM 1,979* / H100 NVL 1,671* / H100 PCIe 1,513*  (NVIDIA H100 Tensor Core GPU datasheet)
#   H200 SXM 1,979* / H200 NVL 1,671*                     (NVIDIA H200 Tensor Core GPU datasheet)
#   H800 = H100 SXM, H20 296*                             (the H100's export variants)
#   A100 (SXM and PCIe) 312 dense, 624*; A800 = A100      (NVIDIA A100 datasheet)
#   L40S 362.05 dense, 733*; L40 181.05 dense, 362.1*     (NVIDIA L40S / L40 datasheets)
#   L4 242*; A10 125 dense, 250*                          (NVIDIA L4 / A10 datasheets)
#   B200 4.5 PFLOP/s* per GPU                             (NVIDIA HGX B200 specifications)
# Each entry: (chip, variant or None, TFLOP/s); the first match wins, so variants go first.
DENSE_BF16_TFLOPS = (
    ("h100", "nvl", 835.5),
    ("h100", "pcie", 756.5),
    ("h100", None, 989.5),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("gh200", None, 989.5),
    ("h200", "nvl", 835.5),
    ("h200", None, 989.5),
    ("h800", "pcie", 756.5),
    ("h800", None, 989.5),
    ("h20", None, 148.0),
    ("a100", None, 312.0),
    ("a800", None, 312.0),
    ("l40s", None, 362.05),
    ("l40", None, 181.05),
    ("l4", None, 121.0),
    ("a10", None, 125.0),
    ("b200", None, 2250.0),
)


def dense_bf16_peak_tflops(device_name: str) -> float | None:
    """Dense BF16 peak of a CUDA device from its name (`torch.cuda.get_device_name`), or None.

    Names are matched by whole words ("NVIDIA L40S" is not an L4, "NVIDIA H200" not an H20).
    """
    words = device_name.lower().replace("-", " ").replace("_", " ").split()
    for chip, variant, tflops in DENSE_BF16_TFLOPS:
        if chip in words and (variant is None or variant in words):
            return tflops
    return None


def throughput_figures(
    samples: float,
    tokens: float,
    model_flops: float,
    hardware_flops: float,
    seconds: float,
    world_size: int,
    peak_tflops: float | None = None,
) -> dict[str, float]:
    """The `perf/` rates of one window from whole-run totals (summed over ranks) and its length.

    `perf/mfu` is model FLOPs per second per device over the device's peak; the
    `hardware_` figure adds the forward recomputed under gradient checkpointing.
    """
    figures = {
        "perf/samples_per_sec": samples / seconds,
        "perf/tokens_per_sec": tokens / seconds,
        "perf/tflops_per_sec_per_device": model_flops / world_size / seconds / 1e12,
        "perf/hardware_tflops_per_sec_per_device": hardware_flops / world_size / seconds / 1e12,
    }
    if peak_tflops:
        figures["perf/mfu"] = figures["perf/tflops_per_sec_per_device"] / peak_tflops
    return figures


def latent_batch_shape(batch: dict, pl_module: pl.LightningModule) -> tuple[int, int, int, int] | None:
    """(samples, latent frames, latent height, latent width) of a batch, or None when
    every sample was skipped. Reads shapes only (datamodules/batch.py's contract)."""
    for key in (keys.LATENTS, keys.LATENT_MEAN):
        if key in batch:
            size, frames, _, height, width = batch[key].shape
            return size, frames, height, width
    if keys.VIDEO in batch:
        size, _, frames, height, width = batch[keys.VIDEO].shape
        # The module has already encoded this batch, so reading the VAE's config loads nothing.
        vae_config = pl_module.encoders.vae.config
        temporal = vae_config.temporal_compression_ratio
        spatial = 2 ** (len(vae_config.block_out_channels) - 1)
        return size, (frames - 1) // temporal + 1, height // spatial, width // spatial
    return None


class TrainingThroughput(pl.Callback):
    """Logs training speed under `perf/`, once per window of optimizer steps.

    - `perf/samples_per_sec`, `perf/tokens_per_sec`: the whole run's (all ranks).
    - `perf/tflops_per_sec_per_device`: model FLOPs (lightning_modules/flops.py) per second
      and device; `perf/hardware_tflops_per_sec_per_device` adds the gradient-checkpointing
      recompute.
    - `perf/mfu`: model FLOPs / (time x the device's dense BF16 peak). The peak comes from
      DENSE_BF16_TFLOPS by CUDA device name or from `peak_tflops`; on a CPU, or a GPU not in
      the table, MFU is logged only when `peak_tflops` is given.
    - `perf/peak_memory_gb`: `torch.cuda.max_memory_allocated` (since the process started
      or torch's last reset), in 1e9 bytes, the largest over ranks (CUDA only).
    - `perf/dataloader_wait_sec`: mean time from the end of one training batch to the start
      of the next, i.e. waiting on the loader. Validation and `excluded_from_throughput`
      blocks (video generation) are left out of it and of the window's time; a checkpoint
      saved at the end of a batch is not, and shows as a wait in that window.

    Args:
        window: optimizer steps per figure; default `trainer.log_every_n_steps`.
        peak_tflops: the device's peak TFLOP/s for MFU, overriding the table.
    """

    # Read at batch boundaries; tests replace it to get exact figures.
    clock = staticmethod(time.perf_counter)

    def __init__(self, window: int | None = None, peak_tflops: float | None = None):
        if window is not None and window < 1:
            raise ValueError(f"TrainingThroughput(window={window}): window must be >= 1 optimizer steps (or null)")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"TrainingThroughput(peak_tflops={peak_tflops}): give the device's peak in TFLOP/s (> 0)")
        self.window = window
        self.peak_tflops = peak_tflops
        self._window_steps = window or 1
        self._peak: float | None = peak_tflops
        self._parameters: ParameterCounts | None = None
        self._checkpointing = False
        self._last_step = 0
        self._excluded: list[tuple[float, float]] = []
        self._excluding_since: float | None = None
        self.last_figures: dict[str, float] = {}
        self._reset_window()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Default window: the trainer's logging interval."""
        if stage == "fit":
            self._window_steps = self.window or max(trainer.log_every_n_steps, 1)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count the transformer's parameters and look up the device's peak."""
        transformer = getattr(pl_module, "transformer", None)
        if transformer is None:
            raise ValueError(
                f"TrainingThroughput counts FLOPs from `pl_module.transformer`, which "
                f"{type(pl_module).__name__} does not have (use it with EchoVideoModule)"
            )
        self._parameters = count_parameters(transformer)
        self._checkpointing = bool(getattr(transformer, "is_gradient_checkpointing", False))
        self._peak = self.peak_tflops
        device = pl_module.device
        if self._peak is None and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            self._peak = dense_bf16_peak_tflops(name)
            if self._peak is None:
                rank_zero_warn(
                    f"TrainingThroughput: no dense BF16 peak known for {name!r}; perf/mfu is not logged. "
                    "Pass TrainingThroughput(peak_tflops=...) with the device's dense BF16 TFLOP/s."
                )
        self._excluded, self._excluding_since = [], None
        self._reset_window()
        self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        """The gap since the previous batch ended is loader wait; the first batch opens the window."""
        now = self.clock()
        if self._last_end is not None:
            self._wait += now - self._last_end - self._excluded_within(self._last_end, now)
            self._waits += 1
        if self._window_start is None:
            self._window_start = now

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        """Add the batch's samples, tokens and FLOPs; at a window end, log the window."""
        self._add_batch(batch, pl_module)
        stepped = trainer.global_step != self._last_step  # False while accumulating
        self._last_step = trainer.global_step
        if stepped and trainer.global_step % self._window_steps == 0:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)  # the window's GPU work is done
            now = self.clock()
            self._log_window(trainer, pl_module, now)
            self._excluded = [(start, end) for start, end in self._excluded if end > now]
            self._reset_window(start=now)
        else:
            now = self.clock()
        self._last_end = now

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._excluding_since = self.clock()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._excluding_since is not None:
            self.exclude(self._excluding_since, self.clock())
            self._excluding_since = None

    # ------------------------------------------------------------------ parts
    def exclude(self, start: float, end: float) -> None:
        """Leave [start, end] (this callback's clock) out of the figures."""
        if end > start:
            self._excluded.append((start, end))

    def _excluded_within(self, start: float, end: float) -> float:
        return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self._excluded)

    def _reset_window(self, start: float | None = None) -> None:
        self._window_start = start
        self._last_end = start
        self._samples = self._tokens = 0
        self._model_flops = self._hardware_flops = 0.0
        self._wait, self._waits = 0.0, 0

    def _add_batch(self, batch, pl_module: pl.LightningModule) -> None:
        shape = latent_batch_shape(batch, pl_module) if isinstance(batch, dict) else None
        if shape is None:
            return  # every sample of the batch was skipped
        size, frames, height, width = shape
        flops = training_flops_per_sample(
            pl_module.transformer.config, self._parameters, frames, height, width, self._checkpointing
        )
        self._samples += size
        self._tokens += size * flops.tokens
        self._model_flops += size * flops.model
        self._hardware_flops += size * flops.hardware

    def _log_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: float) -> None:
        seconds = now - self._window_start - self._excluded_within(self._window_start, now)
        device = pl_module.device
        peak_memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
        # Every rank reaches the same window ends (they follow global_step), so these
        # collectives line up; the window's time is the slowest rank's.
        sums = torch.tensor(
            [self._samples, self._tokens, self._model_flops, self._hardware_flops, self._wait, self._waits],
            dtype=torch.float64, device=device,
        )
        totals = trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        samples, tokens, model_flops, hardware_flops, wait, waits = totals
        maxima = torch.tensor([seconds, peak_memory], dtype=torch.float64, device=device)
        seconds, peak_memory = trainer.strategy.reduce(maxima, reduce_op="max").tolist()
        if seconds <= 0:
            return
        figures = throughput_figures(
            samples, tokens, model_flops, hardware_flops, seconds, trainer.world_size, self._peak
        )
        if waits:
            figures["perf/dataloader_wait_sec"] = wait / waits
        if device.type == "cuda":
            figures["perf/peak_memory_gb"] = peak_memory
        self.last_figures = figures
        # Written to the loggers directly: `self.log` would re-write a window's figures at
        # every logging step until the next window. The step is the one Lightning gives
        # this batch's own metrics (LearningRateMonitor reads it the same way).
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=step)


@contextlib.contextmanager
def excluded_from_throughput(trainer: pl.Trainer):
    """Leave the time spent inside out of every TrainingThroughput's figures (e.g. sampling
    videos in the middle of training), wherever the block runs between two batches."""
    monitors = [c for c in trainer.callbacks if isinstance(c, TrainingThroughput)]
    starts = [monitor.clock() for monitor in monitors]
    try:
        yield
    finally:
        for monitor, start in zip(monitors, starts):
            monitor.exclude(start, monitor.clock())
