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


class InsightFaceArcFace(IdentityEncoder):
    """The release's recogniser: insightface antelopev2 `glintr100.onnx`, raw 512-d embeddings.

    It has no torch parameters; the ONNX session is opened on first use and left out of the
    pickled/deep-copied state, so LightningCLI and DataLoader workers can copy the module freely.
    """

    embedding_dim = 512

    def __init__(self, model_root: str, device: str = "cpu"):
        super().__init__()
        from pathlib import Path

        self.model_root = str(model_root)
        self.onnx_device = str(device)
        self.model_path = Path(self.model_root) / "models" / "antelopev2" / "glintr100.onnx"
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"insightface glintr100 recogniser not found: {self.model_path}. It must be at "
                f"models/antelopev2/glintr100.onnx under the face model folder {self.model_root} (the release's "
                f"face_encoder/). Fix: copy the release's face_encoder/ folder there."
            )
        # Zero-size buffer: follows .to(device), so `device` works without parameters.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self._recogniser = None

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    @property
    def recogniser(self):
        if self._recogniser is None:
            import onnxruntime
            from insightface.model_zoo import model_zoo

            use_cuda = (
                self.onnx_device.startswith("cuda")
                and torch.cuda.is_available()
                and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
            )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
            recogniser = model_zoo.get_model(str(self.model_path), providers=providers)
            if recogniser is None or getattr(recogniser, "taskname", None) != "recognition":
                raise RuntimeError(f"{self.model_path} is not an insightface recognition model")
            recogniser.prepare(ctx_id=0 if use_cuda else -1)
            self._recogniser = recogniser
        return self._recogniser

    def __getstate__(self):
        # Used by pickle and copy.deepcopy alike: the session is reopened lazily on the copy.
        state = dict(self.__dict__)
        state["_recogniser"] = None
        return state

    @torch.no_grad()
    def forward(self, face_image: torch.Tensor) -> torch.Tensor:
        recogniser = self.recogniser
        size = recogniser.input_size[0]
        faces = face_image.detach().to(device="cpu", dtype=torch.float32)
        if faces.shape[-2:] != (size, size):
            faces = F.interpolate(faces, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        # get_feat wants BGR images on the 0..255 scale (it swaps to RGB itself).
        pixels = (faces.clamp(0, 1) * 255).permute(0, 2, 3, 1).flip(-1).contiguous().numpy()
        embeddings = recogniser.get_feat(list(pixels))
        return torch.from_numpy(embeddings.astype("float32")).to(face_image.device)
