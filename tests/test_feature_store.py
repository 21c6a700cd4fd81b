"""Raw clips -> `echovideo preprocess` -> feature store -> `echovideo fit` from it -> resume.

Every bad-input class is written as a real file and must land in the report under its
reason; a resumed fit must see exactly the samples, in the same order, that an unbroken
fit sees (2 loader workers); a preprocess killed mid-run and re-run must end with the same
store as an unbroken one.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import batch as keys
from datamodules.feature_store import (
    REPORT_FILE,
    FeatureStoreError,
    open_store_dataset,
    read_store_meta,
    record_to_sample,
    store_loader,
)
from datamodules.video_dataset import collate_skipping_unreadable, decode_clip
from echovideo.cli import EchoVideoCLI, PreprocessCLI
from helpers_video import write_gray_ramp_video
from store_helpers import EXPERIMENT, ROOT, store_contents, stored_face_crops, store_overrides as _overrides


class SampleIdRecorder(pl.Callback):
    """Appends the sample ids of every training batch, one JSON line per step, to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                  "ids": batch.get(keys.SAMPLE_ID, [])}) + "\n")


def _fit_args(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("--preprocess.")]


def test_preprocess_report_counts_every_bad_input_by_reason(preprocessed):
    folder, _, store, report = preprocessed
    assert report.complete
    assert report.written == {"9x32x32": 9}  # the 8 good clips and the long caption, cut
    assert report.skipped == {"unreadable_video": 2, "video_too_short": 1, "unreadable_image": 1,
                              "empty_caption": 1}
    assert report.filters is None and report.kept == report.written  # data.filters: null keeps them all
    assert report.captions_truncated == 1  # "long" exceeds the tiny tokenizer's 16 tokens
    assert report.face_parsing is None and "none" in report.face_pipeline
    on_disk = json.loads((store / REPORT_FILE).read_text())
    assert on_disk["skipped"] == report.skipped and on_disk["written"] == report.written
    details = {s.get("sample_id"): s["reason"] for s in on_disk["skipped_samples"]}
    assert details["corrupt"] == "unreadable_video" and details["short"] == "video_too_short"
    assert details["bad_photo"] == "unreadable_image"

    sample = open_store_dataset(store, shuffle=False, seed=0)[0]
    assert sample[keys.LATENT_MEAN].dtype == torch.bfloat16
    assert sample[keys.LATENT_MEAN].shape == sample[keys.LATENT_STD].shape == (3, 16, 4, 4)
    assert sample[keys.FACE_LATENT].shape == (1, 16, 4, 4) and sample[keys.ARCFACE].shape == (512,)


def test_store_entry_whose_source_changed_is_skipped(preprocessed, tmp_path):
    folder, _, store, _ = preprocessed
    dataset = open_store_dataset(store, shuffle=False, seed=0)
    raw = super(type(dataset), dataset).__getitem__(0)
    assert record_to_sample(raw, verify_sources=True)[keys.SAMPLE_ID] == raw[keys.SAMPLE_ID]
    source = json.loads(raw["sources"])[0][0]
    moved = json.dumps([[source, 1, 1]])  # a size and time the file does not have
    changed = record_to_sample(dict(raw, sources=moved), verify_sources=True)
    assert changed.reason == "source_changed"
    assert not hasattr(record_to_sample(dict(raw, sources=moved), verify_sources=False), "reason")


def test_fit_from_store_resumes_at_the_exact_next_sample(preprocessed, tiny_release, tmp_path, monkeypatch):
    folder, manifest, store, _ = preprocessed
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    config = ["--config", str(EXPERIMENT)]
    recorder = "test_feature_store.SampleIdRecorder"

    def fit(run: Path, log: Path, max_steps: int, resume: bool):
        overrides = _fit_args(_overrides(tiny_release, manifest, store, run))
        return EchoVideoCLI(args=[
            "fit", *config, *overrides, f"--trainer.max_steps={max_steps}",
            f"--trainer.callbacks+={recorder}", f"--trainer.callbacks.init_args.path={log}",
            *(["--ckpt_path=last"] if resume else [])])

    # One epoch is 5 steps (9 samples, batch 2, 2 workers): the split falls inside the
    # first epoch and the run goes on into the second.
    whole = fit(tmp_path / "whole", tmp_path / "whole.jsonl", 8, resume=False)
    # T5 and the VAE were never needed: the store carries every condition.
    assert "text_encoder" not in whole.model.encoders.loaded_parts()
    assert "vae" not in whole.model.encoders.loaded_parts()
    fit(tmp_path / "split", tmp_path / "split.jsonl", 3, resume=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "split", tmp_path / "split.jsonl", 8, resume=True)
    assert not any("not resumable" in str(w.message) for w in caught)  # Lightning's mid-epoch warning

    def steps(log):
        return [json.loads(line) for line in log.read_text().splitlines()]

    whole_steps, split_steps = steps(tmp_path / "whole.jsonl"), steps(tmp_path / "split.jsonl")
    assert [s["step"] for s in split_steps] == list(range(8))
    assert split_steps == whole_steps
    every_sample = sorted([f"good{i}" for i in range(8)] + ["long"])
    assert sorted(i for s in whole_steps[:5] for i in s["ids"]) == every_sample
    epoch_two = [i for s in whole_steps[5:] for i in s["ids"]]
    assert len(epoch_two) == len(set(epoch_two)) == 6  # a fresh pass, not a replay

    events = EventAccumulator(str(tmp_path / "split" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {f"data/skipped/{r}" for r in ("unreadable_video", "no_face", "source_changed")} <= set(tags)


def test_a_store_run_resumed_from_its_manifest_ends_the_interrupted_epoch_and_goes_on(
        preprocessed, tiny_release, tmp_path, monkeypatch):
    """The loader position in the checkpoint is the store's; the resumed run reads the raw
    manifest instead. It says so, ends the interrupted epoch there, and trains on."""
    folder, manifest, store, _ = preprocessed
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    run, log = tmp_path / "run", tmp_path / "steps.jsonl"
    overrides = _fit_args(_overrides(tiny_release, manifest, store, run))

    def fit(max_steps: int, *extra: str):
        return EchoVideoCLI(args=["fit", "--config", str(EXPERIMENT), *overrides, f"--trainer.max_steps={max_steps}",
                                  "--trainer.callbacks+=test_feature_store.SampleIdRecorder",
                                  f"--trainer.callbacks.init_args.path={log}", *extra])

    fit(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = fit(5, "--ckpt_path=last", "--data.init_args.feature_store=null",
                      "--data.init_args.skip_invalid_lines=true")
    said = [str(w.message) for w in caught if "data position" in str(w.message)]
    assert said and "is a feature store's and this run reads a manifest" in said[0]
    assert resumed.trainer.global_step == 5
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(5))
    assert [s["epoch"] for s in steps] == [0, 0, 0, 1, 1]  # epoch 0 ended at the resume


def test_interrupted_preprocess_says_so_is_refused_by_fit_and_continues_to_the_same_store(
        preprocessed, tiny_release, tmp_path):
    """Ctrl-C, SIGKILL and SIGTERM, each to the whole process group (litdata's workers too) once
    a part has finished: SIGINT and SIGTERM exit with 128 + the signal and say how to go on;
    the incomplete store is refused for training; the last run finishes the same store."""
    folder, manifest, reference_store, _ = preprocessed
    store = tmp_path / "store"
    overrides = _overrides(tiny_release, manifest, store, tmp_path / "run", part_size=2)
    command = [sys.executable, "-m", "echovideo", "preprocess", "--config", str(EXPERIMENT), *overrides]
    parts = store / ".preprocess" / "node-000-of-001" / "parts" / "9x32x32"
    for number, sent in enumerate((signal.SIGINT, signal.SIGKILL, signal.SIGTERM)):
        with open(tmp_path / f"stderr-{number}.txt", "w+") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                       start_new_session=True)
            deadline = time.monotonic() + 240
            while not (parts / f"part-{number:05d}.json").is_file() and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert (parts / f"part-{number:05d}.json").is_file(), f"part {number} never finished"
            os.killpg(process.pid, sent)
            process.wait(timeout=120)
            stderr.seek(0)
            said = stderr.read()
        # Nothing of the run is left: no worker, nor a helper a worker started.
        assert process_group_ends(process.pid), f"processes of the run outlived {sent.name}"
        if sent == signal.SIGKILL:
            assert process.returncode == -signal.SIGKILL
        else:
            assert process.returncode == 128 + sent, said[-2000:]
            assert f"echovideo preprocess: stopped by {sent.name} with " in said
            assert "Re-run the same command to continue where it stopped." in said
        with pytest.raises(FeatureStoreError, match=r"the feature store is incomplete: \d of 7 preprocess parts"):
            read_store_meta(store)

    resumed = PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides]).run_preprocess()
    assert resumed.complete and resumed.written == {"9x32x32": 9}
    contents = store_contents(store)
    assert len(contents) == 9 and contents == store_contents(reference_store)
    bucket = store / "9x32x32" / "node-000-of-001"
    listed = {chunk["filename"] for chunk in json.loads((bucket / "index.json").read_text())["chunks"]}
    on_disk = {p.name for p in bucket.iterdir() if p.name != "index.json"}
    assert on_disk == listed  # no chunk left over from the stopped parts
    read_store_meta(store)  # complete now


def process_group_ends(group: int, within_s: float = 10) -> bool:
    """No live process of the group is left (a zombie holds nothing but its table entry, and
    is reaped by whoever inherited it)."""
    import psutil

    def live():
        found = []
        for process in psutil.process_iter(["status"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(process)
        return found

    deadline = time.monotonic() + within_s
    while live() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = live()
    for process in left:
        print("left:", process.pid, process.info["status"], " ".join(process.cmdline()[:6]))
    return not left


def test_store_from_another_manifest_is_refused(preprocessed, tiny_release, tmp_path):
    folder, manifest, store, _ = preprocessed
    lines = manifest.read_text(encoding="utf-8-sig").splitlines()
    lines[1] = lines[1].replace("a man walks 1", "a man runs 1")  # one caption edited, on line 2
    other = folder / "edited.jsonl"  # beside the original: the same relative paths
    other.write_text("\n".join(lines) + "\n", encoding="utf-8")
    overrides = _overrides(tiny_release, other, store, tmp_path / "run")
    with pytest.raises(ValueError, match="different manifest") as refused:
        PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides]).run_preprocess()
    assert f"the first changed line is {other}:2" in str(refused.value)


def test_fit_refuses_a_store_made_with_other_settings_naming_each_field(preprocessed, tiny_release, tmp_path,
                                                                        monkeypatch):
    """Sizes, encoders and the manifest beside the store are checked before training starts;
    each difference is named with the store's value and the experiment's."""
    folder, manifest, store, _ = preprocessed
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    overrides = _fit_args(_overrides(tiny_release, manifest, store, tmp_path / "run"))
    fit = ["fit", "--config", str(EXPERIMENT), *overrides, "--trainer.max_steps=1"]

    with pytest.raises(FeatureStoreError) as refused:
        EchoVideoCLI(args=[*fit, "--data.init_args.height=64", "--data.init_args.face_size=64"])
    message = str(refused.value)
    assert "settings.buckets: ['9x32x32'] in the store, ['9x64x32'] in this experiment" in message
    assert "settings.face_size: 32 in the store, 64 in this experiment" in message

    other_release = tmp_path / "release"
    shutil.copytree(tiny_release, other_release)
    config = other_release / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "dropout_rate": 0.3}))
    with pytest.raises(FeatureStoreError, match=r"encoders\.text_encoder: '\w+' in the store, '\w+' in this"):
        EchoVideoCLI(args=[*fit, f"--model.init_args.pretrained_path={other_release}"])

    other = tmp_path / "other.jsonl"
    other.write_text(manifest.read_text(encoding="utf-8-sig").splitlines()[0] + "\n")
    with pytest.raises(FeatureStoreError, match=f"data.train_manifest {other} is not the manifest {store} was made from"):
        EchoVideoCLI(args=[*fit, f"--data.init_args.train_manifest={other}"])
    with pytest.raises(FeatureStoreError, match=f"data.train_manifest {tmp_path / 'gone.jsonl'}: no such file"):
        EchoVideoCLI(args=[*fit, f"--data.init_args.train_manifest={tmp_path / 'gone.jsonl'}"])


@pytest.mark.parametrize("stored_version", [1, None], ids=["older_version", "before_versions_were_recorded"])
def test_fit_refuses_a_store_made_by_another_face_pipeline(preprocessed, tiny_release, tmp_path, monkeypatch,
                                                           stored_version):
    """Crops of another face pipeline (another template, resize, ...) must not be mixed with this
    kit's: fit names the version and the preprocess command to re-run."""
    from datamodules.face_pipeline import FACE_PIPELINE_VERSION

    folder, manifest, store, _ = preprocessed
    old_store = tmp_path / "old_store"
    shutil.copytree(store, old_store)
    meta_path = old_store / "store.json"
    meta = json.loads(meta_path.read_text())
    assert meta["encoders"]["face_pipeline"] == FACE_PIPELINE_VERSION
    if stored_version is None:
        del meta["encoders"]["face_pipeline"]
    else:
        meta["encoders"]["face_pipeline"] = stored_version
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    overrides = _fit_args(_overrides(tiny_release, manifest, old_store, tmp_path / "run"))
    with pytest.raises(FeatureStoreError) as refused:
        EchoVideoCLI(args=["fit", "--config", str(EXPERIMENT), *overrides, "--trainer.max_steps=1"])
    message = str(refused.value)
    assert str(meta_path) in message
    assert f"face pipeline version {stored_version!r}" in message
    assert f"this kit makes version {FACE_PIPELINE_VERSION!r}" in message
    assert "echovideo preprocess --config" in message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))


def test_two_nodes_each_write_a_shard_and_together_the_whole_store(preprocessed, tiny_release, tmp_path):
    folder, manifest, reference_store, reference = preprocessed
    store = tmp_path / "store"
    overrides = _overrides(tiny_release, manifest, store, tmp_path / "run", part_size=8)

    def node(rank: int, *extra: str):
        return PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides, "--preprocess.num_nodes=2",
                                   f"--preprocess.node_rank={rank}", *extra]).run_preprocess()

    first = node(1)
    # Node 1 takes manifest entries 1, 3, 5, ...: good1, good3, good5, good7, empty, bad_photo.
    assert not first.complete and first.written == {"9x32x32": 4}
    both = node(0)
    assert both.complete
    assert both.written == reference.written and both.skipped == reference.skipped
    assert both.captions_truncated == reference.captions_truncated
    assert json.loads((store / REPORT_FILE).read_text())["complete"]
    contents = store_contents(store)
    assert len(contents) == 9 and contents == store_contents(reference_store)
    with pytest.raises(ValueError, match="overwrite with 2 nodes"):
        node(0, "--preprocess.overwrite=true")

    # Read as one stream over both nodes' chunks (hard links: nothing copied), 2 ranks lose in
    # an epoch what they lose on the one-node store, less than one global batch.
    bucket = store / "9x32x32"
    chunks = sorted((bucket / "all-nodes").glob("*.bin"))
    assert len(chunks) == 2 and all(chunk.stat().st_nlink == 2 for chunk in chunks)
    one_node = len(two_rank_epoch(reference_store))
    assert one_node > 9 - 2 * 3 and len(two_rank_epoch(store)) == one_node
    # Read as before, a stream per node shard (5 and 4 samples): each is evened out over the
    # ranks and cut to whole batches on its own, and this epoch gave nothing at all.
    os.rename(bucket / "all-nodes", bucket / "unmerged")
    assert len(two_rank_epoch(store)) == 0


def two_rank_epoch(store: Path) -> list[str]:
    """The sample ids an epoch gives 2 ranks (one loader worker each, batch 3), read here as
    litdata deals them to ranks."""
    from litdata.utilities.env import _DistributedEnv

    seen = []
    for rank in range(2):
        dataset = open_store_dataset(store, shuffle=True, seed=0, verify_sources=False)
        for stream in getattr(dataset, "_datasets", [dataset]):
            stream.distributed_env = _DistributedEnv(world_size=2, global_rank=rank, num_nodes=1)
            stream.set_drop_last(True)  # as litdata sets it on several ranks
        loader = store_loader(dataset, batch_size=3, num_workers=1, collate_fn=collate_skipping_unreadable)
        seen += [sample for batch in loader for sample in batch[keys.SAMPLE_ID]]
    assert len(seen) == len(set(seen))
    return sorted(seen)


def test_preprocess_with_the_face_pipeline(tiny_release, face_root, tmp_path):
    """Real insightface detection, alignment, parsing and ArcFace inside preprocess; faces
    from a clip frame or a photo; no face anywhere is skipped as `no_face`."""
    from datamodules.face_pipeline import FaceExtractor
    from datamodules.video_io import write_mp4

    # The tiny detector sees a face in a bright square of 16 px centred in a 64 px frame
    # (160 px on an anchor of stride 32 in its 640 px input).
    with_face = np.zeros((12, 64, 64, 3), dtype=np.uint8)
    with_face[:, 24:40, 24:40] = 230
    (tmp_path / "clips").mkdir()
    write_mp4(tmp_path / "clips" / "face.mp4", with_face, 8)
    write_mp4(tmp_path / "clips" / "dark.mp4", np.zeros_like(with_face), 8)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "black.png")
    write_sideways_phone_photo(tmp_path / "phone.jpg")
    manifest = tmp_path / "train.csv"
    manifest.write_text("id,video,caption,face_image\n"
                        "from_frame,clips/face.mp4,a man smiles,\n"
                        "dark,clips/dark.mp4,a man smiles,\n"
                        "black_photo,clips/face.mp4,a man smiles,black.png\n"
                        "phone,clips/face.mp4,a man smiles,phone.jpg\n", encoding="utf-8")
    store = tmp_path / "store"
    overrides = _overrides(tiny_release, manifest, store, tmp_path / "run") + [
        f"--data.init_args.face_models={face_root}", "--data.init_args.face_size=64"]
    report = PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides]).run_preprocess()

    assert report.complete and report.written == {"9x32x32": 2} and report.skipped == {"no_face": 2}
    assert report.face_parsing is True and "insightface" in report.face_pipeline
    assert report.encoders["face"]["parsing"] is True
    (sample,) = [s for s in open_store_dataset(store, shuffle=False, seed=0) if s[keys.SAMPLE_ID] == "from_frame"]
    # ArcFace is insightface's raw embedding of the clip's face (every frame holds the same one).
    frame = decode_clip(tmp_path / "clips" / "face.mp4", 12)[0][6].numpy()
    expected = FaceExtractor(face_root, face_size=64).extract(frame).arcface
    torch.testing.assert_close(sample[keys.ARCFACE], torch.from_numpy(expected), atol=1e-3, rtol=1e-3)


    assert_upright(stored_face_crops(store)["phone"], aligned=True)


def write_sideways_phone_photo(path: Path) -> Path:
    """A 64x64 JPEG stored on its side with EXIF orientation 6, as phones write them. Upright it
    shows a bright 16 px square face centred at (32, 32): its upper half red, its lower half blue."""
    upright = np.zeros((64, 64, 3), dtype=np.uint8)
    upright[24:32, 24:40] = (255, 170, 170)
    upright[32:40, 24:40] = (170, 170, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to display"
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(path, exif=exif.tobytes(), quality=95)
    return path


def assert_upright(crop: np.ndarray, aligned: bool) -> None:
    """Red above blue, as the photo shows upright (sideways, they would sit left and right)."""
    crop = crop.astype(int)
    if aligned:  # the ArcFace points put the eyes at 46% of the height: the square's top is above the crop
        upper, lower = crop[8:22], crop[40:56]
    else:  # the photo taken as the crop
        upper, lower = crop[25:31, 26:38], crop[33:39, 26:38]
    upper, lower = upper[upper.max(-1) > 0], lower[lower.max(-1) > 0]  # parsing may black some out
    assert len(upper) and len(lower)
    assert upper[:, 0].mean() > upper[:, 2].mean() + 40, "the top of the face is not red: the photo lies sideways"
    assert lower[:, 2].mean() > lower[:, 0].mean() + 40, "the bottom of the face is not blue: the photo lies sideways"


def test_photo_read_without_face_models_is_stored_upright(tiny_release, tmp_path, capsys):
    """Without face models the photo is taken as an aligned crop, through the same reader (EXIF)."""
    from datamodules.video_io import write_mp4

    (tmp_path / "clips").mkdir()
    write_mp4(tmp_path / "clips" / "clip.mp4", np.full((12, 32, 32, 3), 90, dtype=np.uint8), 8)
    write_sideways_phone_photo(tmp_path / "phone.jpg")
    manifest = tmp_path / "train.csv"
    manifest.write_text("id,video,caption,face_image\nphone,clips/clip.mp4,a man smiles,phone.jpg\n", encoding="utf-8")
    store = tmp_path / "store"
    overrides = _overrides(tiny_release, manifest, store, tmp_path / "run") + ["--data.init_args.face_size=64"]
    report = PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides]).run_preprocess()
    assert report.complete and report.written == {"9x32x32": 1}
    assert_upright(stored_face_crops(store)["phone"], aligned=False)
    # litdata's chatter is dropped (its progress bar and the kit's report stay).
    out = capsys.readouterr().out
    assert "feature store" in out and "Create an account" not in out and "Workers are ready" not in out


def test_buckets_by_aspect_and_length_never_mix_in_a_batch(tiny_release, tmp_path):
    from datamodules.video_datamodule import VideoFaceDataModule

    (tmp_path / "clips").mkdir()
    clips = {"wide_a": (14, 32, 48), "wide_b": (14, 32, 48), "tall_a": (14, 48, 32), "tall_b": (14, 48, 32),
             "tall_c": (14, 48, 32), "long_a": (20, 32, 48), "long_b": (20, 32, 48), "short": (5, 32, 48)}
    lines = []
    for name, (frames, height, width) in clips.items():
        write_gray_ramp_video(tmp_path / "clips" / f"{name}.mp4", frames, height, width)
        lines.append(json.dumps({"id": name, "video": f"clips/{name}.mp4", "caption": "a man walks"}))
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store"
    buckets = [[9, 32, 48], [9, 48, 32], [17, 32, 48]]
    overrides = _overrides(tiny_release, manifest, store, tmp_path / "run") + [
        f"--data.init_args.buckets={json.dumps(buckets)}"]
    report = PreprocessCLI(args=["--config", str(EXPERIMENT), *overrides]).run_preprocess()
    # Closest aspect ratio first, then the longest bucket the clip's length fits.
    assert report.written == {"9x32x48": 2, "9x48x32": 3, "17x32x48": 2}
    assert report.skipped == {"video_too_short": 1}

    data = VideoFaceDataModule(feature_store=str(store), buckets=buckets, batch_size=2, num_workers=0,
                               filters=None)  # gray ramps do not move
    data.setup("fit")
    shapes, seen = set(), []
    for batch in data.train_dataloader():  # collate stacks tensors: mixed shapes would fail here
        shapes.add(tuple(batch[keys.LATENT_MEAN].shape[1:]))
        seen += batch[keys.SAMPLE_ID]
    assert shapes == {(3, 16, 4, 6), (3, 16, 6, 4), (5, 16, 4, 6)}
    assert sorted(seen) == sorted(name for name in clips if name != "short")

    # A position saved at batch size 2 cannot be placed in these several streams at batch size
    # 1, nor can a manifest loader's: the interrupted epoch ends, the next is whole.
    loader = data.train_dataloader()
    next(iter(loader))
    saved = loader.state_dict()
    for state, said in ((saved, "this store has several streams"), ({"source": "manifest"}, "not this feature store's")):
        other = VideoFaceDataModule(feature_store=str(store), buckets=buckets, batch_size=1, num_workers=0,
                                    filters=None)
        other.setup("fit")
        told = []
        other._report_resume = told.append
        resumed = other.train_dataloader()
        resumed.load_state_dict(state)
        assert list(resumed) == [] and said in told[0] and "goes on with the next one" in told[0]
        assert sorted(sample for batch in resumed for sample in batch[keys.SAMPLE_ID]) == sorted(seen)


def test_a_store_that_declares_a_pickled_field_is_refused(preprocessed, tmp_path):
    """litdata can store a field as a pickle, which would run code when read: refused, by file."""
    _, _, store, _ = preprocessed
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (index,) = copy.glob("*/*/index.json")
    meta = json.loads(index.read_text())
    assert open_store_dataset(copy, shuffle=False, seed=0) is not None  # the kit's own formats are data
    meta["config"]["data_format"][0] = "pickle"
    index.write_text(json.dumps(meta))
    with pytest.raises(FeatureStoreError, match=rf"{index}: config.data_format declares \['pickle'\]"):
        open_store_dataset(copy, shuffle=False, seed=0)


def test_the_node_that_merges_last_leaves_the_complete_report(tmp_path, monkeypatch):
    """Node 0 merges while node 1 is unfinished; node 1 then finishes and writes the complete
    merge before node 0's stale one lands. Node 0 sees the reports changed and writes again."""
    from dataclasses import asdict

    from datamodules import preprocess
    from datamodules.feature_store import REPORT_FILE, UNCONDITIONAL_FILE, WORK_DIR, shard_name

    store = tmp_path / "store"
    store.mkdir()
    (store / UNCONDITIONAL_FILE).write_bytes(b"")
    (store / "store.json").write_text(json.dumps({"buckets": []}))

    def node_report(rank: int, complete: bool) -> None:
        path = store / WORK_DIR / shard_name(rank, 2) / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        report = preprocess.PreprocessReport(manifest="m", store=str(store), written={"9x32x32": 1},
                                             parts_done=int(complete), parts_total=1, complete=complete)
        path.write_text(json.dumps(asdict(report)))

    node_report(0, True)
    node_report(1, False)
    write, node_one_done = preprocess.write_text_atomically, []

    def node_one_finishes_first(path, text):
        if path == store / REPORT_FILE and not node_one_done:
            node_one_done.append(True)
            node_report(1, True)
            write(path, json.dumps(asdict(preprocess._merge_node_reports(store, 2))))  # node 1's merge
        write(path, text)

    monkeypatch.setattr(preprocess, "write_text_atomically", node_one_finishes_first)
    assert preprocess._write_merged_report(store, 2, filters=None).complete
    assert json.loads((store / REPORT_FILE).read_text())["complete"]
