"""Streamed shard writers (.ckpt, safetensors), shard planning, index/json files and the atomic output directory.

Both writers take one tensor at a time and write its bytes straight to the file, so memory never holds more
than the tensor being written. A tensor stored unchanged can be passed as a `FileSlice` of its source file:
its bytes then go from file to file inside the kernel (`copy_file_range`, as `cp` does), never through memory.

- `.ckpt`: MindSpore's protobuf `Checkpoint { repeated Value value = 1; }` with `Value { string tag = 1;
  TensorProto tensor = 2; }` and `TensorProto { repeated int64 dims = 1; string tensor_type = 2;
  bytes tensor_content = 3; }`. A repeated field is a sequence of independent records, so each tensor is
  written as its own record(s); tensors over 512 MiB are split into several consecutive records with the same
  tag, which `mindspore.load_checkpoint` joins (it writes them the same way). The bytes of a record are what
  protobuf's own serializer gives (checkpoint.proto is proto2: dims unpacked), so a file equals
  `mindspore.save_checkpoint`'s for the same tensors; no CRC trailer is written (MindSpore 2.10 checks one
  only when `load_checkpoint(crc_check=True)` asks, and reads files without it).
- safetensors: the header (names, dtypes, shapes, offsets) is known before any data, so it is written first
  and the data streamed after it, in header order.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ms_xcomposer.conversion import destination, layout
from ms_xcomposer.conversion.errors import CheckpointError
from ms_xcomposer.conversion.readers import SAFETENSORS_DTYPES, CKPT_TYPES, numpy_dtype

CKPT_SLICE_BYTES = 512 << 20  # MindSpore's SLICE_SIZE: one protobuf bytes field stays far below 2 GiB
_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_CKPT_NAMES = {v: k for k, v in CKPT_TYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: output name, dtype name, shape."""

    name: str
    dtype: str
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize


def parse_size(text: str) -> int:
    """'5GB' -> 5*10**9, '512MiB' -> 512*2**20, '1000' -> 1000 bytes (HF's convention for shard sizes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r}; expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> List[List[TensorSpec]]:
    """Group tensors, in order, into shards of at most `max_bytes` (a bigger tensor gets a shard of its own)."""
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


@dataclass(frozen=True)
class FileSlice:
    """`length` bytes of file `path` starting at `offset`, copied by the kernel instead of through memory."""

    path: str
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, part: slice) -> "FileSlice":
        start, stop, _ = part.indices(self.length)
        return FileSlice(self.path, self.offset + start, max(0, stop - start))


Payload = Union[memoryview, FileSlice]


def _payload(data: Union[np.ndarray, FileSlice], spec: TensorSpec, path: str) -> Payload:
    size = data.length if isinstance(data, FileSlice) else data.nbytes
    if size != spec.nbytes:
        raise CheckpointError(f"{path}: tensor {spec.name!r} {spec.dtype}{list(spec.shape)} needs {spec.nbytes} "
                              f"bytes, got {size}")
    if isinstance(data, FileSlice):
        return data
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def _copy_file_slice(src: FileSlice, out_fd: int) -> None:
    """Append `src` to `out_fd` (at its current position) with copy_file_range, or sendfile where unsupported."""
    with open(src.path, "rb", buffering=0) as f:
        fd, offset, left = f.fileno(), src.offset, src.length
        use_sendfile = False
        while left:
            try:
                n = (os.sendfile(out_fd, fd, offset, left) if use_sendfile
                     else os.copy_file_range(fd, out_fd, left, offset))
            except OSError as e:
                if use_sendfile or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_sendfile = True  # e.g. across file systems on older kernels
                continue
            if n == 0:
                raise CheckpointError(f"{src.path}: ended at byte {offset} while copying bytes up to "
                                      f"{src.offset + src.length}: truncated while reading")
            offset += n
            left -= n


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, payload_len: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(payload_len)


class _ShardWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "wb", buffering=0)  # unbuffered: kernel copies append at the file position
        self.bytes = 0

    def _write(self, data: Union[bytes, Payload]) -> None:
        if isinstance(data, FileSlice):
            _copy_file_slice(data, self._f.fileno())
        else:
            view = memoryview(data)
            done = 0
            while done < len(view):  # a raw write may be partial (Linux caps one write near 2 GiB)
                done += self._f.write(view[done:])
        self.bytes += len(data)

    def close(self) -> None:
        self.discard()

    def discard(self) -> None:
        """Close the file without completeness checks (the caller is abandoning the output)."""
        if not self._f.closed:
            self._f.close()


class CkptShardWriter(_ShardWriter):
    """Writes a MindSpore `.ckpt` one tensor at a time (see the module docstring for the record layout)."""

    def add(self, spec: TensorSpec, data: Union[np.ndarray, FileSlice]) -> None:
        content = _payload(data, spec, self.path)
        ttype = _CKPT_NAMES[spec.dtype].encode()
        tag = spec.name.encode("utf-8")
        dims = b"".join(b"\x08" + _varint(d) for d in spec.shape)  # proto2: unpacked repeated int64 (field 1)
        for start in range(0, max(len(content), 1), CKPT_SLICE_BYTES):
            chunk = content[start:start + CKPT_SLICE_BYTES]
            tensor = dims + _len_field(2, len(ttype)) + ttype + _len_field(3, len(chunk))
            tensor_len = len(tensor) + len(chunk)
            value = _len_field(1, len(tag)) + tag + _len_field(2, tensor_len)
            self._write(_len_field(1, len(value) + tensor_len) + value + tensor)
            self._write(chunk)


class SafetensorsShardWriter(_ShardWriter):
    """Writes a safetensors file: the header for `specs` first, then each tensor's bytes in that order."""

    def __init__(self, path: str, specs: Sequence[TensorSpec], metadata: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(path)
        header: Dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for spec in specs:
            header[spec.name] = {"dtype": _ST_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data block starts 8-byte aligned, as the safetensors library does
        self._write(len(text).to_bytes(8, "little") + text)
        self._pending = list(specs)

    def add(self, spec: TensorSpec, data: Union[np.ndarray, FileSlice]) -> None:
        if isinstance(data, FileSlice):
            self._next(spec)
            self._write(_payload(data, spec, self.path))
        else:
            self.add_chunks(spec, [data])

    def _next(self, spec: TensorSpec) -> None:
        if not self._pending or self._pending[0] != spec:
            expected = self._pending[0].name if self._pending else "nothing"
            raise CheckpointError(f"{self.path}: got tensor {spec.name!r}, expected {expected!r} next")
        self._pending.pop(0)

    def add_chunks(self, spec: TensorSpec, chunks: Iterable[np.ndarray]) -> None:
        """Write the next tensor from consecutive pieces of its C-order values (bytes checked at the end)."""
        self._next(spec)
        n = 0
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
            self._write(data)
            n += len(data)
        if n != spec.nbytes:
            raise CheckpointError(f"{self.path}: tensor {spec.name!r} {spec.dtype}{list(spec.shape)} needs "
                                  f"{spec.nbytes} bytes, got {n}")

    def close(self) -> None:
        super().close()
        if self._pending:
            raise CheckpointError(f"{self.path}: {len(self._pending)} tensors were never written, "
                                  f"first {self._pending[0].name!r}")


@dataclass
class ShardSetResult:
    """What a `ShardSet` wrote: shard files (name, bytes, tensor count) and the index's weight_map."""

    shards: List[Dict[str, object]] = field(default_factory=list)
    weight_map: Dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(int(s["tensor_bytes"]) for s in self.shards)


class ShardSet:
    """Writes tensors, in the planned order, into `stem-0000i-of-0000N.ext` shards under `directory`."""

    def __init__(self, directory: str, stem: str, fmt: str, specs: Sequence[TensorSpec], max_shard_bytes: int,
                 metadata: Optional[Mapping[str, str]] = None) -> None:
        if fmt not in ("ckpt", "safetensors"):
            raise ValueError(f"unknown output format {fmt!r}; expected 'ckpt' or 'safetensors'")
        self.directory, self.fmt, self.metadata = directory, fmt, metadata
        self._plan = plan_shards(specs, max_shard_bytes)
        self._names = [layout.shard_name(stem, i + 1, len(self._plan), fmt) for i in range(len(self._plan))]
        self._shard = -1
        self._pos = 0
        self._writer: Optional[_ShardWriter] = None
        self.result = ShardSetResult()

    def add(self, spec: TensorSpec, data: Union[np.ndarray, FileSlice]) -> None:
        """Write the next tensor (`data`: its C-order bytes or values, or a FileSlice holding its bytes)."""
        if self._writer is None or self._pos == len(self._plan[self._shard]):
            self._next_shard()
        expected = self._plan[self._shard][self._pos]
        if expected != spec:
            raise CheckpointError(f"{self._writer.path}: got tensor {spec.name!r}, expected {expected.name!r}")
        self._writer.add(spec, data)
        self._pos += 1
        self.result.weight_map[spec.name] = self._names[self._shard]

    def _next_shard(self) -> None:
        self._finish_shard()
        self._shard += 1
        self._pos = 0
        path = os.path.join(self.directory, self._names[self._shard])
        self._writer = (CkptShardWriter(path) if self.fmt == "ckpt"
                        else SafetensorsShardWriter(path, self._plan[self._shard], self.metadata))

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            specs = self._plan[self._shard]
            self.result.shards.append({"name": self._names[self._shard], "bytes": self._writer.bytes,
                                       "tensors": len(specs), "tensor_bytes": sum(s.nbytes for s in specs)})
            self._writer = None

    def close(self) -> ShardSetResult:
        """Finish the last shard; fails if a planned tensor was never written."""
        self._finish_shard()
        written = len(self.result.weight_map)
        planned = sum(len(s) for s in self._plan)
        if written != planned:
            raise CheckpointError(f"{self.directory}: wrote {written} of {planned} planned tensors")
        return self.result

    def abort(self) -> None:
        """Close the open shard file without checks (the output directory is being thrown away)."""
        if self._writer is not None:
            self._writer.discard()
            self._writer = None


def write_json(path: str, obj: object) -> None:
    """JSON with a stable layout (indent 2, insertion order, trailing newline), so reruns give identical bytes."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def copy_side_files(src_dir: str, dst_dir: str, names: Sequence[str] = layout.TOKENIZER_FILES) -> List[str]:
    """Copy the tokenizer / generation files present in `src_dir`; returns the names copied."""
    copied = []
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


class AtomicDirectory:
    """Builds an output directory in a temporary sibling and renames it into place only when complete.

    Use as a context manager: files go to `.tmp`; a normal exit renames it to `dst` (replacing an existing
    `dst` only when `overwrite`), an exception or interrupt removes it, leaving `dst` absent or intact.
    Before anything is written, `dst` is checked (`destination.check_location`, `check_replaceable` with
    `markers`: the files that show this tool wrote a directory) and the leftovers of killed writers of `dst`
    are removed (`destination.clean_stale`; each message goes to `warn` at once and stays in `warnings`).
    The temporary names record this process (see `destination`), so a later run can clean up after a SIGKILL.
    """

    def __init__(self, dst: str, overwrite: bool = False, protect: Sequence[str] = (),
                 markers: Sequence[str] = destination.OUTPUT_MARKERS,
                 warn: Optional[Callable[[str], None]] = None) -> None:
        self.dst = os.path.abspath(dst)
        destination.check_location(dst)
        for p in protect:
            p = os.path.realpath(p)
            d = os.path.realpath(self.dst)
            if d == p or p.startswith(d + os.sep) or d.startswith(p + os.sep):
                raise CheckpointError(f"destination {self.dst} overlaps the source {p}; choose another directory")
        self.warnings: List[str] = destination.clean_stale(self.dst)
        for message in self.warnings:
            if warn is not None:
                warn(message)  # now: the checks below may refuse the destination
        destination.check_replaceable(self.dst, overwrite, markers)
        parent = os.path.dirname(self.dst)
        self._made: List[str] = []  # parent directories this run creates, deepest first
        d = parent
        while not os.path.isdir(d):
            self._made.append(d)
            d = os.path.dirname(d)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=destination.temp_prefix(self.dst, "tmp"), dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it 0700

    def __enter__(self) -> "AtomicDirectory":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            for d in self._made:
                try:
                    os.rmdir(d)  # only if still empty
                except OSError:
                    break
            return
        self._commit()

    def _commit(self) -> None:
        if not os.path.lexists(self.dst):
            os.rename(self.tmp, self.dst)
            return
        old = tempfile.mkdtemp(prefix=destination.temp_prefix(self.dst, "old"), dir=os.path.dirname(self.dst))
        aside = os.path.join(old, destination.ASIDE)
        os.rename(self.dst, aside)
        try:
            os.rename(self.tmp, self.dst)
        except BaseException:
            os.rename(aside, self.dst)
            shutil.rmtree(self.tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
