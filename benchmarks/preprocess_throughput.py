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

What the quality measures (datamodules/quality.py) cost:

- `--face-models`: writes the tiny face models (lightning_modules/tiny_face_models.py) and
  preprocesses with them (`face_models=`, no `identity_encoder`), so the face and identity
  measures are made; every clip and photo then shows a face the tiny detector finds (a
  bright checkered square, a quarter of the long side, on the colour field darkened).
- `--compare-measures`: runs the whole preprocess `--repeats` times with the measures on
  (`measure=True`, default filters) and off (`measure=False`, `filters=None`) on the same
  data and release, a fresh store each run, the order alternated round by round; prints
  the median end-to-end seconds of each and their ratio, and the same for the CPU seconds
  of this process and its workers (steadier when other processes share the cores).
- `--measure-costs`: after the preprocess runs, in this process (no workers), times each
  measure of one sample on synthetic frames of every `--cost-window` FxHxW (default the
  release's 49x480x848): the video measures (optical flow on a few pairs, histograms of all frames),
  the face measures (tiny face models on the 4 sampled frames) and the caption token count
  (the tiny release's tokenizer, a 60-word caption); median of `--cost-repeats`. Then an
  estimate, from FLOPs and not measured, of what the real face networks add per sample
  beside the encoders the sample already needs (VAE, T5-XXL and SigLIP FLOPs counted by
  torch's FlopCounterMode on meta-device builds of the release's configs).

    .venv/bin/python benchmarks/preprocess_throughput.py --clips 32 --num-workers 2
    .venv/bin/python benchmarks/preprocess_throughput.py --clips 16 --face-models --compare-measures --measure-costs
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import subprocess
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

# The tiny SCRFD (lightning_modules/tiny_face_models.py) scores a bright square of side
# 5 x stride centred on an anchor of that stride; its input is the frame scaled so that the
# long side is 640 (insightface's det_size), placed top-left. A square of a quarter of the
# long side is 160 px there: 5 x the stride 32, on that stride's anchor grid.
DETECTOR_INPUT = 640
DETECTOR_STRIDE = 32
DARK_FIELD_MAX = 80
# Published per-pass costs of the release's face networks (insightface model zoo): SCRFD-10g
# at 640x640 and glintr100 (ResNet-100 ArcFace) at 112x112. Not measured here.
SCRFD_10G_FLOPS = 10e9
GLINTR100_FLOPS = 24e9
# For turning the encoders' FLOPs into seconds: an H200's dense bf16 datasheet rate (as in
# docs/benchmarks.md) at an assumed 40 % utilisation. An assumption, not a measurement.
ASSUMED_ENCODER_FLOPS_PER_S = 0.40 * 989.5e12


def smooth_clip(rng: np.random.Generator, num_frames: int, height: int, width: int,
                face: bool = False) -> np.ndarray:
    """F x H x W x 3 uint8: a coarse random colour field, drifting and upsampled (compressible like video).

    With `face`, the field is darkened to <= DARK_FIELD_MAX and a face square is drawn on
    every frame (`face_box`).

    numpy and PIL only, on purpose: a multi-threaded torch op in this process before
    `preprocess` forks its workers leaves them hung in their first matmul (GNU OpenMP is
    not fork-safe), see the README.
    """
    coarse = rng.random((2, 6, 6, 3), dtype=np.float32)
    shift = int(rng.integers(1, 4))
    if face:
        cx, cy, side = face_box(height, width)
        square = face_square(side)
    frames = []
    for index in range(num_frames):
        t = index / max(num_frames - 1, 1)
        key = ((coarse[0] * (1 - t) + coarse[1] * t) * 255).round().astype(np.uint8)
        frame = np.asarray(Image.fromarray(key).resize((width, height), Image.Resampling.BICUBIC))
        frame = np.roll(frame, (index * shift, index * shift), axis=(0, 1))
        if face:
            frame = (frame.astype(np.uint16) * DARK_FIELD_MAX // 255).astype(np.uint8)
            frame[cy - side // 2:cy - side // 2 + side, cx - side // 2:cx - side // 2 + side] = square
        frames.append(frame)
    return np.stack(frames)


def face_box(height: int, width: int) -> tuple[int, int, int]:
    """(centre x, centre y, side) of a face square the tiny detector finds: a quarter of the
    long side, its centre the anchor of stride 32 nearest the frame's centre."""
    scale = DETECTOR_INPUT / max(height, width)
    side = round(DETECTOR_INPUT / 4 / scale)

    def snapped(centre: float) -> int:
        return round(round(centre * scale / DETECTOR_STRIDE) * DETECTOR_STRIDE / scale)

    return snapped(width / 2), snapped(height / 2), side


def face_square(side: int) -> np.ndarray:
    """side x side x 3 uint8: brightness 160-255 (bright left half) with a 2-px checker, so the
    face crop is sharp and its two halves give the tiny ArcFace something to embed."""
    y, x = np.mgrid[0:side, 0:side]
    value = np.where(x < side // 2, 255, 176) - ((x // 2 + y // 2) % 2) * 16
    return np.repeat(value.astype(np.uint8)[..., None], 3, axis=-1)


def write_dataset(folder: Path, num_clips: int, num_frames: int, height: int, width: int,
                  face_size: int, seed: int = 0, faces: bool = False) -> Path:
    from datamodules.video_io import write_mp4

    (folder / "clips").mkdir(parents=True, exist_ok=True)
    (folder / "faces").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(num_clips):
        clip = f"clips/clip_{index:05d}.mp4"
        face = f"faces/face_{index:05d}.png"
        write_mp4(folder / clip, smooth_clip(rng, num_frames, height, width, face=faces), fps=8)
        Image.fromarray(smooth_clip(rng, 1, face_size, face_size, face=faces)[0]).save(folder / face)
        caption = " ".join(rng.choice(CAPTION_WORDS, size=8))
        lines.append(json.dumps({"id": f"clip_{index:05d}", "video": clip, "caption": caption,
                                 "face_image": face}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def write_face_models(root: Path) -> Path:
    """The tiny face models, written in a child process: writing them runs BiSeNet forward,
    a multi-threaded torch op that must not run here before `preprocess` forks its workers."""
    code = ("import sys; from lightning_modules.tiny_face_models import write_tiny_face_models; "
            "write_tiny_face_models(sys.argv[1], seed=0)")
    subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, check=True)
    return root


def store_bytes(store: Path) -> tuple[int, int]:
    """(sum of chunk file sizes, samples) over every bucket listed in the store."""
    total, samples = 0, 0
    for index in store.glob("*/*/index.json"):
        chunks = json.loads(index.read_text())["chunks"]
        total += sum((index.parent / chunk["filename"]).stat().st_size for chunk in chunks)
        samples += sum(chunk["chunk_size"] for chunk in chunks)
    return total, samples


def parse_window(text: str) -> tuple[int, int, int]:
    frames, height, width = (int(part) for part in text.lower().split("x"))
    return frames, height, width


def run(args) -> None:
    import datamodules.preprocess as preprocess_module
    from datamodules.feature_store import Bucket
    from datamodules.preprocess import EncoderSpec, StoreSettings, preprocess
    from datamodules.quality import QualityFilters
    from lightning_modules.tiny import build_tiny_identity_encoder, write_tiny_release

    bucket = Bucket.parse(args.bucket)
    keep = args.out is not None
    work = Path(args.out).absolute() if keep else Path(tempfile.mkdtemp(prefix="preprocess-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        manifest = write_dataset(work / "data", args.clips, args.clip_frames, args.clip_size, args.clip_size,
                                 args.face_size, faces=args.face_models)
        release = work / "release"
        if not (release / "transformer").is_dir():
            write_tiny_release(release)
        face_root = write_face_models(work / "face_encoder") if args.face_models else None
        print(f"wrote {args.clips} clips ({args.clip_frames} frames, {args.clip_size}x{args.clip_size}"
              f"{', a face in each' if args.face_models else ''}) and a tiny release"
              f"{' and the tiny face models' if args.face_models else ''} in {time.perf_counter() - started:.1f} s",
              flush=True)

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
        if face_root is not None:
            encoders = EncoderSpec(pretrained_path=str(release), encoder_dtype="float32",
                                   identity_encoder=None, face_models=str(face_root))
        else:
            encoders = EncoderSpec(pretrained_path=str(release), encoder_dtype="float32",
                                   identity_encoder=build_tiny_identity_encoder(), face_models=None)
        t0 = time.perf_counter()
        report = preprocess(manifest, store, settings, encoders, num_workers=args.num_workers,
                            part_size=args.part_size, chunk_bytes=args.chunk_bytes, overwrite=True)
        total = time.perf_counter() - t0
        preprocess_module._print_overall_progress = report_progress
        check_written(report, args.clips)

        nbytes, samples = store_bytes(store)
        rate = args.clips / total
        print()
        print(f"preprocess: {args.clips} clips, bucket {bucket.name}, {args.num_workers} workers, "
              f"part_size {args.part_size}, {report.parts_total} part(s), tiny encoders on CPU"
              f"{', tiny face models' if face_root is not None else ''}")
        print(f"  end to end            {total:8.2f} s")
        print(f"  throughput            {rate:8.2f} clips/s   {total / args.clips:.3f} s/clip")
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
        if face_root is not None:
            print_measured_faces(store)

        if args.compare_measures:
            def timed(measure: bool) -> float:
                fresh = work / f"store-{'on' if measure else 'off'}"
                shutil.rmtree(fresh, ignore_errors=True)
                begin, cpu_begin = time.perf_counter(), cpu_seconds()
                result = preprocess(manifest, fresh, settings, encoders, num_workers=args.num_workers,
                                    part_size=args.part_size, chunk_bytes=args.chunk_bytes, overwrite=True,
                                    filters=QualityFilters() if measure else None, measure=measure)
                seconds, cpu = time.perf_counter() - begin, cpu_seconds() - cpu_begin
                check_written(result, args.clips)
                shutil.rmtree(fresh, ignore_errors=True)
                return seconds, cpu

            compare_measures(timed, args)

        if args.measure_costs:
            measure_costs(args, release, face_root)
        if keep:
            print(f"kept: data {work / 'data'}, release {release}, store {store}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def check_written(report, clips: int) -> None:
    written = sum(report.written.values())
    if not report.complete or written != clips:
        print(report.summary())
        raise SystemExit(f"expected {clips} written samples, got {written}")


def print_measured_faces(store: Path) -> None:
    """How many stored samples the tiny detector saw a face in (else the face measures cost little)."""
    from datamodules.feature_store import open_store_dataset

    dataset = open_store_dataset(store, shuffle=False, seed=0)
    presence = [json.loads(super(type(dataset), dataset).__getitem__(i)["quality"])["face_presence"]
                for i in range(len(dataset))]
    full = sum(value == 1.0 for value in presence)
    print(f"  faces seen            {full} of {len(presence)} samples with a face in all sampled frames")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the workers):
    steadier than wall time when other processes share the cores."""
    import resource

    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def compare_measures(timed, args) -> None:
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for index in range(args.repeats):
        order = (True, False) if index % 2 == 0 else (False, True)
        for measure in order:
            seconds, cpu_used = timed(measure)
            wall[measure].append(seconds)
            cpu[measure].append(cpu_used)
        print(f"  round {index + 1}: on {wall[True][-1]:.2f} s ({cpu[True][-1]:.2f} CPU s), "
              f"off {wall[False][-1]:.2f} s ({cpu[False][-1]:.2f} CPU s)", flush=True)
    on, off = float(np.median(wall[True])), float(np.median(wall[False]))
    cpu_on, cpu_off = float(np.median(cpu[True])), float(np.median(cpu[False]))
    print()
    print(f"measures on vs off: {args.clips} clips, {args.repeats} rounds alternated, medians "
          f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"  measures on           {on:8.2f} s   {args.clips / on:.2f} clips/s   (runs {fmt(wall[True])})")
    print(f"  measures off          {off:8.2f} s   {args.clips / off:.2f} clips/s   (runs {fmt(wall[False])})")
    print(f"  measures on / off     {on / off:8.3f}x  end to end ({(on - off) / args.clips * 1e3:+.1f} ms per clip)")
    print(f"  CPU time on / off     {cpu_on / cpu_off:8.3f}x  ({cpu_on:.2f} vs {cpu_off:.2f} CPU s, this process and "
          f"its workers; {(cpu_on - cpu_off) / args.clips * 1e3:+.1f} CPU ms per clip)")


def fmt(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def median_ms(call, repeats: int, inner: int = 1) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        for _ in range(inner):
            call()
        times.append((time.perf_counter() - begin) / inner)
    return float(np.median(times)) * 1e3


def measure_costs(args, release: Path, face_root: Path | None) -> None:
    """Per-sample milliseconds of each measure, timed here after the preprocess runs (so torch
    and OpenCV may use threads), then the FLOP estimate for the real face networks."""
    import cv2
    from transformers import AutoTokenizer

    from datamodules.face_pipeline import FaceExtractor
    from datamodules.quality import FACE_FRAMES, face_measures, flow_pair_ends, measure_sample, video_measures

    rng = np.random.default_rng(1)
    tokenizer = AutoTokenizer.from_pretrained(release / "tokenizer")
    caption = " ".join(rng.choice(CAPTION_WORDS, size=60))
    extractor = None
    if face_root is not None:
        extractor = FaceExtractor(face_root, device="cpu", face_size=args.face_size)
    print()
    print(f"cost of each measure per sample, this process, median of {args.cost_repeats} "
          f"(OpenCV {cv2.getNumThreads()} threads; synthetic frames with a face square)")
    for text in args.cost_window.split(","):
        frames_count, height, width = parse_window(text)
        frames = smooth_clip(rng, frames_count, height, width, face=True)
        print(f"  window {frames_count}x{height}x{width}:")
        video_measures(frames)  # warm-up
        video_ms = median_ms(lambda: video_measures(frames), args.cost_repeats)
        print(f"    video measures      {video_ms:8.2f} ms  (Farneback flow on {len(flow_pair_ends(frames_count))} "
              f"frame pairs + HSV histograms of all {frames_count - 1})")
        if extractor is not None:
            reference = extractor.largest_faces([frames[0]])[0]
            reference = None if reference is None else reference.embedding
            found = face_measures(frames, reference, extractor)  # warm-up; loads the models
            face_ms = median_ms(lambda: face_measures(frames, reference, extractor), args.cost_repeats)
            print(f"    face measures       {face_ms:8.2f} ms  (tiny SCRFD + tiny glintr100 on "
                  f"{FACE_FRAMES} frames; faces seen in {found['face_presence']:.0%} of them)")
        else:
            reference, face_ms = None, 0.0
            print("    face measures           none  (no --face-models: not made)")
        tokens = len(tokenizer(caption, add_special_tokens=True).input_ids)
        token_ms = median_ms(lambda: tokenizer(caption, add_special_tokens=True).input_ids,
                             args.cost_repeats, inner=100)
        print(f"    caption tokens      {token_ms:8.3f} ms  (tiny release's tokenizer, 60 words, {tokens} tokens)")
        total_ms = median_ms(lambda: measure_sample(frames, reference, tokens, extractor), args.cost_repeats)
        print(f"    measure_sample      {total_ms:8.2f} ms  (all of them in one call)")
    print_flop_estimate(parse_window(args.cost_window.split(",")[-1]), video_ms + face_ms + token_ms)


def print_flop_estimate(window: tuple[int, int, int], measured_ms: float) -> None:
    from datamodules.quality import FACE_FRAMES

    frames, height, width = window
    counted = encoder_flops(frames, height, width)
    face = FACE_FRAMES * (SCRFD_10G_FLOPS + GLINTR100_FLOPS)
    encoders = sum(counted.values())
    print()
    print(f"ESTIMATE from FLOPs, not measured: the real face networks at {frames}x{height}x{width}")
    print(f"  SCRFD-10g             {FACE_FRAMES} x {SCRFD_10G_FLOPS / 1e9:.0f} GFLOPs (640x640 input)"
          f"  = {FACE_FRAMES * SCRFD_10G_FLOPS / 1e9:6.0f} GFLOPs")
    print(f"  glintr100             {FACE_FRAMES} x {GLINTR100_FLOPS / 1e9:.0f} GFLOPs (112x112 crop)"
          f"   = {FACE_FRAMES * GLINTR100_FLOPS / 1e9:6.0f} GFLOPs")
    print(f"  face measures added   {face / 1e9:36.0f} GFLOPs per sample")
    print("  encoders a sample already needs (torch FlopCounterMode, forward, on meta-device builds")
    print("  of lightning_modules/random_release.py's RELEASE_SIZE configs):")
    for name, flops in counted.items():
        print(f"    {name:38s} {flops:10.3e}")
    print(f"    {'total':38s} {encoders:10.3e}")
    print(f"  face measures / encoders  {face / encoders:.3%} of the FLOPs (the reference photo's "
          "face models, also run per sample, left out: an upper bound)")
    encoder_s = encoders / ASSUMED_ENCODER_FLOPS_PER_S
    print(f"  in time, ASSUMING the encoders run at 40 % of an H200's 989.5 dense bf16 TFLOP/s: "
          f"{encoder_s:.2f} s per sample;")
    print(f"  the measures' work timed above on this CPU ({measured_ms:.0f} ms: video + face with the tiny "
          f"networks + tokens) is {measured_ms / 1e3 / encoder_s:.1%} of that if a worker does it between")
    print("  two encoder calls (the face networks' own share then comes from the GPU FLOPs above)")


def encoder_flops(frames: int, height: int, width: int) -> dict[str, float]:
    """Forward FLOPs of the per-sample encoder calls of `preprocess` at the release's sizes,
    counted on meta tensors (shapes only: no weights, no compute, no threads)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel

    from lightning_modules.random_release import RELEASE_SIZE

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**RELEASE_SIZE.vae).eval()
        text_encoder = T5EncoderModel(T5Config(**RELEASE_SIZE.text_encoder)).eval()
        siglip = SiglipVisionModel(SiglipVisionConfig(**RELEASE_SIZE.siglip)).eval()
    size = RELEASE_SIZE.siglip["image_size"]
    tokens = RELEASE_SIZE.tokenizer_max_length
    calls = {
        f"VAE encoder, video {frames}x{height}x{width}": lambda: vae.encode(
            torch.empty(1, 3, frames, height, width, device="meta")),
        f"VAE encoder, face latent 1x{height}x{width}": lambda: vae.encode(
            torch.empty(1, 3, 1, height, width, device="meta")),
        f"T5 v1.1 XXL, {tokens} tokens": lambda: text_encoder(
            input_ids=torch.zeros(1, tokens, dtype=torch.long, device="meta")),
        f"SigLIP base/16, {size}x{size} face": lambda: siglip(
            pixel_values=torch.empty(1, 3, size, size, device="meta")),
    }
    counted = {}
    for name, call in calls.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            call()
        counted[name] = float(counter.get_total_flops())
    return counted


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
    parser.add_argument("--face-models", action="store_true",
                        help="preprocess with the tiny face models, a face drawn in every clip and photo")
    parser.add_argument("--compare-measures", action="store_true",
                        help="time the whole preprocess with the quality measures on and off")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of --compare-measures (on and off each)")
    parser.add_argument("--measure-costs", action="store_true",
                        help="time each quality measure per sample, then estimate the real face networks' share")
    parser.add_argument("--cost-window", default="49x480x848",
                        help="FxHxW window(s) for --measure-costs, comma-separated (the last one is estimated)")
    parser.add_argument("--cost-repeats", type=int, default=7, help="timings per measure (median)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
