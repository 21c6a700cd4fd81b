"""A run killed mid-way and resumed with `--ckpt_path last` gives, step for step, the losses
of the run that was never interrupted: under the plain strategy and under DeepSpeed ZeRO-2
and ZeRO-3 (on CPU through tests/cpu_deepspeed.py).

The tiny run streams the feature store (same samples), draws noise, timesteps, condition
dropout and the stage-2 face-latent mask from step-keyed generators, and switches to stage
2 inside the run, so every source of randomness is exercised. The uninterrupted plain run's
curve is kept in tests/golden/tiny_loss_curve.json: a silent numeric change to the model,
the loss or the data path fails here. Regenerate it deliberately with
`ECHOVIDEO_UPDATE_GOLDEN=1 make test` and say why in the commit.
"""

import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules import batch as keys
from echovideo.cli import EchoVideoCLI
from store_helpers import EXPERIMENT, store_overrides

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss_curve.json"
MAX_STEPS = 8
STAGE_TWO_START = 4
CRASH_AT_STEP = 5
STRATEGIES = {
    "plain": None,
    "zero2": {"class_path": "cpu_deepspeed.CPUDeepSpeedStrategy",
              "init_args": {"stage": 2, "logging_batch_size_per_gpu": 2}},
    "zero3": {"class_path": "cpu_deepspeed.CPUDeepSpeedStrategy",
              "init_args": {"stage": 3, "logging_batch_size_per_gpu": 2}},
}


class LossRecorder(pl.Callback):
    """Appends `{"step", "loss", "ids"}` of every optimizer step to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": trainer.global_step - 1, "loss": float(loss),
                                  "ids": list(batch.get(keys.SAMPLE_ID, []))}) + "\n")


class CrashAtStep(pl.Callback):
    """Raises at the start of `step`, as a crashing node would (a periodic checkpoint and
    ResumableCheckpoint's save on exception are what the resumed run has)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class SigtermAtStep(pl.Callback):
    """Sends this process SIGTERM after `step`, as a scheduler does before a time limit."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _experiment(tmp_path: Path, strategy: dict | None, crash: bool | str) -> Path:
    config = yaml.safe_load(EXPERIMENT.read_text())
    trainer = config["trainer"]
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("TwoStageFaceLatentSchedule"):
            callback["init_args"] = {"stage_two_start_step": STAGE_TWO_START, "face_latent_keep_prob": 0.5}
        if callback["class_path"].endswith("ResumableCheckpoint"):
            callback["init_args"] = {"every_n_train_steps": 3}
    if crash:
        stopper = "SigtermAtStep" if crash == "sigterm" else "CrashAtStep"
        trainer["callbacks"].append({"class_path": f"test_exact_resume.{stopper}",
                                     "init_args": {"step": CRASH_AT_STEP}})
    if strategy is not None:
        trainer["strategy"] = strategy
    path = tmp_path / f"experiment_{'crash' if crash else 'whole'}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(experiment: Path, run: Path, losses: Path, preprocessed, release, resume: bool):
    folder, manifest, store, _ = preprocessed
    overrides = [o for o in store_overrides(release, manifest, store, run) if not o.startswith("--preprocess.")]
    return EchoVideoCLI(args=[
        "fit", "--config", str(experiment), *overrides, f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.callbacks+=test_exact_resume.LossRecorder", f"--trainer.callbacks.init_args.path={losses}",
        *(["--ckpt_path=last"] if resume else [])])


def _curve(path: Path) -> list[float]:
    """The loss of every step; a step run twice (before a crash and again after the
    resume) must have seen the same samples and given the same loss both times."""
    by_step: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], []).append(record)
    assert sorted(by_step) == list(range(MAX_STEPS)), by_step
    for runs in by_step.values():
        assert all(r["ids"] == runs[0]["ids"] for r in runs), runs
        assert [r["loss"] for r in runs] == pytest.approx([runs[0]["loss"]] * len(runs), rel=1e-5)
    return [by_step[step][-1]["loss"] for step in range(MAX_STEPS)]


@pytest.fixture(scope="module")
def golden_curve() -> list[float]:
    return json.loads(GOLDEN.read_text())["losses"]


def test_uninterrupted_run_matches_the_golden_curve(preprocessed, tiny_release, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    _fit(_experiment(tmp_path, None, crash=False), tmp_path / "run", tmp_path / "losses.jsonl",
         preprocessed, tiny_release, resume=False)
    curve = _curve(tmp_path / "losses.jsonl")
    if os.environ.get("ECHOVIDEO_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"about": "per-step losses of the tiny uninterrupted run of tests/test_exact_resume.py", "losses": curve}, indent=1) + "\n")
    assert curve == pytest.approx(json.loads(GOLDEN.read_text())["losses"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_crashed_and_resumed_run_repeats_the_uninterrupted_losses(
    strategy, preprocessed, tiny_release, tmp_path, monkeypatch, golden_curve
):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    experiment = _experiment(tmp_path, STRATEGIES[strategy], crash=True)
    run, losses = tmp_path / "run", tmp_path / "losses.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(experiment, run, losses, preprocessed, tiny_release, resume=False)
    resumed_experiment = _experiment(tmp_path, STRATEGIES[strategy], crash=False)
    cli = _fit(resumed_experiment, run, losses, preprocessed, tiny_release, resume=True)
    assert cli.trainer.global_step == MAX_STEPS
    # The crash was inside step 5: the run resumed from the periodic checkpoint of step 3.
    assert cli.trainer.ckpt_path.endswith("last.ckpt")
    assert [json.loads(line)["step"] for line in losses.read_text().splitlines()] == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]

    curve = _curve(losses)
    # Exactly the uninterrupted run's: the plain strategy's curve is the golden one, and
    # ZeRO's fp32 partitioned optimizer reproduces it to float rounding.
    assert curve == pytest.approx(golden_curve, rel=1e-4, abs=1e-6)
    # Steps 3 and 4, logged before the crash and again after the resume, show once each.
    from module_helpers import tensorboard_scalars

    logged = tensorboard_scalars(run / "tensorboard")["train/loss"]
    assert [step for step, _ in logged] == list(range(MAX_STEPS))
    assert [loss for _, loss in logged] == pytest.approx(golden_curve, rel=1e-4, abs=1e-6)
    checkpoints = run / "checkpoints"
    if strategy != "plain":
        assert (checkpoints / "last.ckpt").is_dir()  # a DeepSpeed checkpoint directory


def test_sigterm_saves_the_step_it_stopped_at_and_resumes_there(
    preprocessed, tiny_release, tmp_path, monkeypatch, golden_curve
):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    previous = signal.getsignal(signal.SIGTERM)
    run, losses = tmp_path / "run", tmp_path / "losses.jsonl"
    try:
        with pytest.raises(SIGTERMException):
            _fit(_experiment(tmp_path, None, crash="sigterm"), run, losses, preprocessed, tiny_release, resume=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    cli = _fit(_experiment(tmp_path, None, crash=False), run, losses, preprocessed, tiny_release, resume=True)
    assert cli.trainer.global_step == MAX_STEPS
    # Saved at the step it stopped at, so no step runs twice.
    assert [json.loads(line)["step"] for line in losses.read_text().splitlines()] == list(range(MAX_STEPS))
    assert _curve(losses) == pytest.approx(golden_curve, rel=1e-4, abs=1e-6)
    from module_helpers import tensorboard_scalars

    assert [step for step, _ in tensorboard_scalars(run / "tensorboard")["train/loss"]] == list(range(MAX_STEPS))


@pytest.mark.parametrize("first_stop", ["epoch_end", "mid_epoch"])
def test_tensorboard_steps_run_on_without_a_gap_across_a_resume(
    first_stop, preprocessed, tiny_release, tmp_path, monkeypatch, golden_curve
):
    """A run stopped by max_steps (saved by ResumableCheckpoint at the end of training),
    once exactly at an epoch end and once inside an epoch, then resumed: TensorBoard holds
    every step once, at its own step, with the uninterrupted run's loss."""
    from module_helpers import tensorboard_scalars

    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    experiment = _experiment(tmp_path, None, crash=False)
    run, losses = tmp_path / "run", tmp_path / "losses.jsonl"
    folder, manifest, store, _ = preprocessed
    overrides = [o for o in store_overrides(tiny_release, manifest, store, run) if not o.startswith("--preprocess.")]

    def fit(max_steps: int, resume: bool):
        return EchoVideoCLI(args=[
            "fit", "--config", str(experiment), *overrides, f"--trainer.max_steps={max_steps}",
            "--trainer.callbacks+=test_exact_resume.LossRecorder", f"--trainer.callbacks.init_args.path={losses}",
            *(["--ckpt_path=last"] if resume else [])])

    epoch_length = 5  # batches of the tiny store at batch size 2 (9 samples, 2 loader workers)
    first = fit(epoch_length if first_stop == "epoch_end" else epoch_length + 1, resume=False)
    assert first.trainer.num_training_batches == epoch_length
    fit(MAX_STEPS, resume=True)
    logged = tensorboard_scalars(run / "tensorboard")["train/loss"]
    assert [step for step, _ in logged] == list(range(MAX_STEPS))
    assert [loss for _, loss in logged] == pytest.approx(golden_curve, rel=1e-4, abs=1e-6)
