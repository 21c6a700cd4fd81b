"""The frozen encoders that turn a raw batch into the transformer's conditions."""

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.video_processor import VideoProcessor
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizerBase, SiglipImageProcessor, SiglipVisionModel, T5EncoderModel

from lightning_modules.identity_encoder import IdentityEncoder
from lightning_modules.release_defaults import DTYPE_NAMES
from lightning_modules.release_layout import (
    check_release_folder,
    load_siglip,
    load_text_encoder,
    load_tokenizer,
    load_vae,
)

# The VAE's image preprocessing in the release's pipelines: PIL resize with Lanczos, then [-1, 1].
_VAE_IMAGE_PROCESSOR = VideoProcessor(vae_scale_factor=8, resample="lanczos")


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """B x 3 x H x W in [0, 1] -> H x W x 3 uint8 RGB arrays (exact for crops read from 8-bit files)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())


def pad_to_video_aspect(face: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad an H x W x 3 face with black, centred, to the video's aspect ratio, as released:
    the new side is the truncated `int(side * W / H)` (or `* H / W` for portrait videos),
    never smaller than the face, and top/left get the smaller half of the padding."""
    face_height, face_width = face.shape[:2]
    if width >= height:
        new_height, new_width = face_height, max(face_width, int(face_height * width / height))
    else:
        new_height, new_width = max(face_height, int(face_width * height / width)), face_width
    top, left = (new_height - face_height) // 2, (new_width - face_width) // 2
    padded = np.zeros((new_height, new_width, 3), dtype=face.dtype)
    padded[top : top + face_height, left : left + face_width] = face
    return padded


def face_image_for_vae(face: np.ndarray, height: int, width: int) -> torch.Tensor:
    """H x W x 3 uint8 face -> the VAE's 1 x 3 x height x width input in [-1, 1]: padded to
    the video's aspect (`pad_to_video_aspect`), resized with Lanczos by diffusers' video
    processor, as the release's pipeline prepares its image."""
    padded = Image.fromarray(pad_to_video_aspect(face, height, width))
    return _VAE_IMAGE_PROCESSOR.preprocess(padded, height=height, width=width).float()


# torch dtypes by the names experiments and flags use.
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


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
        siglip_dtype: torch.dtype | None = None,
    ) -> "FrozenEncoders":
        """Each part loads from `root` in `dtype` on first use; SigLIP in `siglip_dtype` when
        given (sampling as released loads it in bfloat16 whatever the rest runs in)."""
        # Check every needed part up front so one error lists all that is missing.
        root = check_release_folder(root, subfolders=("vae", "text_encoder", "tokenizer", "clip_visual_encoder"))
        siglip_parts = functools.cache(lambda: load_siglip(root, siglip_dtype or dtype))
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

    def caption_token_counts(self, captions: list[str]) -> list[int]:
        """Each caption's length in the text encoder's tokens, the end token included, uncut."""
        return [len(ids) for ids in self.tokenizer(list(captions), add_special_tokens=True).input_ids]

    def truncated_caption_count(self, captions: list[str]) -> int:
        """How many captions are longer than the text encoder's token limit (and get cut)."""
        return sum(length > self.max_text_seq_length for length in self.caption_token_counts(captions))

    @torch.no_grad()
    def encode_face_latent(
        self, face_image: torch.Tensor, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Square face crop in [0, 1] -> its scaled latent as ONE frame, B x 1 x C x h x w.

        The crop goes through the release's path (`face_image_for_vae`): padded with black
        to the video's aspect ratio, resized with Lanczos to height x width. The posterior's
        mode without a generator (training), a draw from it with one (sampling, as released).
        """
        pixels = torch.cat([face_image_for_vae(face, height, width) for face in to_uint8_images(face_image)])
        if generator is None:
            return self.encode_video(pixels.unsqueeze(2))
        # The draw exactly as the release's pipeline makes it: diffusers' posterior sample,
        # its noise in the VAE's dtype, from the one generator of the whole call.
        pixels = pixels.unsqueeze(2).to(device=self._device, dtype=_dtype_of(self.vae))
        latent = self.vae.encode(pixels).latent_dist.sample(generator) * self.vae_scaling_factor
        return latent.permute(0, 2, 1, 3, 4).float()

    @torch.no_grad()
    def encode_siglip(self, face_image: torch.Tensor) -> torch.Tensor:
        """Face crop in [0, 1] -> SigLIP last hidden state, B x N x D.

        As released: the crop as an 8-bit RGB image through the SigLIP image processor
        (PIL resize, rescale, normalise). Crops read from 8-bit files pass unchanged.
        """
        images = [Image.fromarray(face) for face in to_uint8_images(face_image)]
        pixel_values = self.siglip_processor(images=images, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=self._device, dtype=_dtype_of(self.siglip))
        return self.siglip(pixel_values=pixel_values).last_hidden_state.float()

    @torch.no_grad()
    def encode_identity(self, face_image: torch.Tensor) -> torch.Tensor:
        """Face crop in [0, 1] -> raw identity embedding, B x D_id."""
        return self.identity_encoder(face_image.to(self._device)).float()

    def latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width) the VAE makes of a video of this size."""
        from lightning_modules.sampling import num_latent_frames_for

        config = self.vae.config
        spatial = 2 ** (len(config.block_out_channels) - 1)
        return num_latent_frames_for(num_frames, config.temporal_compression_ratio), height // spatial, width // spatial

    @torch.no_grad()
    def unconditional_features(self, negative_prompt: str, arcface_dim: int) -> dict[str, torch.Tensor]:
        """One sample of the release's unconditional branch: T5 of the negative prompt, SigLIP
        of an all-black face, zero ArcFace (batch keys of datamodules/batch.py)."""
        from datamodules import batch as keys

        return {
            keys.TEXT_EMBEDS: self.encode_text([negative_prompt]),
            keys.SIGLIP_TOKENS: self.unconditional_siglip_tokens(1),
            keys.ARCFACE: torch.zeros(1, arcface_dim, device=self._device),
        }

    @torch.no_grad()
    def unconditional_siglip_tokens(self, batch_size: int) -> torch.Tensor:
        """SigLIP tokens of an all-black face: the release's unconditional face branch."""
        size = self.siglip_processor.size
        black = torch.zeros(batch_size, 3, size["height"], size["width"], device=self._device)
        return self.encode_siglip(black)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, vae=None) -> torch.Tensor:
        """Scaled latents B x f x C x h x w -> video B x 3 x F x H x W in [-1, 1], through
        `vae` (default: this module's; a copy in another dtype decodes the same way)."""
        vae = self.vae if vae is None else vae
        latents = latents.to(device=self._device, dtype=_dtype_of(vae))
        video = vae.decode(1 / self.vae_scaling_factor * latents.permute(0, 2, 1, 3, 4)).sample
        return video.clamp(-1, 1).float()
