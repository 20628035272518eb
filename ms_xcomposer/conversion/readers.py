"""Lazy, safe readers of checkpoint shards: Hugging Face safetensors / pickled `.bin`, and converted MindSpore dirs.

`open_checkpoint(path)` returns a `CheckpointReader`: names, dtypes and shapes come from the shard headers
(a few KB read); tensor bytes are read on demand, one tensor at a time: `read`/`read_bytes` with positioned
reads (`os.preadv`) into a fresh buffer, `view_bytes` as a read-only memory map, `file_range` as the byte
range to copy. Memory stays at about one tensor whatever the shard size.

- safetensors: the JSON header is parsed here rather than with `safetensors.safe_open`, which is lazy too but
  hides the byte offsets (needed for in-kernel copies) and reports bad files less precisely; offsets, dtypes
  and shapes are checked against each other and the file size.
- `.bin` (`torch.save` zip format): `data.pkl` is unpickled by `RestrictedUnpickler`, which only knows the
  globals a plain tensor state dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, the
  typed storage classes) and maps them to inert stand-ins here; any other global (`os.system`, ...) raises
  `UnsafePickleError` naming it before anything runs. torch is never imported. Storage bytes are read from
  the stored (uncompressed) zip members at their offsets; `read_bytes` checks them against the member's
  CRC-32 (unless the zip records 0: `torch.save` under `set_crc32_options(False)`, which torch.load accepts).
- `.ckpt` (MindSpore protobuf `Checkpoint`): the records are scanned once for their offsets (tag, dims,
  tensor_type, content position); a tensor split over several consecutive records is joined, as MindSpore does.

Arrays come back in their stored dtype (bf16 as `ml_dtypes.bfloat16`); dtype names are numpy names
("bfloat16", "float16", "float32", ...).
"""
from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

from ms_xcomposer.config import ConfigError
from ms_xcomposer.conversion import layout
from ms_xcomposer.conversion.errors import CheckpointError, UnsafePickleError

if sys.byteorder != "little":  # every format here stores little-endian data, read with native dtypes
    raise ImportError("ms_xcomposer.conversion needs a little-endian machine")

# ---- dtypes --------------------------------------------------------------------------------------------
_NP_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64), "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
TORCH_STORAGES = {"BFloat16Storage": "bfloat16", "HalfStorage": "float16", "FloatStorage": "float32",
                  "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                  "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
CKPT_TYPES = {"BFloat16": "bfloat16", "Float16": "float16", "Float32": "float32", "Float64": "float64",
              "Int64": "int64", "Int32": "int32", "Int16": "int16", "Int8": "int8", "UInt8": "uint8", "Bool": "bool"}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a dtype name ("bfloat16" is `ml_dtypes.bfloat16`)."""
    try:
        return _NP_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {name!r}; expected one of {sorted(_NP_DTYPES)}") from None


READ_BLOCK = 16 << 20  # bytes read per step by a converting read (`CheckpointReader.read_as`)


def convert_into(values: np.ndarray, out: np.ndarray) -> None:
    """out[...] = values cast to out's dtype (same size, 1-D). bf16 -> float32 widens the bits with a shift,
    exact for every value (NaN payloads included) and ~20x faster than ml_dtypes' element-wise cast; other
    casts round to nearest even (ml_dtypes / numpy)."""
    if values.dtype == _NP_DTYPES["bfloat16"] and out.dtype == np.float32:
        np.left_shift(values.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, values, casting="unsafe")


def dtype_name(dtype: np.dtype) -> str:
    """Inverse of `numpy_dtype`: the name of a numpy dtype (bf16 from ml_dtypes or MindSpore's numpy type)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "bfloat16"
    for name, dt in _NP_DTYPES.items():
        if dt == dtype:
            return name
    raise CheckpointError(f"unsupported dtype {dtype}; expected one of {sorted(_NP_DTYPES)}")


# ---- tensor records ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. `segments` are (absolute byte offset, length) ranges of its C-order bytes."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: str
    segments: Tuple[Tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize

    @property
    def offset(self) -> int:
        return self.segments[0][0] if self.segments else 0


@dataclass(frozen=True)
class Checksum:
    """A byte range of a shard with the CRC-32 its format records for it (zip members of a .bin)."""

    offset: int
    length: int
    crc: int
    label: str


def _pread_into(fd: int, buf: memoryview, offset: int, path: str, key: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CheckpointError(
                f"{path}: tensor {key!r} is truncated: expected {len(buf)} bytes at offset {offset}, "
                f"the file ends after {done}"
            )
        done += n


def _map_range(fd: int, offset: int, length: int, path: str, key: str) -> np.ndarray:
    if length == 0:
        return np.empty(0, np.uint8)
    if os.fstat(fd).st_size < offset + length:  # mapping past the end would fault (SIGBUS) on access
        raise CheckpointError(f"{path}: tensor {key!r} needs bytes up to {offset + length} but the file now has "
                              f"{os.fstat(fd).st_size}: truncated while reading")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, offset + length - start, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                   prot=mmap.PROT_READ, offset=start)
    return np.frombuffer(mm, np.uint8, count=length, offset=offset - start)


class _Shard:
    """One checkpoint file: its tensors' records and raw byte reads."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.infos: Dict[str, TensorInfo] = {}
        try:
            self.size = os.path.getsize(path)
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint shard {path}: {e.strerror}") from None

    def read_bytes(self, key: str) -> np.ndarray:
        """The tensor's C-order bytes as a fresh uint8 array."""
        info = self.infos[key]
        out = np.empty(info.nbytes, np.uint8)
        view, pos = memoryview(out), 0
        for offset, length in info.segments:
            _pread_into(self._fd, view[pos:pos + length], offset, self.path, key)
            pos += length
        self.verify_bytes(key, out)
        return out

    def blocks(self, key: str, block_bytes: int) -> Iterator[memoryview]:
        """The tensor's C-order bytes in consecutive blocks of at most `block_bytes` (one reused buffer: use
        each block before asking for the next), read once, checked like `read_bytes` at the end."""
        buf = memoryview(np.empty(min(block_bytes, self.infos[key].nbytes), np.uint8))
        check = self._checker(key)
        for offset, length in self.infos[key].segments:
            for start in range(0, length, len(buf)):
                n = min(len(buf), length - start)
                _pread_into(self._fd, buf[:n], offset + start, self.path, key)
                check(buf[:n])
                yield buf[:n]
        check(None)

    def _checker(self, key: str):
        """A function fed each block of the tensor's bytes in order, then None: raises if they fail the
        format's checksum. Formats without one accept anything."""
        return lambda block: None

    def file_range(self, key: str) -> Optional[Tuple[int, int]]:
        """(offset, length) when the tensor's bytes are one range of the file, as stored; else None."""
        segments = self.infos[key].segments
        return segments[0] if len(segments) == 1 else None

    def view_bytes(self, key: str, verify: bool = True) -> np.ndarray:
        """The tensor's C-order bytes, read-only, mapped from the file without copying when they are one
        range (the mapping lives as long as the array); otherwise as `read_bytes`."""
        rng = self.file_range(key)
        if rng is None:
            return self.read_bytes(key)
        data = _map_range(self._fd, rng[0], rng[1], self.path, key)
        if verify:
            self.verify_bytes(key, data)
        return data

    def verify_bytes(self, key: str, data: np.ndarray) -> None:
        """Raise if `data` (from `view_bytes(key, verify=False)`) fails the format's own checksum, if any."""

    def checksums(self) -> List[Checksum]:
        """Byte ranges of this file with a recorded CRC-32 (none for safetensors and .ckpt)."""
        return []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _add(self, info: TensorInfo) -> None:
        if info.name in self.infos:
            raise CheckpointError(f"{self.path}: tensor {info.name!r} appears twice")
        end = max((o + n for o, n in info.segments), default=0)
        if end > self.size:
            raise CheckpointError(
                f"{self.path}: tensor {info.name!r} needs bytes up to {end} but the file has {self.size}: "
                "truncated or corrupted shard"
            )
        self.infos[info.name] = info


# ---- safetensors ---------------------------------------------------------------------------------------
class SafetensorsShard(_Shard):
    """A `.safetensors` file: 8-byte little-endian header length, JSON header, then the data block."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {len(head)} bytes, too short for a safetensors header: truncated file")
        (n,) = struct.unpack("<Q", head)
        if n > self.size - 8 or n > 100 << 20:
            raise CheckpointError(
                f"{path}: safetensors header claims {n} bytes but the file has {self.size}: truncated or corrupted"
            )
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}): corrupted file") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object: corrupted file")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        for key, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {key!r} has a malformed or unsupported header entry "
                                      f"{entry!r}") from None
            info = TensorInfo(key, dtype, shape, self.path, ((base + begin, end - begin),))
            if end - begin != info.nbytes or begin < 0:
                raise CheckpointError(
                    f"{path}: tensor {key!r} {dtype}{list(shape)} needs {info.nbytes} bytes but its data_offsets "
                    f"[{begin}, {end}] span {end - begin}: corrupted header"
                )
            self._add(info)


# ---- torch zip (.bin) ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _StorageRef
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _LazyTensor:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: records the view instead of building a tensor."""
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError(f"_rebuild_tensor_v2 got {type(storage).__name__}, expected a storage")
    try:
        return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    except (TypeError, ValueError):
        raise CheckpointError(f"malformed tensor record: offset {storage_offset!r}, size {size!r}, "
                              f"stride {stride!r}") from None


def _allowed_globals() -> Dict[Tuple[str, str], object]:
    allowed: Dict[Tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    }
    for name, dtype in TORCH_STORAGES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch `data.pkl` knowing only the globals of a plain tensor state dict.

    Every global resolves to an inert object defined in this module; anything else raises
    `UnsafePickleError` (naming the global and the file) before it could be imported or called.
    """

    ALLOWED = _allowed_globals()

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle hook
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self.ALLOWED))
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle global {module}.{name}: a tensor state dict needs only "
                f"{allowed}. Nothing from the file was executed."
            ) from None

    def persistent_load(self, pid):  # noqa: D102 - pickle hook
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)):
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r}; expected a torch storage")
        return _StorageRef(pid[1].dtype, pid[2], int(pid[4]))


class TorchZipShard(_Shard):
    """A `torch.save` file (zip: `<name>/data.pkl`, `<name>/data/<storage key>`, `<name>/byteorder`, ...)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        try:
            with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
                members = {m.filename: m for m in zf.infolist()}
        except zipfile.BadZipFile as e:
            self.close()
            hint = " (legacy pre-1.6 torch.save format is not supported)" if not _starts_with_zip(path) else ""
            raise CheckpointError(f"{path}: not a readable torch zip checkpoint: {e}{hint}; truncated or "
                                  "corrupted shard?") from None
        except (EOFError, OSError) as e:
            self.close()
            raise CheckpointError(f"{path}: cannot read the torch zip ({e}): truncated or corrupted shard") from None
        try:
            pkl_names = [n for n in members if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkl_names) != 1:
                raise CheckpointError(f"{path}: expected one data.pkl in the torch zip, found {pkl_names}")
            prefix = pkl_names[0][: -len("data.pkl")]
            order = members.get(prefix + "byteorder")
            if order is not None and self._member_bytes(order).strip() != b"little":
                raise CheckpointError(f"{path}: byteorder {self._member_bytes(order)!r}, only little-endian is "
                                      "supported")
            pkl = self._member_bytes(members[pkl_names[0]])
        except CheckpointError:
            self.close()
            raise
        try:
            state = RestrictedUnpickler(pkl, path).load()
        except CheckpointError:
            self.close()
            raise
        except Exception as e:  # malformed pickle stream: any unpickling error means a corrupted file
            self.close()
            raise CheckpointError(f"{path}: data.pkl is not a valid pickle ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            self.close()
            raise CheckpointError(f"{path}: data.pkl holds {type(state).__name__}, expected a state dict")
        self._crc: Dict[str, int] = {}  # key -> the member's CRC-32, when a read covers the whole storage member
        self._strided: Dict[str, _LazyTensor] = {}  # views that are not C-contiguous: gathered on read
        users: Dict[str, str] = {}  # storage member -> first tensor stored in it
        try:
            for key, t in state.items():
                if not isinstance(key, str) or not isinstance(t, _LazyTensor):
                    raise CheckpointError(f"{path}: entry {key!r} is {type(t).__name__}, expected a tensor")
                self._add_tensor(key, t, members, prefix)
                users.setdefault(f"{prefix}data/{t.storage.key}", key)
            # torch.save(..) under set_crc32_options(False) records CRC 0 (torch.load never checks): skip those
            self._checksums = [
                Checksum(self._member_data_offset(m), m.file_size, m.CRC,
                         f"tensor {users[m.filename]!r} (zip member {m.filename})" if m.filename in users
                         else f"zip member {m.filename}")
                for m in members.values() if m.compress_type == zipfile.ZIP_STORED and m.file_size and m.CRC]
        except CheckpointError:
            self.close()
            raise

    def _add_tensor(self, key: str, t: _LazyTensor, members: Mapping[str, zipfile.ZipInfo], prefix: str) -> None:
        member = members.get(f"{prefix}data/{t.storage.key}")
        if member is None:
            raise CheckpointError(f"{self.path}: tensor {key!r}: storage data/{t.storage.key} is missing from the "
                                  "zip: truncated or corrupted shard")
        itemsize = numpy_dtype(t.storage.dtype).itemsize
        if member.file_size != t.storage.numel * itemsize:
            raise CheckpointError(
                f"{self.path}: tensor {key!r}: storage data/{t.storage.key} has {member.file_size} bytes, expected "
                f"{t.storage.numel} x {itemsize}: corrupted shard"
            )
        if member.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: storage data/{t.storage.key} is compressed; torch.save writes "
                                  "stored members (re-save the checkpoint)")
        start = self._member_data_offset(member)
        numel = int(np.prod(t.shape, dtype=np.int64))
        contiguous = tuple(int(np.prod(t.shape[i + 1:], dtype=np.int64)) for i in range(len(t.shape)))
        if numel and any(s < 0 for s in t.stride):
            raise CheckpointError(f"{self.path}: tensor {key!r} has negative strides {t.stride}")
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if numel else t.offset - 1
        if t.offset < 0 or last >= t.storage.numel and numel:
            raise CheckpointError(f"{self.path}: tensor {key!r} view (offset {t.offset}, shape {t.shape}, stride "
                                  f"{t.stride}) exceeds its storage of {t.storage.numel} elements")
        if numel > 1 and tuple(s for n, s in zip(t.shape, t.stride) if n > 1) != tuple(
                c for n, c in zip(t.shape, contiguous) if n > 1):
            # A strided view (e.g. a transposed tensor saved as is): read its storage and gather on read.
            self._strided[key] = t
            segments = ((start, member.file_size),)
        else:
            segments = ((start + t.offset * itemsize, numel * itemsize),)
        if segments[0] == (start, member.file_size) and member.CRC:
            self._crc[key] = member.CRC
        info = TensorInfo(key, t.storage.dtype, t.shape, self.path, segments)
        self._add(info)

    def _member_bytes(self, member: zipfile.ZipInfo) -> bytes:
        """A small stored member's bytes, CRC-checked when the zip records a CRC."""
        if member.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: zip member {member.filename} is compressed; torch.save writes "
                                  "stored members (re-save the checkpoint)")
        start = self._member_data_offset(member)
        data = os.pread(self._fd, member.file_size, start)
        if len(data) != member.file_size:
            raise CheckpointError(f"{self.path}: zip member {member.filename} needs {member.file_size} bytes at "
                                  f"{start}, the file ends first: truncated shard")
        if member.CRC and zlib.crc32(data) != member.CRC:
            raise CheckpointError(f"{self.path}: zip member {member.filename}: CRC-32 does not match the zip "
                                  "directory: truncated or corrupted shard")
        return data

    def _member_data_offset(self, member: zipfile.ZipInfo) -> int:
        local = os.pread(self._fd, 30, member.header_offset)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: zip member {member.filename} has no local header at "
                                  f"{member.header_offset}: corrupted shard")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return member.header_offset + 30 + name_len + extra_len

    def file_range(self, key: str) -> Optional[Tuple[int, int]]:
        return None if key in self._strided else super().file_range(key)

    def read_bytes(self, key: str) -> np.ndarray:
        t = self._strided.get(key)
        if t is None:
            return super().read_bytes(key)  # checked by verify_bytes
        raw = self._read_storage(key)
        self._check_crc(key, raw)
        dtype = numpy_dtype(t.storage.dtype)
        flat = raw.view(dtype)
        view = np.lib.stride_tricks.as_strided(flat[t.offset:], t.shape, tuple(s * dtype.itemsize for s in t.stride))
        return np.ascontiguousarray(view).view(np.uint8).reshape(-1)

    def verify_bytes(self, key: str, data: np.ndarray) -> None:
        if key not in self._strided:  # a gathered view was checked on its storage by read_bytes
            self._check_crc(key, data)

    def checksums(self) -> List[Checksum]:
        return list(self._checksums)

    def blocks(self, key: str, block_bytes: int) -> Iterator[memoryview]:
        if key in self._strided:  # a gathered view: its storage is read and checked whole
            yield memoryview(self.read_bytes(key))
            return
        yield from super().blocks(key, block_bytes)

    def _checker(self, key: str):
        crc = self._crc.get(key)
        if crc is None:
            return super()._checker(key)
        state = [0]

        def check(block) -> None:
            if block is not None:
                state[0] = zlib.crc32(block, state[0])
            elif state[0] != crc:
                raise CheckpointError(f"{self.path}: tensor {key!r}: CRC-32 of its storage does not match the zip "
                                      "directory: corrupted shard")
        return check

    def _check_crc(self, key: str, data: np.ndarray) -> None:
        crc = self._crc.get(key)
        if crc is not None and zlib.crc32(data) != crc:
            raise CheckpointError(f"{self.path}: tensor {key!r}: CRC-32 of its storage does not match the zip "
                                  "directory: corrupted shard")

    def _read_storage(self, key: str) -> np.ndarray:
        (offset, length), = self.infos[key].segments
        out = np.empty(length, np.uint8)
        _pread_into(self._fd, memoryview(out), offset, self.path, key)
        return out


def _starts_with_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


# ---- MindSpore .ckpt -----------------------------------------------------------------------------------
class _Wire:
    """Bounds-checked protobuf wire-format cursor over a mapped file."""

    def __init__(self, buf, pos: int, end: int, path: str) -> None:
        self.buf, self.pos, self.end, self.path = buf, pos, end, path

    def varint(self) -> int:
        shift = result = 0
        while True:
            if self.pos >= self.end or shift > 63:
                raise CheckpointError(f"{self.path}: malformed protobuf varint at byte {self.pos}: truncated or "
                                      "corrupted .ckpt")
            b = self.buf[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    def field(self) -> Tuple[int, int]:
        key = self.varint()
        return key >> 3, key & 7

    def length(self) -> Tuple[int, int]:
        n = self.varint()
        if self.pos + n > self.end:
            raise CheckpointError(f"{self.path}: protobuf field of {n} bytes at byte {self.pos} runs past its end "
                                  f"({self.end}): truncated or corrupted .ckpt")
        start = self.pos
        self.pos += n
        return start, n

    def skip(self, wire_type: int) -> None:
        if wire_type == 0:
            self.varint()
        elif wire_type == 1:
            self.pos += 8
        elif wire_type == 2:
            self.length()
        elif wire_type == 5:
            self.pos += 4
        else:
            raise CheckpointError(f"{self.path}: unsupported protobuf wire type {wire_type} at byte {self.pos}")


CKPT_CRC_TRAILER = b"crc_num"  # MindSpore's optional trailer: b"crc_num" + crc32 as 10 big-endian bytes


class CkptShard(_Shard):
    """A MindSpore `.ckpt` (protobuf `Checkpoint { repeated Value value = 1; }`), scanned without loading it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.crc: Optional[int] = None
        if self.size == 0:
            raise CheckpointError(f"{path}: empty .ckpt file")
        with mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as mm:
            end = self.size
            if end >= 17 and mm[end - 17:end - 10] == CKPT_CRC_TRAILER:
                self.crc = int.from_bytes(mm[end - 10:end], "big")
                end -= 17
            self._scan(_Wire(mm, 0, end, self.path))

    def _scan(self, w: _Wire) -> None:
        pending: Dict[str, list] = {}
        order: List[str] = []
        while w.pos < w.end:
            field, wt = w.field()
            if field != 1 or wt != 2:
                raise CheckpointError(f"{self.path}: unexpected protobuf field {field}/{wt} at byte {w.pos}: "
                                      "not a MindSpore checkpoint or corrupted")
            start, n = w.length()
            tag, dims, ttype, content = self._value(_Wire(w.buf, start, start + n, self.path))
            rec = pending.get(tag)
            if rec is None:
                pending[tag] = [ttype, dims, [content]]
                order.append(tag)
            elif order[-1] != tag:
                raise CheckpointError(f"{self.path}: tensor {tag!r} appears twice (non-consecutive records)")
            elif rec[0] != ttype or rec[1] != dims:
                raise CheckpointError(f"{self.path}: tensor {tag!r} slices disagree: {rec[0]}{rec[1]} vs {ttype}{dims}")
            else:
                rec[2].append(content)
        for tag in order:
            ttype, dims, segments = pending[tag]
            if ttype not in CKPT_TYPES:
                raise CheckpointError(f"{self.path}: tensor {tag!r} has unsupported tensor_type {ttype!r}")
            dtype = CKPT_TYPES[ttype]
            total = sum(n for _, n in segments)
            shape = tuple(dims)
            if shape == (0,) and total == numpy_dtype(dtype).itemsize:
                shape = ()  # MindSpore writes a 0-d tensor's dims as [0]
            info = TensorInfo(tag, dtype, shape, self.path, tuple(segments))
            if info.nbytes != total:
                raise CheckpointError(f"{self.path}: tensor {tag!r} {dtype}{list(shape)} needs {info.nbytes} bytes, "
                                      f"its records hold {total}: corrupted .ckpt")
            self._add(info)

    def _value(self, w: _Wire) -> Tuple[str, Tuple[int, ...], str, Tuple[int, int]]:
        tag, tensor = None, None
        while w.pos < w.end:
            field, wt = w.field()
            if field == 1 and wt == 2:
                s, n = w.length()
                tag = bytes(w.buf[s:s + n]).decode("utf-8", "replace")
            elif field == 2 and wt == 2:
                tensor = w.length()
            elif field == 3:
                raise CheckpointError(f"{self.path}: map tensors are not supported (record at byte {w.pos})")
            else:
                w.skip(wt)
        if tag is None or tensor is None:
            raise CheckpointError(f"{self.path}: checkpoint record without tag or tensor near byte {w.pos}")
        dims: List[int] = []
        ttype, content = "", (tensor[0], 0)
        t = _Wire(w.buf, tensor[0], tensor[0] + tensor[1], self.path)
        while t.pos < t.end:
            field, wt = t.field()
            if field == 1 and wt == 2:  # packed dims
                s, n = t.length()
                d = _Wire(w.buf, s, s + n, self.path)
                while d.pos < d.end:
                    dims.append(d.varint())
            elif field == 1 and wt == 0:
                dims.append(t.varint())
            elif field == 2 and wt == 2:
                s, n = t.length()
                ttype = bytes(w.buf[s:s + n]).decode("ascii", "replace")
            elif field == 3 and wt == 2:
                content = t.length()
            else:
                t.skip(wt)
        return tag, tuple(dims), ttype, content


# ---- the reader --------------------------------------------------------------------------------------------
def open_shard(path: str) -> _Shard:
    """Open one checkpoint file by its extension (.safetensors, .bin/.pt/.pth, .ckpt)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint shard {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return SafetensorsShard(path)
    if ext in (".bin", ".pt", ".pth"):
        return TorchZipShard(path)
    if ext == ".ckpt":
        return CkptShard(path)
    raise CheckpointError(f"{path}: unknown checkpoint extension {ext!r}; expected .safetensors, .bin or .ckpt")


class CheckpointReader:
    """Lazy view of a whole checkpoint (an HF dir, a converted MindSpore dir, or one file).

    Attributes: `path` (the directory, or the file), `kind` ("hf" or "ms"), `format` ("safetensors", "bin" or
    "ckpt"), `index_file` (the index json or None), `files` (shard paths in index order).
    """

    def __init__(self, path: str, kind: str, fmt: str, shards: Sequence[_Shard], index_file: Optional[str] = None,
                 weight_map: Optional[Mapping[str, str]] = None) -> None:
        self.path, self.kind, self.format, self.index_file = os.path.abspath(path), kind, fmt, index_file
        self._shards = list(shards)
        self.files = [s.path for s in self._shards]
        self._where: Dict[str, _Shard] = {}
        try:
            self._index(weight_map)
        except CheckpointError:
            self.close()
            raise
        self._config = None

    def _index(self, weight_map: Optional[Mapping[str, str]]) -> None:
        by_name = {os.path.basename(s.path): s for s in self._shards}
        for shard in self._shards:
            for key in shard.infos:
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} is in both {self._where[key].path} and {shard.path}")
                self._where[key] = shard
        if weight_map is None:
            return
        for key, fname in weight_map.items():
            shard = by_name[fname]
            if key not in shard.infos:
                raise CheckpointError(f"{self.index_file}: tensor {key!r} is listed in shard {fname}, but "
                                      f"{shard.path} does not contain it")
            if self._where[key] is not shard:
                raise CheckpointError(f"{self.index_file}: tensor {key!r} is listed in {fname} but found in "
                                      f"{self._where[key].path}")
        extra = sorted(set(self._where) - set(weight_map))
        if extra:
            raise CheckpointError(f"{self.index_file}: {len(extra)} tensors in the shards are not listed in the "
                                  f"index: {_first_few(extra)}")

    # -- tensors --
    def keys(self) -> List[str]:
        """Tensor names, in storage order (shard by shard, by byte offset)."""
        return sorted(self._where, key=lambda k: (self._shards.index(self._where[k]), self._where[k].infos[k].offset))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._where[key].infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> str:
        """numpy dtype name: "bfloat16", "float16", "float32", ..."""
        return self.info(key).dtype

    def nbytes(self, key: str) -> int:
        return self.info(key).nbytes

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: self.info(k).shape for k in self._where}

    def read_bytes(self, key: str) -> np.ndarray:
        """The tensor's raw little-endian C-order bytes (fresh uint8 array of `nbytes`)."""
        self.info(key)
        return self._where[key].read_bytes(key)

    def view_bytes(self, key: str, verify: bool = True) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array, memory-mapped from the shard when possible (no copy).

        Checked like `read_bytes` (CRC of .bin storages) unless `verify` is false (the caller checks the
        file's `checksums()` itself). The mapping is released with the array.
        """
        self.info(key)
        return self._where[key].view_bytes(key, verify)

    def checksums(self) -> Dict[str, List[Checksum]]:
        """{shard path: byte ranges with a recorded CRC-32} (the zip members of .bin shards)."""
        return {s.path: s.checksums() for s in self._shards}

    def file_range(self, key: str) -> Optional[Tuple[str, int, int]]:
        """(file, offset, length) when the tensor's C-order bytes are stored as one range of one file."""
        rng = self._where[key].file_range(key) if key in self._where else None
        return None if rng is None else (self._where[key].path, rng[0], rng[1])

    def read(self, key: str) -> np.ndarray:
        """The tensor as a fresh, writable numpy array of its stored dtype and shape (bf16: ml_dtypes.bfloat16)."""
        info = self.info(key)
        return self.read_bytes(key).view(numpy_dtype(info.dtype)).reshape(info.shape)

    def read_as(self, key: str, dtype: Optional[str] = None) -> np.ndarray:
        """The tensor as a fresh, writable array of `dtype` (a numpy dtype name; None = as stored), its bytes
        read once: a conversion reads blocks of at most READ_BLOCK bytes and converts each into the result, so
        memory stays at the result plus one block (bf16 -> float32 is exact: a 16-bit shift)."""
        info = self.info(key)
        if dtype is None or dtype == info.dtype:
            return self.read(key)
        src, out = numpy_dtype(info.dtype), np.empty(info.shape, numpy_dtype(dtype))
        flat, pos = out.reshape(-1), 0
        for block in self._where[key].blocks(key, READ_BLOCK - READ_BLOCK % src.itemsize):
            values = np.frombuffer(block, src)
            convert_into(values, flat[pos:pos + values.size])
            pos += values.size
        return out

    def items(self) -> Iterator[Tuple[str, np.ndarray]]:
        for key in self.keys():
            yield key, self.read(key)

    # -- config --
    @property
    def config_path(self) -> str:
        base = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        return os.path.join(base, layout.CONFIG)

    @property
    def hf_config(self) -> Dict[str, object]:
        """The HF fields of config.json (without the converter's "ms_xcomposer" section)."""
        d = read_json(self.config_path, "config")
        d.pop(layout.MS_SECTION, None)
        return d

    @property
    def family(self) -> "Family":  # noqa: F821 - ms_xcomposer.families, imported lazily (it imports the keymaps)
        """The model family: recorded by the converter (MS dir), or from config.json's `architectures` (HF dir)."""
        from ms_xcomposer.families import family_for_hf_config, family_for_section

        if self.kind == "ms":
            return family_for_section(self._ms_section(), self.config_path)
        return family_for_hf_config(self.hf_config, self.config_path)

    @property
    def config(self):
        """The family's model config: stored by the converter (MS dir), or inferred from config.json + shapes
        (HF dir)."""
        if self._config is None:
            if self.kind == "ms":
                self._config = self.family.config_from_section(self._ms_section(), self.config_path)
            else:
                try:
                    self._config = self.family.config_from_hf(self.hf_config, self.shapes())
                except ConfigError:
                    raise
                except (KeyError, TypeError, ValueError) as e:  # a config.json field of the wrong type
                    raise ConfigError(f"{self.config_path}: {type(e).__name__}: {e}") from None
        return self._config

    def _ms_section(self) -> Dict[str, object]:
        d = read_json(self.config_path, "config")
        if not isinstance(d.get(layout.MS_SECTION), dict):
            raise ConfigError(f"{self.config_path} has no {layout.MS_SECTION!r} section: is "
                              f"{os.path.dirname(self.config_path)} a converted directory?")
        return d[layout.MS_SECTION]

    @property
    def kept_unknown(self) -> List[str]:
        """Tensors a converted directory's conversion report lists as kept unknown (`convert --keep-unknown`):
        not parameters of the model, so loaders skip them. Empty for other checkpoints."""
        report = os.path.join(os.path.dirname(self.config_path), layout.REPORT)
        if self.kind != "ms" or not os.path.isfile(report):
            return []
        names = read_json(report, "conversion report").get("unknown_kept", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"conversion report {report}: 'unknown_kept' is not a list of tensor names")
        return names

    def close(self) -> None:
        for s in self._shards:
            s.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def read_json(path: str, what: str, error: type = CheckpointError) -> dict:
    """The JSON object in `path`; `error` (naming the file as "`what` file PATH") when it is missing, not JSON,
    or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{what} file {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{what} file {path} does not hold a JSON object")
    return d


def _first_few(items: Iterable[str], n: int = 8) -> str:
    items = list(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _open_indexed(directory: str, index_name: str, kind: str, fmt: Optional[str]) -> CheckpointReader:
    index_path = os.path.join(directory, index_name)
    index = read_json(index_path, "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"index {index_path} has no 'weight_map' object (or it is empty)")
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, str(f)))]
    if missing:
        keys = [k for k, f in weight_map.items() if f == missing[0]]
        raise CheckpointError(
            f"index {index_path} lists shard file(s) that do not exist: {_first_few(missing)} "
            f"(e.g. for tensors {_first_few(keys, 3)})"
        )
    if fmt is None:
        fmt = str(index.get("metadata", {}).get("format", "ckpt"))
    shards: List[_Shard] = []
    try:
        for f in files:
            shards.append(open_shard(os.path.join(directory, f)))
    except CheckpointError:
        for s in shards:
            s.close()
        raise
    return CheckpointReader(directory, kind, fmt, shards, index_path, weight_map)


def open_checkpoint(path: str) -> CheckpointReader:
    """Open an HF directory (safetensors or `.bin`, sharded with an index or one file), a converted MindSpore
    directory (config.json with an "ms_xcomposer" section and `mindspore_model.index.json`), or one file.

    Nothing but headers is read here; see `CheckpointReader` for the per-tensor API. Raises `CheckpointError`.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        shard = open_shard(path)
        ext = os.path.splitext(path)[1].lower()
        fmt = {".safetensors": "safetensors", ".ckpt": "ckpt"}.get(ext, "bin")
        return CheckpointReader(path, "ms" if ext == ".ckpt" else "hf", fmt, [shard])
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if os.path.isfile(os.path.join(path, layout.MS_INDEX)):
        return _open_indexed(path, layout.MS_INDEX, "ms", None)
    if os.path.isfile(os.path.join(path, layout.HF_ST_INDEX)):
        return _open_indexed(path, layout.HF_ST_INDEX, "hf", "safetensors")
    if os.path.isfile(os.path.join(path, layout.HF_ST_SINGLE)):
        return CheckpointReader(path, "hf", "safetensors", [open_shard(os.path.join(path, layout.HF_ST_SINGLE))])
    if os.path.isfile(os.path.join(path, layout.HF_BIN_INDEX)):
        return _open_indexed(path, layout.HF_BIN_INDEX, "hf", "bin")
    if os.path.isfile(os.path.join(path, layout.HF_BIN_SINGLE)):
        return CheckpointReader(path, "hf", "bin", [open_shard(os.path.join(path, layout.HF_BIN_SINGLE))])
    raise CheckpointError(
        f"{path} holds no checkpoint: expected {layout.MS_INDEX}, {layout.HF_ST_INDEX}, {layout.HF_ST_SINGLE}, "
        f"{layout.HF_BIN_INDEX} or {layout.HF_BIN_SINGLE}"
    )


def as_ml_dtypes(array: np.ndarray) -> np.ndarray:
    """`array` with a bf16 dtype of another library (e.g. MindSpore's own numpy bf16 type) viewed as
    `ml_dtypes.bfloat16`; any other array unchanged."""
    if dtype_name(array.dtype) == "bfloat16" and array.dtype != _NP_DTYPES["bfloat16"]:
        return array.view(np.uint16).view(ml_dtypes.bfloat16)
    return array


def to_mindspore_tensor(array: np.ndarray) -> "mindspore.Tensor":  # noqa: F821 - imported lazily
    """A `mindspore.Tensor` with the same dtype, shape and bits as `array` (bf16 from ml_dtypes included).

    MindSpore 2.10's `Tensor()` takes ml_dtypes bfloat16 arrays directly and copies the bits unchanged
    (NaN payloads and subnormals included); the array is made C-contiguous first.
    """
    import mindspore as ms  # imported here: readers are also used where MindSpore is not needed

    array = np.asarray(array, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    return ms.Tensor(as_ml_dtypes(array))
