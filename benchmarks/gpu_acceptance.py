"""The kit's GPU figures at the release's size, in one command that fits a lent GPU's lease.

On one GPU, within `--budget-s` seconds of wall time (default 540, i.e. 9 minutes, wheel
install included), in this order of priority:

1. `gpu_tests`: `tests/test_gpu.py`, pass/fail/skip per test.
2. `release_folder`: a random release at the release's sizes (5.6 B transformer,
   CogVideoX-5B VAE, T5 v1.1 XXL, SigLIP base/16) is *written* to `--work` in the public
   layout (`lightning_modules/random_release.py`, built on the GPU, saved in bf16) with the
   tiny face models as `face_encoder/`; every later part *loads* it through the kit's own
   loaders, as a real run loads the release.
3. `training`: `EchoVideoModule` from that folder under a Lightning `Trainer` with
   `experiments/echovideo_5b.yaml`'s strategy, precision, clipping and model settings (DeepSpeed
   ZeRO-2, bf16-mixed, gradient checkpointing, AdamW) on one GPU, batch 1 of 49 x 480 x 848
   feature-store batches (random): seconds per step (median after warm-up), MFU from
   `lightning_modules/flops.py`, peak memory.
4. `preprocessing`: the per-clip encoder work of `echovideo preprocess` (VAE posterior of the
   49 x 480 x 848 clip, face latent, SigLIP, T5-XXL) through `FrozenEncoders` loaded from the
   folder: seconds per clip per encoder, clips/s, hours per 100,000 clips.
5. `sampling`: `EchoVideoGenerator` (the API behind `echovideo generate`) from the folder, the
   release's defaults (bf16, DPM, guidance 6 with dynamic CFG, 49 x 480 x 848, VAE tiling and
   slicing, float16 decode) on a photo through the face pipeline: prepare, seconds per
   denoising step, decode, peak memory; then first-block cache 0.05 and 0.1, fused QKV, and
   fused QKV + regional compile. Each runs `--sampling-steps` steps and the 50-step video is
   extrapolated (setup + 50 x s/step + decode), which the table says.
6. `training_memory_saving`: as 3 with `experiments/overlays/zero2_offload.yaml` (optimizer
   state and step on the CPU, DeepSpeedCPUAdam, compiled by DeepSpeed on first use).

Each part runs in its own process with what is left of the budget as its limit; a part that
cannot start within the budget is skipped and named. After every part the figures are
rewritten (atomically) to `<out>/acceptance.json` and `<out>/acceptance.md`, so a run cut
short still leaves what it measured; each part's log goes to `<out>/log_<part>.txt`.

Packages the GPU image lacks travel as wheels in `.whl/` (`bash benchmarks/gpu_wheels.sh`
fills it); when that folder holds wheels they are installed into `<work>/site` first.

    python3 benchmarks/gpu_acceptance.py --out "$OUT"                       # on the GPU machine
    .venv/bin/python benchmarks/gpu_acceptance.py --dry-run --out /tmp/acc   # CPU, tiny sizes
    .venv/bin/python benchmarks/gpu_acceptance.py --render acceptance.json --into docs/benchmarks.md

`--dry-run` runs every part at tiny sizes on the CPU (fp32, no DeepSpeed, the tiny release),
so the script is tested here and in CI; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules.files import write_text_atomically  # noqa: E402  (standard library only)

RESULT_PREFIX = "ACCEPTANCE-RESULT "
SITE_ENV = "ECHOVIDEO_ACCEPTANCE_SITE"
DEFAULT_BUDGET_S = 540
# Seconds kept back at the end to write the figures.
RESERVE_S = 10
MARKERS = ("<!-- gpu-acceptance:start -->", "<!-- gpu-acceptance:end -->")
EXPERIMENT = ROOT / "experiments" / "echovideo_5b.yaml"
MEMORY_SAVING_OVERLAY = ROOT / "experiments" / "overlays" / "zero2_offload.yaml"


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    # Seconds the part needs at least at the release's size; it is skipped with less left.
    least_s: float
    needs_release: bool = True


PARTS = (
    Part("gpu_tests", "tests/test_gpu.py", 60, needs_release=False),
    Part("release_folder", "random release-size folder, written then loaded", 60, needs_release=False),
    Part("training", "training, experiment's default setting", 120),
    Part("preprocessing", "preprocessing encoders per clip", 45),
    Part("sampling", "sampling (echovideo generate's API)", 90),
    Part("training_memory_saving", "training, ZeRO-2 optimizer offload", 150),
)
PART_NAMES = tuple(part.name for part in PARTS)


@dataclass(frozen=True)
class Sizes:
    """Video size and run lengths of one mode (the release's on a GPU, tiny on a CPU dry run)."""

    frames: int
    height: int
    width: int
    training_warmup: int
    training_steps: int
    sampling_warmup_steps: int
    sampling_steps: int
    preprocess_clips: int


RELEASE_SIZES = Sizes(frames=49, height=480, width=848, training_warmup=2, training_steps=4,
                      sampling_warmup_steps=2, sampling_steps=6, preprocess_clips=3)
DRY_RUN_SIZES = Sizes(frames=9, height=64, width=96, training_warmup=1, training_steps=2,
                      sampling_warmup_steps=1, sampling_steps=2, preprocess_clips=2)
SAMPLING_STEPS_AS_RELEASED = 50
# What compiling the transformer blocks may add to a sampling setting at the release's size.
COMPILE_ALLOWANCE_S = 90
# Sampling settings in the order they run; each is (name, levers). Caches are replaced per
# setting; fused QKV and compilation stay once on (the last two settings).
SAMPLING_SETTINGS = (
    ("release", {}),
    ("first_block_cache_0.05", {"first_block_cache": 0.05}),
    ("first_block_cache_0.1", {"first_block_cache": 0.1}),
    ("fused_qkv", {"fuse_qkv": True}),
    ("fused_qkv_compiled", {"compile_blocks": True}),
)


# --------------------------------------------------------------------------- the parent
def install_wheels(wheels: Path, work: Path) -> tuple[Path, float]:
    """pip-install every wheel of `wheels` into `<work>/site` (no index, no dependencies)."""
    site = work / "site"
    started = time.perf_counter()
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))]
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode:
        raise SystemExit(f"installing the wheels of {wheels} failed (exit {process.returncode}):\n"
                         f"{process.stdout}{process.stderr}")
    return site, time.perf_counter() - started


def environment_facts(args, started_at: str) -> dict:
    import importlib.metadata

    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    facts = {
        "date_utc": started_at,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "packages": {name: version(name) for name in (
            "lightning", "diffusers", "transformers", "deepspeed", "litdata", "insightface", "onnxruntime",
            "peft", "torchvision")},
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
        facts["driver"] = driver.stdout.strip() or None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=20)
        facts["commit"] = commit.stdout.strip() or None
    return facts


def run_part(part: Part, args, work: Path, out: Path, deadline: float) -> dict:
    """Run one part in its own process, limited to what is left before `deadline`."""
    left = deadline - time.time() - RESERVE_S
    log_path = out / f"log_{part.name}.txt"
    least = 1 if args.dry_run else part.least_s
    if left < least:
        return {"status": "skipped", "reason": f"budget: {max(left, 0):.0f} s left, the part needs at least "
                                               f"{least:.0f} s"}
    if part.name == "gpu_tests":
        junit = work / "gpu_tests.xml"
        junit.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-p", "no:cacheprovider", "-q",
                   f"--junitxml={junit}"]
    else:
        spec = {"part": part.name, "work": str(work), "dry_run": args.dry_run,
                "deadline_in_s": left, "sampling_steps": args.sampling_steps}
        command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(shlex.quote(c) for c in command)}\n")
        log.flush()
        # Straight into the log, so that it holds what was printed even if this process is
        # stopped; in its own process group, so that at the budget's end its helpers
        # (compile workers, DeepSpeed's op build) go with it.
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            process.wait(timeout=max(left, 1) if left != float("inf") else None)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            timed_out = True
        returncode = process.returncode
    output = log_path.read_text(encoding="utf-8", errors="replace")
    seconds = time.monotonic() - started
    if part.name == "gpu_tests":
        result = gpu_test_results(work / "gpu_tests.xml")
        result["status"] = "timed out (budget)" if timed_out else ("ok" if returncode == 0 else "failed")
    else:
        lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
        result = json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else {}
        if timed_out:
            result["status"] = "timed out (budget)"
        elif returncode != 0 or not lines:
            result["status"] = "failed"
        else:
            result.setdefault("status", "ok")
    if result["status"] != "ok":
        result["log_tail"] = [line for line in output.strip().splitlines()
                              if not line.startswith(RESULT_PREFIX)][-25:]
    result["seconds"] = round(seconds, 1)
    return result


def gpu_test_results(junit: Path) -> dict:
    """Per test of the JUnit XML: passed, failed (with its message) or skipped (with why)."""
    tests = {}
    if not junit.is_file():
        return {"tests": tests}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, detail = "passed", None
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                detail = (element.get("message") or "").strip()[:300]
                break
        tests[case.get("name")] = {"outcome": outcome, **({"detail": detail} if detail else {})}
    return {"tests": tests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for acceptance.json, acceptance.md and the logs")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder for the release folder and wheels (default: a temporary folder; "
                             "about 25 GB at the release's size)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"wall-time budget, wheel install included (default {DEFAULT_BUDGET_S}; none on --dry-run)")
    parser.add_argument("--parts", default=",".join(PART_NAMES), help=f"comma-separated subset of {PART_NAMES}")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help=f"timed denoising steps per sampling setting (default {RELEASE_SIZES.sampling_steps})")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl",
                        help="wheels to install first, if any (benchmarks/gpu_wheels.sh; not on --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU")
    parser.add_argument("--render", type=Path, help="an acceptance.json to render as markdown (no run)")
    parser.add_argument("--into", type=Path, help="with --render: replace the marked section of this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = parser.parse_args()

    if args.one:
        spec = json.loads(args.one)
        print(RESULT_PREFIX + json.dumps(run_one(spec)), flush=True)
        return
    if args.render:
        render_into(args.render, args.into)
        return
    if args.out is None:
        parser.error("--out is required (or --render)")
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PART_NAMES))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PART_NAMES}")
    if args.sampling_steps is not None and args.sampling_steps < 1:
        parser.error("--sampling-steps must be at least 1")

    # Wall-clock times, so that the budget also counts the wheel install before the re-exec.
    started = float(os.environ.get("ECHOVIDEO_ACCEPTANCE_STARTED", time.time()))
    started_at = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.budget_s is None:
        args.budget_s = float("inf") if args.dry_run else DEFAULT_BUDGET_S
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="echovideo-acceptance-"))
    work.mkdir(parents=True, exist_ok=True)

    install = None
    # The wheels are for the GPU image's Python; a dry run uses the environment it runs in.
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() and not args.dry_run else []
    if wheels and SITE_ENV not in os.environ:
        site, seconds = install_wheels(args.wheels, work)
        env = {**os.environ, SITE_ENV: str(site), "ECHOVIDEO_ACCEPTANCE_INSTALL_S": f"{seconds:.1f}",
               "ECHOVIDEO_ACCEPTANCE_STARTED": repr(started),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
        argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
        if args.work is None:
            argv += ["--work", str(work)]
        os.execve(sys.executable, argv, env)
    if SITE_ENV in os.environ:
        install = {"wheels": len(wheels), "site": os.environ[SITE_ENV],
                   "seconds": float(os.environ.get("ECHOVIDEO_ACCEPTANCE_INSTALL_S", 0))}
        print(f"installed {install['wheels']} wheels from {args.wheels} into {install['site']} "
              f"in {install['seconds']:.1f} s", flush=True)

    report = {"environment": environment_facts(args, started_at), "install": install, "parts": {}}
    if not args.dry_run and report["environment"]["gpu"] is None:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    order = [part for part in PARTS if part.name in parts]
    while order:
        part = order.pop(0)
        folder = report["parts"].get("release_folder")
        if part.needs_release and "release_folder" in parts and (folder or {}).get("status") != "ok":
            result = {"status": "skipped", "reason": "no release folder (see release_folder)"}
        else:
            print(f"[{time.time() - started:5.0f} s] {part.name}: {part.title}", flush=True)
            result = run_part(part, args, work, args.out, deadline)
        report["parts"][part.name] = result
        report["elapsed_s"] = round(time.time() - started, 1)
        write_text_atomically(args.out / "acceptance.json", json.dumps(report, indent=2) + "\n")
        write_text_atomically(args.out / "acceptance.md", render_markdown(report))
        print(f"[{time.time() - started:5.0f} s] {part.name}: {result['status']}", flush=True)
        if part.name == "training" and result["status"] != "ok":
            # The default setting did not run (out of memory, say): the memory-saving one comes next.
            order.sort(key=lambda later: later.name != "training_memory_saving")
    print()
    print(render_markdown(report))


# ------------------------------------------------------------------------- rendering
def _f(value, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}{unit}"


def goal_lines(parts: dict) -> list[str]:
    """The kit's goals beside what was measured: MFU >= 40 %, a 50-step video <= 55 s lossless
    and <= 35 s with the cache."""
    lines = []
    training = parts.get("training", {})
    if training.get("mfu") is not None:
        lines.append(f"- Training MFU {100 * training['mfu']:.1f} % (goal >= 40 %) at "
                     f"{_f(training['seconds_per_step'])} s per step, {_f(training.get('peak_memory_gb'), 3, ' GB')} peak.")
    sampling = parts.get("sampling", {})
    settings = {k: v for k, v in (sampling.get("settings") or {}).items() if not v.get("skipped")}
    if sampling.get("floor_s_50_steps") and settings:
        lossless = {k: v for k, v in settings.items() if not k.startswith("first_block_cache")}
        cached = {k: v for k, v in settings.items() if k.startswith("first_block_cache")}
        best = min(lossless, key=lambda k: lossless[k]["video_s_extrapolated"]) if lossless else None
        if best:
            lines.append(f"- 50-step video, lossless: {_f(lossless[best]['video_s_extrapolated'])} s with {best} "
                         f"(goal <= 55 s); the denoising steps' arithmetic alone takes "
                         f"{_f(sampling['floor_s_50_steps'])} s at the GPU's peak.")
        if cached:
            fastest = min(cached, key=lambda k: cached[k]["video_s_extrapolated"])
            lines.append(f"- 50-step video, cached: {_f(cached[fastest]['video_s_extrapolated'])} s with {fastest} "
                         "(goal <= 35 s; random weights, so the skips are not the real model's).")
    return lines + [""] if lines else []


def render_markdown(report: dict) -> str:
    env = report["environment"]
    parts = report["parts"]
    machine = env["gpu"] or f"CPU ({env['cpu_count']} cores), dry run at tiny sizes"
    lines = [
        f"### {machine}: {env['date_utc']}",
        "",
        f"`{env['command']}`; torch {env['torch']}, CUDA {env['cuda']}, driver {env.get('driver')}, "
        f"Python {env['python']}, commit {env.get('commit')}; "
        + ", ".join(f"{name} {version}" for name, version in env["packages"].items() if version)
        + f". Elapsed {report.get('elapsed_s')} s of a {env['budget_s']} s budget"
        + (f"; wheels installed in {report['install']['seconds']} s" if report.get("install") else "") + ".",
        "",
    ]
    if env["dry_run"]:
        lines += ["Dry run: tiny models, fp32 on the CPU, no DeepSpeed. These figures show that every "
                  "part runs, not how fast a GPU is.", ""]

    lines += goal_lines(parts)
    lines += ["| part | status | seconds |", "|---|---|---|"]
    for name, result in parts.items():
        status = result["status"] + (f" ({result['reason']})" if result.get("reason") else "")
        lines.append(f"| {name} | {status} | {result.get('seconds', '')} |")
    lines.append("")

    tests = parts.get("gpu_tests", {}).get("tests")
    if tests:
        lines += ["| tests/test_gpu.py | outcome |", "|---|---|"]
        lines += [f"| {name} | {t['outcome']}{(': ' + t['detail']) if t.get('detail') else ''} |"
                  for name, t in tests.items()]
        lines.append("")

    folder = parts.get("release_folder", {})
    if folder.get("status") == "ok":
        lines += [f"Release folder: {folder['parameters_b']} B parameters in all, {folder['gigabytes']} GB "
                  f"written in {folder['write_s']} s ({folder['how']}).", ""]

    training = [(name, parts[name]) for name in ("training", "training_memory_saving") if name in parts]
    if any(result.get("seconds_per_step") for _, result in training):
        lines += ["| training (batch 1) | video | strategy, optimizer | s/step | samples/s | model TFLOP/s "
                  "| MFU | peak GPU memory | steps |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in training:
            if not r.get("seconds_per_step"):
                continue
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
            lines.append(f"| {name} | {r['video']} | {r['strategy']}, {r['optimizer']} | {_f(r['seconds_per_step'])} "
                         f"| {_f(r['samples_per_s'])} | {_f(r['model_tflops_per_s'])} | {mfu} "
                         f"| {_f(r.get('peak_memory_gb'), 3, ' GB')} | median of {r['timed_steps']} after "
                         f"{r['warmup_steps']} |")
        lines.append("")

    pre = parts.get("preprocessing", {})
    if pre.get("seconds_per_clip"):
        per = pre["seconds_per_encoder"]
        lines += ["| preprocessing (per clip) | VAE posterior | face latent | SigLIP | T5 | total | clips/s "
                  "| hours per 100,000 clips |", "|---|---|---|---|---|---|---|---|",
                  f"| {pre['video']}, {pre['dtype']} | {_f(per['vae_posterior'])} s | {_f(per['face_latent'])} s "
                  f"| {_f(per['siglip'])} s | {_f(per['t5'])} s | {_f(pre['seconds_per_clip'])} s "
                  f"| {_f(pre['clips_per_s'])} | {_f(pre['hours_per_100k_clips'])} |", ""]
        measures = pre.get("quality_measures_s")
        if measures:
            lines += [f"Quality measures per clip (CPU video measures; face measures with the tiny face models): "
                      f"video {_f(measures['video_measures'])} s, face {_f(measures['face_measures'])} s, "
                      f"{100 * pre['quality_measures_over_encoders']:.1f} % of the encoders' time per clip.", ""]

    sampling = parts.get("sampling", {})
    settings = sampling.get("settings") or {}
    if settings:
        lines += [f"Sampling {sampling['video']}, {sampling['dtype']}, guidance 6 with dynamic CFG (both branches in "
                  f"one batch); each setting times {sampling['timed_steps']} steps and extrapolates the "
                  f"{SAMPLING_STEPS_AS_RELEASED}-step video as setup + {SAMPLING_STEPS_AS_RELEASED} x s/step + "
                  f"decode (decode {_f(sampling.get('decode_s'))} s, measured with the release setting; "
                  f"prepare {_f(sampling.get('prepare_s'))} s: face pipeline, T5, SigLIP). Random weights: the "
                  "cache's skips are not the real model's.", "",
                  f"| setting | warm-up ({sampling['warmup_steps']} steps) | s/step | model TFLOP/s | "
                  f"{SAMPLING_STEPS_AS_RELEASED}-step video (extrapolated) | peak GPU memory |",
                  "|---|---|---|---|---|---|"]
        for name, s in settings.items():
            if s.get("skipped"):
                lines.append(f"| {name} | skipped: {s['skipped']} | | | | |")
                continue
            lines.append(f"| {name} | {_f(s['warmup_s'])} s | {_f(s['seconds_per_step'])} "
                         f"| {_f(s.get('model_tflops_per_s'))} | {_f(s['video_s_extrapolated'])} s "
                         f"| {_f(s.get('peak_memory_gb'), 3, ' GB')} |")
        lines.append("")
    return "\n".join(lines)


def render_into(report_path: Path, target: Path | None) -> None:
    markdown = render_markdown(json.loads(report_path.read_text()))
    if target is None:
        print(markdown)
        return
    text = target.read_text(encoding="utf-8")
    start, end = MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"{target}: lacks the markers {start} ... {end} around the GPU section; add them "
                         "where the figures belong")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text_atomically(target, f"{head}{start}\n{markdown}\n{end}{tail}")
    print(f"{target}: GPU section replaced with {report_path}'s figures")


# --------------------------------------------------------------------- one part, here
def run_one(spec: dict) -> dict:
    import torch

    dry = spec["dry_run"]
    sizes = DRY_RUN_SIZES if dry else RELEASE_SIZES
    if spec.get("sampling_steps"):
        sizes = replace(sizes, sampling_steps=spec["sampling_steps"])
    context = PartContext(
        work=Path(spec["work"]), dry_run=dry, sizes=sizes,
        device=torch.device("cpu" if dry else "cuda"),
        deadline=time.monotonic() + spec["deadline_in_s"],
    )
    if dry:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    runners = {"release_folder": part_release_folder, "training": part_training,
               "training_memory_saving": part_training, "preprocessing": part_preprocessing,
               "sampling": part_sampling}
    return runners[spec["part"]](context, spec["part"])


@dataclass
class PartContext:
    work: Path
    dry_run: bool
    sizes: Sizes
    device: "torch.device"
    deadline: float  # time.monotonic() by which the part must have finished

    @property
    def release(self) -> Path:
        return self.work / "release"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def synchronize(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float | None:
        import torch

        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2)


def part_release_folder(context: PartContext, name: str) -> dict:
    """Write the random release (release sizes on the GPU, tiny on a dry run) and the tiny face models."""
    import torch

    from lightning_modules.random_release import RELEASE_SIZE, write_random_release
    from lightning_modules.tiny import tiny_release_configs
    from lightning_modules.tiny_face_models import write_tiny_face_models

    started = time.perf_counter()
    if context.dry_run:
        write_random_release(context.release, tiny_release_configs(), overwrite=True)
        how = "tiny configs, built on the CPU, float32"
    else:
        write_random_release(context.release, RELEASE_SIZE, overwrite=True, device=context.device,
                             save_dtype=torch.bfloat16)
        how = "release configs, built on the GPU with each library's initialisation, saved in bf16"
    write_tiny_face_models(context.release / "face_encoder")
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in context.release.rglob("*") if f.is_file())
    from safetensors import safe_open

    parameters = 0
    for file in context.release.rglob("*.safetensors"):
        with safe_open(file, framework="pt") as weights:
            parameters += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return {"how": how, "write_s": round(seconds, 1), "gigabytes": round(size / 1e9, 2),
            "parameters_b": round(parameters / 1e9, 3), "folder": str(context.release)}


def experiment_settings(overlay: Path | None) -> dict:
    """`experiments/echovideo_5b.yaml`, with `overlay` merged over it as LightningCLI merges
    configs (mappings key by key; a `class_path` + `init_args` replaces the whole object)."""
    import yaml

    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict) and "class_path" not in over:
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    settings = yaml.safe_load(EXPERIMENT.read_text())
    if overlay is not None:
        settings = merge(settings, yaml.safe_load(overlay.read_text()))
    return settings


def feature_batch(transformer_config, latent_grid: tuple[int, int, int], batch_size: int = 1) -> dict:
    """A feature-store batch (datamodules/batch.py keys) of random values at the model's sizes."""
    import torch

    from datamodules import batch as keys

    frames, height, width = latent_grid
    channels = transformer_config.out_channels
    g = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=g)

    return {
        keys.LATENT_MEAN: draw(batch_size, frames, channels, height, width),
        keys.LATENT_STD: draw(batch_size, frames, channels, height, width).abs() * 0.1,
        keys.FACE_LATENT: draw(batch_size, 1, channels, height, width),
        keys.SIGLIP_TOKENS: draw(batch_size, transformer_config.face_seq_length, transformer_config.face_embed_dim),
        keys.ARCFACE: draw(batch_size, transformer_config.face_features_embed_dim),
        keys.TEXT_EMBEDS: draw(batch_size, transformer_config.max_text_seq_length, transformer_config.text_embed_dim),
    }


def part_training(context: PartContext, name: str) -> dict:
    """EchoVideoModule + Trainer on feature-store batches, as the experiment configures them."""
    import lightning.pytorch as pl
    import torch

    from callbacks.training_throughput import dense_bf16_peak_tflops
    from datamodules import batch as keys
    from lightning_modules.echovideo_module import EchoVideoModule
    from lightning_modules.flops import count_parameters, training_flops_per_sample
    from lightning_modules.identity_encoder import InsightFaceArcFace
    from lightning_modules.release_layout import check_release_folder
    from lightning_modules.tiny import RepeatedBatches
    from lightning_modules.training_levers import optimizer_class

    memory_saving = name == "training_memory_saving"
    settings = experiment_settings(MEMORY_SAVING_OVERLAY if memory_saving else None)
    trainer_settings = settings["trainer"]
    model_settings = dict(settings["model"]["init_args"])
    for key in ("pretrained_path", "identity_encoder", "sampling"):
        model_settings.pop(key, None)
    sizes = context.sizes
    check_release_folder(context.release)

    module = EchoVideoModule(
        pretrained_path=str(context.release),
        # Never called: the batches carry ArcFace embeddings. Named because a release-size
        # transformer refuses the random stand-in.
        identity_encoder=InsightFaceArcFace(model_root=str(context.release / "face_encoder")),
        **model_settings,
    )
    steps = sizes.training_warmup + sizes.training_steps
    step_ends: list[float] = []

    class StepClock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            context.synchronize()
            step_ends.append(time.perf_counter())

    class FeatureBatches(pl.LightningDataModule):
        """One random feature-store batch, repeated; T5 of "" and SigLIP of black come with it,
        as a feature store provides them, so condition dropout loads no encoder."""

        def __init__(self):
            super().__init__()
            self._batch = None

        def batch(self):
            # Built on first use: after `configure_model` has loaded the transformer.
            if self._batch is None:
                grid = module.encoders.latent_grid(sizes.frames, sizes.height, sizes.width)
                self._batch = feature_batch(module.transformer.config, grid)
            return self._batch

        def train_dataloader(self):
            return torch.utils.data.DataLoader(RepeatedBatches(self.batch(), steps), batch_size=None)

        def unconditional_features(self):
            return {key: self.batch()[key][:1] for key in (keys.TEXT_EMBEDS, keys.SIGLIP_TOKENS)}

    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy_args = trainer_settings["strategy"]["init_args"]
    strategy = DeepSpeedStrategy(**strategy_args)  # built on a dry run too: checks the experiment's settings
    precision = trainer_settings["precision"]
    strategy_name = (f"DeepSpeed ZeRO-{strategy_args['stage']}"
                     f"{' optimizer offload' if strategy_args.get('offload_optimizer') else ''}, {precision}")
    if context.dry_run:  # DeepSpeed needs a GPU; the CPU runs the same module and loop in fp32
        strategy, precision, strategy_name = "auto", "32-true", f"single CPU (dry run of {strategy_name}), fp32"
    trainer = pl.Trainer(
        accelerator=context.device.type if context.device.type == "cpu" else "gpu", devices=1,
        strategy=strategy, precision=precision, max_steps=steps,
        gradient_clip_val=trainer_settings.get("gradient_clip_val"), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[StepClock()],
        default_root_dir=str(context.work / "trainer"),
    )
    context.reset_peak_memory()
    started = time.perf_counter()
    trainer.fit(module, datamodule=FeatureBatches())
    fit_s = time.perf_counter() - started
    loss = trainer.callback_metrics.get("train/loss")

    intervals = [b - a for a, b in zip(step_ends[sizes.training_warmup - 1:], step_ends[sizes.training_warmup:])]
    seconds = statistics.median(intervals)
    grid = module.encoders.latent_grid(sizes.frames, sizes.height, sizes.width)
    flops = training_flops_per_sample(module.transformer.config, count_parameters(module.transformer), *grid,
                                      gradient_checkpointing=bool(model_settings.get("gradient_checkpointing")))
    peak = dense_bf16_peak_tflops(torch.cuda.get_device_name(context.device)) if context.device.type == "cuda" \
        else None
    tflops = flops.model / seconds / 1e12
    optimizer = optimizer_class(model_settings.get("optimizer", "adamw"), trainer.strategy).__name__
    return {
        "video": f"{sizes.frames} x {sizes.height} x {sizes.width}",
        "tokens": flops.tokens,
        "strategy": strategy_name,
        "optimizer": optimizer,
        "gradient_checkpointing": bool(model_settings.get("gradient_checkpointing")),
        "parameters": count_parameters(module.transformer).total,
        "warmup_steps": sizes.training_warmup,
        "timed_steps": len(intervals),
        "seconds_per_step": seconds,
        "step_seconds": [round(v, 4) for v in intervals],
        "samples_per_s": 1 / seconds,
        "model_tflops_per_s": tflops,
        "hardware_tflops_per_s": flops.hardware / seconds / 1e12,
        "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gb": context.peak_memory_gb(),
        "fit_s": round(fit_s, 1),
        "final_loss": float(loss) if loss is not None else None,
        "loss_finite": bool(loss is not None and torch.isfinite(loss)),
    }


def part_preprocessing(context: PartContext, name: str) -> dict:
    """The encoder calls `datamodules.preprocess.EncodeSample` makes per clip, timed one by one."""
    import torch

    from lightning_modules.echovideo_module import DTYPES
    from lightning_modules.frozen_encoders import FrozenEncoders

    settings = experiment_settings(None)
    dtype_name = "float32" if context.dry_run else settings["model"]["init_args"]["encoder_dtype"]
    sizes = context.sizes
    max_text = json.loads((context.release / "transformer" / "config.json").read_text()).get("max_text_seq_length", 226)
    load_started = time.perf_counter()
    encoders = FrozenEncoders.from_release_folder(context.release, identity_encoder=None,
                                                  max_text_seq_length=max_text, dtype=DTYPES[dtype_name])
    encoders.place(context.device)
    for part in ("vae", "text_encoder", "tokenizer", "siglip", "siglip_processor"):
        getattr(encoders, part)  # load now, so the timings below are the work alone
    load_s = time.perf_counter() - load_started
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, sizes.frames, sizes.height, sizes.width, generator=g) * 2 - 1
    face = torch.rand(1, 3, 512, 512, generator=g)
    caption = "a young woman with red hair smiles and walks slowly in the park " * 4
    work = {
        "vae_posterior": lambda: encoders.encode_video_posterior(video),
        "face_latent": lambda: encoders.encode_face_latent(face, sizes.height, sizes.width),
        "siglip": lambda: encoders.encode_siglip(face),
        "t5": lambda: encoders.encode_text([caption]),
    }
    timings = {key: [] for key in work}
    context.reset_peak_memory()
    for clip in range(sizes.preprocess_clips + 1):  # the first clip warms up
        for key, call in work.items():
            context.synchronize()
            started = time.perf_counter()
            call()
            context.synchronize()
            if clip:
                timings[key].append(time.perf_counter() - started)
    per = {key: statistics.median(values) for key, values in timings.items()}
    total = sum(per.values())
    measures_s = _quality_measures_seconds(context, sizes.preprocess_clips)
    return {
        "video": f"{sizes.frames} x {sizes.height} x {sizes.width}",
        "dtype": dtype_name,
        "clips": sizes.preprocess_clips,
        "load_s": round(load_s, 1),
        "seconds_per_encoder": per,
        "seconds_per_clip": total,
        "clips_per_s": 1 / total,
        "hours_per_100k_clips": 100_000 * total / 3600,
        "quality_measures_s": measures_s,
        "quality_measures_over_encoders": sum(measures_s.values()) / total,
        "peak_memory_gb": context.peak_memory_gb(),
        "not_included": "video decoding and the face pipeline (CPU work in the loader's workers)",
    }


def _quality_measures_seconds(context: PartContext, clips: int) -> dict:
    """Seconds per clip of the quality measures (datamodules/quality.py) at the part's size, as a
    preprocess worker makes them: the video ones on the CPU, the face ones through the release
    folder's face models (the tiny ones: the detector's resizing and onnxruntime's calls on this
    machine, not the real networks' compute) on the device. Median over `clips` after a warm-up."""
    import numpy as np

    from benchmarks.preprocess_throughput import smooth_clip
    from datamodules.face_pipeline import FaceExtractor
    from datamodules.quality import face_measures, video_measures

    sizes = context.sizes
    frames = smooth_clip(np.random.default_rng(0), sizes.frames, sizes.height, sizes.width, face=True)
    extractor = FaceExtractor(context.release / "face_encoder", device=str(context.device))
    reference = np.ones(512, dtype=np.float32)
    work = {"video_measures": lambda: video_measures(frames),
            "face_measures": lambda: face_measures(frames, reference, extractor)}
    timings = {key: [] for key in work}
    for clip in range(clips + 1):  # the first clip warms up (and loads the face models)
        for key, call in work.items():
            started = time.perf_counter()
            call()
            if clip:
                timings[key].append(time.perf_counter() - started)
    return {key: statistics.median(values) for key, values in timings.items()}


def part_sampling(context: PartContext, name: str) -> dict:
    """`EchoVideoGenerator` from the folder at the release's defaults, then each speed lever."""
    import torch

    from lightning_modules.generation import RELEASE_SCHEDULER, EchoVideoGenerator, GenerationRequest
    from lightning_modules.sampling import SamplingConfig
    from lightning_modules.tiny_face_models import write_tiny_face_photo

    sizes = context.sizes
    dtype = "float32" if context.dry_run else "bfloat16"
    sampling = SamplingConfig(num_inference_steps=sizes.sampling_steps, num_frames=sizes.frames,
                              height=sizes.height, width=sizes.width, scheduler=RELEASE_SCHEDULER,
                              show_progress=False)
    load_started = time.perf_counter()
    # VAE tiling on, as released (tiles that join exactly at every size, tiny VAE included).
    generator = EchoVideoGenerator.from_folder(context.release, dtype=dtype, device=str(context.device),
                                               sampling=sampling)
    load_s = time.perf_counter() - load_started
    photo = write_tiny_face_photo(context.work / "person.png")
    request = GenerationRequest(prompt="a young woman smiles and turns her face to the camera", face_image=str(photo))
    started = time.perf_counter()
    prepared = generator.prepare(request)
    context.synchronize()
    prepare_s = time.perf_counter() - started

    calls: list[float] = []

    def on_call(module, args, kwargs):
        context.synchronize()  # the step before (or the setup) has finished on the device
        calls.append(time.perf_counter())

    generator.transformer.register_forward_pre_hook(on_call, with_kwargs=True)
    warmup = replace(generator.settings_for(request), num_inference_steps=sizes.sampling_warmup_steps)
    timed = generator.settings_for(request)

    # One denoising step is one forward pass of both CFG branches: a third of a training
    # sample's model FLOPs, twice. Over the GPU's peak that is the floor of a step.
    from callbacks.training_throughput import dense_bf16_peak_tflops
    from lightning_modules.flops import count_parameters, training_flops_per_sample

    grid = generator.encoders.latent_grid(sizes.frames, sizes.height, sizes.width)
    step_flops = 2 * training_flops_per_sample(generator.transformer.config,
                                               count_parameters(generator.transformer), *grid).model / 3
    peak = dense_bf16_peak_tflops(torch.cuda.get_device_name(context.device)) if context.device.type == "cuda" \
        else None
    result = {"video": f"{sizes.frames} x {sizes.height} x {sizes.width}", "dtype": dtype,
              "step_flops": step_flops, "peak_tflops": peak,
              "floor_s_50_steps": SAMPLING_STEPS_AS_RELEASED * step_flops / (peak * 1e12) if peak else None,
              "load_s": round(load_s, 1), "prepare_s": prepare_s, "warmup_steps": sizes.sampling_warmup_steps,
              "timed_steps": sizes.sampling_steps, "settings": {}}
    decode_s = None
    previous_s = None
    for setting, levers in SAMPLING_SETTINGS:
        # A setting costs about what the one before it took; compiling adds a minute or two.
        need = 1.2 * previous_s if previous_s else 0
        if setting == "fused_qkv_compiled" and not context.dry_run:
            need += COMPILE_ALLOWANCE_S
        if context.left() < need:
            result["settings"][setting] = {"skipped": f"budget ({context.left():.0f} s left)"}
            continue
        setting_started = time.perf_counter()
        generator.use_speed_levers(fuse_qkv=levers.get("fuse_qkv", False),
                                   first_block_cache=levers.get("first_block_cache"),
                                   compile_blocks=levers.get("compile_blocks", False))
        context.reset_peak_memory()
        context.synchronize()
        started = time.perf_counter()
        generator.sample(prepared, request.seed, warmup)
        context.synchronize()
        warmup_s = time.perf_counter() - started

        calls.clear()
        context.synchronize()
        started = time.perf_counter()
        latents = generator.sample(prepared, request.seed, timed)
        context.synchronize()
        ended = time.perf_counter()
        if not calls:
            raise RuntimeError("the transformer was never called while sampling")
        loop_s = ended - calls[0]
        setup_s = calls[0] - started
        per_step = loop_s / sizes.sampling_steps
        if decode_s is None:
            started = time.perf_counter()
            frames = generator.decode(latents)
            context.synchronize()
            decode_s = time.perf_counter() - started
            result["decoded_frames"] = list(frames.shape)
        result["settings"][setting] = {
            "warmup_s": warmup_s, "setup_s": setup_s, "seconds_per_step": per_step,
            "video_s_extrapolated": setup_s + SAMPLING_STEPS_AS_RELEASED * per_step + decode_s,
            "model_tflops_per_s": step_flops / per_step / 1e12,
            "peak_memory_gb": context.peak_memory_gb(),
            "step_seconds": [round(b - a, 4) for a, b in zip(calls, calls[1:] + [ended])],
            "finite": bool(torch.isfinite(latents).all()),
        }
        previous_s = time.perf_counter() - setting_started
        # Print what is measured so far: if the budget ends this process, the parent keeps it.
        result["decode_s"] = decode_s
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    result["decode_s"] = decode_s
    return result


if __name__ == "__main__":
    main()
