import re

import pytest

from datamodules.manifest import ManifestEntry, ManifestError, read_manifest
from helpers_video import write_manifest


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
    for problem, (line, field, what) in zip(error.problems, expected):
        assert problem.startswith(f"{manifest}:{line}: field '{field}': ")
        assert what in problem
        assert "; " in problem  # followed by how to fix it
        assert problem in str(error)
    assert str(dataset_dir / "faces" / "missing.png") in error.problems[1]


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
    first, second = caught.value.problems
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
    assert [p.split(": ")[0:2] for p in caught.value.problems] == [[f"{manifest}:2", "field 'video'"]]

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
