"""`make demo`: the whole EchoVideo job on a built-in tiny setup, on a CPU, in minutes.

1. writes a demo dataset of real mp4 clips (camera moves over a photo that ships with
   scikit-image) and a face image;
2. fits the tiny VAE to those clips (a random VAE would decode noise);
3. writes a tiny release folder (transformer/, vae/, text_encoder/, ...) and loads every
   part back through the same code that loads the real release;
4. encodes the clips into a feature store with `echovideo preprocess`, trains the tiny
   transformer from it with `echovideo fit --config experiments/demo_tiny.yaml`, then
   samples videos with `echovideo predict ... --ckpt_path last`;
5. prints where the checkpoint, TensorBoard logs, videos and contact sheets are.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from datamodules.demo_data import write_demo_dataset
from datamodules.files import write_text_atomically
from datamodules.manifest import read_manifest
from datamodules.video_dataset import VideoFaceDataset
from echovideo.cli import EchoVideoCLI, PreprocessCLI
from lightning_modules.tiny import DEMO_TRANSFORMER_OVERRIDES, build_tiny_vae, write_tiny_release

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "demo_tiny.yaml"
NUM_FRAMES, SIZE, FACE_SIZE = 9, 64, 64


def fit_vae_to_clips(vae, clips: torch.Tensor, seconds: float, learning_rate: float = 2e-3, seed: int = 0):
    """Fit the VAE's reconstruction of `clips` (N x 3 x F x H x W in [-1, 1]) for `seconds`.

    Most steps see a batch of random 32 x 32 crops of single frames: the convolutions are
    shared over space and time, so these cheap steps do most of the fitting. Every fourth
    step sees one whole clip, which fits the temporal compression and the full frame.
    Posterior mean in, decoded pixels out, MSE plus a light KL term to keep the latent
    scale sane. Returns the last whole-clip MSE.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    num_clips, _, num_frames, height, width = clips.shape
    crop = min(32, height, width)
    vae.train()
    start, step, clip_mse = time.monotonic(), 0, float("nan")
    with tqdm(desc="fitting tiny VAE", unit="step") as progress:
        while time.monotonic() - start < seconds:
            whole_clip = step % 4 == 3
            if whole_clip:
                batch = clips[torch.randint(0, num_clips, (1,), generator=generator)]
            else:
                picks = torch.randint(0, num_clips, (8,), generator=generator).tolist()
                frames = torch.randint(0, num_frames, (8,), generator=generator).tolist()
                tops = torch.randint(0, height - crop + 1, (8,), generator=generator).tolist()
                lefts = torch.randint(0, width - crop + 1, (8,), generator=generator).tolist()
                batch = torch.stack([
                    clips[c, :, f : f + 1, y : y + crop, x : x + crop]
                    for c, f, y, x in zip(picks, frames, tops, lefts)
                ])  # 8 x 3 x 1 x crop x crop
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.mode()).sample
            loss = torch.nn.functional.mse_loss(reconstruction, batch)
            kl = posterior.kl().mean() / batch[0].numel()
            optimizer.zero_grad(set_to_none=True)
            (loss + 1e-3 * kl).backward()
            optimizer.step()
            if whole_clip:
                clip_mse = loss.item()
                progress.set_postfix(clip_mse=f"{clip_mse:.4f}")
            step += 1
            progress.update()
    vae.eval()
    return clip_mse


def _write_predict_manifest(manifest: Path, count: int = 2) -> Path:
    """Prompt + face image only (no video): what `predict` needs."""
    entries = read_manifest(manifest)[:count]
    path = manifest.with_name("predict.jsonl")
    lines = [
        json.dumps({"id": f"demo_{i}", "caption": e.caption, "face_image": os.path.relpath(e.face_image, path.parent)})
        for i, e in enumerate(entries)
    ]
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def run_demo(out: Path, vae_seconds: float, train_time: str) -> dict:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    data_dir, release_dir, store_dir, run_dir = out / "data", out / "release", out / "store", out / "run"

    manifest = write_demo_dataset(data_dir, num_frames=NUM_FRAMES, height=SIZE, width=SIZE, face_size=FACE_SIZE)
    predict_manifest = _write_predict_manifest(manifest)
    dataset = VideoFaceDataset(
        read_manifest(manifest), num_frames=NUM_FRAMES, frame_stride=1, height=SIZE, width=SIZE,
        face_size=FACE_SIZE, seed=0, random_start=False,
    )
    samples = [dataset[i] for i in range(len(dataset))]
    clips = torch.stack([s["video"] for s in samples])

    vae = build_tiny_vae(seed=0)
    mse = fit_vae_to_clips(vae, clips, seconds=vae_seconds)
    print(f"tiny VAE fitted: reconstruction MSE {mse:.4f} on {len(clips)} clips")
    write_tiny_release(
        release_dir, seed=0, vae=vae, transformer_overrides=DEMO_TRANSFORMER_OVERRIDES, overwrite=True
    )

    overrides = [
        f"--run_dir={run_dir}",
        f"--model.init_args.pretrained_path={release_dir}",
        f"--data.init_args.train_manifest={manifest}",
        f"--data.init_args.predict_manifest={predict_manifest}",
        f"--data.init_args.feature_store={store_dir}",
    ]
    # The VAE was refitted, so features from an earlier demo run are stale: start the store anew.
    PreprocessCLI(args=["--config", str(EXPERIMENT), "--preprocess.overwrite=true", *overrides]).run_preprocess()
    EchoVideoCLI(args=["fit", "--config", str(EXPERIMENT), f"--trainer.max_time={train_time}", *overrides])
    predict = EchoVideoCLI(args=["predict", "--config", str(EXPERIMENT), "--ckpt_path=last", *overrides])
    writer = next(c for c in predict.trainer.callbacks if hasattr(c, "written"))
    return {
        "checkpoint": run_dir / "checkpoints" / "last.ckpt",
        "tensorboard": run_dir / "tensorboard",
        "videos": writer.written,
        "minutes": (time.monotonic() - started) / 60,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where everything is written")
    parser.add_argument("--vae-seconds", type=float, default=90.0, help="time spent fitting the tiny VAE")
    parser.add_argument("--train-time", default="00:00:02:30", help="transformer training time, DD:HH:MM:SS")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # the CLI runs below get their arguments explicitly
    result = run_demo(args.out, args.vae_seconds, args.train_time)

    print("\nEchoVideo demo finished in %.1f min." % result["minutes"])
    print(f"  checkpoint:       {result['checkpoint']}")
    print(f"  TensorBoard logs: {result['tensorboard']}")
    for video in result["videos"]:
        print(f"  video:            {video}")
        print(f"  contact sheet:    {video.with_suffix('.png')}")
    print(f"\nOpen TensorBoard with:\n  .venv/bin/tensorboard --logdir {result['tensorboard']}")


if __name__ == "__main__":
    main()
