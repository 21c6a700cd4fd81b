"""Turn manifest entries into samples of the batch contract (see `datamodules/batch.py`).

A sample whose files cannot be read comes back as a `Skipped` marker (with its reason)
and a warning rather than an exception: one corrupt clip among a million must not kill a
multi-day run, and `collate_skipping_unreadable` counts the skips per reason so the
training loop can log them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.batch import ARCFACE, CAPTION, FACE_IMAGE, SAMPLE_ID, SKIPPED, VIDEO
from datamodules.manifest import ManifestEntry
from datamodules.skip_reasons import (
    SKIP_REASONS,
    UNREADABLE_IMAGE,
    UNREADABLE_VIDEO,
    VIDEO_TOO_SHORT,
    Skipped,
    SkippedSample,
)

REFERENCE_FRAMES = ("inside_window", "outside_window")


class SampleReadError(SkippedSample):
    """A sample's video or face image cannot be decoded into what the batch needs."""

    def __init__(self, detail: str, reason: str = UNREADABLE_VIDEO):
        super().__init__(reason, detail)


class VideoTooShortError(SampleReadError):
    """The video has fewer frames than num_frames at frame_stride (from the start frame)."""

    def __init__(self, detail: str):
        super().__init__(detail, VIDEO_TOO_SHORT)


class UnreadableSampleWarning(UserWarning):
    """Emitted once per file when a sample is skipped; filter on this to silence it."""


class DecodedClip(NamedTuple):
    frames: torch.Tensor  # F x H x W x 3 uint8 RGB: frames start_frame, + stride, ...
    reference: np.ndarray | None  # the reference frame asked for, H x W x 3 uint8 RGB
    start_frame: int


def decode_clip(
    path: str | Path,
    num_frames: int,
    frame_stride: int = 1,
    start_frame: int | None = None,
    generator: torch.Generator | None = None,
    reference_frame: str | None = None,
) -> DecodedClip:
    """Decode frames start, start + stride, ... (num_frames of them) as F x H x W x 3 uint8,
    and optionally one more frame to take a reference face from; with the start used.

    `start_frame=None` draws a start uniformly from every start that fits, using
    `generator` (the global torch RNG when None). Decoding stops at the last frame needed.
    Raises VideoTooShortError when the clip is too short, SampleReadError when it cannot
    be opened or decoded.

    `reference_frame="inside_window"` returns the middle frame of the training window;
    `"outside_window"` the clip frame farthest from the window (peers report that a face
    from outside the window reduces copy-paste), or the middle one when the window covers
    the whole clip. The second element is that frame (H x W x 3 uint8 RGB) or None.
    """
    if num_frames < 1 or frame_stride < 1:
        raise ValueError(f"num_frames and frame_stride must be >= 1, got {num_frames}, {frame_stride}")
    if start_frame is not None and start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}")
    if reference_frame not in (None, *REFERENCE_FRAMES):
        raise ValueError(f"reference_frame must be one of {REFERENCE_FRAMES} or None, got {reference_frame!r}")
    span = (num_frames - 1) * frame_stride + 1
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SampleReadError(f"{path} has no video stream")
            stream = container.streams.video[0]
            total = None
            if start_frame is None or reference_frame == "outside_window":
                total = _count_frames(container, stream)
            if start_frame is None:
                if total < span:
                    raise VideoTooShortError(
                        f"{path} has {total} frames; {num_frames} frames at stride "
                        f"{frame_stride} need {span}")
                start_frame = int(torch.randint(total - span + 1, (1,), generator=generator))
            wanted = range(start_frame, start_frame + span, frame_stride)
            reference_index = _reference_index(reference_frame, wanted, total)
            frames, reference = _decode_indices(container, stream, wanted, reference_index)
    except (av.FFmpegError, OSError) as err:
        raise SampleReadError(f"cannot decode {path}: {err}") from err
    if len(frames) < num_frames:
        raise VideoTooShortError(
            f"{path} ended before frame {wanted[len(frames)]}; {num_frames} frames at stride "
            f"{frame_stride} from frame {start_frame} need {start_frame + span} frames")
    return DecodedClip(torch.from_numpy(np.stack(frames)), reference, start_frame)


def _reference_index(reference_frame: str | None, window: range, total: int | None) -> int | None:
    if reference_frame is None:
        return None
    middle = window[len(window) // 2]
    if reference_frame == "inside_window":
        return middle
    before, after = window.start, total - 1 - window[-1]
    if max(before, after) <= 0:
        return middle
    return 0 if before >= after else total - 1


def _count_frames(container, stream) -> int:
    """Frame count from the container index; formats without one are counted by packet.

    An index that overstates the count only costs a VideoTooShortError for a late start.
    """
    if stream.frames > 0:
        return stream.frames
    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    # Rewind so decoding starts from the first frame again.
    container.seek(0, backward=True, any_frame=False, stream=stream)
    return count


def _decode_indices(
    container, stream, wanted: range, reference_index: int | None = None
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Decode in presentation order, converting only the wanted frames; stop after the last."""
    stream.thread_type = "AUTO"
    wanted_set = set(wanted)
    last = max(wanted[-1], reference_index if reference_index is not None else -1)
    frames, reference = [], None
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted_set or index == reference_index:
            rgb = frame.to_ndarray(format="rgb24")
            if index in wanted_set:
                frames.append(rgb)
            if index == reference_index:
                reference = rgb
        if index >= last:
            break
    return frames, reference


def resize_and_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale F x 3 x H x W float frames so they cover height x width, then crop the centre.

    Scaling by the larger of the two ratios keeps the aspect ratio and leaves no borders.
    """
    if not frames.is_floating_point():
        raise TypeError(f"expected floating point frames, got {frames.dtype}")
    source_height, source_width = frames.shape[-2:]
    scale = max(height / source_height, width / source_width)
    # max() guards against rounding a covering size down by one pixel.
    scaled_height = max(height, round(source_height * scale))
    scaled_width = max(width, round(source_width * scale))
    if (scaled_height, scaled_width) != (source_height, source_width):
        frames = F.interpolate(frames, size=(scaled_height, scaled_width), mode="bilinear",
                               antialias=True, align_corners=False)
    top = (scaled_height - height) // 2
    left = (scaled_width - width) // 2
    return frames[..., top:top + height, left:left + width]


def load_face_image(path: str | Path, face_size: int) -> torch.Tensor:
    """An already aligned (square) face photo as 3 x face_size x face_size float in [0, 1]:
    read by `read_photo` (EXIF upright, 8-bit), as with face models, then resized (bicubic)."""
    from datamodules.face_pipeline import read_photo

    try:
        rgb = Image.fromarray(read_photo(path, max_side=None)).resize((face_size, face_size), Image.Resampling.BICUBIC)
    except SkippedSample as err:
        raise SampleReadError(err.detail, UNREADABLE_IMAGE) from err
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div_(255)


def reference_face(
    face_image: Path | None, frame: np.ndarray | None, face_size: int, extractor=None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference face of a sample: an aligned crop (face_size, uint8 RGB) and its ArcFace.

    From the photo `face_image` when the manifest names one, else from `frame` (a frame of
    the clip). With a `datamodules.face_pipeline.FaceExtractor` the face is detected,
    aligned and parsed as the release does, and ArcFace comes with it; without one the
    photo is taken as an already aligned crop (a frame: its centre square) and the
    ArcFace is None, for the model's identity encoder to compute.
    """
    if extractor is not None:
        from datamodules.face_pipeline import cap_long_side, read_photo

        # A frame is taken as a photo of the same size would be: the release's size limit first.
        face = extractor.extract(read_photo(face_image) if face_image is not None else cap_long_side(frame))
        return face.aligned, face.arcface
    if face_image is not None:
        crop = load_face_image(face_image, face_size)
    else:
        square = torch.from_numpy(frame).permute(2, 0, 1).float().div(255).unsqueeze(0)
        crop = resize_and_center_crop(square, face_size, face_size)[0]
    return (crop.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy(), None


class VideoFaceDataset(torch.utils.data.Dataset):
    """Samples of the batch contract: video clip, face crop, caption and sample id.

    With `random_start` each sample's start frame is drawn from a generator seeded by
    (seed, epoch, index): reproducible run to run, independent of worker count and
    order, and different every epoch once `set_epoch` is called. Entries without a video
    (prediction manifests) give samples without the `video` key.
    """

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        num_frames: int,
        frame_stride: int,
        height: int,
        width: int,
        face_size: int,
        seed: int = 0,
        random_start: bool = True,
        reference_frame: str = "outside_window",
        face_models: str | None = None,
    ):
        if min(num_frames, frame_stride, height, width, face_size) < 1:
            raise ValueError("num_frames, frame_stride, height, width and face_size must be >= 1")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.entries = list(entries)
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.height = height
        self.width = width
        self.face_size = face_size
        self.seed = seed
        self.random_start = random_start
        self.reference_frame = reference_frame
        self.face_models = face_models
        self._extractor = None  # built in each worker process on first use
        # Shared memory so set_epoch in the main process reaches DataLoader workers, which
        # hold their own copy of the dataset (and keep it across epochs when persistent).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # Per process: each DataLoader worker may warn once for the same file.
        self._warned_files: set[Path] = set()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self):
        return {**self.__dict__, "_extractor": None}

    def __getitem__(self, index: int) -> dict | Skipped:
        entry = self.entries[index]
        sample = {CAPTION: entry.caption, SAMPLE_ID: entry.sample_id}
        frame = None
        if entry.video is not None:
            try:
                sample[VIDEO], frame = self._load_video(entry, index)
            except SampleReadError as err:
                self._warn_once(entry, entry.video, err)
                return Skipped(err.reason, entry.sample_id)
        try:
            crop, arcface = reference_face(entry.face_image, frame, self.face_size, self._face_extractor())
        except SkippedSample as err:
            self._warn_once(entry, entry.face_image or entry.video, err)
            return Skipped(err.reason, entry.sample_id)
        sample[FACE_IMAGE] = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255)
        if arcface is not None:
            sample[ARCFACE] = torch.as_tensor(arcface, dtype=torch.float32)
        return sample

    def _face_extractor(self):
        if self.face_models is not None and self._extractor is None:
            from datamodules.face_pipeline import FaceExtractor

            self._extractor = FaceExtractor(self.face_models, face_size=self.face_size)
        return self._extractor

    def start_frame_generator(self, index: int) -> torch.Generator:
        """The generator that picks sample `index`'s start frame in the current epoch."""
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    def _load_video(self, entry: ManifestEntry, index: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """3 x F x H x W float in [-1, 1] (the VAE's layout), and a reference frame when the
        line has no face image."""
        reference_frame = self.reference_frame if entry.face_image is None else None
        if self.random_start:
            frames, reference, _ = decode_clip(entry.video, self.num_frames, self.frame_stride,
                                               generator=self.start_frame_generator(index),
                                               reference_frame=reference_frame)
        else:
            frames, reference, _ = decode_clip(entry.video, self.num_frames, self.frame_stride, start_frame=0,
                                               reference_frame=reference_frame)
        frames = frames.permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
        video = resize_and_center_crop(frames, self.height, self.width).permute(1, 0, 2, 3).contiguous()
        return video, reference

    def _warn_once(self, entry: ManifestEntry, path: Path, err: Exception) -> None:
        if path in self._warned_files:
            return
        self._warned_files.add(path)
        warnings.warn(f"skipping sample {entry.sample_id} (manifest line {entry.line}): "
                      f"{path}: {err}", UnreadableSampleWarning, stacklevel=3)


def collate_skipping_unreadable(samples: Iterable[dict | Skipped]) -> dict:
    """Collate readable samples; `skipped` counts the dropped ones per reason.

    Tensors are stacked, everything else (captions, ids) is kept as a list. A batch in
    which every sample was dropped is `{"skipped": counts}` alone, for the module to skip.
    """
    samples = list(samples)
    readable = [sample for sample in samples if not isinstance(sample, Skipped)]
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
    for sample in samples:
        if isinstance(sample, Skipped):
            skipped[SKIP_REASONS.index(sample.reason)] += 1
    if not readable:
        return {SKIPPED: skipped}
    keys = readable[0].keys()
    for sample in readable[1:]:
        if sample.keys() != keys:
            raise ValueError(
                f"samples {readable[0].get(SAMPLE_ID)!r} and {sample.get(SAMPLE_ID)!r} carry "
                f"different keys ({sorted(keys)} vs {sorted(sample.keys())}); a batch needs "
                "the same keys in every sample (e.g. give every predict line a video or none)")
    batch = {}
    for key in keys:
        values = [sample[key] for sample in readable]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    batch[SKIPPED] = skipped
    return batch
