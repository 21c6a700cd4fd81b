"""Build the LightningModule on the tiny release and run tiny Trainers, for the tests."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_modules.echovideo_module import EchoVideoModule
from lightning_modules.sampling import SamplingConfig
from lightning_modules.tiny import RepeatedBatches, build_tiny_identity_encoder


def build_module(release, **overrides) -> EchoVideoModule:
    kwargs = dict(
        pretrained_path=str(release),
        identity_encoder=build_tiny_identity_encoder(seed=0),
        learning_rate=1e-3,
        warmup_steps=0,
        weight_decay=0.0,
        encoder_dtype="float32",
        sampling=SamplingConfig(num_inference_steps=2, num_frames=9, height=32, width=32, fps=8, show_progress=False),
    )
    kwargs.update(overrides)
    module = EchoVideoModule(**kwargs)
    module.configure_model()
    return module


def loader(batch: dict, length: int) -> DataLoader:
    return DataLoader(RepeatedBatches(batch, length), batch_size=None)


def trainer(tmp_path=None, **overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    if tmp_path is not None:
        kwargs["default_root_dir"] = str(tmp_path)
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


class ModelInputRecorder:
    """Records, per transformer call, the timesteps, whether each sample's face-latent
    channels were zero, and a fingerprint of the noisy latent."""

    def __init__(self, module: EchoVideoModule):
        self.calls = []
        noisy_channels = module.transformer.config.out_channels
        module.transformer.register_forward_pre_hook(self._hook(noisy_channels), with_kwargs=True)

    @staticmethod
    def _face_kept(hidden_states, noisy_channels):
        face = hidden_states[:, :, noisy_channels:]
        return [bool(face[i].abs().sum() > 0) for i in range(face.shape[0])]

    def _hook(self, noisy_channels):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"].detach()
            self.calls.append({
                "timestep": kwargs["timestep"].tolist(),
                "face_kept": self._face_kept(hidden, noisy_channels),
                "noisy_sum": float(hidden[:, :, :noisy_channels].double().sum()),
            })
        return hook


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard log folder as its (step, value) points, all of them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
