"""The kit's one entry point: `echovideo {preprocess,fit,validate,predict} --config experiments/X.yaml`.

Also reachable as `python -m echovideo`. Experiments compose with `class_path`/`init_args`
and are parsed in omegaconf mode, so a YAML can interpolate its own values
(`${data.init_args.height}`). `--ckpt_path last` resumes from the newest `last.ckpt` of
the run's ModelCheckpoint directory.
"""

import json
import os
import sys

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


class PreprocessCLI(EchoVideoCLI):
    """`echovideo preprocess`: the experiment's data and model settings, no Trainer.

    The experiment YAML gives the sizes (`data.*`), the encoders (`model.pretrained_path`,
    `model.identity_encoder`, `model.encoder_dtype`) and the store (`data.feature_store`),
    so preprocessing and training cannot disagree. Nothing heavy is built here: the module
    loads its transformer only in `configure_model`, which preprocessing never calls.
    """

    def __init__(self, args=None):
        super().__init__(args=args, run=False)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--preprocess.num_workers", type=int, default=None,
                            help="encoding processes (default: one per GPU, else 1)")
        parser.add_argument("--preprocess.part_size", type=int, default=2048,
                            help="clips per resumable part (a kill loses at most one part)")
        parser.add_argument("--preprocess.chunk_bytes", type=str, default="256MB",
                            help="size of the store's chunk files")
        parser.add_argument("--preprocess.overwrite", type=bool, default=False,
                            help="delete an existing store and start anew")
        parser.add_argument("--preprocess.num_nodes", type=int, default=None,
                            help="machines sharing the work (default: $SLURM_NNODES, else 1)")
        parser.add_argument("--preprocess.node_rank", type=int, default=None,
                            help="this machine's index (default: $SLURM_NODEID, else 0)")

    def instantiate_trainer(self, **kwargs):
        return None

    def run_preprocess(self):
        # Imported here: fit/validate/predict need none of the preprocessing machinery.
        import torch

        from datamodules.preprocess import EncoderSpec, StoreSettings, preprocess
        from lightning_modules.identity_check import refuse_random_identity_at_release_size
        from lightning_modules.release_layout import check_release_folder

        data, model = self.datamodule, self.model
        options = self.config["preprocess"]
        if data.feature_store is None or data.train_manifest is None:
            raise ValueError("preprocess needs data.train_manifest (in) and data.feature_store (out); "
                             "set both in the experiment or with --data.init_args.<key>")
        hp = model.hparams
        if data.face_models is None:  # with face models, ArcFace comes from insightface
            transformer = check_release_folder(hp.pretrained_path, ["transformer"]) / "transformer"
            config = json.loads((transformer / "config.json").read_text())
            refuse_random_identity_at_release_size(model._identity_encoder, config)
        num_workers = options.num_workers or max(1, torch.cuda.device_count())
        report = preprocess(
            data.train_manifest,
            data.feature_store,
            StoreSettings(buckets=data.buckets, frame_stride=data.frame_stride, face_size=data.face_size,
                          reference_frame=data.reference_frame, seed=data.seed),
            EncoderSpec(pretrained_path=hp.pretrained_path, encoder_dtype=hp.encoder_dtype,
                        identity_encoder=None if data.face_models else model._identity_encoder,
                        face_models=data.face_models),
            num_workers=num_workers,
            part_size=options.part_size,
            chunk_bytes=options.chunk_bytes,
            overwrite=options.overwrite,
            num_nodes=options.num_nodes or int(os.environ.get("SLURM_NNODES", 1)),
            node_rank=options.node_rank if options.node_rank is not None else int(os.environ.get("SLURM_NODEID", 0)),
        )
        print(report.summary())
        return report


def main(args=None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["preprocess"]:
        PreprocessCLI(args=argv[1:]).run_preprocess()
        return
    EchoVideoCLI(args=args)


if __name__ == "__main__":
    main()
