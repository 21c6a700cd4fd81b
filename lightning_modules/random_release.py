"""A release folder of random weights at any size: the tiny twin or the release's own sizes.

`write_random_release(root, configs)` builds every part from its config with random
weights (each library's own initialisation) and writes it in the public release's layout,
so the kit's real loaders read it back. `tiny.tiny_release_configs()` gives the tiny twin
used by tests and the demo; `RELEASE_SIZE` gives the released parts' sizes (5.6 B
transformer, CogVideoX-5B VAE, T5 v1.1 XXL, SigLIP base/16 at 224), for benchmarks on a GPU
where the real weights are not at hand. Building a part on `device="cuda"` makes its
random initialisation take seconds instead of minutes.

The tokenizer is always a small word-level stand-in with T5's special ids (no vocabulary
can be downloaded here); tokenizing costs microseconds next to any model, and its ids fit
any T5 vocabulary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
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

# T5's special ids (<pad>=0, </s>=1, <unk>=2) followed by a small caption vocabulary.
WORD_TOKENIZER_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
WORD_TOKENIZER_WORDS = tuple(
    "a an the this that of and with in on at to is are his her their "
    "man woman person boy girl child face hair eyes smile "
    "walks walking runs running talks talking smiles smiling looks looking turns sits "
    "park street room beach city camera light sun night day "
    "red blue green black white young old happy slowly , .".split()
)

# The CogVideoX-5B scheduler config (v-prediction, zero-terminal-SNR, SNR shift 3.0).
COGVIDEOX_5B_SCHEDULER_CONFIG = {
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

# google/siglip-base-patch16-224: 224 / 16 = 14 x 14 = 196 tokens of width 768.
SIGLIP_BASE_224_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "image_size": 224,
    "patch_size": 16,
}
SIGLIP_BASE_224_PROCESSOR_CONFIG = {
    "size": {"height": 224, "width": 224},
    "resample": 3,  # PIL bicubic
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

# google/t5-v1_1-xxl, the encoder CogVideoX ships in text_encoder/ (4.76 B parameters).
T5_V1_1_XXL_CONFIG = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


@dataclass(frozen=True)
class ReleaseConfigs:
    """Constructor arguments of every part of a release folder."""

    transformer: dict
    vae: dict
    text_encoder: dict
    tokenizer_max_length: int
    siglip: dict
    siglip_processor: dict
    scheduler: dict = field(default_factory=lambda: dict(COGVIDEOX_5B_SCHEDULER_CONFIG))

    def with_transformer(self, **overrides) -> "ReleaseConfigs":
        return replace(self, transformer={**self.transformer, **overrides})


# The released sizes. The transformer's and the VAE's constructor defaults are CogVideoX-5B's
# (the VAE's scaling factor is the 5B model's 0.7, not the 2B model's default).
RELEASE_SIZE = ReleaseConfigs(
    transformer={},
    vae={"scaling_factor": 0.7},
    text_encoder=T5_V1_1_XXL_CONFIG,
    tokenizer_max_length=226,
    siglip=SIGLIP_BASE_224_CONFIG,
    siglip_processor=SIGLIP_BASE_224_PROCESSOR_CONFIG,
)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """The global RNG seeded for one build, restored afterwards (CPU, and the build's GPU)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        yield


def build_transformer(config: dict, seed: int = 0, device: str | torch.device = "cpu") -> EchoVideoTransformer3DModel:
    with _seeded(seed, torch.device(device)):
        return EchoVideoTransformer3DModel(**config).eval()


def build_vae(config: dict, seed: int = 0, device: str | torch.device = "cpu") -> AutoencoderKLCogVideoX:
    with _seeded(seed, torch.device(device)):
        return AutoencoderKLCogVideoX(**config).eval()


def build_text_encoder(config: dict, seed: int = 0, device: str | torch.device = "cpu") -> T5EncoderModel:
    with _seeded(seed, torch.device(device)):
        return T5EncoderModel(T5Config(**config)).eval()


def build_siglip(
    config: dict, processor_config: dict, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[SiglipVisionModel, SiglipImageProcessor]:
    with _seeded(seed, torch.device(device)):
        model = SiglipVisionModel(SiglipVisionConfig(**config)).eval()
    return model, SiglipImageProcessor(**processor_config)


def build_word_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """A word-level T5-style tokenizer: lowercases, splits words and punctuation, maps
    unknown words to `<unk>` and appends `</s>`."""
    vocab = {token: index for index, token in enumerate(WORD_TOKENIZER_SPECIAL_TOKENS + WORD_TOKENIZER_WORDS)}
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
        model_max_length=max_length,
    )


def _save(model: torch.nn.Module, folder: Path, dtype: torch.dtype | None) -> None:
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder)


def write_random_release(
    root: str | Path,
    configs: ReleaseConfigs,
    seed: int = 0,
    vae: AutoencoderKLCogVideoX | None = None,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    save_dtype: torch.dtype | None = None,
) -> Path:
    """Write a random release of `configs`' sizes to `root` (the public release's layout).

    `vae` replaces the random VAE, e.g. one already fitted to data. Parts are built one at a
    time on `device` and saved in `save_dtype` (None: float32, as built), then freed. The
    folder appears whole or not at all: it is built in a temporary sibling and renamed into
    place. An existing non-empty `root` is replaced only with `overwrite=True`.
    """
    root = Path(root).expanduser().absolute()
    if root.exists() and not overwrite and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not empty; pass overwrite=True to replace it")
    device = torch.device(device)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the release folder should not be
    try:
        _save(build_transformer(configs.transformer, seed, device), staging / "transformer", save_dtype)
        _save(vae if vae is not None else build_vae(configs.vae, seed, device), staging / "vae",
              save_dtype if vae is None else None)
        _save(build_text_encoder(configs.text_encoder, seed, device), staging / "text_encoder", save_dtype)
        build_word_tokenizer(configs.tokenizer_max_length).save_pretrained(staging / "tokenizer")
        CogVideoXDPMScheduler(**configs.scheduler).save_pretrained(staging / "scheduler")
        siglip, siglip_processor = build_siglip(configs.siglip, configs.siglip_processor, seed, device)
        _save(siglip, staging / "clip_visual_encoder", save_dtype)
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
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return root
