"""plainlm.formats.gguf: agreement with gguf-py's GGUFReader, and behaviour on hostile files.

Every malformed file must raise GGUFError (never another exception, never hang) with a message that
names the file and the field (and the byte offset where the reader gives one). Layout: formats.md §3.1.
"""
from __future__ import annotations

import os
import shutil
import signal
import struct
import tracemalloc

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as G, GGUFValueType as VT  # noqa: E402

from plainlm import quant as Q  # noqa: E402
from plainlm.config import ConfigError  # noqa: E402
from plainlm.formats import load_gguf, unpermute_qk  # noqa: E402
from plainlm.formats.gguf import GGUFError, read_gguf  # noqa: E402


@pytest.fixture(autouse=True)
def _no_hang():
    """Turn a hang into a failure (no timing assertions otherwise)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def boom(*_):
        raise TimeoutError("test took more than 120 s: the reader hangs")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------
# byte-level builders for hand-made files
# ------------------------------------------------------------------------------------------------

def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key, v):
    return kv(key, 4, struct.pack("<I", v))


def kv_str(key, v):
    return kv(key, 8, gstr(v))


def tinfo(name: str | bytes, dims, ttype: int, offset: int) -> bytes:
    return (gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ttype, offset))


def header(n_tensors: int, n_kv: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


def build(kvs=(), tensors=(), data=b"", *, version=3, n_tensors=None, n_kv=None, alignment=32,
          magic=b"GGUF") -> bytes:
    body = header(len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv,
                  version, magic) + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * ((-len(body)) % alignment) + data


ARCH = kv_str("general.architecture", "llama")
W_DATA = np.arange(16, dtype=np.float32).tobytes()            # tensor 'w': F32 dims {8, 2} = 64 bytes


def good_blob() -> bytes:
    return build([ARCH, kv_u32("x.n", 7)], [tinfo("w", [8, 2], 0, 0)], W_DATA)


def expect_error(tmp_path, blob: bytes, *needles: str, name: str = "bad.gguf") -> str:
    p = tmp_path / name
    p.write_bytes(blob)
    with pytest.raises(GGUFError) as ei:        # any other exception type fails the test
        read_gguf(p)
    msg = str(ei.value)
    assert str(p) in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_builder_baseline(tmp_path):
    p = tmp_path / "good.gguf"
    p.write_bytes(good_blob())
    g = read_gguf(p)
    assert g.metadata == {"general.architecture": "llama", "x.n": 7}
    t = g.tensors["w"]
    assert t.shape == (2, 8) and t.qtype is Q.F32 and t.offset == g.data_start and t.offset % 32 == 0
    np.testing.assert_array_equal(t.data.reshape(-1).view(np.float32), np.arange(16))
    r = gguf.GGUFReader(p)                                          # gguf-py agrees with the builder
    assert r.tensors[0].data_offset == t.offset


# ------------------------------------------------------------------------------------------------
# the real default model against gguf-py
# ------------------------------------------------------------------------------------------------

def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def test_real_model_matches_gguf_reader(model_path):
    ours = read_gguf(model_path)
    ref = gguf.GGUFReader(model_path)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.version == ref.fields["GGUF.version"].contents() == 3
    assert len(ours.metadata) == ref.fields["GGUF.kv_count"].contents() == len(fields)
    assert list(ours.metadata) == list(fields)                          # same keys, same order
    for k, f in fields.items():
        mine, theirs = _plain(ours.metadata[k]), f.contents()
        assert mine == theirs, k
        assert type(mine) is type(theirs) or isinstance(theirs, list), k
    assert ours.alignment == ref.alignment == 32
    assert ours.data_start == ref.data_offset
    assert ours.file_size == os.path.getsize(model_path)
    assert ours.architecture == "llama"
    assert len(ours.tensors) == len(ref.tensors) == ref.fields["GGUF.tensor_count"].contents() == 272
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype.id == int(t.tensor_type) and mine.qtype.name == t.tensor_type.name, t.name
        assert mine.shape == tuple(reversed(t.shape.tolist())), t.name
        assert mine.offset == t.data_offset, t.name
        assert mine.nbytes == t.n_bytes, t.name
        assert np.array_equal(mine.data.reshape(-1), t.data.reshape(-1).view(np.uint8)), t.name
    # decoded values agree too (one tensor of each type)
    seen = set()
    for t in ref.tensors:
        if t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        mine = ours.tensors[t.name]
        rows = mine.data[:16]
        a = Q.dequantize(rows, mine.qtype, (len(rows), mine.shape[-1]) if len(mine.shape) > 1 else (mine.shape[-1],))
        b = gguf.quants.dequantize(t.data[:16] if len(mine.shape) > 1 else t.data, t.tensor_type)
        np.testing.assert_array_equal(a.reshape(-1), b.reshape(-1))


def test_real_model_truncated_at_20_points(model_path, tmp_path):
    size = os.path.getsize(model_path)
    g = read_gguf(model_path)
    cuts = sorted({0, 1, 4, 8, 15, 16, 23, 24, 25, 31, 100, 1000, 10_000, 100_000, 500_000, 1_000_000,
                   g.data_start - 100, g.data_start - 1, g.data_start, g.data_start + 1,
                   size // 2, size - 1}, reverse=True)
    p = tmp_path / "cut.gguf"
    shutil.copyfile(model_path, p)
    for cut in cuts:                          # descending, so one copy serves every cut
        os.truncate(p, cut)
        with pytest.raises(GGUFError) as ei:
            read_gguf(p)
        msg = str(ei.value)
        assert str(p) in msg
        assert any(w in msg for w in ("truncated", "only", "beyond the end", "cannot fit", "runs past")), (cut, msg)


# ------------------------------------------------------------------------------------------------
# small files written with gguf-py's GGUFWriter
# ------------------------------------------------------------------------------------------------

SCALARS = [("t.u8", 200, VT.UINT8), ("t.i8", -100, VT.INT8), ("t.u16", 60000, VT.UINT16),
           ("t.i16", -30000, VT.INT16), ("t.u32", 4_000_000_000, VT.UINT32), ("t.i32", -2_000_000_000, VT.INT32),
           ("t.f32", 1.5, VT.FLOAT32), ("t.bool", True, VT.BOOL), ("t.str", "héllo wörld ✓", VT.STRING),
           ("t.u64", 2**64 - 1, VT.UINT64), ("t.i64", -2**63, VT.INT64), ("t.f64", 0.1, VT.FLOAT64),
           ("t.false", False, VT.BOOL), ("t.empty_str", "", VT.STRING)]
ARRAYS = [("a.u8", [0, 255, 7], VT.UINT8), ("a.i8", [-128, 127], VT.INT8), ("a.u16", [1, 65535], VT.UINT16),
          ("a.i16", [-32768, 5], VT.INT16), ("a.u32", [1, 2, 3], VT.UINT32), ("a.i32", [-1, 0, 1], VT.INT32),
          ("a.f32", [0.5, -2.25], VT.FLOAT32), ("a.bool", [True, False, True], VT.BOOL),
          ("a.u64", [2**64 - 1, 0], VT.UINT64), ("a.i64", [-2**63, 2**63 - 1], VT.INT64),
          ("a.f64", [0.1, 1e300], VT.FLOAT64), ("a.str", ["a", "", "Ġt ✓"], VT.STRING)]
NESTED = [("n.ints", [[1, 2, 3], [4], [5, 6]]), ("n.strs", [["x", "yy"], ["zzz"]]),
          ("n.deep", [[[1, 2], [3]], [[4, 5, 6]]])]


def write_small(path, alignment: int | None = None, nested: bool = True) -> dict:
    """A file with every KV value type, nested arrays and four tensors; returns the tensors."""
    w = gguf.GGUFWriter(str(path), "testarch")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, val, vt in SCALARS:
        w.add_key_value(key, val, vt)
    for key, val, vt in ARRAYS:
        w.add_key_value(key, val, VT.ARRAY, sub_type=vt)
    if nested:
        for key, val in NESTED:
            w.add_key_value(key, val, VT.ARRAY)
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),                 # 60 bytes: padded
        "b.f16": rng.standard_normal((2, 7)).astype(np.float16),
        "c.q8_0": Q.quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q8_0),
        "d.q4_k": rng.integers(0, 256, (3, 144), dtype=np.uint8),
        "e.last": np.arange(32, dtype=np.float32),                               # 128 bytes: ends aligned
    }
    for name, arr in tensors.items():
        raw = {"c.q8_0": G.Q8_0, "d.q4_k": G.Q4_K}.get(name)
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("alignment", [None, 1, 8, 64, 4096])
def test_small_file_all_value_types(tmp_path, alignment):
    p = tmp_path / "small.gguf"
    tensors = write_small(p, alignment)
    g = read_gguf(p)
    align = alignment or 32
    assert g.alignment == align and g.data_start % align == 0
    assert g.architecture == "testarch"
    for key, val, vt in SCALARS:
        got = g.metadata[key]
        assert got == val and type(got) is type(val), key
    assert isinstance(g.metadata["t.f32"], float)
    for key, val, vt in ARRAYS:
        got = g.metadata[key]
        if vt == VT.STRING:
            assert got == val
        else:
            assert isinstance(got, np.ndarray) and got.tolist() == val, key
    for key, val in NESTED:
        got = g.metadata[key]

        def plain(x):
            return [plain(e) for e in x] if isinstance(x, list) else (x.tolist() if isinstance(x, np.ndarray) else x)
        assert plain(got) == val, key
    # tensors: types, numpy shapes (reverse of the GGUF dims), aligned offsets, bytes
    expect = {"a.f32": (Q.F32, (3, 5)), "b.f16": (Q.F16, (2, 7)), "c.q8_0": (Q.Q8_0, (2, 64)),
              "d.q4_k": (Q.Q4_K, (3, 256)), "e.last": (Q.F32, (32,))}
    assert list(g.tensors) == list(expect)
    for name, (qt, shape) in expect.items():
        t = g.tensors[name]
        assert (t.qtype, t.shape) == (qt, shape), name
        assert (t.offset - g.data_start) % align == 0, name
        assert t.data.tobytes() == tensors[name].tobytes(), name
    assert g.tensors["e.last"].offset + 128 == g.file_size or alignment is None or align > 128
    # gguf-py agrees on everything it can represent
    ref = gguf.GGUFReader(p)
    for t in ref.tensors:
        assert g.tensors[t.name].offset == t.data_offset
        assert g.tensors[t.name].nbytes == t.n_bytes
        assert g.tensors[t.name].shape == tuple(reversed(t.shape.tolist()))
    for key, val, vt in SCALARS + ARRAYS:
        theirs = ref.fields[key].contents()
        mine = _plain(g.metadata[key])
        assert mine == theirs, key


def test_small_file_empty_array_at_end(tmp_path):
    """A zero-length array as the very last bytes of the file is fine."""
    blob = header(0, 2) + ARCH + kv("e", 9, struct.pack("<IQ", 4, 0))
    blob += b"\0" * max(0, 24 - len(blob))
    p = tmp_path / "e.gguf"
    p.write_bytes(header(0, 2) + ARCH + kv("e", 9, struct.pack("<IQ", 4, 0)))
    g = read_gguf(p)
    assert g.metadata["e"].tolist() == [] and g.tensors == {}


def test_small_file_truncated_at_every_byte(tmp_path):
    full = tmp_path / "full.gguf"
    write_small(full, 32)
    blob = full.read_bytes()
    g = read_gguf(full)
    assert g.tensors["e.last"].offset + 128 == len(blob)      # no trailing padding: every cut truncates
    p = tmp_path / "cut.gguf"
    for cut in range(len(blob)):
        p.write_bytes(blob[:cut])
        try:
            read_gguf(p)
        except GGUFError as e:
            assert str(p) in str(e)
        else:
            pytest.fail(f"a file cut to {cut} of {len(blob)} bytes was accepted")


# ------------------------------------------------------------------------------------------------
# hostile headers
# ------------------------------------------------------------------------------------------------

def test_not_a_file(tmp_path):
    expect_error(tmp_path, b"", "only 0 bytes")
    with pytest.raises(GGUFError, match="cannot open"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="cannot open"):
        read_gguf(tmp_path)                                   # a directory


@pytest.mark.parametrize("magic", [b"GGML", b"FUGG", b"\0\0\0\0", b"ggu\xff"])
def test_wrong_magic(tmp_path, magic):
    expect_error(tmp_path, magic + good_blob()[4:], "magic", "GGUF", "offset 0")


@pytest.mark.parametrize("version", [0, 1, 4, 99, 2**32 - 1])
def test_bad_version(tmp_path, version):
    msg = expect_error(tmp_path, build([ARCH], version=version), "version", str(version), "offset 4")
    if version == 1:
        assert "v1" in msg


def test_big_endian_version_hint(tmp_path):
    expect_error(tmp_path, b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + ARCH, "big-endian")


def test_version_2_accepted(tmp_path):
    p = tmp_path / "v2.gguf"
    p.write_bytes(build([ARCH], [tinfo("w", [8, 2], 0, 0)], W_DATA, version=2))
    assert read_gguf(p).version == 2


@pytest.mark.parametrize("n", [2**63, 2**64 - 1, 10**9])
def test_absurd_counts(tmp_path, n):
    expect_error(tmp_path, build([ARCH], n_kv=n), "kv_count", str(n), "offset 16")
    expect_error(tmp_path, build([ARCH], n_tensors=n), "tensor_count", str(n), "offset 8")


def test_counts_larger_than_present(tmp_path):
    expect_error(tmp_path, build([ARCH], n_kv=3, alignment=1), "metadata key #1", "truncated")
    expect_error(tmp_path, build([ARCH], [tinfo("w", [8, 2], 0, 0)], n_tensors=2, alignment=1), "tensor #1 name",
                 "truncated")


@pytest.mark.parametrize("n", [2**63, 2**64 - 1, 2**40, 70_000])
def test_absurd_key_length(tmp_path, n):
    blob = header(0, 1) + struct.pack("<Q", n) + b"k" * 100
    expect_error(tmp_path, blob, "metadata key #0", str(n), "offset 24")


def test_absurd_value_string_length(tmp_path):
    blob = header(0, 2) + ARCH + gstr("s") + struct.pack("<IQ", 8, 2**63) + b"x" * 64
    at = len(header(0, 2) + ARCH + gstr("s")) + 4 + 8
    expect_error(tmp_path, blob, "metadata 's'", "truncated", f"offset {at}")


def test_absurd_string_length_in_string_array(tmp_path):
    body = header(0, 2) + ARCH + gstr("toks") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 3)
    body += gstr("ok") + struct.pack("<Q", 2**62) + b"y" * 100
    at = len(header(0, 2) + ARCH + gstr("toks")) + 4 + 12 + len(gstr("ok")) + 8
    expect_error(tmp_path, body, "metadata 'toks'[1]", str(2**62), f"offset {at}")


@pytest.mark.parametrize("etype,label", [(0, "u8"), (12, "f64"), (8, "strings"), (9, "arrays")])
def test_array_count_2_62(tmp_path, etype, label):
    at = len(header(0, 2) + ARCH + gstr("arr")) + 4
    blob = header(0, 2) + ARCH + kv("arr", 9, struct.pack("<IQ", etype, 2**62)) + b"\0" * 64
    expect_error(tmp_path, blob, "metadata 'arr'", str(2**62), label, f"offset {at}")


def test_nested_array_count_2_62(tmp_path):
    inner = struct.pack("<IQ", 0, 2**62)
    blob = header(0, 2) + ARCH + kv("arr", 9, struct.pack("<IQ", 9, 1) + inner) + b"\0" * 64
    expect_error(tmp_path, blob, "metadata 'arr'[0]", str(2**62))


def test_arrays_nested_too_deep(tmp_path):
    v = struct.pack("<IQ", 0, 1) + b"\x05"
    for _ in range(6):
        v = struct.pack("<IQ", 9, 1) + v
    expect_error(tmp_path, header(0, 2) + ARCH + kv("deep", 9, v), "metadata 'deep'", "nested deeper")


@pytest.mark.parametrize("vtype", [13, 99, 2**32 - 1])
def test_unknown_value_type(tmp_path, vtype):
    at = len(header(0, 2) + ARCH + gstr("k"))
    expect_error(tmp_path, header(0, 2) + ARCH + kv("k", vtype, b"\0" * 16), "metadata 'k'",
                 f"unknown value type {vtype}", f"offset {at}")


def test_unknown_array_element_type(tmp_path):
    expect_error(tmp_path, header(0, 2) + ARCH + kv("k", 9, struct.pack("<IQ", 77, 1) + b"\0" * 16),
                 "metadata 'k'", "unknown array element type 77")


def test_invalid_utf8(tmp_path):
    expect_error(tmp_path, header(0, 1) + kv(b"bad\xff\xfekey", 4, b"\0" * 4),
                 "metadata key #0", "invalid UTF-8", "offset 24")
    at = len(header(0, 2) + ARCH + gstr("s")) + 4
    expect_error(tmp_path, header(0, 2) + ARCH + kv("s", 8, gstr(b"\xc3\x28")), "metadata 's'", "invalid UTF-8",
                 f"offset {at}")
    expect_error(tmp_path, build([ARCH], [tinfo(b"w\x80", [8, 2], 0, 0)], W_DATA), "tensor #0 name",
                 "invalid UTF-8")


def test_duplicates(tmp_path):
    expect_error(tmp_path, build([ARCH, kv_u32("x", 1), kv_u32("x", 2)]), "duplicate metadata key 'x'")
    expect_error(tmp_path, build([ARCH], [tinfo("w", [8], 0, 0), tinfo("w", [8], 0, 32)], W_DATA),
                 "duplicate tensor name 'w'")


@pytest.mark.parametrize("val", [0, 3, 48, 1 << 21])
def test_bad_alignment(tmp_path, val):
    expect_error(tmp_path, build([ARCH, kv_u32("general.alignment", val)], [tinfo("w", [8, 2], 0, 0)], W_DATA),
                 "general.alignment", str(val))


def test_alignment_of_wrong_type(tmp_path):
    expect_error(tmp_path, build([ARCH, kv_str("general.alignment", "32")]), "general.alignment")
    expect_error(tmp_path, build([ARCH, kv("general.alignment", 7, b"\x01")]), "general.alignment")


# ------------------------------------------------------------------------------------------------
# hostile tensor infos
# ------------------------------------------------------------------------------------------------

def _tensor_at() -> int:
    return len(header(1, 1) + ARCH)


@pytest.mark.parametrize("nd", [0, 5, 99, 2**32 - 1])
def test_bad_n_dims(tmp_path, nd):
    ti = gstr("w") + struct.pack("<I", nd) + b"\0" * 64
    at = _tensor_at() + len(gstr("w"))
    expect_error(tmp_path, build([ARCH], [ti], W_DATA), "tensor 'w'", "n_dims", str(nd), f"offset {at}")


@pytest.mark.parametrize("dims", [[2**32, 2**32], [2**32, 2**32, 2**32, 2**32], [2**63, 2], [2**64 - 1], [2**21] * 3])
def test_dims_product_overflow(tmp_path, dims):
    msg = expect_error(tmp_path, build([ARCH], [tinfo("big", dims, 0, 0)], W_DATA), "tensor 'big'",
                       f"offset {_tensor_at()}")
    assert any(w in msg for w in ("overflows", "absurd dims", "beyond the end")), msg


def test_zero_dim(tmp_path):
    expect_error(tmp_path, build([ARCH], [tinfo("z", [8, 0], 0, 0)], W_DATA), "tensor 'z'", "dims")


@pytest.mark.parametrize("tid", [77, 2**32 - 1, 13, 39])
def test_unknown_tensor_type(tmp_path, tid):
    expect_error(tmp_path, build([ARCH], [tinfo("w", [32], tid, 0)], W_DATA), "tensor 'w'",
                 f"type id {tid}", f"offset {_tensor_at()}")


def test_type_36_clash_bitnet_vs_llama(tmp_path):
    """Ids 34-39 mean different things upstream and in bitnet.cpp (formats.md §2.2): key off the arch."""
    arch_b = kv_str("general.architecture", "bitnet-b1.58")
    # under llama, 36 is upstream's retired IQ4_NL_4_4: refused, and the message explains the clash
    msg_l = expect_error(tmp_path, build([ARCH], [tinfo("blk.0.attn_q.weight", [128, 4], 36, 0)], b"\0" * 256),
                         "type id 36", "'llama'", "I2_S", "IQ4_NL", "bitnet.cpp", name="l.gguf")
    assert "read as upstream ggml's IQ4_NL_4_4" in msg_l
    # under bitnet-b1.58, 36 is bitnet.cpp's I2_S: either decoded as such or refused naming I2_S
    p = tmp_path / "b.gguf"
    p.write_bytes(build([arch_b], [tinfo("blk.0.attn_q.weight", [128, 4], 36, 0)], b"\0" * 256))
    try:
        g = read_gguf(p)
    except GGUFError as e:
        assert "type id 36" in str(e) and "bitnet-b1.58" in str(e) and "I2_S" in str(e), str(e)
    else:
        t = g.tensors["blk.0.attn_q.weight"]
        assert t.qtype.name == "I2_S" and t.shape == (4, 128)
        assert t.nbytes == 128 * 4 // 4 + 32                 # packed codes + 32-byte scale tail
        # ... and the scale tail is part of the bounds check
        expect_error(tmp_path, build([arch_b], [tinfo("w", [128, 4], 36, 0)], b"\0" * 150), "tensor 'w'",
                     "beyond the end", name="b_short.gguf")
    # 37 (bitnet.cpp I8_S) and the ternary ids 34/35 are refused in a bitnet.cpp file, with the clash named
    msg = expect_error(tmp_path, build([arch_b], [tinfo("t", [256], 37, 0)], b"\0" * 512), "type id 37",
                       "bitnet-b1.58", name="i8s.gguf")
    assert "read as bitnet.cpp's I8_S" in msg
    expect_error(tmp_path, build([arch_b], [tinfo("t", [256], 34, 0)], b"\0" * 64), "type id 34", "bitnet-b1.58",
                 "ambiguous", name="t.gguf")
    # under llama, 39 is upstream MXFP4
    expect_error(tmp_path, build([ARCH], [tinfo("t", [32], 39, 0)], b"\0" * 64), "type id 39", "MXFP4",
                 name="mx.gguf")


def test_block_size_mismatch(tmp_path):
    expect_error(tmp_path, build([ARCH], [tinfo("q", [33, 2], 8, 0)], b"\0" * 128), "tensor 'q'", "ne0 = 33",
                 "Q8_0")


def test_tensor_data_beyond_end(tmp_path):
    expect_error(tmp_path, build([ARCH], [tinfo("w", [8, 2], 0, 0)], W_DATA[:-1]), "tensor 'w'", "beyond the end",
                 f"offset {_tensor_at()}")
    expect_error(tmp_path, build([ARCH], [tinfo("w", [8, 2], 0, 2**63)], W_DATA), "tensor 'w'", "beyond the end")
    expect_error(tmp_path, build([ARCH], [tinfo("w", [8, 2], 0, 64)], W_DATA), "tensor 'w'", "beyond the end")


def test_misaligned_offset(tmp_path):
    blob = build([ARCH], [tinfo("w", [8, 2], 0, 4)], W_DATA + b"\0" * 32)
    expect_error(tmp_path, blob, "tensor 'w'", "offset 4", "alignment 32", f"byte offset {_tensor_at()}")
    # with a custom alignment of 8, offset 8 is fine and 4 is not
    kvs = [ARCH, kv_u32("general.alignment", 8)]
    p = tmp_path / "ok.gguf"
    p.write_bytes(build(kvs, [tinfo("w", [8, 2], 0, 8)], b"\0" * 8 + W_DATA, alignment=8))
    assert read_gguf(p).tensors["w"].data.reshape(-1).view(np.float32).tolist() == list(range(16))
    expect_error(tmp_path, build(kvs, [tinfo("w", [8, 2], 0, 4)], W_DATA, alignment=8), "alignment 8")


# ------------------------------------------------------------------------------------------------
# memory: absurd claims must not allocate
# ------------------------------------------------------------------------------------------------

def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_huge_claims_allocate_nothing(tmp_path):
    cases = {
        "tensor 2**40 elements": build([ARCH], [tinfo("big", [2**20, 2**20], 0, 0)], W_DATA),
        "u8 array 2**40": header(0, 2) + ARCH + kv("a", 9, struct.pack("<IQ", 0, 2**40)) + b"\0" * 100,
        "string array 2**40": header(0, 2) + ARCH + kv("a", 9, struct.pack("<IQ", 8, 2**40)) + b"\0" * 100,
        "string 2**40": header(0, 2) + ARCH + kv("a", 8, struct.pack("<Q", 2**40)) + b"\0" * 100,
        "kv_count 2**40": build([ARCH], n_kv=2**40),
    }
    for what, blob in cases.items():
        p = tmp_path / "huge.gguf"
        p.write_bytes(blob)

        def parse():
            with pytest.raises(GGUFError):
                read_gguf(p)
        assert _peak(parse) < 10 * 2**20, what


def test_huge_sparse_file_is_mapped_not_read(tmp_path):
    """A real (sparse) file holding a 2**40-element Q4_0 tensor parses without reading its data."""
    blob = build([ARCH], [tinfo("big", [2**20, 2**20], 2, 0)])
    nbytes = 2**40 // 32 * 18
    p = tmp_path / "sparse.gguf"
    try:
        with open(p, "wb") as f:
            f.write(blob)
            f.truncate(len(blob) + nbytes)
        if os.stat(p).st_blocks * 512 > 2**20:
            pytest.skip("filesystem without sparse files")
    except OSError as e:
        pytest.skip(f"cannot make a sparse file: {e}")
    try:
        box = {}
        peak = _peak(lambda: box.setdefault("g", read_gguf(p)))
        t = box["g"].tensors["big"]
        assert t.shape == (2**20, 2**20) and t.nbytes == nbytes and t.data.shape == (2**20, 2**15 * 18)
        assert peak < 10 * 2**20
        del box, t
    finally:
        p.unlink()


# ------------------------------------------------------------------------------------------------
# load_gguf: architecture, required tensors, Q/K un-permutation
# ------------------------------------------------------------------------------------------------

def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (formats.md §3.5)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


TINY = dict(D=16, L=1, H=2, HKV=1, F=32, V=8)


def tiny_llama_weights(rng) -> dict[str, np.ndarray]:
    D, H, HKV, F, V = TINY["D"], TINY["H"], TINY["HKV"], TINY["F"], TINY["V"]
    Dh = D // H
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"token_embd.weight": f(V, D), "output_norm.weight": f(D),
            "blk.0.attn_norm.weight": f(D), "blk.0.attn_q.weight": f(H * Dh, D),
            "blk.0.attn_k.weight": f(HKV * Dh, D), "blk.0.attn_v.weight": f(HKV * Dh, D),
            "blk.0.attn_output.weight": f(D, H * Dh), "blk.0.ffn_norm.weight": f(D),
            "blk.0.ffn_gate.weight": f(F, D), "blk.0.ffn_up.weight": f(F, D), "blk.0.ffn_down.weight": f(D, F)}


def write_tiny_llama(path, weights: dict, arch: str = "llama", permute: bool = True):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.embedding_length", TINY["D"])
    w.add_uint32(f"{arch}.block_count", TINY["L"])
    w.add_uint32(f"{arch}.attention.head_count", TINY["H"])
    w.add_uint32(f"{arch}.attention.head_count_kv", TINY["HKV"])
    w.add_uint32(f"{arch}.feed_forward_length", TINY["F"])
    w.add_uint32(f"{arch}.vocab_size", TINY["V"])
    w.add_uint32(f"{arch}.context_length", 64)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    for name, arr in weights.items():
        if permute and name.endswith("attn_q.weight"):
            arr = llama_permute(arr, TINY["H"])
        elif permute and name.endswith("attn_k.weight"):
            arr = llama_permute(arr, TINY["HKV"])
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_tiny_llama_unpermutes_qk(tmp_path):
    weights = tiny_llama_weights(np.random.default_rng(0))
    p = tmp_path / "tiny.gguf"
    write_tiny_llama(p, weights)
    ck = load_gguf(p)
    assert ck.config.arch == "llama" and ck.config.n_layers == 1 and ck.config.head_dim == 8
    for name, arr in weights.items():
        np.testing.assert_array_equal(ck.weights[name[:-len(".weight")]].dequantize(), arr, err_msg=name)
    assert ck.weights["output"] is ck.weights["token_embd"]


def test_unknown_architecture(tmp_path):
    p = tmp_path / "arch.gguf"
    write_tiny_llama(p, tiny_llama_weights(np.random.default_rng(0)), arch="mamba9", permute=False)
    read_gguf(p)                                         # the container itself is fine
    with pytest.raises(ConfigError) as ei:
        load_gguf(p)
    assert "general.architecture" in str(ei.value) and "mamba9" in str(ei.value)


def test_missing_required_tensor(tmp_path):
    weights = tiny_llama_weights(np.random.default_rng(0))
    del weights["blk.0.ffn_up.weight"]
    p = tmp_path / "missing.gguf"
    write_tiny_llama(p, weights)
    with pytest.raises(GGUFError) as ei:
        load_gguf(p)
    assert "blk.0.ffn_up.weight" in str(ei.value) and "missing" in str(ei.value) and str(p) in str(ei.value)


def test_wrong_tensor_shape(tmp_path):
    weights = tiny_llama_weights(np.random.default_rng(0))
    weights["blk.0.attn_k.weight"] = np.zeros((16, 16), np.float32)          # expected [8, 16]
    p = tmp_path / "shape.gguf"
    write_tiny_llama(p, weights)
    with pytest.raises(GGUFError) as ei:
        load_gguf(p)
    msg = str(ei.value)
    assert "blk.0.attn_k.weight" in msg and "[16, 16]" in msg and "[8, 16]" in msg


@pytest.mark.parametrize("qt", [Q.Q8_0, Q.Q4_1, Q.F32])
@pytest.mark.parametrize("n_head,head_dim", [(3, 8), (2, 64), (1, 4)])
def test_unpermute_qk_inverts_llama_permute(qt, n_head, head_dim):
    rng = np.random.default_rng(n_head * 100 + head_dim)
    w_hf = rng.standard_normal((n_head * head_dim, 64)).astype(np.float32)
    w_gguf = llama_permute(w_hf, n_head)
    # formats.md §3.5: per head, new row 2i + t = old row t*Dh/2 + i
    h, i, t = n_head - 1, head_dim // 2 - 1, 1
    np.testing.assert_array_equal(w_gguf[h * head_dim + 2 * i + t], w_hf[h * head_dim + t * head_dim // 2 + i])
    qg = Q.QTensor.from_float(w_gguf, qt)                       # rows quantized as the file stores them
    back = unpermute_qk(qg, n_head)
    assert back.shape == qg.shape and back.data.shape == qg.data.shape and back.qtype is qt
    # row quantization commutes with a row permutation: bit-identical to quantizing HF rows directly
    np.testing.assert_array_equal(back.data, Q.QTensor.from_float(w_hf, qt).data)
    tol = {Q.F32: 0, Q.Q8_0: 0.05, Q.Q4_1: 0.6}[qt]
    np.testing.assert_allclose(back.dequantize(), w_hf, atol=tol)


def test_fuzzed_small_files_only_raise_gguf_error(tmp_path):
    """Random byte edits, big-number splices and deletions: GGUFError or a clean parse, nothing else."""
    full = tmp_path / "full.gguf"
    write_small(full, 32)
    blob = full.read_bytes()
    rng = np.random.default_rng(2024)
    big64 = [0, 1, 2**63, 2**64 - 1, 2**32, 2**31, 255]
    small32 = [0, 1, 2**32 - 1, 9, 8, 12, 13, 36, 77]
    p = tmp_path / "fuzz.gguf"
    for _ in range(1000):
        b = bytearray(blob)
        for _ in range(int(rng.integers(1, 4))):
            pos, mode = int(rng.integers(0, len(b))), int(rng.integers(0, 4))
            if mode == 0:
                b[pos] = int(rng.integers(0, 256))
            elif mode == 1 and pos + 8 <= len(b):
                b[pos:pos + 8] = struct.pack("<Q", big64[int(rng.integers(0, len(big64)))])
            elif mode == 2 and pos + 4 <= len(b):
                b[pos:pos + 4] = struct.pack("<I", small32[int(rng.integers(0, len(small32)))])
            else:
                del b[pos:pos + int(rng.integers(1, 40))]
        p.write_bytes(bytes(b))
        try:
            read_gguf(p)
        except GGUFError:
            pass
