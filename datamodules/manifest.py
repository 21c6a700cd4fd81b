"""Read and validate a JSONL training manifest before any data is loaded.

One JSON object per line:

    {"video": "clips/a.mp4", "caption": "a woman waves", "face_image": "faces/a.png"}

`video` and `face_image` are paths; relative ones resolve against the manifest's own
directory, so a dataset folder can be moved as a whole. An optional `id` names the sample;
otherwise the sample id is the video's file stem plus the line number. Blank lines are
ignored; other fields are ignored too, so a manifest may carry extra metadata.

Validation checks every line up front and reports every problem at once, so a long run
does not die hours in on line 40 000, and one fix-and-retry cycle covers the whole file.
Each problem reads `<manifest>:<line>: field '<name>': <what is wrong>; <how to fix>`.
Problems with the manifest as a whole use line 0 and the field name `<manifest>`; problems
with a whole line (bad JSON, not an object) use the field name `<line>`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VIDEO_FIELD = "video"
CAPTION_FIELD = "caption"
FACE_IMAGE_FIELD = "face_image"
ID_FIELD = "id"

WHOLE_MANIFEST = "<manifest>"
WHOLE_LINE = "<line>"


class ManifestError(ValueError):
    """Every problem found in one or more manifests; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''} in manifest:"
        super().__init__("\n".join([header, *self.problems]))


@dataclass(frozen=True)
class ManifestEntry:
    """One validated sample. `video` is None only for predict manifests without a video."""

    video: Path | None
    caption: str
    face_image: Path
    line: int
    sample_id: str


def read_manifest(path: str | Path, require_video: bool = True) -> list[ManifestEntry]:
    """Parse and validate `path`; raise one ManifestError listing every problem.

    `require_video=False` is for prediction, where a caption and a face image are enough;
    a `video` given there is still validated.
    """
    entries, problems = check_manifest(Path(path), require_video)
    if problems:
        raise ManifestError(problems)
    return entries


def check_manifest(
    manifest: Path, require_video: bool = True
) -> tuple[list[ManifestEntry], list[str]]:
    """Return the valid entries and every problem found; for merging several manifests' reports."""
    if not manifest.is_file():
        reason = "is a directory" if manifest.is_dir() else "does not exist"
        return [], [format_problem(manifest, 0, WHOLE_MANIFEST, f"manifest file {reason}",
                                   "pass the path of an existing .jsonl file")]

    entries: list[ManifestEntry] = []
    problems: list[str] = []
    first_line_of_id: dict[str, int] = {}
    # Bytes, not text: bytes.splitlines breaks only on \n, \r and \r\n, so line numbers
    # match what editors show; str.splitlines would also break on \u2028 and friends.
    for line_number, raw in enumerate(manifest.read_bytes().splitlines(), start=1):
        record, line_problems = _decode_line(manifest, line_number, raw)
        problems.extend(line_problems)
        if record is None:
            continue
        entry, field_problems = _validate_record(manifest, line_number, record, require_video)
        problems.extend(field_problems)
        if entry is None:
            continue
        if entry.sample_id in first_line_of_id:
            problems.append(format_problem(
                manifest, line_number, ID_FIELD,
                f"sample id {entry.sample_id!r} already used on line "
                f"{first_line_of_id[entry.sample_id]}",
                "give every line a unique id"))
            continue
        first_line_of_id[entry.sample_id] = line_number
        entries.append(entry)

    if not entries and not problems:
        problems.append(format_problem(manifest, 0, WHOLE_MANIFEST, "manifest has no samples",
                                       "add one JSON object per line"))
    return entries, problems


def _decode_line(manifest: Path, line_number: int, raw: bytes) -> tuple[dict | None, list[str]]:
    """Turn one raw line into a dict; None with no problems means a blank line."""
    if line_number == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark some editors add
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, [format_problem(manifest, line_number, WHOLE_LINE,
                                     f"not valid UTF-8 ({err})", "save the manifest as UTF-8")]
    if not text.strip():
        return None, []
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return None, [format_problem(manifest, line_number, WHOLE_LINE,
                                     f"invalid JSON ({err.msg} at column {err.colno})",
                                     "write exactly one JSON object per line")]
    if not isinstance(record, dict):
        return None, [format_problem(manifest, line_number, WHOLE_LINE,
                                     f"expected a JSON object, got {_json_type(record)}",
                                     'write an object like {"video": ..., "caption": ..., '
                                     '"face_image": ...}')]
    return record, []


def _validate_record(
    manifest: Path, line_number: int, record: dict, require_video: bool
) -> tuple[ManifestEntry | None, list[str]]:
    problems: list[str] = []

    def report(field: str, what: str, fix: str) -> None:
        problems.append(format_problem(manifest, line_number, field, what, fix))

    video = None
    if VIDEO_FIELD in record or require_video:
        video = _resolve_existing_file(manifest, record, VIDEO_FIELD, "video file", report)
    face_image = _resolve_existing_file(manifest, record, FACE_IMAGE_FIELD, "image file", report)

    caption = record.get(CAPTION_FIELD)
    if CAPTION_FIELD not in record:
        report(CAPTION_FIELD, "missing", "add a non-empty text caption")
    elif not isinstance(caption, str):
        report(CAPTION_FIELD, f"expected a string, got {_json_type(caption)}",
               "write the caption as a JSON string")
    elif not caption.strip():
        report(CAPTION_FIELD, "empty caption", "describe the video in the caption")

    sample_id = record.get(ID_FIELD)
    if ID_FIELD in record and not (isinstance(sample_id, str) and sample_id.strip()):
        report(ID_FIELD, f"expected a non-empty string, got {_json_type(sample_id)}",
               "write the id as a non-empty JSON string or remove it")

    if problems:
        return None, problems
    if sample_id is None:
        named_after = video if video is not None else face_image
        sample_id = f"{named_after.stem}-L{line_number}"
    return ManifestEntry(video=video, caption=caption, face_image=face_image,
                         line=line_number, sample_id=sample_id), []


def _resolve_existing_file(
    manifest: Path, record: dict, field: str, kind: str, report: Callable[[str, str, str], None]
) -> Path | None:
    """Resolve `record[field]` against the manifest's directory and check the file exists."""
    if field not in record:
        report(field, "missing", f"add the path of the {kind}")
        return None
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        report(field, f"expected a non-empty path string, got {_json_type(value)}",
               f"write the path of the {kind} as a JSON string")
        return None
    # Absolute, so entries stay valid whatever the working directory of a worker process.
    base = manifest.absolute().parent
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.is_file():
        return path
    reason = "is a directory" if path.is_dir() else "does not exist"
    report(field, f"{kind} {path} {reason}",
           f"fix the path (relative paths resolve against {base})")
    return None


def format_problem(manifest: Path, line_number: int, field: str, what: str, fix: str) -> str:
    """One problem in the `<manifest>:<line>: field '<name>': <what>; <fix>` form."""
    return f"{manifest}:{line_number}: field '{field}': {what}; {fix}"


def _json_type(value: object) -> str:
    """Name a parsed JSON value the way the manifest author wrote it."""
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
