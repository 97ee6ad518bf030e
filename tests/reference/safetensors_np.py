"""safetensors read by hand with numpy only (no torch), for the PyTorch and JAX twins.

The format: u64 LE header length N, N bytes of JSON (name -> dtype, shape, data_offsets; an
optional __metadata__ of strings), then the data buffer. Only F32 and I32 are read, as rex writes.
"""

import json
import math
import os
import struct

import numpy as np


class TwinError(Exception):
    """An unreadable or inconsistent input folder (as opposed to a numerical mismatch)."""


DTYPES = {"F32": np.dtype("<f4"), "I32": np.dtype("<i4")}


def read_safetensors(path):
    """Returns ({name: numpy array}, {metadata key: string}) of a safetensors file."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise TwinError(f"read_safetensors: {path}: cannot read ({e.strerror})") from e
    if len(blob) < 8:
        raise TwinError(f"read_safetensors: {name}: {len(blob)} bytes, too short for a header")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if 8 + header_len > len(blob):
        raise TwinError(f"read_safetensors: {name}: header length {header_len} is past the end "
                        f"of the file ({len(blob)} bytes)")
    try:
        header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TwinError(f"read_safetensors: {name}: malformed JSON header ({e})") from e
    if not isinstance(header, dict):
        raise TwinError(f"read_safetensors: {name}: the header is not a JSON object")
    buffer = blob[8 + header_len:]
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise TwinError(f"read_safetensors: {name}: entry '{key}' lacks dtype, shape or "
                            f"data_offsets [begin, end]") from e
        if dtype not in DTYPES:
            raise TwinError(f"read_safetensors: {name}: tensor '{key}' has dtype {dtype}; "
                            f"only F32 and I32 are read")
        count = math.prod(shape)
        if not 0 <= begin <= end <= len(buffer) or end - begin != count * 4:
            raise TwinError(f"read_safetensors: {name}: tensor '{key}' {dtype} {shape} has "
                            f"offsets [{begin}, {end}] outside the {len(buffer)}-byte buffer or "
                            f"not {count * 4} bytes long")
        array = np.frombuffer(buffer, DTYPES[dtype], count, begin)
        tensors[key] = array.reshape(shape).astype(DTYPES[dtype].newbyteorder("="))
    return tensors, metadata
