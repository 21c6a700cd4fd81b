"""Writing video files (H.264 mp4 where this PyAV build has it)."""

import functools
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> str:
    """Encode F x H x W x 3 uint8 RGB frames (container from the suffix, e.g. .mp4); return the codec."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected F x H x W x 3 uint8 frames, got {frames.shape} {frames.dtype}")
    codec = mp4_video_codec()
    path = Path(path)
    # Encode under a temporary name and rename: no half-written video under the final name.
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    with av.open(str(temporary), mode="w") as container:  # format from the suffix
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        else:
            # mpeg4's default bit rate is meant for streaming and smears small frames.
            stream.bit_rate = 4_000_000
        for frame_index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = frame_index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the frames the encoder still holds
    os.replace(temporary, path)
    return codec


@functools.cache
def mp4_video_codec() -> str:
    """Prefer H.264 (libx264); PyAV builds without it still ship the plain MPEG-4 encoder."""
    try:
        av.codec.Codec("libx264", "w")
    except av.codec.codec.UnknownCodecError:
        return "mpeg4"
    return "libx264"
