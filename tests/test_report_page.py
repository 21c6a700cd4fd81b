"""The store's report page: self-contained, counts as in report.json, a histogram per
measure with its thresholds, contact sheets of kept and skipped samples, and what a
real browser makes of it."""

from __future__ import annotations

import json
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.quality import FILTERS, MEASURE_NAMES, QualityFilters, fails
from datamodules.report_page import TILE_GAP, TILE_HEIGHT, write_report_page
from datamodules.video_io import write_mp4
from browser_helpers import open_in_chromium, report_counts

ESCAPED_ID = "<b>odd & id</b>"


def moving_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Frames with a bright square moving left to right over a coloured ramp."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(40, 200, 3)
    ramp = np.linspace(0.5, 1.0, width)[None, :, None] * colour
    frames = np.broadcast_to(ramp, (num_frames, height, width, 3)).astype(np.uint8).copy()
    side = height // 3
    for index in range(num_frames):
        left = index * (width - side) // max(1, num_frames - 1)
        frames[index, side:2 * side, left:left + side] = 255
    return frames


def measures(**given) -> dict:
    """Measures of a plausible single-face sample; identity never measured (no reference embedding)."""
    base = {"face_area": 0.08, "face_score": 0.9, "face_count": 1, "face_sharpness": 150.0,
            "face_brightness": 120.0, "face_presence": 1.0, "identity_mean": None, "identity_min": None,
            "motion": 0.8, "scene_cut": 0.1, "caption_tokens": 12}
    return {name: given.get(name, base[name]) for name in MEASURE_NAMES}


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory) -> dict:
    """Real small clips and photos, stored samples with reasons from the default filters, and
    a report whose counts follow from them."""
    folder = tmp_path_factory.mktemp("report_inputs")
    square, wide = folder / "square.mp4", folder / "wide.mp4"
    write_mp4(square, moving_frames(9, 32, 32, seed=0), fps=8)
    write_mp4(wide, moving_frames(9, 48, 64, seed=1), fps=8)
    face = folder / "face.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(face)
    broken_face = folder / "broken.png"
    broken_face.write_bytes(b"not an image")
    missing = folder / "missing.mp4"

    filters = QualityFilters()
    stored = [  # (sample_id, video, face, bucket, measures)
        ("kept_square", square, face, "9x32x32", measures()),
        ("kept_wide", wide, None, "9x48x64", measures(face_area=0.2, caption_tokens=30)),
        (ESCAPED_ID, square, face, "9x32x32", measures(face_area=None, face_score=None, face_count=None,
                                                       face_sharpness=None, face_brightness=None,
                                                       face_presence=None)),
        ("small_face", wide, face, "9x48x64", measures(face_area=0.001)),
        ("still", square, broken_face, "9x32x32", measures(motion=0.0)),
        ("cut_and_gone", missing, face, "9x32x32", measures(scene_cut=0.9, face_count=2, face_area=0.01)),
    ]
    samples = []
    for line, (sample_id, video, face_image, bucket, values) in enumerate(stored, start=1):
        samples.append({"sample_id": sample_id, "line": line, "bucket": bucket, "video": str(video),
                        "face_image": str(face_image) if face_image else None, "window": [0, 1, 9],
                        "measures": values, "reason": filters.reason(values)})
    never_stored = [
        {"sample_id": "unreadable", "line": 7, "reason": "unreadable_video", "detail": f"cannot decode {missing}",
         "video": str(missing), "face_image": str(face)},
        {"sample_id": "faceless", "line": 8, "reason": "no_face", "detail": "no face in the photo",
         "video": str(wide), "face_image": str(face)},
        {"line": 9, "reason": "invalid_manifest_line", "detail": "line 9: not a JSON object"},
    ]
    filtered = [{"sample_id": s["sample_id"], "line": s["line"], "reason": s["reason"],
                 "detail": f"fails a threshold on {s['reason']}", "video": s["video"],
                 "face_image": s["face_image"], "bucket": s["bucket"], "window": s["window"]}
                for s in samples if s["reason"] is not None]
    skipped_samples = sorted(never_stored + filtered, key=lambda s: s["line"])
    thresholds = filters.thresholds()
    report = {
        "manifest": str(folder / "manifest.jsonl"),
        "store": str(folder / "store"),
        "samples_in_manifest": 9,
        "written": dict(Counter(s["bucket"] for s in samples)),
        "kept": {bucket: sum(s["bucket"] == bucket and s["reason"] is None for s in samples)
                 for bucket in dict.fromkeys(s["bucket"] for s in samples)},
        "skipped": dict(Counter(s["reason"] for s in skipped_samples)),
        "skipped_samples": skipped_samples,
        "captions_truncated": 1,
        "filters": thresholds,
        "would_keep": {item.setting: sum(not fails(item, thresholds[item.setting], s["measures"])
                                         for s in samples) for item in FILTERS},
        "complete": True,
        "parts_done": 2,
        "parts_total": 2,
        "face_pipeline": "version 2 (antelopev2, parsing on)",
    }
    store = folder / "store"
    store.mkdir()
    page = store / "report.html"
    write_report_page(page, report, samples, filters)
    (store / "report.json").write_text(json.dumps(report))
    return {"page": page, "report": report, "samples": samples, "filters": filters}


class PageParts(HTMLParser):
    """Images, links, scripts, figures and `data-count` cells of a page as written."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.image_sources: list[str] = []
        self.links: list[str] = []
        self.tags: Counter = Counter()
        self.figures: dict[str, dict] = {}
        self.counts: dict[str, str] = {}
        self.ids: set[str] = set()
        self._figure: str | None = None
        self._count: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags[tag] += 1
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "img":
            self.image_sources.append(attributes.get("src") or "")
        if tag in ("a", "link") and "href" in attributes:
            self.links.append(attributes["href"])
        if tag == "figure":
            self._figure = attributes["id"].removeprefix("measure-")
            self.figures[self._figure] = {"thresholds": attributes.get("data-thresholds", "").split(),
                                          "image": False, "text": ""}
        if tag == "img" and self._figure:
            self.figures[self._figure]["image"] = True
        if "data-count" in attributes:
            self._count = attributes["data-count"]
            self.counts[self._count] = ""

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None
        if tag == "td":
            self._count = None

    def handle_data(self, data):
        if self._figure:
            self.figures[self._figure]["text"] += data
        if self._count:
            self.counts[self._count] += data


def page_parts(page: Path) -> PageParts:
    parts = PageParts()
    parts.feed(page.read_text(encoding="utf-8"))
    return parts


def test_page_is_one_self_contained_file_written_atomically(report_inputs):
    page = report_inputs["page"]
    assert sorted(path.name for path in page.parent.iterdir()) == ["report.html", "report.json"]
    text = page.read_text(encoding="utf-8")
    assert 'src="http' not in text and 'href="http' not in text and "url(" not in text
    parts = page_parts(page)
    assert parts.image_sources and all(src.startswith("data:image/") for src in parts.image_sources)
    assert all(link.startswith("#") for link in parts.links)
    assert parts.tags["script"] == 0 and parts.tags["link"] == 0
    assert all(link[1:] in parts.ids for link in parts.links), "a link points at no section"


def test_header_names_store_state_and_pipeline(report_inputs):
    text = report_inputs["page"].read_text(encoding="utf-8")
    report = report_inputs["report"]
    assert report["store"] in text and report["manifest"] in text and report["face_pipeline"] in text
    assert "complete</span> (2/2 parts)" in text and "INCOMPLETE" not in text


def test_every_measure_has_a_histogram_with_its_thresholds_or_says_not_measured(report_inputs):
    figures = page_parts(report_inputs["page"]).figures
    thresholds = report_inputs["filters"].thresholds()
    assert list(figures) == list(MEASURE_NAMES)
    for name in ("identity_mean", "identity_min"):
        assert not figures[name]["image"] and "not measured" in figures[name]["text"]
    for name in set(MEASURE_NAMES) - {"identity_mean", "identity_min"}:
        drawn = [item.setting for item in FILTERS if item.measure == name and thresholds[item.setting] is not None]
        assert figures[name]["image"], name
        assert figures[name]["thresholds"] == drawn
        assert all(setting in figures[name]["text"] for setting in drawn)
    measured_face_area = sum(s["measures"]["face_area"] is not None for s in report_inputs["samples"])
    assert f"{measured_face_area} of 6 samples measured" in figures["face_area"]["text"]


def test_count_cells_equal_the_report(report_inputs):
    assert page_parts(report_inputs["page"]).counts == report_counts(report_inputs["report"])


def test_examples_show_kept_and_each_reason_with_escaped_text(report_inputs):
    text = report_inputs["page"].read_text(encoding="utf-8")
    parts = page_parts(report_inputs["page"])
    sections = {"examples-kept", *(f"examples-{reason}" for reason in report_inputs["report"]["skipped"])}
    assert sections <= parts.ids
    assert all(f'href="#{section}"' in text for section in sections - {"examples-kept"})
    # 9 histograms (11 measures, 2 not measured), and a row per example: 3 kept, 1 per reason.
    assert len(parts.image_sources) == 9 + 3 + len(report_inputs["report"]["skipped"])
    assert ESCAPED_ID not in text and "&lt;b&gt;odd &amp; id&lt;/b&gt;" in text
    assert "face_area 0.001" in text and '<span class="fail">motion 0</span>' in text


def example_row_sizes(page: Path) -> dict[str, tuple[int, int]]:
    """(width, height) of each example row's image, by sample id (from its alt text)."""
    import base64
    import html
    import io
    import re

    sizes = {}
    for source, alt in re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" alt="([^"]*)"', page.read_text()):
        with Image.open(io.BytesIO(base64.b64decode(source))) as image:
            sizes[html.unescape(alt).removeprefix("reference face and frames of ")] = image.size
    return sizes


def test_example_rows_hold_face_and_frames_or_grey_tiles(report_inputs):
    """Row widths tell the tiles apart: frames keep the video's aspect ratio at TILE_HEIGHT,
    the face photo (36 x 40) its own, and an unreadable file is a grey square."""
    face, square_frame, wide_frame, grey = 86, 96, 128, 96

    def row(*tiles):
        return sum(tiles) + TILE_GAP * (len(tiles) - 1), TILE_HEIGHT

    assert example_row_sizes(report_inputs["page"]) == {
        "kept_square": row(face, *[square_frame] * 4),
        "kept_wide": row(wide_frame, *[wide_frame] * 4),  # the face from the clip's middle frame
        ESCAPED_ID: row(face, *[square_frame] * 4),
        "small_face": row(face, *[wide_frame] * 4),
        "still": row(grey, *[square_frame] * 4),  # the photo cannot be read
        "cut_and_gone": row(face, grey),  # the video is gone
        "unreadable": row(face, grey),
        "faceless": row(face, *[wide_frame] * 4),  # no window: the video's first frames
        "a sample": row(grey, grey),  # an invalid manifest line names no files
    }


def test_page_without_filters_or_optional_keys(tmp_path):
    page = tmp_path / "report.html"
    write_report_page(page, {"complete": False, "parts_done": 1, "parts_total": 3}, [], None)
    text = page.read_text(encoding="utf-8")
    assert "INCOMPLETE</span> (1/3 parts)" in text and "No filtering" in text
    assert text.count("not measured") == len(MEASURE_NAMES)
    assert list(tmp_path.iterdir()) == [page]


def test_chromium_loads_every_image_and_shows_the_report_counts(report_inputs, tmp_path):
    report = json.loads((report_inputs["page"].parent / "report.json").read_text())
    screenshot = tmp_path / "report.png"
    seen = open_in_chromium(report_inputs["page"], screenshot=screenshot)
    assert len(seen["images"]) == len(page_parts(report_inputs["page"]).image_sources)
    assert all(image["loaded"] and image["width"] > 0 and image["height"] > 0 for image in seen["images"])
    assert seen["counts"] == report_counts(report)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histogram_bins_reach_the_thresholds_and_count_whole_numbers():
    from datamodules.report_page import _histogram_bins

    assert _histogram_bins([12, 30], [3]).tolist() == [edge - 0.5 for edge in range(3, 32)]
    fractions = _histogram_bins([1.0, 1.0, 1.0], [0.5])
    assert fractions[0] == 0.5 and fractions[-1] == 1.0 and len(fractions) > 2
