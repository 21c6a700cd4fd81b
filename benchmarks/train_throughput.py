"""Seconds per step, samples/s, MFU and peak memory of one EchoVideo transformer training step.

The transformer is built from its config with random weights (no checkpoint), and trained
through Lightning on random inputs of the shapes a real batch has (noisy latent plus face
latent on channels, T5 tokens, SigLIP tokens, repeated ArcFace), with the module's loss
shape (MSE on the prediction). FLOPs and MFU come from lightning_modules/flops.py and the
peak table of callbacks/training_throughput.py, as the `perf/` dashboard computes them.

On CUDA (default `--size release`): the release's config (5.6 B parameters), bf16,
gradient checkpointing, batch 1, 49 frames at 480x720 and 480x848, DeepSpeedStrategy
(stage=2) on one GPU. One GPU holds everything ZeRO-2 would shard over eight; AdamW then
needs about 20 bytes per parameter (112 GB), so `--optimizer auto` falls back to SGD
(12 bytes per parameter: bf16 weights and gradients, fp32 master weights and gradient
partition) when AdamW does not fit; the step differs by the optimizer update only.
`--offload-optimizer` keeps optimizer state on the CPU instead (that step then includes
the CPU update and the transfers).

On a CPU (default `--size demo`): the demo's transformer (4 layers, 4 x 32 heads), fp32,
9 frames at 64x96 and 64x112, to show the script works. MFU needs `--peak-tflops` there.

Each configuration runs in its own process (a fresh CUDA context and DeepSpeed engine);
the median over the timed steps is reported.

    .venv/bin/python benchmarks/train_throughput.py                      # CPU: demo size
    .venv/bin/python benchmarks/train_throughput.py --size tiny --steps 5
    .venv/bin/python benchmarks/train_throughput.py --size release       # one GPU: the release's size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULT_PREFIX = "RESULT "
# Bytes per parameter on ONE GPU under ZeRO-2 with bf16: weights 2 + gradients 2 + fp32
# master 4 + fp32 gradient partition at the step 4, plus AdamW's two fp32 moments 8.
BYTES_PER_PARAMETER = {"adamw": 20, "sgd": 12, "offload": 4}


def transformer_config(size: str, layers: int | None) -> dict:
    from lightning_modules.tiny import DEMO_TRANSFORMER_OVERRIDES, tiny_transformer_config

    if size == "release":
        config = {}  # EchoVideoTransformer3DModel's defaults are the release's sizes
    elif size == "demo":
        config = tiny_transformer_config(**DEMO_TRANSFORMER_OVERRIDES)
    else:
        config = tiny_transformer_config()
    if layers is not None:
        config["num_layers"] = layers
    return config


def build_step_module(config: dict, gradient_checkpointing: bool, optimizer: str):
    import lightning.pytorch as pl
    import torch.nn.functional as F

    from lightning_modules.echovideo_transformer import EchoVideoTransformer3DModel
    from lightning_modules.training_levers import build_optimizer

    class TransformerStep(pl.LightningModule):
        """The transformer's training step on random conditions (latents come from the batch)."""

        def __init__(self):
            super().__init__()
            self.transformer = None
            self._rotary = {}

        def configure_model(self):
            if self.transformer is None:  # built on the strategy's device (Lightning's init context)
                self.transformer = EchoVideoTransformer3DModel(**config)
                if gradient_checkpointing:
                    self.transformer.enable_gradient_checkpointing()
                self.transformer.train()

        def training_step(self, batch, batch_idx):
            cfg = self.transformer.config
            latents = batch["latents"]
            size, frames, channels, height, width = latents.shape
            dtype, device = self.transformer.dtype, latents.device

            def random(*shape):
                return torch.randn(*shape, device=device, dtype=dtype)

            face_latent = torch.randn(size, frames, cfg.in_channels - channels, height, width, device=device)
            key = (frames, height, width)
            if key not in self._rotary:
                self._rotary[key] = self.transformer.rotary_embeddings(frames, height, width, device)
            prediction = self.transformer(
                hidden_states=torch.cat([latents, face_latent], dim=2).to(dtype),
                encoder_hidden_states=random(size, cfg.max_text_seq_length, cfg.text_embed_dim),
                encoder_face_hidden_states=random(size, cfg.face_seq_length, cfg.face_embed_dim),
                encoder_face_feats_hidden_states=self.transformer.repeat_identity_embedding(
                    random(size, cfg.face_features_embed_dim)
                ),
                timestep=torch.randint(0, 1000, (size,), device=device),
                image_rotary_emb=self._rotary[key],
                return_dict=False,
            )[0]
            return F.mse_loss(prediction.float(), torch.randn_like(prediction, dtype=torch.float32))

        def configure_optimizers(self):
            parameters = self.transformer.parameters()
            if optimizer == "sgd":
                return torch.optim.SGD(parameters, lr=1e-5)
            # DeepSpeedCPUAdam under optimizer offload, as the kit's module does.
            return build_optimizer("adamw", parameters, lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4,
                                   strategy=self.trainer.strategy)

    return TransformerStep()


class FixedLatents(torch.utils.data.Dataset):
    """The same random latent (frames first, 16 channels) every time: no loader cost."""

    def __init__(self, shape: tuple[int, ...], length: int):
        self.latents, self.length = torch.randn(shape), length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {"latents": self.latents}


def run_one(spec: dict) -> dict:
    """One configuration in this process; returns its figures."""
    import lightning.pytorch as pl

    from callbacks.training_throughput import dense_bf16_peak_tflops
    from lightning_modules.flops import count_parameters, training_flops_per_sample

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available() and not spec["cpu"]
    config = transformer_config(spec["size"], spec["layers"])
    frames = (spec["frames"] - 1) // 4 + 1
    height, width = spec["height"] // 8, spec["width"] // 8
    module = build_step_module(config, spec["gradient_checkpointing"], spec["optimizer"])

    step_ends: list[float] = []

    class StepClock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()  # a benchmark may wait for the GPU every step
            step_ends.append(time.perf_counter())

    if cuda:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = "auto"
        if spec["strategy"] == "deepspeed":
            strategy = DeepSpeedStrategy(stage=2, offload_optimizer=spec["offload_optimizer"])
        precision = "bf16-mixed"
    else:
        strategy, precision = "auto", "32-true"
    steps = spec["warmup"] + spec["steps"]
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=precision,
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[StepClock()],
    )
    latent_channels = config.get("out_channels", 16)
    dataset = FixedLatents((frames, latent_channels, height, width), steps * spec["batch_size"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec["batch_size"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, loader)

    intervals = [b - a for a, b in zip(step_ends[spec["warmup"] - 1 :], step_ends[spec["warmup"] :])]
    seconds = statistics.median(intervals)
    flops = training_flops_per_sample(
        module.transformer.config, count_parameters(module.transformer), frames, height, width,
        gradient_checkpointing=spec["gradient_checkpointing"],
    )
    peak = spec["peak_tflops"] or (dense_bf16_peak_tflops(torch.cuda.get_device_name()) if cuda else None)
    tflops = flops.model * spec["batch_size"] / seconds / 1e12
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "parameters": count_parameters(module.transformer).total,
        "tokens": flops.tokens,
        "seconds_per_step": seconds,
        "samples_per_sec": spec["batch_size"] / seconds,
        "tflops_per_sec": tflops,
        "hardware_tflops_per_sec": flops.hardware * spec["batch_size"] / seconds / 1e12,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    }


def choose_optimizer(args, num_parameters: int) -> tuple[str, str]:
    """(optimizer, note): AdamW when its states fit on the one GPU, else SGD."""
    if args.optimizer != "auto":
        return args.optimizer, ""
    if not torch.cuda.is_available() or args.cpu or args.offload_optimizer:
        return "adamw", ""
    need = BYTES_PER_PARAMETER["adamw"] * num_parameters
    have = torch.cuda.get_device_properties(0).total_memory
    if need <= 0.85 * have:
        return "adamw", ""
    return "sgd", (f"AdamW under ZeRO-2 on one GPU needs ~{need / 1e9:.0f} GB of {have / 1e9:.0f} GB; "
                   f"timed with SGD (~{BYTES_PER_PARAMETER['sgd'] * num_parameters / 1e9:.0f} GB), "
                   "which changes only the optimizer update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--size", choices=["release", "demo", "tiny"], default="release" if cuda else "demo")
    parser.add_argument("--layers", type=int, default=None, help="override num_layers (e.g. a quick GPU check)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default 49, or 9 below release size)")
    parser.add_argument("--resolutions", default=None,
                        help="comma-separated HxW (default 480x720,480x848, or 64x96,64x112 below release size)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--strategy", choices=["deepspeed", "auto"], default="deepspeed",
                        help="on CUDA: DeepSpeedStrategy(stage=2) or Lightning's default (CPU: always auto)")
    parser.add_argument("--optimizer", choices=["auto", "adamw", "sgd"], default="auto")
    parser.add_argument("--offload-optimizer", action="store_true", help="ZeRO-Offload: optimizer state on the CPU")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (needed on a CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args()

    if args.one:
        print(RESULT_PREFIX + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step builds the optimizer and caches)")
    full = args.size == "release"
    frames = args.frames or (49 if full else 9)
    resolutions = args.resolutions or ("480x720,480x848" if full else "64x96,64x112")
    on_cuda = cuda and not args.cpu
    steps = args.steps or (10 if on_cuda else 5)

    from lightning_modules.echovideo_transformer import build_on_meta_device

    meta_transformer = build_on_meta_device(transformer_config(args.size, args.layers))
    num_parameters = sum(p.numel() for p in meta_transformer.parameters())
    optimizer, note = choose_optimizer(args, num_parameters)
    if note:
        print(note)
    rows = []
    for resolution in resolutions.split(","):
        height, width = (int(v) for v in resolution.lower().split("x"))
        spec = dict(size=args.size, layers=args.layers, frames=frames, height=height, width=width,
                    batch_size=args.batch_size, steps=steps, warmup=args.warmup, strategy=args.strategy,
                    optimizer=optimizer, offload_optimizer=args.offload_optimizer, cpu=args.cpu,
                    gradient_checkpointing=not args.no_gradient_checkpointing, peak_tflops=args.peak_tflops,
                    threads=args.threads)
        started = time.perf_counter()
        process = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], cwd=ROOT,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if process.returncode or not lines:
            tail = (process.stdout + process.stderr).strip().splitlines()[-15:]
            reason = "out of memory" if "out of memory" in "\n".join(tail).lower() else f"exit {process.returncode}"
            print(f"{frames}x{height}x{width}: failed ({reason}); last lines:\n  " + "\n  ".join(tail))
            rows.append((spec, None))
            continue
        rows.append((spec, json.loads(lines[-1][len(RESULT_PREFIX):])))
        print(f"{frames}x{height}x{width}: done in {time.perf_counter() - started:.0f} s", flush=True)

    print()
    device = next((r["device"] for _, r in rows if r), "n/a")
    strategy = "DeepSpeed ZeRO-2, bf16-mixed" if on_cuda and args.strategy == "deepspeed" else (
        "bf16-mixed" if on_cuda else "fp32")
    print(f"{args.size} transformer ({num_parameters / 1e9:.3g} B parameters), {device}, {strategy}, "
          f"optimizer {optimizer}{' (offloaded)' if args.offload_optimizer else ''}, "
          f"gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, batch {args.batch_size}, "
          f"median of {steps} steps after {args.warmup} warm-up")
    print()
    print("| video (F x H x W) | tokens | s/step | samples/s | model TFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for spec, result in rows:
        video = f"{frames} x {spec['height']} x {spec['width']}"
        if result is None:
            print(f"| {video} | | failed | | | | |")
            continue
        mfu = f"{100 * result['mfu']:.1f} %" if result["mfu"] is not None else "n/a (no peak)"
        memory = f"{result['peak_memory_gb']:.1f} GB" if result["peak_memory_gb"] is not None else "n/a (CPU)"
        print(f"| {video} | {result['tokens']} | {result['seconds_per_step']:.3g} | "
              f"{result['samples_per_sec']:.3g} | {result['tflops_per_sec']:.3g} | {mfu} | {memory} |")


if __name__ == "__main__":
    main()
