"""Training dashboards: FLOPs per sample, the `perf/` figures, sample videos in TensorBoard,
and every tag group of a real tiny run read back from its event file."""

import io
import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode

from callbacks.training_throughput import (
    TrainingThroughput,
    dense_bf16_peak_tflops,
    excluded_from_throughput,
    throughput_figures,
)
from callbacks.two_stage_face_latent import TwoStageFaceLatentSchedule
from callbacks.validation_videos import ValidationVideos, encode_gif
from conftest import make_raw_batch
from datamodules.demo_data import write_demo_dataset
from datamodules.video_datamodule import VideoFaceDataModule
from lightning_modules.batch_features import encode_batch_features
from lightning_modules.echovideo_transformer import build_on_meta_device
from lightning_modules.flops import count_parameters, sequence_length, training_flops_per_sample
from lightning_modules.tiny import tiny_transformer_config
from module_helpers import build_module, loader, trainer


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from a second thread, and on a shared 2-core machine
    two spinning OpenMP threads make these runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- FLOPs


def test_release_size_training_flops_per_sample():
    """49 frames of 480 x 720 at the release's size: 13 x 60 x 90 latent, 17,776 tokens."""
    transformer = build_on_meta_device()  # the release's config, no weights allocated
    counts = count_parameters(transformer)
    assert counts.total == pytest.approx(5.62e9, rel=0.005)
    # Not per token: the adaptive-norm modulation (two 512 -> 6 x 3072 linears per block,
    # 794 M) plus the time embedding, output modulation and IITF parts (56 M).
    modulation = 42 * 2 * (512 * 6 * 3072 + 6 * 3072)
    assert counts.other - modulation == pytest.approx(56e6, rel=0.05)
    assert counts.sequence == pytest.approx(4.77e9, rel=0.005) and counts.sequence_frozen == 0

    tokens = sequence_length(transformer.config, 13, 60, 90)
    assert (tokens.text, tokens.video) == (226, 13 * 30 * 45)
    flops = training_flops_per_sample(transformer.config, counts, 13, 60, 90, gradient_checkpointing=True)
    assert flops.tokens == 17776
    assert 0.95e15 < flops.model < 1.15e15  # "about 1.1e15" by the plain 6 x all-parameters rule
    attention = 12 * 17776**2 * 3072 * 42
    assert flops.model == pytest.approx(6 * counts.sequence * 17776 + attention, rel=1e-12)
    assert flops.recompute == pytest.approx(flops.model / 3, rel=1e-12)  # one more forward
    assert flops.hardware == flops.model + flops.recompute
    plain = training_flops_per_sample(transformer.config, counts, 13, 60, 90)
    assert plain.recompute == 0 and plain.model == flops.model


def test_flops_formula_matches_torch_flop_counter_at_release_size():
    """torch counts every matmul of one forward pass on the meta device; training is
    three forwards' worth (forward, input gradients, weight gradients)."""
    transformer = build_on_meta_device()
    frames, height, width = 13, 60, 106  # 49 x 480 x 848
    with torch.device("meta"):
        inputs = dict(
            hidden_states=torch.empty(1, frames, 32, height, width),
            encoder_hidden_states=torch.empty(1, 226, 4096),
            encoder_face_hidden_states=torch.empty(1, 196, 768),
            encoder_face_feats_hidden_states=torch.empty(1, 144, 512),
            timestep=torch.tensor([500]),
        )
    rotary = transformer.rotary_embeddings(frames, height, width, torch.device("meta"))
    counter = FlopCounterMode(display=False)
    with counter:
        transformer(**inputs, image_rotary_emb=rotary, return_dict=False)
    counted = 3 * counter.get_total_flops()
    formula = training_flops_per_sample(transformer.config, count_parameters(transformer), frames, height, width)
    assert formula.tokens == 226 + 13 * 30 * 53
    assert formula.model == pytest.approx(counted, rel=0.01)


def test_frozen_backbone_skips_weight_gradients_and_patch_size_t_pads_frames():
    config = tiny_transformer_config(num_layers=2)
    transformer = build_on_meta_device(config)
    full = count_parameters(transformer)
    transformer.transformer_blocks.requires_grad_(False)
    frozen = count_parameters(transformer)
    assert frozen.total == full.total and 0 < frozen.sequence_frozen < frozen.sequence
    trained = training_flops_per_sample(config, full, 3, 8, 8)
    iitf_only = training_flops_per_sample(config, frozen, 3, 8, 8)
    tokens = trained.tokens
    assert trained.model - iitf_only.model == pytest.approx(2 * frozen.sequence_frozen * tokens)

    # CogVideoX 1.5 layout: 13 latent frames in temporal patches of 2 -> 7 (padded).
    cogvideox_1_5 = {"patch_size": 2, "patch_size_t": 2, "max_text_seq_length": 224}
    assert sequence_length(cogvideox_1_5, 13, 60, 90).video == 7 * 30 * 45


# ---------------------------------------------------------------------------- throughput figures


def test_peak_table_matches_device_names_by_whole_word():
    assert dense_bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert dense_bf16_peak_tflops("NVIDIA H100 NVL") == 835.5
    assert dense_bf16_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert dense_bf16_peak_tflops("NVIDIA H200") == 989.5
    assert dense_bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_bf16_peak_tflops("NVIDIA L40S") == 362.05
    assert dense_bf16_peak_tflops("NVIDIA L4") == 121.0
    assert dense_bf16_peak_tflops("NVIDIA GeForce GTX 1080") is None


def test_figures_are_whole_run_rates_per_device():
    figures = throughput_figures(samples=16, tokens=16 * 1000, model_flops=8e15, hardware_flops=1.2e16,
                                 seconds=4.0, world_size=8, peak_tflops=500.0)
    assert figures["perf/samples_per_sec"] == 4.0
    assert figures["perf/tokens_per_sec"] == 4000.0
    assert figures["perf/tflops_per_sec_per_device"] == 250.0  # 8e15 / 8 devices / 4 s
    assert figures["perf/hardware_tflops_per_sec_per_device"] == 375.0
    assert figures["perf/mfu"] == 0.5
    assert "perf/mfu" not in throughput_figures(1, 1, 1, 1, 1.0, 1, peak_tflops=None)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class ClockDriver(pl.Callback):
    """Placed before TrainingThroughput: the loader 'takes' `wait` seconds before each batch,
    the step `step` seconds; at chosen batches a long excluded block runs inside the
    step or inside the gap (as video generation would), and validation takes 50 s."""

    def __init__(self, clock, wait, step, excluded_at=()):
        self.clock, self.wait, self.step, self.excluded_at = clock, wait, step, set(excluded_at)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.now += self.wait
        if batch_idx in self.excluded_at:
            with excluded_from_throughput(trainer):
                self.clock.now += 100.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.now += self.step
        if batch_idx in self.excluded_at:
            with excluded_from_throughput(trainer):
                self.clock.now += 100.0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.clock.now += 50.0


class MemoryLogger(Logger):
    """Every logged metric, as (step, value) per name."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def cached_features(tiny_release):
    """Encoded once: the steps then skip the VAE (and exercise the `latents` batch key)."""
    module = build_module(tiny_release)
    batch = make_raw_batch(batch_size=2, num_frames=9, size=32)
    return {k: v.clone() for k, v in encode_batch_features(module.encoders, batch).items()}


@pytest.mark.parametrize("interrupted", [False, True])
def test_throughput_is_exact_with_a_fake_clock(tiny_release, cached_features, tmp_path, interrupted):
    """Interrupted: 100 s blocks inside steps and gaps, and a 50 s validation after batch 2,
    all left out, so the figures are the same."""
    module = build_module(tiny_release)
    clock = FakeClock()
    throughput = TrainingThroughput(window=2, peak_tflops=2.0)
    throughput.clock = clock
    memory = MemoryLogger()
    driver = ClockDriver(clock, wait=0.25, step=1.0, excluded_at=(1, 2) if interrupted else ())
    validation = dict(val_check_interval=2, limit_val_batches=1) if interrupted else dict(limit_val_batches=0)
    fit = trainer(tmp_path, max_steps=4, logger=memory, log_every_n_steps=1, callbacks=[driver, throughput],
                  **validation)
    fit.fit(module, loader(cached_features, 4), loader(cached_features, 1) if interrupted else None)
    assert ("val/loss" in fit.callback_metrics) == interrupted

    # The 9 x 32 x 32 video is a 3 x 4 x 4 latent: 3 x 2 x 2 patches + 16 text tokens.
    per_sample = training_flops_per_sample(module.transformer.config, count_parameters(module.transformer), 3, 4, 4)
    assert per_sample.tokens == 28
    # Window 1 opens when batch 1 starts: step, wait, step = 2.25 s. Window 2: 2 x (wait + step).
    seconds = [2.25, 2.5]
    samples = memory.metrics["perf/samples_per_sec"]
    assert [step for step, _ in samples] == [1, 3]  # Lightning's step axis: the window's last batch
    assert [value for _, value in samples] == pytest.approx([4 / s for s in seconds], rel=1e-12)
    tokens = [value for _, value in memory.metrics["perf/tokens_per_sec"]]
    assert tokens == pytest.approx([4 * 28 / s for s in seconds], rel=1e-12)
    tflops = [value for _, value in memory.metrics["perf/tflops_per_sec_per_device"]]
    assert tflops == pytest.approx([4 * per_sample.model / s / 1e12 for s in seconds], rel=1e-9)
    mfu = [value for _, value in memory.metrics["perf/mfu"]]
    assert mfu == pytest.approx([t / 2.0 for t in tflops], rel=1e-9)
    waits = [value for _, value in memory.metrics["perf/dataloader_wait_sec"]]
    assert waits == pytest.approx([0.25, 0.25], rel=1e-12)
    assert "perf/peak_memory_gb" not in memory.metrics  # CPU


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="peak_tflops"):
        TrainingThroughput(peak_tflops=0)
    with pytest.raises(ValueError, match="window"):
        TrainingThroughput(window=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_and_table_peak_on_gpu(tiny_release, tmp_path):
    module = build_module(tiny_release)
    memory = MemoryLogger()
    throughput = TrainingThroughput(window=2)
    fit = trainer(tmp_path, accelerator="gpu", devices=1, max_steps=2, logger=memory, log_every_n_steps=1,
                  callbacks=[throughput])
    fit.fit(module, loader(make_raw_batch(), 2))
    assert memory.metrics["perf/peak_memory_gb"][-1][1] > 0
    if dense_bf16_peak_tflops(torch.cuda.get_device_name()) is not None:
        assert 0 < memory.metrics["perf/mfu"][-1][1] < 1


# ---------------------------------------------------------------------------- videos


def test_gif_keeps_every_frame_and_shrinks_to_max_side():
    frames = torch.linspace(0, 255, 5).round().to(torch.uint8)[:, None, None, None].expand(5, 40, 60, 3).numpy()
    gif = Image.open(io.BytesIO(encode_gif(frames, fps=10, max_side=30)))
    assert (gif.n_frames, gif.size, gif.info["loop"], gif.info["duration"]) == (5, (30, 20), 0, 100)


@pytest.fixture
def demo_data(tmp_path):
    manifest = write_demo_dataset(tmp_path / "data", num_clips=2, num_frames=9, height=32, width=32, face_size=32)
    predict = manifest.with_name("predict.jsonl")
    lines = [{"id": f"face_{i}", "caption": f"a person number {i} smiles", "face_image": "faces/astronaut.png"}
             for i in range(3)]
    predict.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest, predict


def _datamodule(manifest, predict=None, **overrides):
    options = dict(num_frames=9, height=32, width=32, face_size=32, batch_size=2, num_workers=0)
    options.update(overrides)
    return VideoFaceDataModule(str(manifest), predict_manifest=str(predict) if predict else None, **options)


def test_videos_need_a_predict_manifest_and_tensorboard(tiny_release, demo_data, tmp_path):
    manifest, predict = demo_data
    videos = ValidationVideos(every_n_steps=1)
    fit = trainer(tmp_path, max_steps=1, logger=TensorBoardLogger(tmp_path), callbacks=[videos])
    with pytest.raises(ValueError, match=r"data\.predict_manifest"):
        fit.fit(build_module(tiny_release), datamodule=_datamodule(manifest))
    fit = trainer(tmp_path, max_steps=1, logger=MemoryLogger(), callbacks=[videos])
    with pytest.raises(ValueError, match="TensorBoardLogger"):
        fit.fit(build_module(tiny_release), datamodule=_datamodule(manifest, predict))
    with pytest.raises(ValueError, match="every_n_steps"):
        ValidationVideos(every_n_steps=0)
    scored = ValidationVideos(every_n_steps=1, face_models=str(tmp_path / "no_faces"))
    fit = trainer(tmp_path, max_steps=1, logger=TensorBoardLogger(tmp_path), callbacks=[scored])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_faces")):
        fit.fit(build_module(tiny_release), datamodule=_datamodule(manifest, predict))


def test_prompts_are_the_first_max_videos_of_the_predict_manifest(demo_data):
    """The predict manifest is read through VideoFaceDataModule.setup("predict") and cut
    to max_videos across its batches of 2; the cut is kept for the whole run."""
    manifest, predict = demo_data
    fake_trainer = SimpleNamespace(datamodule=_datamodule(manifest, predict))
    videos = ValidationVideos(every_n_steps=1, max_videos=3)
    batches = videos._prompt_batches(fake_trainer)
    assert [batch["sample_id"] for batch in batches] == [["face_0", "face_1"], ["face_2"]]
    assert [batch["face_image"].shape[0] for batch in batches] == [2, 1]
    assert batches[1]["caption"] == ["a person number 2 smiles"]
    assert videos._prompt_batches(fake_trainer) is batches


def test_validation_facesim_is_the_mean_cosine_to_the_reference(face_root):
    """Videos whose frames hold a face (the tiny detector's bright square) in some frames:
    the score is the mean over videos of the mean cosine over frames with a face."""
    from datamodules.face_pipeline import FaceExtractor
    from lightning_modules.video_metrics import cosine

    rng = np.random.default_rng(0)

    def frame(face):
        image = rng.integers(0, 40, (256, 320, 3), dtype=np.uint8)
        if face:
            image[72:152, 120:200] = rng.integers(200, 256, (80, 80, 3), dtype=np.uint8)
        return image

    videos = np.stack([np.stack([frame(face=i != 1) for i in range(4)]) for _ in range(2)])
    references = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    callback = ValidationVideos(every_n_steps=1, face_models=str(face_root), facesim_frames=4)
    metrics = callback.face_similarity([{"frames": torch.from_numpy(videos)}],
                                       [{"arcface": references, "face_image": torch.zeros(2, 3, 8, 8)}])
    extractor = FaceExtractor(face_root)
    expected = np.mean([np.mean([cosine(references[v].numpy(), extractor.extract(videos[v, i]).arcface)
                                 for i in (0, 2, 3)]) for v in range(2)])
    assert metrics["facesim_arc"] == pytest.approx(expected, abs=1e-6)
    assert metrics["facesim_arc_frames_without_face"] == 2
    # Without `arcface` in the batch the reference is the crop's own; a crop with no face is counted.
    metrics = callback.face_similarity([{"frames": torch.from_numpy(videos)}],
                                       [{"face_image": torch.zeros(2, 3, 64, 64)}])
    assert metrics["facesim_arc_references_without_face"] == 2 and "facesim_arc" not in metrics


class ModeRecorder:
    """The module's mode and grad state inside every transformer call."""

    def __init__(self, module):
        self.calls = []
        module.transformer.register_forward_pre_hook(
            lambda m, args: self.calls.append((m.training, torch.is_grad_enabled()))
        )


# ---------------------------------------------------------------------------- the whole dashboard


def _events(directory):
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tiny_fit_writes_every_dashboard_group(tiny_release, demo_data, face_root, tmp_path):
    manifest, predict = demo_data
    module = build_module(tiny_release)
    modes = ModeRecorder(module)
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    callbacks = [
        TwoStageFaceLatentSchedule(stage_two_start_step=2, face_latent_keep_prob=0.5),
        TrainingThroughput(peak_tflops=1.0),
        ValidationVideos(every_n_steps=2, max_videos=2, at_train_start=True, face_models=str(face_root),
                         facesim_frames=4),
        LearningRateMonitor(logging_interval="step"),
    ]
    fit = trainer(tmp_path, max_steps=3, logger=logger, log_every_n_steps=1, callbacks=callbacks)
    fit.fit(module, datamodule=_datamodule(manifest, predict, repeat=2))

    events = _events(logger.log_dir)
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "optim/lr", "optim/grad_norm", "train/stage", "train/face_latent_keep_rate",
                "perf/samples_per_sec", "perf/tokens_per_sec", "perf/tflops_per_sec_per_device",
                "perf/hardware_tflops_per_sec_per_device", "perf/mfu",
                "perf/dataloader_wait_sec", "data/skipped/unreadable_video", "data/captions_truncated",
                "val/facesim_arc_frames_without_face"):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(tag.startswith("train/loss_by_timestep/") for tag in scalars), sorted(scalars)
    assert [e.value for e in events.Scalars("train/stage")] == [1.0, 1.0, 2.0]
    assert [e.step for e in events.Scalars("perf/samples_per_sec")] == [0, 1, 2]
    assert all(e.value > 0 and math.isfinite(e.value) for e in events.Scalars("perf/samples_per_sec"))
    mfu = [e.value for e in events.Scalars("perf/mfu")]
    tflops = [e.value for e in events.Scalars("perf/tflops_per_sec_per_device")]
    assert mfu == pytest.approx(tflops)  # peak_tflops=1.0

    video_tags = sorted(events.Tags()["images"])
    assert video_tags == ["val/videos/face_0", "val/videos/face_1"]  # max_videos=2 of the 3 lines
    for tag in video_tags:
        images = events.Images(tag)
        assert [image.step for image in images] == [0, 2]  # at train start, then every 2 steps
        gif = Image.open(io.BytesIO(images[-1].encoded_image_string))
        assert gif.format == "GIF"
        assert (gif.n_frames, gif.size) == (9, (32, 32))  # sampling: 9 frames of 32 x 32
        assert (images[-1].width, images[-1].height) == (32, 32)
    # What TensorBoard's server sees: image-plugin data (the Images tab), captions attached.
    served = plugin_event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    served.Reload()
    assert sorted(served.PluginTagToContent("images")) == video_tags
    assert served.SummaryMetadata("val/videos/face_1").summary_description == "a person number 1 smiles"

    # Videos were generated in eval mode without gradients; training ran in train mode.
    sampling_calls = [call for call in modes.calls if call == (False, False)]
    assert len(sampling_calls) == 2 * 2  # 2 times x 2 sampling steps (CFG in one batch)
    assert all(call == (True, True) for call in modes.calls if call not in sampling_calls)
    assert module.transformer.training
