"""Per-sample quality measures, made during `echovideo preprocess`, and the filters that read them.

Identity-preserving training needs clips in which the photo's person is plainly seen: one
face, large and sharp enough, the same person as the photo, in one shot, moving. Each
sample's measures are computed once, on the frames of its training window that
preprocessing decodes anyway and with the face models it already loads, and stored with
the sample (the store's records and its preprocess logs), so thresholds can change later
without encoding anything again: `echovideo preprocess --report-only` re-applies them to
the report, and `fit` re-applies the experiment's `data.filters` to the stored samples.

A filtered sample is still encoded into the store (so a relaxed threshold needs no
re-encoding; `--preprocess.encode_filtered false` leaves it out instead); training skips it
with its reason, counted as `data/skipped/<reason>` like every other skip, and the
preprocess report counts it per reason.

How each measure is made (`FACE_FRAMES` frames spread over the window for the face and
identity measures, the window's frames for the video ones):

- face_area: the largest face's box area over the frame's area (median over the frames
  with a face). face_score: its detection score (median). face_count: the most faces
  seen in one frame, counting only faces whose box side is at least `COUNTED_FACE_SIDE`
  of the largest's (a crowd far behind the speaker is not "several faces").
- face_sharpness: variance of the Laplacian of the largest face's box, in grey, resized
  to 112x112 so that it does not depend on the face's size (median). face_brightness:
  that crop's mean grey level, 0-255 (median).
- face_presence: the fraction of those frames in which the detector finds a face.
  identity_mean / identity_min: cosine similarity of the sample's reference ArcFace
  embedding with the largest face's ArcFace embedding in each frame with a face; the
  embeddings of all frames are computed in one batch.
- motion: OpenCV's Farneback optical flow between consecutive window frames, in grey at
  `VIDEO_MEASURE_WIDTH` pixels wide; the mean flow length in percent of the frame width per
  window step, averaged over `FLOW_PAIRS` pairs spread over the window. Dense flow rather
  than a frame difference because a difference also rises with flicker, noise and lighting
  while the picture stands still; flow at this width costs about 1.4 ms a pair on one CPU
  core, so a few pairs, not all 48 of a 49-frame window.
- scene_cut: the largest Bhattacharyya distance (0 same, 1 disjoint) between the HSV
  colour histograms of consecutive window frames, over every pair (a cut can fall between
  any two). A histogram hardly changes when people or the camera move within one shot and
  jumps at a cut to another scene. (PySceneDetect was considered: it declares
  `opencv-python` as a dependency, which would install a second OpenCV beside the kit's
  headless one.) A cut between two shots of the same colours, say two angles of one
  studio, is not seen; nor is a fade slower than the window's steps.
- caption_tokens: the caption's length in T5 tokens, the end token included, before the
  text encoder's limit cuts it.

Without face models (`data.face_models` unset) the face and identity measures are not
made (None), and the filters on them let every sample through.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from datamodules.errors import ExperimentError
from datamodules.skip_reasons import (
    CAPTION_TOO_LONG,
    CAPTION_TOO_SHORT,
    FACE_BLURRED,
    FACE_MISSING,
    FACE_TOO_BRIGHT,
    FACE_TOO_DARK,
    FACE_TOO_SMALL,
    FACE_UNCERTAIN,
    IDENTITY_MISMATCH,
    SCENE_CUT,
    SEVERAL_FACES,
    STATIC,
)

# Bumped whenever a change here changes a stored measure; stores record it.
MEASURES_VERSION = 1
FACE_FRAMES = 4
FLOW_PAIRS = 8
VIDEO_MEASURE_WIDTH = 128
COUNTED_FACE_SIDE = 0.5
FACE_MEASURE_SIZE = 112
HISTOGRAM_BINS = (16, 8, 4)  # hue, saturation, value


@dataclass(frozen=True)
class Measure:
    name: str
    unit: str
    meaning: str


MEASURES = (
    Measure("face_area", "fraction of the frame", "largest face's box area / frame area"),
    Measure("face_score", "0-1", "detection score of the largest face"),
    Measure("face_count", "faces", "most faces in one frame (of at least half the largest's side)"),
    Measure("face_sharpness", "Laplacian variance", "sharpness of the largest face at 112x112"),
    Measure("face_brightness", "0-255", "mean grey level of the largest face"),
    Measure("face_presence", "fraction of frames", "frames of the window in which a face is found"),
    Measure("identity_mean", "cosine", "ArcFace similarity of the reference face to the clip's face, mean"),
    Measure("identity_min", "cosine", "ArcFace similarity of the reference face to the clip's face, lowest"),
    Measure("motion", "% of width per step", "mean optical-flow length between window frames"),
    Measure("scene_cut", "0-1", "largest colour-histogram distance between consecutive window frames"),
    Measure("caption_tokens", "T5 tokens", "caption length before the text encoder's limit"),
)
MEASURE_NAMES = tuple(measure.name for measure in MEASURES)


@dataclass(frozen=True)
class Filter:
    """One threshold: samples whose `measure` is below (`bound="min"`) or above ("max") it are skipped."""

    setting: str
    measure: str
    bound: str
    reason: str


# In the order a sample's reason is chosen: the first threshold it fails names it.
FILTERS = (
    Filter("min_face_presence", "face_presence", "min", FACE_MISSING),
    Filter("min_face_area", "face_area", "min", FACE_TOO_SMALL),
    Filter("min_face_score", "face_score", "min", FACE_UNCERTAIN),
    Filter("max_faces", "face_count", "max", SEVERAL_FACES),
    Filter("min_identity_mean", "identity_mean", "min", IDENTITY_MISMATCH),
    Filter("min_identity_min", "identity_min", "min", IDENTITY_MISMATCH),
    Filter("min_face_sharpness", "face_sharpness", "min", FACE_BLURRED),
    Filter("min_face_brightness", "face_brightness", "min", FACE_TOO_DARK),
    Filter("max_face_brightness", "face_brightness", "max", FACE_TOO_BRIGHT),
    Filter("max_scene_cut", "scene_cut", "max", SCENE_CUT),
    Filter("min_motion", "motion", "min", STATIC),
    Filter("min_caption_tokens", "caption_tokens", "min", CAPTION_TOO_SHORT),
    Filter("max_caption_tokens", "caption_tokens", "max", CAPTION_TOO_LONG),
)


@dataclass
class QualityFilters:
    """Thresholds on the stored measures (`data.filters.*`); None turns one off.

    The defaults only drop samples that are unusable for identity-preserving training
    whatever the dataset; tighten them after looking at `<store>/report.html`.

    Args:
        min_face_presence: Fraction of the sampled window frames that must show a face;
            0.5 drops clips in which the person is mostly out of view or turned away.
        min_face_area: Smallest largest-face box, as a fraction of the frame's area; 0.005 is
            a 45 px face in a 480x848 frame, about as small as ArcFace still recognises.
        min_face_score: Lowest detection score of the largest face (the detector keeps faces
            from 0.5); 0.6 drops the doubtful ones.
        max_faces: Most faces in one frame (counting faces of at least half the largest's
            side): 1 keeps single-person clips, where the reference face is unambiguous.
        min_identity_mean: Lowest mean ArcFace cosine between the reference face and the
            clip's face. The same person across photos typically scores 0.4-0.8 and two
            people below 0.2, so 0.3 drops clips of somebody else.
        min_identity_min: Lowest cosine in any sampled frame (None: off); catches a clip
            that changes person part-way.
        min_face_sharpness: Lowest Laplacian variance of the face at 112x112; 10 drops only
            faces blurred past recognition (sharp faces score in the hundreds).
        min_face_brightness: Darkest face allowed, mean grey 0-255.
        max_face_brightness: Brightest face allowed, mean grey 0-255.
        max_scene_cut: Largest histogram distance between consecutive window frames; 0.5
            is well above what motion within a shot gives and below a cut to another scene.
        min_motion: Least motion, percent of the frame width per window step; 0.05 drops
            frozen frames and still images only.
        min_caption_tokens: Shortest caption in T5 tokens (the end token included); 3 drops
            empty-like captions of one word.
        max_caption_tokens: Longest caption in T5 tokens (None: off; longer captions are cut
            to the text encoder's limit and counted in the report).
    """

    min_face_presence: float | None = 0.5
    min_face_area: float | None = 0.005
    min_face_score: float | None = 0.6
    max_faces: int | None = 1
    min_identity_mean: float | None = 0.3
    min_identity_min: float | None = None
    min_face_sharpness: float | None = 10.0
    min_face_brightness: float | None = 25.0
    max_face_brightness: float | None = 235.0
    max_scene_cut: float | None = 0.5
    min_motion: float | None = 0.05
    min_caption_tokens: int | None = 3
    max_caption_tokens: int | None = None

    def __post_init__(self):
        problems = []
        for item in FILTERS:
            value = getattr(self, item.setting)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"data.filters.{item.setting} must be a number or null, got {value!r}")
            elif value < 0:
                problems.append(f"data.filters.{item.setting} must be >= 0 (or null to turn it off), got {value}")
            elif item.measure in _FRACTIONS and value > 1:
                problems.append(f"data.filters.{item.setting} is a fraction (0-1), got {value}")
        if problems:
            raise ExperimentError("; ".join(problems))

    def thresholds(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)

    def failures(self, measures: dict) -> list[str]:
        """Each threshold `measures` fail, as text: `motion 0.0004 < data.filters.min_motion 0.05`."""
        return [f"{item.measure} {measures[item.measure]:.4g} {'<' if item.bound == 'min' else '>'} "
                f"data.filters.{item.setting} {getattr(self, item.setting)}"
                for item in FILTERS if fails(item, getattr(self, item.setting), measures)]

    def reason(self, measures: dict) -> str | None:
        """The first threshold `measures` fail, as a skip reason; None when it passes every one."""
        for item in FILTERS:
            if fails(item, getattr(self, item.setting), measures):
                return item.reason
        return None


_FRACTIONS = ("face_area", "face_score", "face_presence", "scene_cut")


def fails(item: Filter, threshold, measures: dict) -> bool:
    """Whether one threshold drops a sample; an unset threshold or an unmeasured value drops nothing."""
    value = measures.get(item.measure)
    if threshold is None or value is None:
        return False
    return value < threshold if item.bound == "min" else value > threshold


def filters_from(value) -> QualityFilters | None:
    """`data.filters` as given (a QualityFilters, a mapping from YAML, or None for no filtering)."""
    if value is None or isinstance(value, QualityFilters):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(QualityFilters)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ExperimentError(f"data.filters: unknown setting(s) {unknown}; known: {sorted(known)}")
        return QualityFilters(**value)
    raise ExperimentError(f"data.filters must be a mapping of thresholds or null, got {value!r}")


# ---------------------------------------------------------------------------- measuring
def video_measures(frames: np.ndarray) -> dict[str, float]:
    """motion and scene_cut of F x H x W x 3 uint8 RGB window frames (see the module docstring)."""
    small = [_downscale(frame) for frame in frames]
    histograms = [_hsv_histogram(frame) for frame in small]
    distances = [float(cv2.compareHist(histograms[i - 1], histograms[i], cv2.HISTCMP_BHATTACHARYYA))
                 for i in range(1, len(small))]
    width = small[0].shape[1]
    flows = []
    for index in flow_pair_ends(len(small)):
        before, after = (cv2.cvtColor(small[i], cv2.COLOR_RGB2GRAY) for i in (index - 1, index))
        flow = cv2.calcOpticalFlowFarneback(before, after, None, pyr_scale=0.5, levels=3, winsize=15,
                                            iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
        flows.append(float(np.linalg.norm(flow, axis=-1).mean()) / width * 100.0)
    return {"motion": float(np.mean(flows)) if flows else 0.0,
            "scene_cut": float(max(distances)) if distances else 0.0}


def flow_pair_ends(num_frames: int) -> list[int]:
    """The second frames of the consecutive pairs whose flow makes `motion`: FLOW_PAIRS spread evenly."""
    if num_frames < 2:
        return []
    count = min(FLOW_PAIRS, num_frames - 1)
    return sorted({int(round(i)) for i in np.linspace(1, num_frames - 1, count)})


def _downscale(frame: np.ndarray) -> np.ndarray:
    """A frame at VIDEO_MEASURE_WIDTH wide: every k-th pixel down to about twice that width (a
    large frame costs nothing to skip through), then area-averaged the rest of the way."""
    height, width = frame.shape[:2]
    if width <= VIDEO_MEASURE_WIDTH:
        return np.ascontiguousarray(frame)
    step = max(1, width // (2 * VIDEO_MEASURE_WIDTH))
    frame = np.ascontiguousarray(frame[::step, ::step])
    size = (VIDEO_MEASURE_WIDTH, max(1, round(height * VIDEO_MEASURE_WIDTH / width)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _hsv_histogram(frame: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)
    histogram = cv2.calcHist([hsv], [0, 1, 2], None, list(HISTOGRAM_BINS), [0, 180, 0, 256, 0, 256])
    return cv2.normalize(histogram, histogram, alpha=1.0, norm_type=cv2.NORM_L1)


def face_frame_indices(num_frames: int) -> list[int]:
    """The window frames the face and identity measures look at: FACE_FRAMES spread evenly."""
    count = min(FACE_FRAMES, num_frames)
    return sorted({int(round(i)) for i in np.linspace(0, num_frames - 1, count)})


def face_crop_measures(rgb: np.ndarray, bbox: Sequence[float]) -> tuple[float, float]:
    """(sharpness, brightness) of the face in box x1, y1, x2, y2 of an RGB frame."""
    height, width = rgb.shape[:2]
    x1, y1 = max(0, int(math.floor(bbox[0]))), max(0, int(math.floor(bbox[1])))
    x2, y2 = min(width, int(math.ceil(bbox[2]))), min(height, int(math.ceil(bbox[3])))
    if x2 <= x1 or y2 <= y1:
        return 0.0, 0.0
    grey = cv2.cvtColor(np.ascontiguousarray(rgb[y1:y2, x1:x2]), cv2.COLOR_RGB2GRAY)
    grey = cv2.resize(grey, (FACE_MEASURE_SIZE, FACE_MEASURE_SIZE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var()), float(grey.mean())


def face_measures(frames: np.ndarray, reference_arcface: np.ndarray | None, extractor) -> dict:
    """The face and identity measures of window frames (F x H x W x 3 uint8 RGB), with a
    FaceExtractor's detector and recogniser; all None without an extractor."""
    empty = {name: None for name in ("face_area", "face_score", "face_count", "face_sharpness",
                                     "face_brightness", "face_presence", "identity_mean", "identity_min")}
    if extractor is None:
        return empty
    sampled = [np.asarray(frames[i]) for i in face_frame_indices(len(frames))]
    found = extractor.largest_faces(sampled, counted_side=COUNTED_FACE_SIDE)
    seen = [(frame, faces) for frame, faces in zip(sampled, found) if faces is not None]
    measures = dict(empty, face_presence=len(seen) / len(sampled))
    if not seen:
        return measures
    areas, scores, counts, sharpness, brightness = [], [], [], [], []
    for frame, faces in seen:
        height, width = frame.shape[:2]
        x1, y1, x2, y2 = faces.bbox
        areas.append(max(0.0, x2 - x1) * max(0.0, y2 - y1) / (height * width))
        scores.append(faces.score)
        counts.append(faces.count)
        sharp, bright = face_crop_measures(frame, faces.bbox)
        sharpness.append(sharp)
        brightness.append(bright)
    measures.update(face_area=float(np.median(areas)), face_score=float(np.median(scores)),
                    face_count=int(max(counts)), face_sharpness=float(np.median(sharpness)),
                    face_brightness=float(np.median(brightness)))
    if reference_arcface is not None:
        reference = np.asarray(reference_arcface, dtype=np.float64).reshape(-1)
        similarities = [cosine(reference, faces.embedding) for _, faces in seen]
        measures.update(identity_mean=float(np.mean(similarities)), identity_min=float(np.min(similarities)))
    return measures


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else 0.0


def measure_sample(frames: np.ndarray, reference_arcface: np.ndarray | None, caption_tokens: int,
                   extractor=None) -> dict:
    """Every measure of one sample, in MEASURES order, as plain JSON numbers (or None)."""
    frames = np.asarray(frames)
    measures = {**face_measures(frames, reference_arcface, extractor), **video_measures(frames),
                "caption_tokens": int(caption_tokens)}
    return {name: measures[name] for name in MEASURE_NAMES}
