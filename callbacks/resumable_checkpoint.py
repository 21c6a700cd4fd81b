"""ModelCheckpoint that always leaves a `last.ckpt` of the final step."""

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class ResumableCheckpoint(ModelCheckpoint):
    """Saves `last.ckpt` when training ends (max_steps, max_time, early stop) and when it is
    interrupted (Ctrl-C, SIGTERM from a scheduler), so `--ckpt_path last` resumes from the
    step the run stopped at rather than from the last periodic save.

    Defaults: `save_last=True`, `save_on_exception=True`, and `dirpath` None meaning
    `<trainer.default_root_dir>/checkpoints`, a place that does not depend on the logger's
    version, so a resumed run finds `last.ckpt` where the first run left it.
    """

    def __init__(self, *args, save_last: bool = True, save_on_exception: bool = True, **kwargs):
        super().__init__(*args, save_last=save_last, save_on_exception=save_on_exception, **kwargs)

    def _use_default_dirpath(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._use_default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # `ckpt_path="last"` is resolved before `setup`, so the default is needed here too.
        self._use_default_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
            return
        super().on_train_end(trainer, pl_module)
