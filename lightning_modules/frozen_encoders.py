"""The frozen encoders that turn a raw batch into the transformer's conditions."""

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX
from torch import nn
from transformers import PreTrainedTokenizerBase, SiglipImageProcessor, SiglipVisionModel, T5EncoderModel

from lightning_modules.identity_encoder import IdentityEncoder
from lightning_modules.release_layout import (
    check_release_folder,
    load_siglip,
    load_text_encoder,
    load_tokenizer,
    load_vae,
)

# PIL resampling codes (what image processors store) -> torch interpolate modes.
_PIL_RESAMPLE_TO_TORCH = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def draw_latents(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Latents from a VAE posterior given as scaled mean and std: its mode without a
    generator, else one draw.

    The one place a posterior becomes latents, shared by on-the-fly encoding and the
    feature store (which keeps the posterior so every step draws a fresh latent).
    """
    mean = mean.float()
    if generator is None:
        return mean
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return mean + std.float() * noise


class FrozenEncoders(nn.Module):
    """VAE, T5, SigLIP and the identity encoder, frozen and always in eval mode.

    Every method runs without autograd, takes and returns tensors on the encoders' device,
    and returns float32 whatever dtype the encoders run in. Latents come out frames first
    (B x f x C x h x w, the transformer's layout) and multiplied by the VAE scaling factor.

    Built from a release folder, each part is loaded the first time it is used: training
    from a feature store never touches T5 (9.5 GB in bf16) or the VAE's encoder, so they
    never occupy memory there. `place(device)` moves the loaded parts and sets where later
    ones go.
    """

    LAZY_PARTS = ("vae", "text_encoder", "tokenizer", "siglip", "siglip_processor")

    def __init__(
        self,
        vae: AutoencoderKLCogVideoX | None = None,
        text_encoder: T5EncoderModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        siglip: SiglipVisionModel | None = None,
        siglip_processor: SiglipImageProcessor | None = None,
        identity_encoder: IdentityEncoder | None = None,
        max_text_seq_length: int = 226,
        loaders: dict[str, Callable[[], object]] | None = None,
    ):
        super().__init__()
        self._loaders = dict(loaders or {})
        self._device = torch.device("cpu")
        given = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "siglip": siglip,
                 "siglip_processor": siglip_processor}
        for name, part in given.items():
            if part is not None:
                self._install(name, part)
            elif name not in self._loaders:
                raise ValueError(f"FrozenEncoders needs `{name}` or a loader for it")
        self.identity_encoder = identity_encoder
        self.max_text_seq_length = max_text_seq_length
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_release_folder(
        cls,
        root: str | Path,
        identity_encoder: IdentityEncoder | None,
        max_text_seq_length: int = 226,
        dtype: torch.dtype = torch.float32,
    ) -> "FrozenEncoders":
        # Check every needed part up front so one error lists all that is missing.
        root = check_release_folder(root, subfolders=("vae", "text_encoder", "tokenizer", "clip_visual_encoder"))
        siglip_parts = functools.cache(lambda: load_siglip(root, dtype))
        return cls(
            identity_encoder=identity_encoder,
            max_text_seq_length=max_text_seq_length,
            loaders={
                "vae": lambda: load_vae(root, dtype),
                "text_encoder": lambda: load_text_encoder(root, dtype),
                "tokenizer": lambda: load_tokenizer(root),
                "siglip": lambda: siglip_parts()[0],
                "siglip_processor": lambda: siglip_parts()[1],
            },
        )

    def _install(self, name: str, part) -> None:
        if isinstance(part, nn.Module):
            part.requires_grad_(False).eval().to(self._device)
        if name == "siglip_processor":
            resample = int(part.resample)
            if resample not in _PIL_RESAMPLE_TO_TORCH:
                raise ValueError(f"SigLIP processor resampling {part.resample!r} has no torch equivalent")
            self.siglip_resize_mode = _PIL_RESAMPLE_TO_TORCH[resample]
        setattr(self, name, part)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            loaders = self.__dict__.get("_loaders", {})
            if name not in loaders:
                raise
            self._install(name, loaders.pop(name)())
            return super().__getattr__(name) if name in self._modules else self.__dict__[name]

    def loaded_parts(self) -> list[str]:
        """The parts in memory now (the rest load on first use)."""
        return [name for name in self.LAZY_PARTS if name not in self._loaders]

    def place(self, device: torch.device | str) -> "FrozenEncoders":
        """Move the loaded parts to `device`; parts loaded later go there too."""
        self._device = torch.device(device)
        return self.to(self._device)

    def train(self, mode: bool = True) -> "FrozenEncoders":
        # Frozen encoders stay in eval even when the trainer switches the whole model to train.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def vae_scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """T5 last hidden state of the captions, padded/truncated to B x L x D (as CogVideoX does)."""
        token_ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_text_seq_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        # CogVideoX feeds the padded ids without an attention mask; the release was trained so.
        hidden = self.text_encoder(token_ids.to(self._device)).last_hidden_state
        return hidden.float()

    @torch.no_grad()
    def encode_video_posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x 3 x F x H x W in [-1, 1] -> the VAE posterior's mean and standard deviation.

        Both multiplied by the VAE scaling factor, frames first (B x f x C x h x w), float32;
        `draw_latents` turns them into latents.
        """
        video = video.to(device=self._device, dtype=_dtype_of(self.vae))
        posterior = self.vae.encode(video).latent_dist
        scale = self.vae_scaling_factor
        return ((posterior.mean * scale).permute(0, 2, 1, 3, 4).float(),
                (posterior.std * scale).permute(0, 2, 1, 3, 4).float())

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """B x 3 x F x H x W in [-1, 1] -> scaled latents B x f x C x h x w.

        Samples the VAE posterior with `generator` when one is given, else takes its mode.
        """
        return draw_latents(*self.encode_video_posterior(video), generator)

    def truncated_caption_count(self, captions: list[str]) -> int:
        """How many captions are longer than the text encoder's token limit (and get cut)."""
        lengths = [len(ids) for ids in self.tokenizer(list(captions), add_special_tokens=True).input_ids]
        return sum(length > self.max_text_seq_length for length in lengths)

    @torch.no_grad()
    def encode_face_latent(self, face_image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Square face crop in [0, 1] -> its scaled latent as ONE frame, B x 1 x C x h x w.

        The crop is padded with black to the video's aspect ratio (centered) and resized to
        height x width first, as the release does.
        """
        size = face_image.shape[-1]
        padded_height = max(size, round(size * height / width))
        padded_width = max(size, round(size * width / height))
        top, left = (padded_height - size) // 2, (padded_width - size) // 2
        padded = F.pad(
            face_image, (left, padded_width - size - left, top, padded_height - size - top), value=0.0
        )
        resized = F.interpolate(padded, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return self.encode_video((resized * 2 - 1).unsqueeze(2))

    @torch.no_grad()
    def encode_siglip(self, face_image: torch.Tensor) -> torch.Tensor:
        """Face crop in [0, 1] -> SigLIP last hidden state, B x N x D.

        Reproduces the SigLIP image processor on tensors: resize with its resampling
        (antialiased, as torchvision does), then normalise with its mean and std. A [0, 1]
        input is already what the processor's rescale step produces.
        """
        processor = self.siglip_processor
        face_image = face_image.to(device=self._device, dtype=torch.float32)
        antialias = self.siglip_resize_mode in ("bilinear", "bicubic")
        resized = F.interpolate(
            face_image,
            size=(processor.size["height"], processor.size["width"]),
            mode=self.siglip_resize_mode,
            antialias=antialias,
            **({"align_corners": False} if antialias else {}),
        )
        mean = torch.tensor(processor.image_mean, device=resized.device).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, device=resized.device).view(1, -1, 1, 1)
        pixel_values = ((resized - mean) / std).to(_dtype_of(self.siglip))
        return self.siglip(pixel_values=pixel_values).last_hidden_state.float()

    @torch.no_grad()
    def encode_identity(self, face_image: torch.Tensor) -> torch.Tensor:
        """Face crop in [0, 1] -> raw identity embedding, B x D_id."""
        return self.identity_encoder(face_image.to(self._device)).float()

    @torch.no_grad()
    def unconditional_siglip_tokens(self, batch_size: int) -> torch.Tensor:
        """SigLIP tokens of an all-black face: the release's unconditional face branch."""
        size = self.siglip_processor.size
        black = torch.zeros(batch_size, 3, size["height"], size["width"], device=self._device)
        return self.encode_siglip(black)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents B x f x C x h x w -> video B x 3 x F x H x W in [-1, 1]."""
        latents = latents.to(device=self._device, dtype=_dtype_of(self.vae))
        video = self.vae.decode(latents.permute(0, 2, 1, 3, 4) / self.vae_scaling_factor).sample
        return video.clamp(-1, 1).float()
