"""Checkpoints: only trainable weights are saved; a ZeRO checkpoint consolidates into a
release folder whose transformer/ loads strictly and computes what the checkpoint's did;
a kill during a save never leaves `last` broken."""

import os

import pytest
import torch

from callbacks.resumable_checkpoint import ResumableCheckpoint, recover_interrupted_publish
from cpu_deepspeed import CPUDeepSpeedStrategy
from echovideo.cli import main as echovideo_main
from lightning_modules.batch_features import encode_batch_features
from lightning_modules.consolidate import ConsolidateError, read_checkpoint
from lightning_modules.echovideo_module import IITF_PARTS
from lightning_modules.release_layout import load_transformer
from lightning_modules.sampling import pad_face_latent
from module_helpers import build_module, loader, trainer


TORCH_LINEAR = torch.nn.functional.linear


def transformer_output(transformer, features: dict) -> torch.Tensor:
    """The transformer's prediction on fixed inputs (timestep 500, face latent kept)."""
    latents = features["latents"]
    num_frames, height, width = latents.shape[1], latents.shape[3], latents.shape[4]
    with torch.no_grad():
        return transformer(
            hidden_states=torch.cat([latents, pad_face_latent(features["face_latent"], num_frames)], dim=2),
            encoder_hidden_states=features["text_embeds"],
            encoder_face_hidden_states=features["siglip_tokens"],
            encoder_face_feats_hidden_states=transformer.repeat_identity_embedding(features["arcface"]),
            timestep=torch.full((latents.shape[0],), 500),
            image_rotary_emb=transformer.rotary_embeddings(num_frames, height, width, "cpu"),
            return_dict=False,
        )[0]


@pytest.fixture(scope="module")
def fixed_features(tiny_release):
    from conftest import make_raw_batch

    module = build_module(tiny_release)
    generator = torch.Generator().manual_seed(0)
    return {k: v.clone() for k, v in encode_batch_features(module.encoders, make_raw_batch(),
                                                           generator=generator).items()}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_consolidates_to_a_strict_release_folder(stage, tiny_release, fixed_features, tmp_path):
    module = build_module(tiny_release, trainable="iitf", learning_rate=1e-2)
    module.transformer = None  # built in configure_model, inside zero.Init under ZeRO-3
    strategy = CPUDeepSpeedStrategy(stage=stage, logging_batch_size_per_gpu=2, exclude_frozen_parameters=True)
    fit = trainer(tmp_path, strategy=strategy, max_steps=3)
    fit.fit(module, loader(fixed_features, 3))
    checkpoint = tmp_path / "zero.ckpt"
    fit.save_checkpoint(checkpoint)
    assert checkpoint.is_dir()
    # ZeRO-3's swap of F.linear does not outlive the run.
    assert torch.nn.functional.linear is TORCH_LINEAR
    trained = transformer_output(module.transformer, fixed_features)

    weights, hparams = read_checkpoint(checkpoint)
    assert weights and {name.split(".")[0] for name in weights} <= set(IITF_PARTS)  # only what trained
    assert hparams["pretrained_path"] == str(tiny_release)

    out = tmp_path / "consolidated"
    echovideo_main(["consolidate", str(checkpoint), str(out)])
    consolidated = load_transformer(out)  # checks every key and shape first (strict)
    assert torch.allclose(transformer_output(consolidated, fixed_features), trained, atol=1e-5)
    before = transformer_output(load_transformer(tiny_release), fixed_features)
    assert not torch.allclose(before, trained, atol=1e-4)  # training moved it
    assert (out / "vae").resolve() == (tiny_release / "vae").resolve()  # the other parts are linked


def test_convert_checkpoint_writes_the_universal_form_once_and_names_a_bad_directory(
        tiny_release, fixed_features, tmp_path, capsys):
    module = build_module(tiny_release, trainable="iitf", learning_rate=1e-2)
    fit = trainer(tmp_path, strategy=CPUDeepSpeedStrategy(stage=2, logging_batch_size_per_gpu=2,
                                                          exclude_frozen_parameters=True), max_steps=1)
    fit.fit(module, loader(fixed_features, 1))
    checkpoint = tmp_path / "zero.ckpt"
    fit.save_checkpoint(checkpoint)
    echovideo_main(["convert-checkpoint", str(checkpoint)])
    assert "written by 1 rank(s)" in capsys.readouterr().out
    tag = (checkpoint / "latest").read_text().strip()
    assert (checkpoint / "latest_universal").read_text() == f"{tag}_universal"
    assert list((checkpoint / f"{tag}_universal" / "zero").iterdir())  # one folder per parameter
    stamp = (checkpoint / f"{tag}_universal").stat().st_mtime_ns
    echovideo_main(["convert-checkpoint", str(checkpoint)])  # already converted: left as it is
    assert (checkpoint / f"{tag}_universal").stat().st_mtime_ns == stamp

    with pytest.raises(SystemExit) as stop:
        echovideo_main(["convert-checkpoint", str(tmp_path)])
    assert stop.value.code == 2
    assert f"{tmp_path}: no `latest` file" in capsys.readouterr().err


def test_file_checkpoint_keeps_only_trainable_weights_and_resumes(tiny_release, fixed_features, tmp_path):
    module = build_module(tiny_release, trainable="iitf")
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(module, loader(fixed_features, 2))
    path = tmp_path / "iitf.ckpt"
    fit.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved and all(k.split(".")[1] in IITF_PARTS for k in saved)
    total = sum(p.numel() for p in module.transformer.parameters())
    assert sum(v.numel() for v in saved.values()) < total

    resumed = build_module(tiny_release, trainable="iitf")
    trainer(tmp_path, max_steps=3).fit(resumed, loader(fixed_features, 3), ckpt_path=str(path))
    assert resumed.trainer.global_step == 3

    out = tmp_path / "consolidated"
    echovideo_main(["consolidate", str(path), str(out)])
    # trained after the save, so compare with the saved state, not the resumed module
    reference = build_module(tiny_release, trainable="iitf")
    reference.load_state_dict(saved, strict=False)
    assert torch.allclose(transformer_output(load_transformer(out), fixed_features),
                          transformer_output(reference.transformer, fixed_features), atol=1e-6)

    whole = build_module(tiny_release)  # trains everything: an IITF-only checkpoint lacks weights
    with pytest.raises(KeyError, match="lacks trainable weights"):
        whole.on_load_checkpoint({"state_dict": saved})


def test_consolidate_refuses_what_is_not_an_echovideo_checkpoint(tmp_path):
    with pytest.raises(ConsolidateError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(ConsolidateError, match="no `transformer"):
        read_checkpoint(foreign)


def test_a_save_killed_between_its_renames_leaves_a_findable_last(tmp_path):
    """The window of `_publish` for a directory: old one aside, new one not yet in place."""
    last = tmp_path / "last.ckpt"
    aside = tmp_path / "last.ckpt.old"
    aside.mkdir()
    (aside / "latest").write_text("checkpoint")
    (tmp_path / "last.ckpt.partial").mkdir()  # the half-written new one
    recover_interrupted_publish(str(last))
    assert (last / "latest").read_text() == "checkpoint"
    assert not aside.exists()


def test_killed_save_leaves_the_previous_last_intact(tiny_release, fixed_features, tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    module = build_module(tiny_release)
    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                  callbacks=[ResumableCheckpoint(every_n_train_steps=1)])
    fit.fit(module, loader(fixed_features, 2))
    good = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]

    def killed(self, filepath, weights_only=False):
        with open(filepath, "wb") as partial:
            partial.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the kill arrives mid-write

    monkeypatch.setattr(type(fit), "save_checkpoint", killed)
    callback = next(c for c in fit.callbacks if isinstance(c, ResumableCheckpoint))
    with pytest.raises(KeyboardInterrupt):
        callback._save_checkpoint(fit, str(checkpoints / "last.ckpt"))
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == good
    assert os.path.exists(checkpoints / "last.ckpt.partial")  # removed by the next save


def test_a_deepspeed_directory_is_read_as_data_only(tmp_path, capsys):
    """The client state is unpickled with weights_only: an object that would run code on
    loading is refused, naming the file, and nothing of it runs."""
    from lightning_modules.deepspeed_checkpoint import DeepSpeedCheckpointError, deepspeed_client_state

    class RunsOnLoad:
        def __reduce__(self):
            return (print, ("code ran while loading a checkpoint",))

    states = tmp_path / "ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    states.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"seed": 3}, "global_step": 7}, states)
    assert deepspeed_client_state(str(tmp_path / "ckpt")) == {"hyper_parameters": {"seed": 3}, "global_step": 7}

    torch.save({"hyper_parameters": {"seed": 3}, "callbacks": RunsOnLoad()}, states)
    with pytest.raises(DeepSpeedCheckpointError, match="mp_rank_00_model_states.pt: holds objects other than"):
        deepspeed_client_state(str(tmp_path / "ckpt"))
    assert "code ran" not in capsys.readouterr().out
    with pytest.raises(DeepSpeedCheckpointError, match="not a DeepSpeed checkpoint"):
        deepspeed_client_state(str(tmp_path))


def test_a_crash_after_a_resume_names_the_step_the_run_resumes_from(tmp_path):
    """Resumed at step 8, crashed inside step 10: the warning points at step 8, not step 0."""
    from types import SimpleNamespace

    from callbacks.resumable_checkpoint import ResumableCheckpoint

    callback = ResumableCheckpoint(dirpath=str(tmp_path), every_n_train_steps=50)
    trainer = SimpleNamespace(ckpt_path=str(tmp_path / "last.ckpt"), global_step=8, is_global_zero=True, loggers=[])
    callback.on_train_start(trainer, None)
    trainer.global_step = 10
    with pytest.warns(UserWarning, match=r"inside step 10; .* `--ckpt_path last` resumes from step 8\."):
        callback.on_exception(trainer, None, RuntimeError("crash"))

    fresh = ResumableCheckpoint(dirpath=str(tmp_path), every_n_train_steps=50)
    fresh.on_train_start(SimpleNamespace(ckpt_path=None, global_step=0), None)
    with pytest.warns(UserWarning, match="resumes from step 0"):
        fresh.on_exception(SimpleNamespace(global_step=2), None, RuntimeError("crash"))
