"""Two-stage training with stochastic shallow face features (EchoVideo, section on stage 2).

Stage 1 always gives the transformer the face latent. From `stage_two_start_step` on,
each sample keeps it with probability `face_latent_keep_prob` and gets zeros otherwise,
so the model cannot copy face pixels and must lean on the IITF tokens.
"""

import logging

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class TwoStageFaceLatentSchedule(pl.Callback):
    """Sets `pl_module.face_latent_keep_prob` from `trainer.global_step` before every batch.

    The stage is a pure function of the global step, so it is right after a resume under
    any strategy; the per-sample draws come from the module's step-keyed generators, so
    a resumed run repeats the uninterrupted run's masks. The module logs the realised
    keep rate (it sees the mask); this callback logs the stage.
    """

    def __init__(self, stage_two_start_step: int, face_latent_keep_prob: float = 0.5):
        if stage_two_start_step < 0:
            raise ValueError(f"stage_two_start_step must be >= 0, got {stage_two_start_step}")
        if not 0.0 <= face_latent_keep_prob <= 1.0:
            raise ValueError(f"face_latent_keep_prob must be in [0, 1], got {face_latent_keep_prob}")
        self.stage_two_start_step = stage_two_start_step
        self.face_latent_keep_prob = face_latent_keep_prob
        self.started_stage_two_at: int | None = None

    def stage(self, global_step: int) -> int:
        return 1 if global_step < self.stage_two_start_step else 2

    def keep_prob(self, global_step: int) -> float:
        return 1.0 if self.stage(global_step) == 1 else self.face_latent_keep_prob

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        stage = self.stage(step)
        if stage == 2 and self.started_stage_two_at is None:
            self.started_stage_two_at = step
            log.info("stage 2 from step %d: face latent kept with p=%.3f", step, self.face_latent_keep_prob)
        pl_module.face_latent_keep_prob = self.keep_prob(step)
        pl_module.log("train/stage", float(stage), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.face_latent_keep_prob = 1.0

    def state_dict(self) -> dict:
        return {
            "stage_two_start_step": self.stage_two_start_step,
            "face_latent_keep_prob": self.face_latent_keep_prob,
            "started_stage_two_at": self.started_stage_two_at,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.started_stage_two_at = state_dict.get("started_stage_two_at")
        saved = (state_dict.get("stage_two_start_step"), state_dict.get("face_latent_keep_prob"))
        if saved != (self.stage_two_start_step, self.face_latent_keep_prob):
            log.warning(
                "resuming with a changed two-stage schedule: checkpoint had start step %s, keep prob %s; "
                "now %s, %s (the new values apply from here on)",
                *saved, self.stage_two_start_step, self.face_latent_keep_prob,
            )
