"""Turn a batch (raw inputs and/or cached features) into the features the model consumes.

The one place that maps raw keys to cached keys (datamodules/batch.py); the
LightningModule, the feature store and the predict path all go through it.
"""

import torch

from datamodules import batch as keys
from lightning_modules.frozen_encoders import draw_latents


def encode_batch_features(
    encoders,
    batch: dict,
    video_size: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    with_face_latent: bool = True,
) -> dict[str, torch.Tensor]:
    """Return the cached-feature keys, encoding from raw keys only what is missing.

    `encoders` is a `FrozenEncoders`. `video_size` (H, W) sizes the face latent when the
    batch holds no video (prediction); otherwise the video's own size is used.
    `latents` is absent from the result when the batch has neither `latents` nor `video`.
    `with_face_latent=False` leaves an uncached face latent out (sampling draws it itself,
    from the posterior, after the initial noise).
    """
    device = device or encoders.device
    features = {
        key: batch[key].to(device).float() for key in keys.CACHED_KEYS if key in batch
    }
    needs_face = {keys.SIGLIP_TOKENS, keys.ARCFACE} - features.keys()
    if with_face_latent and keys.FACE_LATENT not in features:
        needs_face.add(keys.FACE_LATENT)
    if needs_face and keys.FACE_IMAGE not in batch:
        raise KeyError(
            f"batch lacks {sorted(needs_face)} and the raw `{keys.FACE_IMAGE}` to encode them from"
        )
    face_image = batch[keys.FACE_IMAGE].to(device) if needs_face else None
    video = batch.get(keys.VIDEO)

    if keys.LATENTS not in features and keys.LATENT_MEAN in batch:
        features[keys.LATENTS] = draw_latents(batch[keys.LATENT_MEAN], batch[keys.LATENT_STD], generator).to(device)
    if keys.LATENTS not in features and video is not None:
        features[keys.LATENTS] = encoders.encode_video(video.to(device), generator=generator)
    if with_face_latent and keys.FACE_LATENT not in features:
        if video is not None:
            video_size = tuple(video.shape[-2:])
        if video_size is None:
            raise ValueError("the face latent needs the video size: pass video_size=(H, W)")
        features[keys.FACE_LATENT] = encoders.encode_face_latent(face_image, *video_size)
    if keys.SIGLIP_TOKENS not in features:
        features[keys.SIGLIP_TOKENS] = encoders.encode_siglip(face_image)
    if keys.ARCFACE not in features:
        features[keys.ARCFACE] = encoders.encode_identity(face_image)
    if keys.TEXT_EMBEDS not in features:
        if keys.CAPTION not in batch:
            raise KeyError(f"batch lacks both `{keys.TEXT_EMBEDS}` and `{keys.CAPTION}`")
        features[keys.TEXT_EMBEDS] = encoders.encode_text(list(batch[keys.CAPTION]))
    return features
