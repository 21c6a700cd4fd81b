"""On-disk cache of encoded features, so training need not run the frozen encoders.

Layout: `<cache_dir>/index.jsonl` (one line per sample: `sample_id`, `caption`, `file`)
and one safetensors file per sample holding the cached keys of datamodules/batch.py
without the batch axis. Every file is written under a temporary name and renamed, and
samples already present are skipped, so an interrupted cache build resumes where it
stopped and never leaves a half-written file under its final name.
"""

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from datamodules import batch as keys
from datamodules.files import file_stem_for, write_text_atomically

INDEX_NAME = "index.jsonl"


class FeatureCacheError(ValueError):
    """A cache folder that is missing, incomplete or inconsistent."""


def _file_name(sample_id: str) -> str:
    return file_stem_for(sample_id) + ".safetensors"


def write_feature_cache(
    batches: Iterable[dict],
    encode: Callable[[dict], dict[str, torch.Tensor]],
    cache_dir: str | Path,
    total: int | None = None,
) -> Path:
    """Encode every batch with `encode` (raw batch -> cached keys) and store each sample.

    Returns the index path. `total` (number of batches) only sizes the progress bar.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for batch in tqdm(batches, total=total, desc="caching features", unit="batch"):
        sample_ids = list(batch.get(keys.SAMPLE_ID, []))
        if not sample_ids:
            continue  # every sample of this batch was unreadable
        captions = list(batch[keys.CAPTION])
        todo = [i for i, sid in enumerate(sample_ids) if not (cache_dir / _file_name(sid)).is_file()]
        features = encode(batch) if todo else {}
        for i in todo:
            path = cache_dir / _file_name(sample_ids[i])
            temporary = path.with_name(f".{path.name}.tmp")
            tensors = {k: v[i].detach().to("cpu", torch.float32).contiguous() for k, v in features.items()}
            save_file(tensors, temporary)
            os.replace(temporary, path)
        records += [
            {"sample_id": sid, "caption": caption, "file": _file_name(sid)}
            for sid, caption in zip(sample_ids, captions)
        ]
    index = cache_dir / INDEX_NAME
    write_text_atomically(index, "".join(json.dumps(r) + "\n" for r in records))
    return index


class CachedFeatureDataset(Dataset):
    """Samples of a feature cache, as dicts of the cached keys plus id and caption.

    `preload` keeps every sample in memory (small caches, e.g. the demo's).
    """

    def __init__(self, cache_dir: str | Path, preload: bool = False):
        self.cache_dir = Path(cache_dir)
        index = self.cache_dir / INDEX_NAME
        if not index.is_file():
            raise FeatureCacheError(
                f"{index}: feature cache index not found; build the cache first "
                f"(datamodules.feature_cache.write_feature_cache) or fix `feature_cache_dir`"
            )
        self.records = []
        for line_number, line in enumerate(index.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not (self.cache_dir / record["file"]).is_file():
                raise FeatureCacheError(
                    f"{index}:{line_number}: field 'file': {self.cache_dir / record['file']} does not "
                    "exist; rebuild the cache (existing samples are kept)"
                )
            self.records.append(record)
        if not self.records:
            raise FeatureCacheError(f"{index}: the feature cache holds no samples")
        self._preloaded = [self._load(i) for i in range(len(self.records))] if preload else None

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> dict:
        record = self.records[index]
        sample = load_file(self.cache_dir / record["file"])
        sample[keys.SAMPLE_ID] = record["sample_id"]
        sample[keys.CAPTION] = record["caption"]
        return sample

    def __getitem__(self, index: int) -> dict:
        return self._preloaded[index] if self._preloaded is not None else self._load(index)
