"""GGUF reader: header, metadata, tensor infos, memory-mapped tensor data.

Written for hostile input. Every count, length and offset read from the header is checked against
the bytes that remain in the file *before* anything is allocated from it, and every error is a
GGUFError naming the file, the field and the byte offset. Layout (ggml docs/gguf.md, v2/v3):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv    x (key: str, type u32, value)
    n_tensors x (name: str, n_dims u32, dims u64[n_dims] (ne0 first), type u32, offset u64)
    pad to alignment | tensor data (each at data_start + offset)

A string is u64 length + UTF-8 bytes. Dims are ne0-first, so a numpy shape is the reverse.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .. import quant

MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_NAME = 1 << 16          # gguf allows 64 bytes; be generous but bounded
MAX_ARRAY_NESTING = 4

# value type id -> (name, struct code, size)
_SCALARS = {0: ("u8", "<B", 1), 1: ("i8", "<b", 1), 2: ("u16", "<H", 2), 3: ("i16", "<h", 2),
            4: ("u32", "<I", 4), 5: ("i32", "<i", 4), 6: ("f32", "<f", 4), 7: ("bool", "<?", 1),
            10: ("u64", "<Q", 8), 11: ("i64", "<q", 8), 12: ("f64", "<d", 8)}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
       6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
T_STRING, T_ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file is malformed or unsupported. The message names the file, field and offset."""


@dataclass
class TensorInfo:
    name: str
    qtype: quant.QType
    shape: tuple[int, ...]        # numpy order: last dim contiguous (reverse of GGUF dims)
    offset: int                   # absolute byte offset in the file
    nbytes: int
    data: np.ndarray | None = field(default=None, repr=False)   # uint8 memmap view [rows, row_bytes]


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    alignment: int
    data_start: int
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Reader:
    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte offset {self.pos if at is None else at})")

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated file: {what} needs {n} bytes, only {self.size - self.pos} remain")

    def scalar(self, t: int, what: str):
        _, code, size = _SCALARS[t]
        self.need(size, what)
        v = struct.unpack_from(code, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what):
        return self.scalar(4, what)

    def u64(self, what):
        return self.scalar(10, what)

    def string(self, what: str, limit: int | None = None) -> str:
        start = self.pos
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            raise self.fail(f"{what}: string length {n} exceeds the limit of {limit}", start)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what}: invalid UTF-8 ({e.reason})", start) from None

    def value(self, t: int, what: str, depth: int = 0):
        if t in _SCALARS:
            return self.scalar(t, what)
        if t == T_STRING:
            return self.string(what)
        if t == T_ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}")
            at = self.pos
            et = self.u32(f"{what} element type")
            n = self.u64(f"{what} element count")
            if et in _SCALARS:
                size = _SCALARS[et][2]
                if n > (self.size - self.pos) // size:
                    raise self.fail(f"{what}: array of {n} {_SCALARS[et][0]} elements runs past the end of the file", at)
                arr = np.frombuffer(self.buf, dtype=_NP[et], count=n, offset=self.pos).copy()
                self.pos += n * size
                return arr
            if et == T_STRING:
                # each string needs at least its 8-byte length: bounds n before the list grows
                if n > (self.size - self.pos) // 8:
                    raise self.fail(f"{what}: array of {n} strings cannot fit in the rest of the file", at)
                return [self.string(f"{what}[{i}]") for i in range(n)]
            if et == T_ARRAY:
                if n > (self.size - self.pos) // 12:
                    raise self.fail(f"{what}: array of {n} arrays cannot fit in the rest of the file", at)
                return [self.value(T_ARRAY, f"{what}[{i}]", depth + 1) for i in range(n)]
            raise self.fail(f"{what}: unknown array element type {et}", at)
        raise self.fail(f"{what}: unknown value type {t}", self.pos - 4)


def read_gguf(path: str | os.PathLike, mmap_data: bool = True) -> GGUFFile:
    """Parse a GGUF file. Tensor data are uint8 views into a read-only memory map."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file: only {size} bytes (a header needs 24)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = _Reader(memoryview(buf), path)
    r.need(4, "magic")
    if bytes(buf[:4]) != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file: magic is {bytes(buf[:4])!r}, expected b'GGUF' (at byte offset 0)")
    r.pos = 4
    version = r.u32("version")
    if version not in (2, 3):
        hint = ""
        if struct.unpack("<I", struct.pack(">I", version))[0] in (1, 2, 3):
            hint = " — this looks like a big-endian GGUF, which plainlm does not read"
        elif version == 1:
            hint = " — GGUF v1 used 32-bit counts; re-convert the model"
        raise r.fail(f"unsupported GGUF version {version} (plainlm reads 2 and 3){hint}", 4)
    n_tensors = r.u64("tensor_count")
    n_kv = r.u64("kv_count")
    # every kv needs >= 8 (key len) + 4 (type) + 1 bytes; every tensor info >= 8 + 4 + 8 + 4 + 8
    if n_kv > (size - r.pos) // 13:
        raise r.fail(f"kv_count {n_kv} cannot fit in a {size}-byte file", 16)
    if n_tensors > (size - r.pos) // 32:
        raise r.fail(f"tensor_count {n_tensors} cannot fit in a {size}-byte file", 8)

    meta: dict = {}
    for i in range(n_kv):
        at = r.pos
        key = r.string(f"metadata key #{i}", MAX_NAME)
        t = r.u32(f"type of '{key}'")
        if t not in _SCALARS and t not in (T_STRING, T_ARRAY):
            raise r.fail(f"metadata '{key}': unknown value type {t}", r.pos - 4)
        if key in meta:
            raise r.fail(f"duplicate metadata key '{key}'", at)
        meta[key] = r.value(t, f"metadata '{key}'")

    alignment = meta.get("general.alignment", 32)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
            or alignment & (alignment - 1) or alignment > 1 << 20):
        raise GGUFError(f"{path}: general.alignment = {alignment!r} is not a power of two <= 1 MiB "
                        f"(metadata ends at byte offset {r.pos})")

    infos = []
    for i in range(n_tensors):
        at = r.pos
        name = r.string(f"tensor #{i} name", MAX_NAME)
        nd = r.u32(f"tensor '{name}' n_dims")
        if not 1 <= nd <= MAX_DIMS:
            raise r.fail(f"tensor '{name}': n_dims = {nd}, must be 1..{MAX_DIMS}", r.pos - 4)
        dims = [r.u64(f"tensor '{name}' dim {j}") for j in range(nd)]
        tid = r.u32(f"tensor '{name}' type")
        off = r.u64(f"tensor '{name}' offset")
        infos.append((at, name, dims, tid, off))
    data_start = -(-r.pos // alignment) * alignment

    arch = str(meta.get("general.architecture", ""))
    tensors: dict[str, TensorInfo] = {}
    for at, name, dims, tid, off in infos:
        if name in tensors:
            raise GGUFError(f"{path}: duplicate tensor name '{name}' (tensor info at byte offset {at})")
        qt = quant.QTYPES.get(tid)
        if tid == 36 and arch.startswith("bitnet-b1.58"):
            from ..quant.ternary import I2_S        # bitnet.cpp's id 36 (formats.md §2.2)
            qt = I2_S
        if qt is None or (tid in (34, 35) and arch.startswith("bitnet-b1.58")):
            known = None if 34 <= tid <= 39 else quant.KNOWN_UNSUPPORTED.get(tid)
            extra = ""
            if 34 <= tid <= 39:
                fork = {36: "I2_S", 37: "I8_S", 38: "TL1", 39: "TL2"}.get(tid)
                upstream = {34: "TQ1_0", 35: "TQ2_0", 36: "IQ4_NL_4_4 (retired)", 37: "IQ4_NL_4_8 (retired)",
                            38: "IQ4_NL_8_8 (retired)", 39: "MXFP4"}[tid]
                if not arch.startswith("bitnet-b1.58"):
                    meaning = f"upstream ggml's {upstream}"
                elif fork:
                    meaning = f"bitnet.cpp's {fork}"
                else:
                    meaning = f"ambiguous (upstream {upstream}; not a bitnet.cpp type)"
                extra = (f"; type ids 34-39 clash between upstream ggml (34 TQ1_0, 35 TQ2_0, 36-38 retired "
                         f"IQ4_NL_x_x, 39 MXFP4) and bitnet.cpp (36 I2_S, 37 I8_S, 38 TL1, 39 TL2): with "
                         f"general.architecture = '{arch}' id {tid} is read as {meaning}")
            raise GGUFError(f"{path}: tensor '{name}' has unsupported type id {tid}"
                            f"{' (' + known + ')' if known else ''}{extra} (tensor info at byte offset {at})")
        if any(d == 0 for d in dims) or any(d >= 1 << 63 for d in dims):
            raise GGUFError(f"{path}: tensor '{name}': absurd dims {dims} (tensor info at byte offset {at})")
        n = 1
        for d in dims:
            n *= d
        if n >= 1 << 63:      # ggml counts elements in int64 (gguf.cpp rejects the same overflow)
            raise GGUFError(f"{path}: tensor '{name}': dims {dims} multiply to {n} elements, which "
                            f"overflows int64 (tensor info at byte offset {at})")
        if dims[0] % qt.block:
            raise GGUFError(f"{path}: tensor '{name}': ne0 = {dims[0]} is not a multiple of the "
                            f"{qt.name} block size {qt.block} (tensor info at byte offset {at})")
        nbytes = n // qt.block * qt.bytes
        if qt.name == "I2_S":
            nbytes += 32                            # I2_S: codes, then one fp32 scale in a 32-byte tail
        if off % alignment:
            raise GGUFError(f"{path}: tensor '{name}': offset {off} is not a multiple of the alignment "
                            f"{alignment} (tensor info at byte offset {at})")
        start = data_start + off
        if start + nbytes > size:
            raise GGUFError(f"{path}: tensor '{name}': data [{start}, {start + nbytes}) lies beyond the "
                            f"end of the file ({size} bytes) — truncated file? (tensor info at byte offset {at})")
        shape = tuple(int(d) for d in reversed(dims))
        data = None
        if mmap_data:
            rows = n // dims[0]
            data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
            if qt.name != "I2_S":                   # I2_S stays flat: its scale tail is not a row
                data = data.reshape(rows, -1)
        tensors[name] = TensorInfo(name, qt, shape, start, nbytes, data)
    if mmap_data and hasattr(mmap, "MADV_DONTNEED") and data_start >= mmap.PAGESIZE:
        # the header now lives in Python objects: drop its mapped pages from the resident set (a
        # large vocabulary + merges are several MB); whole pages only, the tensor data stay mapped
        buf.madvise(mmap.MADV_DONTNEED, 0, data_start // mmap.PAGESIZE * mmap.PAGESIZE)
    return GGUFFile(path, version, meta, tensors, alignment, data_start, size)


def tensor_table(g: GGUFFile) -> list[dict]:
    return [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes}
            for t in g.tensors.values()]
