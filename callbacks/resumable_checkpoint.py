"""ModelCheckpoint that always leaves a `last.ckpt` of the final step."""

from lightning.pytorch.callbacks import ModelCheckpoint


class ResumableCheckpoint(ModelCheckpoint):
    """Saves `last.ckpt` when training ends (max_steps, max_time, early stop) and when it is
    interrupted (Ctrl-C, SIGTERM from a scheduler), so `--ckpt_path last` resumes from the
    step the run stopped at rather than from the last periodic save.

    Defaults: `save_last=True`, `save_on_exception=True`; everything else as ModelCheckpoint.
    """

    def __init__(self, *args, save_last: bool = True, save_on_exception: bool = True, **kwargs):
        super().__init__(*args, save_last=save_last, save_on_exception=save_on_exception, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
            return
        super().on_train_end(trainer, pl_module)
