"""The EchoVideo transformer: release names and shapes, IITF data flow, loading."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXTransformer3DModel
from safetensors.torch import save_file

from lightning_modules.echovideo_transformer import EchoVideoTransformer3DModel, build_on_meta_device
from lightning_modules.release_layout import CheckpointKeysError, load_transformer
from lightning_modules.tiny import build_tiny_transformer, tiny_transformer_config

IITF_PREFIXES = ("face_prj_wofc.", "face_info_proj.", "face_proj.", "text_proj.")


def release_iitf_shapes() -> dict[str, tuple[int, ...]]:
    """The release's extra keys, typed out from the facts table (not from the module)."""
    shapes = {
        "face_prj_wofc.latents": (1, 16, 1024),
        "face_prj_wofc.proj_in.weight": (1024, 512),
        "face_prj_wofc.proj_in.bias": (1024,),
        "face_prj_wofc.proj_out.weight": (768, 1024),
        "face_prj_wofc.proj_out.bias": (768,),
        "face_prj_wofc.norm_out.weight": (768,),
        "face_prj_wofc.norm_out.bias": (768,),
        "face_info_proj.weight": (196, 212),
        "face_info_proj.bias": (196,),
        "face_proj.weight": (4096, 768),
        "face_proj.bias": (4096,),
        "text_proj.weight": (226, 422),
        "text_proj.bias": (226,),
    }
    for layer in range(4):
        attention, ff = f"face_prj_wofc.layers.{layer}.0", f"face_prj_wofc.layers.{layer}.1"
        for norm in ("norm1", "norm2"):
            shapes[f"{attention}.{norm}.weight"] = (1024,)
            shapes[f"{attention}.{norm}.bias"] = (1024,)
        shapes[f"{attention}.to_q.weight"] = (768, 1024)
        shapes[f"{attention}.to_kv.weight"] = (1536, 1024)
        shapes[f"{attention}.to_out.weight"] = (1024, 768)
        shapes[f"{ff}.0.weight"] = (1024,)
        shapes[f"{ff}.0.bias"] = (1024,)
        shapes[f"{ff}.1.weight"] = (4096, 1024)
        shapes[f"{ff}.3.weight"] = (1024, 4096)
    return shapes


RELEASE_COGVIDEOX_SIZES = dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16,
    time_embed_dim=512, text_embed_dim=4096, num_layers=42, max_text_seq_length=226,
    patch_size=2, use_rotary_positional_embeddings=True,
)


def test_full_size_state_dict_matches_release_names_and_shapes():
    model = build_on_meta_device()
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    with torch.device("meta"):
        backbone = CogVideoXTransformer3DModel(**RELEASE_COGVIDEOX_SIZES)
    expected = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    expected.update(release_iitf_shapes())

    assert state == expected
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9, 2) == 5.62
    config = model.config
    assert (config.face_embed_dim, config.face_features_embed_dim) == (768, 512)
    assert (config.face_seq_length, config.face_features_seq_length) == (196, 144)


def _reference_resampler(state: dict, prefix: str, tokens: torch.Tensor, heads: int, depth: int) -> torch.Tensor:
    """The facts file's resampler, written functionally from the weights."""

    def linear(x, name, bias=False):
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"] if bias else None)

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"])

    latents = state[f"{prefix}.latents"].repeat(tokens.shape[0], 1, 1)
    x = linear(tokens, f"{prefix}.proj_in", bias=True)
    for i in range(depth):
        a, f = f"{prefix}.layers.{i}.0", f"{prefix}.layers.{i}.1"
        x_normed, lat_normed = layer_norm(x, f"{a}.norm1"), layer_norm(latents, f"{a}.norm2")
        q = linear(lat_normed, f"{a}.to_q")
        k, v = linear(torch.cat([x_normed, lat_normed], dim=1), f"{a}.to_kv").chunk(2, dim=-1)
        b, n, inner = q.shape
        dim_head = inner // heads
        q, k, v = (t.reshape(b, -1, heads, dim_head).permute(0, 2, 1, 3) for t in (q, k, v))
        scale = dim_head ** -0.25
        weights = torch.softmax(((q * scale) @ (k * scale).transpose(-1, -2)).float(), dim=-1)
        attended = (weights @ v).permute(0, 2, 1, 3).reshape(b, n, inner)
        latents = linear(attended, f"{a}.to_out") + latents
        hidden = F.gelu(linear(layer_norm(latents, f"{f}.0"), f"{f}.1"))
        latents = linear(hidden, f"{f}.3") + latents
    return layer_norm(linear(latents, f"{prefix}.proj_out", bias=True), f"{prefix}.norm_out")


def _reference_iitf(state, config, text, siglip, arcface):
    """ArcFace x144 -> resampler -> [resampled, SigLIP] -> face_info_proj over the sequence
    -> face_proj -> [face, T5] -> text_proj over the sequence."""
    repeated = arcface.unsqueeze(1).repeat(1, config["face_features_seq_length"], 1)
    resampled = _reference_resampler(
        state, "face_prj_wofc", repeated, config["face_resampler_heads"], config["face_resampler_depth"]
    )
    face = torch.cat([resampled, siglip], dim=1)                       # B x (Q + N) x D
    face = torch.einsum("bnd,mn->bmd", face, state["face_info_proj.weight"])
    face = face + state["face_info_proj.bias"][None, :, None]         # B x N x D
    face = face @ state["face_proj.weight"].T + state["face_proj.bias"]  # B x N x D_text
    fused = torch.cat([face, text], dim=1)                             # B x (N + L) x D_text
    fused = torch.einsum("bnd,mn->bmd", fused, state["text_proj.weight"])
    return fused + state["text_proj.bias"][None, :, None]             # B x L x D_text


def _tiny_inputs(config, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, config["max_text_seq_length"], config["text_embed_dim"], generator=g)
    siglip = torch.randn(batch, config["face_seq_length"], config["face_embed_dim"], generator=g)
    arcface = torch.randn(batch, config["face_features_embed_dim"], generator=g) * 10
    latents = torch.randn(batch, 3, config["in_channels"], 8, 8, generator=g)
    return text, siglip, arcface, latents


def test_iitf_matches_independent_reference_of_the_data_flow():
    config = tiny_transformer_config()
    model = build_tiny_transformer(seed=3).eval()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    text, siglip, arcface, _ = _tiny_inputs(config)

    fused = model.fuse_identity_text(text, siglip, model.repeat_identity_embedding(arcface))
    reference = _reference_iitf(state, config, text, siglip, arcface)

    assert fused.shape == (2, config["max_text_seq_length"], config["text_embed_dim"])
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_forward_feeds_fused_tokens_to_the_cogvideox_backbone():
    config = tiny_transformer_config()
    model = build_tiny_transformer(seed=4).eval()
    text, siglip, arcface, latents = _tiny_inputs(config)
    timestep = torch.tensor([10, 500])
    rotary = model.rotary_embeddings(3, 8, 8, torch.device("cpu"))
    with torch.no_grad():
        out = model(
            hidden_states=latents, encoder_hidden_states=text, encoder_face_hidden_states=siglip,
            encoder_face_feats_hidden_states=model.repeat_identity_embedding(arcface),
            timestep=timestep, image_rotary_emb=rotary, return_dict=False,
        )[0]
        fused = _reference_iitf(model.state_dict(), config, text, siglip, arcface)
        backbone = CogVideoXTransformer3DModel.forward(
            model, hidden_states=latents, encoder_hidden_states=fused, timestep=timestep,
            image_rotary_emb=rotary, return_dict=False,
        )[0]
    assert out.shape == (2, 3, config["out_channels"], 8, 8)
    torch.testing.assert_close(out, backbone, rtol=1e-4, atol=1e-5)
    # The identity reaches the output: another face changes the prediction.
    with torch.no_grad():
        other = model(
            hidden_states=latents, encoder_hidden_states=text, encoder_face_hidden_states=siglip,
            encoder_face_feats_hidden_states=model.repeat_identity_embedding(-arcface),
            timestep=timestep, image_rotary_emb=rotary, return_dict=False,
        )[0]
    assert not torch.allclose(out, other)


def test_forward_without_face_inputs_is_a_clear_error():
    config = tiny_transformer_config()
    model = build_tiny_transformer()
    text, _, _, latents = _tiny_inputs(config)
    with pytest.raises(ValueError, match="encoder_face_hidden_states"):
        model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([1, 2]))


def test_tiny_forward_backward_reaches_every_parameter():
    config = tiny_transformer_config()
    model = build_tiny_transformer(seed=5)
    text, siglip, arcface, latents = _tiny_inputs(config)
    out = model(
        hidden_states=latents, encoder_hidden_states=text, encoder_face_hidden_states=siglip,
        encoder_face_feats_hidden_states=model.repeat_identity_embedding(arcface),
        timestep=torch.tensor([3, 700]), image_rotary_emb=model.rotary_embeddings(3, 8, 8, torch.device("cpu")),
        return_dict=False,
    )[0]
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.face_prj_wofc.latents.grad.abs().sum() > 0


def test_release_style_folder_loads_strictly(tmp_path):
    """A folder written like the release (config without the kit's extra resampler keys,
    weights in safetensors) loads through from_pretrained and into a fresh model strictly."""
    model = build_tiny_transformer(seed=6)
    folder = tmp_path / "release" / "transformer"
    folder.mkdir(parents=True)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config["_class_name"] = "EchoVideoTransformer3DModel"
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")

    loaded = load_transformer(tmp_path / "release")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)

    fresh = EchoVideoTransformer3DModel(**tiny_transformer_config())
    result = fresh.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("corrupt", ["drop", "extra", "reshape"])
def test_transformer_weights_that_do_not_match_strictly_are_refused(tmp_path, corrupt):
    model = build_tiny_transformer(seed=7)
    folder = tmp_path / "release" / "transformer"
    model.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if corrupt == "drop":
        del state["text_proj.bias"]
    elif corrupt == "extra":
        state["iitf.face_proj.weight"] = torch.zeros(2, 2)
    else:
        state["face_info_proj.weight"] = torch.zeros(3, 3)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")

    with pytest.raises(CheckpointKeysError) as error:
        load_transformer(tmp_path / "release")
    message = str(error.value)
    assert str(folder) in message and "strict" in message
    expected_word = {"drop": "text_proj.bias", "extra": "iitf.face_proj.weight", "reshape": "face_info_proj.weight"}
    assert expected_word[corrupt] in message
