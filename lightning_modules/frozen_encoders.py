"""The frozen encoders that turn a raw batch into the transformer's conditions."""

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


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class FrozenEncoders(nn.Module):
    """VAE, T5, SigLIP and the identity encoder, frozen and always in eval mode.

    Every method runs without autograd, takes and returns tensors on the encoders' device,
    and returns float32 whatever dtype the encoders run in. Latents come out frames first
    (B x f x C x h x w, the transformer's layout) and multiplied by the VAE scaling factor.
    """

    def __init__(
        self,
        vae: AutoencoderKLCogVideoX,
        text_encoder: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        siglip: SiglipVisionModel,
        siglip_processor: SiglipImageProcessor,
        identity_encoder: IdentityEncoder,
        max_text_seq_length: int = 226,
    ):
        super().__init__()
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.siglip = siglip
        self.siglip_processor = siglip_processor
        self.identity_encoder = identity_encoder
        self.max_text_seq_length = max_text_seq_length
        resample = int(siglip_processor.resample)
        if resample not in _PIL_RESAMPLE_TO_TORCH:
            raise ValueError(f"SigLIP processor resampling {siglip_processor.resample!r} has no torch equivalent")
        self.siglip_resize_mode = _PIL_RESAMPLE_TO_TORCH[resample]
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_release_folder(
        cls,
        root: str | Path,
        identity_encoder: IdentityEncoder,
        max_text_seq_length: int = 226,
        dtype: torch.dtype = torch.float32,
    ) -> "FrozenEncoders":
        # Check every needed part up front so one error lists all that is missing.
        root = check_release_folder(root, subfolders=("vae", "text_encoder", "tokenizer", "clip_visual_encoder"))
        siglip, siglip_processor = load_siglip(root, dtype)
        return cls(
            vae=load_vae(root, dtype),
            text_encoder=load_text_encoder(root, dtype),
            tokenizer=load_tokenizer(root),
            siglip=siglip,
            siglip_processor=siglip_processor,
            identity_encoder=identity_encoder,
            max_text_seq_length=max_text_seq_length,
        )

    def train(self, mode: bool = True) -> "FrozenEncoders":
        # Frozen encoders stay in eval even when the trainer switches the whole model to train.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return _device_of(self.vae)

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
        hidden = self.text_encoder(token_ids.to(_device_of(self.text_encoder))).last_hidden_state
        return hidden.float()

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """B x 3 x F x H x W in [-1, 1] -> scaled latents B x f x C x h x w.

        Samples the VAE posterior with `generator` when one is given, else takes its mode.
        """
        video = video.to(device=_device_of(self.vae), dtype=_dtype_of(self.vae))
        posterior = self.vae.encode(video).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        return (latents * self.vae_scaling_factor).permute(0, 2, 1, 3, 4).float()

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
        face_image = face_image.to(device=_device_of(self.siglip), dtype=torch.float32)
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
        return self.identity_encoder(face_image.to(_device_of(self.identity_encoder))).float()

    @torch.no_grad()
    def unconditional_siglip_tokens(self, batch_size: int) -> torch.Tensor:
        """SigLIP tokens of an all-black face: the release's unconditional face branch."""
        size = self.siglip_processor.size
        black = torch.zeros(batch_size, 3, size["height"], size["width"], device=_device_of(self.siglip))
        return self.encode_siglip(black)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents B x f x C x h x w -> video B x 3 x F x H x W in [-1, 1]."""
        latents = latents.to(device=_device_of(self.vae), dtype=_dtype_of(self.vae))
        video = self.vae.decode(latents.permute(0, 2, 1, 3, 4) / self.vae_scaling_factor).sample
        return video.clamp(-1, 1).float()
