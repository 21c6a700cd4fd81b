"""Memory and speed levers on the tiny model: LoRA (and its peft / diffusers round trips),
EMA of the trainable weights, 8-bit AdamW, DeepSpeed's offload optimizer, regional compilation."""

import json
import shutil
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from callbacks.ema import EMAWeights
from callbacks.resumable_checkpoint import ResumableCheckpoint
from conftest import make_raw_batch
from lightning_modules import training_levers as levers
from lightning_modules.batch_features import encode_batch_features
from lightning_modules.echovideo_module import IITF_PARTS, EchoVideoModule
from lightning_modules.release_layout import load_transformer
from module_helpers import build_module, loader, trainer

LORA = levers.LoraSettings(rank=4, alpha=8.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"))


@pytest.fixture(scope="module")
def features(tiny_release):
    module = build_module(tiny_release)
    return {k: v.clone() for k, v in encode_batch_features(module.encoders, make_raw_batch()).items()}


def _transformer_inputs(transformer, seed: int = 0) -> dict:
    """One fixed input for the tiny transformer: 3 latent frames of 8 x 8."""
    config, g = transformer.config, torch.Generator().manual_seed(seed)
    frames, size = 3, 8
    return dict(
        hidden_states=torch.randn(2, frames, config.in_channels, size, size, generator=g),
        encoder_hidden_states=torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=g),
        encoder_face_hidden_states=torch.randn(2, config.face_seq_length, config.face_embed_dim, generator=g),
        encoder_face_feats_hidden_states=transformer.repeat_identity_embedding(
            torch.randn(2, config.face_features_embed_dim, generator=g)
        ),
        timestep=torch.tensor([100, 700]),
        image_rotary_emb=transformer.rotary_embeddings(frames, size, size, torch.device("cpu")),
        return_dict=False,
    )


@torch.no_grad()
def _output(transformer, inputs) -> torch.Tensor:
    return transformer.eval()(**inputs)[0]


def _optimized_ids(fit) -> set[int]:
    return {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}


# ----------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_run(tiny_release, features):
    """A LoRA module trained 3 steps (with gradient checkpointing: adapters inside recomputed
    blocks must still get gradients), with its transformer's weights from before training."""
    module = build_module(tiny_release, lora=LORA, learning_rate=5e-3, gradient_checkpointing=True)
    before = {k: v.clone() for k, v in module.transformer.state_dict().items()}
    fit = trainer(max_steps=3)
    fit.fit(module, loader(features, 3))
    return module, fit, before


def test_lora_adapts_only_backbone_attention_and_trains_only_lora_and_iitf(lora_run):
    module, fit, before = lora_run
    transformer = module.transformer
    num_layers = transformer.config.num_layers
    expected = {f"transformer_blocks.{i}.attn1.{name}" for i in range(num_layers) for name in LORA.target_modules}
    # The resampler inside face_prj_wofc has its own `to_q`: it must stay un-adapted.
    assert set(levers.lora_module_names(transformer)) == expected

    trainable = {name for name, p in transformer.named_parameters() if p.requires_grad}
    lora = {name for name, _ in transformer.named_parameters() if ".lora_" in name}
    iitf = {name for name, _ in transformer.named_parameters() if name.split(".")[0] in IITF_PARTS}
    assert len(lora) == 2 * len(expected) and iitf
    assert trainable == lora | iitf
    assert _optimized_ids(fit) == {id(p) for name, p in transformer.named_parameters() if name in trainable}

    after = transformer.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == trainable  # every adapter and IITF weight moved; the backbone did not
    assert all(torch.count_nonzero(before[k]) == 0 for k in after if ".lora_B." in k)  # starts as the base model


def test_lora_init_follows_the_seed_and_zero3_is_refused(lora_run, tiny_release):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_modules.tiny import build_tiny_transformer

    _, _, before = lora_run  # built with seed 0
    key = "transformer_blocks.1.attn1.to_v.lora_A.default.weight"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the global RNG must not matter
        assert torch.equal(build_module(tiny_release, lora=LORA).transformer.state_dict()[key], before[key])
    assert not torch.equal(build_module(tiny_release, lora=LORA, seed=1).transformer.state_dict()[key], before[key])

    module = EchoVideoModule(pretrained_path=str(tiny_release), identity_encoder=None, lora=LORA)
    module.transformer = build_tiny_transformer()
    module._trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=3))
    with pytest.raises(ValueError, match="ZeRO-3"):
        module._apply_trainable()


def test_lora_export_loads_back_with_peft_and_with_diffusers(lora_run, tiny_release, tmp_path):
    from diffusers.loaders.lora_pipeline import CogVideoXLoraLoaderMixin
    from peft import PeftModel

    module, _, _ = lora_run
    folder = levers.export_trained_weights(module.transformer, tmp_path / "lora")
    inputs = _transformer_inputs(module.transformer)
    trained = _output(module.transformer, inputs)

    # peft's layout
    config = json.loads((folder / levers.PEFT_CONFIG_FILE).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    peft_weights = load_file(folder / levers.PEFT_WEIGHTS_FILE)
    lora_keys = {k.removeprefix("transformer.") for k in module.state_dict() if ".lora_" in k}
    assert set(peft_weights) == {"base_model.model." + k.replace(".default.", ".") for k in lora_keys}
    # diffusers' layout: `transformer.` prefix, adapter name dropped, alpha/rank folded into lora_B
    diffusers_weights = load_file(folder / levers.DIFFUSERS_LORA_FILE)
    assert set(diffusers_weights) == {"transformer." + k.replace(".default.", ".") for k in lora_keys}
    key = "transformer_blocks.0.attn1.to_q.lora_B.weight"
    assert torch.equal(diffusers_weights["transformer." + key], 2.0 * peft_weights["base_model.model." + key])
    with safe_open(folder / levers.DIFFUSERS_LORA_FILE, framework="pt") as weights:
        metadata = json.loads(weights.metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 4)
    # IITF under the release's names, equal to the trained module's
    iitf = load_file(folder / levers.IITF_WEIGHTS_FILE)
    release_iitf = {k for k in load_transformer(tiny_release).state_dict() if k.split(".")[0] in IITF_PARTS}
    assert set(iitf) == release_iitf
    assert all(torch.equal(v, module.transformer.state_dict()[k]) for k, v in iitf.items())

    def base_with_iitf():
        transformer = load_transformer(tiny_release)
        levers.load_iitf_weights(transformer, folder)
        return transformer

    base_only = _output(load_transformer(tiny_release), inputs)
    assert not torch.allclose(base_only, trained, atol=1e-4)  # training moved the output
    assert not torch.allclose(_output(base_with_iitf(), inputs), trained, atol=1e-4)  # and LoRA matters

    with_peft = PeftModel.from_pretrained(base_with_iitf(), str(folder))
    torch.testing.assert_close(_output(with_peft, inputs), trained, rtol=0, atol=0)

    # diffusers' CogVideoX loader, as `CogVideoXPipeline.load_lora_weights` calls it
    state_dict, metadata = CogVideoXLoraLoaderMixin.lora_state_dict(
        str(folder), weight_name=levers.DIFFUSERS_LORA_FILE, return_lora_metadata=True
    )
    with_diffusers = base_with_iitf()
    CogVideoXLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=with_diffusers, metadata=metadata)
    torch.testing.assert_close(_output(with_diffusers, inputs), trained, rtol=1e-5, atol=1e-6)
    # ... and from the bare weights, as loaders that ignore the metadata read them (alpha = rank)
    bare = base_with_iitf()
    bare.load_lora_adapter(dict(diffusers_weights), prefix="transformer")
    torch.testing.assert_close(_output(bare, inputs), trained, rtol=1e-5, atol=1e-6)


def test_whole_transformer_export_is_a_strictly_loadable_transformer_folder(tiny_release, tmp_path):
    from lightning_modules.echovideo_transformer import EchoVideoTransformer3DModel
    from lightning_modules.release_layout import check_transformer_keys

    module = build_module(tiny_release)  # trainable="transformer_and_iitf"
    folder = levers.export_trained_weights(module.transformer, tmp_path / "transformer")
    check_transformer_keys(folder)  # the release's strict key check
    loaded = EchoVideoTransformer3DModel.from_pretrained(folder)
    inputs = _transformer_inputs(module.transformer)
    torch.testing.assert_close(_output(loaded, inputs), _output(module.transformer, inputs), rtol=0, atol=0)


def test_lever_settings_parse_from_yaml_and_hparams_stay_plain():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(EchoVideoModule, "model")
    encoder = "{class_path: lightning_modules.identity_encoder.TinyRandomRecognizer, init_args: {embedding_dim: 512}}"
    config = parser.parse_string(
        f"model:\n  pretrained_path: /release\n  identity_encoder: {encoder}\n"
        "  lora: {rank: 8, alpha: 16, target_modules: [to_q, to_v], dropout: 0.1}\n"
        "  optimizer: adamw_8bit\n  compile_blocks: true\n"
    )
    module = parser.instantiate_classes(config).model
    assert module.lora == levers.LoraSettings(rank=8, alpha=16.0, target_modules=("to_q", "to_v"), dropout=0.1)
    assert (module.hparams.optimizer, module.hparams.compile_blocks) == ("adamw_8bit", True)
    # plain types in hparams (checkpoints load with weights_only=True), and they rebuild the settings
    assert module.hparams["lora"] == {"rank": 8, "alpha": 16.0, "target_modules": ("to_q", "to_v"), "dropout": 0.1}
    assert EchoVideoModule(pretrained_path="/r", identity_encoder=None, lora=module.hparams["lora"]).lora == module.lora
    with pytest.raises(Exception, match="optimizer"):
        parser.parse_string(f"model:\n  pretrained_path: /r\n  identity_encoder: {encoder}\n  optimizer: sgd\n")
    with pytest.raises(ValueError, match="trainable='iitf'"):
        EchoVideoModule(pretrained_path="/r", identity_encoder=None, lora=LORA, trainable="iitf")


# ------------------------------------------------------------------------------ EMA
class TrainableWeightsAtEachStep(pl.Callback):
    """The trainable weights after every optimizer step, keyed by global step."""

    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        parameters = EMAWeights.trainable_parameters(pl_module)
        self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in parameters.items()}


def test_ema_follows_the_recurrence_with_accumulation(tiny_release, features):
    module = build_module(tiny_release, trainable="iitf")
    ema = EMAWeights(decay=0.5, update_every_n_steps=2, start_step=2)
    recorder = TrainableWeightsAtEachStep()
    fit = trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[ema, recorder])
    fit.fit(module, loader(features, 12))

    assert (ema.num_updates, ema.last_update_step) == (3, 6)  # steps 2 (copy), 4, 6
    weights = recorder.weights
    assert sorted(weights) == [0, 1, 2, 3, 4, 5, 6]  # 0: first micro-batch, before any step
    expected = {n: w.clone() for n, w in weights[2].items()}
    for step in (4, 6):
        expected = {n: 0.5 * expected[n] + 0.5 * weights[step][n] for n in expected}
    assert set(ema.averages) == set(expected) and all(n.startswith("transformer.face") or
                                                       n.startswith("transformer.text_proj") for n in expected)
    for name, value in expected.items():
        torch.testing.assert_close(ema.averages[name], value, rtol=1e-6, atol=1e-7)
    assert max((ema.averages[n] - weights[6][n]).abs().max() for n in expected) > 1e-4  # not just the weights


def _ema_run(release, features, root, max_steps, ckpt_path=None):
    module = build_module(release, lora=LORA)  # LoRA's checkpoint round trip comes along
    ema = EMAWeights(decay=0.7, update_every_n_steps=1, start_step=1)
    fit = trainer(root, max_steps=max_steps, enable_checkpointing=True,
                  callbacks=[ema, ResumableCheckpoint(every_n_train_steps=100)])
    fit.fit(module, loader(features, max_steps), ckpt_path=ckpt_path)
    return ema


def test_ema_resumes_exactly(tiny_release, features, tmp_path):
    whole = _ema_run(tiny_release, features, tmp_path / "whole", 4)
    _ema_run(tiny_release, features, tmp_path / "split", 2)
    saved = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("EMAWeights")]
    assert state["num_updates"] == 2 and len(state["averages"]) == len(whole.averages)
    assert any(".lora_A." in name for name in whole.averages)
    resumed = _ema_run(tiny_release, features, tmp_path / "split", 4, ckpt_path="last")

    assert (resumed.num_updates, resumed.last_update_step) == (whole.num_updates, whole.last_update_step) == (4, 4)
    for name, value in whole.averages.items():
        assert torch.equal(resumed.averages[name], value), name


class WeightsDuringValidation(pl.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.weights = {n: p.detach().clone() for n, p in EMAWeights.trainable_parameters(pl_module).items()}


def test_ema_is_swapped_in_for_validation_and_exported(tiny_release, features, tmp_path):
    module = build_module(tiny_release, trainable="iitf")
    ema = EMAWeights(decay=0.5, export_dir=str(tmp_path / "ema"))
    probe = WeightsDuringValidation()
    fit = trainer(max_steps=3, callbacks=[ema, probe])
    fit.fit(module, loader(features, 3))
    live = {n: p.detach().clone() for n, p in EMAWeights.trainable_parameters(module).items()}
    assert any(not torch.allclose(live[n], ema.averages[n]) for n in live)

    fit.validate(module, loader(features, 1), verbose=False)
    assert all(torch.equal(probe.weights[n], ema.averages[n]) for n in live)  # validated with the average
    assert all(torch.equal(p, live[n]) for n, p in EMAWeights.trainable_parameters(module).items())  # and back

    exported = load_file(tmp_path / "ema" / levers.IITF_WEIGHTS_FILE)  # trainable="iitf": the IITF file
    assert set(exported) == {n.removeprefix("transformer.") for n in live}
    assert all(torch.equal(exported[n.removeprefix("transformer.")], ema.averages[n]) for n in live)


def test_ema_refuses_partitioned_parameters():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    with pytest.raises(RuntimeError, match="ZeRO-3"):
        EMAWeights().setup(SimpleNamespace(strategy=DeepSpeedStrategy(stage=3)), None, "fit")
    EMAWeights().setup(SimpleNamespace(strategy=DeepSpeedStrategy(stage=2)), None, "fit")  # whole params: fine
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(decay=1.0)


# ------------------------------------------------------------------------ optimizer
def _bitsandbytes_cpu_problem() -> str | None:
    """Why bitsandbytes' AdamW8bit cannot step on this CPU, or None when it can."""
    try:
        import bitsandbytes
    except ImportError as error:
        return f"bitsandbytes is not installed ({error})"
    try:
        weight = torch.nn.Parameter(torch.ones(4096))
        optimizer = bitsandbytes.optim.AdamW8bit([weight], lr=0.1)
        weight.grad = torch.ones(4096)
        optimizer.step()
        assert optimizer.state[weight]["state1"].dtype == torch.uint8
    except Exception as error:  # no CPU backend in this build, unsupported instruction set, ...
        return f"bitsandbytes AdamW8bit does not run on this CPU: {type(error).__name__}: {error}"
    return None


def _mean_loss(module, features) -> float:
    with torch.no_grad():
        return torch.stack([module.diffusion_loss(features, step=-1, micro_batch=i)[0] for i in range(4)]).mean().item()


def test_adamw_8bit_trains_with_8bit_state(tiny_release, features):
    problem = _bitsandbytes_cpu_problem()
    if problem:
        pytest.skip(problem)
    module = build_module(tiny_release, optimizer="adamw_8bit", learning_rate=2e-3,
                          text_dropout_prob=0.0, identity_dropout_prob=0.0)
    before = _mean_loss(module, features)
    fit = trainer(max_steps=10)
    fit.fit(module, loader(features, 10))
    after = _mean_loss(module, features)
    assert after < 0.8 * before, (before, after)

    optimizer = fit.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    states = {name: optimizer.state[p] for name, p in module.transformer.named_parameters()}
    big = [name for name, p in module.transformer.named_parameters() if p.numel() >= 4096]
    assert big and all(states[n]["state1"].dtype == states[n]["state2"].dtype == torch.uint8 for n in big)
    # torch AdamW keeps two float32 moments per element (plus a step counter per tensor)
    adamw_bytes = sum(2 * 4 * p.numel() + 4 for p in module.transformer.parameters())
    assert levers.optimizer_state_bytes(optimizer) < 0.5 * adamw_bytes


def test_deepspeed_offload_gets_deepspeed_cpu_adam():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    offload = DeepSpeedStrategy(stage=2, offload_optimizer=True)
    assert levers.deepspeed_offloads_optimizer(offload)
    assert levers.optimizer_class("adamw", offload).__name__ == "DeepSpeedCPUAdam"
    with pytest.raises(ValueError, match="offload"):
        levers.optimizer_class("adamw_8bit", offload)
    plain = DeepSpeedStrategy(stage=2)
    assert not levers.deepspeed_offloads_optimizer(plain)
    assert levers.optimizer_class("adamw", plain) is torch.optim.AdamW
    assert levers.optimizer_class("adamw", None) is torch.optim.AdamW
    with pytest.raises(ValueError, match="choose one of"):
        levers.optimizer_class("sgd")


@pytest.mark.slow
def test_deepspeed_cpu_adam_steps_like_torch_adamw():
    """Builds DeepSpeed's cpu_adam op (a C++ JIT build, about 100 s on 2 cores the first time)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    weights = [torch.nn.Parameter(torch.linspace(-1, 1, 64)) for _ in range(2)]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    offload = DeepSpeedStrategy(stage=2, offload_optimizer=True)
    cpu_adam = levers.build_optimizer("adamw", [weights[0]], strategy=offload, **kwargs)
    torch_adamw = levers.build_optimizer("adamw", [weights[1]], **kwargs)
    for step in range(3):
        for weight, optimizer in zip(weights, (cpu_adam, torch_adamw)):
            weight.grad = torch.sin(weight.detach() * (step + 1))
            optimizer.step()
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- compilation
def _loss_and_grads(module, features):
    module.transformer.train()
    module.transformer.zero_grad()
    loss, _ = module.diffusion_loss(features, step=0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.transformer.named_parameters() if p.grad is not None}


def _compare_compiled_with_eager(tiny_release, features, compiled):
    eager = build_module(tiny_release, gradient_checkpointing=True, text_dropout_prob=0.0, identity_dropout_prob=0.0)
    eager_loss, eager_grads = _loss_and_grads(eager, features)
    loss, grads = _loss_and_grads(compiled, features)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(eager_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)


def test_compiled_blocks_match_eager_under_gradient_checkpointing(tiny_release, features):
    """Dynamo and AOTAutograd on each block (backend aot_eager: no C compiler, seconds);
    inductor itself is the slow test below."""
    module = build_module(tiny_release, gradient_checkpointing=True, text_dropout_prob=0.0, identity_dropout_prob=0.0)
    names = set(module.transformer.state_dict())
    compiled = levers.compile_transformer_blocks(module.transformer, backend="aot_eager")
    assert compiled == module.transformer.config.num_layers
    assert set(module.transformer.state_dict()) == names  # checkpoints keep their keys
    _compare_compiled_with_eager(tiny_release, features, module)


def test_compile_blocks_switch_compiles_each_block(tiny_release):
    module = build_module(tiny_release, compile_blocks=True)
    blocks = list(module.transformer.transformer_blocks)
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert module.transformer._compiled_call_impl is None  # regional: the model itself is not compiled


def _inductor_problem() -> str | None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch inductor on CPU needs a C++ compiler (g++ or c++) and none is on PATH"
    try:
        torch.compile(lambda x: x * 2 + 1, backend="inductor")(torch.ones(4))
    except Exception as error:
        return f"torch inductor cannot compile on this machine: {type(error).__name__}: {error}"
    return None


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager_under_gradient_checkpointing(tiny_release, features):
    """The `compile_blocks` switch with inductor (about 70 s on 2 cores with a cold cache)."""
    problem = _inductor_problem()
    if problem:
        pytest.skip(problem)
    module = build_module(tiny_release, gradient_checkpointing=True, compile_blocks=True,
                          text_dropout_prob=0.0, identity_dropout_prob=0.0)
    _compare_compiled_with_eager(tiny_release, features, module)
