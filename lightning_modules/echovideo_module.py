"""LightningModule that trains and samples EchoVideo.

It wires plain parts together: the EchoVideo transformer (trained), the frozen encoders
(never trained, never checkpointed), the CogVideoX scheduler and the sampler. The
two-stage callback sets `face_latent_keep_prob`; everything else is configuration.
"""

from dataclasses import asdict
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F
from diffusers.optimization import get_constant_schedule_with_warmup

from datamodules import batch as keys
from datamodules.skip_reasons import SKIP_REASONS
from lightning_modules.batch_features import encode_batch_features
from lightning_modules.echovideo_transformer import EchoVideoTransformer3DModel
from lightning_modules.frozen_encoders import FrozenEncoders
from lightning_modules.identity_encoder import IdentityEncoder
from lightning_modules.identity_check import refuse_random_identity_at_release_size
from lightning_modules.release_layout import load_scheduler, load_transformer
from lightning_modules.sampling import (
    Conditions,
    SamplingConfig,
    num_latent_frames_for,
    pad_face_latent,
    sample_latents,
)
from lightning_modules.step_random import step_generator

IITF_PARTS = ("face_prj_wofc", "face_info_proj", "face_proj", "text_proj")
# What `data/...` logs: samples skipped per reason, then captions cut to the T5 limit.
DATA_COUNTERS = tuple(f"skipped/{reason}" for reason in SKIP_REASONS) + ("captions_truncated",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EchoVideoModule(pl.LightningModule):
    """EchoVideo training (v-prediction on the CogVideoX schedule) and sampling.

    Args:
        pretrained_path: release-layout folder (transformer/, vae/, text_encoder/,
            tokenizer/, scheduler/, clip_visual_encoder/).
        identity_encoder: face crop in, identity embedding out (ArcFace in production).
        trainable: "transformer_and_iitf" trains the whole transformer; "iitf" only the
            four IITF parts (gradients still flow through the frozen backbone).
        learning_rate, weight_decay, adam_betas, warmup_steps: AdamW with linear warm-up
            to a constant rate.
        text_dropout_prob: per-sample probability of the unconditional text (T5 of "").
        identity_dropout_prob: per-sample probability of the unconditional identity
            (SigLIP tokens of a black image, zero ArcFace).
        gradient_checkpointing: recompute transformer blocks in backward.
        encoder_dtype: dtype of the frozen encoders.
        seed: root of every random draw (see lightning_modules/step_random.py).
        sampling: how `predict` generates videos.
    """

    def __init__(
        self,
        pretrained_path: str,
        identity_encoder: IdentityEncoder,
        trainable: Literal["transformer_and_iitf", "iitf"] = "transformer_and_iitf",
        learning_rate: float = 2e-5,
        weight_decay: float = 1e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        text_dropout_prob: float = 0.1,
        identity_dropout_prob: float = 0.1,
        gradient_checkpointing: bool = False,
        encoder_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        seed: int = 0,
        sampling: SamplingConfig | None = None,
    ):
        super().__init__()
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["identity_encoder", "sampling"])
        self.sampling = sampling or SamplingConfig()
        self.hparams["sampling"] = asdict(self.sampling)
        self.transformer: EchoVideoTransformer3DModel | None = None
        self.scheduler = None
        self.sampling_scheduler = None
        # Held outside nn.Module registration on purpose: the frozen encoders stay out of
        # state_dict (checkpoints), the optimizer, DeepSpeed's engine and precision casts.
        object.__setattr__(self, "_identity_encoder", identity_encoder)
        object.__setattr__(self, "encoders", None)
        # Set by callbacks.TwoStageFaceLatentSchedule; 1.0 means stage 1.
        self.face_latent_keep_prob = 1.0
        # This rank's running counts of DATA_COUNTERS; logged summed over ranks.
        self.data_counts = torch.zeros(len(DATA_COUNTERS), dtype=torch.float64)
        # The last all-rank totals: what a checkpoint keeps (its hooks must not reduce).
        self.data_totals = self.data_counts.clone()
        self._unconditional: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the transformer, scheduler and frozen encoders from `pretrained_path` once."""
        if self.transformer is not None:
            return
        hp = self.hparams
        self.transformer = load_transformer(hp.pretrained_path, dtype=torch.float32)
        refuse_random_identity_at_release_size(self._identity_encoder, self.transformer.config)
        self.scheduler = load_scheduler(hp.pretrained_path)
        self.sampling_scheduler = self._build_sampling_scheduler()
        encoders = FrozenEncoders.from_release_folder(
            hp.pretrained_path,
            identity_encoder=self._identity_encoder,
            max_text_seq_length=self.transformer.config.max_text_seq_length,
            dtype=DTYPES[hp.encoder_dtype],
        )
        object.__setattr__(self, "encoders", encoders)
        self._apply_trainable()
        if hp.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def _apply_trainable(self) -> None:
        if self.hparams.trainable == "transformer_and_iitf":
            self.transformer.requires_grad_(True)
            return
        self.transformer.requires_grad_(False)
        for name in IITF_PARTS:
            getattr(self.transformer, name).requires_grad_(True)

    def _place_encoders(self) -> None:
        self.encoders.place(self.device)
        self._unconditional = {}
        self.data_counts = self.data_counts.to(self.device)

    def on_fit_start(self) -> None:
        self._place_encoders()
        self._take_unconditional_from_datamodule()
        self.transformer.train()  # loaded in eval mode by from_pretrained

    def _take_unconditional_from_datamodule(self) -> None:
        """A feature store carries T5 of "" and SigLIP of a black face, so condition
        dropout needs neither T5 nor SigLIP in memory."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        provided = getattr(datamodule, "unconditional_features", lambda: None)()
        if provided is None:
            return
        arcface_dim = self.transformer.config.face_features_embed_dim
        self._unconditional[""] = {
            keys.TEXT_EMBEDS: provided[keys.TEXT_EMBEDS].to(self.device),
            keys.SIGLIP_TOKENS: provided[keys.SIGLIP_TOKENS].to(self.device),
            keys.ARCFACE: torch.zeros(1, arcface_dim, device=self.device),
        }

    def on_validation_start(self) -> None:
        self._place_encoders()

    def on_predict_start(self) -> None:
        self._place_encoders()
        if self.trainer.ckpt_path is None:
            rank_zero_info(
                f"predict: no checkpoint loaded; sampling with the transformer in "
                f"{self.hparams.pretrained_path}/transformer"
            )

    # ----------------------------------------------------------------- training
    def configure_optimizers(self):
        hp = self.hparams
        parameters = [p for p in self.transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters, lr=hp.learning_rate, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay
        )
        schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=hp.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _generator(self, purpose: str, step: int, micro_batch: int = 0) -> torch.Generator:
        return step_generator(self.hparams.seed, step, self.global_rank, purpose, micro_batch)

    def _micro_batch(self, batch_idx: int) -> int:
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        return batch_idx % accumulate

    def unconditional(self, negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """Single-sample unconditional features: T5 of the prompt, SigLIP of black, zero ArcFace."""
        if negative_prompt not in self._unconditional:
            arcface_dim = self.transformer.config.face_features_embed_dim
            self._unconditional[negative_prompt] = {
                keys.TEXT_EMBEDS: self.encoders.encode_text([negative_prompt]),
                keys.SIGLIP_TOKENS: self.encoders.unconditional_siglip_tokens(1),
                keys.ARCFACE: torch.zeros(1, arcface_dim, device=self.device),
            }
        return self._unconditional[negative_prompt]

    def _drop_conditions(self, features: dict, step: int, micro_batch: int) -> None:
        """Classifier-free-guidance dropout: text and identity, each with its own draw."""
        batch_size = features[keys.LATENTS].shape[0]
        uncond = self.unconditional("")
        drops = {
            (keys.TEXT_EMBEDS,): self.hparams.text_dropout_prob,
            (keys.SIGLIP_TOKENS, keys.ARCFACE): self.hparams.identity_dropout_prob,
        }
        for group, probability in drops.items():
            generator = self._generator(f"dropout/{group[0]}", step, micro_batch)
            drop = (torch.rand(batch_size, generator=generator) < probability).to(self.device)
            for key in group:
                mask = drop.view(-1, *([1] * (features[key].dim() - 1)))
                features[key] = torch.where(mask, uncond[key].to(features[key].dtype), features[key])

    def diffusion_loss(self, features: dict, step: int, micro_batch: int = 0) -> tuple[torch.Tensor, dict]:
        """v-prediction (or epsilon, as the scheduler config says) MSE on one batch.

        Timesteps, noise and the stage-2 face-latent mask are drawn from generators keyed
        by (step, micro_batch), so a resumed run repeats the uninterrupted run's draws.
        """
        latents = features[keys.LATENTS]
        batch_size, num_frames, _, height, width = latents.shape
        num_train_timesteps = self.scheduler.config.num_train_timesteps

        timesteps = torch.randint(
            0, num_train_timesteps, (batch_size,), generator=self._generator("timestep", step, micro_batch)
        ).to(self.device)
        noise = torch.randn(
            latents.shape, generator=self._generator("noise", step, micro_batch), dtype=latents.dtype
        ).to(self.device)
        keep = torch.rand(batch_size, generator=self._generator("face_latent_keep", step, micro_batch))
        keep = (keep < self.face_latent_keep_prob).to(self.device)

        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        face_latent = pad_face_latent(features[keys.FACE_LATENT], num_frames)
        face_latent = face_latent * keep.view(-1, 1, 1, 1, 1).to(face_latent.dtype)
        dtype = self.transformer.dtype
        prediction = self.transformer(
            hidden_states=torch.cat([noisy, face_latent], dim=2).to(dtype),
            encoder_hidden_states=features[keys.TEXT_EMBEDS],
            encoder_face_hidden_states=features[keys.SIGLIP_TOKENS],
            encoder_face_feats_hidden_states=self.transformer.repeat_identity_embedding(
                features[keys.ARCFACE]
            ),
            timestep=timesteps,
            image_rotary_emb=self.transformer.rotary_embeddings(num_frames, height, width, self.device),
            return_dict=False,
        )[0]
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction.float(), target.float())
        return loss, {"face_latent_keep_rate": keep.float().mean()}

    def _features(self, batch: dict, step: int, micro_batch: int = 0) -> dict | None:
        if not any(k in batch for k in (keys.LATENTS, keys.LATENT_MEAN, keys.VIDEO)):
            return None  # every sample of this batch was unreadable
        if keys.TEXT_EMBEDS not in batch and keys.CAPTION in batch and self.training:
            truncated = self.encoders.truncated_caption_count(batch[keys.CAPTION])
            self.data_counts[DATA_COUNTERS.index("captions_truncated")] += truncated
        return encode_batch_features(
            self.encoders,
            batch,
            generator=self._generator("vae_posterior", step, micro_batch),
            device=self.device,
        )

    def training_step(self, batch: dict, batch_idx: int):
        step, micro_batch = self.global_step, self._micro_batch(batch_idx)
        if keys.SKIPPED in batch:
            self.data_counts[: len(SKIP_REASONS)] += batch[keys.SKIPPED].to(self.data_counts)
        features = self._features(batch, step, micro_batch)
        self._log_data_counts()
        if features is None:
            return None
        self._drop_conditions(features, step, micro_batch)
        loss, stats = self.diffusion_loss(features, step, micro_batch)
        batch_size = features[keys.LATENTS].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/face_latent_keep_rate", stats["face_latent_keep_rate"], batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        # Keyed by batch index under a step no training step has: every validation pass
        # draws the same noise, so val/loss curves compare across the run.
        features = self._features(batch, step=-1, micro_batch=batch_idx)
        if features is None:
            return None
        with torch.no_grad():
            loss, _ = self.diffusion_loss(features, step=-1, micro_batch=batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=features[keys.LATENTS].shape[0], sync_dist=True)
        return loss

    def _log_data_counts(self) -> None:
        """`data/skipped/<reason>` and `data/captions_truncated`, summed over all ranks.

        Every rank reduces the same fixed-length vector each step (one small collective),
        so the totals are the run's, not rank 0's share.
        """
        totals = self.trainer.strategy.reduce(self.data_counts.clone(), reduce_op="sum")
        for name, total in zip(DATA_COUNTERS, totals.tolist()):
            self.log(f"data/{name}", float(total), on_step=True, on_epoch=False, rank_zero_only=True)
        self.data_totals = totals

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["data_counts"] = dict(zip(DATA_COUNTERS, self.data_totals.tolist()))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The saved totals are the whole run's; rank 0 carries them on so sums stay right.
        saved = checkpoint.get("data_counts", {})
        counts = torch.zeros(len(DATA_COUNTERS), dtype=torch.float64)
        if self.global_rank == 0:
            counts = torch.tensor([float(saved.get(name, 0)) for name in DATA_COUNTERS], dtype=torch.float64)
        self.data_counts = counts.to(self.data_counts.device)

    # ----------------------------------------------------------------- sampling
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generate one video per batch entry; returns uint8 B x F x H x W x 3 frames."""
        cfg = self.sampling
        features = encode_batch_features(
            self.encoders, batch, video_size=(cfg.height, cfg.width), device=self.device
        )
        batch_size = features[keys.FACE_LATENT].shape[0]
        uncond = self.unconditional(cfg.negative_prompt)
        num_latent_frames = num_latent_frames_for(
            cfg.num_frames, self.encoders.vae.config.temporal_compression_ratio
        )
        generator = step_generator(self.hparams.seed, batch_idx, self.global_rank, "predict")
        latents = sample_latents(
            self.transformer,
            self.sampling_scheduler,
            features[keys.FACE_LATENT],
            cond=Conditions(features[keys.TEXT_EMBEDS], features[keys.SIGLIP_TOKENS], features[keys.ARCFACE]),
            uncond=Conditions(
                *(uncond[k].expand(batch_size, *uncond[k].shape[1:])
                  for k in (keys.TEXT_EMBEDS, keys.SIGLIP_TOKENS, keys.ARCFACE))
            ),
            num_latent_frames=num_latent_frames,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            use_dynamic_cfg=cfg.use_dynamic_cfg,
            generator=generator,
            show_progress=cfg.show_progress,
        )
        video = self.encoders.decode_latents(latents)  # B x 3 x F x H x W in [-1, 1]
        frames = ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return {
            "frames": frames.permute(0, 2, 3, 4, 1).cpu(),
            keys.SAMPLE_ID: list(batch.get(keys.SAMPLE_ID, [f"{batch_idx}_{i}" for i in range(batch_size)])),
            keys.CAPTION: list(batch.get(keys.CAPTION, [""] * batch_size)),
            "fps": cfg.fps,
        }

    def _build_sampling_scheduler(self):
        """The folder's scheduler, or `sampling.scheduler` built from the folder's config."""
        if self.sampling.scheduler is None:
            return self.scheduler
        import diffusers

        scheduler_class = getattr(diffusers, self.sampling.scheduler, None)
        if scheduler_class is None:
            raise ValueError(
                f"sampling.scheduler={self.sampling.scheduler!r} is not a diffusers scheduler class; "
                "use e.g. CogVideoXDDIMScheduler or CogVideoXDPMScheduler, or null for the folder's"
            )
        return scheduler_class.from_config(self.scheduler.config)
