"""The one batch contract between data, cache, LightningModule, predict path and tests.

A batch is a dict. For each condition it carries either the raw input, which the
LightningModule encodes on the fly with its frozen encoders, or the cached feature, which
it uses as is. When both are present the cached feature wins.

| raw key      | shape / type                         | cached key      | shape                      |
|--------------|--------------------------------------|-----------------|----------------------------|
| `video`      | B x 3 x F x H x W float in [-1, 1]   | `latents`       | B x f x C x h x w (scaled) |
|              |                                      | `latent_mean`,  | the VAE posterior (scaled) |
|              |                                      | `latent_std`    | each B x f x C x h x w     |
| `face_image` | B x 3 x S x S float in [0, 1]        | `face_latent`   | B x 1 x C x h x w (scaled) |
|              |                                      | `siglip_tokens` | B x N_face x D_face        |
|              |                                      | `arcface`       | B x D_id                   |
| `caption`    | list of B str                        | `text_embeds`   | B x L_text x D_text        |

`video` uses the VAE's layout (channels first); `latents` use the transformer's layout
(frames first), already multiplied by the VAE scaling factor. The feature store keeps the
posterior (`latent_mean`, `latent_std`) instead of one draw, so every training step draws
a fresh latent from the step's generator, exactly as on-the-fly encoding does. `face_latent` is the face
image encoded as ONE latent frame; the module zero-pads it to all latent frames.
`face_image` is the aligned square face crop; the module derives the VAE input (padded to
the video's aspect ratio), the SigLIP input and the identity-encoder input from it.

Bookkeeping keys: `sample_id` (list of B str) and `skipped` (int64 tensor, one count per
reason of `datamodules.skip_reasons.SKIP_REASONS`: samples the loader dropped from this
batch).
"""

VIDEO = "video"
FACE_IMAGE = "face_image"
CAPTION = "caption"

LATENTS = "latents"
FACE_LATENT = "face_latent"
SIGLIP_TOKENS = "siglip_tokens"
ARCFACE = "arcface"
TEXT_EMBEDS = "text_embeds"

SAMPLE_ID = "sample_id"
SKIPPED = "skipped"

LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"

CACHED_KEYS = (LATENTS, FACE_LATENT, SIGLIP_TOKENS, ARCFACE, TEXT_EMBEDS)
RAW_KEYS = (VIDEO, FACE_IMAGE, CAPTION)
