"""Reproducer: torchvision decode_image segfaults on a PNG whose IDAT stream is corrupt but whose chunk CRCs are valid.

Run: python torchvision_png_segfault.py   (exit status 139 = SIGSEGV; a fixed torchvision prints RuntimeError)
"""

import io
import struct
import zlib

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
    buf, format="PNG"
)
png = buf.getvalue()
out, i = bytearray(png[:8]), 8
while i < len(png):
    n, kind = struct.unpack(">I4s", png[i : i + 8])
    data = png[i + 8 : i + 8 + n]
    if kind == b"IDAT":
        data = bytes(b ^ 0x5A for b in data)
    out += struct.pack(">I4s", n, kind) + data + struct.pack(">I", zlib.crc32(kind + data))
    i += 12 + n
print("torch", torch.__version__, "torchvision", torchvision.__version__, flush=True)
try:
    decode_image(torch.frombuffer(bytearray(out), dtype=torch.uint8), mode=ImageReadMode.RGB)
    print("decoded")
except RuntimeError as e:
    print("RuntimeError", e)
