"""The feature store: encoded training samples in litdata's streaming format.

Encoding (VAE, T5, SigLIP, ArcFace) is the expensive part of a step and the same every
epoch, so `echovideo preprocess` does it once and training streams the results. Layout:

    <store>/
      store.json                 what the store holds: buckets, sizes, encoder versions
      unconditional.safetensors  T5 of the negative prompt and SigLIP of a black face, so
                                 condition dropout needs neither T5 nor SigLIP in training
      report.json                the last preprocess report
      report.html                the same as a page: counts, a histogram of every quality
                                 measure with its thresholds, example clips kept and skipped
      <F>x<H>x<W>/node-<r>-of-<n>/  one litdata optimized dataset per bucket and preprocessing
                                 node (index.json and chunk files), readable from local
                                 disk or object storage
      .preprocess/               resume bookkeeping of `echovideo preprocess`

Per sample (one record of a bucket):

| field           | dtype    | shape            | what                                        |
|-----------------|----------|------------------|---------------------------------------------|
| `latent_mean`   | bfloat16 | f x C x h x w    | VAE posterior mean, scaled, frames first     |
| `latent_std`    | bfloat16 | f x C x h x w    | VAE posterior std, scaled                    |
| `face_latent`   | bfloat16 | 1 x C x h x w    | the face image as one latent frame (mode)    |
| `siglip_tokens` | bfloat16 | N x D            | SigLIP last hidden state of the aligned face |
| `arcface`       | float32  | 512              | raw ArcFace embedding                        |
| `text_embeds`   | bfloat16 | 226 x 4096       | T5 last hidden state, all 226 rows           |
| `face_crop_png` | bytes    |                  | the aligned, parsed face crop as PNG         |
| `sample_id`, `caption`, `sources` (JSON: path, size, mtime of each source file) |
| `quality`       | str      |                  | JSON of the quality measures (datamodules/quality.py), `null` when not made |

bfloat16 tensors are stored as their 16-bit patterns (int16): litdata serialises tensors
through numpy, which has no bfloat16; `record_to_sample` views them back, bit-exact.

Why the posterior and not one drawn latent: CogVideoX's fine-tuning draws a fresh latent
from the posterior every step (a free augmentation); storing mean and std keeps that
(`lightning_modules.frozen_encoders.draw_latents`), so the store and on-the-fly encoding
train identically, for twice the latent bytes (2 x 2.6 MB at 49x480x848; a whole
sample is about 7.7 MB).
Why T5 is kept whole: CogVideoX feeds T5 the padded ids without an attention mask, so
the padding rows are not constant and the transformer was trained on them; dropping them
would change the conditioning. bfloat16 is what the encoder computes in and what the
transformer consumes under bf16-mixed, so nothing is lost by it (1.85 MB per sample).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules import batch as keys
from datamodules.skip_reasons import SOURCE_CHANGED, Skipped
from datamodules.errors import EchoVideoError

STORE_FORMAT = 1
STORE_META = "store.json"
UNCONDITIONAL_FILE = "unconditional.safetensors"
REPORT_FILE = "report.json"
REPORT_PAGE = "report.html"
WORK_DIR = ".preprocess"
ALL_NODES = "all-nodes"  # per bucket: one index over every node's chunks (see merge_node_shards)

STORED_TENSORS = (keys.LATENT_MEAN, keys.LATENT_STD, keys.FACE_LATENT, keys.SIGLIP_TOKENS, keys.ARCFACE,
                  keys.TEXT_EMBEDS)
FACE_CROP_PNG = "face_crop_png"
SOURCES = "sources"
QUALITY = "quality"


class FeatureStoreError(EchoVideoError, ValueError):
    """A store folder that is missing, unfinished or built with other settings."""


@dataclass(frozen=True)
class Bucket:
    """One resolution/length of the store: every sample of a bucket has the same shapes."""

    num_frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.num_frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, value: Sequence[int] | str) -> "Bucket":
        if isinstance(value, str):
            value = [int(part) for part in value.split("x")]
        num_frames, height, width = (int(v) for v in value)
        return cls(num_frames, height, width)


BFLOAT16_FIELDS = (keys.LATENT_MEAN, keys.LATENT_STD, keys.FACE_LATENT, keys.SIGLIP_TOKENS, keys.TEXT_EMBEDS)


def as_stored_bits(tensor: torch.Tensor) -> torch.Tensor:
    """A bfloat16 tensor as the int16 of its bits, the form litdata can serialise."""
    return tensor.view(torch.int16)


def shard_name(node_rank: int, num_nodes: int) -> str:
    """The folder one preprocessing node writes in each bucket."""
    return f"node-{node_rank:03d}-of-{num_nodes:03d}"


def source_fingerprint(path: Path) -> list:
    """What tells a changed source file: its path, size and modification time."""
    stat = os.stat(path)
    return [str(path), stat.st_size, stat.st_mtime_ns]


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).copy()


def store_parts_on_disk(store: Path) -> tuple[int, int | None]:
    """(parts finished, parts planned or None) over every node's shard of a store, as its
    `.preprocess/` work folder records them while `echovideo preprocess` runs."""
    done, total = 0, 0
    shards = sorted(p for p in (store / WORK_DIR).glob("*") if p.is_dir())
    for shard in shards:
        done += sum(1 for _ in shard.glob("parts/*/part-*.json"))
        plan = shard / "plan.json"
        planned = json.loads(plan.read_text(encoding="utf-8")).get("parts") if plan.is_file() else None
        total = None if planned is None or total is None else total + planned
    return done, total if shards else None


def check_store_complete(store: Path) -> None:
    """Refuse a store whose preprocessing has not finished on every node (interrupted,
    still running, or a node not yet started): training on it would see part of the data."""
    report_path = store / REPORT_FILE
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    if report.get("complete"):
        return
    done, total = store_parts_on_disk(store)
    raise FeatureStoreError(
        f"{store}: the feature store is incomplete: {done} of {total if total is not None else 'an unknown number of'} "
        f"preprocess parts are done ({report_path} {'says complete: false' if report else 'is not written yet'}). "
        "Finish it by re-running the same `echovideo preprocess --config <experiment>.yaml ...` command (on every "
        "node, with the same node count); it continues where it stopped")


def read_store_meta(store: str | Path, finished: bool = True) -> dict:
    """`store.json` of a store; a clear error when the folder is not one, or (with `finished`)
    when its preprocessing has not finished."""
    meta_path = Path(store) / STORE_META
    if not meta_path.is_file():
        raise FeatureStoreError(
            f"{meta_path}: not found; `data.feature_store` must be a folder written by "
            "`echovideo preprocess --config <experiment>.yaml` (run it first, or fix the path)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != STORE_FORMAT:
        raise FeatureStoreError(f"{meta_path}: store format {meta.get('format')!r}, this kit reads "
                                f"{STORE_FORMAT}; rebuild the store with `echovideo preprocess`")
    if finished:
        check_store_complete(Path(store))
    return meta


def record_to_sample(record: dict, verify_sources: bool, filters=None) -> dict | Skipped:
    """A store record as a sample of the batch contract (datamodules/batch.py).

    With `verify_sources`, a record whose source video or photo changed (or vanished)
    since preprocessing is skipped as `source_changed`: its features would no longer
    describe the file a user sees. With `filters` (datamodules.quality.QualityFilters), a
    record whose stored measures fail a threshold is skipped with that threshold's reason.
    """
    sample_id = record[keys.SAMPLE_ID]
    if filters is not None:
        reason = filters.reason(json.loads(record.get(QUALITY) or "null") or {})
        if reason is not None:
            return Skipped(reason, sample_id)
    if verify_sources:
        for path, size, mtime_ns in json.loads(record[SOURCES]):
            try:
                if source_fingerprint(Path(path))[1:] != [size, mtime_ns]:
                    return Skipped(SOURCE_CHANGED, sample_id)
            except OSError:
                return Skipped(SOURCE_CHANGED, sample_id)
    sample = {key: record[key] for key in STORED_TENSORS}
    for key in BFLOAT16_FIELDS:
        sample[key] = sample[key].view(torch.bfloat16)
    sample[keys.SAMPLE_ID] = sample_id
    sample[keys.CAPTION] = record[keys.CAPTION]
    return sample


# What litdata may decode a stored field as: tensors, numbers, text and bytes. Anything else
# (its `pickle` serializer above all) would run code from the store's files when read.
DATA_FORMATS = ("str", "bytes", "int", "float", "bool", "tensor", "no_header_tensor", "numpy", "no_header_numpy")


def check_fields_are_data(index_path: Path) -> None:
    """Refuse a bucket whose `index.json` declares a field that is not plain data."""
    try:
        formats = json.loads(index_path.read_text(encoding="utf-8"))["config"]["data_format"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FeatureStoreError(f"{index_path}: not a readable litdata index ({error}); re-run "
                                "`echovideo preprocess` to rebuild this bucket") from None
    unsafe = sorted({str(f) for f in formats if str(f).split(":", 1)[0] not in DATA_FORMATS})
    if unsafe:
        raise FeatureStoreError(
            f"{index_path}: config.data_format declares {unsafe}, which the kit does not decode (a pickled "
            f"field would run code when read); it decodes only {', '.join(DATA_FORMATS)}. Rebuild the "
            "store with `echovideo preprocess`")


def _streaming_dataset_class():
    # litdata is imported lazily: importing it sets up multiprocessing state that plain
    # manifest training does not need.
    from litdata import StreamingDataset

    class FeatureStoreDataset(StreamingDataset):
        """One bucket of a store, streamed; yields samples of the batch contract or `Skipped`."""

        def __init__(self, bucket_dir: str, verify_sources: bool = True, filters=None, **kwargs):
            super().__init__(bucket_dir, **kwargs)
            self.verify_sources = verify_sources
            self.filters = filters

        def __getitem__(self, index):
            return record_to_sample(super().__getitem__(index), self.verify_sources, self.filters)

    return FeatureStoreDataset


def open_store_dataset(store: str | Path, shuffle: bool, seed: int, verify_sources: bool = True,
                       drop_last: bool | None = None, filters=None):
    """A streaming dataset over every bucket of `store`: one stream per bucket and node shard.
    `filters` (datamodules.quality.QualityFilters) skips the samples whose measures fail them;
    a store made without measures is refused then (see `check_store_measured`).

    Several streams are combined with litdata's per-stream batching, so one batch always
    comes from one stream (one shape) while the streams interleave over the epoch. litdata
    shards the samples over ranks, nodes and loader workers itself.
    """
    from litdata import CombinedStreamingDataset

    store = Path(store)
    meta = read_store_meta(store)
    if filters is not None:
        check_store_measured(store, meta)
    dataset_class = _streaming_dataset_class()
    streams = []
    for bucket_dir in (folder for name in meta["buckets"] for folder in _bucket_streams(store / name, meta["num_nodes"])):
        if not (bucket_dir / "index.json").is_file():
            continue  # a bucket no sample landed in
        check_fields_are_data(bucket_dir / "index.json")
        streams.append(dataset_class(str(bucket_dir), verify_sources=verify_sources, filters=filters,
                                     shuffle=shuffle, seed=seed, drop_last=drop_last))
    if not streams:
        raise FeatureStoreError(f"{store}: the store holds no samples; see {store / REPORT_FILE} for why")
    if len(streams) == 1:
        return streams[0]
    return CombinedStreamingDataset(streams, seed=seed, iterate_over_all=True, batching_method="per_stream")


def check_store_measured(store: Path, meta: dict) -> None:
    """Filters need the measures: refuse a store made without them (before they existed, or
    with `--preprocess.measures false`) or with another version of them."""
    from datamodules.quality import MEASURES_VERSION

    made = meta.get("measures")
    if made == MEASURES_VERSION:
        return
    what = ("holds no quality measures" if made is None else
            f"holds quality measures of version {made!r}, this kit reads version {MEASURES_VERSION}")
    raise FeatureStoreError(
        f"{Path(store) / STORE_META}: the store {what}, so data.filters cannot be applied.\nFix: re-run "
        "`echovideo preprocess --config <experiment>.yaml` into a new `data.feature_store`, or train "
        "unfiltered with `--data.init_args.filters null`.")


def _bucket_streams(bucket: Path, num_nodes: int) -> list[Path]:
    """The folders one bucket is read from: its merge over every node when there is one,
    else each node's shard."""
    if (bucket / ALL_NODES / "index.json").is_file():
        return [bucket / ALL_NODES]
    return [bucket / shard_name(rank, num_nodes) for rank in range(num_nodes)]


def merge_node_shards(store: Path, buckets: Sequence[str], num_nodes: int) -> None:
    """Give each bucket of a store written by several nodes one index over every node's chunks.

    Read as one stream per node shard, a bucket loses samples at every epoch: litdata evens out
    each stream over ranks and loader workers on its own (a 2-node store on 2 ranks lost 8 of
    24). One stream per bucket loses at most what a one-node store does. The chunk files are
    hard-linked into `<bucket>/all-nodes/` (copied where the file system has no hard links)
    under node-prefixed names, beside an index listing them all: no data is rewritten and the
    shards stay as they are. Built in a folder of its own and renamed into place, so two nodes
    finishing together, or a kill, never leave a partial merge (the rename of the second fails
    and it drops its copy). Shards whose index settings differ are left as separate streams.
    """
    if num_nodes < 2:
        return
    for name in buckets:
        bucket = store / name
        merged = bucket / ALL_NODES
        if (merged / "index.json").is_file():
            continue
        indexes = [(shard, json.loads((bucket / shard / "index.json").read_text(encoding="utf-8")))
                   for shard in (shard_name(rank, num_nodes) for rank in range(num_nodes))
                   if (bucket / shard / "index.json").is_file()]
        if len(indexes) < 2 or any(index["config"] != indexes[0][1]["config"] for _, index in indexes):
            continue
        partial = bucket / f"{ALL_NODES}.partial-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        chunks = []
        for shard, index in indexes:
            for chunk in index["chunks"]:
                linked = f"{shard}-{chunk['filename']}"
                _link_or_copy(bucket / shard / chunk["filename"], partial / linked)
                chunks.append({**chunk, "filename": linked})
        (partial / "index.json").write_text(json.dumps({"chunks": chunks, "config": indexes[0][1]["config"],
                                                        "updated_at": indexes[-1][1].get("updated_at")}),
                                            encoding="utf-8")
        try:
            os.rename(partial, merged)
        except OSError:
            if not (merged / "index.json").is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another node's merge landed first


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def store_loader(dataset, batch_size: int, num_workers: int, collate_fn, report=None):
    """litdata's StreamingDataLoader, made to resume correctly under Lightning.

    After `load_state_dict`, litdata replays from the saved position on every `iter()`
    until one iteration runs to StopIteration. Lightning ends an epoch after `len(loader)`
    batches without that last `next()`, so the epoch after a resume would replay the
    resumed epoch's tail instead of starting a fresh shuffle. Here exactly the first
    iteration after a load replays; every later one is a new epoch.

    A position saved under another layout (world size, loader workers or batch size):
    a single-stream store continues the epoch where it stopped, litdata dealing the samples
    not yet seen over the new ranks (no sample repeated); a store of several streams
    (buckets), whose interleaving litdata cannot re-deal, and a position that
    is not a store's at all (a run started from a manifest) end the interrupted epoch there
    and go on with the next one. `report(message)` is told which.
    """
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.utilities.env import _DistributedEnv

    class ResumableStreamingDataLoader(StreamingDataLoader):
        _replay_pending = False
        _end_epoch_pending = False

        def load_state_dict(self, state: dict) -> None:
            saved = _saved_layout(state)
            current = {"world_size": _DistributedEnv.detect().world_size, "num_workers": max(self.num_workers, 1),
                       "batch_size": self.batch_size}
            if saved is None or (saved != current and not isinstance(self.dataset, StreamingDataset)):
                where = ("a loader that is not this feature store's (a run from a manifest?)" if saved is None
                         else f"{_layout_text(saved)}, and this store has several streams")
                self._end_epoch_pending = True
                self.current_epoch = state.get("current_epoch", self.current_epoch)
                _tell(report, f"the checkpoint's data position was saved by {where}; it cannot be placed at "
                              f"{_layout_text(current)}: the interrupted epoch ends here and the run goes on "
                              f"with the next one")
                return
            if saved != current:
                # litdata re-deals the rest of the epoch from the first run's plan, which must be
                # rebuilt exactly: with the drop_last it had (litdata forces it on several ranks).
                self.dataset.set_drop_last(state["dataset"]["drop_last"])
                _tell(report, f"the checkpoint's data position was saved at {_layout_text(saved)} and is "
                              f"resumed at {_layout_text(current)}: the epoch continues with the samples it "
                              f"has not yet given, dealt over the new ranks; none is repeated")
            super().load_state_dict(state)
            self._replay_pending = True

        def __iter__(self):
            if self._end_epoch_pending:
                self._end_epoch_pending = False
                self.restore = False
                return iter(())
            if self._replay_pending:
                self._replay_pending = False
            else:
                self.restore = False
            return super().__iter__()

    return ResumableStreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                        collate_fn=collate_fn, pin_memory=torch.cuda.is_available())


def _saved_layout(state: dict) -> dict | None:
    """World size, loader workers and batch size of a litdata loader state; None if it is not one."""
    dataset = state.get("dataset") if isinstance(state, dict) else None
    if not isinstance(dataset, dict) or "current_epoch" not in state:
        return None
    streams = [dataset] if "world_size" in dataset else [s for s in dataset.values() if isinstance(s, dict)]
    if not streams or any("world_size" not in s for s in streams):
        return None
    first = streams[0]
    return {"world_size": int(first["world_size"]), "num_workers": max(int(first["num_workers"]), 1),
            "batch_size": int(first["batch_size"])}


def _layout_text(layout: dict) -> str:
    return (f"world size {layout['world_size']}, {layout['num_workers']} loader worker(s) a rank, "
            f"batch size {layout['batch_size']}")


def _tell(report, message: str) -> None:
    if report is not None:
        report(message)


def load_unconditional(store: str | Path) -> dict[str, torch.Tensor]:
    """The store's unconditional features (batch keys `text_embeds`, `siglip_tokens`), batch of 1."""
    from safetensors.torch import load_file

    path = Path(store) / UNCONDITIONAL_FILE
    if not path.is_file():
        raise FeatureStoreError(f"{path}: not found; the store is unfinished: re-run `echovideo preprocess`")
    return {key: value.float() for key, value in load_file(path).items()}
