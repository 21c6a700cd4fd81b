import json

import av
import numpy as np
import pytest
from PIL import Image

from datamodules import demo_data
from datamodules import video_io
from datamodules.demo_data import main, write_demo_dataset
from datamodules.video_io import mp4_video_codec
from datamodules.manifest import read_manifest


def test_demo_dataset_is_decodable_and_validates(tmp_path):
    manifest = write_demo_dataset(tmp_path / "demo", num_clips=6, num_frames=5, height=32, width=48,
                                  face_size=40, fps=8, seed=1)
    assert manifest == tmp_path / "demo" / "manifest.jsonl"
    assert [p.name for p in manifest.parent.iterdir() if p.name.endswith(".tmp")] == []

    entries = read_manifest(manifest)
    assert len(entries) == 6
    raw_lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert all(not line["video"].startswith("/") and not line["face_image"].startswith("/")
               for line in raw_lines)
    captions = [entry.caption for entry in entries]
    assert len(set(captions)) == 6 and all(c.startswith("a smiling astronaut") for c in captions)
    assert any("left" in c for c in captions) and any("zooms in" in c for c in captions)

    for entry in entries:
        with av.open(str(entry.video)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == {"libx264": "h264"}.get(mp4_video_codec(), "mpeg4")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
        # The camera moves: first and last frames differ clearly.
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 5

    with Image.open(entries[0].face_image) as face:
        assert face.format == "PNG" and face.size == (40, 40)
        # The crop shows skin, not the grey backdrop: the centre is warm (red > blue).
        centre = np.asarray(face.convert("RGB"))[15:25, 15:25].reshape(-1, 3).mean(axis=0)
        assert centre[0] > centre[2] + 20


def test_main_writes_the_dataset_and_prints_the_manifest(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-clips", "2", "--num-frames", "3",
          "--height", "16", "--width", "16", "--face-size", "16"])
    out = capsys.readouterr().out
    manifest = tmp_path / "cli" / "manifest.jsonl"
    assert str(manifest) in out
    assert len(read_manifest(manifest)) == 2


def test_without_libx264_the_writer_falls_back_to_mpeg4(tmp_path, monkeypatch):
    def no_libx264(name, mode="r"):
        raise av.codec.codec.UnknownCodecError(name)

    monkeypatch.setattr(av.codec, "Codec", no_libx264)
    assert mp4_video_codec.__wrapped__() == "mpeg4"
    monkeypatch.undo()

    monkeypatch.setattr(video_io, "mp4_video_codec", lambda: "mpeg4")
    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    assert video_io.write_mp4(tmp_path / "clip.mp4", frames, fps=8) == "mpeg4"
    with av.open(str(tmp_path / "clip.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
        assert len(list(container.decode(video=0))) == 3


def test_odd_frame_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_demo_dataset(tmp_path, height=33)
