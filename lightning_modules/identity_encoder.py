"""Identity encoders: an aligned face crop in, an identity embedding out."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class IdentityEncoder(nn.Module):
    """The interface every face recogniser of this kit implements.

    `forward` takes aligned square face crops, B x 3 x S x S float in [0, 1], and returns
    B x `embedding_dim` raw (un-normalised) identity embeddings: the release feeds ArcFace's
    raw `embedding`, not its unit-norm version. Each implementation resizes the crop to its
    own input size. A later data issue puts insightface's ArcFace (antelopev2) behind this
    same interface; the tiny random recogniser below stands in for it in tests and the demo.
    """

    embedding_dim: int

    def forward(self, face_image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TinyRandomRecognizer(IdentityEncoder):
    """A tiny random conv net (about ten thousand parameters) that maps faces to embeddings.

    Its weights come from a private `torch.Generator(seed)`, so one seed always gives the
    same weights whatever the global RNG state, and building it leaves the global RNG alone.
    """

    def __init__(self, embedding_dim: int = 512, input_size: int = 32, seed: int = 0):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.input_size = input_size
        # skip_init builds the layers without the default (global-RNG) initialisation.
        self.features = nn.Sequential(
            nn.utils.skip_init(nn.Conv2d, 3, 8, kernel_size=3, stride=2, padding=1),
            nn.SiLU(),
            nn.utils.skip_init(nn.Conv2d, 8, 16, kernel_size=3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.utils.skip_init(nn.Linear, 16, embedding_dim)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith("bias"):
                    parameter.zero_()
                else:
                    fan_in = parameter[0].numel()
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))

    def forward(self, face_image: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight
        face_image = face_image.to(device=weight.device, dtype=weight.dtype)
        face_image = F.interpolate(
            face_image, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
        )
        # ArcFace-style input normalisation: [0, 1] -> [-1, 1].
        return self.head(self.features(face_image * 2 - 1))
