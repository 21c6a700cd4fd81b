"""Runs of several real processes: 2 CPU ranks over gloo, started through the kit's own entry
point as a user starts them (Lightning re-launches the command line for the second rank, so
the run is a subprocess of the test, never inside pytest)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.demo_data import write_demo_dataset
from module_helpers import tensorboard_scalars
from store_helpers import store_contents, store_overrides

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "demo_tiny.yaml"


def launch_ranks(command: str, *args, world_size: int = 2, strategy: str = "ddp",
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m echovideo <command> ...` on `world_size` CPU ranks (DDP over gloo). The
    tests folder is importable, so a run can take a test's callback."""
    # A fresh launch, as from a shell: not the rendezvous (MASTER_PORT, RANK, ...) that an
    # earlier in-process test left in this process's environment, whose port is still held.
    inherited = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                 "NODE_RANK", "GROUP_RANK")
    env = {key: value for key, value in os.environ.items()
           if key not in inherited and not key.startswith(("TORCHELASTIC_", "PL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::DeprecationWarning,ignore::FutureWarning",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run(
        [sys.executable, "-m", "echovideo", command, *map(str, args), "--trainer.accelerator=cpu",
         f"--trainer.devices={world_size}", f"--trainer.strategy={strategy}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_rank_whose_whole_batch_is_unreadable_does_not_stop_a_ddp_run(tiny_release, tmp_path):
    """Two readable clips and two corrupt ones, batch 1 on 2 ranks, 2 micro-batches a step: a
    rank often holds only a corrupt clip. The run takes every step and counts every skip over
    both ranks; validation, where one rank reads nothing at all, still gives its mean."""
    manifest = write_demo_dataset(tmp_path / "data", num_clips=2, num_frames=9, height=32, width=32, face_size=32)
    for name in ("corrupt_a", "corrupt_b"):
        (manifest.parent / f"{name}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")
        with open(manifest, "a") as lines:
            lines.write(json.dumps({"id": name, "video": f"{name}.mp4", "caption": "a man walks"}) + "\n")
    # Validation: rank 0 gets the readable clip, rank 1 only the corrupt one.
    validation = manifest.parent / "val.jsonl"
    lines = manifest.read_text().splitlines()
    validation.write_text("\n".join([lines[0], lines[-1]]) + "\n")
    run = tmp_path / "run"
    process = launch_ranks(
        "fit", "--config", EXPERIMENT, f"--run_dir={run}", "--trainer.max_time=null", "--trainer.max_steps=2",
        f"--data.init_args.val_manifest={validation}",
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
    # Each epoch's validation: the mean over the one clip that could be read, on either rank.
    assert len(logged["val/loss"]) == 2 and all(value > 0 for _, value in logged["val/loss"])


# The tiny store (9 samples) at batch 2 on 2 ranks with one loader worker each: 2 steps an
# epoch. Resumes from step 2 (an epoch end) and step 3 (inside an epoch), runs to 5.
EPOCH_END, MID_EPOCH, LAST_STEP = 2, 3, 5


def store_fit(preprocessed, release, run: Path, max_steps: int, *extra, world_size: int = 2,
              strategy: str = "ddp", resume: bool | Path = False, config: Path = EXPERIMENT
              ) -> subprocess.CompletedProcess:
    """`fit` from the tiny feature store, every step's loss and sample ids appended by each
    rank to run/losses.jsonl. `resume`: True for `--ckpt_path last`, or a checkpoint file."""
    _, manifest, store, _ = preprocessed
    overrides = [o for o in store_overrides(release, manifest, store, run) if not o.startswith("--preprocess.")]
    checkpoint = [] if resume is False else [f"--ckpt_path={'last' if resume is True else resume}"]
    process = launch_ranks(
        "fit", "--config", config, *overrides, "--data.init_args.num_workers=1",
        f"--trainer.max_steps={max_steps}", "--trainer.callbacks+=test_exact_resume.LossRecorder",
        f"--trainer.callbacks.init_args.path={run / 'losses.jsonl'}", *extra, *checkpoint,
        world_size=world_size, strategy=strategy)
    assert process.returncode == 0, process.stderr[-4000:]
    return process


def recorded_steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def test_ddp_run_resumed_at_an_epoch_end_and_inside_an_epoch_repeats_the_whole_run(
        preprocessed, tiny_release, tmp_path):
    """World size 2. The whole run keeps a checkpoint of every step; resumed from the one at
    the end of epoch 0 and from the one inside epoch 1, each run sees, step for step, the
    samples of the whole run and gives its losses, and its TensorBoard holds each step it
    ran once, at that step."""
    config = yaml.safe_load(EXPERIMENT.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ResumableCheckpoint"):
            callback["init_args"] = {"every_n_train_steps": 1, "save_top_k": -1}
    experiment = tmp_path / "every_step.yaml"
    experiment.write_text(yaml.safe_dump(config))

    def by_step(run, first=0):
        return sorted((r["step"], r["ids"], r["loss"]) for r in recorded_steps(run) if r["step"] >= first)

    def logged(run):
        return tensorboard_scalars(run / "tensorboard")["train/loss"]

    whole = tmp_path / "whole"
    store_fit(preprocessed, tiny_release, whole, LAST_STEP, config=experiment)
    assert sorted({step for step, _, _ in by_step(whole)}) == list(range(LAST_STEP))
    assert [step for step, _ in logged(whole)] == list(range(LAST_STEP))
    for first in (EPOCH_END, MID_EPOCH):
        (checkpoint,) = (whole / "checkpoints").glob(f"*-step={first}.ckpt")
        resumed = tmp_path / f"from_step_{first}"
        store_fit(preprocessed, tiny_release, resumed, LAST_STEP, config=experiment, resume=checkpoint)
        assert [(s, ids) for s, ids, _ in by_step(resumed)] == [(s, ids) for s, ids, _ in by_step(whole, first)]
        assert [loss for *_, loss in by_step(resumed)] == pytest.approx(
            [loss for *_, loss in by_step(whole, first)], rel=1e-5)
        assert [step for step, _ in logged(resumed)] == list(range(first, LAST_STEP))
        assert [value for _, value in logged(resumed)] == pytest.approx(
            [value for step, value in logged(whole) if step >= first], rel=1e-5)


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank_without_repeating_a_sample(preprocessed, tiny_release, tmp_path):
    """Stopped inside an epoch at world size 2, resumed at world size 1: the weights, optimizer
    and step carry over, the epoch goes on with the samples it had not yet given (each once),
    and the run says so in a warning and in TensorBoard."""
    run = tmp_path / "run"
    store_fit(preprocessed, tiny_release, run, MID_EPOCH)
    resumed = store_fit(preprocessed, tiny_release, run, LAST_STEP, world_size=1, resume=True)
    assert "resumed at world size 1" in resumed.stderr
    steps = recorded_steps(run)
    assert sorted({r["step"] for r in steps}) == list(range(LAST_STEP))
    # Step 2 opened epoch 1 (on both ranks); steps 3 and 4 finish it on one rank.
    epoch_one = [sample for r in steps if r["step"] >= EPOCH_END for sample in r["ids"]]
    assert len(epoch_one) == len(set(epoch_one)), epoch_one
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == LAST_STEP
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert any(tag.startswith("resume/data_position") for tag in events.Tags()["tensors"])


def zero_strategy(stage: int) -> str:
    return json.dumps({"class_path": "cpu_deepspeed.CPUDeepSpeedStrategy",
                       "init_args": {"stage": stage, "logging_batch_size_per_gpu": 2}})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_on_two_ranks_resumes_exactly_there_and_on_one_rank(stage, preprocessed, tiny_release, tmp_path):
    """ZeRO-2/3 on 2 ranks: stopped inside an epoch and resumed on 2 ranks, the losses are the
    whole run's; the same checkpoint resumed on 1 rank is converted to DeepSpeed's universal
    form on its own, and its first step gives the loss the whole run's rank 0 had on that
    batch (same weights, same random keys), then the epoch goes on without a repeated sample."""
    strategy = zero_strategy(stage)
    whole, split, on_one = tmp_path / "whole", tmp_path / "split", tmp_path / "on_one"
    store_fit(preprocessed, tiny_release, whole, LAST_STEP, strategy=strategy)
    store_fit(preprocessed, tiny_release, split, MID_EPOCH, strategy=strategy)
    shutil.copytree(split, on_one)
    store_fit(preprocessed, tiny_release, split, LAST_STEP, strategy=strategy, resume=True)

    def by_step(run):
        return sorted((r["step"], r["ids"], r["loss"]) for r in recorded_steps(run))

    assert [(s, ids) for s, ids, _ in by_step(split)] == [(s, ids) for s, ids, _ in by_step(whole)]
    assert [loss for *_, loss in by_step(split)] == pytest.approx([loss for *_, loss in by_step(whole)], rel=1e-4)

    resumed = store_fit(preprocessed, tiny_release, on_one, LAST_STEP, world_size=1, strategy=strategy, resume=True)
    assert "written by 2 ranks, resumed on 1" in resumed.stderr and "resumed at world size 1" in resumed.stderr
    steps = recorded_steps(on_one)
    assert sorted({r["step"] for r in steps}) == list(range(LAST_STEP))
    epoch_one = [sample for r in steps if r["step"] >= EPOCH_END for sample in r["ids"]]
    assert len(epoch_one) == len(set(epoch_one)), epoch_one
    first = next(r for r in steps if r["step"] == MID_EPOCH)
    same_batch = [r["loss"] for r in recorded_steps(whole) if r["step"] == MID_EPOCH and r["ids"] == first["ids"]]
    assert same_batch and first["loss"] == pytest.approx(same_batch[0], rel=1e-4)

    # The 2-rank directory consolidates to a release folder that loads strictly, with what trained.
    from echovideo.cli import main as echovideo_main
    from lightning_modules.release_layout import load_transformer

    echovideo_main(["consolidate", str(whole / "checkpoints" / "last.ckpt"), str(tmp_path / "release")])
    trained, before = load_transformer(tmp_path / "release").state_dict(), load_transformer(tiny_release).state_dict()
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[name], before[name]) for name in trained)


def test_two_preprocess_nodes_at_once_one_killed_and_rerun_write_the_one_node_store(
        preprocessed, tiny_release, tmp_path):
    """Nodes 0 and 1 of 2 started together; node 1 is SIGKILLed (its whole process group) once
    its first part is written, node 0 finishes; the store is refused as incomplete until node 1
    runs again. Then every sample equals the one-node store's, and the merged report, written
    by whichever node finished last, is complete."""
    from datamodules.feature_store import FeatureStoreError, read_store_meta

    _, manifest, reference_store, reference = preprocessed
    store = tmp_path / "store"
    # With the default filters, which each node's report applies to both nodes' measures.
    overrides = [o for o in store_overrides(tiny_release, manifest, store, tmp_path / "run", part_size=2)
                 if not o.startswith("--data.init_args.filters")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def node(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "echovideo", "preprocess", "--config", str(EXPERIMENT), *overrides,
             "--preprocess.num_nodes=2", f"--preprocess.node_rank={rank}"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)

    first_part = store / ".preprocess" / "node-001-of-002" / "parts" / "9x32x32" / "part-00000.json"
    zero, one = node(0), node(1)
    deadline = time.monotonic() + 240
    while not first_part.is_file() and one.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(one.pid, signal.SIGKILL)
    one.wait(timeout=60)
    assert one.returncode == -signal.SIGKILL  # killed mid-way, not finished before the kill
    assert zero.wait(timeout=240) == 0, zero.stderr.read()[-3000:]
    with pytest.raises(FeatureStoreError, match="the feature store is incomplete"):
        read_store_meta(store)

    rerun = node(1)
    assert rerun.wait(timeout=240) == 0, rerun.stderr.read()[-3000:]
    merged = json.loads((store / "report.json").read_text())
    assert merged["complete"] and merged["written"] == reference.written
    # A gray ramp jumps a whole gray level each frame, which the colour histograms read as cuts: the
    # merged report counts every stored sample, from both nodes' measures, as a scene cut.
    assert merged["kept"] == {"9x32x32": 0} and merged["skipped"] == {**reference.skipped, "scene_cut": 9}
    shown = dict(re.findall(r'data-count="([^"]+)"[^>]*>([^<]*)<', (store / "report.html").read_text()))
    assert shown["total/written"] == "9" and shown["skipped/scene_cut"] == "9"
    read_store_meta(store)
    assert (store / "9x32x32" / "all-nodes" / "index.json").is_file()  # read as one stream
    assert store_contents(store) == store_contents(reference_store)


def test_torchrun_generate_on_two_ranks_makes_every_video_once(tiny_release, face_root, tmp_path):
    """`torchrun --nproc_per_node 2 -m echovideo generate`: the ranks share the requests out,
    each video is made by exactly one rank, and each rank lists what it made."""
    from lightning_modules.tiny_face_models import write_tiny_face_photo

    photo = write_tiny_face_photo(tmp_path / "person.png")
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps({"prompt": f"person {i}", "face_image": str(photo), "id": f"r{i}"})
                                  for i in range(3)) + "\n")
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "echovideo",
         "generate", "--pretrained_path", str(tiny_release), "--face_models", str(face_root),
         "--requests", str(requests), "--out_dir", str(out), "--num_frames", "9", "--height", "32", "--width", "32",
         "--num_inference_steps", "1", "--dtype", "float32", "--no_progress", "--no_vae_tiling", "--device", "cpu"],
        cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    assert sorted(p.name for p in out.glob("*.mp4")) == ["r0.mp4", "r1.mp4", "r2.mp4"]
    made = {rank: [json.loads(line)["id"] for line in (out / f"generated.rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}
    assert made == {0: ["r0", "r2"], 1: ["r1"]}
