"""The LightningCLI behind `echovideo {fit,validate,test,predict}` and `echovideo preprocess`.

Experiments compose with `class_path`/`init_args` (several `--config` files merge in order).
Values that follow from others are derived here, not interpolated: see `EchoVideoCLI`.
`echovideo/cli.py` (the entry point) imports this module only when one of these commands
runs, so `echovideo --help` and the other commands never wait for Lightning.
"""

import json
import os

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.fabric.utilities.cloud_io import get_filesystem

from datamodules.errors import ExperimentError
from lightning_modules.deepspeed_checkpoint import DeepSpeedCheckpointError, deepspeed_client_state


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


class StepsProgressBar(RichProgressBar):
    """Lightning's default bar, less the `Epoch 7/-2` it shows when max_steps bounds the run (max_epochs -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


# Names Lightning resolves itself; any other --ckpt_path must exist.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
RESUMABLE_CHECKPOINT = "callbacks.resumable_checkpoint.ResumableCheckpoint"


class EchoVideoCLI(LightningCLI):
    """LightningCLI with one run directory and checkpoints that resume with their settings.

    `--run_dir DIR` (or `run_dir:` in the YAML) places the whole run: checkpoints in
    `DIR/checkpoints`, TensorBoard logs and the saved configs in `DIR/tensorboard`,
    predictions in `DIR/predictions`. It sets `trainer.default_root_dir` and every logger's
    `save_dir`, so those are never typed (a YAML that gives them a different value is
    refused). Sampling sizes left unset follow the data's (`data.num_frames`, `.height`,
    `.width`).

    `--ckpt_path last` is resolved here to the run's `last.ckpt`, a file or a DeepSpeed
    checkpoint directory, and the model's hyper-parameters are read back from either (plain
    LightningCLI reads them from a file only, so a ZeRO run would resume with the YAML's),
    all but the sampling settings, which the command line decides.
    """

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

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        error = parser.error

        def error_with_closest_keys(message, *args, **kw):
            return error(message + closest_keys(message, parser), *args, **kw)

        parser.error = error_with_closest_keys
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="the run's folder: checkpoints/, tensorboard/, predictions/")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.progress_bar_callback) is RichProgressBar:  # Lightning's default, not one configured
            trainer.progress_bar_callback.__class__ = StepsProgressBar
        return trainer

    def _section(self):
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        # The first hook after parsing: derived values are placed before anything reads them.
        section = self._section()
        place_run(section)
        follow_data_sizes(section)
        ckpt_path = section.get("ckpt_path")
        if not ckpt_path:
            return
        if ckpt_path == "last":
            found = last_checkpoint(section)
            if found is None:
                return  # Lightning warns and starts from the beginning: a first launch
            section["ckpt_path"] = ckpt_path = str(found)
        elif ckpt_path not in SPECIAL_CKPT_PATHS and not os.path.exists(ckpt_path):
            raise ExperimentError(f"ckpt_path: {ckpt_path} does not exist; give a checkpoint file, a DeepSpeed "
                                  "checkpoint directory, or `last` to resume the run in run_dir")
        if os.path.isdir(ckpt_path):
            try:
                state = deepspeed_client_state(ckpt_path)
            except DeepSpeedCheckpointError as error:
                raise ExperimentError(f"ckpt_path: {error}") from None
            self._merge_hyperparameters(state.get("hyper_parameters", {}))
        else:
            import torch

            try:  # what LightningCLI reads the file for: its hyper-parameters
                checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
            except Exception as error:
                problem = checkpoint_file_problem(ckpt_path)
                if problem is None:
                    raise
                raise ExperimentError(f"ckpt_path: {problem}") from error
            self._merge_hyperparameters(checkpoint.get("hyper_parameters", {}))

    def before_fit(self) -> None:
        """A feature store must have been written by this experiment's settings and encoders."""
        data = self.datamodule
        if getattr(data, "feature_store", None) is None:
            return
        from datamodules.preprocess import check_store_matches

        check_store_matches(data.feature_store, *store_spec(data, self.model), manifest=data.train_manifest)

    def _merge_hyperparameters(self, hparams: dict) -> None:
        """What LightningCLI does with a checkpoint's hyper-parameters (file or directory): the
        model resumes with the settings it was trained with. Except `sampling`, how to make
        videos, which this command's YAML and flags decide (`predict --ckpt_path ...
        --model.init_args.sampling.num_inference_steps 50` must sample with 50 steps)."""
        hparams = dict(hparams)
        hparams.pop("_instantiator", None)
        hparams.pop("sampling", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)


def closest_keys(message: str, parser) -> str:
    """For jsonargparse's "Option 'X' is not accepted" / "Unrecognized arguments": the closest valid keys."""
    import difflib
    import importlib
    import inspect
    import re

    hints = []
    for class_path, key in re.findall(r"class_path '([\w.]+)'[^']*?Option '(\w+)' is not accepted", message, re.S):
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        valid = [p for c in inspect.getmro(cls) if "__init__" in vars(c)
                 for p in inspect.signature(c.__init__).parameters if p not in ("self", "args", "kwargs")]
        close = difflib.get_close_matches(key, valid, n=3)
        if close:
            hints.append(f"'{key}' is not an option of {name}; closest: {', '.join(close)}")
    for key in re.findall(r"Unrecognized arguments:.*?--([\w.]+)", message):
        options = [o.lstrip("-") for action in parser._actions for o in action.option_strings]
        close = difflib.get_close_matches(key, options, n=3)
        if close:
            hints.append(f"'{key}' is not an option; closest: {', '.join(close)}")
    return "".join(f"\n  did you mean: {hint}" for hint in hints)


def checkpoint_file_problem(path) -> str | None:
    """Why a file that `torch.load` could not read is no usable checkpoint; None when it looks like one
    (then the failure is a bug, not the file)."""
    fix = ("give a .ckpt written by `echovideo fit`, a DeepSpeed checkpoint directory, or `last`; if a run's "
           "last.ckpt is damaged, resume from another checkpoint in its checkpoints/ folder")
    with open(path, "rb") as file:
        head = file.read(4)
    size = os.path.getsize(path)
    if not head:
        return f"{path} is empty, not a checkpoint; {fix}"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch's zip format, or its older pickle one
        return f"{path} is a damaged checkpoint (truncated? {size} bytes); {fix}"
    return f"{path} is not a checkpoint (it starts with {head!r}, not a torch.save file); {fix}"


def place_run(section) -> None:
    """`run_dir` -> `trainer.default_root_dir` and every logger's `save_dir`."""
    run_dir = section.get("run_dir")
    trainer = section["trainer"]
    if run_dir is None:
        return
    if trainer.get("default_root_dir") not in (None, run_dir):
        raise ExperimentError(f"trainer.default_root_dir ({trainer['default_root_dir']}) and run_dir ({run_dir}) "
                              "differ: set run_dir only, it places the whole run")
    trainer["default_root_dir"] = run_dir
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args:
            if init_args["save_dir"] not in (None, run_dir):
                raise ExperimentError(f"trainer.logger.init_args.save_dir ({init_args['save_dir']}) and run_dir "
                                      f"({run_dir}) differ: leave save_dir out, run_dir sets it")
            init_args["save_dir"] = run_dir


def follow_data_sizes(section) -> None:
    """Unset `model.init_args.sampling` sizes take the data's."""
    model, data = section.get("model"), section.get("data")
    sampling = getattr(getattr(model, "init_args", None), "sampling", None)
    data_args = getattr(data, "init_args", None)
    if sampling is None or data_args is None:
        return
    from lightning_modules.sampling import video_size_problems

    frames = data_args.get("num_frames")
    if video_size_problems("data", *(data_args.get(k) for k in ("num_frames", "height", "width"))):
        if sampling.get("num_frames") is None and video_size_problems("data", frames, None, None):
            # The DataModule's hint offers 4k+1 sizes; sampling these frames needs 8k+1 ones.
            raise ExperimentError("; ".join(video_size_problems("data", frames, None, None, decoded=True))
                                  + " (validation and predict videos follow data.num_frames unless "
                                  "model.init_args.sampling.num_frames is set)")
        return  # the DataModule refuses them, naming the data key rather than a copy of it
    if sampling.get("num_frames") is None and frames is not None and video_size_problems(
            "data", frames, None, None, decoded=True):
        raise ExperimentError(
            f"data.num_frames={frames}: sampled videos (validation, predict) follow the data's frames unless "
            f"model.init_args.sampling.num_frames is set, and the VAE decodes only 8k+1 frames back; "
            f"set model.init_args.sampling.num_frames (e.g. {frames + 4 if (frames - 1) % 8 else frames}) "
            f"or train on 8k+1 frames")
    for key in ("num_frames", "height", "width"):
        if sampling.get(key) is None and data_args.get(key) is not None:
            sampling[key] = data_args[key]


def last_checkpoint(section):
    """The run's `last.ckpt` (file or DeepSpeed directory), or None on a first launch."""
    from callbacks.resumable_checkpoint import recover_interrupted_publish

    dirpath = None
    for callback in section["trainer"].get("callbacks") or []:
        if getattr(callback, "class_path", None) == RESUMABLE_CHECKPOINT:
            dirpath = callback.init_args.get("dirpath")
    if dirpath is None:
        dirpath = os.path.join(section["trainer"].get("default_root_dir") or os.getcwd(), "checkpoints")
    last = os.path.join(dirpath, "last.ckpt")
    recover_interrupted_publish(last)
    return last if os.path.exists(last) else None


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
        super().add_arguments_to_parser(parser)
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
        parser.add_argument("--preprocess.measures", type=bool, default=True,
                            help="make each sample's quality measures, which data.filters reads (false: "
                                 "none, and fit then needs data.filters null)")
        parser.add_argument("--preprocess.encode_filtered", type=bool, default=True,
                            help="encode and store the samples data.filters drops too, so fit can relax a "
                                 "threshold without a new store (false: they are measured, counted and left "
                                 "out, which saves their encoding and, at batch size 1, a training step each)")
        parser.add_argument("--report-only", action="store_true",
                            help="encode nothing: rebuild <store>/report.json and report.html from the "
                                 "stored measures with this experiment's data.filters, and print how many "
                                 "samples each threshold keeps")

    def instantiate_trainer(self, **kwargs):
        return None

    def run_preprocess(self):
        # Imported here: fit/validate/predict need none of the preprocessing machinery.
        import torch

        from datamodules.preprocess import preprocess
        from lightning_modules.identity_check import refuse_random_identity_at_release_size
        from lightning_modules.release_layout import check_release_folder

        data, model = self.datamodule, self.model
        options = self.config["preprocess"]
        if self.config["report_only"]:
            from datamodules.preprocess import rebuild_report

            if data.feature_store is None:
                raise ExperimentError("preprocess --report-only needs data.feature_store (the store to report on)")
            report = rebuild_report(data.feature_store, data.filters)
            print(report.summary())
            return report
        if data.feature_store is None or data.train_manifest is None:
            raise ExperimentError("preprocess needs data.train_manifest (in) and data.feature_store (out); "
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
            *store_spec(data, model),
            num_workers=num_workers,
            part_size=options.part_size,
            chunk_bytes=options.chunk_bytes,
            overwrite=options.overwrite,
            num_nodes=options.num_nodes or int(os.environ.get("SLURM_NNODES", 1)),
            node_rank=options.node_rank if options.node_rank is not None else int(os.environ.get("SLURM_NODEID", 0)),
            filters=data.filters,
            measure=options.measures,
            encode_filtered=options.encode_filtered,
        )
        print(report.summary())
        return report


def store_spec(data, model):
    """(StoreSettings, EncoderSpec): what decides a feature store's values, from the experiment's
    datamodule and module. Preprocessing writes a store from it; fit checks a store against it."""
    from datamodules.preprocess import EncoderSpec, StoreSettings

    hp = model.hparams
    return (StoreSettings(buckets=data.buckets, frame_stride=data.frame_stride, face_size=data.face_size,
                          reference_frame=data.reference_frame, seed=data.seed),
            EncoderSpec(pretrained_path=hp.pretrained_path, encoder_dtype=hp.encoder_dtype,
                        identity_encoder=None if data.face_models else model._identity_encoder,
                        face_models=data.face_models))
