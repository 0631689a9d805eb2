"""A small pure-Python reader/writer of the safetensors format, for the parity tests (Debian has
no `safetensors` package). Tensors are torch tensors; only the standard library and torch are used.

    save_file({"name": tensor, ...}, path, metadata={"k": "v"})
    tensors, metadata = load_file(path)

The writer lays the file out as the reference implementation does: tensors sorted by dtype
(widest first) then by name, header padded with spaces to a multiple of 8 bytes. The reader checks
the structure (header length, JSON, dtypes, offsets tiling the data section exactly).
"""
import json
import struct

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# The reference's dtype order (save sorts by it, descending, then by name).
_ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def save_file(tensors, path, metadata=None):
    items = []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}")
        items.append((name, t))
    items.sort(key=lambda kv: (-_ORDER.index(_NAMES[kv[1].dtype]), kv[0]))
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, off = [], 0
    for name, t in items:
        # Raw little-endian bytes (every platform torch runs the tests on is little-endian).
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_file(path):
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"{path}: header length {n} beyond the end of the file")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {}) or {}
    data = raw[8 + n:]
    spans, out = [], {}
    for name, info in header.items():
        dt = _DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        shape = info["shape"]
        numel = 1
        for d in shape:
            numel *= d
        if e - b != numel * torch.empty((), dtype=dt).element_size():
            raise ValueError(f"{path}: {name}: offsets do not match dtype and shape")
        spans.append((b, e, name))
        buf = bytearray(data[b:e])
        t = torch.frombuffer(buf, dtype=dt) if numel else torch.empty(0, dtype=dt)
        out[name] = t.reshape(shape).clone()
    pos = 0
    for b, e, name in sorted(spans):
        if b != pos:
            raise ValueError(f"{path}: {name}: offsets leave a gap or overlap")
        pos = e
    if pos != len(data):
        raise ValueError(f"{path}: data section has {len(data) - pos} undescribed bytes")
    return out, metadata
