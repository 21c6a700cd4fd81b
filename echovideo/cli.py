"""The kit's one entry point: `echovideo {fit,validate,predict} --config experiments/X.yaml`.

Also reachable as `python -m echovideo`. Experiments compose with `class_path`/`init_args`
and are parsed in omegaconf mode, so a YAML can interpolate its own values
(`${data.init_args.height}`). `--ckpt_path last` resumes from the newest `last.ckpt` of
the run's ModelCheckpoint directory.
"""

import os

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.fabric.utilities.cloud_io import get_filesystem


class KeepEveryConfig(SaveConfigCallback):
    """Saves the run's config next to its logs without ever overwriting an earlier one.

    The first launch writes `config.yaml`; a resumed or later launch into the same log
    directory writes `config.1.yaml`, `config.2.yaml`, ... so a resume never fails on an
    existing file and the original settings are kept.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            return super().setup(trainer, pl_module, stage)
        log_dir = trainer.log_dir
        filename = self.config_filename
        if trainer.is_global_zero:
            fs = get_filesystem(log_dir)
            stem, ext = os.path.splitext(self.config_filename)
            index = 0
            while fs.isfile(os.path.join(log_dir, filename)):
                index += 1
                filename = f"{stem}.{index}{ext}"
        self.config_filename = trainer.strategy.broadcast(filename)
        super().setup(trainer, pl_module, stage)


class EchoVideoCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=KeepEveryConfig,
            parser_kwargs={"parser_mode": "omegaconf"},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )


def main(args=None) -> None:
    EchoVideoCLI(args=args)


if __name__ == "__main__":
    main()
