import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from datamodules.manifest import (
    ManifestEntry,
    ManifestError,
    ManifestProblem,
    check_manifest,
    manifest_format,
    read_manifest,
)
from datamodules.skip_reasons import EMPTY_CAPTION, INVALID_MANIFEST_LINE
from helpers_video import write_face_png, write_gray_ramp_video, write_manifest


@pytest.fixture
def dataset_dir(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "faces").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"not decoded by the manifest reader")
    (tmp_path / "clips" / "b.mp4").write_bytes(b"")
    (tmp_path / "faces" / "a.png").write_bytes(b"")
    return tmp_path


def good(**overrides):
    record = {"video": "clips/a.mp4", "caption": "a person smiles", "face_image": "faces/a.png"}
    record.update(overrides)
    return record


def test_valid_manifest_resolves_paths_and_skips_blank_lines(dataset_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    face = str(dataset_dir / "faces" / "a.png")
    manifest = write_manifest(elsewhere / "train.jsonl", [
        good(video=str(dataset_dir / "clips" / "a.mp4"), face_image=face),
        "",
        "   ",
        good(video=str(dataset_dir / "clips" / "b.mp4"), face_image=face, id="clip-b"),
    ])
    local = write_manifest(dataset_dir / "local.jsonl", [good()])

    entries = read_manifest(manifest)
    assert [entry.line for entry in entries] == [1, 4]
    assert entries[0].video == dataset_dir / "clips" / "a.mp4"
    assert entries[0].sample_id == "a-L1"
    assert entries[1].sample_id == "clip-b"

    (entry,) = read_manifest(str(local))
    assert entry == ManifestEntry(video=dataset_dir / "clips" / "a.mp4", caption="a person smiles",
                                  face_image=dataset_dir / "faces" / "a.png", line=1, sample_id="a-L1")
    with pytest.raises(AttributeError):
        entry.caption = "changed"  # frozen


def test_every_problem_is_reported_with_path_line_and_field(dataset_dir):
    manifest = write_manifest(dataset_dir / "train.jsonl", [
        good(),
        {"video": "clips/a.mp4", "face_image": "faces/a.png"},
        good(face_image="faces/missing.png"),
        '{"video": "clips/a.mp4", "caption": "unterminated',
        good(caption="   "),
        good(caption=7),
        "[1, 2]",
    ])
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    error = caught.value
    assert isinstance(error, ValueError)
    assert len(error.problems) == 6
    expected = [(2, "caption", "missing"), (3, "face_image", "does not exist"),
                (4, "<line>", "invalid JSON"), (5, "caption", "empty caption"),
                (6, "caption", "expected a string"), (7, "<line>", "expected a JSON object")]
    for problem, (line, field, what) in zip(map(str, error.problems), expected):
        assert problem.startswith(f"{manifest}:{line}: field '{field}': ")
        assert what in problem
        assert "; " in problem  # followed by how to fix it
        assert problem in str(error)
    assert str(dataset_dir / "faces" / "missing.png") in str(error.problems[1])


def test_missing_and_empty_manifests_are_reported(tmp_path):
    with pytest.raises(ManifestError, match=r"field '<manifest>': manifest file does not exist"):
        read_manifest(tmp_path / "nope.jsonl")
    empty = write_manifest(tmp_path / "empty.jsonl", ["", ""])
    expected = f"{empty}:0: field '<manifest>': manifest has no samples"
    with pytest.raises(ManifestError, match=re.escape(expected)):
        read_manifest(empty)


def test_duplicate_ids_and_bad_ids_are_reported(dataset_dir):
    manifest = write_manifest(dataset_dir / "train.jsonl", [good(id="x"), good(id="x"), good(id="")])
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    first, second = map(str, caught.value.problems)
    assert first.startswith(f"{manifest}:2: field 'id': ") and "line 1" in first
    assert second.startswith(f"{manifest}:3: field 'id': ")


def test_video_is_optional_only_when_not_required(dataset_dir):
    manifest = write_manifest(dataset_dir / "predict.jsonl", [
        {"caption": "a person waves", "face_image": "faces/a.png"},
        good(video="clips/missing.mp4"),
    ])
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest, require_video=False)
    # An optional video that is given must still exist.
    assert [str(p).split(": ")[0:2] for p in caught.value.problems] == [[f"{manifest}:2", "field 'video'"]]

    write_manifest(manifest, [{"caption": "a person waves", "face_image": "faces/a.png"}])
    (entry,) = read_manifest(manifest, require_video=False)
    assert entry.video is None and entry.sample_id == "a-L1"
    with pytest.raises(ManifestError, match=r":1: field 'video': missing"):
        read_manifest(manifest)


def test_relative_manifest_path_gives_absolute_entries(dataset_dir, monkeypatch):
    write_manifest(dataset_dir / "train.jsonl", [good()])
    monkeypatch.chdir(dataset_dir)
    (entry,) = read_manifest("train.jsonl")
    assert entry.video.is_absolute() and entry.video == dataset_dir / "clips" / "a.mp4"


# --- formats, editor quirks, structured problems --------------------------------------------

FORMATS = ("jsonl", "csv", "two-file", "consisid")
ASCII_ROWS = [("a.mp4", "a person smiles"), ("b.mp4", "a person waves, then nods")]
NON_ASCII_ROWS = [("café-ß.mp4", "Zoë sourit, l'air ravi"), ("视频-🎬.mp4", "一个人在微笑 😀")]
BOM = "\ufeff"


def encode(lines, newline="\n", bom=False):
    """Lines joined as an editor saves them: chosen line break, optional byte-order mark."""
    return ((BOM if bom else "") + newline.join(lines) + newline).encode("utf-8")


def write_dataset(root, fmt, rows, newline="\n", bom=False, blank=False):
    """Write `rows` (video file name, caption) as a `fmt` manifest under `root`.

    Returns the manifest path and the line each row's entry is numbered by. With `blank`, a
    blank line separates the records and two more end the file.
    """
    (root / "clips").mkdir(parents=True, exist_ok=True)
    for name, _ in rows:
        (root / "clips" / name).write_bytes(b"")

    def spaced(records, first_line):
        lines, numbers = [], []
        for i, record in enumerate(records):
            if blank and i:
                lines.append("")
            numbers.append(first_line + len(lines))
            lines.append(record)
        return lines + (["", ""] if blank else []), numbers

    if fmt == "jsonl":
        lines, numbers = spaced([json.dumps({"video": f"clips/{v}", "caption": c}, ensure_ascii=False)
                                 for v, c in rows], 1)
        manifest = root / "train.jsonl"
    elif fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="").writerow(["video", "caption"])
        records = []
        for video, caption in rows:
            row = io.StringIO()
            csv.writer(row, lineterminator="").writerow([f"clips/{video}", caption])
            records.append(row.getvalue())
        lines, numbers = spaced(records, 2)
        lines.insert(0, out.getvalue())
        manifest = root / "train.csv"
    elif fmt == "two-file":
        prompt_lines, _ = spaced([c for _, c in rows], 1)
        (root / "prompt.txt").write_bytes(encode(prompt_lines, newline, bom))
        lines, numbers = spaced([f"clips/{v}" for v, _ in rows], 1)
        manifest = root / "videos.txt"
    else:  # consisid
        items, numbers = spaced([json.dumps({"path": v, "cap": c, "fps": 8.0}, ensure_ascii=False) + ","
                                 for v, c in rows], 2)
        items[len(items) - (3 if blank else 1)] = items[len(items) - (3 if blank else 1)].rstrip(",")
        (root / "captions").mkdir(exist_ok=True)
        (root / "captions" / "data.json").write_bytes(encode(["[", *items, "]"], newline, bom))
        lines = ["clips,captions/data.json,annotations"] + ([""] if blank else [])
        manifest = root / "total_train_data.txt"
    manifest.write_bytes(encode(lines, newline, bom))
    return manifest, numbers


def assert_entries(entries, root, rows, numbers):
    assert [e.caption for e in entries] == [c for _, c in rows]
    assert [e.video for e in entries] == [root / "clips" / v for v, _ in rows]
    assert [e.line for e in entries] == numbers
    assert [e.sample_id for e in entries] == [f"{Path(v).stem}-L{n}" for (v, _), n in zip(rows, numbers)]
    assert all(e.face_image is None for e in entries)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_entries(tmp_path, fmt):
    manifest, numbers = write_dataset(tmp_path, fmt, ASCII_ROWS)
    assert manifest_format(manifest) == fmt
    assert_entries(read_manifest(manifest), tmp_path, ASCII_ROWS, numbers)


QUIRKS = {
    "bom": dict(bom=True),
    "crlf": dict(newline="\r\n"),
    "cr": dict(newline="\r"),
    "blank_lines": dict(blank=True),
    "all_at_once": dict(bom=True, newline="\r\n", blank=True),
}


@pytest.mark.parametrize("quirk", QUIRKS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_editor_quirks_work_in_every_format(tmp_path, fmt, quirk):
    manifest, numbers = write_dataset(tmp_path, fmt, ASCII_ROWS, **QUIRKS[quirk])
    if QUIRKS[quirk].get("blank"):
        assert numbers[1] == numbers[0] + 2  # the blank line counts, as in an editor
    assert_entries(read_manifest(manifest), tmp_path, ASCII_ROWS, numbers)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_ascii_captions_and_paths_work_in_every_format(tmp_path, fmt):
    root = tmp_path / "données-数据"
    manifest, numbers = write_dataset(root, fmt, NON_ASCII_ROWS, newline="\r\n", bom=True)
    assert_entries(read_manifest(manifest), root, NON_ASCII_ROWS, numbers)


def test_csv_reads_quoted_fields_optional_columns_and_record_start_lines(dataset_dir):
    (dataset_dir / "faces" / "café.png").write_bytes(b"")
    text = ('Notes, Extra ,VIDEO,caption,face_image,id\r\n'
            'x,,clips/a.mp4,"one, two",faces/a.png,first\r\n'
            '"multi\r\nline note",,clips/b.mp4,"line one\r\nline two",,\r\n'
            ',,clips/a.mp4,third,faces/café.png,\r\n'
            ',,,,,\r\n')
    manifest = dataset_dir / "train.csv"
    manifest.write_bytes(text.encode())
    first, second, third = read_manifest(manifest)
    assert (first.caption, first.sample_id, first.face_image) == ("one, two", "first", dataset_dir / "faces" / "a.png")
    assert (second.caption, second.line, second.sample_id) == ("line one\r\nline two", 3, "b-L3")
    assert second.face_image is None  # an empty cell is "not given"
    # The record above spans lines 3-5 (two quoted line breaks), so this one starts on 6.
    assert (third.line, third.sample_id, third.face_image) == (6, "a-L6", dataset_dir / "faces" / "café.png")
    assert third.source == manifest


def test_csv_problems_name_the_record_line(dataset_dir):
    manifest = dataset_dir / "train.csv"
    manifest.write_text("video,caption\nclips/a.mp4,a, b\nclips/missing.mp4,ok\nclips/b.mp4\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    assert [(p.line, p.field) for p in caught.value.problems] == [
        (2, "<line>"), (3, "video"), (4, "caption")]
    assert "put double quotes around fields" in caught.value.problems[0].fix
    assert str(dataset_dir / "clips" / "missing.mp4") in caught.value.problems[1].what

    manifest.write_text("path,text\nclips/a.mp4,hi\n")
    with pytest.raises(ManifestError, match=r"train.csv:1: field '<manifest>': header has no 'video' or 'caption'"):
        read_manifest(manifest, skip_invalid_lines=True)  # a whole-file problem is never skipped


def test_two_file_layout_accepts_the_folder_either_file_and_prompts_txt(tmp_path):
    manifest, numbers = write_dataset(tmp_path, "two-file", ASCII_ROWS)
    for path in (tmp_path, tmp_path / "prompt.txt", tmp_path / "videos.txt"):
        assert manifest_format(path) == "two-file"
        assert_entries(read_manifest(path), tmp_path, ASCII_ROWS, numbers)
    (tmp_path / "prompt.txt").rename(tmp_path / "prompts.txt")
    assert_entries(read_manifest(tmp_path), tmp_path, ASCII_ROWS, numbers)
    assert read_manifest(tmp_path)[0].source == tmp_path / "videos.txt"


def test_two_file_mismatched_counts_name_both_files(tmp_path):
    write_dataset(tmp_path, "two-file", ASCII_ROWS)
    (tmp_path / "prompt.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(tmp_path, skip_invalid_lines=True)
    (problem,) = caught.value.problems
    assert f"{tmp_path / 'prompt.txt'} has 3 prompts but {tmp_path / 'videos.txt'} has 2 videos" in str(problem)
    assert problem.field == "<manifest>" and problem.reason == INVALID_MANIFEST_LINE


def test_two_file_pairs_blank_lines_like_the_upstream_scripts(tmp_path):
    write_dataset(tmp_path, "two-file", ASCII_ROWS)
    # Same length: pair line by line, so a caption left blank is reported where it is.
    (tmp_path / "prompt.txt").write_text("\nsecond\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(tmp_path)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.reason) == (tmp_path / "prompt.txt", 1, EMPTY_CAPTION)
    # Different lengths: the non-blank lines pair up, as finetrainers and diffusers do.
    (tmp_path / "prompt.txt").write_text("\n\nfirst\n\nsecond\n")
    entries = read_manifest(tmp_path)
    assert [(e.caption, e.line) for e in entries] == [("first", 1), ("second", 2)]


def test_consisid_reads_captions_json_by_basename_and_item_line(tmp_path):
    (tmp_path / "ds" / "videos").mkdir(parents=True)
    (tmp_path / "ds" / "videos" / "x.mp4").write_bytes(b"")
    (tmp_path / "ds" / "videos" / "y.mp4").write_bytes(b"")
    captions = tmp_path / "captions" / "ds.json"
    captions.parent.mkdir()
    captions.write_text(json.dumps([
        {"path": "/original/machine/x.mp4", "cap": "first", "fps": 30.0, "duration": 8.1},
        {"path": "y.mp4", "cap": "second", "resolution": {"height": 940, "width": 720}},
        {"path": "gone.mp4", "cap": "third"},
        {"path": "x.mp4"},
    ], indent=4))
    listing = tmp_path / "total_train_data.txt"
    listing.write_text("ds/videos,captions/ds.json,ds\n")
    entries, problems = check_manifest(listing)
    assert [(e.video, e.caption) for e in entries] == [
        (tmp_path / "ds" / "videos" / "x.mp4", "first"), (tmp_path / "ds" / "videos" / "y.mp4", "second")]
    assert [e.line for e in entries] == [2, 8]  # where each object starts in the JSON
    assert all(e.source == captions for e in entries)
    assert [(p.file, p.line, p.field) for p in problems] == [(captions, 16, "path"), (captions, 20, "cap")]
    assert manifest_format(tmp_path) == "consisid"
    with pytest.warns(UserWarning, match=r"skipped 2 invalid lines .*ds.json:16: field 'path'"):
        kept = read_manifest(tmp_path, skip_invalid_lines=True)
    assert [e.video for e in kept] == [e.video for e in entries]


def test_consisid_list_problems_name_the_list_line(tmp_path):
    listing = tmp_path / "train_list.txt"
    listing.write_text("videos,captions.json,anno\nonly-one-field\n")
    (tmp_path / "videos").mkdir()
    with pytest.raises(ManifestError) as caught:
        read_manifest(listing)
    assert [(p.line, p.field) for p in caught.value.problems] == [(1, "captions json"), (2, "<line>")]


def test_problems_are_structured_with_reasons(dataset_dir):
    manifest = write_manifest(dataset_dir / "train.jsonl", [
        good(caption=" \t "), good(), good(video="clips/missing.mp4"), "{not json",
        {"video": "clips/b.mp4", "face_image": "faces/a.png"}])
    entries, problems = check_manifest(manifest)
    assert [e.line for e in entries] == [2]
    assert [(p.line, p.field, p.reason) for p in problems] == [
        (1, "caption", EMPTY_CAPTION), (3, "video", INVALID_MANIFEST_LINE),
        (4, "<line>", INVALID_MANIFEST_LINE), (5, "caption", INVALID_MANIFEST_LINE)]
    first = problems[0]
    assert isinstance(first, ManifestProblem)
    assert str(first) == f"{manifest}:1: field 'caption': empty caption; describe the video in the caption"
    with pytest.raises(AttributeError):
        first.line = 2  # frozen
    error = ManifestError(problems)
    assert error.problems == problems and all(str(p) in str(error) for p in problems)


def test_skip_invalid_lines_keeps_valid_entries_and_warns_by_reason(dataset_dir):
    manifest = write_manifest(dataset_dir / "train.jsonl", [
        good(caption=""), good(id="ok-1"), "[1]", good(video="clips/b.mp4", id="ok-2"),
        good(caption="   ", video="clips/nope.mp4"), good(id="ok-1")])
    with pytest.warns(UserWarning, match=r"skipped 4 invalid lines .*\(1 empty_caption, 3 invalid_manifest_line\)"):
        entries = read_manifest(manifest, skip_invalid_lines=True)
    assert [e.sample_id for e in entries] == ["ok-1", "ok-2"]
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    assert len(caught.value.problems) == 5  # every problem: line 5 has a bad video and caption

    only_bad = write_manifest(dataset_dir / "bad.jsonl", [good(caption=""), "[1]"])
    with pytest.raises(ManifestError, match="2 problems"):
        read_manifest(only_bad, skip_invalid_lines=True)  # nothing left to train on


def test_face_image_is_optional_for_training_only(dataset_dir):
    manifest = write_manifest(dataset_dir / "train.jsonl", [
        {"video": "clips/a.mp4", "caption": "no face given"}, good()])
    first, second = read_manifest(manifest)
    assert first.face_image is None and second.face_image == dataset_dir / "faces" / "a.png"
    with pytest.raises(ManifestError, match=r":1: field 'face_image': missing"):
        read_manifest(manifest, require_video=False)

    manifest, _ = write_dataset(dataset_dir / "ft", "two-file", ASCII_ROWS)
    with pytest.raises(ManifestError, match=r"field '<manifest>': the two-file layout has no face images"):
        read_manifest(manifest, require_video=False)


def test_unknown_suffix_and_unknown_folder_name_the_path_and_formats(tmp_path):
    manifest = tmp_path / "train.yaml"
    manifest.write_text("video: a.mp4\n")
    assert manifest_format(manifest) is None
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    (problem,) = caught.value.problems
    assert str(problem).startswith(f"{manifest}:0: field '<manifest>': unknown manifest format '.yaml'")
    for accepted in (".jsonl", ".csv", "prompt.txt", "videos.txt", "ConsisID"):
        assert accepted in problem.fix
    with pytest.raises(ManifestError, match="folder holds neither prompt.txt and videos.txt"):
        read_manifest(tmp_path)


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    manifest = tmp_path / "train.csv"
    manifest.write_bytes(b"video,caption\r\na.mp4,ok\r\nb.mp4,caf\xe9\r\n")
    with pytest.raises(ManifestError, match=r"train.csv:3: field '<manifest>': not valid UTF-8"):
        read_manifest(manifest)


# --- examples/datasets ----------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "datasets"
EXAMPLE_MANIFESTS = {
    "kit_jsonl": "manifest.jsonl",
    "csv": "manifest.csv",
    "finetrainers": ".",
    "consisid": "total_train_data.txt",
}
EXAMPLE_CLIPS = ["wave.mp4", "turn.mp4", "laugh.mp4"]
EXAMPLE_CAPTIONS = [
    "A woman with short dark hair waves at the camera, then smiles.",
    "The same woman turns her head slowly to the left, soft window light on her face.",
    "A man in a grey sweater laughs while talking, café in the background.",
]


@pytest.mark.parametrize("name", EXAMPLE_MANIFESTS)
def test_example_dataset_parses_into_the_expected_entries(tmp_path, name):
    root = shutil.copytree(EXAMPLES / name, tmp_path / name)
    assert not [p for p in root.rglob("*") if p.suffix in (".mp4", ".png")]  # text files only
    (root / "clips").mkdir()
    for clip in EXAMPLE_CLIPS:
        write_gray_ramp_video(root / "clips" / clip, num_frames=3)
    if name in ("kit_jsonl", "csv"):
        (root / "faces").mkdir()
        write_face_png(root / "faces" / "woman.png")

    entries = read_manifest(root / EXAMPLE_MANIFESTS[name])
    assert [e.caption for e in entries] == EXAMPLE_CAPTIONS
    assert [e.video for e in entries] == [root / "clips" / clip for clip in EXAMPLE_CLIPS]
    assert all(e.video.stat().st_size > 0 for e in entries)
    faces = [e.face_image for e in entries]
    if name in ("kit_jsonl", "csv"):
        assert faces == [root / "faces" / "woman.png"] * 2 + [None]
        assert [e.sample_id for e in entries][::2] == ["woman-wave", f"laugh-L{3 if name == 'kit_jsonl' else 5}"]
    else:
        assert faces == [None] * 3


def test_examples_readme_documents_every_example():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for name, manifest in EXAMPLE_MANIFESTS.items():
        assert f"## `{name}/`" in readme
        assert f"examples/datasets/{name}" in readme


@pytest.mark.parametrize("fmt", FORMATS)
def test_blank_caption_is_an_empty_caption_problem_in_every_format(tmp_path, fmt):
    manifest, numbers = write_dataset(tmp_path, fmt, [("a.mp4", "fine"), ("b.mp4", "  ")])
    entries, problems = check_manifest(manifest)
    assert [e.caption for e in entries] == ["fine"]
    (problem,) = problems
    assert problem.reason == EMPTY_CAPTION and "empty caption" in problem.what
    assert problem.line == numbers[1]
    assert problem.field == ("cap" if fmt == "consisid" else "caption")
    assert problem.file.name == {"two-file": "prompt.txt", "consisid": "data.json"}.get(fmt, manifest.name)
