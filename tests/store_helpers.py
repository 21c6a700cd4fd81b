"""A small raw dataset with one of every bad input, and the demo experiment's overrides
that preprocess it into a feature store and train from it at 32x32 (shared by the store,
resume and DeepSpeed tests)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from helpers_video import write_gray_ramp_video

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "demo_tiny.yaml"


def write_store_dataset(folder: Path) -> Path:
    """Good clips with and without a face photo, plus one of every bad kind."""
    (folder / "clips").mkdir(parents=True)
    face = folder / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(face)
    lines = []
    for i in range(8):
        write_gray_ramp_video(folder / "clips" / f"good{i}.mp4", 14)
        line = {"id": f"good{i}", "video": f"clips/good{i}.mp4", "caption": f"a man walks {i}"}
        if i % 2 == 0:
            line["face_image"] = "face.png"
        lines.append(line)
    (folder / "clips" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")
    (folder / "clips" / "empty.mp4").write_bytes(b"")
    write_gray_ramp_video(folder / "clips" / "short.mp4", 5)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines += [
        {"id": "corrupt", "video": "clips/corrupt.mp4", "caption": "a woman smiles"},
        {"id": "empty", "video": "clips/empty.mp4", "caption": "a woman smiles"},
        {"id": "short", "video": "clips/short.mp4", "caption": "a woman smiles"},
        {"id": "bad_photo", "video": "clips/good0.mp4", "caption": "a woman smiles", "face_image": "broken.png"},
        {"id": "no_caption", "video": "clips/good1.mp4", "caption": "   "},
        {"id": "long", "video": "clips/good2.mp4", "caption": " ".join(["a happy man walks in the park"] * 5)},
    ]
    manifest = folder / "train.jsonl"
    # As editors write them: a byte-order mark, Windows line endings, a blank line.
    text = "\ufeff" + "\r\n".join(json.dumps(line, ensure_ascii=False) for line in lines[:3]) + "\r\n\r\n"
    text += "\r\n".join(json.dumps(line, ensure_ascii=False) for line in lines[3:]) + "\r\n"
    manifest.write_bytes(text.encode("utf-8"))
    return manifest


def store_overrides(release: Path, manifest: Path, store: Path, run: Path, part_size: int = 4) -> list[str]:
    return [
        f"--run_dir={run}",
        "--trainer.max_time=null",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--model.init_args.pretrained_path={release}",
        "--model.init_args.sampling.height=32",
        "--model.init_args.sampling.width=32",
        f"--data.init_args.train_manifest={manifest}",
        f"--data.init_args.feature_store={store}",
        "--data.init_args.height=32",
        "--data.init_args.width=32",
        "--data.init_args.face_size=32",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=2",
        f"--preprocess.part_size={part_size}",
        # Gray ramps do not move, so the default filters would drop them all as `static`; the
        # filters have their own tests (tests/test_quality_filters.py).
        "--data.init_args.filters=null",
    ]


def store_contents(store: Path) -> dict:
    """Each sample of a store by id: the sum of every tensor it holds."""
    import torch

    from datamodules import batch as keys
    from datamodules.feature_store import open_store_dataset

    contents = {}
    for sample in open_store_dataset(store, shuffle=False, seed=0, verify_sources=False):
        contents[sample[keys.SAMPLE_ID]] = {k: v.float().sum().item() for k, v in sample.items()
                                            if isinstance(v, torch.Tensor)}
    return contents


def stored_face_crops(store: Path) -> dict:
    """Each sample's stored face crop (`face_crop_png`) by id, as H x W x 3 uint8 RGB."""
    import io

    import numpy as np
    from litdata import StreamingDataset
    from PIL import Image

    crops = {}
    for index in sorted(Path(store).glob("*/node-*/index.json")):
        for record in StreamingDataset(str(index.parent)):
            crops[record["sample_id"]] = np.asarray(Image.open(io.BytesIO(record["face_crop_png"])).convert("RGB"))
    return crops
