"""The streaming engine under `convert` and `export_hf`: verify and hash the sources, cast, write.

Per source shard, a `FileScanner` thread reads the file once from start to end through small memory-mapped
windows: it feeds the file's sha256 (for the report) and, with `check_crc`, checks the CRC-32 of every zip
member of a `.bin`. The calling thread writes the tensors in job order. A tensor stored unchanged goes from
the source file to the output inside the kernel (`writers.FileSlice`, like `cp`), never through this
process's memory; a cast (or --check-finite) maps the tensor and computes from it. Writer and scanner stay
within `LEAD_BYTES` of each other in a file (with CRCs, the writer only takes verified bytes), so the bytes
are read from disk once and the other side finds them in the page cache, even on machines with less memory
than the checkpoint. Jobs are interleaved across shards (`interleave`) so that all scanners work at once:
hashing, the main CPU cost, then uses every core.

Memory: the scanners' 64 MiB windows, plus one tensor (and its cast) when casting or checking values:
far below 2 x the largest tensor.
"""
from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ms_xcomposer.conversion.errors import CheckpointError
from ms_xcomposer.conversion.readers import Checksum, CheckpointReader, numpy_dtype
from ms_xcomposer.conversion.writers import FileSlice, ShardSet, TensorSpec

FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")
_CAST_CHUNK = 1 << 24  # elements cast per step, so the fp32 intermediate stays small
_EXPONENT_MASK = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00),
                  "float32": (np.uint32, 0x7F800000), "float64": (np.uint64, 0x7FF0000000000000)}
SCAN_CHUNK = 64 << 20  # bytes mapped at a time by a scanner
LEAD_BYTES = 1 << 30  # how far a scanner may run ahead of the writer in its file


def changes_bytes(src: str, dst: str) -> bool:
    """Whether `cast(.., src, dst)` computes new values (only between two different float dtypes)."""
    return src != dst and src in FLOAT_DTYPES and dst in FLOAT_DTYPES


def cast(data: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Values of `data` (C-order bytes or array of dtype `src`) as dtype `dst`, flat.

    Goes through float32 and rounds once to `dst` (round-to-nearest-even, as numpy and ml_dtypes do);
    non-float dtypes and `src == dst` come back unchanged.
    """
    x = data.reshape(-1).view(numpy_dtype(src))
    if not changes_bytes(src, dst):
        return x
    out = np.empty(x.size, numpy_dtype(dst))
    with np.errstate(over="ignore"):  # values past the target's range become inf, as IEEE rounding says
        for i in range(0, x.size, _CAST_CHUNK):
            out[i:i + _CAST_CHUNK] = x[i:i + _CAST_CHUNK].astype(np.float32).astype(out.dtype)
    return out


def count_non_finite(data: np.ndarray, dtype: str) -> Tuple[int, int]:
    """(number of inf/nan values, flat index of the first) in C-order bytes of `dtype`; (0, -1) if none."""
    if dtype not in _EXPONENT_MASK:
        return 0, -1
    int_type, mask = _EXPONENT_MASK[dtype]
    bad = (data.reshape(-1).view(int_type) & int_type(mask)) == int_type(mask)
    n = int(np.count_nonzero(bad))
    return n, (int(np.argmax(bad)) if n else -1)


@dataclass(frozen=True)
class Job:
    """Read `source` (stored as `source_dtype`, `source_nbytes`), apply `transform` (a key-table transform on
    the source-shaped array; None when the bytes pass unchanged), cast to `spec.dtype`, write as `spec`."""

    source: str
    source_dtype: str
    source_nbytes: int
    spec: TensorSpec
    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None


def hash_file(path: str) -> Tuple[int, str]:
    """(size, sha256 hex) of a whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(SCAN_CHUNK), b""):
            h.update(chunk)
    return os.path.getsize(path), h.hexdigest()


class FileScanner(threading.Thread):
    """Reads one file start to end: sha256 of every byte, CRC-32 of each `Checksum` range (sorted, disjoint).

    The file is read through small memory-mapped windows (no copy into this process). `wait_ready(end)`
    blocks the writer until it may take bytes up to `end`: with checksums, once they are verified (raising the
    scanner's error, e.g. a CRC mismatch naming the tensor); without, once the scanner is within `lead` bytes
    (so both read the same pages while they are cached). `consumed(end)` reports the writer's position, which
    bounds how far ahead the scanner reads.
    """

    def __init__(self, path: str, checks: Sequence[Checksum], lead: Optional[int] = None) -> None:
        super().__init__(name=f"ms-xcomposer-scan-{os.path.basename(path)}", daemon=True)
        self.path, self.lead = path, LEAD_BYTES if lead is None else lead
        self.checks = sorted(checks, key=lambda c: c.offset)
        self._check_ends = [c.offset + c.length for c in self.checks]
        self.size = os.path.getsize(path)
        self.sha = hashlib.sha256()
        self.error: Optional[BaseException] = None
        self._cv = threading.Condition()
        self._pos = self._verified = self._consumed = self._want = 0
        self._stopped = False

    def run(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as f:
                self._scan(f.fileno())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting writer
            with self._cv:
                self.error = e
                self._cv.notify_all()

    def _scan(self, fd: int) -> None:
        ci, crc = 0, 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while self._pos < self.size:
            with self._cv:
                self._cv.wait_for(lambda: self._stopped or self._pos < max(self._want, self._consumed + self.lead))
                if self._stopped:
                    return
            start = self._pos
            end = min(self.size, start + SCAN_CHUNK)
            if os.fstat(fd).st_size < end:  # mapping past the end would fault (SIGBUS) on access
                raise CheckpointError(f"{self.path}: ended before byte {end}, expected {self.size}: truncated "
                                      "while reading")
            if end < self.size:  # start reading the next window from disk while this one is hashed
                os.posix_fadvise(fd, end, min(SCAN_CHUNK, self.size - end), os.POSIX_FADV_WILLNEED)
            mm = mmap.mmap(fd, end - start, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ, offset=start)
            chunk = memoryview(mm)
            try:
                self.sha.update(chunk)
                while ci < len(self.checks) and self.checks[ci].offset < end:
                    c = self.checks[ci]
                    a, b = max(start, c.offset), min(end, c.offset + c.length)
                    if a < b:
                        crc = zlib.crc32(chunk[a - start:b - start], crc)
                    if c.offset + c.length > end:
                        break
                    if crc != c.crc:
                        raise CheckpointError(f"{self.path}: {c.label}: CRC-32 of its bytes does not match the "
                                              "zip directory: corrupted shard")
                    ci, crc = ci + 1, 0
            finally:
                chunk.release()  # before unmapping: no view may outlive the mapping
                mm.close()
            with self._cv:
                self._pos = end
                # bytes up to a checksum range still being read are not verified yet
                self._verified = min(end, self.checks[ci].offset) if ci < len(self.checks) else end
                self._cv.notify_all()

    def wait_ready(self, end: int) -> None:
        """Block until the writer may take this file's bytes before `end` (see the class doc)."""
        target = end if self.checks else max(0, end - self.lead)
        i = bisect.bisect_left(self._check_ends, end)
        if i < len(self.checks) and self.checks[i].offset < end:  # verified only once its whole range is read
            end = self._check_ends[i]
        with self._cv:
            self._want = max(self._want, end)
            self._cv.notify_all()
            self._cv.wait_for(lambda: self.error is not None or self._verified >= target)
            if self.error is not None:
                raise self.error

    def consumed(self, end: int) -> None:
        with self._cv:
            self._consumed = max(self._consumed, end)
            self._cv.notify_all()

    def result(self) -> Tuple[int, str]:
        """(size, sha256 hex) once the whole file is scanned."""
        self.consumed(self.size)
        with self._cv:
            self._cv.wait_for(lambda: self.error is not None or self._pos >= self.size)
            if self.error is not None:
                raise self.error
        self.join()
        return self.size, self.sha.hexdigest()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self.join()


@dataclass
class StreamStats:
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    hashes: Dict[str, Tuple[int, str]] = field(default_factory=dict)  # path -> (size, sha256 hex)


def interleave(jobs: Sequence[Job], reader: CheckpointReader) -> List[Job]:
    """Jobs reordered so that all source files advance together (each in storage order, by bytes).

    Each file's sha256 is a sequential computation; interleaving the files lets one hashing thread per file
    run at the same time. The order is a pure function of the checkpoint's layout, so output is reproducible.
    """
    queues: Dict[str, List[Job]] = {}
    for job in jobs:
        queues.setdefault(reader.info(job.source).file, []).append(job)
    totals = {f: max(1, sum(j.source_nbytes for j in q)) for f, q in queues.items()}
    done = {f: 0 for f in queues}
    heads = {f: 0 for f in queues}
    out: List[Job] = []
    while len(out) < len(jobs):
        f = min((f for f in queues if heads[f] < len(queues[f])), key=lambda f: (done[f] / totals[f], f))
        job = queues[f][heads[f]]
        heads[f] += 1
        done[f] += job.source_nbytes
        out.append(job)
    return out


def stream(reader: CheckpointReader, jobs: Sequence[Job], shards: ShardSet, other_files: Sequence[str] = (),
           check_finite: bool = False, check_crc: bool = False,
           progress: Optional[Callable[[int, int], None]] = None) -> StreamStats:
    """Write every job to `shards` in order: each tensor hashed (via its file), checked, cast.

    check_finite: refuse inf/nan (also after a cast); check_crc: verify the CRC-32 the zip directory of a
    `.bin` records for each storage before its bytes are written (torch.load does not; it costs about a
    third more CPU than the sha256). Returns counts and `hashes` {path: (size, sha256)} of every shard file
    and of `other_files`. `progress(n, total)` gets the source bytes of each tensor once written, and the total.
    """
    stats = StreamStats()
    total = sum(j.source_nbytes for j in jobs)
    checks = reader.checksums() if check_crc else {}
    scanners = {f: FileScanner(f, checks.get(f, ())) for f in reader.files}
    for sc in scanners.values():
        sc.start()
    try:
        for job in jobs:
            info = reader.info(job.source)
            scanner = scanners[info.file]
            end = max((o + n for o, n in info.segments), default=0)
            scanner.wait_ready(end)
            where = reader.file_range(job.source)
            changes = changes_bytes(job.source_dtype, job.spec.dtype) or job.transform is not None
            if changes or check_finite or where is None:
                raw = reader.view_bytes(job.source, verify=False)  # CRCs, when asked for, are the scanner's job
                if check_finite:
                    _check_finite(reader, job.source, raw, job.source_dtype, "")
                out = raw
                if job.transform is not None:
                    shaped = raw.view(numpy_dtype(job.source_dtype)).reshape(info.shape)
                    out = raw = np.ascontiguousarray(job.transform(shaped)).reshape(-1).view(np.uint8)
                if changes_bytes(job.source_dtype, job.spec.dtype):
                    out = cast(raw, job.source_dtype, job.spec.dtype)
                    if check_finite:
                        _check_finite(reader, job.source, out, job.spec.dtype, f" after casting to {job.spec.dtype}")
                shards.add(job.spec, out)
                del raw, out
            else:  # stored unchanged: the kernel copies the bytes from the source file
                shards.add(job.spec, FileSlice(*where))
            scanner.consumed(end)
            stats.tensors += 1
            stats.bytes_read += job.source_nbytes
            stats.bytes_written += job.spec.nbytes
            if progress is not None:
                progress(job.source_nbytes, total)
        for sc in scanners.values():
            sc.consumed(sc.size)
        stats.hashes = {f: sc.result() for f, sc in scanners.items()}
    finally:
        for sc in scanners.values():
            sc.stop()
    stats.hashes.update({f: hash_file(f) for f in other_files if f not in stats.hashes})
    return stats


def _check_finite(reader: CheckpointReader, key: str, data: np.ndarray, dtype: str, when: str) -> None:
    n, first = count_non_finite(data, dtype)
    if n:
        info = reader.info(key)
        value = data.reshape(-1).view(numpy_dtype(dtype))[first]
        raise CheckpointError(
            f"{info.file}: tensor {key!r} {dtype}{list(info.shape)} has {n} non-finite values{when} "
            f"(first at flat index {first}: {float(value)}); expected all finite (--check-finite)"
        )

