"""TensorBoard logging into the run directory."""

from lightning.pytorch.loggers import TensorBoardLogger


class RunTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger whose `save_dir` is the run directory (`run_dir`, set by the CLI)
    and whose version folder is fixed, so a resumed run logs into the same event folder:
    `<run_dir>/tensorboard/`."""

    def __init__(self, save_dir: str | None = None, name: str = "tensorboard", version: str | int = "", **kwargs):
        if save_dir is None:
            raise ValueError("RunTensorBoardLogger needs a save_dir: set run_dir (YAML or --run_dir), "
                             "which places the logs in <run_dir>/tensorboard")
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)
