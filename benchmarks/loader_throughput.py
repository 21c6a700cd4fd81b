"""Throughput of the feature-store training loader (litdata StreamingDataLoader).

Measures the loader exactly as `VideoFaceDataModule._store_loader` builds it
(`open_store_dataset` + `store_loader` (litdata StreamingDataLoader)(batch_size, num_workers,
collate_fn=collate_skipping_unreadable)`) on two stores:

1. tiny: a store written by `preprocess` with the tiny encoders (9x64x64 bucket), or an
   existing store given with `--store`; sources are verified (`verify_sources=True`).
2. full-size: a synthetic store written directly with `litdata.optimize`, whose records
   have the layout, shapes and dtypes `preprocess` writes at the 49x480x848 bucket
   (random values; encoding them for real is far too slow on a CPU). Its `sources` name
   files that do not exist, so it is read with `verify_sources=False`.

Each store is read for `--samples` samples after `--warmup` batches (epochs are repeated,
their restarts included, when the store is smaller), and the full-size one once more
after dropping its chunk files from the page cache (`posix_fadvise(DONTNEED)` on those
files only), so the figure is not only a read from memory. Prints samples/s, MB/s and the
ratio to the requirement: 10x what one H100 consumes at full size (about one sample per
3 s at 40% MFU), i.e. >= 3.3 samples/s.

    .venv/bin/python benchmarks/loader_throughput.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REQUIRED_SAMPLES_PER_S = 10 / 3  # 10x one H100 at ~3 s per full-size sample
FULL_BUCKET = "49x480x848"
# Shapes at 49x480x848: 13 latent frames, 16 channels, 60 x 106; SigLIP base patch16-224
# (196 tokens x 768), ArcFace 512, T5-XXL 226 x 4096.
FULL_SHAPES = {
    "latent_mean": (13, 16, 60, 106),
    "latent_std": (13, 16, 60, 106),
    "face_latent": (1, 16, 60, 106),
    "siglip_tokens": (196, 768),
    "text_embeds": (226, 4096),
}
ARCFACE_DIM = 512


def face_png(seed: int) -> bytes:
    """A 512 x 512 PNG of about 300 KB (gradient plus low-amplitude noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:512, 0:512]
    image = np.stack([(x / 2) % 256, (y / 2) % 256, ((x + y) / 4) % 256], -1) + rng.integers(0, 4, (512, 512, 3))
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class FullSizeRecord:
    """`optimize`'s function: index -> one store record at full size (random values).

    Same keys, dtypes and storage as `datamodules.preprocess.EncodeSample` writes:
    bfloat16 tensors stored as int16 bits, arcface float32, the PNG as bytes, strings.
    """

    def __init__(self):
        self._png = None

    def __call__(self, index: int) -> dict:
        from datamodules import batch as keys
        from datamodules.feature_store import FACE_CROP_PNG, SOURCES, as_stored_bits

        if self._png is None:
            self._png = face_png(0)
        generator = torch.Generator().manual_seed(index)
        record = {
            keys.SAMPLE_ID: f"synthetic_{index:06d}",
            keys.CAPTION: "a person smiles at the camera in a park, synthetic full-size record",
            SOURCES: json.dumps([[f"/nonexistent/clip_{index:06d}.mp4", 1_000_000, 0],
                                 [f"/nonexistent/face_{index:06d}.png", 300_000, 0]]),
        }
        for key in (keys.LATENT_MEAN, keys.LATENT_STD, keys.FACE_LATENT, keys.SIGLIP_TOKENS):
            record[key] = as_stored_bits(torch.randn(FULL_SHAPES[key], generator=generator).to(torch.bfloat16))
        record[keys.ARCFACE] = torch.randn(ARCFACE_DIM, generator=generator)
        record[keys.TEXT_EMBEDS] = as_stored_bits(
            torch.randn(FULL_SHAPES[keys.TEXT_EMBEDS], generator=generator).to(torch.bfloat16))
        record[FACE_CROP_PNG] = self._png
        return record


def write_full_size_store(store: Path, samples: int, num_workers: int, chunk_bytes: str) -> None:
    """A store folder `open_store_dataset` accepts, one bucket of synthetic full-size records."""
    from litdata import optimize

    from datamodules.feature_store import REPORT_FILE, STORE_FORMAT, STORE_META, shard_name

    store.mkdir(parents=True, exist_ok=True)
    (store / STORE_META).write_text(json.dumps({"format": STORE_FORMAT, "buckets": [FULL_BUCKET],
                                                "num_nodes": 1, "synthetic": True}) + "\n")
    (store / REPORT_FILE).write_text(json.dumps({"complete": True, "synthetic": True}) + "\n")
    optimize(fn=FullSizeRecord(), inputs=list(range(samples)),
             output_dir=str(store / FULL_BUCKET / shard_name(0, 1)),
             chunk_bytes=chunk_bytes, num_workers=num_workers, reorder_files=False,
             keep_data_ordered=True, start_method="fork", verbose=False)


def write_tiny_store(work: Path, clips: int, num_workers: int) -> Path:
    from datamodules.feature_store import Bucket
    from datamodules.preprocess import EncoderSpec, StoreSettings, preprocess
    from lightning_modules.tiny import build_tiny_identity_encoder, write_tiny_release
    from preprocess_throughput import write_dataset

    manifest = write_dataset(work / "data", clips, 17, 64, 64, 64)
    release = write_tiny_release(work / "release")
    store = work / "tiny_store"
    settings = StoreSettings(buckets=(Bucket(9, 64, 64),), frame_stride=1, face_size=64,
                             reference_frame="outside_window", seed=0)
    encoders = EncoderSpec(pretrained_path=str(release), encoder_dtype="float32",
                           identity_encoder=build_tiny_identity_encoder(), face_models=None)
    report = preprocess(manifest, store, settings, encoders, num_workers=num_workers, part_size=clips)
    if not report.complete:
        raise SystemExit(report.summary())
    return store


def chunk_files(store: Path) -> list[Path]:
    files = []
    for index in sorted(store.glob("*/*/index.json")):
        files += [index.parent / chunk["filename"] for chunk in json.loads(index.read_text())["chunks"]]
    return files


def drop_from_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def batch_bytes(batch: dict) -> int:
    return sum(value.nbytes for value in batch.values() if isinstance(value, torch.Tensor))


def measure(store: Path, verify_sources: bool, samples: int, warmup: int, num_workers: int,
            batch_size: int) -> dict:
    """Iterate the training loader; time `samples` samples after `warmup` batches."""
    from datamodules.batch import SKIPPED
    from datamodules.feature_store import open_store_dataset, store_loader
    from datamodules.video_dataset import collate_skipping_unreadable

    dataset = open_store_dataset(store, shuffle=True, seed=0, verify_sources=verify_sources)
    loader = store_loader(dataset, batch_size, num_workers, collate_skipping_unreadable)
    seen_batches, counted, nbytes, skipped, epochs = 0, 0, 0, 0, 0
    created = time.perf_counter()
    first_batch_s = started = None
    while counted < samples:
        epochs += 1
        for batch in loader:
            seen_batches += 1
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - created
            skipped += int(batch[SKIPPED].sum())
            if seen_batches == warmup:
                started = time.perf_counter()
                continue
            if started is None:
                continue
            counted += len(batch.get("sample_id", ()))
            nbytes += batch_bytes(batch)
            if counted >= samples:
                break
        if started is None:
            raise SystemExit(f"{store}: fewer than {warmup} batches in an epoch; lower --warmup")
    elapsed = time.perf_counter() - started
    return {"samples": counted, "seconds": elapsed, "samples_per_s": counted / elapsed,
            "mb_per_s": nbytes / elapsed / 1e6, "mb_per_sample": nbytes / counted / 1e6,
            "skipped": skipped, "epochs": epochs, "first_batch_s": first_batch_s}


def store_bytes_per_sample(store: Path) -> float:
    files = chunk_files(store)
    samples = sum(chunk["chunk_size"] for index in store.glob("*/*/index.json")
                  for chunk in json.loads(index.read_text())["chunks"])
    return sum(path.stat().st_size for path in files) / samples


def print_result(name: str, result: dict, store: Path) -> None:
    rate = result["samples_per_s"]
    print(f"{name}")
    print(f"  {result['samples']} samples in {result['seconds']:.2f} s over {result['epochs']} epoch(s) "
          f"(first batch {result['first_batch_s']:.2f} s after the loader was built; skipped {result['skipped']})")
    print(f"  {rate:8.2f} samples/s   {result['mb_per_s']:8.1f} MB/s of batch tensors "
          f"({result['mb_per_sample']:.3f} MB/sample; {store_bytes_per_sample(store) / 1e6:.3f} MB/sample in chunks)")
    print(f"  {rate / REQUIRED_SAMPLES_PER_S:8.1f} x the requirement of {REQUIRED_SAMPLES_PER_S:.1f} samples/s "
          f"({'meets' if rate >= REQUIRED_SAMPLES_PER_S else 'BELOW'})", flush=True)


def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        loader_args = dict(warmup=args.warmup, num_workers=args.num_workers, batch_size=args.batch_size)
        results = []
        if not args.skip_tiny:
            t0 = time.perf_counter()
            tiny = Path(args.store) if args.store else write_tiny_store(work, args.tiny_clips, args.num_workers)
            if not args.store:
                print(f"tiny store: {args.tiny_clips} clips preprocessed in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            results.append(("tiny store (9x64x64, verify_sources=True)",
                            measure(tiny, True, args.samples, **loader_args), tiny))

        full = work / "full_store"
        t0 = time.perf_counter()
        write_full_size_store(full, args.full_samples, args.num_workers, args.chunk_bytes)
        files = chunk_files(full)
        print(f"full-size synthetic store: {args.full_samples} samples, {len(files)} chunk files, "
              f"{sum(p.stat().st_size for p in files) / 1e9:.2f} GB, written in {time.perf_counter() - t0:.1f} s",
              flush=True)
        measured = min(args.samples, args.full_samples - args.warmup * args.batch_size)
        results.append((f"full-size synthetic store ({FULL_BUCKET}, verify_sources=False: its sources do not "
                        "exist), page cache warm", measure(full, False, measured, **loader_args), full))
        drop_from_page_cache(files)
        results.append((f"full-size synthetic store ({FULL_BUCKET}, verify_sources=False), chunk files dropped "
                        "from the page cache first", measure(full, False, measured, **loader_args), full))

        print()
        print(f"loader: store_loader (StreamingDataLoader), num_workers={args.num_workers}, batch_size={args.batch_size}, "
              f"collate_fn=collate_skipping_unreadable, shuffle=True, warm-up {args.warmup} batches, "
              f"{os.cpu_count()} CPU cores")
        for name, result, store in results:
            print_result(name, result, store)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="an existing (tiny or real) store instead of preprocessing one")
    parser.add_argument("--tiny-clips", type=int, default=32, help="clips to preprocess for the tiny store")
    parser.add_argument("--skip-tiny", action="store_true", help="measure only the full-size synthetic store")
    parser.add_argument("--full-samples", type=int, default=320, help="records in the full-size synthetic store")
    parser.add_argument("--samples", type=int, default=300, help="samples to time after the warm-up")
    parser.add_argument("--warmup", type=int, default=16, help="batches read before timing starts")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--chunk-bytes", default="256MB", help="chunk size of the synthetic store (preprocess's default)")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
