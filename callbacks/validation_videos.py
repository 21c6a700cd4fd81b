"""Sample videos for fixed prompts and faces during training, shown in TensorBoard.

torch's `SummaryWriter.add_video` needs moviepy 1.x (with moviepy 2 it prints a line and
writes nothing), so each video is encoded here as an animated GIF with PIL and written as
an image summary, which TensorBoard's Images tab plays.
"""

import io

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

from callbacks.training_throughput import excluded_from_throughput

TAG_PREFIX = "val/videos"


def encode_gif(frames: np.ndarray, fps: float, max_side: int | None = None) -> bytes:
    """F x H x W x 3 uint8 frames -> an animated GIF that loops, optionally shrunk so
    that its longer side is at most `max_side` pixels."""
    images = [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]
    height, width = frames.shape[1:3]
    if max_side is not None and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        images = [image.resize(size, Image.Resampling.LANCZOS) for image in images]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:],
        duration=round(1000 / fps), loop=0, disposal=1,
    )
    return buffer.getvalue()


def gif_summary(tag: str, gif: bytes, description: str = "") -> Summary:
    """An image summary holding a GIF (what `add_video` writes); TensorBoard animates it."""
    with Image.open(io.BytesIO(gif)) as image:
        width, height = image.size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    metadata = SummaryMetadata(summary_description=description)
    return Summary(value=[Summary.Value(tag=tag, image=image, metadata=metadata)])


def _first_samples(batch: dict, count: int) -> dict:
    """The first `count` samples of a collated batch (tensors and lists cut, the rest kept)."""
    cut = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            cut[key] = value[:count]
        elif isinstance(value, (list, tuple)):
            cut[key] = list(value[:count])
        else:
            cut[key] = value
    return cut


def _batch_size(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError(f"cannot tell the batch size of a predict batch with keys {sorted(batch)}")


class ValidationVideos(pl.Callback):
    """Every `every_n_steps` optimizer steps, generate videos for the datamodule's predict
    prompts and faces (its predict manifest, the first `max_videos`) and write them to
    TensorBoard as `val/videos/<sample_id>` (Images tab; the caption is the card's
    description).

    Every rank generates (a ZeRO-3 run needs every rank in each forward pass, and all of
    them see the same prompts); only global rank 0 writes. Generation runs with the module
    in eval mode and without gradients, in the trainer's precision context; each
    submodule's train/eval mode is restored afterwards. Its time is left out of
    TrainingThroughput's figures.

    Args:
        every_n_steps: optimizer steps between two sets of videos.
        max_videos: how many predict samples to generate each time.
        at_train_start: also generate before the first step (the starting point).
        max_side: shrink frames so that their longer side is at most this many pixels
            (keeps event files small: a 49-frame 480 x 720 GIF is about 15 MB); null keeps
            the sampled size.
        face_models: the release's `face_encoder/` folder; when given, each set of videos
            is also scored: `val/facesim_arc` (mean over videos of the cosine between the
            reference's ArcFace, the batch's `arcface` or that of its face crop, and that of
            the largest face in each of `facesim_frames` uniformly sampled frames) and
            `val/facesim_arc_frames_without_face` (frames skipped) and
            `val/facesim_arc_references_without_face` (videos skipped: no face in the crop).
    """

    def __init__(self, every_n_steps: int, max_videos: int = 4, at_train_start: bool = False,
                 max_side: int | None = 360, face_models: str | None = None, facesim_frames: int = 16):
        if every_n_steps < 1:
            raise ValueError(f"ValidationVideos(every_n_steps={every_n_steps}): must be >= 1 optimizer steps")
        if max_videos < 1:
            raise ValueError(f"ValidationVideos(max_videos={max_videos}): must be >= 1")
        if max_side is not None and max_side < 8:
            raise ValueError(f"ValidationVideos(max_side={max_side}): give at least 8 pixels, or null for full size")
        self.every_n_steps = every_n_steps
        self.max_videos = max_videos
        self.at_train_start = at_train_start
        self.max_side = max_side
        self.face_models = face_models
        self.facesim_frames = facesim_frames
        self._extractor = None
        self._batches: list[dict] | None = None
        self._logged_at: int | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail before training, not at the first video, when prompts or TensorBoard are missing."""
        if stage != "fit":
            return
        self._check_prompt_source(trainer.datamodule)
        if self.face_models is not None and self._extractor is None:
            from datamodules.face_pipeline import FaceExtractor

            self._extractor = FaceExtractor(self.face_models)  # names any missing face model now
        if self._tensorboard(trainer) is None:
            raise ValueError(
                "ValidationVideos writes into TensorBoard: set trainer.logger to a "
                "lightning.pytorch.loggers.TensorBoardLogger (or add one to the list of loggers)"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Videos of the starting weights, when asked for."""
        if self.at_train_start:
            self.log_videos(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        """Videos every `every_n_steps` optimizer steps (once per step under accumulation)."""
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._logged_at:
            self.log_videos(trainer, pl_module)

    # ------------------------------------------------------------------ parts
    def log_videos(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """Generate on every rank, write on rank 0; returns the tags written (empty elsewhere)."""
        self._logged_at = trainer.global_step
        with excluded_from_throughput(trainer):
            predictions = self._generate(trainer, pl_module, self._prompt_batches(trainer))
            if not trainer.is_global_zero:
                return []
            writer = self._tensorboard(trainer).experiment
            # SummaryWriter has no public call for a ready-made Summary; its file writer
            # does (this is what add_image and add_video use).
            file_writer = writer._get_file_writer()
            tags = []
            for prediction in predictions:
                frames = prediction["frames"].numpy()
                captions = prediction.get("caption") or [""] * len(frames)
                for video, sample_id, caption in zip(frames, prediction["sample_id"], captions):
                    tag = f"{TAG_PREFIX}/{sample_id}"
                    gif = encode_gif(video, prediction.get("fps", 8), self.max_side)
                    file_writer.add_summary(gif_summary(tag, gif, caption), trainer.global_step)
                    tags.append(tag)
            if self.face_models is not None:
                for name, value in self.face_similarity(predictions, self._prompt_batches(trainer)).items():
                    writer.add_scalar(f"val/{name}", value, trainer.global_step)
                    tags.append(f"val/{name}")
            writer.flush()
        return tags

    def face_similarity(self, predictions: list[dict], batches: list[dict]) -> dict[str, float]:
        """FaceSim-Arc of the generated videos against their batches' reference faces."""
        from datamodules import batch as keys
        from datamodules.face_pipeline import FaceExtractor
        from datamodules.skip_reasons import SkippedSample
        from lightning_modules.video_metrics import detect_faces, facesim_arc, uniform_indices

        if self._extractor is None:
            self._extractor = FaceExtractor(self.face_models)
        scores, without_face, references_without_face = [], 0, 0
        for prediction, batch in zip(predictions, batches):
            for index, video in enumerate(prediction["frames"].numpy()):
                if keys.ARCFACE in batch:
                    reference = batch[keys.ARCFACE][index].float().cpu().numpy()
                else:
                    crop = (batch[keys.FACE_IMAGE][index].float().clamp(0, 1) * 255).round().byte()
                    try:
                        reference = self._extractor.extract(crop.permute(1, 2, 0).cpu().numpy()).arcface
                    except SkippedSample:
                        references_without_face += 1  # nothing to compare with
                        continue
                frames = video[uniform_indices(len(video), self.facesim_frames)]
                result = facesim_arc(reference, detect_faces(self._extractor, frames))
                without_face += result["frames_without_face"]
                if result["value"] is not None:
                    scores.append(result["value"])
        metrics = {"facesim_arc_frames_without_face": float(without_face),
                   "facesim_arc_references_without_face": float(references_without_face)}
        if scores:
            metrics["facesim_arc"] = float(np.mean(scores))
        return metrics

    def _generate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[dict]) -> list[dict]:
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.predict_step_context():
                return [pl_module.predict_step(batch, index) for index, batch in enumerate(batches)]
        finally:
            for module, training in modes.items():
                module.train(training)

    def _prompt_batches(self, trainer: pl.Trainer) -> list[dict]:
        """The first `max_videos` samples of the predict loader, read once and kept."""
        if self._batches is None:
            datamodule = trainer.datamodule
            self._check_prompt_source(datamodule)
            if getattr(datamodule, "predict_dataset", True) is None:
                datamodule.setup("predict")  # VideoFaceDataModule reads its manifest in setup
            batches, remaining = [], self.max_videos
            for batch in datamodule.predict_dataloader():
                size = _batch_size(batch)
                batches.append(batch if size <= remaining else _first_samples(batch, remaining))
                remaining -= min(size, remaining)
                if remaining == 0:
                    break
            if not batches:
                raise ValueError("ValidationVideos: the predict loader yielded no samples; "
                                 "check data.predict_manifest")
            self._batches = batches
        return self._batches

    @staticmethod
    def _check_prompt_source(datamodule) -> None:
        if datamodule is None or not is_overridden("predict_dataloader", datamodule, pl.LightningDataModule):
            raise ValueError(
                "ValidationVideos takes its prompts and faces from the datamodule's predict loader: fit "
                "with a datamodule that has one (VideoFaceDataModule with data.predict_manifest set)"
            )
        if getattr(datamodule, "predict_manifest", "") is None:
            raise ValueError(
                "ValidationVideos needs prompts and faces: set data.predict_manifest (JSONL lines with "
                "`caption` and `face_image`) or remove the ValidationVideos callback"
            )

    @staticmethod
    def _tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
        return next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)
