"""Copy-paste gauge: when it logs, that its gaps follow the model, resume, refusals."""

import math

import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from callbacks.copy_paste_gauge import GAUGE_NAMES, CopyPasteGauge, GaugeBatchError
from callbacks.resumable_checkpoint import ResumableCheckpoint
from conftest import make_raw_batch
from datamodules import batch as keys
from lightning_modules.batch_features import encode_batch_features
from module_helpers import build_module, loader, tensorboard_scalars, trainer


class MemoryLogger(Logger):
    """Keeps every (step, metrics) the Trainer writes, as TensorBoard would receive them."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def gauge_rows(self) -> list[tuple[int, dict]]:
        return [(step, {k: v for k, v in m.items() if k.startswith("gauge/")})
                for step, m in self.rows if any(k.startswith("gauge/") for k in m)]


class DistinctBatches(Dataset):
    """Batch k holds other samples than batch j: what a real training loader yields."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def _encoded(module, batch: dict) -> dict:
    return {k: v.clone() for k, v in encode_batch_features(module.encoders, batch).items()}


@pytest.fixture(scope="module")
def features(tiny_release):
    """Cached features of raw batches of two samples each (seeds 0..5), encoded once."""
    module = build_module(tiny_release)
    return [_encoded(module, make_raw_batch(batch_size=2, seed=seed)) for seed in range(6)]


def _gauge(**overrides) -> CopyPasteGauge:
    return CopyPasteGauge(**{"every_n_steps": 2, "num_draws": 2, "num_samples": 2, **overrides})


def test_gauges_land_in_tensorboard_at_the_configured_steps(tiny_release, features, tmp_path):
    module = build_module(tiny_release)
    gauge = _gauge()
    # Logging every 3 steps: the gauge's own interval still decides when it is written.
    fit = trainer(tmp_path, max_steps=5, log_every_n_steps=3, callbacks=[gauge],
                  logger=TensorBoardLogger(str(tmp_path), name="tb", version=""))
    fit.fit(module, train_dataloaders=loader(features[0], 5), val_dataloaders=loader(features[1], 1))
    fit.logger.experiment.flush()
    scalars = tensorboard_scalars(tmp_path / "tb")

    assert sorted(tag for tag in scalars if tag.startswith("gauge/")) == sorted(f"gauge/{n}" for n in GAUGE_NAMES)
    # Measured after optimizer steps 2 and 4, written once each (no stale repeats at later
    # logging steps), at the logger step Lightning gives those batches' train/loss (step - 1).
    assert all([step for step, _ in scalars[f"gauge/{name}"]] == [1, 3] for name in GAUGE_NAMES)
    assert [step for step, _ in scalars["train/loss"]] == [2]
    rows = [(step, {tag: dict(values)[step] for tag, values in scalars.items() if tag.startswith("gauge/")})
            for step in (1, 3)]
    assert fit.callback_metrics["gauge/identity_gap"] == pytest.approx(rows[1][1]["gauge/identity_gap"])
    for _, values in rows:
        assert all(math.isfinite(v) for v in values.values())
        assert values["gauge/loss_with_face_latent"] > 0
        assert values["gauge/face_latent_gap"] == pytest.approx(
            values["gauge/loss_without_face_latent"] - values["gauge/loss_with_face_latent"], abs=1e-6)
        assert values["gauge/identity_gap"] == pytest.approx(
            values["gauge/loss_shuffled_identity"] - values["gauge/loss_true_identity"], abs=1e-6)
        assert values["gauge/identity_gap_with_face_latent"] == pytest.approx(
            values["gauge/loss_shuffled_identity_with_face_latent"] - values["gauge/loss_with_face_latent"],
            abs=1e-6)
        assert values["gauge/loss_true_identity"] == values["gauge/loss_without_face_latent"]
    # The model trained between the two measurements, so the second differs from the first.
    assert rows[0][1]["gauge/loss_with_face_latent"] != rows[1][1]["gauge/loss_with_face_latent"]
    # The gauge batch is the validation batch, not the training one.
    assert gauge.source == "validation"
    torch.testing.assert_close(gauge.groups[0][keys.ARCFACE], features[1][keys.ARCFACE])
    assert module.transformer.training  # measuring left train mode as it found it


def test_gauge_does_not_change_training(tiny_release, features, tmp_path):
    """Same weights after a run with the gauge as without: it draws from its own keys and
    restores train mode."""
    weights = []
    for callbacks in ([], [_gauge(every_n_steps=1)]):
        module = build_module(tiny_release)
        trainer(tmp_path, max_steps=3, callbacks=callbacks).fit(module, loader(features[0], 3))
        weights.append(module.transformer.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=0, msg=name)


def test_gaps_follow_what_the_model_reads(tiny_release, features, tmp_path):
    module = build_module(tiny_release)
    gauge = _gauge(every_n_steps=1, num_draws=3)
    fit = trainer(tmp_path, max_steps=1, callbacks=[gauge])
    fit.fit(module, loader(features[0], 1))
    module.transformer.train()
    transformer = module.transformer
    noisy_channels = transformer.config.out_channels  # the patch embedding reads 16 noisy + 16 face channels
    patch_weight = transformer.patch_embed.proj.weight
    assert patch_weight.shape[1] == 2 * noisy_channels

    intact = gauge.measure(fit, module)
    assert transformer.training  # measure restores the mode it found
    assert gauge.measure(fit, module) == intact  # fixed draws: same model, same numbers
    assert abs(intact["face_latent_gap"]) > 1e-5
    assert abs(intact["identity_gap"]) > 1e-5
    assert abs(intact["identity_gap_with_face_latent"]) > 1e-6

    with torch.no_grad():
        saved = patch_weight.clone()
        patch_weight[:, noisy_channels:] = 0  # the prediction can no longer see the face latent
        blind = gauge.measure(fit, module)
        patch_weight[:, noisy_channels:] = 10 * saved[:, noisy_channels:]  # reads it ten times louder
        loud = gauge.measure(fit, module)
        patch_weight.copy_(saved)
    assert blind["face_latent_gap"] == pytest.approx(0, abs=1e-7)
    assert abs(blind["identity_gap"]) > 1e-5  # the identity path is untouched
    assert abs(loud["face_latent_gap"]) > 10 * abs(intact["face_latent_gap"])

    face_proj = transformer.face_proj
    with torch.no_grad():
        saved = face_proj.weight.clone(), face_proj.bias.clone()
        face_proj.weight.zero_()
        face_proj.bias.zero_()  # IITF outputs zero face tokens: identity cannot reach the backbone
        cut = gauge.measure(fit, module)
        face_proj.weight.copy_(saved[0])
        face_proj.bias.copy_(saved[1])
    assert cut["identity_gap"] == pytest.approx(0, abs=1e-7)
    assert cut["identity_gap_with_face_latent"] == pytest.approx(0, abs=1e-7)
    assert abs(cut["face_latent_gap"]) > 1e-5  # the face-latent path is untouched
    assert gauge.measure(fit, module) == intact  # weights restored, numbers back


def _fit(release, batches, root, max_steps, ckpt_path=None):
    module = build_module(release)
    gauge, memory = _gauge(), MemoryLogger()
    fit = trainer(root, max_steps=max_steps, log_every_n_steps=1, logger=memory, enable_checkpointing=True,
                  callbacks=[gauge, ResumableCheckpoint(every_n_train_steps=100)])
    fit.fit(module, DataLoader(DistinctBatches(batches), batch_size=None), ckpt_path=ckpt_path)
    return fit, module, gauge, dict(memory.gauge_rows())


# The resumed run is handed a loader that continues at batch 2 (see the test).
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resumed_run_measures_the_same_batch_with_the_same_numbers(tiny_release, features, tmp_path):
    # No validation loader: the gauge takes the first training batch. The resumed run's
    # loader continues at batch 2, as the feature store's resumable loader does, so only
    # the checkpointed gauge batch gives comparable numbers.
    _, _, _, full = _fit(tiny_release, features, tmp_path / "full", 4)
    _, _, first_gauge, first = _fit(tiny_release, features, tmp_path / "split", 2)
    fit, module, resumed_gauge, resumed = _fit(tiny_release, features[2:], tmp_path / "split", 4, ckpt_path="last")

    assert first_gauge.source == resumed_gauge.source == "training"
    for before, after in zip(first_gauge.groups, resumed_gauge.groups):
        assert before.keys() == after.keys()
        for key in before:
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    torch.testing.assert_close(resumed_gauge.groups[0][keys.ARCFACE], features[0][keys.ARCFACE])
    assert sorted(full) == [1, 3] and list(first) == [1] and list(resumed) == [3]
    for name in full[1]:
        assert first[1][name] == pytest.approx(full[1][name], rel=1e-6, abs=1e-9), name
        assert resumed[3][name] == pytest.approx(full[3][name], rel=1e-4, abs=1e-7), name

    # The callback state alone, through torch.save/load (weights_only, as checkpoints
    # load), gives a fresh gauge the same measurement.
    path = tmp_path / "gauge.pt"
    torch.save(resumed_gauge.state_dict(), path)
    restored = _gauge()
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.measure(fit, module) == resumed_gauge.measure(fit, module)


def test_batches_of_one_sample_are_gathered_into_a_gauge_batch(tiny_release, features, tmp_path):
    """The 5B experiment's case (batch size 1, buckets of several shapes): the gauge
    gathers one sample per batch, skips a repeated face, and groups samples by shape."""
    module = build_module(tiny_release)
    large = _encoded(module, make_raw_batch(batch_size=1, size=64, seed=7))  # 8 x 8 latents, not 4 x 4
    one = [{k: v[:1] for k, v in f.items()} for f in features[:2]]
    batches = [one[0], one[0], large, one[1], features[3]]  # the repeat of one[0] is not counted
    gauge = _gauge(every_n_steps=4, num_samples=3)
    fit = trainer(tmp_path, max_steps=4, callbacks=[gauge])
    fit.fit(module, DataLoader(DistinctBatches(batches), batch_size=None))

    assert [g[keys.LATENTS].shape[0] for g in gauge.groups] == [2, 1]
    assert gauge.groups[0][keys.LATENTS].shape[-1] != gauge.groups[1][keys.LATENTS].shape[-1]
    torch.testing.assert_close(gauge.groups[0][keys.ARCFACE], torch.cat([one[0][keys.ARCFACE], one[1][keys.ARCFACE]]))
    torch.testing.assert_close(gauge.groups[1][keys.ARCFACE], large[keys.ARCFACE])
    values = gauge.measure(fit, module)
    assert all(math.isfinite(v) for v in values.values())
    assert abs(values["identity_gap"]) > 1e-6


def test_one_identity_is_refused_with_the_fix(tiny_release, features, tmp_path):
    single = {k: v[:1] for k, v in features[0].items()}
    with pytest.raises(GaugeBatchError, match=r"validation loader gave 1.*batch size >= 2"):
        trainer(tmp_path, max_steps=2, callbacks=[_gauge()]).fit(
            build_module(tiny_release), train_dataloaders=loader(features[0], 2), val_dataloaders=loader(single, 1))
    # Training batches of one sample, the same face every time: still one identity by the
    # first measurement (repeats of a face are not counted twice).
    with pytest.raises(GaugeBatchError, match=r"training batches before step 2 gave 1.*batch size >= 2"):
        trainer(tmp_path, max_steps=2, callbacks=[_gauge()]).fit(build_module(tiny_release), loader(single, 2))


def test_bad_settings_are_refused():
    for bad in ({"every_n_steps": 0}, {"num_draws": 0}, {"num_samples": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CopyPasteGauge(**bad)
