"""LightningDataModule over JSONL manifests of (video, caption, face image) samples."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.feature_cache import CachedFeatureDataset
from datamodules.manifest import ManifestEntry, ManifestError, check_manifest, format_problem
from datamodules.video_dataset import VideoFaceDataset, collate_skipping_unreadable


class VideoFaceDataModule(L.LightningDataModule):
    """Train, validation and predict loaders for identity-preserving text-to-video.

    Args:
        train_manifest: JSONL manifest of training samples (`video`, `caption`,
            `face_image`, optional `id`); relative paths resolve against its directory.
        val_manifest: Manifest for validation; None disables validation.
        predict_manifest: Manifest for prediction; `video` is optional on its lines.
        num_frames: Frames per clip.
        frame_stride: Step between the decoded frames (2 keeps every other frame).
        height: Output frame height in pixels (frames are resized to cover, then centre-cropped).
        width: Output frame width in pixels.
        face_size: Side of the square face crop in pixels.
        batch_size: Samples per batch, per device.
        num_workers: DataLoader worker processes per device; 0 loads in the main process.
        seed: Seeds the shuffle order and the random start frames of training clips.
        feature_cache_dir: Train on features cached by `datamodules.feature_cache`
            instead of decoding and encoding videos (the manifest is then not read for fit).
        repeat: One epoch walks the training set this many times; keeps per-epoch
            overhead low on tiny datasets.
    """

    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        predict_manifest: str | None = None,
        num_frames: int = 49,
        frame_stride: int = 1,
        height: int = 480,
        width: int = 720,
        face_size: int = 512,
        batch_size: int = 1,
        num_workers: int = 4,
        seed: int = 0,
        feature_cache_dir: str | None = None,
        repeat: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_manifest = train_manifest
        self.val_manifest = val_manifest
        self.predict_manifest = predict_manifest
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.height = height
        self.width = width
        self.face_size = face_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.feature_cache_dir = feature_cache_dir
        if repeat < 1:
            raise ValueError(f"data.repeat must be >= 1, got {repeat}")
        self.repeat = repeat
        self.train_dataset: VideoFaceDataset | None = None
        self.val_dataset: VideoFaceDataset | None = None
        self.predict_dataset: VideoFaceDataset | None = None

    def setup(self, stage: str) -> None:
        """Read and validate this stage's manifests; every problem is raised at once."""
        if stage == "fit":
            if self.feature_cache_dir is None and self.train_manifest is None:
                raise ValueError("fit needs data.train_manifest or data.feature_cache_dir")
            from_manifest = self.train_manifest if self.feature_cache_dir is None else None
            train, val = self._read_manifests(
                [(from_manifest, True), (self.val_manifest, True)])
            if self.feature_cache_dir is not None:
                train_dataset = CachedFeatureDataset(self.feature_cache_dir)
            else:
                train_dataset = self._dataset(train, random_start=True)
            self.train_dataset = _Repeated(train_dataset, self.repeat) if self.repeat > 1 else train_dataset
            self.val_dataset = self._dataset(val, random_start=False) if val is not None else None
        elif stage == "validate":
            if self.val_manifest is None:
                raise ValueError("validate needs val_manifest; set data.val_manifest")
            (val,) = self._read_manifests([(self.val_manifest, True)])
            self.val_dataset = self._dataset(val, random_start=False)
        elif stage == "predict":
            if self.predict_manifest is None:
                raise ValueError("predict needs predict_manifest; set data.predict_manifest")
            (predict,) = self._read_manifests([(self.predict_manifest, False)])
            self.predict_dataset = self._dataset(predict, random_start=False)

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset, "fit")
        trainer = self.trainer
        sampler = _EpochSyncedSampler(
            dataset,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            seed=self.seed,
        )
        return self._loader(dataset, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_manifest is None:
            return []  # Lightning reads an empty list as "no validation"
        return self._loader(self._require(self.val_dataset, "fit or validate"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.predict_dataset, "predict"))

    def _read_manifests(
        self, manifests: list[tuple[str | None, bool]]
    ) -> list[list[ManifestEntry] | None]:
        """Parse each (path, require_video); raise one ManifestError covering all of them."""
        results, problems = [], []
        for path, require_video in manifests:
            if path is None:
                results.append(None)
                continue
            entries, manifest_problems = check_manifest(Path(path), require_video)
            if not require_video:
                manifest_problems += self._mixed_video_problems(path, entries)
            results.append(entries)
            problems += manifest_problems
        if problems:
            raise ManifestError(problems)
        return results

    def _mixed_video_problems(self, path: str, entries: list[ManifestEntry]) -> list[str]:
        """Batches must share keys, so with batch_size > 1 either every line has a video or none."""
        without_video = [entry for entry in entries if entry.video is None]
        if self.batch_size == 1 or not without_video or len(without_video) == len(entries):
            return []
        return [format_problem(Path(path), entry.line, "video",
                               f"missing while other lines have one and batch_size is "
                               f"{self.batch_size}",
                               "give every line a video or none, or use batch_size 1")
                for entry in without_video]

    def _dataset(self, entries: list[ManifestEntry], random_start: bool) -> VideoFaceDataset:
        return VideoFaceDataset(
            entries, num_frames=self.num_frames, frame_stride=self.frame_stride,
            height=self.height, width=self.width, face_size=self.face_size, seed=self.seed,
            random_start=random_start)

    def _loader(self, dataset: VideoFaceDataset, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,  # training order comes from the sampler
            num_workers=self.num_workers,
            collate_fn=collate_skipping_unreadable,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    @staticmethod
    def _require(dataset: VideoFaceDataset | None, stage: str) -> VideoFaceDataset:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for this dataloader")
        return dataset


class _EpochSyncedSampler(DistributedSampler):
    """Shuffles by (seed + epoch) and hands Lightning's per-epoch set_epoch to the dataset.

    Lightning calls `set_epoch` on the loader's sampler, never on its dataset; forwarding
    it is what makes random start frames change from epoch to epoch. Seeding by epoch,
    not by a running generator, makes a resumed run see the same order as an unbroken one.
    Being a DistributedSampler already, it also stops Lightning from swapping in its own
    under DDP, which would drop the forwarding.
    """

    def __init__(self, dataset: VideoFaceDataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class _Repeated(Dataset):
    """`dataset` walked `times` times per epoch."""

    def __init__(self, dataset: Dataset, times: int):
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
