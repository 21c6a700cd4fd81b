"""Tiny random twins of every part of the EchoVideo release, for tests and the demo.

This is the one place holding the small configs. Each part has the real part's class and
layout (VAE: 8x spatial and 4x temporal compression, 16 latent channels; SigLIP: a patch
grid of tokens; T5: an encoder with `</s>` appended), only with few and narrow layers, so
the whole release builds and writes to disk in about a second. `write_tiny_release` lays
the parts out exactly as the public release does, so every loader can be exercised offline.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
)

from lightning_modules.echovideo_transformer import EchoVideoTransformer3DModel
from lightning_modules.identity_encoder import TinyRandomRecognizer

# 4 blocks with 3 spatial downsamples and 2 temporal ones: 1 x 3 x 9 x 64 x 64 encodes to
# 1 x 16 x 3 x 8 x 8, as the real VAE compresses; about 2.8 M parameters.
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("CogVideoXDownBlock3D",) * 4,
    "up_block_types": ("CogVideoXUpBlock3D",) * 4,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "temporal_compression_ratio": 4,
    "scaling_factor": 0.7,
    "sample_height": 64,
    "sample_width": 64,
}

# T5's special ids (<pad>=0, </s>=1, <unk>=2) followed by a small caption vocabulary.
TINY_TOKENIZER_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
TINY_TOKENIZER_WORDS = tuple(
    "a an the this that of and with in on at to is are his her their "
    "man woman person boy girl child face hair eyes smile "
    "walks walking runs running talks talking smiles smiling looks looking turns sits "
    "park street room beach city camera light sun night day "
    "red blue green black white young old happy slowly , .".split()
)
TINY_TOKENIZER_MAX_LENGTH = 16

TINY_TEXT_ENCODER_CONFIG = {
    "vocab_size": len(TINY_TOKENIZER_SPECIAL_TOKENS) + len(TINY_TOKENIZER_WORDS),
    "d_model": 32,
    "num_layers": 2,
    "num_heads": 2,
    "d_kv": 16,
    "d_ff": 64,
    # T5 v1.1 (the release's encoder) uses gated GELU feed-forwards.
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# 32 x 32 input in patches of 8 -> 16 tokens of width 32.
TINY_SIGLIP_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
TINY_SIGLIP_NUM_TOKENS = (TINY_SIGLIP_CONFIG["image_size"] // TINY_SIGLIP_CONFIG["patch_size"]) ** 2
# google/siglip-base-patch16-224's preprocessing, at the tiny input size.
TINY_SIGLIP_PROCESSOR_CONFIG = {
    "size": {"height": 32, "width": 32},
    "resample": 3,  # PIL bicubic
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

# The CogVideoX-5B scheduler config (v-prediction, zero-terminal-SNR, SNR shift 3.0).
TINY_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
    "snr_shift_scale": 3.0,
}

TINY_IDENTITY_EMBED_DIM = 512


def tiny_transformer_config(**overrides) -> dict:
    """Constructor arguments of a tiny EchoVideoTransformer3DModel matching the tiny encoders.

    Latents of the tiny VAE (16 channels, 8 x 8 for a 64 x 64 video) plus the face latent
    make 32 input channels; text, SigLIP and ArcFace widths and lengths match the tiny T5,
    tokenizer, SigLIP and identity encoder.
    """
    config = {
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 2 * TINY_VAE_CONFIG["latent_channels"],
        "out_channels": TINY_VAE_CONFIG["latent_channels"],
        "time_embed_dim": 32,
        "text_embed_dim": TINY_TEXT_ENCODER_CONFIG["d_model"],
        "max_text_seq_length": TINY_TOKENIZER_MAX_LENGTH,
        "sample_width": 8,
        "sample_height": 8,
        "sample_frames": 9,
        "patch_size": 2,
        "use_rotary_positional_embeddings": True,
        "face_embed_dim": TINY_SIGLIP_CONFIG["hidden_size"],
        "face_features_embed_dim": TINY_IDENTITY_EMBED_DIM,
        "face_seq_length": TINY_SIGLIP_NUM_TOKENS,
        "face_features_seq_length": 144,
        "face_resampler_dim": 64,
        "face_resampler_depth": 2,
        "face_resampler_heads": 2,
        "face_resampler_head_dim": 16,
        "face_resampler_num_queries": 4,
        "face_resampler_ff_mult": 2,
    }
    config.update(overrides)
    return config


# The demo's transformer: the size measured to overfit the demo clips in about 150 s on 2 cores.
DEMO_TRANSFORMER_OVERRIDES = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32}


def build_tiny_vae(seed: int = 0) -> AutoencoderKLCogVideoX:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLCogVideoX(**TINY_VAE_CONFIG).eval()


def build_tiny_text_encoder(seed: int = 0) -> T5EncoderModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(T5Config(**TINY_TEXT_ENCODER_CONFIG)).eval()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level T5-style tokenizer: lowercases, splits words and punctuation, maps
    unknown words to `<unk>` and appends `</s>`."""
    vocab = {token: index for index, token in enumerate(TINY_TOKENIZER_SPECIAL_TOKENS + TINY_TOKENIZER_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TINY_TOKENIZER_MAX_LENGTH,
    )


def build_tiny_siglip(seed: int = 0) -> tuple[SiglipVisionModel, SiglipImageProcessor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP_CONFIG)).eval()
    return model, SiglipImageProcessor(**TINY_SIGLIP_PROCESSOR_CONFIG)


def build_tiny_scheduler() -> CogVideoXDPMScheduler:
    return CogVideoXDPMScheduler(**TINY_SCHEDULER_CONFIG)


def build_tiny_identity_encoder(seed: int = 0) -> TinyRandomRecognizer:
    # The recogniser seeds itself from a private generator; no global RNG to guard.
    return TinyRandomRecognizer(embedding_dim=TINY_IDENTITY_EMBED_DIM, seed=seed).eval()


def build_tiny_transformer(seed: int = 0, **overrides) -> EchoVideoTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EchoVideoTransformer3DModel(**tiny_transformer_config(**overrides)).eval()


def write_tiny_release(
    root: str | Path,
    seed: int = 0,
    vae: AutoencoderKLCogVideoX | None = None,
    transformer_overrides: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random release (the public release's layout) to `root` and return it.

    `vae` replaces the random VAE, e.g. with one already fitted to data. The folder appears
    whole or not at all: it is built in a temporary sibling and renamed into place. An
    existing non-empty `root` is replaced only with `overwrite=True`.
    """
    root = Path(root).expanduser().absolute()
    if root.exists() and not overwrite and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not empty; pass overwrite=True to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the release folder should not be
    try:
        build_tiny_transformer(seed, **(transformer_overrides or {})).save_pretrained(staging / "transformer")
        (vae if vae is not None else build_tiny_vae(seed)).save_pretrained(staging / "vae")
        build_tiny_text_encoder(seed).save_pretrained(staging / "text_encoder")
        build_tiny_tokenizer().save_pretrained(staging / "tokenizer")
        build_tiny_scheduler().save_pretrained(staging / "scheduler")
        siglip, siglip_processor = build_tiny_siglip(seed)
        siglip.save_pretrained(staging / "clip_visual_encoder")
        siglip_processor.save_pretrained(staging / "clip_visual_encoder")
        if root.exists():
            # Move the old folder aside first: a rename cannot replace a non-empty folder.
            retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent)) / root.name
            os.replace(root, retired)
            os.replace(staging, root)
            shutil.rmtree(retired.parent)
        else:
            os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


class RepeatedBatches(torch.utils.data.Dataset):
    """The same pre-collated batch, `length` times, for a DataLoader with `batch_size=None`.

    Lets tests and benchmarks drive a Trainer with one fixed batch of the batch contract.
    """

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.batch
