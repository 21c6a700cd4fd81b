import warnings

import av
import numpy as np
import pytest
import torch

from datamodules.batch import ARCFACE, CAPTION, FACE_IMAGE, SAMPLE_ID, SKIPPED, VIDEO
from datamodules.skip_reasons import NO_FACE, SKIP_REASONS, UNREADABLE_IMAGE, UNREADABLE_VIDEO, Skipped
from datamodules.manifest import ManifestEntry, ManifestError
from datamodules.video_dataset import (
    SampleReadError,
    UnreadableSampleWarning,
    VideoFaceDataset,
    VideoTooShortError,
    collate_skipping_unreadable,
    decode_clip,
    resize_and_center_crop,
)
from helpers_video import GRAY_STEP, frame_indices, write_face_png, write_gray_ramp_video, write_manifest

NUM_VIDEO_FRAMES = 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 20-frame gray-ramp video, a face PNG, and broken versions of both."""
    root = tmp_path_factory.mktemp("data")
    video = write_gray_ramp_video(root / "ramp.mp4", NUM_VIDEO_FRAMES)
    face = write_face_png(root / "face.png")
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = root / "truncated.png"
    truncated.write_bytes(face.read_bytes()[: face.stat().st_size // 2])
    return {"root": root, "video": video, "face": face, "corrupt": corrupt, "truncated": truncated}


def entry(video, face, line=1, sample_id=None):
    return ManifestEntry(video=video, caption=f"caption {line}", face_image=face, line=line,
                         sample_id=sample_id or f"sample-{line}")


def make_dataset(entries, **overrides):
    options = dict(num_frames=4, frame_stride=3, height=16, width=16, face_size=12, seed=7,
                   random_start=True)
    options.update(overrides)
    return VideoFaceDataset(entries, **options)


def test_decode_picks_frames_stride_apart(files):
    frames = decode_clip(files["video"], num_frames=4, frame_stride=3, start_frame=2)[0]
    assert frames.dtype == torch.uint8 and frames.shape == (4, 32, 48, 3)
    assert frame_indices(frames.numpy()) == [2, 5, 8, 11]


def test_random_start_is_valid_and_follows_the_generator(files):
    starts = []
    for seed in range(8):
        frames = decode_clip(files["video"], 5, 4, generator=torch.Generator().manual_seed(seed))[0]
        indices = frame_indices(frames.numpy())
        assert np.diff(indices).tolist() == [4] * 4 and indices[-1] < NUM_VIDEO_FRAMES
        again = decode_clip(files["video"], 5, 4, generator=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(frames, again)
        starts.append(indices[0])
    assert len(set(starts)) > 1  # 4 valid starts, 8 seeds


def test_random_start_in_a_container_without_frame_count(files):
    # Matroska stores no frame count, so the decoder has to count packets first.
    mkv = write_gray_ramp_video(files["root"] / "ramp.mkv", NUM_VIDEO_FRAMES)
    with av.open(str(mkv)) as container:
        assert container.streams.video[0].frames == 0
    starts = set()
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        indices = frame_indices(decode_clip(mkv, 4, 5, generator=generator)[0].numpy())
        assert indices == list(range(indices[0], indices[0] + 16, 5)) and indices[-1] < NUM_VIDEO_FRAMES
        starts.add(indices[0])
    assert len(starts) > 1


def test_too_short_video_raises(files):
    with pytest.raises(VideoTooShortError, match="needs? 22"):
        decode_clip(files["video"], num_frames=8, frame_stride=3)
    with pytest.raises(VideoTooShortError):
        decode_clip(files["video"], num_frames=4, frame_stride=3, start_frame=15)
    assert issubclass(VideoTooShortError, SampleReadError)
    with pytest.raises(SampleReadError):
        decode_clip(files["corrupt"], num_frames=1)


def test_reference_frame_inside_or_outside_the_window(files):
    def reference(start, num_frames, where, stride=3):
        frames, frame, _ = decode_clip(files["video"], num_frames, stride, start_frame=start, reference_frame=where)
        assert len(frames) == num_frames
        return frame_indices(frame[None])[0]

    assert reference(2, 4, "inside_window") == 8  # window 2, 5, 8, 11: its middle
    # Window 2..11 of frames 0..NUM_VIDEO_FRAMES-1: the far side of the clip is after it.
    assert reference(2, 4, "outside_window") == NUM_VIDEO_FRAMES - 1
    assert reference(NUM_VIDEO_FRAMES - 10, 4, "outside_window") == 0
    # A window over the whole clip leaves no frame outside it: its middle is used.
    assert reference(0, NUM_VIDEO_FRAMES, "outside_window", stride=1) == NUM_VIDEO_FRAMES // 2
    assert decode_clip(files["video"], 4, 3, start_frame=2)[1] is None


def test_resize_and_center_crop():
    columns = torch.arange(20.0).expand(2, 3, 10, 20)
    cropped = resize_and_center_crop(columns, 10, 10)  # already covers: only crops
    assert cropped.shape == (2, 3, 10, 10)
    assert cropped[0, 0, 0].tolist() == list(range(5, 15))

    upscaled = resize_and_center_crop(torch.rand(3, 3, 8, 6), 16, 32)
    assert upscaled.shape == (3, 3, 16, 32)
    downscaled = resize_and_center_crop(torch.rand(1, 3, 90, 160), 30, 30)
    assert downscaled.shape == (1, 3, 30, 30)


def test_dataset_sample_matches_the_batch_contract(files):
    dataset = make_dataset([entry(files["video"], files["face"])], random_start=False)
    sample = dataset[0]
    assert set(sample) == {VIDEO, FACE_IMAGE, CAPTION, SAMPLE_ID}
    video, face = sample[VIDEO], sample[FACE_IMAGE]
    assert video.dtype == torch.float32 and video.shape == (3, 4, 16, 16)
    assert face.dtype == torch.float32 and face.shape == (3, 12, 12)
    assert video.min() >= -1 and video.max() <= 1
    assert face.min() >= 0 and face.max() <= 1 and face.std() > 0
    # Frames 0, 3, 6, 9 at gray 10 * i, mapped from [0, 255] to [-1, 1].
    expected = torch.tensor([0, 3, 6, 9]) * GRAY_STEP / 127.5 - 1
    assert torch.allclose(video.mean(dim=(0, 2, 3)), expected, atol=0.04)
    assert sample[CAPTION] == "caption 1" and sample[SAMPLE_ID] == "sample-1"


def test_random_start_is_reproducible_and_changes_with_epoch(files):
    entries = [entry(files["video"], files["face"], line) for line in range(1, 4)]

    def first_frame_levels(dataset):
        return [round(float(dataset[i][VIDEO][:, 0].mean()), 3) for i in range(len(dataset))]

    dataset, twin = make_dataset(entries), make_dataset(entries)
    by_epoch = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        twin.set_epoch(epoch)
        by_epoch.append(first_frame_levels(dataset))
        assert by_epoch[-1] == first_frame_levels(twin)
    assert len({tuple(levels) for levels in by_epoch}) > 1


def test_unreadable_files_give_none_and_warn_once_per_file(files):
    dataset = make_dataset([entry(files["corrupt"], files["face"], 1),
                            entry(files["video"], files["truncated"], 2),
                            entry(files["video"], files["face"], 3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [dataset[i] for i in (0, 1, 2, 0, 1)]
    assert samples[0] == samples[3] == Skipped(UNREADABLE_VIDEO, "sample-1")
    assert samples[1] == samples[4] == Skipped(UNREADABLE_IMAGE, "sample-2")
    assert not isinstance(samples[2], Skipped)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableSampleWarning)]
    assert len(messages) == 2
    assert str(files["corrupt"]) in messages[0] and "sample-1" in messages[0]
    assert str(files["truncated"]) in messages[1]

    batch = collate_skipping_unreadable(samples[:3])
    assert batch[SKIPPED][SKIP_REASONS.index(UNREADABLE_VIDEO)].item() == 1
    assert batch[SKIPPED][SKIP_REASONS.index(UNREADABLE_IMAGE)].item() == 1
    assert batch[SKIPPED].sum().item() == 2
    assert batch[VIDEO].shape == (1, 3, 4, 16, 16) and batch[FACE_IMAGE].shape == (1, 3, 12, 12)
    assert batch[CAPTION] == ["caption 3"] and batch[SAMPLE_ID] == ["sample-3"]


def test_collate_of_an_all_unreadable_batch_keeps_only_the_counts():
    batch = collate_skipping_unreadable([Skipped(UNREADABLE_VIDEO, "a"), Skipped(UNREADABLE_VIDEO, "b"),
                                         Skipped(UNREADABLE_IMAGE, "c")])
    assert set(batch) == {SKIPPED}
    assert batch[SKIPPED].tolist() == [{UNREADABLE_VIDEO: 2, UNREADABLE_IMAGE: 1}.get(r, 0) for r in SKIP_REASONS]


def test_predict_samples_without_video(files):
    no_video = ManifestEntry(video=None, caption="waves", face_image=files["face"], line=1,
                             sample_id="p1")
    dataset = make_dataset([no_video, no_video], random_start=False)
    batch = collate_skipping_unreadable([dataset[0], Skipped(UNREADABLE_IMAGE, "x"), dataset[1]])
    assert VIDEO not in batch and batch[FACE_IMAGE].shape == (2, 3, 12, 12)
    assert batch[SKIPPED].sum().item() == 1
    with_video = make_dataset([entry(files["video"], files["face"])], random_start=False)[0]
    with pytest.raises(ValueError, match="same keys"):
        collate_skipping_unreadable([dataset[0], with_video])


def datamodule(manifest, **overrides):
    from datamodules.video_datamodule import VideoFaceDataModule

    options = dict(num_frames=5, frame_stride=3, height=16, width=16, face_size=12, batch_size=2,
                   num_workers=0, seed=3)
    options.update(overrides)
    return VideoFaceDataModule(str(manifest), **options)


def test_datamodule_setup_rejects_a_bad_manifest_before_any_loader(files):
    root = files["root"]
    manifest = write_manifest(root / "bad_train.jsonl", [
        {"video": "ramp.mp4", "caption": "ok", "face_image": "face.png"},
        {"video": "ramp.mp4", "caption": "", "face_image": "face.png"},
    ])
    val = write_manifest(root / "bad_val.jsonl", ['{"video": '])
    module = datamodule(manifest, val_manifest=str(val))
    with pytest.raises(ManifestError) as caught:
        module.setup("fit")
    assert [str(p).split(": ")[:2] for p in caught.value.problems] == [
        [f"{manifest}:2", "field 'caption'"], [f"{val}:1", "field '<line>'"]]
    assert module.train_dataset is None
    with pytest.raises(RuntimeError, match="setup"):
        module.train_dataloader()


def test_datamodule_train_loader_yields_contract_batches_and_syncs_epoch_to_workers(files):
    root = files["root"]
    manifest = write_manifest(root / "train.jsonl", [
        {"video": "ramp.mp4", "caption": f"clip {i}", "face_image": "face.png", "id": f"c{i}"}
        for i in range(4)])
    module = datamodule(manifest, num_workers=1)
    module.setup("fit")
    loader = module.train_dataloader()
    assert loader.persistent_workers and module.val_dataloader() == []

    def start_frames(epoch):
        loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
        order, starts = [], []
        for batch in loader:
            assert batch[VIDEO].shape == (2, 3, 5, 16, 16) and batch[SKIPPED].sum().item() == 0
            order += batch[SAMPLE_ID]
            levels = batch[VIDEO][:, :, 0].mean(dim=(1, 2, 3))
            starts += torch.round((levels + 1) * 127.5 / GRAY_STEP).int().tolist()
        return order, starts

    epochs = [start_frames(epoch) for epoch in range(4)]
    # The persistent worker must see each epoch: its start frames match the main process's.
    dataset = module.train_dataset
    for epoch, (order, starts) in enumerate(epochs):
        dataset.set_epoch(epoch)
        indices = [int(sample_id[1:]) for sample_id in order]
        # 5 frames at stride 3 span 13 frames: NUM_VIDEO_FRAMES - 12 valid starts.
        expected = [int(torch.randint(NUM_VIDEO_FRAMES - 12, (1,),
                                      generator=dataset.start_frame_generator(i)))
                    for i in indices]
        assert starts == expected
        assert sorted(order) == ["c0", "c1", "c2", "c3"]
    assert len({tuple(starts) for _, starts in epochs}) > 1
    assert len({tuple(order) for order, _ in epochs}) > 1


def test_datamodule_predict_allows_missing_videos_but_not_mixed_batches(files):
    root = files["root"]
    with_video = {"video": "ramp.mp4", "caption": "a", "face_image": "face.png"}
    without_video = {"caption": "b", "face_image": "face.png"}
    mixed = write_manifest(root / "predict_mixed.jsonl", [with_video, without_video])
    module = datamodule(root / "train.jsonl", predict_manifest=str(mixed))
    with pytest.raises(ManifestError, match=rf":2: field 'video': missing while other lines have one"):
        module.setup("predict")
    datamodule(root / "train.jsonl", predict_manifest=str(mixed), batch_size=1).setup("predict")

    prompts_only = write_manifest(root / "predict.jsonl", [without_video, without_video])
    module = datamodule(root / "train.jsonl", predict_manifest=str(prompts_only))
    module.setup("predict")
    (batch,) = list(module.predict_dataloader())
    assert VIDEO not in batch and batch[FACE_IMAGE].shape == (2, 3, 12, 12)
    assert batch[CAPTION] == ["b", "b"]


def test_raw_samples_through_the_face_pipeline(face_root, tmp_path):
    """Training straight from a manifest with face models: the face comes from a clip frame
    when the line names no photo, ArcFace comes with it, and a clip without a face is skipped."""
    from datamodules.video_io import write_mp4

    # The tiny detector's face: a bright 16 px square centred in a 64 px frame.
    with_face = np.zeros((12, 64, 64, 3), dtype=np.uint8)
    with_face[:, 24:40, 24:40] = 230
    write_mp4(tmp_path / "face.mp4", with_face, 8)
    write_mp4(tmp_path / "dark.mp4", np.zeros_like(with_face), 8)
    entries = [ManifestEntry(video=tmp_path / name, caption="a man", face_image=None, line=i, sample_id=name)
               for i, name in enumerate(["face.mp4", "dark.mp4"], start=1)]
    dataset = VideoFaceDataset(entries, num_frames=4, frame_stride=2, height=32, width=32, face_size=64,
                               reference_frame="outside_window", face_models=str(face_root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableSampleWarning)
        face, dark = dataset[0], dataset[1]
    assert face[FACE_IMAGE].shape == (3, 64, 64) and face[ARCFACE].shape == (512,)
    assert face[ARCFACE].abs().sum() > 0
    assert dark == Skipped(NO_FACE, "dark.mp4")
