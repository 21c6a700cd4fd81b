"""The Lightning state inside a DeepSpeed checkpoint directory, read as data.

A DeepSpeed checkpoint is a directory (`<tag>/mp_rank_00_model_states.pt` under ZeRO-1/2,
`<tag>/zero_pp_rank_<r>_mp_rank_00_model_states.pt` under ZeRO-3) whose model-states file
also carries Lightning's client state: hyper-parameters, loop and callback states, the data
loader's position. The kit reads that file with `torch.load(weights_only=True)`, which
unpickles tensors and plain containers only, so a directory from elsewhere cannot run code
when its settings are read. (Resuming the weights and optimizer goes through DeepSpeed's
own loader, which unpickles in full: resume only from checkpoints you trust.)
"""

import glob
import os
import pickle

import torch


class DeepSpeedCheckpointError(ValueError):
    """A path that is not a readable DeepSpeed checkpoint directory, with what to give instead."""


def model_states_file(directory: str) -> str:
    """The file of a DeepSpeed checkpoint directory that holds Lightning's client state."""
    # ZeRO-1/2 keep it in mp_rank_00_model_states.pt, ZeRO-3 in each rank's zero_pp_rank_*.
    files = sorted(glob.glob(os.path.join(directory, "*", "mp_rank_00_model_states.pt")))
    files += sorted(glob.glob(os.path.join(directory, "*", "zero_pp_rank_0_mp_rank_00_model_states.pt")))
    if not files:
        raise DeepSpeedCheckpointError(
            f"{directory} is a directory without */*mp_rank_00_model_states.pt, so not a DeepSpeed "
            "checkpoint; give a checkpoint file or a DeepSpeed directory")
    return files[0]


def deepspeed_client_state(directory: str) -> dict:
    """The Lightning state (hyper-parameters, loops, callbacks) inside a DeepSpeed checkpoint."""
    path = model_states_file(directory)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise DeepSpeedCheckpointError(
            f"{path}: holds objects other than tensors and plain data, which the kit does not unpickle "
            f"from a checkpoint ({str(error).splitlines()[0]}); it was not written by this kit's training") from None
