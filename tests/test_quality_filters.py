"""Quality filters end to end: clips that trip each filter for real, preprocessed with the tiny
face models, counted per reason in the report, skipped by training's loader and logged to
TensorBoard, and counted again with new thresholds by `--report-only`.

The tiny SCRFD sees a face in a bright square (lightning_modules/tiny_face_models.py); faces
here are squares with a coarse two-level pattern (which the tiny ArcFace tells apart: person
A's bright half is on the left, person B's on top) and a fine checker (so they are sharp).
Frames are 128x128 over dim noise that pans 2 px a frame, so clips move unless made still.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from browser_helpers import open_in_chromium, report_counts
from datamodules import batch as keys
from datamodules.errors import ExperimentError
from datamodules.feature_store import REPORT_FILE, REPORT_PAGE, FeatureStoreError, check_store_measured, \
    open_store_dataset
from datamodules.quality import MEASURE_NAMES, QualityFilters
from datamodules.skip_reasons import Skipped
from datamodules.video_io import write_mp4
from echovideo.cli import EchoVideoCLI, PreprocessCLI
from store_helpers import EXPERIMENT, store_overrides

FRAME = 128
NUM_FRAMES = 12
# The tiny ArcFace's scale: the same square pattern scores ~1.0 across frames, A against B ~0.5
# (real ArcFace: 0.4-0.8 same person, below 0.2 two people; hence the default 0.3).
TINY_IDENTITY_THRESHOLD = 0.8
BUCKET = "9x32x32"

EXPECTED_REASONS = {
    "clean": None,
    "small": "face_too_small",
    "two": "several_faces",
    "other_person": "identity_mismatch",
    "cut": "scene_cut",
    "still": "static",
    "terse": "caption_too_short",
}


def face_square(side: int, person: str) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side]
    half = x < side // 2 if person == "A" else y < side // 2
    value = np.where(half, 255, 160) - ((x // 2 + y // 2) % 2) * 16
    return np.repeat(value.astype(np.uint8)[..., None], 3, axis=-1)


def frame(faces, shift: int = 0, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A 128x128 frame: noise panned by `shift` px, tinted, with faces (centre x, centre y, side, person)."""
    noise = np.random.default_rng(0).integers(0, 50, (FRAME, 2 * FRAME, 3))[:, shift:shift + FRAME]
    image = (noise * np.asarray(tint)).clip(0, 255).astype(np.uint8)
    for cx, cy, side, person in faces:
        image[cy - side // 2:cy + side // 2, cx - side // 2:cx + side // 2] = face_square(side, person)
    return image


def clip(faces, still: bool = False, cut_at: int | None = None) -> np.ndarray:
    frames = []
    for index in range(NUM_FRAMES):
        tint = (3.0, 0.3, 0.3) if cut_at is not None and index >= cut_at else (1.0, 1.0, 1.0)
        frames.append(frame(faces, shift=0 if still else 2 * index, tint=tint))
    return np.stack(frames)


def write_filter_dataset(folder: Path) -> Path:
    """Seven clips, each with person A's photo: one clean, each other one tripping one filter."""
    (folder / "clips").mkdir(parents=True)
    Image.fromarray(frame([(64, 64, 32, "A")])).save(folder / "person_a.png")
    person_a = [(64, 64, 32, "A")]
    clips = {
        "clean": clip(person_a),
        "small": clip([(64, 64, 8, "A")]),  # 0.4 % of the frame, below min_face_area 0.5 %
        "two": clip([(36, 64, 32, "A"), (96, 64, 32, "B")]),
        "other_person": clip([(64, 64, 32, "B")]),
        "cut": clip(person_a, cut_at=6),  # every 9-frame window of 12 frames holds frame 6
        "still": clip(person_a, still=True),
        "terse": clip(person_a),
    }
    lines = []
    for name, frames in clips.items():
        write_mp4(folder / "clips" / f"{name}.mp4", frames, 8)
        caption = "smiles" if name == "terse" else f"a person talks to the camera, take {name}"
        lines.append({"id": name, "video": f"clips/{name}.mp4", "caption": caption, "face_image": "person_a.png"})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return manifest


def filter_overrides(release, face_root, manifest, store, run) -> list[str]:
    overrides = [o for o in store_overrides(release, manifest, store, run) if not o.startswith("--data.init_args.filters")]
    return overrides + [f"--data.init_args.face_models={face_root}", "--data.init_args.face_size=64",
                        f"--data.init_args.filters.min_identity_mean={TINY_IDENTITY_THRESHOLD}"]


@pytest.fixture(scope="module")
def filtered(tiny_release, face_root, tmp_path_factory):
    """(folder, overrides, store, report) of the seven clips preprocessed once."""
    folder = tmp_path_factory.mktemp("filters")
    manifest = write_filter_dataset(folder)
    store = folder / "store"
    overrides = filter_overrides(tiny_release, face_root, manifest, store, folder / "run")
    report = PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides]).run_preprocess()
    return folder, overrides, store, report


def reasons_in(report: dict) -> dict:
    return {s["sample_id"]: s["reason"] for s in report["skipped_samples"]}


def test_each_filter_drops_its_clip_with_its_reason_and_the_clean_clip_passes(filtered):
    _, _, store, report = filtered
    assert report.complete and report.written == {BUCKET: 7}  # every clip is encoded, filtered or not
    assert report.kept == {BUCKET: 1}
    expected = {name: reason for name, reason in EXPECTED_REASONS.items() if reason is not None}
    assert report.skipped == {reason: 1 for reason in expected.values()}
    on_disk = json.loads((store / REPORT_FILE).read_text())
    assert reasons_in(on_disk) == expected
    assert on_disk["skipped"] == report.skipped and on_disk["kept"] == report.kept
    assert on_disk["filters"]["min_identity_mean"] == TINY_IDENTITY_THRESHOLD
    # Each detail names the measure, its value and the threshold it failed.
    details = {s["sample_id"]: s["detail"] for s in on_disk["skipped_samples"]}
    assert details["still"].startswith("motion ") and "data.filters.min_motion 0.05" in details["still"]
    assert "data.filters.max_faces 1" in details["two"]
    # Each threshold alone: min_motion keeps all but the still clip; max_faces all but two.
    assert on_disk["would_keep"]["min_motion"] == 6 and on_disk["would_keep"]["max_faces"] == 6
    assert (store / REPORT_PAGE).is_file()


def test_the_report_page_renders_in_a_browser_with_the_report_counts(filtered, tmp_path):
    """report.html of the real run: every image loads in headless Chromium and every count
    it shows is report.json's; the examples show each reason's clip."""
    _, _, store, _ = filtered
    report = json.loads((store / REPORT_FILE).read_text())
    seen = open_in_chromium(store / REPORT_PAGE, screenshot=tmp_path / "report.png")
    assert len(seen["images"]) >= len(MEASURE_NAMES) + 7  # a histogram per measure, a row per clip
    assert all(image["loaded"] and image["width"] > 0 for image in seen["images"])
    assert seen["counts"] == report_counts(report)
    # Each clip is an example in its reason's section (the clean one among the kept).
    page = (store / REPORT_PAGE).read_text(encoding="utf-8")
    sections = {part.split('"', 1)[0]: part for part in page.split('<h3 id="examples-')[1:]}
    for name, reason in EXPECTED_REASONS.items():
        assert name in sections[reason or "kept"], (name, reason)


def test_the_measures_are_stored_with_each_sample(filtered):
    _, _, store, _ = filtered
    records = {}
    dataset = open_store_dataset(store, shuffle=False, seed=0)
    for index in range(len(dataset)):
        record = super(type(dataset), dataset).__getitem__(index)
        records[record[keys.SAMPLE_ID]] = json.loads(record["quality"])
    assert set(records) == set(EXPECTED_REASONS)
    clean = records["clean"]
    assert list(clean) == list(MEASURE_NAMES)
    assert clean["face_presence"] == 1.0 and clean["face_count"] == 1
    assert clean["identity_mean"] > 0.95 and records["other_person"]["identity_mean"] < 0.7
    assert 0.05 < clean["face_area"] < 0.08  # a 32 px square in a 128 px frame: 6.25 %
    assert records["small"]["face_area"] < 0.005
    assert records["two"]["face_count"] >= 2
    assert records["cut"]["scene_cut"] > 0.5 > clean["scene_cut"]
    assert records["still"]["motion"] < 0.05 < clean["motion"]
    assert clean["face_sharpness"] > 10 and 25 < clean["face_brightness"] < 235


def test_training_skips_the_filtered_samples_with_their_reasons(filtered):
    _, _, store, _ = filtered
    filters = QualityFilters(min_identity_mean=TINY_IDENTITY_THRESHOLD)
    dataset = open_store_dataset(store, shuffle=False, seed=0, filters=filters)
    seen = [dataset[index] for index in range(len(dataset))]
    skipped = {item.sample_id: item.reason for item in seen if isinstance(item, Skipped)}
    assert skipped == {name: reason for name, reason in EXPECTED_REASONS.items() if reason is not None}
    assert [item[keys.SAMPLE_ID] for item in seen if not isinstance(item, Skipped)] == ["clean"]
    # Relaxed at fit, without re-encoding: no filters, every stored sample.
    unfiltered = open_store_dataset(store, shuffle=False, seed=0, filters=None)
    assert not any(isinstance(unfiltered[i], Skipped) for i in range(len(unfiltered)))


def test_fit_logs_each_filter_reason_to_tensorboard(filtered, monkeypatch):
    folder, overrides, _, _ = filtered
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    run = folder / "fit_run"
    fit_overrides = [o.replace(str(folder / "run"), str(run)) for o in overrides if not o.startswith("--preprocess.")]
    EchoVideoCLI(args=["fit", "--config", str(EXPERIMENT), *fit_overrides, "--data.init_args.batch_size=7",
                       "--data.init_args.num_workers=0", "--trainer.max_steps=1"])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {tag.removeprefix("data/skipped/"): events.Scalars(tag)[-1].value
              for tag in events.Tags()["scalars"] if tag.startswith("data/skipped/")}
    for reason in filter(None, EXPECTED_REASONS.values()):
        assert logged[reason] == 1.0, reason


def test_report_only_counts_new_thresholds_without_encoding(filtered, capsys):
    _, overrides, store, _ = filtered
    chunks_before = {p: p.stat().st_mtime_ns for p in store.rglob("*.bin")}
    relaxed = overrides + ["--report-only", "--data.init_args.filters.min_motion=0.0",
                           "--data.init_args.filters.max_faces=9"]
    report = PreprocessCLI(args=["--config", str(EXPERIMENT), *relaxed]).run_preprocess()
    printed = capsys.readouterr().out
    assert report.kept == {BUCKET: 2}  # the still clip is kept again
    # The two-face clip passes max_faces now, and is caught by the next threshold it fails: its
    # largest face is not always the photo's person.
    assert reasons_in(dataclasses.asdict(report)) == {
        "small": "face_too_small", "two": "identity_mismatch", "other_person": "identity_mismatch",
        "cut": "scene_cut", "terse": "caption_too_short"}
    on_disk = json.loads((store / REPORT_FILE).read_text())
    assert on_disk["kept"] == {BUCKET: 2} and on_disk["filters"]["min_motion"] == 0.0
    assert "min_motion" in printed and "keeps 7" in printed  # every clip moves at least 0
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.bin")} == chunks_before  # nothing encoded
    # Back to the experiment's thresholds for the other tests.
    PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides, "--report-only"]).run_preprocess()


def test_filtered_samples_can_be_left_out_of_the_store(filtered):
    """--preprocess.encode_filtered false: every clip is measured and counted, only the clean one
    is encoded; the others keep their reason, detail and window for the report's examples."""
    folder, overrides, _, _ = filtered
    store = folder / "store_kept_only"
    overrides = [o.replace(str(folder / "store"), str(store)) for o in overrides]
    report = PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides,
                                 "--preprocess.encode_filtered=false"]).run_preprocess()
    expected = {name: reason for name, reason in EXPECTED_REASONS.items() if reason is not None}
    assert report.written == {BUCKET: 1} and report.kept == {BUCKET: 1}
    on_disk = json.loads((store / REPORT_FILE).read_text())
    assert reasons_in(on_disk) == expected
    left_out = {s["sample_id"]: s for s in on_disk["skipped_samples"]}
    assert not any(s["in_store"] for s in left_out.values())
    assert "data.filters.min_motion" in left_out["still"]["detail"] and left_out["still"]["window"][2] == 9
    dataset = open_store_dataset(store, shuffle=False, seed=0)
    assert [dataset[i][keys.SAMPLE_ID] for i in range(len(dataset))] == ["clean"]
    meta = json.loads((store / "store.json").read_text())
    assert meta["dropped_by_filters"]["min_identity_mean"] == TINY_IDENTITY_THRESHOLD
    page = (store / REPORT_PAGE).read_text(encoding="utf-8")
    assert all(f'id="examples-{reason}"' in page for reason in expected.values())
    # The histograms still show every clip's measures, the left-out ones too.
    assert page.count("7 of 7 samples measured") == len(MEASURE_NAMES)


def test_filters_need_a_store_with_measures(filtered):
    _, _, store, _ = filtered
    meta = json.loads((store / "store.json").read_text())
    check_store_measured(store, meta)
    with pytest.raises(FeatureStoreError, match=r"(?s)store\.json: the store holds no quality measures.*filters null"):
        check_store_measured(store, {**meta, "measures": None})


@pytest.mark.parametrize("setting, value, message", [
    ("min_face_area", 2.0, "data.filters.min_face_area is a fraction"),
    ("min_motion", -1.0, "data.filters.min_motion must be >= 0"),
    ("max_faces", "two", "data.filters.max_faces must be a number or null"),
])
def test_a_bad_threshold_is_refused_naming_it(setting, value, message):
    with pytest.raises(ExperimentError, match=message):
        QualityFilters(**{setting: value})
