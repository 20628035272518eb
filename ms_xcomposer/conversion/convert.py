"""Library entry points: `convert` (HF -> MindSpore dir), `export_hf` (MindSpore dir -> HF safetensors), `verify`.

They return result objects and never print; progress is reported through an optional `progress(n_bytes, total)`
callback. Bad input raises `CheckpointError` (a ValueError) or `ConfigError` before anything is written;
output is built in a temporary sibling of the destination and renamed into place only when complete.
The converted directory layout is described in `ms_xcomposer.conversion.layout`.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ms_xcomposer import __version__
from ms_xcomposer.config import ConfigError
from ms_xcomposer.conversion import keymap, layout
from ms_xcomposer.conversion.errors import CheckpointError
from ms_xcomposer.conversion.pipeline import FLOAT_DTYPES, Job, cast, interleave, stream
from ms_xcomposer.conversion.readers import CheckpointReader, open_checkpoint
from ms_xcomposer.conversion.writers import (AtomicDirectory, ShardSet, TensorSpec, copy_side_files, parse_size,
                                             write_json)

DTYPE_CHOICES = ("keep", "float32", "float16", "bfloat16")
FORMAT_CHOICES = ("ckpt", "safetensors")
DEFAULT_SHARD_SIZE = "5GB"
Progress = Optional[Callable[[int, int], None]]  # (bytes just done, total bytes)
Warn = Optional[Callable[[str], None]]  # told each warning as it arises (they are also in the result)
_LIST_MAX = 50  # names listed in one error message


@dataclass
class ConversionResult:
    """What `convert` / `export_hf` did. Sizes in bytes, time in seconds, `peak_rss` of this process."""

    source: str
    destination: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """One line: tensors, GB, seconds, GB/s, peak memory."""
        return (f"{self.tensors} tensors, {self.bytes_read / 1e9:.2f} GB in {self.seconds:.1f} s "
                f"({self.gb_per_s:.2f} GB/s), peak memory {self.peak_rss / 1e9:.2f} GB -> {self.destination}")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _names(items: Sequence[str]) -> str:
    items = list(items)
    more = f" ... (+{len(items) - _LIST_MAX} more)" if len(items) > _LIST_MAX else ""
    return ", ".join(items[:_LIST_MAX]) + more


def _shard_bytes(shard_size: Union[int, str]) -> int:
    return shard_size if isinstance(shard_size, int) else parse_size(shard_size)


def _check_plan(reader: CheckpointReader, plan: keymap.Plan) -> None:
    """Raise one error naming every missing, unknown and wrongly shaped tensor."""
    problems = []
    config = reader.config
    if plan.missing:
        problems.append(f"{len(plan.missing)} required tensors are missing (the config has "
                        f"{config.llm.num_hidden_layers} decoder layers): {_names(plan.missing)}")
    if plan.unknown:
        problems.append(f"{len(plan.unknown)} tensors are not parameters of this {reader.family.name} model: "
                        f"{_names(plan.unknown)}; pass --keep-unknown to keep them under their own names")
    for target, first, second in plan.duplicates:
        problems.append(f"tensors {first!r} and {second!r} are both parameter {target!r} (the checkpoint mixes "
                        "two key layouts, or repeats a tensor)")
    for name, expected, found in plan.shape_errors:
        problems.append(f"{reader.info(name).file}: tensor {name!r} has shape {list(found)}, but the config "
                        f"({layout.CONFIG} + inferred vision tower) expects {list(expected)}")
    if problems:
        raise CheckpointError(f"{reader.path}: cannot convert:\n  " + "\n  ".join(problems))


def _out_dtype(requested: str, source: str) -> str:
    return source if requested == "keep" or source not in FLOAT_DTYPES else requested


def _source_files(reader: CheckpointReader, side_files: Sequence[str]) -> List[str]:
    files = list(reader.files)
    if reader.index_file:
        files.append(reader.index_file)
    base = os.path.dirname(reader.config_path)
    files += [os.path.join(base, n) for n in [layout.CONFIG, *side_files] if os.path.isfile(os.path.join(base, n))]
    return sorted(dict.fromkeys(os.path.abspath(f) for f in files))


def _hf_torch_dtype(dtypes: Sequence[str]) -> Optional[str]:
    floats = sorted({d for d in dtypes if d in FLOAT_DTYPES})
    return floats[0] if len(floats) == 1 else None


def _report(direction: str, reader: CheckpointReader, dst_format: str, options: Dict[str, object],
            hashes: Dict[str, Tuple[int, str]], jobs: Sequence[Job], weight_map: Dict[str, str],
            shards: List[Dict[str, object]], dropped: Sequence[Tuple[str, str]],
            renamed: Sequence[Dict[str, str]], kept_unknown: Sequence[str], copied: Sequence[str]) -> dict:
    base = os.path.dirname(reader.config_path)
    dtype_counts: Dict[str, int] = {}
    for j in jobs:
        dtype_counts[j.spec.dtype] = dtype_counts.get(j.spec.dtype, 0) + 1
    return {
        "tool": f"ms-xcomposer {__version__}",
        "direction": direction,
        "source": {
            "path": reader.path,
            "kind": reader.kind,
            "format": reader.format,
            "files": [{"name": os.path.relpath(p, base), "bytes": size, "sha256": sha}
                      for p, (size, sha) in hashes.items()],
        },
        "destination": {"format": dst_format, "shards": shards},
        "options": options,
        "tensor_count": len(jobs),
        "total_bytes": sum(j.spec.nbytes for j in jobs),
        "dtype_counts": dtype_counts,
        "tensors": {j.spec.name: {"source": j.source, "source_dtype": j.source_dtype, "dtype": j.spec.dtype,
                                  "shape": list(j.spec.shape), "shard": weight_map[j.spec.name]} for j in jobs},
        "dropped": [{"name": n, "reason": r} for n, r in dropped],
        "renamed": list(renamed),
        "unknown_kept": list(kept_unknown),
        "copied_files": list(copied),
    }


@dataclass(frozen=True)
class _Output:
    """What one direction writes: its name in the report, the shard format and file stem, the index file and
    its metadata, the safetensors header metadata, and the config.json."""

    direction: str
    fmt: str
    stem: str
    index_name: str
    index_metadata: Dict[str, object]
    st_metadata: Dict[str, str]
    config_json: dict


@dataclass(frozen=True)
class _Options:
    """How to write: shard size, whether to replace DST, the checks while streaming, progress and warnings."""

    shard_size: Union[int, str]
    overwrite: bool
    check_finite: bool
    check_crc: bool
    progress: Progress
    warn: Warn


def _run(reader: CheckpointReader, dst: str, jobs: List[Job], output: _Output, report_args: dict,
         opts: _Options) -> ConversionResult:
    start = time.perf_counter()
    max_bytes = _shard_bytes(opts.shard_size)
    fmt, warn = output.fmt, opts.warn
    src_dir = os.path.dirname(reader.config_path)  # the directory, also when `reader.path` is one file
    side_files = [n for n in layout.TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
    jobs = interleave(jobs, reader)
    warnings: List[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)

    with AtomicDirectory(dst, overwrite=opts.overwrite, protect=[src_dir], warn=note) as out:
        shards = ShardSet(out.tmp, output.stem, fmt, [j.spec for j in jobs], max_bytes, output.st_metadata)
        try:
            stats = stream(reader, jobs, shards, _source_files(reader, side_files), check_finite=opts.check_finite,
                           check_crc=opts.check_crc, progress=opts.progress)
            written = shards.close()
        except BaseException:
            shards.abort()
            raise
        hashes = dict(sorted(stats.hashes.items()))
        write_json(os.path.join(out.tmp, output.index_name),
                   {"metadata": {**output.index_metadata, "total_size": written.total_bytes},
                    "weight_map": dict(sorted(written.weight_map.items()))})
        write_json(os.path.join(out.tmp, layout.CONFIG), output.config_json)
        copied = copy_side_files(src_dir, out.tmp, side_files)
        write_json(os.path.join(out.tmp, layout.REPORT),
                   _report(output.direction, reader, fmt, hashes=hashes, jobs=jobs, weight_map=written.weight_map,
                           shards=written.shards, copied=copied, **report_args))
    if "tokenizer.model" not in copied:
        note(f"{reader.path} has no tokenizer.model: none copied, so {dst} cannot chat until one is added")
    return ConversionResult(
        source=reader.path, destination=os.path.abspath(dst), tensors=stats.tensors, bytes_read=stats.bytes_read,
        bytes_written=stats.bytes_written, seconds=time.perf_counter() - start, peak_rss=_peak_rss(),
        dropped=list(report_args["dropped"]), warnings=warnings,
    )


def convert(src: str, dst: str, *, dtype: str = "keep", fmt: str = "ckpt",
            shard_size: Union[int, str] = DEFAULT_SHARD_SIZE, task_lora: str = "keep", keep_unknown: bool = False,
            check_finite: bool = False, check_crc: bool = True, allow_missing_tokenizer: bool = False,
            overwrite: bool = False, progress: Progress = None, warn: Warn = None) -> ConversionResult:
    """Convert an HF directory (safetensors or `.bin`) of a registered model family to a MindSpore checkpoint
    directory (the family, from config.json's `architectures`, is recorded in the output's config.json).

    dtype: "keep" (bit-exact) or a float dtype (cast via fp32, rounded once, nearest-even); fmt: "ckpt" or
    "safetensors"; shard_size: bytes or a size string ("5GB"); task_lora: "keep" or "drop" the 2.5 task
    adapters; keep_unknown: keep tensors the key table does not know (default: refuse); check_finite: refuse
    inf/nan values; check_crc: verify the CRC-32 of every `.bin` storage (default; torch.load does not; the
    report's sha256 of each source file is there to compare with the publisher's); allow_missing_tokenizer:
    convert a source without tokenizer.model (default: refuse, the output could not chat). Everything is
    validated (index, shards, keys, shapes, tokenizer, destination) before the output is created.
    overwrite: replace `dst` if it is empty or was written by this tool (see `destination`). `warn` is told
    each warning as it arises (also listed in the result).
    """
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype {dtype!r} not supported; expected one of {', '.join(DTYPE_CHOICES)}")
    if fmt not in FORMAT_CHOICES:
        raise ValueError(f"format {fmt!r} not supported; expected one of {', '.join(FORMAT_CHOICES)}")
    if task_lora not in ("keep", "drop"):
        raise ValueError(f"task_lora {task_lora!r} not supported; expected 'keep' or 'drop'")
    _shard_bytes(shard_size)
    with open_checkpoint(src) as reader:
        if reader.kind != "hf":
            raise CheckpointError(f"{src} is a converted MindSpore checkpoint, not a Hugging Face directory")
        family, config = reader.family, reader.config
        plan = keymap.plan_hf_to_ms(reader.shapes(), family.parameter_shapes(config), family.keys,
                                    keep_task_adapters=task_lora == "keep", keep_unknown=keep_unknown)
        _check_plan(reader, plan)
        src_dir = os.path.dirname(reader.config_path)
        if not allow_missing_tokenizer and not os.path.isfile(os.path.join(src_dir, "tokenizer.model")):
            raise CheckpointError(f"{src_dir} has no tokenizer.model, so the converted directory could not chat: "
                                  "add the tokenizer files, or pass --allow-missing-tokenizer to convert the "
                                  "weights alone")
        if task_lora == "drop":
            config = family.without_optional(config)
        jobs = []
        for m in plan.mapped:
            t = keymap.TRANSFORMS[m.rule.transform]
            jobs.append(Job(m.source, reader.dtype(m.source), reader.nbytes(m.source),
                            TensorSpec(m.target, _out_dtype(dtype, reader.dtype(m.source)),
                                       t.forward_shape(reader.shape(m.source))),
                            None if m.rule.transform == "none" else t.forward))
        hf_fields = reader.hf_config
        torch_dtype = _hf_torch_dtype([j.spec.dtype for j in jobs])
        if torch_dtype:
            hf_fields["torch_dtype"] = torch_dtype
        renamed = [{"from": m.source, "to": m.target, "transform": m.rule.transform} for m in plan.mapped
                   if m.source != m.target or m.rule.transform != "none"]
        report_args = {
            "options": {"dtype": dtype, "format": fmt, "shard_size": shard_size, "task_lora": task_lora,
                        "keep_unknown": keep_unknown, "check_finite": check_finite, "check_crc": check_crc},
            "dropped": plan.dropped, "renamed": renamed,
            "kept_unknown": [m.source for m in plan.mapped if m.rule is keymap.KEPT_UNKNOWN],
        }
        output = _Output("hf_to_ms", fmt, layout.MS_SHARD_STEM, layout.MS_INDEX,
                         {"format": fmt, "family": family.name}, {"format": "ms"},
                         {**hf_fields, layout.MS_SECTION: {"family": family.name, **config.to_dict()}})
        return _run(reader, dst, jobs, output, report_args,
                    _Options(shard_size, overwrite, check_finite, check_crc, progress, warn))


def export_hf(src: str, dst: str, *, shard_size: Union[int, str] = DEFAULT_SHARD_SIZE, overwrite: bool = False,
              progress: Progress = None, warn: Warn = None) -> ConversionResult:
    """Write a converted MindSpore directory back as an HF directory: safetensors shards with HF names,
    `model.safetensors.index.json`, config.json (HF fields only), tokenizer files. Tensors keep their bits."""
    with open_checkpoint(src) as reader:
        if reader.kind != "ms":
            raise CheckpointError(f"{src} is not a converted MindSpore directory (no {layout.MS_INDEX})")
        jobs, renamed, unknown = [], [], []
        for key in reader.keys():
            m = reader.family.keys.match_ms(key)
            target, name = (key, "none") if m is None else (m.target, m.rule.transform)
            if m is None:
                unknown.append(key)
            elif target != key or name != "none":
                renamed.append({"from": key, "to": target, "transform": name})
            t = keymap.TRANSFORMS[name]
            jobs.append(Job(key, reader.dtype(key), reader.nbytes(key),
                            TensorSpec(target, reader.dtype(key), t.inverse_shape(reader.shape(key))),
                            None if name == "none" else t.inverse))
        hf_fields = reader.hf_config
        torch_dtype = _hf_torch_dtype([j.spec.dtype for j in jobs])
        if torch_dtype:
            hf_fields["torch_dtype"] = torch_dtype
        report_args = {"options": {"shard_size": shard_size}, "dropped": [], "renamed": renamed,
                       "kept_unknown": unknown}
        output = _Output("ms_to_hf", "safetensors", layout.HF_ST_STEM, layout.HF_ST_INDEX, {}, {"format": "pt"},
                         hf_fields)
        return _run(reader, dst, jobs, output, report_args,
                    _Options(shard_size, overwrite, False, False, progress, warn))


# ---- verify ------------------------------------------------------------------------------------------------
@dataclass
class VerifyResult:
    """Tensor-by-tensor comparison of two checkpoints, by MindSpore parameter name."""

    first: str
    second: str
    matched: int = 0
    mismatched: List[str] = field(default_factory=list)  # "name: why"
    missing: List[str] = field(default_factory=list)  # in the first, not in the second
    extra: List[str] = field(default_factory=list)  # in the second, not in the first
    skipped: List[str] = field(default_factory=list)  # "name: why" (buffers, dropped task adapters)
    bytes_compared: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.extra)

    def summary(self) -> str:
        status = "OK" if self.ok else "MISMATCH"
        return (f"{status}: {self.matched} tensors match, {len(self.mismatched)} differ, {len(self.missing)} "
                f"missing, {len(self.extra)} extra, {len(self.skipped)} skipped "
                f"({self.bytes_compared / 1e9:.2f} GB in {self.seconds:.1f} s)")


_ToMs = Optional[Callable[[np.ndarray], np.ndarray]]


def _by_ms_name(reader: CheckpointReader, skipped: List[str]) -> Dict[str, Tuple[str, _ToMs]]:
    """{MindSpore name: (the reader's key, transform to the MindSpore layout or None)}; HF buffers the table
    drops are listed in `skipped`."""
    out: Dict[str, Tuple[str, _ToMs]] = {}
    for key in reader.keys():
        m = reader.family.keys.match_hf(key) if reader.kind == "hf" else None
        if m is None:
            out[key] = (key, None)
        elif m.target is None:
            skipped.append(f"{key}: {m.rule.reason}")
        else:
            out[m.target] = (key, None if m.rule.transform == "none" else keymap.TRANSFORMS[m.rule.transform].forward)
    return out


def _ms_layout(reader: CheckpointReader, key: str, to_ms: _ToMs) -> np.ndarray:
    x = reader.read(key)
    return x if to_ms is None else np.ascontiguousarray(to_ms(x))


def _compare(a: CheckpointReader, ka: str, ta: _ToMs, b: CheckpointReader, kb: str, tb: _ToMs) -> Optional[str]:
    da, db = a.dtype(ka), b.dtype(kb)
    if da != db and not (da in FLOAT_DTYPES and db in FLOAT_DTYPES):
        return f"dtype {da} vs {db}"
    xa, yb = _ms_layout(a, ka, ta), _ms_layout(b, kb, tb)
    if xa.shape != yb.shape:
        return f"shape {list(xa.shape)} vs {list(yb.shape)}"
    x = cast(xa, da, db)  # a cast conversion is checked against the same cast of the source
    y = yb.reshape(-1)
    bad = (x.view(np.uint8).reshape(x.size, -1) != y.view(np.uint8).reshape(y.size, -1)).any(axis=1)
    n = int(np.count_nonzero(bad))
    if n == 0:
        return None
    first = int(np.argmax(bad))
    detail = f"{n} of {x.size} elements differ ({da} -> {db}), first at flat index {first}: {x[first]} vs {y[first]}"
    if db in FLOAT_DTYPES:
        diff = np.abs(x[bad].astype(np.float64) - y[bad].astype(np.float64))
        if np.isfinite(diff).any():
            detail += f", max abs diff {np.nanmax(np.where(np.isfinite(diff), diff, np.nan)):.3g}"
    return detail


def check_stored_config(reader: CheckpointReader) -> None:
    """Raise `ConfigError` naming config.json when a converted directory's stored config is unreadable or does
    not describe its tensors (names and shapes; tensors the report lists as kept-unknown aside)."""
    family, config = reader.family, reader.config
    expected = family.parameter_shapes(config)
    kept = set(reader.kept_unknown)
    shapes = {k: tuple(v) for k, v in reader.shapes().items() if k not in kept}
    problems = []
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing:
        problems.append(f"{len(missing)} of its parameters are not in the checkpoint: {_names(missing[:8])}")
    if extra:
        problems.append(f"{len(extra)} tensors are not parameters of it: {_names(extra[:8])}")
    wrong = [f"{k} {list(shapes[k])} (config: {list(expected[k])})" for k in sorted(set(shapes) & set(expected))
             if shapes[k] != tuple(expected[k])]
    if wrong:
        problems.append(f"{len(wrong)} shapes differ: {_names(wrong[:8])}")
    if problems:
        raise ConfigError(f"{reader.config_path} does not describe the tensors of {reader.path} "
                          f"({family.name}, {config.llm.num_hidden_layers} decoder layers): " + "; ".join(problems))


def verify(first: str, second: str, progress: Progress = None) -> VerifyResult:
    """Compare every tensor of two checkpoints (HF or converted dirs), matched by MindSpore name.

    Equal dtypes must be bit-identical; when the second was cast (convert --dtype), its values must equal
    the same cast of the first. Buffers the key table drops are skipped, and so are task adapters when the
    converted side's config says they were dropped. `ok` is false on any difference, missing or extra tensor.
    A converted side whose config.json is unreadable or does not describe its tensors raises `ConfigError`.
    """
    start = time.perf_counter()
    with open_checkpoint(first) as a, open_checkpoint(second) as b:
        for reader in (a, b):
            if reader.kind == "ms":
                check_stored_config(reader)
        result = VerifyResult(a.path, b.path)
        total = sum(a.nbytes(k) for k in a.keys())
        names_a = _by_ms_name(a, result.skipped)
        names_b = _by_ms_name(b, result.skipped)
        no_adapters = [r for r in (a, b) if r.kind == "ms" and not getattr(r.config, "task_adapters", ())]
        for name, (ka, ta) in names_a.items():
            if name not in names_b:
                m = a.family.keys.match_ms(name)
                if no_adapters and m is not None and m.rule.kind == keymap.TASK_ADAPTER:
                    result.skipped.append(f"{name}: task adapter dropped by conversion")
                else:
                    result.missing.append(name)
                continue
            kb, tb = names_b[name]
            problem = _compare(a, ka, ta, b, kb, tb)
            if problem is None:
                result.matched += 1
            else:
                result.mismatched.append(f"{name}: {problem}")
            result.bytes_compared += a.nbytes(ka)
            if progress is not None:
                progress(a.nbytes(ka), total)
        result.extra = sorted(set(names_b) - set(names_a))
    result.seconds = time.perf_counter() - start
    return result
