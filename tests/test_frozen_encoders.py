"""FrozenEncoders on a tiny release: round trip, shapes, frozenness, preprocessing parity."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lightning_modules import tiny
from lightning_modules.frozen_encoders import FrozenEncoders, pad_to_video_aspect
from lightning_modules.identity_encoder import IdentityEncoder, TinyRandomRecognizer
from lightning_modules.release_layout import ReleaseLayoutError


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return tiny.write_tiny_release(tmp_path_factory.mktemp("release") / "tiny_release")


@pytest.fixture(scope="module")
def encoders(release):
    return FrozenEncoders.from_release_folder(
        release, tiny.build_tiny_identity_encoder(), max_text_seq_length=tiny.TINY_TOKENIZER_MAX_LENGTH
    )


def smooth_faces(batch_size: int, size: int, seed: int = 0) -> torch.Tensor:
    """Face-like smooth images in [0, 1] (upsampled coarse noise)."""
    coarse = torch.rand(batch_size, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def video_clip(batch_size: int = 2) -> torch.Tensor:
    return torch.rand(batch_size, 3, 9, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_from_release_folder_round_trip(encoders):
    siglip, processor = tiny.build_tiny_siglip()
    for loaded, original in [
        (encoders.vae, tiny.build_tiny_vae()),
        (encoders.text_encoder, tiny.build_tiny_text_encoder()),
        (encoders.siglip, siglip),
    ]:
        loaded_state, original_state = loaded.state_dict(), original.state_dict()
        assert loaded_state.keys() == original_state.keys()
        assert all(torch.equal(loaded_state[k], original_state[k]) for k in loaded_state)
    assert encoders.siglip_processor.size["height"] == processor.size["height"]
    captions = ["a woman smiles at the camera"]
    assert encoders.tokenizer(captions).input_ids == tiny.build_tiny_tokenizer()(captions).input_ids
    assert encoders.max_text_seq_length == 16


def test_from_release_folder_names_every_missing_part(tmp_path):
    root = tmp_path / "release"
    (root / "vae").mkdir(parents=True)
    with pytest.raises(ReleaseLayoutError) as excinfo:
        FrozenEncoders.from_release_folder(root, tiny.build_tiny_identity_encoder())
    message = str(excinfo.value)
    assert str(root / "vae" / "config.json") in message
    for name in ("text_encoder", "tokenizer", "clip_visual_encoder"):
        assert f"missing: {root / name}/" in message
    # The transformer and scheduler are not the encoders' business.
    assert f"missing: {root / 'transformer'}" not in message


def test_encode_shapes(encoders):
    faces = smooth_faces(2, 40)
    latents = encoders.encode_video(video_clip())
    assert latents.shape == (2, 3, 16, 8, 8) and latents.dtype == torch.float32
    assert encoders.encode_face_latent(faces, height=64, width=96).shape == (2, 1, 16, 8, 12)
    assert encoders.encode_siglip(faces).shape == (2, tiny.TINY_SIGLIP_NUM_TOKENS, 32)
    assert encoders.encode_text(["a man walks", "a girl runs"]).shape == (2, 16, 32)
    assert encoders.encode_identity(faces).shape == (2, tiny.TINY_IDENTITY_EMBED_DIM)
    assert encoders.unconditional_siglip_tokens(3).shape == (3, tiny.TINY_SIGLIP_NUM_TOKENS, 32)
    video = encoders.decode_latents(latents)
    assert video.shape == (2, 3, 9, 64, 64)
    assert video.min() >= -1 and video.max() <= 1


def test_encode_video_scales_and_samples(encoders):
    video = video_clip(1)
    posterior = encoders.vae.encode(video).latent_dist
    expected_mode = (posterior.mode() * 0.7).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(encoders.encode_video(video), expected_mode)
    sample_a = encoders.encode_video(video, generator=torch.Generator().manual_seed(3))
    sample_b = encoders.encode_video(video, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample_a, sample_b)
    assert not torch.allclose(sample_a, expected_mode)


def test_decode_inverts_the_scaling(encoders):
    latents = encoders.encode_video(video_clip(1))
    expected = encoders.vae.decode(latents.permute(0, 2, 1, 3, 4) / 0.7).sample.clamp(-1, 1)
    torch.testing.assert_close(encoders.decode_latents(latents), expected)


def test_face_latent_pads_centered_to_the_video_aspect(encoders):
    face = (smooth_faces(1, 32) * 255).round() / 255
    face_u8 = (face[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    # The release: black bands to the 64 x 128 aspect (32 x int(32 * 128 / 64) = 32 x 64, the
    # face centred), PIL Lanczos to 128 x 64, then [-1, 1].
    canvas = Image.new("RGB", (64, 32))
    canvas.paste(Image.fromarray(face_u8), (16, 0))
    resized = np.asarray(canvas.resize((128, 64), resample=Image.Resampling.LANCZOS), dtype=np.float32)
    frame = torch.from_numpy(resized / 255.0).permute(2, 0, 1)[None] * 2 - 1
    expected = encoders.encode_video(frame.unsqueeze(2))
    torch.testing.assert_close(encoders.encode_face_latent(face, height=64, width=128), expected)
    # With a generator: one draw from the posterior, reproducible, not its mode.
    draw = encoders.encode_face_latent(face, 64, 128, generator=torch.Generator().manual_seed(1))
    again = encoders.encode_face_latent(face, 64, 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw, again) and not torch.allclose(draw, expected)


def test_face_padding_truncates_the_new_side_like_the_release():
    face = np.full((512, 512, 3), 200, dtype=np.uint8)
    padded = pad_to_video_aspect(face, 480, 848)
    assert padded.shape == (512, int(512 * 848 / 480), 3) == (512, 904, 3)
    assert (padded[:, :196] == 0).all() and (padded[:, 196:708] == 200).all() and (padded[:, 708:] == 0).all()
    portrait = pad_to_video_aspect(face, 848, 480)
    assert portrait.shape == (904, 512, 3) and (portrait[196:708] == 200).all()
    assert pad_to_video_aspect(face, 480, 480).shape == (512, 512, 3)


def test_text_is_padded_truncated_and_caption_dependent(encoders):
    long_caption = " ".join(["a man walks in the park"] * 10)
    embeds = encoders.encode_text(["a man walks", "a woman smiles", long_caption, "unknown xyzzy words!"])
    assert embeds.shape == (4, 16, 32)
    assert not torch.allclose(embeds[0], embeds[1])
    token_ids = torch.tensor([[tiny.TINY_TOKENIZER_WORDS.index(w) + 3 for w in ("a", "man", "walks")] + [1]])
    expected = encoders.text_encoder(F.pad(token_ids, (0, 12))).last_hidden_state
    torch.testing.assert_close(embeds[:1], expected)


def test_unconditional_siglip_tokens_are_a_black_face(encoders):
    tokens = encoders.unconditional_siglip_tokens(2)
    torch.testing.assert_close(tokens, encoders.encode_siglip(torch.zeros(2, 3, 64, 64)))
    assert torch.equal(tokens[0], tokens[1])


def test_siglip_matches_the_image_processor(encoders):
    processor, siglip = encoders.siglip_processor, encoders.siglip
    faces_u8 = (smooth_faces(2, 48) * 255).round().to(torch.uint8)
    ours = encoders.encode_siglip(faces_u8.float() / 255)
    # PIL images through the processor, as the release feeds them.
    pil_faces = [Image.fromarray(face.permute(1, 2, 0).numpy()) for face in faces_u8]
    reference = siglip(**processor(images=pil_faces, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_train_keeps_everything_frozen_in_eval(encoders):
    parent = nn.ModuleDict({"encoders": encoders, "trainable": nn.Linear(2, 2)})
    parent.train()
    assert parent["trainable"].training
    assert not any(module.training for module in encoders.modules())
    assert encoders.train(True) is encoders and not encoders.training
    assert not any(parameter.requires_grad for parameter in encoders.parameters())
    assert sum(parameter.numel() for parameter in encoders.identity_encoder.parameters()) > 0


def test_encoding_builds_no_autograd_graph(encoders):
    faces = smooth_faces(1, 40).requires_grad_(True)
    video = video_clip(1).requires_grad_(True)
    with torch.enable_grad():
        outputs = [
            encoders.encode_video(video),
            encoders.encode_face_latent(faces, height=64, width=64),
            encoders.encode_siglip(faces),
            encoders.encode_identity(faces),
            encoders.encode_text(["a man"]),
            encoders.unconditional_siglip_tokens(1),
            encoders.decode_latents(torch.zeros(1, 1, 16, 8, 8, requires_grad=True)),
        ]
    assert not any(output.requires_grad or output.grad_fn is not None for output in outputs)


def test_low_precision_encoders_return_float32(release):
    encoders = FrozenEncoders.from_release_folder(
        release, tiny.build_tiny_identity_encoder(), max_text_seq_length=16, dtype=torch.bfloat16
    )
    assert encoders.vae.dtype == encoders.text_encoder.dtype == encoders.siglip.dtype == torch.bfloat16
    assert encoders.encode_text(["a man"]).dtype == torch.float32
    assert encoders.encode_siglip(smooth_faces(1, 40)).dtype == torch.float32
    assert encoders.encode_face_latent(smooth_faces(1, 32), height=32, width=32).dtype == torch.float32


def test_tiny_recognizer_is_seed_deterministic_and_leaves_global_rng_alone():
    faces = smooth_faces(2, 50)
    torch.manual_seed(123)
    state_before = torch.get_rng_state()
    first = TinyRandomRecognizer(seed=7)
    assert torch.equal(torch.get_rng_state(), state_before)
    torch.manual_seed(999)
    second = TinyRandomRecognizer(seed=7)
    other = TinyRandomRecognizer(seed=8)
    assert isinstance(first, IdentityEncoder) and first.embedding_dim == 512
    with torch.no_grad():
        embedding = first(faces)
        assert torch.equal(embedding, second(faces))
        assert not torch.allclose(embedding, other(faces))
    assert embedding.shape == (2, 512)
    assert not torch.allclose(embedding[0], embedding[1])
    assert 1_000 < sum(p.numel() for p in first.parameters()) < 20_000
