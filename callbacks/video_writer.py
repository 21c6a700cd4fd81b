"""Writes each predicted video as an .mp4 plus a PNG contact sheet of its frames."""

import json
import os
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from datamodules.files import file_stem_for
from datamodules.video_io import write_mp4


def contact_sheet(frames: np.ndarray, columns: int = 0) -> Image.Image:
    """F x H x W x 3 uint8 frames -> one image, frames left to right, top to bottom."""
    num_frames, height, width, _ = frames.shape
    columns = columns or int(np.ceil(np.sqrt(num_frames)))
    rows = int(np.ceil(num_frames / columns))
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        row, column = divmod(index, columns)
        sheet[row * height : (row + 1) * height, column * width : (column + 1) * width] = frame
    return Image.fromarray(sheet)


class VideoPredictionWriter(BasePredictionWriter):
    """After every predict batch (`output_dir` defaults to `<trainer.default_root_dir>/predictions`):
    `<output_dir>/<sample_id>.mp4`, `<sample_id>.png`, and
    one line per video in `<output_dir>/predictions.jsonl` (sample id, caption, files).

    Files are written to a temporary name and renamed, so an interrupted run never leaves
    a truncated video under the final name.
    """

    def __init__(self, output_dir: str | None = None, write_contact_sheet: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.write_contact_sheet = write_contact_sheet
        self.written: list[Path] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.output_dir is None:  # default: beside the run's checkpoints and logs
            self.output_dir = Path(trainer.default_root_dir) / "predictions"

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        frames = prediction["frames"].numpy()
        index_lines = []
        for video, sample_id, caption in zip(frames, prediction["sample_id"], prediction["caption"]):
            stem = file_stem_for(f"{sample_id}_rank{trainer.global_rank}" if trainer.world_size > 1 else sample_id)
            video_path = self.output_dir / f"{stem}.mp4"
            write_mp4(video_path, video, fps=prediction["fps"])
            record = {"sample_id": sample_id, "caption": caption, "video": video_path.name}
            if self.write_contact_sheet:
                sheet_path = self.output_dir / f"{stem}.png"
                temporary = sheet_path.with_name(f".{sheet_path.name}.tmp")
                contact_sheet(video).save(temporary, format="PNG")
                os.replace(temporary, sheet_path)
                record["contact_sheet"] = sheet_path.name
            self.written.append(video_path)
            index_lines.append(json.dumps(record))
        with open(self.output_dir / "predictions.jsonl", "a") as index:
            index.write("\n".join(index_lines) + "\n")
