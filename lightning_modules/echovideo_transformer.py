"""The EchoVideo transformer: CogVideoX's MM-DiT plus the IITF face-text pre-fusion.

The four IITF parts sit at the top level under the release's names (`face_prj_wofc`,
`face_info_proj`, `face_proj`, `text_proj`) so that the public `transformer/` checkpoint
loads with strict key matching, and `forward` accepts the release's keyword arguments.
Defaults are the release's sizes (CogVideoX-5B, image-to-video layout).
"""

import json
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from torch import nn

from lightning_modules.face_resampler import FaceResampler


class EchoVideoTransformer3DModel(CogVideoXTransformer3DModel):
    """CogVideoX transformer whose text stream carries identity-fused tokens.

    Extra config keys beside CogVideoX's: `face_embed_dim` (SigLIP width),
    `face_features_embed_dim` (ArcFace width), `face_seq_length` (SigLIP tokens),
    `face_features_seq_length` (how often the ArcFace vector is repeated at the input),
    and `face_resampler_*` (sizes the release fixes in code; defaults equal them, so the
    release's config.json, which lacks these keys, builds the release's resampler).
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 48,
        attention_head_dim: int = 64,
        in_channels: int = 32,
        out_channels: int | None = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        ofs_embed_dim: int | None = None,
        text_embed_dim: int = 4096,
        num_layers: int = 42,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        patch_size_t: int | None = None,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = True,
        use_learned_positional_embeddings: bool = False,
        patch_bias: bool = True,
        face_embed_dim: int = 768,
        face_features_embed_dim: int = 512,
        face_seq_length: int = 196,
        face_features_seq_length: int = 144,
        face_resampler_dim: int = 1024,
        face_resampler_depth: int = 4,
        face_resampler_heads: int = 12,
        face_resampler_head_dim: int = 64,
        face_resampler_num_queries: int = 16,
        face_resampler_ff_mult: int = 4,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            time_embed_dim=time_embed_dim,
            ofs_embed_dim=ofs_embed_dim,
            text_embed_dim=text_embed_dim,
            num_layers=num_layers,
            dropout=dropout,
            attention_bias=attention_bias,
            sample_width=sample_width,
            sample_height=sample_height,
            sample_frames=sample_frames,
            patch_size=patch_size,
            patch_size_t=patch_size_t,
            temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length,
            activation_fn=activation_fn,
            timestep_activation_fn=timestep_activation_fn,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            spatial_interpolation_scale=spatial_interpolation_scale,
            temporal_interpolation_scale=temporal_interpolation_scale,
            use_rotary_positional_embeddings=use_rotary_positional_embeddings,
            use_learned_positional_embeddings=use_learned_positional_embeddings,
            patch_bias=patch_bias,
        )
        self.face_prj_wofc = FaceResampler(
            input_dim=face_features_embed_dim,
            dim=face_resampler_dim,
            depth=face_resampler_depth,
            heads=face_resampler_heads,
            dim_head=face_resampler_head_dim,
            num_queries=face_resampler_num_queries,
            output_dim=face_embed_dim,
            ff_mult=face_resampler_ff_mult,
        )
        # Facial feature alignment: mixes [resampled ArcFace tokens, SigLIP tokens] along
        # the sequence axis into face_seq_length tokens.
        self.face_info_proj = nn.Linear(face_resampler_num_queries + face_seq_length, face_seq_length)
        self.face_proj = nn.Linear(face_embed_dim, text_embed_dim)
        # Conditional feature alignment: mixes [face tokens, T5 tokens] along the sequence
        # axis back into max_text_seq_length tokens.
        self.text_proj = nn.Linear(face_seq_length + max_text_seq_length, max_text_seq_length)

    def repeat_identity_embedding(self, arcface: torch.Tensor) -> torch.Tensor:
        """B x D_id ArcFace embeddings -> B x face_features_seq_length identical tokens."""
        return arcface[:, None, :].expand(-1, self.config.face_features_seq_length, -1)

    def rotary_embeddings(
        self, num_latent_frames: int, latent_height: int, latent_width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """3D RoPE (cos, sin) for a latent video, computed as CogVideoX's pipelines do.

        None when the config uses no rotary embeddings. CogVideoX 1.0 (patch_size_t None)
        places the latent grid inside the `sample_height x sample_width` base grid with
        a resize-crop region; CogVideoX 1.5 slices it.
        """
        if not self.config.use_rotary_positional_embeddings:
            return None
        p, p_t = self.config.patch_size, self.config.patch_size_t
        grid_height, grid_width = latent_height // p, latent_width // p
        base_height, base_width = self.config.sample_height // p, self.config.sample_width // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
            return get_3d_rotary_pos_embed(
                embed_dim=self.config.attention_head_dim,
                crops_coords=crops,
                grid_size=(grid_height, grid_width),
                temporal_size=num_latent_frames,
                device=device,
            )
        return get_3d_rotary_pos_embed(
            embed_dim=self.config.attention_head_dim,
            crops_coords=None,
            grid_size=(grid_height, grid_width),
            temporal_size=(num_latent_frames + p_t - 1) // p_t,
            grid_type="slice",
            max_size=(base_height, base_width),
            device=device,
        )

    def fuse_identity_text(
        self,
        text_embeds: torch.Tensor,
        siglip_tokens: torch.Tensor,
        identity_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """IITF: fuse face semantics into the text condition.

        identity_tokens (B x 144 x 512, the repeated ArcFace vector) -> resampler ->
        B x 16 x 768; put before the SigLIP tokens (B x 196 x 768); `face_info_proj` mixes
        the 212 tokens into 196; `face_proj` lifts them to the text width; put before the
        T5 tokens (B x 226 x 4096); `text_proj` mixes the 422 tokens into 226. The result
        replaces the T5 tokens as the transformer's text stream.
        """
        dtype = self.face_proj.weight.dtype
        resampled = self.face_prj_wofc(identity_tokens.to(dtype))
        face_tokens = torch.cat([resampled, siglip_tokens.to(dtype)], dim=1)
        face_tokens = self.face_info_proj(face_tokens.transpose(1, 2)).transpose(1, 2)
        face_tokens = self.face_proj(face_tokens)
        fused = torch.cat([face_tokens, text_embeds.to(dtype)], dim=1)
        return self.text_proj(fused.transpose(1, 2)).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_face_hidden_states: torch.Tensor | None = None,
        encoder_face_feats_hidden_states: torch.Tensor | None = None,
        timestep: int | float | torch.LongTensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        ofs: int | float | torch.LongTensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ):
        """Release signature: `hidden_states` is B x F x 32 x H x W (noisy latent and face
        latent on channels), `encoder_hidden_states` the T5 tokens,
        `encoder_face_hidden_states` the SigLIP tokens, `encoder_face_feats_hidden_states`
        the repeated ArcFace tokens."""
        if encoder_face_hidden_states is None or encoder_face_feats_hidden_states is None:
            raise ValueError(
                "EchoVideoTransformer3DModel.forward needs `encoder_face_hidden_states` (SigLIP "
                "tokens) and `encoder_face_feats_hidden_states` (repeated ArcFace tokens)."
            )
        if timestep is None:
            raise ValueError("EchoVideoTransformer3DModel.forward needs `timestep`.")
        fused = self.fuse_identity_text(
            encoder_hidden_states, encoder_face_hidden_states, encoder_face_feats_hidden_states
        )
        return super().forward(
            hidden_states=hidden_states,
            encoder_hidden_states=fused,
            timestep=timestep,
            timestep_cond=timestep_cond,
            ofs=ofs,
            image_rotary_emb=image_rotary_emb,
            attention_kwargs=attention_kwargs,
            return_dict=return_dict,
        )


def build_on_meta_device(config: dict | str | Path | None = None) -> EchoVideoTransformer3DModel:
    """Build the architecture without allocating weights (seconds even at 5.6 B params).

    `config` is a dict of constructor arguments or a path to a `transformer/config.json`;
    None builds the release's sizes.
    """
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    kwargs = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    with torch.device("meta"):
        return EchoVideoTransformer3DModel(**kwargs)
