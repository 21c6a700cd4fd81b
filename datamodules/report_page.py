"""`<store>/report.html`: the preprocess report as one page to look at before training.

The page is one self-contained file (histograms and example frames are embedded as data:
URIs, no scripts, no external resources) so it can be copied off a cluster and opened
anywhere. It shows the counts of `report.json`, a histogram of every quality measure with
the thresholds in use drawn on it, and contact sheets of kept and skipped samples: the
reference face beside frames spread over the training window, which is what a threshold
should be tuned against.

Every count is in a cell marked `data-count="<key>"` (`written/<bucket>`, `kept/<bucket>`,
`skipped/<reason>`, `would_keep/<setting>`, `samples_in_manifest`, `captions_truncated`,
`total/written`, `total/kept`, `total/skipped`) so that tests can compare it with the report.
"""

from __future__ import annotations

import base64
import datetime
import io
import math
from html import escape
from pathlib import Path

import numpy as np

from datamodules.files import write_text_atomically
from datamodules.quality import FILTERS, MEASURES, Measure, QualityFilters, fails

KEPT_EXAMPLES = 4
EXAMPLES_PER_REASON = 3
FRAMES_PER_EXAMPLE = 4
TILE_HEIGHT = 96
TILE_MAX_WIDTH = 2 * TILE_HEIGHT  # a very wide frame is squeezed rather than widening the row
TILE_GAP = 4
LABEL_BAND = 13
EXAMPLE_JPEG_QUALITY = 85
HISTOGRAM_SIZE_INCHES = (4.0, 2.5)
HISTOGRAM_DPI = 80
HISTOGRAM_MAX_BINS = 30
PROGRESS_FROM_ROWS = 8  # fewer example rows than this are drawn without a progress bar
FACE_FROM_CLIP = "face from the clip"
UNREADABLE = "could not be read"
KEPT = "kept"


def write_report_page(path: Path, report: dict, samples: list[dict], filters: QualityFilters | None) -> None:
    """Write the report page of a store to `path` (atomically).

    Args:
        path: Where the page goes, normally `<store>/report.html`.
        report: What is also written as `report.json` (missing keys are shown as absent).
        samples: Every measured sample (the stored ones, and those the filters kept out of the
            store at preprocess, `in_store: False`): `sample_id`, `line`, `bucket`, `video`, `face_image`
            (None: the reference face came from a frame of the clip), `window`
            ([start_frame, frame_stride, num_frames]), `measures` and `reason` (None if kept).
        filters: The thresholds in use, or None when nothing is filtered.
    """
    write_text_atomically(Path(path), report_page_html(report, samples, filters))


def report_page_html(report: dict, samples: list[dict], filters: QualityFilters | None) -> str:
    """The whole page as one string (see `write_report_page`)."""
    examples = _examples_by_section(report, samples)
    body = "\n".join([
        _header(report),
        _navigation(examples),
        _counts_section(report, examples),
        _thresholds_section(report, filters),
        _measures_section(samples, filters),
        _examples_section(examples, filters),
    ])
    title = f"Preprocess report: {report.get('store', '')}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
td.number, th.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
dl.header dt { font-weight: bold; } dl.header dd { margin: 0; }
.incomplete { color: #b00; font-weight: bold; }
.complete { color: #070; font-weight: bold; }
.histograms { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #555; max-width: 320px; }
.not-measured { color: #777; font-style: italic; }
.example { display: flex; gap: 12px; align-items: flex-start; margin: 8px 0; }
.about { font-size: 0.85em; max-width: 520px; overflow-wrap: anywhere; }
.fail { color: #b00; font-weight: bold; }
code { font-size: 0.9em; }
"""


# ------------------------------------------------------------------------------- header
def _header(report: dict) -> str:
    done, total = report.get("parts_done"), report.get("parts_total")
    parts = f"{done}/{total} parts" if done is not None and total is not None else "parts unknown"
    state = (f'<span class="complete">complete</span> ({parts})' if report.get("complete")
             else f'<span class="incomplete">INCOMPLETE</span> ({parts})')
    written_at = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    rows = [("store", f"<code>{escape(str(report.get('store', '')))}</code>"),
            ("manifest", f"<code>{escape(str(report.get('manifest', '')))}</code>"),
            ("state", state),
            ("face pipeline", escape(str(report.get("face_pipeline") or "not recorded"))),
            ("written", escape(written_at))]
    items = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows)
    return f'<h1>Preprocess report</h1>\n<dl class="header">{items}</dl>'


def _navigation(examples: list[tuple[str, list[dict]]]) -> str:
    links = ['<a href="#counts">counts</a>', '<a href="#thresholds">thresholds</a>',
             '<a href="#measures">measures</a>']
    links += [f'<a href="#{escape(_examples_anchor(name))}">{escape(name)}</a>' for name, _ in examples]
    return f"<p>{' · '.join(links)}</p>"


# ------------------------------------------------------------------------------- counts
def _count_cell(key: str, value) -> str:
    """A table cell holding one count of the report, marked for machines; absent counts show a dash."""
    if value is None:
        return '<td class="number">—</td>'
    return f'<td class="number" data-count="{escape(key)}">{escape(str(value))}</td>'


def _counts_section(report: dict, examples: list[tuple[str, list[dict]]]) -> str:
    return "\n".join(['<h2 id="counts">Counts</h2>',
                      _totals_table(report),
                      _buckets_table(report),
                      _skipped_table(report, examples)])


def _totals_table(report: dict) -> str:
    rows = [("samples in the manifest", _count_cell("samples_in_manifest", report.get("samples_in_manifest"))),
            ("captions cut to the text encoder's limit",
             _count_cell("captions_truncated", report.get("captions_truncated")))]
    body = "".join(f"<tr><th>{name}</th>{cell}</tr>" for name, cell in rows)
    return f"<table>{body}</table>"


def _buckets_table(report: dict) -> str:
    written = dict(report.get("written") or {})
    kept = dict(report.get("kept") or {})
    buckets = list(dict.fromkeys([*written, *kept]))
    rows = [f"<tr><td>{escape(str(bucket))}</td>"
            f"{_count_cell(f'written/{bucket}', written.get(bucket))}"
            f"{_count_cell(f'kept/{bucket}', kept.get(bucket))}</tr>" for bucket in buckets]
    rows.append(f'<tr class="total"><td>total</td>{_count_cell("total/written", sum(written.values()))}'
                f'{_count_cell("total/kept", sum(kept.values()))}</tr>')
    return ('<h3>Stored samples per bucket</h3>\n<table><tr><th>bucket</th><th class="number">written</th>'
            f'<th class="number">kept by the filters</th></tr>{"".join(rows)}</table>')


def _skipped_table(report: dict, examples: list[tuple[str, list[dict]]]) -> str:
    skipped = dict(report.get("skipped") or {})
    with_examples = {name for name, _ in examples}
    settings_of = _settings_per_reason()
    rows = []
    for reason, count in skipped.items():
        name = escape(str(reason))
        if reason in with_examples:
            name = f'<a href="#{escape(_examples_anchor(reason))}">{name}</a>'
        settings = ", ".join(settings_of.get(reason, []))
        rows.append(f"<tr><td>{name}</td>{_count_cell(f'skipped/{reason}', count)}"
                    f"<td>{escape(settings)}</td></tr>")
    rows.append(f'<tr class="total"><td>total</td>{_count_cell("total/skipped", sum(skipped.values()))}'
                "<td></td></tr>")
    return ('<h3>Skipped samples per reason</h3>\n<table><tr><th>reason</th><th class="number">samples</th>'
            f'<th>threshold</th></tr>{"".join(rows)}</table>')


def _settings_per_reason() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for item in FILTERS:
        settings.setdefault(item.reason, []).append(item.setting)
    return settings


# ---------------------------------------------------------------------------- thresholds
def _thresholds_section(report: dict, filters: QualityFilters | None) -> str:
    heading = '<h2 id="thresholds">Thresholds</h2>'
    if filters is None:
        return f"{heading}\n<p>No filtering: every stored sample is kept.</p>"
    thresholds = filters.thresholds()
    would_keep = report.get("would_keep") or {}
    rows = []
    for item in FILTERS:
        value = thresholds.get(item.setting)
        shown = "off" if value is None else escape(str(value))
        keeps = "at least" if item.bound == "min" else "at most"
        rows.append(f"<tr><td>{escape(item.setting)}</td><td>{escape(item.measure)}</td>"
                    f"<td>{keeps}</td><td class=\"number\">{shown}</td>"
                    f"{_count_cell(f'would_keep/{item.setting}', would_keep.get(item.setting))}"
                    f"<td>{escape(item.reason)}</td></tr>")
    return (f"{heading}\n<p>A sample is skipped with the reason of the first threshold (in this order) "
            "it fails; a measure that was not made fails none. <em>Would keep</em>: stored samples that "
            "pass that threshold alone.</p>\n<table><tr><th>setting</th><th>measure</th><th>keeps</th>"
            '<th class="number">threshold</th><th class="number">would keep</th><th>reason</th></tr>'
            f'{"".join(rows)}</table>')


# ------------------------------------------------------------------------------ measures
def _measures_section(samples: list[dict], filters: QualityFilters | None) -> str:
    thresholds = filters.thresholds() if filters is not None else {}
    figures = [_measure_figure(measure, samples, thresholds) for measure in MEASURES]
    return ('<h2 id="measures">Measures of the stored samples</h2>\n'
            f'<div class="histograms">{"".join(figures)}</div>')


def _measured_values(measure: Measure, samples: list[dict]) -> list[int | float]:
    values = [(sample.get("measures") or {}).get(measure.name) for sample in samples]
    return [value for value in values if value is not None and math.isfinite(value)]


def _measure_figure(measure: Measure, samples: list[dict], thresholds: dict) -> str:
    lines = {item.setting: thresholds[item.setting] for item in FILTERS
             if item.measure == measure.name and thresholds.get(item.setting) is not None}
    values = _measured_values(measure, samples)
    title = f"{measure.name} ({measure.unit})"
    marked = " ".join(lines)
    if not values:
        return (f'<figure id="measure-{measure.name}" data-thresholds="{escape(marked)}"><h3>{escape(title)}</h3>'
                f'<p class="not-measured">not measured</p>'
                f"<figcaption>{escape(measure.meaning)}</figcaption></figure>")
    image = _histogram_png(values, title, lines)
    drawn = "; ".join(f"{setting} = {value}" for setting, value in lines.items()) or "none"
    caption = (f"{len(values)} of {len(samples)} samples measured. {measure.meaning}. "
               f"Thresholds: {drawn}.")
    return (f'<figure id="measure-{measure.name}" data-thresholds="{escape(marked)}">'
            f'<img src="{_data_uri(image, "png")}" alt="{escape(title)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _histogram_bins(values: list[int | float], thresholds: list[float]) -> np.ndarray:
    """Bin edges over the values and the thresholds, so that a line is never off the chart:
    one bin per whole number for counts (when few), else up to HISTOGRAM_MAX_BINS."""
    low, high = min([*values, *thresholds]), max([*values, *thresholds])
    counts = all(isinstance(value, int) and not isinstance(value, bool) for value in values)
    if counts and high - low < HISTOGRAM_MAX_BINS:
        return np.arange(math.floor(low), math.floor(high) + 2) - 0.5
    if high == low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, max(2, min(HISTOGRAM_MAX_BINS, 2 * int(math.sqrt(len(values))))) + 1)


def _histogram_png(values: list[int | float], title: str, thresholds: dict[str, float]) -> bytes:
    """One small histogram, threshold lines labelled by setting, as PNG bytes.

    Drawn on a Figure of its own with the Agg canvas: no pyplot, so no global backend or
    figure registry is touched in the process that writes the report.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=HISTOGRAM_SIZE_INCHES, dpi=HISTOGRAM_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(values, bins=_histogram_bins(values, list(thresholds.values())), color="#4878a8")
    colours = ("#c03030", "#e08020", "#308030")
    for index, (setting, threshold) in enumerate(thresholds.items()):
        axes.axvline(threshold, color=colours[index % len(colours)], linestyle="--", linewidth=1.5, label=setting)
    if thresholds:
        axes.legend(fontsize=7, loc="best")
    axes.set_title(title, fontsize=9)
    axes.set_ylabel("samples", fontsize=8)
    axes.tick_params(labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=HISTOGRAM_DPI)
    return buffer.getvalue()


def _data_uri(data: bytes, image_format: str) -> str:
    return f"data:image/{image_format};base64,{base64.b64encode(data).decode('ascii')}"


# ------------------------------------------------------------------------------ examples
def _examples_anchor(section: str) -> str:
    return f"examples-{section}"


def _line_order(sample: dict) -> tuple:
    line = sample.get("line")
    return (line is None, line if isinstance(line, int) else 0)


def _examples_by_section(report: dict, samples: list[dict]) -> list[tuple[str, list[dict]]]:
    """("kept", first kept samples), then (reason, its first samples) per reason with any,
    in the report's order of reasons; first in manifest line order.

    A skipped sample that was stored is shown from its stored record (it has its window and
    measures) with the report's detail added; one that was never stored, from the report.
    """
    stored_by_id = {sample.get("sample_id"): sample for sample in samples}
    skipped_records = list(report.get("skipped_samples") or [])
    candidates: dict[str, list[dict]] = {}
    for record in skipped_records:
        stored = stored_by_id.get(record.get("sample_id")) if record.get("sample_id") is not None else None
        merged = {**record, **stored, "detail": record.get("detail")} if stored is not None else dict(record)
        candidates.setdefault(record.get("reason"), []).append(merged)
    listed = {record.get("sample_id") for record in skipped_records}
    for sample in samples:  # a filtered sample missing from the report's list still counts
        if sample.get("reason") is not None and sample.get("sample_id") not in listed:
            candidates.setdefault(sample["reason"], []).append(sample)
    kept = sorted((s for s in samples if s.get("reason") is None), key=_line_order)[:KEPT_EXAMPLES]
    sections = [(KEPT, kept)] if kept else []
    reasons = list(dict.fromkeys([*(report.get("skipped") or {}), *candidates]))
    for reason in reasons:
        chosen = sorted(candidates.get(reason, []), key=_line_order)[:EXAMPLES_PER_REASON]
        if chosen and reason is not None:
            sections.append((str(reason), chosen))
    return sections


def _examples_section(examples: list[tuple[str, list[dict]]], filters: QualityFilters | None) -> str:
    from tqdm.auto import tqdm

    rows = [(section, sample) for section, chosen in examples for sample in chosen]
    drawn: dict[str, list[str]] = {section: [] for section, _ in examples}
    for section, sample in tqdm(rows, desc="report examples", unit="sample",
                                disable=len(rows) < PROGRESS_FROM_ROWS):
        drawn[section].append(_example_row(sample, filters))
    parts = ['<h2 id="examples">Examples</h2>',
             "<p>Each row: the reference face, then frames spread over the training window "
             "(the video's first frames for a sample without one).</p>"]
    if not examples:
        parts.append("<p>No samples.</p>")
    for section, _ in examples:
        heading = "kept samples" if section == KEPT else f"skipped: {section}"
        parts.append(f'<h3 id="{escape(_examples_anchor(section))}">{escape(heading)}</h3>')
        parts.extend(drawn[section])
    return "\n".join(parts)


def _example_row(sample: dict, filters: QualityFilters | None) -> str:
    frames = _decoded_frames(sample)
    tiles = [_face_tile(sample, frames)]
    if frames is None:
        tiles.append(_grey_tile(f"video {UNREADABLE}" if sample.get("video") else "no video"))
    else:
        numbers, pixels, _ = frames
        for index in _spread(len(pixels), FRAMES_PER_EXAMPLE):
            tiles.append(_tile(pixels[index], f"frame {numbers[index]}"))
    image = _data_uri(_jpeg(_row_image(tiles)), "jpeg")
    alt = f"reference face and frames of {sample.get('sample_id') or 'a sample'}"
    return (f'<div class="example"><img src="{image}" alt="{escape(str(alt))}">'
            f"{_example_text(sample, frames, filters)}</div>")


def _example_text(sample: dict, frames, filters: QualityFilters | None) -> str:
    title = [f"<b>{escape(str(sample.get('sample_id') or '(no id)'))}</b>"]
    if sample.get("line") is not None:
        title.append(f"line {escape(str(sample['line']))}")
    if sample.get("bucket"):
        title.append(f"bucket {escape(str(sample['bucket']))}")
    title.append(escape(str(sample.get("reason") or KEPT)))
    lines = [" · ".join(title)]
    if sample.get("detail"):
        lines.append(escape(str(sample["detail"])))
    if sample.get("video"):
        lines.append(f"video <code>{escape(str(sample['video']))}</code>")
    if sample.get("face_image"):
        lines.append(f"face <code>{escape(str(sample['face_image']))}</code>")
    if frames is not None and frames[2]:
        lines.append(escape(frames[2]))
    if sample.get("measures"):
        lines.append(_measures_text(sample["measures"], filters))
    return f'<div class="about">{"<br>".join(lines)}</div>'


def _measures_text(measures: dict, filters: QualityFilters | None) -> str:
    """Measures rounded, those that fail a threshold in use marked."""
    failing = set()
    if filters is not None:
        thresholds = filters.thresholds()
        failing = {item.measure for item in FILTERS if fails(item, thresholds.get(item.setting), measures)}
    shown = []
    for measure in MEASURES:
        if measure.name not in measures:
            continue
        text = f"{measure.name} {_rounded(measures[measure.name])}"
        shown.append(f'<span class="fail">{escape(text)}</span>' if measure.name in failing else escape(text))
    return ", ".join(shown)


def _rounded(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e6):
        return str(int(value))
    return f"{value:.3g}"


def _spread(count: int, wanted: int) -> list[int]:
    """Up to `wanted` indices spread evenly over 0..count-1, first and last included."""
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(wanted, count))})


def _decoded_frames(sample: dict) -> tuple[list[int], np.ndarray, str] | None:
    """(frame numbers, F x H x W x 3 uint8 frames, a note) of the sample's window, else of the
    video's first frames; None when the video cannot be decoded at all."""
    from datamodules.skip_reasons import SkippedSample
    from datamodules.video_dataset import decode_clip

    video = sample.get("video")
    if not video:
        return None
    window = sample.get("window")
    attempts = [tuple(window)] if window else []
    attempts += [(0, 1, FRAMES_PER_EXAMPLE), (0, 1, 1)]  # a clip shorter than four frames shows one
    for start, stride, count in attempts:
        try:
            clip = decode_clip(video, num_frames=count, frame_stride=stride, start_frame=start)
        except (SkippedSample, ValueError):
            continue
        numbers = [clip.start_frame + i * stride for i in range(len(clip.frames))]
        note = "" if window is None or (start, stride, count) == tuple(window) else \
            "the window could not be decoded; the video's first frames are shown"
        return numbers, clip.frames.numpy(), note
    return None


def _face_tile(sample: dict, frames):
    from datamodules.face_pipeline import read_photo
    from datamodules.skip_reasons import SkippedSample

    face_image = sample.get("face_image")
    if face_image:
        try:
            return _tile(read_photo(face_image), "face photo")
        except SkippedSample:
            return _grey_tile(f"face photo {UNREADABLE}")
    if not sample.get("video"):
        return _grey_tile("no face photo")
    if frames is None:
        return _grey_tile(f"{FACE_FROM_CLIP}: {UNREADABLE}")
    _, pixels, _ = frames
    return _tile(pixels[len(pixels) // 2], FACE_FROM_CLIP)


def _tile(rgb: np.ndarray, label: str):
    """An RGB array scaled to TILE_HEIGHT, with `label` on a dark band at its foot."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    width = min(TILE_MAX_WIDTH, max(1, round(image.width * TILE_HEIGHT / image.height)))
    image = image.resize((width, TILE_HEIGHT), Image.Resampling.BILINEAR)
    return _labelled(image, label)


def _grey_tile(text: str):
    from PIL import Image

    image = Image.new("RGB", (TILE_HEIGHT, TILE_HEIGHT), (150, 150, 150))
    return _labelled(image, text, wrap=True)


def _labelled(image, label: str, wrap: bool = False):
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    lines = _wrapped(label, draw, font, image.width - 4) if wrap else [label]
    top = image.height - LABEL_BAND * len(lines)
    draw.rectangle((0, top, image.width, image.height), fill=(0, 0, 0))
    for index, line in enumerate(lines):
        draw.text((2, top + 1 + index * LABEL_BAND), line, fill=(255, 255, 255), font=font)
    return image


def _wrapped(text: str, draw, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _row_image(tiles: list):
    from PIL import Image

    width = sum(tile.width for tile in tiles) + TILE_GAP * (len(tiles) - 1)
    row = Image.new("RGB", (width, TILE_HEIGHT), (255, 255, 255))
    left = 0
    for tile in tiles:
        row.paste(tile, (left, 0))
        left += tile.width + TILE_GAP
    return row


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=EXAMPLE_JPEG_QUALITY)
    return buffer.getvalue()
