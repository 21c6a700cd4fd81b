"""The LightningModule: loss, what trains, frozen encoders, condition dropout, skipping."""

import lightning.pytorch as pl
import torch

from datamodules import batch as keys
from datamodules.skip_reasons import NO_FACE, SKIP_REASONS, VIDEO_TOO_SHORT
from lightning_modules.batch_features import encode_batch_features
from lightning_modules.echovideo_module import DATA_COUNTERS, IITF_PARTS
from module_helpers import ModelInputRecorder, build_module, loader, trainer


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_loss_falls_when_overfitting_one_batch(tiny_release, raw_batch):
    module = build_module(tiny_release, text_dropout_prob=0.0, identity_dropout_prob=0.0, learning_rate=2e-3)
    features = encode_batch_features(module.encoders, raw_batch)
    with torch.no_grad():
        before = torch.stack([module.diffusion_loss(features, step=-1, micro_batch=i)[0] for i in range(4)]).mean()
    trainer(max_steps=60).fit(module, loader(features, 60))
    with torch.no_grad():
        after = torch.stack([module.diffusion_loss(features, step=-1, micro_batch=i)[0] for i in range(4)]).mean()
    assert after < 0.6 * before, (before.item(), after.item())


def test_frozen_encoders_never_train_nor_enter_optimizer_or_checkpoint(tiny_release, raw_batch, tmp_path):
    module = build_module(tiny_release)
    for part in module.encoders.LAZY_PARTS:  # load every lazily loaded part before the snapshot
        getattr(module.encoders, part)
    encoders_before = _snapshot(module.encoders)
    transformer_before = _snapshot(module.transformer)

    fit = trainer(tmp_path, max_steps=3)
    fit.fit(module, loader(raw_batch, 3))

    assert _changed(encoders_before, module.encoders) == set()
    assert _changed(transformer_before, module.transformer)  # the transformer did train
    assert not module.encoders.training
    assert all(not m.training for m in module.encoders.modules())
    assert all(not p.requires_grad and p.grad is None for p in module.encoders.parameters())
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in module.encoders.parameters())
    assert optimized == {id(p) for p in module.transformer.parameters()}
    assert all(k.startswith("transformer.") for k in module.state_dict())


def test_iitf_only_trains_the_four_fusion_parts(tiny_release, raw_batch, tmp_path):
    module = build_module(tiny_release, trainable="iitf")
    before = _snapshot(module.transformer)
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(module, loader(raw_batch, 2))

    changed = _changed(before, module.transformer)
    assert changed and all(k.split(".")[0] in IITF_PARTS for k in changed)
    assert {k.split(".")[0] for k in changed} == set(IITF_PARTS)
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    iitf = {id(p) for name in IITF_PARTS for p in getattr(module.transformer, name).parameters()}
    assert optimized == iitf


def test_condition_dropout_uses_the_unconditional_forms(tiny_release, raw_batch):
    module = build_module(tiny_release, text_dropout_prob=1.0, identity_dropout_prob=0.0)
    features = encode_batch_features(module.encoders, raw_batch)
    original = {k: v.clone() for k, v in features.items()}
    module._drop_conditions(features, step=0, micro_batch=0)
    empty_prompt = module.encoders.encode_text([""])
    assert torch.equal(features[keys.TEXT_EMBEDS], empty_prompt.expand_as(features[keys.TEXT_EMBEDS]))
    assert torch.equal(features[keys.SIGLIP_TOKENS], original[keys.SIGLIP_TOKENS])

    module = build_module(tiny_release, text_dropout_prob=0.0, identity_dropout_prob=1.0)
    features = {k: v.clone() for k, v in original.items()}
    module._drop_conditions(features, step=0, micro_batch=0)
    black = module.encoders.unconditional_siglip_tokens(1)
    assert torch.equal(features[keys.SIGLIP_TOKENS], black.expand_as(features[keys.SIGLIP_TOKENS]))
    assert torch.count_nonzero(features[keys.ARCFACE]) == 0
    assert torch.equal(features[keys.TEXT_EMBEDS], original[keys.TEXT_EMBEDS])
    assert torch.equal(features[keys.FACE_LATENT], original[keys.FACE_LATENT])  # never dropped by CFG


def test_face_latent_keep_probability_masks_the_face_channels(tiny_release, raw_batch):
    module = build_module(tiny_release)
    recorder = ModelInputRecorder(module)
    features = encode_batch_features(module.encoders, raw_batch)
    module.face_latent_keep_prob = 1.0
    _, stats = module.diffusion_loss(features, step=0)
    assert stats["face_latent_keep_rate"] == 1.0 and recorder.calls[-1]["face_kept"] == [True, True]
    module.face_latent_keep_prob = 0.0
    _, stats = module.diffusion_loss(features, step=0)
    assert stats["face_latent_keep_rate"] == 0.0 and recorder.calls[-1]["face_kept"] == [False, False]
    # Same step and micro-batch: same timesteps and noise whatever the keep probability.
    assert recorder.calls[-1]["timestep"] == recorder.calls[-2]["timestep"]
    assert recorder.calls[-1]["noisy_sum"] == recorder.calls[-2]["noisy_sum"]


def _batches_with_skips(raw_batch) -> torch.utils.data.DataLoader:
    """2 + 2 samples skipped for want of a face (whole batches), 1 too short beside good ones."""
    counts = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
    empty = {keys.SKIPPED: counts.clone().index_fill_(0, torch.tensor([SKIP_REASONS.index(NO_FACE)]), 2)}
    partial = dict(raw_batch, **{keys.SKIPPED: counts.clone().index_fill_(
        0, torch.tensor([SKIP_REASONS.index(VIDEO_TOO_SHORT)]), 1)})
    batches = [empty, partial, empty]

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    return torch.utils.data.DataLoader(Batches(), batch_size=None)


def test_a_batch_of_only_unreadable_samples_still_takes_its_step_and_adds_nothing(tiny_release, raw_batch, tmp_path):
    """A rank with nothing readable runs the same graph on a one-patch stand-in with a zero
    loss: every trainable weight gets a (zero) gradient, the step counts, the skips are logged.
    (Returning None instead ends a distributed run: tests/test_multiprocess.py.)"""
    module = build_module(tiny_release)
    inputs = []
    module.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: inputs.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True)
    gradients = []

    class GradientProbe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            trainable = [p for p in pl_module.transformer.parameters() if p.requires_grad]
            assert all(p.grad is not None for p in trainable)
            gradients.append(sum(float(p.grad.abs().sum()) for p in trainable))

    fit = trainer(tmp_path, max_epochs=1, callbacks=[GradientProbe()])
    fit.fit(module, _batches_with_skips(raw_batch))
    assert fit.global_step == 3
    stand_in, readable = (1, 1, 32, 2, 2), (2, 3, 32, 4, 4)  # B x f x (latent + face) x h x w
    assert inputs == [stand_in, readable, stand_in]
    assert gradients[0] == gradients[2] == 0 and gradients[1] > 0
    assert fit.callback_metrics["data/skipped/no_face"] == 4
    assert fit.callback_metrics["data/skipped/video_too_short"] == 1
    assert fit.callback_metrics["data/skipped/unreadable_video"] == 0


def test_skip_counts_are_logged_summed_over_ranks(tiny_release, raw_batch, tmp_path, monkeypatch):
    module = build_module(tiny_release)
    fit = trainer(tmp_path, max_epochs=1)
    # Two ranks that skipped alike: the strategy's sum over ranks doubles every count.
    monkeypatch.setattr(fit.strategy, "reduce", lambda tensor, *args, **kwargs: tensor * 2)
    fit.fit(module, _batches_with_skips(raw_batch))
    assert fit.callback_metrics["data/skipped/no_face"] == 8
    assert fit.callback_metrics["data/skipped/video_too_short"] == 2
    # A checkpoint keeps the run's totals; on resume rank 0 carries them on, other ranks start at 0.
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["data_counts"]["skipped/no_face"] == 8
    module.on_load_checkpoint(checkpoint)
    assert module.data_counts[DATA_COUNTERS.index("skipped/no_face")] == 8


def test_random_recogniser_is_refused_beside_a_release_size_transformer():
    import pytest

    from lightning_modules.identity_check import refuse_random_identity_at_release_size
    from lightning_modules.identity_encoder import TinyRandomRecognizer
    from lightning_modules.tiny import tiny_transformer_config

    release_size = {"num_attention_heads": 48, "attention_head_dim": 64}
    with pytest.raises(ValueError, match="InsightFaceArcFace") as refused:
        refuse_random_identity_at_release_size(TinyRandomRecognizer(), release_size)
    assert "model.init_args.identity_encoder" in str(refused.value)
    refuse_random_identity_at_release_size(TinyRandomRecognizer(), tiny_transformer_config())
