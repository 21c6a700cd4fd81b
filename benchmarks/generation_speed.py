"""Seconds per generated video: the release's loop against this kit's fastest lossless setting.

The transformer and the VAE are built from their configs with random weights (no
checkpoint); conditions are random tensors of the real shapes (T5 226 x 4096, SigLIP
196 x 768, ArcFace 512), so what is timed is exactly the sampler's work:
`sampling.denoise` (DPM scheduler, dynamic CFG, both CFG branches in one batched forward)
plus the VAE decode. Settings, each a fresh model, all in one process:

- `release`: what the release's pipeline does: bf16, eager, CFG batched, VAE decode in
  float16 with tiling and slicing.
- `fused_qkv`: + one fused QKV projection per attention (diffusers; lossless).
- `compiled`: + `torch.compile` of each transformer block (regional; lossless up to
  kernel rounding). The first video pays the compilation; it is reported apart.
- `first_block_cache`: `compiled` + diffusers' first-block cache at `--cache-threshold`
  (lossy: with random weights the skipped steps are not those of the real model, so
  its speed-up here is only indicative; measure real speed and FaceSim-Arc with real
  weights, `echovideo generate --first_block_cache T` and `echovideo evaluate`).

On CUDA (default `--size release`): the release's sizes, 49 frames at 480x848, 50 steps.
On a CPU (default `--size tiny`): the tiny model, float32, 9 frames at 64x96, to show the
script works; `--settings release,fused_qkv` skips the compile there.

    .venv/bin/python benchmarks/generation_speed.py                       # CPU: tiny
    .venv/bin/python benchmarks/generation_speed.py --size release        # one GPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

SETTINGS = ("release", "fused_qkv", "compiled", "first_block_cache")


def build_parts(size: str, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler

    from lightning_modules.echovideo_transformer import EchoVideoTransformer3DModel
    from lightning_modules.random_release import RELEASE_SIZE
    from lightning_modules.tiny import TINY_SCHEDULER_CONFIG, TINY_VAE_CONFIG, tiny_transformer_config

    torch.manual_seed(0)
    if size == "release":
        transformer = EchoVideoTransformer3DModel(**RELEASE_SIZE.transformer)
        vae = AutoencoderKLCogVideoX(**RELEASE_SIZE.vae)
    else:
        transformer = EchoVideoTransformer3DModel(**tiny_transformer_config())
        vae = AutoencoderKLCogVideoX(**TINY_VAE_CONFIG)
    scheduler = CogVideoXDPMScheduler.from_config(TINY_SCHEDULER_CONFIG)  # the 5B schedule's settings
    return transformer.to(device, dtype).eval(), vae.to(device).eval(), scheduler


def random_conditions(transformer, device):
    from lightning_modules.sampling import Conditions

    config = transformer.config
    g = torch.Generator().manual_seed(1)

    def draw(*shape):
        return torch.randn(*shape, generator=g).to(device)

    cond = Conditions(draw(1, config.max_text_seq_length, config.text_embed_dim),
                      draw(1, config.face_seq_length, config.face_embed_dim), draw(1, config.face_features_embed_dim))
    uncond = Conditions(draw(1, config.max_text_seq_length, config.text_embed_dim),
                        draw(1, config.face_seq_length, config.face_embed_dim),
                        torch.zeros(1, config.face_features_embed_dim, device=device))
    return cond, uncond


def one_video(transformer, vae, scheduler, cond, uncond, args, device, decode_dtype) -> tuple[float, float]:
    """(seconds for the denoising loop, seconds for the decode) of one video."""
    from lightning_modules.sampling import denoise, initial_noise

    f, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    generator = torch.Generator().manual_seed(0)
    latents = initial_noise((1, f, 16, h, w), scheduler, generator, transformer.dtype, device)
    face_latent = torch.randn((1, 1, 16, h, w), generator=generator).to(device)
    synchronize(device)
    start = time.perf_counter()
    latents = denoise(transformer, scheduler, latents, face_latent, cond, uncond, args.steps, 6.0, True, generator)
    synchronize(device)
    loop = time.perf_counter() - start
    with torch.no_grad():
        vae.decode(1 / 0.7 * latents.permute(0, 2, 1, 3, 4).to(decode_dtype)).sample
    synchronize(device)
    return loop, time.perf_counter() - start - loop


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("release", "tiny"), default="release" if cuda else "tiny")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--videos", type=int, default=2, help="timed videos per setting (after one warm-up)")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--cache-threshold", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # the notes about casting random models with .to()
    if args.threads:
        torch.set_num_threads(args.threads)
    release = args.size == "release"
    args.frames = args.frames or (49 if release else 9)
    args.height = args.height or (480 if release else 64)
    args.width = args.width or (848 if release else 96)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    decode_dtype = torch.float16 if cuda else torch.float32
    settings = [s for s in args.settings.split(",") if s]
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        parser.error(f"--settings: unknown {sorted(unknown)}; choose from {SETTINGS}")

    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.size} model, {args.frames} frames at {args.height}x{args.width}, {args.steps} steps, CFG "
          f"batched, {dtype}, on {device_name}; median of {args.videos} videos after one warm-up\n")
    print("| setting | first video (s) | loop (s/video) | decode (s) | total (s/video) | s/step | peak GPU GB |")
    print("|---|---|---|---|---|---|---|")
    baseline = None
    for setting in settings:
        transformer, vae, scheduler = build_parts(args.size, device, dtype)
        vae.to(decode_dtype)
        if release:
            vae.enable_tiling()
            vae.enable_slicing()
        if setting in ("fused_qkv", "compiled"):
            transformer.fuse_qkv_projections()
        if setting in ("compiled", "first_block_cache"):
            for block in transformer.transformer_blocks:
                block.compile()
        if setting == "first_block_cache":
            from diffusers import FirstBlockCacheConfig

            transformer.enable_cache(FirstBlockCacheConfig(threshold=args.cache_threshold))
        cond, uncond = random_conditions(transformer, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        first = sum(one_video(transformer, vae, scheduler, cond, uncond, args, device, decode_dtype))
        timed = [one_video(transformer, vae, scheduler, cond, uncond, args, device, decode_dtype)
                 for _ in range(args.videos)]
        loop = statistics.median(t[0] for t in timed)
        decode = statistics.median(t[1] for t in timed)
        total = loop + decode
        baseline = baseline or total
        peak = f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f}" if cuda else "-"
        print(f"| {setting} | {first:.2f} | {loop:.2f} | {decode:.2f} | {total:.2f} ({baseline / total:.2f}x) "
              f"| {loop / args.steps:.3f} | {peak} |", flush=True)
        del transformer, vae
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
