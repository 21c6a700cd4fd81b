"""Tiny stand-ins for the release's face models (`face_encoder/`), for tests and the demo.

The real antelopev2 and facexlib weights are hundreds of megabytes and come from model hubs;
these files have the same layout, names and interfaces, so insightface and facexlib load and
run them through their ordinary code paths, but they are written here from a seed.

- `scrfd_10g_bnkps.onnx` is a hand-built detector: a face is a bright square on a dark
  background. At stride s, an anchor scores (mean brightness of the 5x5 cells around it) minus
  (mean brightness of the ring of cells out to 9x9), so a square of side 5*s centred on an
  anchor of stride s gives score ~1 there and nothing else passes 0.5. Its box is that square
  and its 5 keypoints sit where the ArcFace template puts eyes, nose and mouth in it.
- `glintr100.onnx` average-pools the 112x112 crop to an 8x8 grid and multiplies by a fixed
  random matrix: different crops, different 512-d embeddings.
- `detection_Resnet50_Final.pth`: facexlib's RetinaFace (resnet50) with random weights, but
  class heads with zero weights, so its answer does not depend on the random backbone.
  `fallback_finds_faces=False` (default): it never finds a face. True: every stride-32 anchor
  of size 256 is a face (score 1) whose box is the anchor and whose landmarks follow the
  ArcFace template, so after NMS the face nearest the centre is a known anchor box.
- `parsing_bisenet.pth`: facexlib's BiSeNet (19 classes) with random weights, its last layer
  centred so that labels vary across a face instead of one class winning everywhere.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from datamodules.face_pipeline import (  # the file names the real loaders look for
    ANTELOPE_SUBDIR,
    DETECTOR_FILE,
    PARSING_FILE,
    RECOGNISER_FILE,
    RETINAFACE_FILE,
)

# insightface's ArcFace 112x112 template (eyes, nose, mouth corners), as fractions of the crop.
_ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
KEYPOINT_FRACTIONS = _ARCFACE_TEMPLATE_112 / 112.0 - 0.5  # offsets from the box centre, in box sides

DETECTOR_STRIDES = (8, 16, 32)
DETECTOR_INNER_CELLS = 5  # a face is a bright square of side 5 * stride
DETECTOR_OUTER_CELLS = 9
_ONNX_OPSET = 17


def _float_const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name=name)


def _int_const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name=name)


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = 8  # readable by older onnxruntime builds too
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def build_tiny_detector() -> onnx.ModelProto:
    """The SCRFD signature insightface expects: 9 unbatched outputs (scores, boxes, keypoints) x 3 strides."""
    nodes, inits = [], []
    inits += [
        _float_const("half", 0.5),
        _float_const("zero", 0.0),
        _float_const("one", 1.0),
        _int_const("rows_1", [-1, 1]),
        _int_const("rows_2", [-1, 2]),
    ]
    # Input is (pixel - 127.5) / 128; brightness in [0, 1] is (mean over channels + 1) / 2.
    nodes += [
        helper.make_node("ReduceMean", ["input.1"], ["gray"], name="gray", axes=[1], keepdims=1),
        helper.make_node("Add", ["gray", "one"], ["gray_shift"], name="gray_shift"),
        helper.make_node("Mul", ["gray_shift", "half"], ["brightness"], name="brightness"),
    ]
    score_names, box_names, kps_names = [], [], []
    inner, outer = DETECTOR_INNER_CELLS, DETECTOR_OUTER_CELLS
    box_distance = np.full((1, 4), inner / 2, dtype=np.float32)  # in strides, as SCRFD decodes
    kps_distance = (KEYPOINT_FRACTIONS * inner).reshape(1, 10)
    for s in DETECTOR_STRIDES:
        p = f"s{s}_"
        inits += [
            _float_const(p + "box", box_distance),
            _float_const(p + "kps", kps_distance),
            _float_const(p + "outer_w", outer * outer / (outer * outer - inner * inner)),
            _float_const(p + "inner_w", inner * inner / (outer * outer - inner * inner)),
        ]
        # Cell means centred on anchor points (anchors sit at multiples of the stride).
        nodes.append(
            helper.make_node(
                "AveragePool", ["brightness"], [p + "cells"], name=p + "cells",
                kernel_shape=[s, s], strides=[s, s], pads=[s // 2, s // 2, 0, 0],
            )
        )
        for cells, out in ((inner, "inner"), (outer, "outer")):
            nodes.append(
                helper.make_node(
                    "AveragePool", [p + "cells"], [p + out], name=p + out,
                    kernel_shape=[cells, cells], strides=[1, 1], pads=[cells // 2] * 4, count_include_pad=1,
                )
            )
        # ring mean = (81 * outer - 25 * inner) / 56; score = inner - ring, clipped to [0, 1].
        nodes += [
            helper.make_node("Mul", [p + "outer", p + "outer_w"], [p + "outer_sum"], name=p + "outer_sum"),
            helper.make_node("Mul", [p + "inner", p + "inner_w"], [p + "inner_sum"], name=p + "inner_sum"),
            helper.make_node("Sub", [p + "outer_sum", p + "inner_sum"], [p + "ring"], name=p + "ring"),
            helper.make_node("Sub", [p + "inner", p + "ring"], [p + "contrast"], name=p + "contrast"),
            helper.make_node("Clip", [p + "contrast", "zero", "one"], [p + "map"], name=p + "map"),
            # 1x1xhxw -> (h*w, 1); the second anchor of each location scores 0.
            helper.make_node("Reshape", [p + "map", "rows_1"], [p + "col"], name=p + "col"),
            helper.make_node("Mul", [p + "col", "zero"], [p + "zeros"], name=p + "zeros"),
            helper.make_node("Concat", [p + "col", p + "zeros"], [p + "pair"], name=p + "pair", axis=1),
            helper.make_node("Reshape", [p + "pair", "rows_1"], [f"score_{s}"], name=p + "score"),
            helper.make_node("Mul", [f"score_{s}", "zero"], [p + "row_zero"], name=p + "row_zero"),
            helper.make_node("Add", [p + "row_zero", p + "box"], [f"bbox_{s}"], name=p + "bbox"),
            helper.make_node("Add", [p + "row_zero", p + "kps"], [f"kps_{s}"], name=p + "kps_out"),
        ]
        score_names.append(f"score_{s}")
        box_names.append(f"bbox_{s}")
        kps_names.append(f"kps_{s}")
    # Each stride has its own row count, so each needs its own symbolic dimension.
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"rows_{stride}", width])
        for names, width in ((score_names, 1), (box_names, 4), (kps_names, 10))
        for name, stride in zip(names, DETECTOR_STRIDES)
    ]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    graph = helper.make_graph(nodes, "tiny_scrfd", [image], outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET)])


def build_tiny_recogniser(seed: int = 0, grid: int = 8, embedding_dim: int = 512) -> onnx.ModelProto:
    """112x112 crop -> 8x8x3 average grid -> fixed random projection to 512 (raw, not normed)."""
    rng = np.random.default_rng(seed)
    features = 3 * grid * grid
    projection = rng.standard_normal((features, embedding_dim)).astype(np.float32) * (4.0 / np.sqrt(features))
    cell = 112 // grid
    # Node names must not start with "Sub"/"Mul": insightface would then take it for an mxnet model.
    nodes = [
        helper.make_node(
            "AveragePool", ["input.1"], ["grid"], name="pool", kernel_shape=[cell, cell], strides=[cell, cell]
        ),
        helper.make_node("Flatten", ["grid"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["embedding"], name="project"),
    ]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 112, 112])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_dim])
    weights = [_float_const("projection", projection)]
    graph = helper.make_graph(nodes, "tiny_glintr100", [image], [out], initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET)])


def _retinaface_state(seed: int, finds_faces: bool) -> dict:
    from facexlib.detection.retinaface import RetinaFace

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.manual_seed(seed)
        model = RetinaFace(network_name="resnet50", half=False, device="cpu")
    variance = model.cfg["variance"][0]
    with torch.no_grad():
        for level, (class_head, box_head, landmark_head) in enumerate(
            zip(model.ClassHead, model.BboxHead, model.LandmarkHead)
        ):
            for head in (class_head, box_head, landmark_head):
                head.conv1x1.weight.zero_()
                head.conv1x1.bias.zero_()
            # channels per anchor: (background, face); anchor 0 is the smaller prior size.
            class_bias = torch.tensor([10.0, -10.0, 10.0, -10.0])
            if finds_faces and level == len(model.ClassHead) - 1:
                class_bias[:2] = torch.tensor([-10.0, 10.0])
            class_head.conv1x1.bias.copy_(class_bias)
            landmark_offsets = torch.from_numpy(KEYPOINT_FRACTIONS.reshape(-1)) / variance
            landmark_head.conv1x1.bias.copy_(landmark_offsets.repeat(2))
    # half precision halves the file; load_state_dict copies into the float32 parameters.
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _bisenet_state(seed: int) -> dict:
    from facexlib.parsing.bisenet import BiSeNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BiSeNet(num_class=19)
        model.eval()
        # Random ReLU features share a large mean, which would make one class win everywhere;
        # removing each class row's component along the mean feature lets labels vary with the image.
        head = model.conv_out.conv_out
        captured = []
        hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        with torch.no_grad():
            model(torch.rand(1, 3, 128, 128) * 2 - 1)
            hook.remove()
            mean_feature = captured[0].mean(dim=(0, 2, 3))
            unit = mean_feature / mean_feature.norm()
            weight = head.weight[:, :, 0, 0]
            weight -= (weight @ unit)[:, None] * unit[None, :]
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def write_tiny_face_models(
    root,
    with_parsing: bool = True,
    with_fallback: bool = True,
    seed: int = 0,
    fallback_finds_faces: bool = False,
) -> Path:
    """Write the tiny face models under `root` in the release's `face_encoder/` layout; returns root."""
    root = Path(root)
    antelope = root / ANTELOPE_SUBDIR
    antelope.mkdir(parents=True, exist_ok=True)
    _save(build_tiny_detector(), antelope / DETECTOR_FILE)
    _save(build_tiny_recogniser(seed), antelope / RECOGNISER_FILE)
    if with_fallback:
        torch.save(_retinaface_state(seed, fallback_finds_faces), root / RETINAFACE_FILE)
    if with_parsing:
        torch.save(_bisenet_state(seed + 1), root / PARSING_FILE)
    return root


def write_tiny_face_photo(path, seed: int = 0, size: tuple[int, int] = (320, 256), face: bool = True) -> Path:
    """A width x height photo in which the tiny detector finds one face: a bright textured
    square of side 80 centred at (160, 112) on a dark ground (160 at (320, 224) in the
    detector's 640 input: a stride-32 anchor). `face=False`: the dark ground alone."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 40, (size[1], size[0], 3), dtype=np.uint8)
    if face:
        cx, cy, half = 160, 112, 40
        photo[cy - half:cy + half, cx - half:cx + half] = rng.integers(200, 256, (2 * half, 2 * half, 3), dtype=np.uint8)
    path = Path(path)
    Image.fromarray(photo).save(path)
    return path
