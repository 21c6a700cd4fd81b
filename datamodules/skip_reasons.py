"""Why a sample was left out: one fixed list, shared by preprocessing, loaders and logs.

A sample that cannot be used is skipped, never fatal, and never silent: the reason is
counted in the preprocess report and, during training, logged as `data/skipped/<reason>`
summed over all ranks. The list is fixed (not discovered at run time) so that every rank
reduces the same vector of counts in the same order, which a collective op requires.
"""

from __future__ import annotations

from typing import NamedTuple

INVALID_MANIFEST_LINE = "invalid_manifest_line"
UNREADABLE_VIDEO = "unreadable_video"
VIDEO_TOO_SHORT = "video_too_short"
UNREADABLE_IMAGE = "unreadable_image"
NO_FACE = "no_face"
EMPTY_CAPTION = "empty_caption"
SOURCE_CHANGED = "source_changed"
# Quality filters (datamodules/quality.py): the sample decodes, but its measures fail a threshold.
FACE_MISSING = "face_missing"
FACE_TOO_SMALL = "face_too_small"
FACE_UNCERTAIN = "face_uncertain"
SEVERAL_FACES = "several_faces"
IDENTITY_MISMATCH = "identity_mismatch"
FACE_BLURRED = "face_blurred"
FACE_TOO_DARK = "face_too_dark"
FACE_TOO_BRIGHT = "face_too_bright"
SCENE_CUT = "scene_cut"
STATIC = "static"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"

SKIP_REASONS = (
    INVALID_MANIFEST_LINE,
    UNREADABLE_VIDEO,
    VIDEO_TOO_SHORT,
    UNREADABLE_IMAGE,
    NO_FACE,
    EMPTY_CAPTION,
    SOURCE_CHANGED,
    FACE_MISSING,
    FACE_TOO_SMALL,
    FACE_UNCERTAIN,
    SEVERAL_FACES,
    IDENTITY_MISMATCH,
    FACE_BLURRED,
    FACE_TOO_DARK,
    FACE_TOO_BRIGHT,
    SCENE_CUT,
    STATIC,
    CAPTION_TOO_SHORT,
    CAPTION_TOO_LONG,
)


class SkippedSample(Exception):
    """A sample that must be left out, with one of SKIP_REASONS and a human-readable detail."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Skipped(NamedTuple):
    """What a dataset returns in place of a sample it had to leave out."""

    reason: str
    sample_id: str
