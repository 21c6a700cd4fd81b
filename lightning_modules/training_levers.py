"""Memory and speed levers for training the EchoVideo transformer, each one experiment switch.

- LoRA (`LoraSettings`, `apply_lora`): peft adapters on the transformer's own layers; the
  backbone freezes, the four IITF parts train fully. `save_lora` writes what peft and
  diffusers load, plus the IITF weights under the release's names.
- Optimizer (`build_optimizer`): torch AdamW, bitsandbytes' 8-bit AdamW, or DeepSpeed's CPU
  Adam when a DeepSpeed strategy offloads the optimizer (DeepSpeed refuses any other there).
- Regional compilation (`compile_transformer_blocks`): `torch.compile` of each repeated
  transformer block, not of the whole model, so one compiled block serves every layer.
- `export_trained_weights`: what a run trained, in the layout its kind of training loads from.

Plain torch, peft and diffusers: no Lightning here. Strategies are read by duck typing.
"""

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# The release's names of the IITF parts (top-level children of the transformer). Kept equal
# to `echovideo_module.IITF_PARTS` (a test checks); they never receive LoRA.
IITF_PARTS = ("face_prj_wofc", "face_info_proj", "face_proj", "text_proj")
# peft's `exclude_modules` as a string is a full-match regex over module names.
IITF_MODULES_PATTERN = rf"({'|'.join(IITF_PARTS)})(\..+)?"

PEFT_CONFIG_FILE = "adapter_config.json"  # peft.utils.constants.CONFIG_NAME
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
PEFT_KEY_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
IITF_WEIGHTS_FILE = "iitf.safetensors"

OPTIMIZERS = ("adamw", "adamw_8bit")


# ------------------------------------------------------------------------------ LoRA
@dataclass
class LoraSettings:
    """LoRA on the transformer (peft). Scale is `alpha / rank`, as in peft.

    `target_modules` are module names or name suffixes as peft matches them; the default is
    the attention projections of every CogVideoX block (diffusers' CogVideoX LoRA recipe).
    The IITF parts are never adapted: they train fully, whatever the list says.
    """

    rank: int = 64
    alpha: float = 64.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            exclude_modules=IITF_MODULES_PATTERN,
            lora_dropout=self.dropout,
            init_lora_weights=True,  # lora_B = 0: the adapted model starts equal to the base
        )


def has_lora(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "_hf_peft_config_loaded", False))


def lora_module_names(transformer: nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)]


def apply_lora(
    transformer: nn.Module, settings: LoraSettings, seed: int = 0, adapter_name: str = "default"
) -> list[str]:
    """Add a LoRA adapter (diffusers' `add_adapter`, i.e. peft's injection) and make exactly
    the LoRA and IITF parameters trainable. Returns the adapted module names.

    peft draws the A matrices from the global RNG; drawing them under `seed` makes the
    adapter, like every other draw of a run, a function of the run's seed (and equal on
    every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(settings.peft_config(), adapter_name=adapter_name)
    transformer.requires_grad_(False)
    for name, parameter in transformer.named_parameters():
        if ".lora_" in name:
            parameter.requires_grad_(True)
    for part in IITF_PARTS:
        getattr(transformer, part).requires_grad_(True)
    return lora_module_names(transformer)


def iitf_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The IITF weights under the release's names (e.g. `face_proj.weight`)."""
    return {
        key: value.detach().to("cpu").contiguous()
        for key, value in transformer.state_dict().items()
        if key.split(".", 1)[0] in IITF_PARTS
    }


def save_lora(transformer: nn.Module, folder: str | Path, adapter_name: str = "default") -> Path:
    """Write a LoRA-trained transformer's weights to `folder`:

    - `adapter_config.json` + `adapter_model.safetensors`: what `PeftModel.save_pretrained`
      writes (keys `base_model.model.<module>.lora_A.weight`), for `PeftModel.from_pretrained`;
    - `pytorch_lora_weights.safetensors`: what diffusers' `CogVideoXLoraLoaderMixin.save_lora_weights`
      writes (keys `transformer.<module>.lora_A.weight`), for `load_lora_weights` /
      `transformer.load_lora_adapter`. The scale `alpha / rank` is folded into `lora_B` and the
      metadata says alpha = rank, so loaders that ignore the metadata (alpha = rank is
      diffusers' assumption without it) apply the same update;
    - `iitf.safetensors`: the fully trained IITF parts under the release's names; load them
      into the base transformer with `load_iitf_weights` before its adapter.
    """
    from diffusers.loaders.lora_pipeline import CogVideoXLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    if not has_lora(transformer):
        raise ValueError("save_lora: the transformer has no LoRA adapter (set `lora` in the experiment)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = transformer.peft_config[adapter_name]
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("save_lora folds one alpha/rank scale into lora_B; per-module patterns are not supported")
    lora = {
        key: value.detach().to("cpu").contiguous()
        for key, value in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()
    }

    save_file({PEFT_KEY_PREFIX + key: value for key, value in lora.items()}, folder / PEFT_WEIGHTS_FILE,
              metadata={"format": "pt"})
    peft_config = copy.deepcopy(config)
    peft_config.inference_mode = True  # as PeftModel.save_pretrained records it
    peft_config.save_pretrained(str(folder))

    scale = config.lora_alpha / config.r
    diffusers_layers = {
        key: (value.float() * scale).to(value.dtype) if ".lora_B." in key else value for key, value in lora.items()
    }
    CogVideoXLoraLoaderMixin.save_lora_weights(
        folder,
        transformer_lora_layers=diffusers_layers,
        weight_name=DIFFUSERS_LORA_FILE,
        transformer_lora_adapter_metadata={
            "r": config.r,
            "lora_alpha": config.r,
            "target_modules": sorted(lora_module_names(transformer)),
        },
    )
    save_file(iitf_state_dict(transformer), folder / IITF_WEIGHTS_FILE, metadata={"format": "pt"})
    return folder


def load_iitf_weights(transformer: nn.Module, folder_or_file: str | Path) -> None:
    """Copy `iitf.safetensors` into a transformer; every IITF key must be there, nothing else."""
    from safetensors.torch import load_file

    path = Path(folder_or_file)
    weights = load_file(path / IITF_WEIGHTS_FILE if path.is_dir() else path)
    expected = set(iitf_state_dict(transformer))
    if set(weights) != expected:
        raise ValueError(
            f"{path}: IITF weights do not match the transformer: missing {sorted(expected - set(weights))[:8]}, "
            f"unexpected {sorted(set(weights) - expected)[:8]}"
        )
    transformer.load_state_dict(weights, strict=False)


# ------------------------------------------------------------------------ optimizer
def deepspeed_offloads_optimizer(strategy) -> bool:
    """True under a DeepSpeed strategy whose config offloads the optimizer (to CPU or NVMe);
    DeepSpeed then steps on the CPU and accepts only its own CPU optimizers."""
    config = getattr(strategy, "config", None)
    if not isinstance(config, dict):
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def optimizer_class(name: str, strategy=None) -> type[torch.optim.Optimizer]:
    """The optimizer class `name` means under `strategy` (None: a plain single-process run)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}; choose one of {OPTIMIZERS}")
    if deepspeed_offloads_optimizer(strategy):
        if name != "adamw":
            raise ValueError(
                f"optimizer={name!r} with DeepSpeed's offload_optimizer: the offload already keeps the "
                "optimizer states in CPU memory and DeepSpeed only steps its own CPU optimizers there "
                "(zero_force_ds_cpu_optimizer). Use optimizer 'adamw' (DeepSpeedCPUAdam) or drop the offload."
            )
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    if name == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError as error:
            raise ImportError("optimizer 'adamw_8bit' needs bitsandbytes (pinned in requirements.txt)") from error
        return bitsandbytes.optim.AdamW8bit
    return torch.optim.AdamW


def build_optimizer(
    name: str,
    parameters,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    strategy=None,
) -> torch.optim.Optimizer:
    """AdamW in one of three forms, all with decoupled weight decay and eps 1e-8:
    "adamw" (torch; DeepSpeedCPUAdam under a DeepSpeed optimizer offload) or "adamw_8bit"
    (bitsandbytes: block-wise 8-bit moments for tensors of 4096+ elements, 32-bit below)."""
    cls = optimizer_class(name, strategy)
    kwargs = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if cls.__name__ == "DeepSpeedCPUAdam":
        kwargs["adamw_mode"] = True  # decoupled decay, as torch AdamW
    return cls(parameters, **kwargs)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


# ---------------------------------------------------------------------- compilation
def compile_transformer_blocks(transformer: nn.Module, **compile_kwargs) -> int:
    """`torch.compile` each `transformer_blocks[i]` in place (`nn.Module.compile`), so
    parameter names, checkpoints and gradient checkpointing are unchanged and the blocks,
    all of one class, share one compiled graph. Returns the number of blocks compiled."""
    for block in transformer.transformer_blocks:
        block.compile(**compile_kwargs)
    return len(transformer.transformer_blocks)


# --------------------------------------------------------------------------- export
def export_trained_weights(transformer: nn.Module, folder: str | Path) -> Path:
    """Write what a run trained, in the layout that kind of training is loaded from:
    LoRA -> `save_lora`; the whole transformer -> `save_pretrained` (a release-layout
    `transformer/` folder); the IITF parts only -> `iitf.safetensors`."""
    folder = Path(folder)
    if has_lora(transformer):
        return save_lora(transformer, folder)
    names = [name for name, _ in transformer.named_parameters()]
    trainable = {name for name, p in transformer.named_parameters() if p.requires_grad}
    if trainable == set(names):
        transformer.save_pretrained(folder, safe_serialization=True)
        return folder
    if trainable and all(name.split(".", 1)[0] in IITF_PARTS for name in trainable):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(iitf_state_dict(transformer), folder / IITF_WEIGHTS_FILE, metadata={"format": "pt"})
        return folder
    raise ValueError(
        "export_trained_weights knows three kinds of training (LoRA + IITF, the whole transformer, "
        f"the IITF parts); trainable parameters here: {sorted(trainable)[:8]}"
    )

