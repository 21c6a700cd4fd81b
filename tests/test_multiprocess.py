"""Runs of several real processes: 2 CPU ranks over gloo, started through the kit's own entry
point as a user starts them (Lightning re-launches the command line for the second rank, so
the run is a subprocess of the test, never inside pytest)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from datamodules.demo_data import write_demo_dataset
from module_helpers import tensorboard_scalars

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "demo_tiny.yaml"


def launch_ranks(command: str, *args, world_size: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m echovideo <command> ...` on `world_size` CPU ranks (DDP over gloo)."""
    # A fresh launch, as from a shell: not the rendezvous (MASTER_PORT, RANK, ...) that an
    # earlier in-process test left in this process's environment, whose port is still held.
    inherited = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                 "NODE_RANK", "GROUP_RANK")
    env = {key: value for key, value in os.environ.items()
           if key not in inherited and not key.startswith(("TORCHELASTIC_", "PL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "echovideo", command, *map(str, args), "--trainer.accelerator=cpu",
         f"--trainer.devices={world_size}", "--trainer.strategy=ddp"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_rank_whose_whole_batch_is_unreadable_does_not_stop_a_ddp_run(tiny_release, tmp_path):
    """Two readable clips and two corrupt ones, batch 1 on 2 ranks, 2 micro-batches a step: a
    rank often holds only a corrupt clip. The run takes every step and counts every skip over
    both ranks."""
    manifest = write_demo_dataset(tmp_path / "data", num_clips=2, num_frames=9, height=32, width=32, face_size=32)
    for name in ("corrupt_a", "corrupt_b"):
        (manifest.parent / f"{name}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")
        with open(manifest, "a") as lines:
            lines.write(json.dumps({"id": name, "video": f"{name}.mp4", "caption": "a man walks"}) + "\n")
    run = tmp_path / "run"
    process = launch_ranks(
        "fit", "--config", EXPERIMENT, f"--run_dir={run}", "--trainer.max_time=null", "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        f"--model.init_args.pretrained_path={tiny_release}", "--model.init_args.sampling.height=32",
        "--model.init_args.sampling.width=32", f"--data.init_args.train_manifest={manifest}",
        "--data.init_args.feature_store=null", "--data.init_args.repeat=1", "--data.init_args.height=32",
        "--data.init_args.width=32", "--data.init_args.face_size=32", "--data.init_args.batch_size=1")
    assert process.returncode == 0, process.stderr[-4000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    logged = tensorboard_scalars(run / "tensorboard")
    # 4 samples over 2 ranks: 2 micro-batches a rank an epoch, 2 epochs, each corrupt clip read once an epoch.
    assert logged["data/skipped/unreadable_video"][-1] == (1, 4.0)
