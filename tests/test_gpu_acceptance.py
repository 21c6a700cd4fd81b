"""benchmarks/gpu_acceptance.py: its dry run (every part at tiny sizes on the CPU, each in its
own process, as on a GPU), its budget, and the markdown it writes into docs/benchmarks.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
PARTS = ("gpu_tests", "release_folder", "training", "preprocessing", "sampling", "training_memory_saving")


def run_script(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("acceptance"), tmp_path_factory.mktemp("acceptance-work")
    process = run_script("--dry-run", "--out", out, "--work", work)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return out, json.loads((out / "acceptance.json").read_text()), process.stdout


@pytest.mark.slow
def test_dry_run_of_the_release_folder_and_training(tmp_path_factory):
    """The first two parts alone (40 s here; the whole dry run, 130 s, is below): the release
    folder written then loaded, and a ZeRO-2 training step timed from it."""
    out, work = tmp_path_factory.mktemp("acceptance"), tmp_path_factory.mktemp("acceptance-work")
    process = run_script("--dry-run", "--parts", "release_folder,training", "--out", out, "--work", work)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    parts = json.loads((out / "acceptance.json").read_text())["parts"]
    assert [(name, part["status"]) for name, part in parts.items()] == [("release_folder", "ok"), ("training", "ok")]
    assert parts["training"]["loss_finite"] and parts["training"]["timed_steps"] == 2
    assert "ZeRO-2" in parts["training"]["strategy"]


@pytest.mark.slow
def test_dry_run_runs_every_part(dry_run):
    out, report, stdout = dry_run
    parts = report["parts"]
    assert list(parts) == list(PARTS)
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(PARTS, "ok")
    # No CUDA here: the GPU tests are collected and each is reported as skipped, by name.
    tests = parts["gpu_tests"]["tests"]
    assert set(tests) == {"test_bf16_mixed_fit_on_gpu", "test_deepspeed_zero2_fit_and_resume",
                          "test_bf16_generation_on_gpu_reproduces_its_seed_and_follows_the_cpu_video"}
    assert {t["outcome"] for t in tests.values()} == {"skipped"}
    assert report["environment"]["dry_run"] and report["environment"]["gpu"] is None
    for name in PARTS:
        assert (out / f"log_{name}.txt").stat().st_size > 0


@pytest.mark.slow
def test_dry_run_figures_come_from_the_real_parts(dry_run):
    _, report, _ = dry_run
    parts = report["parts"]
    folder = parts["release_folder"]
    assert folder["parameters_b"] > 0.001 and folder["gigabytes"] > 0.01

    for name in ("training", "training_memory_saving"):
        training = parts[name]
        assert training["loss_finite"] and training["timed_steps"] == 2
        assert training["seconds_per_step"] > 0 and training["mfu"] is None  # no peak known for a CPU
        assert training["tokens"] == 16 + 3 * 4 * 6  # tiny text tokens + 3 x (64/8/2) x (96/8/2) patches
    assert "ZeRO-2" in parts["training"]["strategy"]
    assert "offload" in parts["training_memory_saving"]["strategy"]
    assert parts["training_memory_saving"]["optimizer"] == parts["training"]["optimizer"] == "AdamW"

    preprocessing = parts["preprocessing"]
    assert set(preprocessing["seconds_per_encoder"]) == {"vae_posterior", "face_latent", "siglip", "t5"}
    assert preprocessing["hours_per_100k_clips"] == pytest.approx(
        100_000 * preprocessing["seconds_per_clip"] / 3600)

    sampling = parts["sampling"]
    assert sampling["decoded_frames"] == [9, 64, 96, 3]
    assert list(sampling["settings"]) == ["release", "first_block_cache_0.05", "first_block_cache_0.1",
                                          "fused_qkv", "fused_qkv_compiled"]
    for setting in sampling["settings"].values():
        assert setting["finite"] and setting["seconds_per_step"] > 0
        assert setting["video_s_extrapolated"] == pytest.approx(
            setting["setup_s"] + 50 * setting["seconds_per_step"] + sampling["decode_s"])


@pytest.mark.slow
def test_markdown_tables_and_render_into_the_benchmarks_page(dry_run, tmp_path):
    out, report, stdout = dry_run
    markdown = (out / "acceptance.md").read_text()
    assert markdown.strip() in stdout  # printed last, as written
    for heading in ("| part | status | seconds |", "| tests/test_gpu.py | outcome |", "| training (batch 1) |",
                    "| preprocessing (per clip) |", "| setting | warm-up"):
        assert heading in markdown
    assert report["environment"]["command"] in markdown

    page = tmp_path / "benchmarks.md"
    page.write_text("# Figures\n\n<!-- gpu-acceptance:start -->\nold figures\n<!-- gpu-acceptance:end -->\n\nCPU rows\n")
    process = run_script("--render", out / "acceptance.json", "--into", page, timeout=120)
    assert process.returncode == 0, process.stderr
    text = page.read_text()
    assert "old figures" not in text and markdown.strip() in text and text.endswith("\n\nCPU rows\n")

    page.write_text("# Figures without markers\n")
    process = run_script("--render", out / "acceptance.json", "--into", page, timeout=120)
    assert process.returncode != 0 and "gpu-acceptance:start" in process.stderr
    assert page.read_text() == "# Figures without markers\n"  # left as it was


def test_parts_past_the_budget_are_skipped_by_name(tmp_path):
    process = run_script("--dry-run", "--budget-s", "1", "--parts", "release_folder,training", "--out", tmp_path,
                         timeout=300)
    assert process.returncode == 0, process.stderr
    parts = json.loads((tmp_path / "acceptance.json").read_text())["parts"]
    assert parts["release_folder"]["status"] == "skipped" and "budget" in parts["release_folder"]["reason"]
    assert parts["training"] == {"status": "skipped", "reason": "no release folder (see release_folder)"}


def test_unknown_part_is_refused():
    process = run_script("--dry-run", "--parts", "training,warp_drive", "--out", "/tmp/unused", timeout=120)
    assert process.returncode == 2 and "warp_drive" in process.stderr


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_report_sets_each_figure_beside_its_goal():
    """The markdown of a GPU run (figures as the parts write them) compares MFU with 40 %, the
    lossless video with 55 s and the cached one with 35 s."""
    script = load_script()
    setting = dict(warmup_s=3.0, setup_s=0.5, seconds_per_step=1.5, model_tflops_per_s=566.0,
                   video_s_extrapolated=0.5 + 50 * 1.5 + 20.0, peak_memory_gb=60.0)
    report = {
        "environment": {"gpu": "NVIDIA H200", "date_utc": "2026-12-02 01:00 UTC", "command": "python3 x.py",
                        "torch": "2.11.0", "cuda": "13.0", "python": "3.12.3", "packages": {}, "dry_run": False,
                        "budget_s": 540, "cpu_count": 16},
        "elapsed_s": 500.0,
        "parts": {
            "training": {"status": "ok", "seconds": 120.0, "seconds_per_step": 3.5, "mfu": 0.368,
                         "peak_memory_gb": 120.0, "video": "49 x 480 x 848", "strategy": "DeepSpeed ZeRO-2, bf16-mixed",
                         "optimizer": "AdamW", "samples_per_s": 1 / 3.5, "model_tflops_per_s": 364.0,
                         "timed_steps": 4, "warmup_steps": 2},
            "sampling": {"status": "ok", "seconds": 200.0, "video": "49 x 480 x 848", "dtype": "bfloat16",
                         "timed_steps": 6, "warmup_steps": 2, "decode_s": 20.0, "prepare_s": 2.0,
                         "floor_s_50_steps": 42.9,
                         "settings": {"release": setting,
                                      "first_block_cache_0.1": {**setting, "video_s_extrapolated": 40.0},
                                      "fused_qkv": {**setting, "video_s_extrapolated": 90.0},
                                      "fused_qkv_compiled": {"skipped": "budget (20 s left)"}}},
        },
    }
    markdown = script.render_markdown(report)
    assert "- Training MFU 36.8 % (goal >= 40 %) at 3.5 s per step, 120 GB peak." in markdown
    assert "- 50-step video, lossless: 90 s with fused_qkv (goal <= 55 s); the denoising steps' arithmetic " \
           "alone takes 42.9 s at the GPU's peak." in markdown
    assert "- 50-step video, cached: 40 s with first_block_cache_0.1 (goal <= 35 s" in markdown
    assert "| fused_qkv_compiled | skipped: budget (20 s left) | | | | |" in markdown
    assert "| training | 49 x 480 x 848 | DeepSpeed ZeRO-2, bf16-mixed, AdamW | 3.5 |" in markdown


def write_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding one module `name` that says where it was loaded from."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    info = f"{name}-0.1.dist-info"
    files = {
        f"{name}.py": "LOADED = True\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_wheels_are_installed_first_and_the_script_restarts_with_them(tmp_path):
    """On the GPU machine the missing packages arrive as wheels: installed into <work>/site,
    then the script runs again with them importable. Without CUDA it then stops, saying so."""
    write_wheel(tmp_path / "wheels", "acceptance_probe_module")
    work = tmp_path / "work"
    process = run_script("--out", tmp_path / "out", "--work", work, "--wheels", tmp_path / "wheels", timeout=300)
    assert (work / "site" / "acceptance_probe_module.py").is_file()
    assert f"installed 1 wheels from {tmp_path / 'wheels'} into {work / 'site'}" in process.stdout
    assert process.returncode != 0 and "no CUDA device: run with --dry-run on a CPU" in process.stderr
