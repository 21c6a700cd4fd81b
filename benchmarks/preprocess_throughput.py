"""Throughput of `echovideo preprocess` (datamodules/preprocess.py) with the tiny encoders.

Writes N synthetic H.264 clips (smooth random content) with a face PNG each and a JSONL
manifest, writes a tiny random release, runs `preprocess` end to end and prints clips/s,
seconds per clip, hours per 100,000 clips at that rate, and the store's bytes per sample.
With several parts (`--part-size` below the clip count) it also splits the first part,
which carries the one-off setup, from the later ones; every part still starts its own
worker processes and reloads the encoders, so the later parts' rate includes that
per-part cost (as a real run's does, once per `part_size` clips).

The tiny encoders make this a measure of the pipeline around the models (decode, resize,
litdata workers and writing), not of the VAE/T5/SigLIP at full size.

    .venv/bin/python benchmarks/preprocess_throughput.py --clips 32 --num-workers 2
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CAPTION_WORDS = ("a man woman person walks smiles looks turns in the park street room beach "
                 "city with red blue green young old happy slowly").split()


def smooth_clip(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """F x H x W x 3 uint8: a coarse random colour field, drifting and upsampled (compressible like video).

    numpy and PIL only, on purpose: a multi-threaded torch op in this process before
    `preprocess` forks its workers leaves them hung in their first matmul (GNU OpenMP is
    not fork-safe), see the README.
    """
    coarse = rng.random((2, 6, 6, 3), dtype=np.float32)
    shift = int(rng.integers(1, 4))
    frames = []
    for index in range(num_frames):
        t = index / max(num_frames - 1, 1)
        key = ((coarse[0] * (1 - t) + coarse[1] * t) * 255).round().astype(np.uint8)
        frame = np.asarray(Image.fromarray(key).resize((width, height), Image.Resampling.BICUBIC))
        frames.append(np.roll(frame, (index * shift, index * shift), axis=(0, 1)))
    return np.stack(frames)


def write_dataset(folder: Path, num_clips: int, num_frames: int, height: int, width: int,
                  face_size: int, seed: int = 0) -> Path:
    from datamodules.video_io import write_mp4

    (folder / "clips").mkdir(parents=True, exist_ok=True)
    (folder / "faces").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(num_clips):
        clip = f"clips/clip_{index:05d}.mp4"
        face = f"faces/face_{index:05d}.png"
        write_mp4(folder / clip, smooth_clip(rng, num_frames, height, width), fps=8)
        Image.fromarray(smooth_clip(rng, 1, face_size, face_size)[0]).save(folder / face)
        caption = " ".join(rng.choice(CAPTION_WORDS, size=8))
        lines.append(json.dumps({"id": f"clip_{index:05d}", "video": clip, "caption": caption,
                                 "face_image": face}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def store_bytes(store: Path) -> tuple[int, int]:
    """(sum of chunk file sizes, samples) over every bucket listed in the store."""
    total, samples = 0, 0
    for index in store.glob("*/*/index.json"):
        chunks = json.loads(index.read_text())["chunks"]
        total += sum((index.parent / chunk["filename"]).stat().st_size for chunk in chunks)
        samples += sum(chunk["chunk_size"] for chunk in chunks)
    return total, samples


def run(args) -> None:
    import datamodules.preprocess as preprocess_module
    from datamodules.feature_store import Bucket
    from datamodules.preprocess import EncoderSpec, StoreSettings, preprocess
    from lightning_modules.tiny import build_tiny_identity_encoder, write_tiny_release

    bucket = Bucket.parse(args.bucket)
    keep = args.out is not None
    work = Path(args.out).absolute() if keep else Path(tempfile.mkdtemp(prefix="preprocess-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        manifest = write_dataset(work / "data", args.clips, args.clip_frames, args.clip_size, args.clip_size,
                                 args.face_size)
        release = work / "release"
        if not (release / "transformer").is_dir():
            write_tiny_release(release)
        print(f"wrote {args.clips} clips ({args.clip_frames} frames, {args.clip_size}x{args.clip_size}) "
              f"and a tiny release in {time.perf_counter() - started:.1f} s", flush=True)

        # Timestamps of finished parts: preprocess reports every part through this function.
        part_done_at: list[float] = []
        report_progress = preprocess_module._print_overall_progress

        def record_part(*a, **k):
            part_done_at.append(time.perf_counter())
            return report_progress(*a, **k)

        preprocess_module._print_overall_progress = record_part
        store = work / "store"
        settings = StoreSettings(buckets=(bucket,), frame_stride=1, face_size=args.face_size,
                                 reference_frame="outside_window", seed=0)
        encoders = EncoderSpec(pretrained_path=str(release), encoder_dtype="float32",
                               identity_encoder=build_tiny_identity_encoder(), face_models=None)
        t0 = time.perf_counter()
        report = preprocess(manifest, store, settings, encoders, num_workers=args.num_workers,
                            part_size=args.part_size, chunk_bytes=args.chunk_bytes, overwrite=True)
        total = time.perf_counter() - t0
        preprocess_module._print_overall_progress = report_progress

        written = sum(report.written.values())
        if not report.complete or written != args.clips:
            print(report.summary())
            raise SystemExit(f"expected {args.clips} written samples, got {written}")
        nbytes, samples = store_bytes(store)
        rate = written / total
        print()
        print(f"preprocess: {written} clips, bucket {bucket.name}, {args.num_workers} workers, "
              f"part_size {args.part_size}, {report.parts_total} part(s), tiny encoders on CPU")
        print(f"  end to end            {total:8.2f} s")
        print(f"  throughput            {rate:8.2f} clips/s   {total / written:.3f} s/clip")
        print(f"  per 100,000 clips     {100_000 / rate / 3600:8.2f} h at this rate")
        print(f"  store                 {nbytes / samples / 1e3:8.1f} kB/sample "
              f"({nbytes / 1e6:.2f} MB in chunks / {samples} samples)")
        if len(part_done_at) >= 2:
            sizes = [min(args.part_size, args.clips - i * args.part_size) for i in range(len(part_done_at))]
            first = part_done_at[0] - t0
            rest = part_done_at[-1] - part_done_at[0]
            steady = sum(sizes[1:]) / rest
            per_part = rest / (len(part_done_at) - 1)
            print(f"  first part            {first:8.2f} s for {sizes[0]} clips (setup + worker start + encoder load)")
            print(f"  later parts           {per_part:8.2f} s/part, {steady:.2f} clips/s "
                  f"(each still starts workers and reloads encoders)")
            print(f"  setup beyond a part   {first - per_part * sizes[0] / np.mean(sizes[1:]):8.2f} s "
                  "(first part minus a later part of the same size)")
            print(f"  per 100,000 clips     {100_000 / steady / 3600:8.2f} h at the later parts' rate")
        else:
            print("  (one part: no split of setup vs steady state; pass --part-size below --clips)")
        if keep:
            print(f"kept: data {work / 'data'}, release {release}, store {store}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    # `kill -USR1 <pid>` prints every thread's stack of a stuck process (workers inherit it).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32, help="synthetic clips to write and encode")
    parser.add_argument("--num-workers", type=int, default=2, help="preprocess worker processes")
    parser.add_argument("--part-size", type=int, default=16, help="clips per preprocess part")
    parser.add_argument("--bucket", default="9x64x64", help="FxHxW of the store's one bucket")
    parser.add_argument("--clip-frames", type=int, default=17)
    parser.add_argument("--clip-size", type=int, default=64, help="side of the square synthetic clips")
    parser.add_argument("--face-size", type=int, default=64)
    parser.add_argument("--chunk-bytes", default="256MB")
    parser.add_argument("--out", default=None, help="keep data, release and store here (default: temp dir)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
