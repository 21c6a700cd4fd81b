"""DeepSpeed on CPU, for tests only: the kit's DeepSpeed strategy (Lightning's, resumable on
any world size) with its CUDA guard bypassed, so ZeRO-2 and ZeRO-3 run over the gloo backend
on a machine without a GPU.

Three things differ from the real strategy: the environment is set up as DDP sets it up
(no CUDA check), the device-index check is skipped (CPU devices have no index), and the
root device is `cpu:0` (DeepSpeed's engine asks for a device with an index). Everything
else, including ZeRO partitioning, checkpoint layout and the order in which Lightning
restores state, is the real code.
"""

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from lightning_modules.deepspeed_checkpoint import ResumableDeepSpeedStrategy


class CPUDeepSpeedStrategy(ResumableDeepSpeedStrategy):
    def __init__(self, *args, process_group_backend: str = "gloo", **kwargs):
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)
