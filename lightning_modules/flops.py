"""FLOPs of one EchoVideo training sample, from the transformer's config and parameters.

The transformer sees one sequence per sample: the text stream (`max_text_seq_length`
tokens; IITF has already fused the face into them, it adds no tokens) followed by the
video patches (latent frames / `patch_size_t` x latent height / `patch_size` x latent
width / `patch_size`). Counting rule, per sample:

- matmuls: 2 FLOPs per weight per token forward, 2 more for the gradient of the input
  and 2 for the gradient of the weight: 6 x parameters x tokens (4x for frozen weights);
- attention scores and the weighted sum (QK^T and AV, no weights): 4 x seq^2 x hidden per
  layer forward, twice that backward: 12 x seq^2 x hidden x layers.

Only parameters that multiply every token enter "parameters" here. The adaptive-norm
modulation (a 512 -> 6 x 3072 linear twice per block, 0.79 B of the release's 5.62 B) and
the time embedding run once per sample on the timestep embedding, and the IITF parts run
on a few hundred face tokens; counted per token they would overstate the release's
figure by 9 % (1.09e15 instead of 9.98e14; torch's FlopCounterMode counts 9.97e14,
three times its forward pass, on a meta-device build of the release's transformer).

Gradient checkpointing recomputes each block's forward during backward. That work is
reported apart as `recompute`: hardware FLOPs = model FLOPs + recompute, while MFU, by
convention, counts model FLOPs only.
"""

from dataclasses import dataclass

from torch import nn

# CogVideoX parts that act on every token of the sequence.
SEQUENCE_PARTS = ("patch_embed", "transformer_blocks", "norm_final", "proj_out")


@dataclass(frozen=True)
class ParameterCounts:
    """How the transformer's parameters split by what they are multiplied with.

    sequence: weights applied to every token (attention and feed-forward projections,
        patch embedding, output projection).
    sequence_frozen: the part of `sequence` that is not trained (no weight gradient).
    other: per-sample weights (timestep embedding, adaptive-norm modulation) and the IITF
        fusion, which never touch the sequence's tokens.
    """

    sequence: int
    sequence_frozen: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.sequence + self.other


@dataclass(frozen=True)
class SequenceLength:
    """Tokens of one sample in the transformer: text stream then video patches."""

    text: int
    video: int

    @property
    def total(self) -> int:
        return self.text + self.video


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one training sample (forward + backward)."""

    model: float  # what MFU counts
    recompute: float  # extra forward under gradient checkpointing
    tokens: int

    @property
    def hardware(self) -> float:
        """What the GPU actually executes: model FLOPs plus the recomputed forward."""
        return self.model + self.recompute


def _numel(parameter) -> int:
    # ZeRO-3 leaves an empty placeholder in `numel()`; the full size is in `ds_numel`.
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def _is_per_sample_modulation(module: nn.Module) -> bool:
    """CogVideoX's adaptive norms: a linear over the timestep embedding (once per sample)."""
    return type(module).__name__ in {"CogVideoXLayerNormZero", "AdaLayerNorm", "AdaLayerNormZero"}


def count_parameters(transformer: nn.Module) -> ParameterCounts:
    """Split the transformer's parameters into per-token and other (see ParameterCounts).

    Works on real, meta-device and ZeRO-3-partitioned modules (it reads sizes, never values).
    """
    per_sample = set()
    for module in transformer.modules():
        if _is_per_sample_modulation(module) and hasattr(module, "linear"):
            per_sample.update(id(p) for p in module.linear.parameters())
    sequence = frozen = 0
    for part in SEQUENCE_PARTS:
        child = getattr(transformer, part, None)
        if child is None:
            continue
        for parameter in child.parameters():
            if id(parameter) in per_sample:
                continue
            sequence += _numel(parameter)
            if not parameter.requires_grad:
                frozen += _numel(parameter)
    total = sum(_numel(p) for p in transformer.parameters())
    if sequence == 0:
        raise ValueError(
            f"{type(transformer).__name__} has none of {SEQUENCE_PARTS}: count_parameters expects "
            "a CogVideoX-style transformer (e.g. EchoVideoTransformer3DModel)"
        )
    return ParameterCounts(sequence=sequence, sequence_frozen=frozen, other=total - sequence)


def _config_value(config, key: str, default=None):
    if isinstance(config, dict):  # plain dicts and diffusers' FrozenDict
        return config.get(key, default)
    return getattr(config, key, default)


def sequence_length(config, latent_frames: int, latent_height: int, latent_width: int) -> SequenceLength:
    """Tokens of one sample for a latent of latent_frames x latent_height x latent_width.

    `config` is the transformer's config (`transformer.config`, or a dict of its
    constructor arguments). CogVideoX 1.5 (`patch_size_t` set) pads the latent frames to a
    multiple of `patch_size_t`; the patch embedding drops any spatial remainder.
    """
    patch = int(_config_value(config, "patch_size", 2))
    patch_t = _config_value(config, "patch_size_t") or 1
    frames = -(-latent_frames // patch_t)
    video = frames * (latent_height // patch) * (latent_width // patch)
    return SequenceLength(text=int(_config_value(config, "max_text_seq_length", 226)), video=video)


def training_flops_per_sample(
    config,
    parameters: ParameterCounts,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    gradient_checkpointing: bool = False,
) -> TrainingFlops:
    """FLOPs of one training sample (forward + backward) at this latent size.

    At the release's size (42 layers, 48 x 64 heads, 4.77 B per-token parameters) and
    49 frames of 480 x 720 (13 x 60 x 90 latent, 17,776 tokens) this is 9.98e14.
    """
    tokens = sequence_length(config, latent_frames, latent_height, latent_width).total
    layers = int(_config_value(config, "num_layers"))
    hidden = int(_config_value(config, "num_attention_heads")) * int(_config_value(config, "attention_head_dim"))
    trained = parameters.sequence - parameters.sequence_frozen
    matmul_forward = 2.0 * parameters.sequence * tokens
    # Backward: input gradients through every weight, weight gradients only where trained.
    matmul = matmul_forward + 2.0 * parameters.sequence * tokens + 2.0 * trained * tokens
    attention_forward = 4.0 * tokens**2 * hidden * layers
    model = matmul + 3.0 * attention_forward
    recompute = matmul_forward + attention_forward if gradient_checkpointing else 0.0
    return TrainingFlops(model=model, recompute=recompute, tokens=tokens)
