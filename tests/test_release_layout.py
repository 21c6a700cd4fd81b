"""The release layout check, its loaders, and the tiny release that mirrors the public one."""

import json

import pytest
import torch
from diffusers import CogVideoXDPMScheduler

from lightning_modules import tiny
from lightning_modules.release_layout import (
    RELEASE_SUBFOLDERS,
    ReleaseLayoutError,
    check_release_folder,
    expected_layout,
    load_scheduler,
    load_siglip,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
)

LOADERS = {
    "transformer": load_transformer,
    "vae": load_vae,
    "text_encoder": load_text_encoder,
    "tokenizer": load_tokenizer,
    "scheduler": load_scheduler,
    "clip_visual_encoder": load_siglip,
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return tiny.write_tiny_release(tmp_path_factory.mktemp("release") / "tiny_release")


def make_empty_layout(root):
    """A release folder with every required file present but empty (enough for the layout check)."""
    for name, spec in RELEASE_SUBFOLDERS.items():
        (root / name).mkdir(parents=True)
        for patterns in spec.required_files:
            (root / name / patterns[0].replace("*", "model")).touch()
    return root


def assert_layout_error(excinfo, offending_path):
    message = str(excinfo.value)
    assert str(offending_path) in message
    assert expected_layout() in message
    assert "point `pretrained_path` at the folder that holds transformer/, vae/" in message


def assert_same_state(model_a, model_b):
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_tiny_vae_compresses_like_the_real_one():
    vae = tiny.build_tiny_vae()
    assert 2_700_000 < sum(p.numel() for p in vae.parameters()) < 2_900_000
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 9, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 16, 3, 8, 8)


def test_tiny_release_has_the_release_layout(release):
    assert check_release_folder(release) == release
    assert sorted(p.name for p in release.iterdir()) == sorted(RELEASE_SUBFOLDERS)
    assert not [p for p in release.parent.iterdir() if p != release], "staging folders left behind"


def test_models_round_trip(release):
    assert_same_state(load_transformer(release), tiny.build_tiny_transformer())
    assert_same_state(load_vae(release), tiny.build_tiny_vae())
    assert_same_state(load_text_encoder(release), tiny.build_tiny_text_encoder())
    siglip, processor = load_siglip(release)
    assert_same_state(siglip, tiny.build_tiny_siglip()[0])
    assert processor.size["height"] == processor.size["width"] == 32
    assert int(processor.resample) == 3
    assert list(processor.image_mean) == list(processor.image_std) == [0.5, 0.5, 0.5]


def test_loaders_honour_dtype(release):
    assert load_vae(release, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_text_encoder(release, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_siglip(release, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_tokenizer_round_trip_is_t5_like(release):
    loaded = load_tokenizer(release)
    captions = ["A man walks in the park, smiling.", "Zebras juggle quietly"]
    kwargs = dict(padding="max_length", max_length=8, truncation=True, add_special_tokens=True)
    ids = loaded(captions, **kwargs).input_ids
    assert ids == tiny.build_tiny_tokenizer()(captions, **kwargs).input_ids
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    # Truncated to max_length with </s> kept last; unknown words become <unk>, then </s>, then padding.
    assert len(ids[0]) == 8 and ids[0][-1] == 1 and 2 not in ids[0]
    assert ids[1] == [2, 2, 2, 1, 0, 0, 0, 0]


def test_scheduler_round_trip(release):
    scheduler = load_scheduler(release)
    assert type(scheduler) is CogVideoXDPMScheduler
    for key, value in tiny.TINY_SCHEDULER_CONFIG.items():
        assert scheduler.config[key] == value, key


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    root = tmp_path / "release"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.write_tiny_release(root)
    assert [p.name for p in root.iterdir()] == ["keep.txt"]

    fitted_vae = tiny.build_tiny_vae(seed=1)
    tiny.write_tiny_release(root, vae=fitted_vae, transformer_overrides={"num_layers": 1}, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == sorted(RELEASE_SUBFOLDERS)
    assert [p.name for p in tmp_path.iterdir()] == ["release"], "staging folders left behind"
    assert_same_state(load_vae(root), fitted_vae)
    assert load_transformer(root).config.num_layers == 1


def test_write_into_an_existing_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    check_release_folder(tiny.write_tiny_release(tmp_path / "empty"))


def test_layout_error_is_a_file_not_found_error():
    assert issubclass(ReleaseLayoutError, FileNotFoundError)


def test_missing_root(tmp_path):
    with pytest.raises(ReleaseLayoutError) as excinfo:
        check_release_folder(tmp_path / "nowhere")
    assert_layout_error(excinfo, tmp_path / "nowhere")


def test_root_is_a_file(tmp_path):
    (tmp_path / "release.txt").write_text("")
    with pytest.raises(ReleaseLayoutError) as excinfo:
        check_release_folder(tmp_path / "release.txt")
    assert_layout_error(excinfo, tmp_path / "release.txt")
    assert "not a folder" in str(excinfo.value)


def test_missing_subfolder_and_config_are_all_named(tmp_path):
    root = make_empty_layout(tmp_path / "release")
    for path in (root / "vae").iterdir():
        path.unlink()
    (root / "vae").rmdir()
    (root / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ReleaseLayoutError) as excinfo:
        check_release_folder(root)
    assert_layout_error(excinfo, root / "vae")
    assert_layout_error(excinfo, root / "scheduler" / "scheduler_config.json")
    # Only the named subfolders are checked.
    assert check_release_folder(root, subfolders=["transformer", "tokenizer"]) == root


def test_missing_weights_and_wrong_kinds(tmp_path):
    root = make_empty_layout(tmp_path / "release")
    (root / "text_encoder" / "model.safetensors").unlink()
    (root / "text_encoder" / "pytorch_model.bin").mkdir()  # a folder is no weights file
    (root / "tokenizer" / "tokenizer.json").unlink()
    (root / "tokenizer" / "spiece.model").touch()  # SentencePiece instead of tokenizer.json is fine
    for path in (root / "scheduler").iterdir():
        path.unlink()
    (root / "scheduler").rmdir()
    (root / "scheduler").touch()
    with pytest.raises(ReleaseLayoutError) as excinfo:
        check_release_folder(root)
    message = str(excinfo.value)
    assert f"{root / 'text_encoder' / '*.safetensors'} or {root / 'text_encoder' / '*.bin'}" in message
    assert f"not a folder: {root / 'scheduler'}" in message
    assert str(root / "tokenizer") not in message.split("Expected layout")[0]


@pytest.mark.parametrize("subfolder", list(LOADERS))
def test_each_loader_checks_its_subfolder(tmp_path, subfolder):
    root = make_empty_layout(tmp_path / "release")
    config_file = root / subfolder / RELEASE_SUBFOLDERS[subfolder].required_files[0][0]
    config_file.unlink()
    with pytest.raises(ReleaseLayoutError) as excinfo:
        LOADERS[subfolder](root)
    assert_layout_error(excinfo, config_file)


def test_unknown_scheduler_class_names_the_file(tmp_path):
    root = make_empty_layout(tmp_path / "release")
    config_file = root / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({"_class_name": "NoSuchScheduler"}))
    with pytest.raises(ValueError, match="NoSuchScheduler") as excinfo:
        load_scheduler(root)
    assert str(config_file) in str(excinfo.value)
