"""The one batch contract between data, cache, LightningModule, predict path and tests.

A batch is a dict. For each condition it carries either the raw input, which the
LightningModule encodes on the fly with its frozen encoders, or the cached feature, which
it uses as is. When both are present the cached feature wins.

| raw key      | shape / type                         | cached key      | shape                      |
|--------------|--------------------------------------|-----------------|----------------------------|
| `video`      | B x 3 x F x H x W float in [-1, 1]   | `latents`       | B x f x C x h x w (scaled) |
| `face_image` | B x 3 x S x S float in [0, 1]        | `face_latent`   | B x 1 x C x h x w (scaled) |
|              |                                      | `siglip_tokens` | B x N_face x D_face        |
|              |                                      | `arcface`       | B x D_id                   |
| `caption`    | list of B str                        | `text_embeds`   | B x L_text x D_text        |

`video` uses the VAE's layout (channels first); `latents` use the transformer's layout
(frames first), already multiplied by the VAE scaling factor. `face_latent` is the face
image encoded as ONE latent frame; the module zero-pads it to all latent frames.
`face_image` is the aligned square face crop; the module derives the VAE input (padded to
the video's aspect ratio), the SigLIP input and the identity-encoder input from it.

Bookkeeping keys: `sample_id` (list of B str) and `num_skipped` (int tensor: samples the
loader dropped from this batch because their files were unreadable).
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
NUM_SKIPPED = "num_skipped"

CACHED_KEYS = (LATENTS, FACE_LATENT, SIGLIP_TOKENS, ARCFACE, TEXT_EMBEDS)
RAW_KEYS = (VIDEO, FACE_IMAGE, CAPTION)
