"""`echovideo preprocess`: a manifest in, a feature store (datamodules/feature_store.py) out.

The engine is litdata's `optimize`: it runs the encoding function in worker processes
(one per GPU; litdata hands each worker its `cuda:<i>`) and writes the chunked streaming
format training reads. It was chosen over Lightning's predict loop because it already
writes that format, with chunking and object-storage upload. Several machines share the
work by node rank: node r takes every n-th valid sample and writes its own shard of each
bucket (litdata's own multi-node mode runs only on its hosted platform), so nodes never
write the same files and each resumes on its own.

Resuming: each bucket's samples are cut, in manifest order, into parts of `part_size`,
and every part is one `optimize` call that appends to the bucket's dataset. litdata
publishes a bucket's `index.json` by atomic rename when a call finishes, so a sample is
either in a finished part or in none; a part cut short by a kill leaves only unlisted
chunk files, which the next run deletes before it redoes that part. A re-run therefore
continues at the first unfinished part and ends with the same store as an uninterrupted
run. (litdata's own `use_checkpoint` resume is not used: it counts written samples, not
inputs, so skipped samples would shift where it resumes.) The cost of a kill is at most
one part of work, and each part reloads the encoders in its workers, so `part_size` trades
the two (the default, 2048 clips, is tens of minutes on one 8-GPU node at full size).

Bad samples are skipped, never fatal: each worker appends one JSON line per sample to a
log of its part, and a finished part's log becomes its summary; the report counts
samples written per bucket, skipped per reason (`datamodules/skip_reasons.py`) and
captions cut to the text encoder's limit.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from datamodules import batch as keys
from datamodules.feature_store import (
    FACE_CROP_PNG,
    QUALITY,
    REPORT_PAGE,
    REPORT_FILE,
    SOURCES,
    STORE_FORMAT,
    STORE_META,
    UNCONDITIONAL_FILE,
    WORK_DIR,
    Bucket,
    FeatureStoreError,
    merge_node_shards,
    shard_name,
    as_stored_bits,
    encode_png,
    read_store_meta,
    source_fingerprint,
)
from datamodules.files import file_sha256, write_text_atomically
from datamodules.manifest import ManifestEntry, check_manifest
from datamodules.quality import FILTERS, MEASURES_VERSION, QualityFilters, fails, measure_sample
from datamodules.skip_reasons import EMPTY_CAPTION, SKIP_REASONS, UNREADABLE_VIDEO, VIDEO_TOO_SHORT, SkippedSample
from datamodules.video_dataset import (
    SampleReadError,
    decode_clip,
    reference_face,
    resize_and_center_crop,
)

STORE_DTYPE = torch.bfloat16
# What the report keeps of each measured sample: where it is, its training window
# ([start frame, stride, frames]) and its quality measures.
SAMPLE_FIELDS = ("sample_id", "line", "bucket", "video", "face_image", "window", "measures")


@dataclass(frozen=True)
class StoreSettings:
    """Everything that decides the stored values; a re-run must use the same."""

    buckets: tuple[Bucket, ...]
    frame_stride: int
    face_size: int
    reference_frame: str
    seed: int


@dataclass
class EncoderSpec:
    """Where the encoders come from; built lazily inside each worker process."""

    pretrained_path: str
    encoder_dtype: str
    identity_encoder: torch.nn.Module | None
    face_models: str | None


@dataclass
class PreprocessReport:
    manifest: str
    store: str
    samples_in_manifest: int = 0
    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_samples: list[dict] = field(default_factory=list)
    captions_truncated: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    filters: dict | None = None
    would_keep: dict[str, int] = field(default_factory=dict)
    measured: bool = True
    face_parsing: bool | None = None
    face_pipeline: str = ""
    encoders: dict = field(default_factory=dict)
    parts_done: int = 0
    parts_total: int = 0
    complete: bool = False

    def summary(self) -> str:
        lines = [f"feature store {self.store} ({'complete' if self.complete else 'INCOMPLETE'}, "
                 f"{self.parts_done}/{self.parts_total} parts)",
                 f"  manifest:            {self.manifest} ({self.samples_in_manifest} samples)"]
        for bucket, count in sorted(self.written.items()):
            kept = f", kept {self.kept[bucket]} by the filters" if self.filters is not None and bucket in self.kept else ""
            lines.append(f"  written {bucket:>12}: {count}{kept}")
        lines.append(f"  skipped:             {sum(self.skipped.values())}")
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"    {reason:<22} {count}")
        lines.append(f"  captions truncated:  {self.captions_truncated} (cut to the text encoder's limit)")
        if self.filters is None:
            lines.append("  filters:             none (data.filters: null)" if self.measured else
                         "  filters:             none (no measures: --preprocess.measures false)")
        else:
            stored = sum(self.written.values())
            lines.append(f"  filters (each alone keeps / of {stored} stored):")
            for setting, threshold in self.filters.items():
                if threshold is not None:
                    lines.append(f"    {setting:<22} {threshold!s:>8}  keeps {self.would_keep.get(setting, stored)}")
        lines.append(f"  report page:         {Path(self.store) / REPORT_PAGE}")
        lines.append(f"  face pipeline:       {self.face_pipeline}")
        parsing = {True: "on", False: "OFF (no parsing weights found)", None: "not used"}[self.face_parsing]
        lines.append(f"  face parsing:        {parsing}")
        return "\n".join(lines)


def stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class EncodeSample:
    """The function litdata's `optimize` runs on every input of one part.

    Inputs are positions in `entries`, so litdata sees no file paths (it would otherwise
    try to resolve a common input folder). Encoders load on the first call in each worker
    process, on the device litdata assigns (`cuda:<i>` per worker), else the CPU.
    Returns the store record, or None to skip the sample (litdata writes nothing for it).
    """

    def __init__(self, entries: list[ManifestEntry], bucket: Bucket, settings: StoreSettings,
                 encoders: EncoderSpec, store: Path, log_dir: Path, measure: bool = True,
                 drop_filtered: QualityFilters | None = None):
        self.entries, self.bucket, self.settings, self.encoder_spec = entries, bucket, settings, encoders
        self.store = store
        self.measure = measure
        self.drop_filtered = drop_filtered  # thresholds whose failures are skipped before encoding
        self.log_dir = log_dir
        self._encoders = None
        self._extractor = None
        self._log = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_encoders=None, _extractor=None, _log=None)
        return state

    def __call__(self, index: int, device: str | None = None) -> dict | None:
        entry = self.entries[index]
        self._load(device)
        where = {"sample_id": entry.sample_id, "line": entry.line, "bucket": self.bucket.name,
                 "video": str(entry.video), "face_image": None if entry.face_image is None else str(entry.face_image)}
        try:
            record, truncated, window, measures = self._encode(entry)
        except FilteredSample as filtered:
            self._write_log({**where, "status": "skipped", "reason": filtered.reason, "detail": filtered.detail,
                             "window": filtered.window, "measures": filtered.measures, "in_store": False})
            return None
        except SkippedSample as skipped:
            self._write_log({**where, "status": "skipped", "reason": skipped.reason, "detail": skipped.detail})
            return None
        self._write_log({**where, "status": "written", "caption_truncated": truncated, "window": window,
                         "measures": measures})
        return record

    # ------------------------------------------------------------------ workers
    def _load(self, device: str | None) -> None:
        if self._encoders is not None:
            return
        # A forked worker must not use the OpenMP pool its parent may have started (it hangs);
        # one thread per worker, as torch's DataLoader workers do. Scale with more workers.
        # (OpenCV's pool is left alone: resizing it in a forked worker hung destroying the
        # parent's pool.)
        torch.set_num_threads(1)
        from lightning_modules.echovideo_module import DTYPES
        from lightning_modules.frozen_encoders import FrozenEncoders

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        spec = self.encoder_spec
        self._encoders = FrozenEncoders.from_release_folder(
            spec.pretrained_path, identity_encoder=spec.identity_encoder,
            max_text_seq_length=_max_text_seq_length(spec.pretrained_path),
            dtype=DTYPES[spec.encoder_dtype]).place(device)
        if spec.face_models is not None:
            from datamodules.face_pipeline import FaceExtractor

            self._extractor = FaceExtractor(spec.face_models, device=device, face_size=self.settings.face_size)
        self._write_unconditional()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_dir / f"worker-{os.getpid()}.jsonl", "a", encoding="utf-8")

    def _write_unconditional(self) -> None:
        """T5 of the negative prompt and SigLIP of a black face, for condition dropout in training.

        Computed in a worker, where the encoders already are, so the main process never
        loads a model (and never initialises CUDA, which lets workers be forked).
        """
        path = self.store / UNCONDITIONAL_FILE
        if path.is_file():
            return
        tensors = {
            # Condition dropout in training replaces the caption with "" (as the release's
            # unconditional branch does by default), so the store carries T5 of "".
            keys.TEXT_EMBEDS: self._encoders.encode_text([""]).cpu().contiguous(),
            keys.SIGLIP_TOKENS: self._encoders.unconditional_siglip_tokens(1).cpu().contiguous(),
        }
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, temporary)
        os.replace(temporary, path)

    def _write_log(self, line: dict) -> None:
        self._log.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._log.flush()

    def _encode(self, entry: ManifestEntry) -> tuple[dict, bool, list[int], dict | None]:
        """(store record, caption cut?, window [start, stride, frames], quality measures or None)."""
        settings, bucket, encoders = self.settings, self.bucket, self._encoders
        if not entry.caption.strip():
            raise SkippedSample(EMPTY_CAPTION, f"{entry.sample_id}: empty caption")
        generator = torch.Generator().manual_seed(stable_seed(settings.seed, entry.sample_id, "window"))
        reference_frame = None if entry.face_image is not None else settings.reference_frame
        frames, reference, start = decode_clip(entry.video, bucket.num_frames, settings.frame_stride,
                                               generator=generator, reference_frame=reference_frame)
        video = frames.permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
        video = resize_and_center_crop(video, bucket.height, bucket.width).permute(1, 0, 2, 3).unsqueeze(0)

        crop, arcface = reference_face(entry.face_image, reference, settings.face_size, self._extractor)
        face = torch.from_numpy(crop).permute(2, 0, 1).float().div(255).unsqueeze(0)
        window = [start, settings.frame_stride, bucket.num_frames]
        (caption_tokens,) = encoders.caption_token_counts([entry.caption])
        truncated = caption_tokens > encoders.max_text_seq_length
        # Measured before the expensive encoders, which a sample dropped here never runs.
        measures = measure_sample(frames.numpy(), arcface if self._extractor is not None else None,
                                  caption_tokens, self._extractor) if self.measure else None
        if measures is not None and self.drop_filtered is not None:
            reason = self.drop_filtered.reason(measures)
            if reason is not None:
                raise FilteredSample(reason, "; ".join(self.drop_filtered.failures(measures)), window, measures)
        mean, std = encoders.encode_video_posterior(video)
        if arcface is None:
            arcface = encoders.encode_identity(face)[0]
        sources = [entry.video] + ([entry.face_image] if entry.face_image is not None else [])
        record = {
            keys.SAMPLE_ID: entry.sample_id,
            keys.CAPTION: entry.caption,
            SOURCES: json.dumps([source_fingerprint(path) for path in sources], ensure_ascii=False),
            keys.LATENT_MEAN: _stored(mean[0]),
            keys.LATENT_STD: _stored(std[0]),
            keys.FACE_LATENT: _stored(encoders.encode_face_latent(face, bucket.height, bucket.width)[0]),
            keys.SIGLIP_TOKENS: _stored(encoders.encode_siglip(face)[0]),
            keys.ARCFACE: torch.as_tensor(arcface, dtype=torch.float32).cpu().contiguous(),
            keys.TEXT_EMBEDS: _stored(encoders.encode_text([entry.caption])[0]),
            FACE_CROP_PNG: encode_png(crop),
            QUALITY: json.dumps(measures),
        }
        return record, truncated, window, measures


class FilteredSample(SkippedSample):
    """A sample whose measures fail the filters, left out of the store (`encode_filtered=False`)."""

    def __init__(self, reason: str, detail: str, window: list[int], measures: dict):
        super().__init__(reason, detail)
        self.window, self.measures = window, measures


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    return as_stored_bits(tensor.detach().to("cpu", STORE_DTYPE).contiguous())


def _max_text_seq_length(pretrained_path: str) -> int:
    config = json.loads((Path(pretrained_path) / "transformer" / "config.json").read_text())
    return int(config.get("max_text_seq_length", 226))


# ---------------------------------------------------------------------- planning
def assign_buckets(entries: list[ManifestEntry], buckets: tuple[Bucket, ...], frame_stride: int,
                   ) -> tuple[dict[str, list[ManifestEntry]], list[dict]]:
    """Each clip goes to the bucket of closest aspect ratio among those its length fits.

    With one bucket nothing is probed (the encoder finds short or broken clips itself).
    """
    if len(buckets) == 1:
        return {buckets[0].name: list(entries)}, []
    from tqdm.auto import tqdm

    assigned: dict[str, list[ManifestEntry]] = {bucket.name: [] for bucket in buckets}
    skipped = []
    for entry in tqdm(entries, desc="probing clips for buckets", unit="clip"):
        try:
            num_frames, height, width = probe_video(entry.video)
        except SampleReadError as err:
            skipped.append({"sample_id": entry.sample_id, "line": entry.line, "reason": err.reason,
                            "detail": err.detail})
            continue
        fitting = [b for b in buckets if (b.num_frames - 1) * frame_stride + 1 <= num_frames]
        if not fitting:
            skipped.append({"sample_id": entry.sample_id, "line": entry.line, "reason": VIDEO_TOO_SHORT,
                            "detail": f"{entry.video} has {num_frames} frames, shorter than every bucket"})
            continue
        aspect = np.log(width / height)
        best = min(fitting, key=lambda b: (abs(np.log(b.width / b.height) - aspect), -b.num_frames))
        assigned[best.name].append(entry)
    return assigned, skipped


def probe_video(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) from the container, without decoding."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SampleReadError(f"{path} has no video stream", UNREADABLE_VIDEO)
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size > 0)
            return frames, stream.codec_context.height, stream.codec_context.width
    except (av.FFmpegError, OSError) as err:
        raise SampleReadError(f"cannot open {path}: {err}", UNREADABLE_VIDEO) from err


def _plan_digest(settings: StoreSettings, parts: dict[str, list[list[ManifestEntry]]]) -> str:
    content = {
        "settings": asdict(settings),
        "parts": {name: [[(e.sample_id, str(e.video), str(e.face_image), e.caption) for e in part]
                         for part in bucket_parts] for name, bucket_parts in parts.items()},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------- running
def preprocess(
    manifest: str | Path,
    store: str | Path,
    settings: StoreSettings,
    encoders: EncoderSpec,
    num_workers: int = 1,
    part_size: int = 2048,
    chunk_bytes: str = "256MB",
    overwrite: bool = False,
    num_nodes: int = 1,
    node_rank: int = 0,
    filters: QualityFilters | None = QualityFilters(),
    measure: bool = True,
    encode_filtered: bool = True,
) -> PreprocessReport:
    """Encode every usable sample of `manifest` into `store`; return (and write) the report.

    Re-running with the same manifest and settings continues where an interrupted run
    stopped; different ones are refused unless `overwrite`, which starts the store anew.
    With `num_nodes` > 1, every node runs this with its own `node_rank` on shared storage:
    node r encodes the valid samples r, r + num_nodes, ... into its own shard of each
    bucket, and the last node to finish writes the complete report.

    `measure` makes each sample's quality measures (datamodules/quality.py), stored with it;
    `filters` decides which stored samples the report counts as kept (training applies its
    own `data.filters` again). With `encode_filtered=False`, samples that fail `filters` are
    not encoded nor stored at all (a relaxed threshold then needs a new store). The report is
    written as `report.json` and `report.html`.
    """
    from litdata import optimize

    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node_rank must be in [0, num_nodes), got {node_rank} of {num_nodes}")
    store, manifest = Path(store).absolute(), Path(manifest)
    shard = shard_name(node_rank, num_nodes)
    entries, problems = check_manifest(manifest, require_video=True)
    entries = entries[node_rank::num_nodes]
    problems = problems if node_rank == 0 else []  # reported once, by node 0
    report = PreprocessReport(manifest=str(manifest), store=str(store),
                              samples_in_manifest=len(entries) + len(problems))
    for problem in problems:
        report.skipped_samples.append({"line": problem.line, "reason": problem.reason, "detail": str(problem)})

    by_bucket, probe_skips = assign_buckets(entries, settings.buckets, settings.frame_stride)
    report.skipped_samples += probe_skips
    parts = {name: [bucket_entries[i:i + part_size] for i in range(0, len(bucket_entries), part_size)]
             for name, bucket_entries in by_bucket.items()}
    work = store / WORK_DIR / shard
    drop_filtered = filters if measure and not encode_filtered else None
    meta = _prepare_store(store, work, settings, encoders, num_nodes, _plan_digest(settings, parts), overwrite,
                          parts_total=sum(len(p) for p in parts.values()), manifest=manifest,
                          lines=_line_fingerprints(entries), measure=measure, drop_filtered=drop_filtered)
    report.encoders = meta["encoders"]
    report.face_pipeline = "insightface antelopev2 + facexlib" if encoders.face_models else \
        "none: face images are used as aligned crops, identity from the model's identity encoder"
    report.face_parsing = meta["encoders"].get("face", {}).get("parsing") if encoders.face_models else None

    report.parts_total = sum(len(p) for p in parts.values())
    started, done_clips, todo_clips = time.monotonic(), 0, sum(len(e) for e in by_bucket.values())

    def interrupted(signum: int) -> str:
        return (f"echovideo preprocess: stopped by {signal.Signals(signum).name} with {report.parts_done} of "
                f"{report.parts_total} parts of {store} done (node {node_rank} of {num_nodes}); the store is "
                "incomplete and training refuses it. Re-run the same command to continue where it stopped.")

    with stop_on_signals(interrupted):
        for name, bucket_parts in parts.items():
            bucket = next(b for b in settings.buckets if b.name == name)
            for part_index, part in enumerate(bucket_parts):
                summary_path = work / "parts" / name / f"part-{part_index:05d}.json"
                if not summary_path.is_file():
                    _run_part(optimize, part, bucket, store, store / name / shard, summary_path, settings,
                              encoders, num_workers, chunk_bytes, measure, drop_filtered)
                done_clips += len(part)
                report.parts_done += 1
                _print_overall_progress(report, done_clips, todo_clips, started)
    _fill_report_from_parts(report, work, parts)
    report.complete = report.parts_done == report.parts_total
    write_text_atomically(work / REPORT_FILE, json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
    return _write_merged_report(store, num_nodes, filters)


def rebuild_report(store: str | Path, filters: QualityFilters | None) -> PreprocessReport:
    """`echovideo preprocess --report-only`: the report of a store (finished or not) with these
    thresholds, from the measures its preprocessing logged; nothing is encoded or loaded."""
    store = Path(store).absolute()
    meta = read_store_meta(store, finished=False)
    if not (store / WORK_DIR).is_dir() or not any((store / WORK_DIR).glob(f"*/{REPORT_FILE}")):
        raise FeatureStoreError(f"{store / WORK_DIR}: no preprocess run has finished on this store yet, so there "
                                "is nothing to report; run `echovideo preprocess --config <experiment>.yaml` first")
    return _write_merged_report(store, meta.get("num_nodes", 1), filters)


def stored_samples(store: Path) -> list[dict]:
    """Every sample written to the store, with its window and measures, from the logs of every
    finished part of every node, in manifest order."""
    samples = []
    for path in sorted((store / WORK_DIR).glob("*/parts/*/part-*.json")):
        samples += json.loads(path.read_text(encoding="utf-8")).get("samples", [])
    return sorted(samples, key=lambda sample: (sample.get("line") or 0, sample["sample_id"]))


def apply_filters(report: PreprocessReport, samples: list[dict], filters: QualityFilters | None,
                  measured: bool) -> None:
    """Count `samples` (the stored ones) against `filters`: kept per bucket, each threshold's keep
    count alone, and the dropped ones as skipped with their reason. Sets each sample's `reason`."""
    report.measured = measured
    report.filters = filters.thresholds() if filters is not None and measured else None
    dropped = Counter()
    for sample in samples:
        measures = sample.get("measures") or {}
        sample["reason"] = filters.reason(measures) if report.filters is not None else None
        if sample["reason"] is None:
            continue
        dropped[sample["bucket"]] += 1
        report.skipped_samples.append({key: sample.get(key) for key in SAMPLE_FIELDS if key != "measures"}
                                      | {"reason": sample["reason"], "detail": "; ".join(filters.failures(measures)),
                                         "in_store": True})
    report.kept = {bucket: count - dropped[bucket] for bucket, count in report.written.items()}
    report.would_keep = {} if report.filters is None else {
        item.setting: sum(not fails(item, getattr(filters, item.setting), s.get("measures") or {}) for s in samples)
        for item in FILTERS if getattr(filters, item.setting) is not None}
    counts = Counter(s["reason"] for s in report.skipped_samples)
    report.skipped = {reason: counts[reason] for reason in SKIP_REASONS if counts[reason]}


def _write_merged_report(store: Path, num_nodes: int, filters: QualityFilters | None) -> PreprocessReport:
    """Write the report over every node, as it stands once this node has finished.

    Nodes finishing together each merge and write; a node that merged before another's
    report landed could write its stale merge last. So each node reads the reports again
    after writing and writes again if they changed: whichever node finishes last leaves
    the merge of every node's final report, with no lock (none holds across nodes on every
    shared file system).
    """
    from datamodules.report_page import write_report_page

    meta = json.loads((store / STORE_META).read_text(encoding="utf-8"))
    while True:
        merged = _merge_node_reports(store, num_nodes)
        if merged.complete and sum(merged.written.values()) and not (store / UNCONDITIONAL_FILE).is_file():
            raise FeatureStoreError(f"{store / UNCONDITIONAL_FILE}: not written by the workers")
        if merged.complete:  # before the report says so: a complete store is read one way on every rank
            merge_node_shards(store, meta["buckets"], num_nodes)
        report, samples = copy.deepcopy(merged), stored_samples(store)
        apply_filters(report, samples, filters, measured=meta.get("measures") == MEASURES_VERSION)
        write_text_atomically(store / REPORT_FILE, json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n")
        if _merge_node_reports(store, num_nodes) == merged:
            break
    # The page's histograms show every measured sample: the stored ones and those the filters
    # kept out of the store (--preprocess.encode_filtered false), which the report lists as skipped.
    left_out = [{key: skipped.get(key) for key in (*SAMPLE_FIELDS, "reason", "in_store")}
                for skipped in report.skipped_samples if skipped.get("in_store") is False and skipped.get("measures")]
    write_report_page(store / REPORT_PAGE, asdict(report), samples + left_out,
                      filters if report.filters is not None else None)
    return report


def _kill_descendants(grace_s: float = 2.0) -> None:
    """End every process this one started, and theirs: litdata's workers start their own
    helpers (a cache remover, uploaders) that block on a queue, and one left behind by an
    interrupted run waited on it for ever, holding its memory (on a GPU node, the encoders).
    Work already published stays; a re-run redoes the part in flight."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def stop_on_signals(message: Callable[[int], str]):
    """While preprocessing: SIGINT (Ctrl-C) or SIGTERM stops the workers, prints `message(signal)`
    and exits with status 128 + signal, never 0.

    litdata's `optimize` sets its own SIGINT handler, which stops its workers and exits the
    process with status 0, as if the store were finished. Its handler is replaced here by one
    that stops the workers the same way and then exits as an interrupted program does; SIGTERM
    (what SLURM and `kill` send) takes the same path. Between parts no worker runs and the
    process exits straight away. Work already published stays: a re-run continues from it.
    """
    import threading

    from litdata.processing.data_processor import DataProcessor

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    main_process = os.getpid()

    def exit_now(signum: int) -> None:
        if os.getpid() == main_process:  # litdata's forked workers inherit the handlers: they just stop
            _kill_descendants()
            print(f"\n{message(signum)}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def stop_workers_then_exit(processor, signum, frame) -> None:
        if os.getpid() != main_process:
            exit_now(signum)
        for queue in getattr(processor, "stop_queues", None) or []:
            queue.put(None)
        for worker in getattr(processor, "workers", None) or []:
            worker.join(0)
        exit_now(signum)

    def on_signal(signum, frame) -> None:
        inside_optimize = signal.getsignal(signal.SIGINT)
        if getattr(inside_optimize, "__func__", None) is stop_workers_then_exit:
            inside_optimize(signum, frame)  # stops that call's workers, then exits
        exit_now(signum)

    litdata_handler = DataProcessor._signal_handler
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    DataProcessor._signal_handler = stop_workers_then_exit
    for signum in previous:
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        DataProcessor._signal_handler = litdata_handler
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _line_fingerprints(entries: list[ManifestEntry]) -> list[list]:
    """[line, short hash of what the line asks for] of each entry, in manifest order: kept in
    the plan so that a changed manifest can be refused naming its first changed line."""
    return [[entry.line, hashlib.sha256(json.dumps([entry.sample_id, str(entry.video), str(entry.face_image),
                                                    entry.caption]).encode()).hexdigest()[:10]]
            for entry in entries]


def _first_changed_line(recorded: list[list] | None, lines: list[list], manifest: Path) -> str:
    """Where a manifest differs from the one a store was started from, for the refusal."""
    if recorded is None:
        return "the store's plan predates line records, so the changed line cannot be named"
    for before, now in zip(recorded, lines):
        if before != now:
            if before[0] != now[0]:
                return (f"the first difference is at {manifest}:{min(before[0], now[0])} "
                        "(a line added or removed there)")
            return f"the first changed line is {manifest}:{now[0]}"
    if len(recorded) != len(lines):
        shorter = min(len(recorded), len(lines))
        where = f"after line {lines[shorter - 1][0]}" if shorter else "at its start"
        return (f"{manifest} has {len(lines)} usable lines, the store was started with {len(recorded)}: "
                f"lines were {'added' if len(lines) > len(recorded) else 'removed'} {where}")
    return ("its lines are the same, but they are split otherwise: another --preprocess.part_size, "
            "or videos whose length or size changed since")


def _prepare_store(store: Path, work: Path, settings: StoreSettings, encoders: EncoderSpec, num_nodes: int,
                   digest: str, overwrite: bool, parts_total: int, manifest: Path,
                   lines: list[list] | None = None, measure: bool = True,
                   drop_filtered: QualityFilters | None = None) -> dict:
    """Check that `store` may be (re)started with these settings; write store.json; return it."""
    if overwrite and store.exists():
        if num_nodes > 1:
            raise FeatureStoreError(
                f"{store}: --preprocess.overwrite with {num_nodes} nodes would have each node delete what "
                "the others write; delete the folder once, then start every node without --overwrite")
        shutil.rmtree(store)
    meta = _store_meta(settings, encoders, num_nodes, manifest)
    meta["measures"] = MEASURES_VERSION if measure else None
    # Thresholds whose failures were never encoded (--preprocess.encode_filtered false), or None.
    meta["dropped_by_filters"] = drop_filtered.thresholds() if drop_filtered is not None else None
    meta_path = store / STORE_META
    if store.exists() and any(store.iterdir()):
        if not meta_path.is_file():
            raise FeatureStoreError(
                f"{store}: exists and is not a feature store; choose an empty folder for "
                "`data.feature_store` or pass --preprocess.overwrite true")
        previous = json.loads(meta_path.read_text(encoding="utf-8"))
        for key in ("settings", "num_nodes", "measures", "dropped_by_filters"):
            if previous.get(key) != meta[key]:
                raise FeatureStoreError(
                    f"{meta_path}: field '{key}' is {previous.get(key)!r}, this run has {meta[key]!r}; "
                    "resume with the same experiment settings and node count, write to a new "
                    "`data.feature_store`, or pass --preprocess.overwrite true to start anew")
    plan_file = work / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    if plan is not None and plan["digest"] != digest:
        raise FeatureStoreError(
            f"{store}: this store was started from a different manifest ({plan_file} records another "
            f"plan; {_first_changed_line(plan.get('lines'), lines or [], manifest)}); resume it with the same "
            "manifest, write to a new `data.feature_store`, or pass --preprocess.overwrite true to start it anew")
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomically(plan_file, json.dumps({"digest": digest, "parts": parts_total, "lines": lines}) + "\n")
    write_text_atomically(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def _merge_node_reports(store: Path, num_nodes: int) -> PreprocessReport:
    """One report over every node's shard; complete once every node has finished."""
    reports = []
    for rank in range(num_nodes):
        path = store / WORK_DIR / shard_name(rank, num_nodes) / REPORT_FILE
        if path.is_file():
            reports.append(PreprocessReport(**json.loads(path.read_text(encoding="utf-8"))))
    merged = PreprocessReport(**{**asdict(reports[0]), "written": {}, "skipped": {}, "skipped_samples": [],
                                 "samples_in_manifest": 0, "captions_truncated": 0, "parts_done": 0,
                                 "parts_total": 0})
    for report in reports:
        for bucket, count in report.written.items():
            merged.written[bucket] = merged.written.get(bucket, 0) + count
        merged.skipped_samples += report.skipped_samples
        for field_name in ("samples_in_manifest", "captions_truncated", "parts_done", "parts_total"):
            setattr(merged, field_name, getattr(merged, field_name) + getattr(report, field_name))
    counts = Counter(s["reason"] for s in merged.skipped_samples)
    merged.skipped = {reason: counts[reason] for reason in SKIP_REASONS if counts[reason]}
    merged.complete = len(reports) == num_nodes and all(r.complete for r in reports)
    return merged


def _run_part(optimize, part, bucket, store: Path, bucket_dir: Path, summary_path: Path, settings, encoders,
              num_workers: int, chunk_bytes: str, measure: bool, drop_filtered: QualityFilters | None) -> None:
    log_dir = summary_path.with_suffix("")
    shutil.rmtree(log_dir, ignore_errors=True)  # a part cut short is redone from its start
    _remove_unlisted_chunks(bucket_dir)
    function = EncodeSample(part, bucket, settings, encoders, store, log_dir, measure, drop_filtered)
    append = (bucket_dir / "index.json").is_file()
    with _litdata_chatter_dropped():
        _optimize_part(optimize, function, part, bucket_dir, chunk_bytes, num_workers, append)
    summary = _summarise_logs(log_dir)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(summary_path, json.dumps(summary, ensure_ascii=False) + "\n")
    shutil.rmtree(log_dir, ignore_errors=True)


def _optimize_part(optimize, function, part, bucket_dir: Path, chunk_bytes: str, num_workers: int,
                   append: bool) -> None:
    # A forked worker that garbage-collects a native object its parent abandoned (an onnxruntime
    # session of an earlier face extractor, say) can hang for ever destroying that object's thread
    # pool, whose threads exist only in the parent. So the parent collects first, and freezes what
    # is left: no worker ever collects an object it inherited.
    gc.collect()
    gc.freeze()
    try:
        _start_optimize(optimize, function, part, bucket_dir, chunk_bytes, num_workers, append)
    finally:
        gc.unfreeze()


def _start_optimize(optimize, function, part, bucket_dir: Path, chunk_bytes: str, num_workers: int,
                    append: bool) -> None:
    optimize(
        fn=function,
        inputs=list(range(len(part))),
        output_dir=str(bucket_dir),
        chunk_bytes=chunk_bytes,
        num_workers=min(num_workers, len(part)),
        mode="append" if append else None,
        reorder_files=False,
        keep_data_ordered=True,
        # Forking skips re-importing torch in every worker; safe because the main process
        # never initialises CUDA (workers do, each on its own device).
        start_method="fork" if not torch.cuda.is_initialized() else "spawn",
        verbose=True,  # its progress bar; its printed chatter is dropped below
    )


# What litdata's `optimize` prints on stdout at every call, in the main process and its
# workers: an advert, its start method, setup and worker lifecycle. The kit prints its own
# progress line per part and the report; litdata's progress bar (stderr) stays.
LITDATA_CHATTER = re.compile(
    r"Create an account on https://lightning\.ai/|Setting multiprocessing start_method to \w+|"
    r"Storing the files under |Setup started with fast_dev_run=|Setup finished in [\d.]+ seconds|"
    r"Starting \d+ workers with \d+ items|Workers are ready ! Starting data processing|"
    r"Rank \d+ inferred the following|Worker \d+ is (terminating|done)|Workers are finished|"
    r"Finished data processing!")


class _DropLines:
    """A stdout stand-in that writes every line except those `pattern` matches at their start."""

    def __init__(self, stream, pattern: re.Pattern):
        self.stream, self.pattern, self.pending = stream, pattern, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not self.pattern.match(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _litdata_chatter_dropped():
    """Drop LITDATA_CHATTER from stdout (forked workers inherit the filter), unless ECHOVIDEO_VERBOSE."""
    if os.environ.get("ECHOVIDEO_VERBOSE", "") not in ("", "0"):
        yield
        return
    original = sys.stdout
    sys.stdout = _DropLines(original, LITDATA_CHATTER)
    try:
        yield
    finally:
        if sys.stdout.pending:
            original.write(sys.stdout.pending)
        sys.stdout = original


def _remove_unlisted_chunks(bucket_dir: Path) -> None:
    """Delete chunk files no index lists: what a killed `optimize` call left behind."""
    if not bucket_dir.is_dir():
        return
    index = bucket_dir / "index.json"
    listed = set()
    if index.is_file():
        listed = {chunk["filename"] for chunk in json.loads(index.read_text())["chunks"]}
    for path in bucket_dir.iterdir():
        if path.is_file() and path.name != "index.json" and path.name not in listed:
            path.unlink()
    shutil.rmtree(bucket_dir / ".checkpoints", ignore_errors=True)


def _summarise_logs(log_dir: Path) -> dict:
    latest: dict[str, dict] = {}
    for log in sorted(log_dir.glob("worker-*.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                latest[record["sample_id"]] = record
    written = [r for r in latest.values() if r["status"] == "written"]
    return {
        "written": len(written),
        "captions_truncated": sum(bool(r.get("caption_truncated")) for r in written),
        "skipped": [r for r in latest.values() if r["status"] == "skipped"],
        # What the report needs of each stored sample; measures stay here, so that new
        # thresholds can be counted (--report-only) without reading the store's chunks.
        "samples": [{key: r.get(key) for key in SAMPLE_FIELDS} for r in written],
    }


def _fill_report_from_parts(report: PreprocessReport, work: Path, parts: dict) -> None:
    for name, bucket_parts in parts.items():
        report.written.setdefault(name, 0)
        for part_index in range(len(bucket_parts)):
            path = work / "parts" / name / f"part-{part_index:05d}.json"
            if not path.is_file():
                continue
            summary = json.loads(path.read_text(encoding="utf-8"))
            report.written[name] += summary["written"]
            report.captions_truncated += summary["captions_truncated"]
            report.skipped_samples += summary["skipped"]
    counts = Counter(s["reason"] for s in report.skipped_samples)
    report.skipped = {reason: counts[reason] for reason in SKIP_REASONS if counts[reason]}


def _print_overall_progress(report: PreprocessReport, done: int, total: int, started: float) -> None:
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    print(f"preprocess: part {report.parts_done}/{report.parts_total}, {done}/{total} clips, "
          f"{rate:.2f} clips/s, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)


# The fields of store.json that decide the stored values; fit checks them against the experiment.
DECIDING_FIELDS = ("settings", "dtype", "encoders")


def _store_meta(settings: StoreSettings, encoders: EncoderSpec, num_nodes: int, manifest: Path | None) -> dict:
    meta = {
        "format": STORE_FORMAT,
        "buckets": [bucket.name for bucket in settings.buckets],
        "num_nodes": num_nodes,
        "settings": {**asdict(settings), "buckets": [bucket.name for bucket in settings.buckets]},
        "dtype": str(STORE_DTYPE).removeprefix("torch."),
        "encoders": encoder_versions(encoders),
    }
    if manifest is not None:
        meta["manifest"] = {"path": str(Path(manifest).absolute()), "sha256": file_sha256(manifest)}
    return meta


def check_store_matches(store: str | Path, settings: StoreSettings, encoders: EncoderSpec,
                        manifest: str | Path | None = None) -> None:
    """Refuse to train on a store written with other settings or encoders than the
    experiment's (sizes, frame stride, face crop, seed, `pretrained_path`'s encoders and
    dtype, identity encoder or face pipeline), naming each differing field with both values.
    A `manifest` given beside the store must be the one it was built from."""
    store = Path(store)
    stored = read_store_meta(store)
    if manifest is not None and not Path(manifest).is_file():
        raise FeatureStoreError(f"data.train_manifest {manifest}: no such file; training reads {store}, so "
                                "unset data.train_manifest or fix its path")
    expected = _store_meta(settings, encoders, stored.get("num_nodes", 1), manifest)

    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    # Through JSON, as store.json holds it, so tuples and lists compare equal.
    wanted = flat(json.loads(json.dumps({key: expected[key] for key in DECIDING_FIELDS})))
    found = flat({key: stored.get(key) for key in DECIDING_FIELDS})
    differences = [f"{key}: {found.get(key)!r} in the store, {wanted.get(key)!r} in this experiment"
                   for key in sorted(set(wanted) | set(found))
                   if key != "encoders.pretrained_path" and found.get(key) != wanted.get(key)]
    if differences and found.get("encoders.face_pipeline") != wanted.get("encoders.face_pipeline"):
        raise FeatureStoreError(
            f"{store / STORE_META}: its face crops and ArcFace embeddings were made by face pipeline "
            f"version {found.get('encoders.face_pipeline')!r}; this kit makes version "
            f"{wanted.get('encoders.face_pipeline')!r}, and training on a mix would teach the model faces "
            "framed two ways.\nFix: re-run `echovideo preprocess --config <experiment>.yaml` into a new "
            "`data.feature_store` (or an emptied one), then train on that.")
    if differences:
        raise FeatureStoreError(
            f"{store / STORE_META} was written with other settings than this experiment's:\n  "
            + "\n  ".join(differences)
            + "\nFix: train with the settings the store was made with, or write a new store for these "
            "(`echovideo preprocess --config <experiment>.yaml` into another `data.feature_store`).")
    if manifest is not None:
        made_from = stored.get("manifest") or {}
        if made_from.get("sha256") != expected["manifest"]["sha256"]:
            raise FeatureStoreError(
                f"data.train_manifest {manifest} is not the manifest {store} was made from "
                f"({made_from.get('path', 'not recorded in ' + str(store / STORE_META))}); training reads the "
                "store, so either unset data.train_manifest or preprocess this manifest into a new store")


def encoder_versions(encoders: EncoderSpec) -> dict:
    """Which encoders made the store: a short digest of each part's config and weights' sizes, and
    the face pipeline's version (which also decides the crops of photos read without face models)."""
    from datamodules.face_pipeline import FACE_PIPELINE_VERSION

    root = Path(encoders.pretrained_path)
    versions = {"pretrained_path": str(root.absolute()), "encoder_dtype": encoders.encoder_dtype,
                "face_pipeline": FACE_PIPELINE_VERSION}
    for part in ("vae", "text_encoder", "clip_visual_encoder", "tokenizer"):
        folder = root / part
        digest = hashlib.sha256()
        for path in sorted(folder.glob("*")):
            if path.suffix == ".json":
                digest.update(path.read_bytes())
            elif path.is_file():
                digest.update(f"{path.name}:{path.stat().st_size}".encode())
        versions[part] = digest.hexdigest()[:12]
    if encoders.face_models is not None:
        from datamodules.face_pipeline import FaceExtractor

        versions["face"] = FaceExtractor(encoders.face_models).versions()
    else:
        identity = encoders.identity_encoder
        versions["identity_encoder"] = type(identity).__name__ if identity is not None else None
    return versions
