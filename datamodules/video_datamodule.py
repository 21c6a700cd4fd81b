"""LightningDataModule: training streamed from a feature store, or read from a manifest.

Two sources, one batch contract (datamodules/batch.py):
- `feature_store` (large sets): samples encoded once by `echovideo preprocess`, streamed
  by litdata's StreamingDataLoader; shuffled, sharded over ranks and nodes, and resumable
  mid-epoch: the loader's position is saved in every checkpoint and a resumed run
  continues at the exact next sample. The frozen T5 and VAE encoder are never loaded.
- `train_manifest` (small sets): clips decoded and encoded on the fly every step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.feature_store import (
    Bucket,
    check_store_measured,
    load_unconditional,
    open_store_dataset,
    read_store_meta,
    store_loader,
)
from datamodules.manifest import ManifestEntry, ManifestError, ManifestProblem, check_manifest
from datamodules.quality import QualityFilters, filters_from
from datamodules.video_dataset import REFERENCE_FRAMES, VideoFaceDataset, collate_skipping_unreadable
from datamodules.errors import ExperimentError
from lightning_modules.sampling import video_size_problems


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
        feature_store: Folder of the feature store. `echovideo preprocess` writes it from
            `train_manifest`; `fit` then streams it (and does not read the manifest).
        buckets: (frames, height, width) of each bucket of the store; a clip goes to the
            bucket of closest aspect ratio that its length fits. Default: one bucket of
            `num_frames` x `height` x `width`.
        face_models: The release's `face_encoder/` folder (insightface antelopev2, facexlib
            RetinaFace and BiSeNet). With it, preprocessing detects, aligns and parses the face
            and takes ArcFace from it; without it, face images are used as aligned crops.
        reference_frame: Where the reference face comes from when a line has no
            `face_image`: `inside_window` (middle of the training clip) or `outside_window`
            (a frame outside it, which peers report reduces copy-paste).
        skip_invalid_lines: Train on the valid lines of a manifest with bad ones, instead of
            refusing to start (the bad lines are listed either way).
        verify_sources: Skip store samples whose source file changed since preprocessing.
        filters: Thresholds on the quality measures `echovideo preprocess` stores with every
            sample (`datamodules.quality.QualityFilters`, each documented there); a sample that
            fails one is skipped in training, counted as `data/skipped/<reason>`, and counted
            per reason in the store's report. `null` trains on every stored sample. Applies to
            feature stores (a manifest read on the fly has no measures).
        repeat: One epoch walks a manifest's training set this many times; keeps per-epoch
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
        feature_store: str | None = None,
        buckets: list[list[int]] | None = None,
        face_models: str | None = None,
        reference_frame: str = "outside_window",
        skip_invalid_lines: bool = False,
        verify_sources: bool = True,
        filters: QualityFilters | None = QualityFilters(),
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
        self.feature_store = feature_store
        self.buckets = tuple(Bucket.parse(b) for b in (buckets or [[num_frames, height, width]]))
        problems = video_size_problems("data", num_frames, height, width)
        for index, bucket in enumerate(self.buckets if buckets else ()):
            problems += video_size_problems(f"data.buckets[{index}]", *dataclasses.astuple(bucket))
        if problems:
            raise ExperimentError("; ".join(problems))
        self.face_models = face_models
        if reference_frame not in REFERENCE_FRAMES:
            raise ExperimentError(f"data.reference_frame must be one of {REFERENCE_FRAMES}, got {reference_frame!r}")
        self.reference_frame = reference_frame
        self.skip_invalid_lines = skip_invalid_lines
        self.verify_sources = verify_sources
        self.filters = filters_from(filters)
        if repeat < 1:
            raise ExperimentError(f"data.repeat must be >= 1, got {repeat}")
        self.repeat = repeat
        self.train_dataset: VideoFaceDataset | None = None
        self.val_dataset: VideoFaceDataset | None = None
        self.predict_dataset: VideoFaceDataset | None = None

    def setup(self, stage: str) -> None:
        """Read and validate this stage's manifests; every problem is raised at once."""
        if stage == "fit":
            if self.feature_store is None and self.train_manifest is None:
                raise ExperimentError("fit needs data.feature_store (written by `echovideo preprocess`) "
                                 "or data.train_manifest")
            from_manifest = self.train_manifest if self.feature_store is None else None
            train, val = self._read_manifests(
                [(from_manifest, True), (self.val_manifest, True)])
            if self.feature_store is not None:
                meta = read_store_meta(self.feature_store)  # a clear error before any worker starts
                if self.filters is not None:
                    check_store_measured(Path(self.feature_store), meta)
                self.train_dataset = None
            else:
                dataset = self._dataset(train, random_start=True)
                self.train_dataset = _Repeated(dataset, self.repeat) if self.repeat > 1 else dataset
            self.val_dataset = self._dataset(val, random_start=False) if val is not None else None
        elif stage == "validate":
            if self.val_manifest is None:
                raise ExperimentError("validate needs val_manifest; set data.val_manifest")
            (val,) = self._read_manifests([(self.val_manifest, True)])
            self.val_dataset = self._dataset(val, random_start=False)
        elif stage == "predict":
            if self.predict_manifest is None:
                raise ExperimentError("predict needs predict_manifest; set data.predict_manifest")
            (predict,) = self._read_manifests([(self.predict_manifest, False)])
            self.predict_dataset = self._dataset(predict, random_start=False)

    def train_dataloader(self) -> DataLoader:
        if self.feature_store is not None:
            return self._store_loader()
        dataset = self._require(self.train_dataset, "fit")
        trainer = self.trainer
        sampler = _EpochSyncedSampler(
            dataset,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            seed=self.seed,
        )
        return _ManifestTrainLoader(self._report_resume, dataset, **self._loader_settings(sampler))

    def _store_loader(self):
        """litdata's loader over the store: its `state_dict` is the exact position in the
        epoch (per worker), which Lightning stores in every checkpoint and hands back on
        resume, so the run continues at the next unseen sample."""
        dataset = open_store_dataset(self.feature_store, shuffle=True, seed=self.seed,
                                     verify_sources=self.verify_sources, filters=self.filters)
        return store_loader(dataset, self.batch_size, self.num_workers, collate_skipping_unreadable,
                            report=self._report_resume)

    def _report_resume(self, message: str) -> None:
        """Where a resumed run's data continues from, as a warning and as TensorBoard text."""
        rank_zero_warn(f"resume: {message}")
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text("resume/data_position", message, trainer.global_step)

    def unconditional_features(self) -> dict[str, torch.Tensor] | None:
        """T5 of the negative prompt and SigLIP of a black face, when the store carries them."""
        return load_unconditional(self.feature_store) if self.feature_store is not None else None

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
        # Skipping needs a valid line left in each manifest given (an absent one is no reason to refuse).
        given = [entries for entries, (path, _) in zip(results, manifests) if path is not None]
        if problems and not (self.skip_invalid_lines and all(given)):
            raise ManifestError(problems)
        if problems:
            rank_zero_warn(f"training on the valid lines only (data.skip_invalid_lines: true); "
                           f"{ManifestError(problems)}")
        return results

    def _mixed_video_problems(self, path: str, entries: list[ManifestEntry]) -> list[ManifestProblem]:
        """Batches must share keys, so with batch_size > 1 either every line has a video or none."""
        without_video = [entry for entry in entries if entry.video is None]
        if self.batch_size == 1 or not without_video or len(without_video) == len(entries):
            return []
        return [ManifestProblem(entry.source or Path(path), entry.line, "video",
                                f"missing while other lines have one and batch_size is {self.batch_size}",
                                "give every line a video or none, or use batch_size 1")
                for entry in without_video]

    def _dataset(self, entries: list[ManifestEntry], random_start: bool) -> VideoFaceDataset:
        return VideoFaceDataset(
            entries, num_frames=self.num_frames, frame_stride=self.frame_stride,
            height=self.height, width=self.width, face_size=self.face_size, seed=self.seed,
            random_start=random_start, reference_frame=self.reference_frame, face_models=self.face_models)

    def _loader(self, dataset: VideoFaceDataset, sampler=None) -> DataLoader:
        return DataLoader(dataset, **self._loader_settings(sampler))

    def _loader_settings(self, sampler) -> dict:
        return dict(
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


class _ManifestTrainLoader(DataLoader):
    """The training loader over a manifest. It keeps no position inside an epoch: a run
    resumed mid-epoch reads the epoch's order again from its start for the batches left.
    Having a (trivial) state lets a checkpoint written with a feature store resume from a
    manifest: that position cannot apply here, so the interrupted epoch ends and the run goes
    on with the next one. `report(message)` is told which."""

    def __init__(self, report, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._report = report
        self._end_epoch_pending = False

    def state_dict(self) -> dict:
        return {"source": "manifest"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("source") == "manifest":
            self._report("a loader over a manifest keeps no position inside an epoch: the resumed epoch "
                         "reads its order again from the start for the batches it has left")
            return
        self._end_epoch_pending = True
        self._report("the checkpoint's data position is a feature store's and this run reads a manifest: "
                     "the interrupted epoch ends here and the run goes on with the next one")

    def __iter__(self):
        if self._end_epoch_pending:
            self._end_epoch_pending = False
            return iter(())
        return super().__iter__()


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
