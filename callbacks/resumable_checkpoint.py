"""ModelCheckpoint that always leaves a `last.ckpt` of the final step, never a broken one."""

import os
import shutil
from weakref import proxy

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class ResumableCheckpoint(ModelCheckpoint):
    """Saves `last.ckpt` when training ends (max_steps, max_time, early stop) and when it is
    interrupted (Ctrl-C, SIGTERM from a scheduler), so `--ckpt_path last` resumes from the
    step the run stopped at rather than from the last periodic save.

    Only a stop between two batches is saved: SIGTERM (Lightning raises it at a batch
    boundary), max_steps, max_time. Any other exception (a crash, Ctrl-C) may stop the run
    inside a batch that the data loader has already handed out, and a checkpoint taken
    then would resume one batch ahead of the uninterrupted run; so none is written and the
    run resumes from the last periodic checkpoint instead.

    Every checkpoint (a file, or a DeepSpeed directory) is written under `<name>.partial`
    and renamed into place once complete, so a kill during a save leaves the previous
    `last.ckpt` intact and `--ckpt_path last` never meets a half-written one.

    A resumed run's TensorBoard steps run on without a gap or a double (see
    `purge_tensorboard_from`).

    Defaults: `save_last=True`, `save_on_exception=True`, and `dirpath` None meaning
    `<trainer.default_root_dir>/checkpoints`, a place that does not depend on the logger's
    version, so a resumed run finds `last.ckpt` where the first run left it. And
    `enable_version_counter=False`: a newer save replaces a file of the same name (step
    names are unique) instead of writing `last-v1.ckpt` beside it, which a run copied or
    moved to another folder did, leaving `--ckpt_path last` on the stale `last.ckpt`.
    """

    def __init__(self, *args, save_last: bool = True, save_on_exception: bool = True,
                 enable_version_counter: bool = False, **kwargs):
        super().__init__(*args, save_last=save_last, save_on_exception=save_on_exception,
                         enable_version_counter=enable_version_counter, **kwargs)

    def _use_default_dirpath(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._use_default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # `ckpt_path="last"` is resolved before `setup`, so the default is needed here too.
        self._use_default_dirpath(trainer)
        if trainer.is_global_zero:
            recover_interrupted_publish(os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION))
        trainer.strategy.barrier()
        return super()._find_last_checkpoints(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path is not None:
            # A resumed run: the checkpoint it loaded is of this step, so this step needs no
            # save, and a crash before the next one resumes from here (not from step 0).
            self._last_global_step_saved = trainer.global_step
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    if isinstance(logger, TensorBoardLogger):
                        purge_tensorboard_from(logger, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # A stop that is known at this batch's end (max_steps, max_time's Timer and early
        # stopping run before checkpoint callbacks, SIGTERM received): save here, inside the
        # epoch, as a periodic save does. Saved later, in on_train_end, Lightning has closed
        # the epoch and the checkpoint records the next one: a run resumed from it counted
        # epochs one ahead and, from a manifest, drew the next epoch's order.
        stopping = (trainer.should_stop or trainer.received_sigterm
                    or (trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps))
        if (self.save_last and stopping and self._last_global_step_saved != trainer.global_step
                and not trainer.fit_loop.epoch_loop._should_accumulate()):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
            return
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)
            return
        if self.save_on_exception and trainer.global_step != self._last_global_step_saved:
            rank_zero_warn(
                f"{type(exception).__name__} stopped the run inside step {trainer.global_step}; no checkpoint "
                f"is written there (it would resume a batch ahead). `--ckpt_path last` resumes from step "
                f"{self._last_global_step_saved}. Stop a run with SIGTERM to save at the current step."
            )

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        if trainer.is_global_zero:
            _remove(partial)  # left by a save that was killed
        trainer.strategy.barrier()
        trainer.save_checkpoint(partial, self.save_weights_only)
        trainer.strategy.barrier()  # every rank's shard of a DeepSpeed checkpoint is written
        if trainer.is_global_zero:
            _publish(partial, filepath)
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def purge_tensorboard_from(logger: TensorBoardLogger, step: int) -> None:
    """Mark the run's event folder so TensorBoard drops what was logged at `step` and later
    before this point: a run that crashed after its last checkpoint had logged steps that
    the resumed run logs again, and each would show twice. The mark is the one
    `SummaryWriter(purge_step=...)` writes (a SessionLog START at that step)."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    # The run's own writer, not a second SummaryWriter(purge_step=...): TensorBoard reads a
    # folder's event files in name order, and a newer file would purge this writer's later steps.
    writer = logger.experiment._get_file_writer()
    writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
    writer.flush()


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _publish(partial: str, final: str) -> None:
    """Move a finished checkpoint into place. A file is replaced atomically; a directory
    (DeepSpeed) cannot be, so the old one is first renamed aside and removed only after the
    new one is in place: at every instant one complete checkpoint is findable."""
    if not os.path.isdir(partial):
        os.replace(partial, final)
        return
    aside = f"{final}.old"
    _remove(aside)
    if os.path.lexists(final):
        os.replace(final, aside)
    os.replace(partial, final)
    _remove(aside)


def recover_interrupted_publish(final: str) -> None:
    """A kill between the two renames of `_publish` leaves only `<final>.old`: put it back."""
    aside = f"{final}.old"
    if os.path.lexists(aside) and not os.path.lexists(final):
        os.replace(aside, final)
