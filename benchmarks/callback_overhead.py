"""What the training dashboards cost per step: the tiny run with and without them.

Both arms train the same tiny EchoVideoModule (random tiny release, cached features, so a
step is small and any per-step cost of logging shows) for `--steps` steps:

- bare: no logger, no callbacks (the module's own `self.log` calls still run, as they
  always do);
- dashboards: TensorBoardLogger + TrainingThroughput + TwoStageFaceLatentSchedule +
  LearningRateMonitor, writing every `--log-every-n-steps` steps (default 1: the worst case).

steps/s counts from the end of the `--warmup`-th step to the end of the last, so setup and
the first steps' one-off work are left out; the process's CPU time per step over the same
steps is printed beside it, and the time spent inside the dashboards' own hooks and logger
calls, which is the steadiest figure on a shared machine. The arms alternate for `--repeats` rounds and
the median of each is printed with the ratio. ValidationVideos is not included: it costs
nothing between its sampling steps, and a sampling step costs what generation costs.

    .venv/bin/python benchmarks/callback_overhead.py
    .venv/bin/python benchmarks/callback_overhead.py --steps 60 --repeats 5 --log-every-n-steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from callbacks.training_throughput import TrainingThroughput  # noqa: E402
from callbacks.two_stage_face_latent import TwoStageFaceLatentSchedule  # noqa: E402
from lightning_modules.batch_features import encode_batch_features  # noqa: E402
from lightning_modules.echovideo_module import EchoVideoModule  # noqa: E402
from lightning_modules.tiny import RepeatedBatches, build_tiny_identity_encoder, write_tiny_release  # noqa: E402

warnings.filterwarnings("ignore")


def build_module(release: Path) -> EchoVideoModule:
    module = EchoVideoModule(
        pretrained_path=str(release), identity_encoder=build_tiny_identity_encoder(seed=0),
        learning_rate=1e-3, warmup_steps=5, weight_decay=0.0, encoder_dtype="float32",
    )
    module.configure_model()
    return module


def raw_batch(batch_size: int = 2, num_frames: int = 9, size: int = 32) -> dict:
    """Smooth random raw inputs in the batch contract (datamodules/batch.py)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(batch_size, 3, 1, size // 8, size // 8, generator=generator)
    video = torch.nn.functional.interpolate(base, size=(num_frames, size, size), mode="trilinear") * 2 - 1
    return {
        "video": video,
        "face_image": torch.rand(batch_size, 3, 32, 32, generator=generator),
        "caption": [f"a person number {i} smiles" for i in range(batch_size)],
        "sample_id": [f"sample_{i}" for i in range(batch_size)],
    }


class HookTimer:
    """Adds up the wall time spent inside chosen methods of chosen objects."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, owner, *names: str) -> None:
        for name in names:
            original = getattr(owner, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(owner, name, timed)


class StepClock(pl.Callback):
    """Wall clock, this process's CPU time (all its threads) and the time inside the
    dashboards' hooks so far, at every step's end."""

    def __init__(self, hooks: HookTimer):
        self.hooks = hooks
        self.ends: list[tuple[float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append((time.perf_counter(), time.process_time(), self.hooks.seconds))


def measure(release: Path, features: dict, dashboards: bool, args, log_dir: Path) -> tuple[float, float, float]:
    """(steps per second of wall time, CPU ms per step, ms per step inside the dashboards'
    callback hooks and logger calls) over the timed steps."""
    hooks = HookTimer()
    clock = StepClock(hooks)
    callbacks: list[pl.Callback] = [clock]
    logger = False
    if dashboards:
        logger = TensorBoardLogger(log_dir, name="overhead")
        callbacks = [
            TwoStageFaceLatentSchedule(stage_two_start_step=args.steps // 2, face_latent_keep_prob=0.5),
            TrainingThroughput(peak_tflops=1.0),
            LearningRateMonitor(logging_interval="step"),
        ]
        for callback in callbacks:
            hooks.wrap(callback, "on_train_batch_start", "on_train_batch_end")
        hooks.wrap(logger, "log_metrics", "save")
        callbacks.append(clock)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=logger, callbacks=callbacks,
        log_every_n_steps=args.log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(log_dir),
    )
    trainer.fit(build_module(release), DataLoader(RepeatedBatches(features, args.steps), batch_size=None))
    (wall_0, cpu_0, hooks_0), (wall_1, cpu_1, hooks_1) = clock.ends[args.warmup - 1], clock.ends[-1]
    steps = len(clock.ends) - args.warmup
    return steps / (wall_1 - wall_0), 1e3 * (cpu_1 - cpu_0) / steps, 1e3 * (hooks_1 - hooks_0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log-every-n-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps - 1:
        parser.error("--warmup must be >= 1 and leave at least 2 timed steps")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="callback-overhead-") as tmp:
        tmp = Path(tmp)
        release = write_tiny_release(tmp / "release", seed=0)
        encoders = build_module(release).encoders
        features = {k: v.clone() for k, v in encode_batch_features(encoders, raw_batch()).items()}
        rates = {"bare": [], "dashboards": []}
        cpu = {"bare": [], "dashboards": []}
        inside = []
        for round_index in range(args.repeats):
            for name in rates:
                rate, cpu_ms, hook_ms = measure(release, features, name == "dashboards", args,
                                                tmp / f"{name}{round_index}")
                rates[name].append(rate)
                cpu[name].append(cpu_ms)
                if name == "dashboards":
                    inside.append(hook_ms)
                inside_text = f", {hook_ms:.2f} ms/step in the dashboards' hooks and logger"
                print(f"round {round_index + 1}: {name} {rate:.2f} steps/s, {cpu_ms:.1f} CPU ms/step"
                      + (inside_text if name == "dashboards" else ""), flush=True)

    bare, dashboards = (statistics.median(rates[name]) for name in ("bare", "dashboards"))
    bare_cpu, dashboards_cpu = (statistics.median(cpu[name]) for name in ("bare", "dashboards"))
    print()
    print(f"tiny EchoVideoModule, cached features, batch 2, {args.steps} steps ({args.warmup} warm-up), "
          f"log_every_n_steps={args.log_every_n_steps}, {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats}")
    print()
    print("| | bare | with dashboards | ratio | cost per step |")
    print("|---|---|---|---|---|")
    print(f"| steps/s (wall clock) | {bare:.2f} | {dashboards:.2f} | {dashboards / bare:.3f} | "
          f"{1e3 * (1 / dashboards - 1 / bare):+.1f} ms |")
    print(f"| CPU ms per step (process) | {bare_cpu:.1f} | {dashboards_cpu:.1f} | {dashboards_cpu / bare_cpu:.3f} | "
          f"{dashboards_cpu - bare_cpu:+.1f} ms |")
    print()
    print(f"Inside the dashboards' callback hooks and logger calls: {statistics.median(inside):.2f} ms per step "
          "(median; Lightning's own bookkeeping of the extra metrics comes on top).")


if __name__ == "__main__":
    main()
