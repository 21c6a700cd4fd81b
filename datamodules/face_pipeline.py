"""Reference-photo preprocessing as released: photo -> largest face -> aligned, parsed crop + ArcFace embedding.

Each step follows docs/echovideo-facts.md, "Face preprocessing as released", so that a model
trained or sampled with this kit sees faces framed exactly as the release's were:
EXIF-upright 8-bit RGB photo; a long side over 1024 brought to 1024 with truncated sizes and
OpenCV's Lanczos; insightface antelopev2 (SCRFD + glintr100) on the BGR photo, largest face,
raw embedding and 5 landmarks; facexlib's RetinaFace (face nearest the centre) as fallback
detector, whose embedding is glintr100 on the aligned crop before parsing; a similarity warp
of the landmarks onto the ArcFace 96x112 points scaled per axis to the crop, black border;
BiSeNet on the ImageNet-normalised crop blacks out background, ears, earring, neck, necklace,
cloth and hat. Two choices differ from the release on purpose, where it has a defect: a 16-bit
photo is rescaled to 8 bits (the release clips it to white) and a photo in which no detector
finds a face raises SkippedSample(NO_FACE) with the reason (the release crashes).

`FACE_PIPELINE_VERSION` names this behaviour; feature stores record it, and `fit` refuses a
store whose crops were made by another version.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from datamodules.files import file_sha256
from datamodules.skip_reasons import NO_FACE, UNREADABLE_IMAGE, SkippedSample

ANTELOPE_SUBDIR = Path("models") / "antelopev2"
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNISER_FILE = "glintr100.onnx"
RETINAFACE_FILE = "detection_Resnet50_Final.pth"
PARSING_FILE = "parsing_bisenet.pth"

# Bumped whenever a change to this module changes the crops or embeddings it makes.
# 2: the release's template, resize, border, parser input and fallback embedding
#    (1 used facexlib's FFHQ restoration template, a gray border and PIL's resize).
FACE_PIPELINE_VERSION = 2

# insightface's ArcFace 5 points (eyes, nose tip, mouth corners) of a 96 wide x 112 high crop;
# the release scales them per axis to its square crop (x * 512/96, y * 512/112).
ARCFACE_POINTS_96X112 = np.array(
    [
        [30.2946, 51.6963],
        [65.5318, 51.5014],
        [48.0252, 71.7366],
        [33.5493, 92.3655],
        [62.7299, 92.2041],
    ]
)
WARP_BORDER = (0, 0, 0)  # the release warps with a black constant border
PHOTO_MAX_SIDE = 1024
# BiSeNet's input normalisation in the release: ImageNet mean and std on RGB in [0, 1].
PARSING_MEAN = (0.485, 0.456, 0.406)
PARSING_STD = (0.229, 0.224, 0.225)
# BiSeNet labels blacked out: background, ears (7, 8), earring, necklace, neck, cloth, hat.
PARSING_DROPPED_LABELS = (0, 7, 8, 9, 14, 15, 16, 18)
PARSING_INPUT_SIZE = 512
# FaceRestoreHelper.get_face_landmarks_5 keeps RetinaFace faces above this confidence.
RETINAFACE_CONFIDENCE = 0.97

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16/32-bit integer and float images are rescaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        else:
            values = values / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def cap_long_side(rgb: np.ndarray, max_side: int = PHOTO_MAX_SIDE) -> np.ndarray:
    """The release's size limit: a long side over `max_side` scaled to it, each side truncated
    (`int(side * k)`, so 1366x768 becomes 1024x575), with OpenCV's Lanczos on the RGB array."""
    height, width = rgb.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return rgb
    scale = max_side / longest
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4)


def read_photo(path, max_side: int | None = PHOTO_MAX_SIDE) -> np.ndarray:
    """A face photo as H x W x 3 uint8 RGB: upright per EXIF, 8-bit, long side at most
    `max_side` (None: as stored). The one reader of face photos in the kit, with or without
    face models. An unreadable file raises SkippedSample(UNREADABLE_IMAGE) naming it."""
    try:
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened)
            rgb = _to_rgb(upright)
            rgb.load()
            pixels = np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise SkippedSample(UNREADABLE_IMAGE, f"cannot read image {path}: {error}") from error
    return pixels if max_side is None else cap_long_side(pixels, max_side)


@dataclass
class FaceCrop:
    """One face: the aligned parsed crop (RGB), the raw ArcFace embedding and where it was found."""

    aligned: np.ndarray  # face_size x face_size x 3 uint8 RGB
    arcface: np.ndarray  # (512,) float32, raw `face.embedding` (not unit-normed)
    landmarks: np.ndarray  # (5, 2) float32, in input-image pixels
    bbox: np.ndarray  # (4,) float32 x1, y1, x2, y2 in input-image pixels
    detector: str  # "insightface" or "retinaface"


@dataclass
class FrameFaces:
    """The faces of one video frame, for the quality measures: the largest face's box, detection
    score and ArcFace embedding, and how many faces are at least `counted_side` of its side."""

    bbox: np.ndarray  # (4,) float32 x1, y1, x2, y2 in frame pixels
    score: float
    count: int
    embedding: np.ndarray  # (512,) float32, raw


def _missing_model_error(path: Path, what: str, model_root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: {path}. It must be at {path.relative_to(model_root)} under the face model folder "
        f"{model_root} (the release's face_encoder/). Fix: copy the release's face_encoder/ folder there "
        f"(or write tiny test models with lightning_modules.tiny_face_models.write_tiny_face_models)."
    )


def _limit_onnx_threads(app, providers: list[str]) -> None:
    """Give insightface's onnxruntime sessions as many threads as torch has in this process.

    onnxruntime starts a pool of one thread per core in every session, which insightface
    offers no way to size; in preprocessing, each worker process runs with one thread (see
    datamodules/preprocess.py), and pools of every core in each worker fought for the cores
    (measured: the tiny preprocess benchmark 8-12 % faster with one thread a session). The sessions
    are made again from the same files with the pool sized; results are the same.
    """
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    for model in app.models.values():
        model.session = onnxruntime.InferenceSession(model.model_file, sess_options=options, providers=providers)


class FaceExtractor:
    """Detect, align and parse the face of a reference photo with the release's face models.

    Construction only checks files, so it is cheap and the object pickles; the models are
    loaded on first `extract` in each process (DataLoader or preprocessing workers).
    """

    def __init__(
        self,
        model_root,
        device: str = "cpu",
        det_size: int = 640,
        face_size: int = 512,
        fallback_detector: bool = True,
    ):
        self.model_root = Path(model_root)
        self.device = str(device)
        self.det_size = int(det_size)
        self.face_size = int(face_size)
        self.fallback_detector = bool(fallback_detector)
        self.detector_path = self.model_root / ANTELOPE_SUBDIR / DETECTOR_FILE
        self.recogniser_path = self.model_root / ANTELOPE_SUBDIR / RECOGNISER_FILE
        self.retinaface_path = self.model_root / RETINAFACE_FILE
        self.parsing_path = self.model_root / PARSING_FILE
        required = [
            (self.detector_path, "insightface SCRFD detector"),
            (self.recogniser_path, "insightface glintr100 recogniser"),
        ]
        if self.fallback_detector:
            required.append(
                (self.retinaface_path, "facexlib RetinaFace fallback detector (or pass fallback_detector=False)")
            )
        for path, what in required:
            if not path.is_file():
                raise _missing_model_error(path, what, self.model_root)
        self.parsing_enabled = self.parsing_path.is_file()
        if not self.parsing_enabled:
            warnings.warn(
                f"face parsing is off: {self.parsing_path} is missing, so aligned faces keep their background",
                stacklevel=2,
            )
        # Scaled in float64, then float32 for OpenCV: the last bits decide some pixels of the warp.
        scale = np.array([self.face_size / 96.0, self.face_size / 112.0])
        self.template = (ARCFACE_POINTS_96X112.astype(np.float64) * scale).astype(np.float32)
        self._versions: dict | None = None
        self._app = self._retinaface = self._parser = None  # loaded per process, on first use

    def __getstate__(self):
        return {**self.__dict__, "_app": None, "_retinaface": None, "_parser": None}

    @property
    def _use_cuda(self) -> bool:
        import torch

        return self.device.startswith("cuda") and torch.cuda.is_available()

    @property
    def torch_device(self) -> str:
        return self.device if self._use_cuda else "cpu"

    def _load_models(self) -> None:
        if self._app is not None:
            return
        import onnxruntime
        from insightface.app import FaceAnalysis

        use_cuda_onnx = self._use_cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda_onnx else ["CPUExecutionProvider"]
        # The release's antelopev2 folder also holds landmark and gender/age models; the kit
        # needs only detection and recognition, so the others are never loaded or run.
        app = FaceAnalysis(name="antelopev2", root=str(self.model_root), providers=providers,
                           allowed_modules=["detection", "recognition"])
        _limit_onnx_threads(app, providers)
        app.prepare(ctx_id=0 if use_cuda_onnx else -1, det_size=(self.det_size, self.det_size))
        if "recognition" not in app.models:
            raise RuntimeError(f"{self.recogniser_path} was not recognised by insightface as a face recogniser")
        if self.fallback_detector:
            # The file was checked at construction, so facexlib finds it and never downloads.
            from facexlib.detection import init_detection_model

            with warnings.catch_warnings():  # facexlib builds torchvision's resnet50 the deprecated way
                warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
                self._retinaface = init_detection_model(
                    "retinaface_resnet50", half=False, device=self.torch_device, model_rootpath=str(self.model_root)
                )
        if self.parsing_enabled:
            from facexlib.parsing import init_parsing_model

            self._parser = init_parsing_model("bisenet", device=self.torch_device, model_rootpath=str(self.model_root))
        self._app = app

    @property
    def recogniser(self):
        self._load_models()
        return self._app.models["recognition"]

    def versions(self) -> dict:
        """What makes this extractor's crops: the pipeline version, its settings, and the model
        files' short sha256s. Written into stores, whose `fit` compares them with the experiment's."""
        if self._versions is None:
            used = [self.detector_path, self.recogniser_path]
            if self.fallback_detector:
                used.append(self.retinaface_path)
            if self.parsing_enabled:
                used.append(self.parsing_path)
            self._versions = {path.name: file_sha256(path)[:12] for path in used}
            self._versions["parsing"] = self.parsing_enabled
            self._versions.update(pipeline=FACE_PIPELINE_VERSION, det_size=self.det_size,
                                  fallback_detector=self.fallback_detector)
        return dict(self._versions)

    def _retinaface_centre_face(self, bgr: np.ndarray):
        import torch

        with torch.no_grad():
            detections = self._retinaface.detect_faces(bgr, RETINAFACE_CONFIDENCE)
        if len(detections) == 0:
            return None
        height, width = bgr.shape[:2]
        centres = (detections[:, 0:2] + detections[:, 2:4]) / 2
        nearest = int(np.argmin(np.linalg.norm(centres - np.array([width / 2, height / 2]), axis=1)))
        return detections[nearest, 0:4], detections[nearest, 5:15].reshape(5, 2)

    def parse_labels(self, aligned_rgb: np.ndarray) -> np.ndarray:
        """BiSeNet labels (H x W uint8) of an aligned RGB crop: the release's input, RGB in [0, 1]
        normalised with the ImageNet mean and std, at 512x512; argmax of the first output."""
        import torch

        size = aligned_rgb.shape[:2]
        face = aligned_rgb
        if size != (PARSING_INPUT_SIZE, PARSING_INPUT_SIZE):
            face = cv2.resize(aligned_rgb, (PARSING_INPUT_SIZE, PARSING_INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
        # A channels-last view, as the release's img2tensor makes: the parser's convolutions then
        # round as the release's do, which decides the label of near-tie pixels.
        tensor = torch.from_numpy(np.ascontiguousarray(face)).permute(2, 0, 1).float()[None] / 255.0
        mean = torch.tensor(PARSING_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(PARSING_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = self._parser(((tensor - mean) / std).to(self.torch_device))[0]
        labels = logits.argmax(dim=1).squeeze(0).cpu().numpy().astype(np.uint8)
        if labels.shape != size:
            labels = cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        return labels

    def drop_labels(self, aligned_rgb: np.ndarray) -> np.ndarray:
        """The parsed crop: pixels of PARSING_DROPPED_LABELS set to 0, the others taken to [0, 1]
        in float32 and back by `* 255` with truncation, as the release does (which can lower a
        pixel by one level)."""
        import torch

        dropped = torch.from_numpy(np.isin(self.parse_labels(aligned_rgb), PARSING_DROPPED_LABELS))
        unit = torch.from_numpy(aligned_rgb).float() / 255.0
        kept = torch.where(dropped[..., None], torch.zeros((), dtype=unit.dtype), unit)
        return (kept * 255).to(torch.uint8).numpy()

    def align(self, bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Similarity-warp (LMEDS fit, bilinear, black border) the 5 landmarks onto the release's points."""
        matrix = cv2.estimateAffinePartial2D(
            np.asarray(landmarks, dtype=np.float32), self.template, method=cv2.LMEDS
        )[0]
        if matrix is None:
            raise SkippedSample(NO_FACE, "the 5 face landmarks are degenerate; no alignment exists")
        return cv2.warpAffine(
            bgr, matrix, (self.face_size, self.face_size), borderMode=cv2.BORDER_CONSTANT, borderValue=WARP_BORDER
        )

    def largest_faces(self, frames: list[np.ndarray], counted_side: float = 0.5) -> list[FrameFaces | None]:
        """Per RGB frame (H x W x 3 uint8), its largest face found by insightface's detector
        (None where there is none), with the ArcFace embeddings of every frame's largest face
        computed in one batch. Each embedding is insightface's own (`norm_crop` to 112, then the
        recogniser), as `FaceAnalysis.get` makes it for a photo. No fallback detector: a frame in
        which insightface sees no face counts as one without a face."""
        from insightface.utils import face_align

        self._load_models()
        detector, recogniser = self._app.det_model, self._app.models["recognition"]
        found, crops = [], []
        for rgb in frames:
            bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
            boxes, keypoints = detector.detect(bgr, max_num=0, metric="default")
            if boxes is None or len(boxes) == 0:
                found.append(None)
                continue
            sides = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
            largest = int(np.argmax(sides))
            found.append((boxes[largest], int((sides >= counted_side * sides[largest]).sum())))
            crops.append(face_align.norm_crop(bgr, landmark=keypoints[largest], image_size=112))
        embeddings = iter(np.asarray(recogniser.get_feat(crops), dtype=np.float32).reshape(len(crops), -1)
                          if crops else [])
        return [None if item is None else
                FrameFaces(bbox=np.asarray(item[0][:4], dtype=np.float32), score=float(item[0][4]), count=item[1],
                           embedding=next(embeddings))
                for item in found]

    def extract(self, rgb: np.ndarray) -> FaceCrop:
        """The largest face of an RGB photo (H x W x 3 uint8); SkippedSample(NO_FACE) when there is none.

        The photo is taken as given: photos from `read_photo` already have the release's size limit.
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
        self._load_models()
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        faces = self._app.get(bgr)
        embedding = None
        if faces:
            face = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
            bbox, landmarks, embedding, detector = face.bbox, face.kps, face.embedding, "insightface"
        else:
            found = self._retinaface_centre_face(bgr) if self._retinaface is not None else None
            if found is None:
                detectors = "insightface or RetinaFace" if self._retinaface is not None else "insightface"
                raise SkippedSample(NO_FACE, f"no face found by {detectors} in a {rgb.shape[1]}x{rgb.shape[0]} photo")
            (bbox, landmarks), detector = found, "retinaface"
        aligned_bgr = self.align(bgr, landmarks)
        if embedding is None:
            # The release's fallback: glintr100 on the aligned crop before parsing (get_feat
            # resizes it to 112 itself), not on insightface's own 112 alignment.
            embedding = self._app.models["recognition"].get_feat(aligned_bgr).reshape(-1)
        aligned = np.ascontiguousarray(aligned_bgr[:, :, ::-1])
        if self._parser is not None:
            aligned = self.drop_labels(aligned)
        return FaceCrop(
            aligned=aligned,
            arcface=np.asarray(embedding, dtype=np.float32).reshape(-1),
            landmarks=np.asarray(landmarks, dtype=np.float32).reshape(5, 2),
            bbox=np.asarray(bbox, dtype=np.float32).reshape(4),
            detector=detector,
        )
