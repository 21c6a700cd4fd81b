"""Two-stage face-latent schedule: switching step, logging, and resume-proof draws."""

import lightning.pytorch as pl
import pytest
import torch

from callbacks.resumable_checkpoint import ResumableCheckpoint
from callbacks.two_stage_face_latent import TwoStageFaceLatentSchedule
from lightning_modules.batch_features import encode_batch_features
from module_helpers import ModelInputRecorder, build_module, loader, trainer


class KeepProbRecorder(pl.Callback):
    """Reads the module's keep probability after the schedule has set it."""

    def __init__(self):
        self.keep_probs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keep_probs.append(pl_module.face_latent_keep_prob)


@pytest.fixture
def cached_features(tiny_release, raw_batch):
    module = build_module(tiny_release)
    return {k: v.clone() for k, v in encode_batch_features(module.encoders, raw_batch).items()}


def test_stage_switches_at_the_configured_step(tiny_release, cached_features, tmp_path):
    module = build_module(tiny_release)
    inputs = ModelInputRecorder(module)
    schedule = TwoStageFaceLatentSchedule(stage_two_start_step=3, face_latent_keep_prob=0.5)
    seen = KeepProbRecorder()
    fit = trainer(tmp_path, max_steps=8, callbacks=[schedule, seen])
    fit.fit(module, loader(cached_features, 8))

    assert seen.keep_probs == [1.0] * 3 + [0.5] * 5
    kept = [call["face_kept"] for call in inputs.calls]
    assert all(all(k) for k in kept[:3])  # stage 1: every sample has its face latent
    stage_two = [flag for k in kept[3:] for flag in k]
    assert True in stage_two and False in stage_two  # stage 2: some kept, some zeroed
    assert schedule.started_stage_two_at == 3
    assert fit.callback_metrics["train/stage"] == 2.0
    assert module.face_latent_keep_prob == 1.0  # sampling after training uses the face latent


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ValueError, match="face_latent_keep_prob"):
        TwoStageFaceLatentSchedule(stage_two_start_step=10, face_latent_keep_prob=1.5)
    with pytest.raises(ValueError, match="stage_two_start_step"):
        TwoStageFaceLatentSchedule(stage_two_start_step=-1)


def _run(release, features, root, max_steps, ckpt_path=None):
    module = build_module(release, text_dropout_prob=0.3, identity_dropout_prob=0.3)
    inputs = ModelInputRecorder(module)
    schedule = TwoStageFaceLatentSchedule(stage_two_start_step=3, face_latent_keep_prob=0.5)
    seen = KeepProbRecorder()
    checkpoint = ResumableCheckpoint(every_n_train_steps=100)
    fit = trainer(root, max_steps=max_steps, enable_checkpointing=True, callbacks=[schedule, seen, checkpoint])
    fit.fit(module, loader(features, 100), ckpt_path=ckpt_path)
    return module, inputs.calls, seen.keep_probs, schedule


def test_resumed_run_continues_in_the_right_stage_with_the_same_random_stream(
    tiny_release, cached_features, tmp_path
):
    full_module, full_calls, full_probs, _ = _run(tiny_release, cached_features, tmp_path / "full", 6)

    _, first_calls, _, _ = _run(tiny_release, cached_features, tmp_path / "split", 4)
    assert (tmp_path / "split" / "checkpoints" / "last.ckpt").is_file()
    resumed_module, resumed_calls, resumed_probs, schedule = _run(
        tiny_release, cached_features, tmp_path / "split", 6, ckpt_path="last"
    )

    assert first_calls == full_calls[:4]
    assert resumed_probs == full_probs[4:] == [0.5, 0.5]
    assert resumed_calls == full_calls[4:]  # same timesteps, noise and face-latent masks
    assert schedule.started_stage_two_at == 3  # restored, not re-detected at step 4
    for (name, a), (_, b) in zip(full_module.transformer.state_dict().items(),
                                 resumed_module.transformer.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
