"""Small files for data tests: videos whose frames can be identified by brightness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.video_io import write_mp4

GRAY_STEP = 10  # frame i is uniform gray 10 * i, so a decoded frame tells its own index
# Lossy 4:2:0 encoding moves a uniform gray level by a few steps at most.
GRAY_TOLERANCE = 4


def write_gray_ramp_video(
    path: Path, num_frames: int, height: int = 32, width: int = 48, fps: int = 8
) -> Path:
    """An mp4 whose frame i is uniform gray GRAY_STEP * i (num_frames <= 26 to stay in uint8)."""
    levels = np.arange(num_frames, dtype=np.uint8) * GRAY_STEP
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3))
    write_mp4(path, np.ascontiguousarray(frames), fps)
    return path


def frame_indices(frames: np.ndarray) -> list[int]:
    """Recover the frame indices of decoded gray-ramp frames (F x H x W x 3, uint8)."""
    levels = np.asarray(frames, dtype=np.float64).reshape(len(frames), -1).mean(axis=1)
    indices = np.rint(levels / GRAY_STEP).astype(int)
    assert np.all(np.abs(levels - indices * GRAY_STEP) <= GRAY_TOLERANCE), levels
    return indices.tolist()


def write_face_png(path: Path, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_manifest(path: Path, records: list[dict | str]) -> Path:
    """One line per record; strings are written verbatim (for blank or broken lines)."""
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
