"""The release-size configs a GPU benchmark writes a random release from: each part has the
released size, and the parts fit one another as the release's do (built on the meta device)."""

import torch
from diffusers import AutoencoderKLCogVideoX
from transformers import SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel

from lightning_modules.echovideo_transformer import build_on_meta_device
from lightning_modules.random_release import RELEASE_SIZE, build_word_tokenizer
from lightning_modules.tiny import tiny_release_configs, write_tiny_release


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_release_size_parts_have_the_released_sizes_and_fit_together():
    transformer = build_on_meta_device(RELEASE_SIZE.transformer).config
    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**RELEASE_SIZE.vae)
        t5 = T5EncoderModel(T5Config(**RELEASE_SIZE.text_encoder))
        siglip = SiglipVisionModel(SiglipVisionConfig(**RELEASE_SIZE.siglip))
    assert (transformer.num_layers, transformer.num_attention_heads, transformer.attention_head_dim) == (42, 48, 64)
    assert round(count(t5) / 1e9, 2) == 4.76  # T5 v1.1 XXL's encoder
    assert round(count(vae) / 1e6) == 216 and vae.config.scaling_factor == 0.7  # CogVideoX-5B's VAE
    assert vae.config.latent_channels == transformer.out_channels == transformer.in_channels // 2
    assert t5.config.d_model == transformer.text_embed_dim
    assert RELEASE_SIZE.tokenizer_max_length == transformer.max_text_seq_length == 226
    tokens = (RELEASE_SIZE.siglip["image_size"] // RELEASE_SIZE.siglip["patch_size"]) ** 2
    assert (tokens, siglip.config.hidden_size) == (transformer.face_seq_length, transformer.face_embed_dim) == (196, 768)
    assert RELEASE_SIZE.siglip_processor["size"] == {"height": 224, "width": 224}
    assert build_word_tokenizer(226)(["a man walks"], padding="max_length", max_length=226).input_ids[0][-1] == 0


def test_tiny_release_is_the_generic_writer_with_tiny_configs(tmp_path):
    root = write_tiny_release(tmp_path / "release")
    configs = tiny_release_configs()
    written = build_on_meta_device(root / "transformer" / "config.json").config
    assert all(written[key] == value for key, value in configs.transformer.items())
    assert sorted(p.name for p in root.iterdir()) == [
        "clip_visual_encoder", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"]


def test_a_release_saved_in_bf16_loads_through_the_kit_loaders(tmp_path):
    """The GPU benchmark saves its release-size folder in bf16 to halve the writing; the
    loaders read it back in the dtype asked for, with the bf16-rounded values."""
    from safetensors import safe_open

    from lightning_modules.random_release import build_transformer, write_random_release
    from lightning_modules.release_layout import load_siglip, load_text_encoder, load_transformer, load_vae

    configs = tiny_release_configs()
    root = write_random_release(tmp_path / "release", configs, seed=3, save_dtype=torch.bfloat16)
    for part in ("transformer", "vae", "text_encoder", "clip_visual_encoder"):
        (weights,) = (root / part).glob("*.safetensors")
        with safe_open(weights, framework="pt") as file:
            assert {str(file.get_slice(key).get_dtype()) for key in file.keys()} == {"BF16"}, part
    transformer = load_transformer(root, dtype=torch.float32)
    expected = build_transformer(configs.transformer, seed=3).state_dict()
    for name, value in transformer.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected[name].to(torch.bfloat16).float(), rtol=0, atol=0)
    assert load_vae(root).dtype == load_text_encoder(root).dtype == load_siglip(root)[0].dtype == torch.float32
