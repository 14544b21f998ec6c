"""Reading a Hugging Face safetensors checkpoint lazily and safely; writing shards atomically.

The reader parses every shard header itself before anything is loaded, so a truncated file,
a corrupt header or an index that points outside the model directory is refused up front
with the file named. Tensors are then read one at a time, by positioned reads at the offsets
those checked headers give, into memory the process owns.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from wanda_stream.storage import quant
from wanda_stream.errors import InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from its shard's header."""

    key: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file, fsync and rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header; raise InputError naming the file on any defect."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict, int]:
    """The validated header and the byte offset where the file's data section starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes); re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: corrupt safetensors header ({e.__class__.__name__}); re-download it") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(info, dict) and info.get("dtype") in DTYPES and isinstance(info.get("shape"), list)
        offs = info.get("data_offsets") if ok else None
        if not ok or not (isinstance(offs, list) and len(offs) == 2 and 0 <= offs[0] <= offs[1]):
            raise InputError(f"{path}: corrupt header entry for tensor '{key}'; re-download the file")
        if offs[1] > data_size:
            raise InputError(
                f"{path}: truncated (tensor '{key}' ends at byte {offs[1]} of a {data_size}-byte data section); "
                "re-download or re-copy the file"
            )
    return header, 8 + n


def pread_into(fd: int, offset: int, view: memoryview) -> int:
    """Fill `view` from byte `offset` of the open file `fd` (positioned reads); the bytes read, fewer than
    `len(view)` only where the file ends first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def read_exact(path: Path, offset: int, view: memoryview) -> None:
    """Fill `view` with the bytes of `path` from `offset` (positioned reads; no mapping is kept)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = pread_into(fd, offset, view)
        if done < len(view):
            raise InputError(f"{path}: ended at byte {offset + done} while reading; re-download or re-copy it")
    finally:
        os.close(fd)


def _contained(root: Path, name: str, index_path: Path) -> Path:
    """Resolve a shard name from the index, refusing names that escape the model directory."""
    if not name or os.path.isabs(name) or Path(name).name != name:
        raise InputError(
            f"{index_path}: shard path '{name}' is not a plain file name inside the model directory; fix the index"
        )
    return root / name


class Checkpoint:
    """A read-only view of a Hugging Face safetensors checkpoint directory, as float tensors.

    `stored` holds every tensor as the shards store it; `tensors` the tensors the checkpoint presents:
    the stored ones, but quantized weights (FP8, MXFP4; see quant.py) as one float tensor each, in
    `save_dtype` (bfloat16 when None) under their float name, their scales folded in. `save_dtype`, when
    given, is the dtype of every floating-point tensor. Methods, the model and the writer see only these.
    """

    def __init__(self, root: Path | str, save_dtype: torch.dtype | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: model directory not found; pass a Hugging Face checkpoint directory")
        if not (self.root / "config.json").is_file():
            raise InputError(f"{self.root}: no config.json; pass a Hugging Face checkpoint directory")
        self.files = self._shard_files()
        self.stored: dict[str, TensorInfo] = {}
        self.headers: dict[str, dict] = {}
        self.data_start: dict[str, int] = {}  # where each shard's data section starts
        for fname in self.files:
            header, self.data_start[fname] = _read_header(self.root / fname)
            self.headers[fname] = header
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.stored[key] = TensorInfo(key, fname, DTYPES[info["dtype"]], tuple(info["shape"]), end - start)
        self.quantization_config = _quantization_config(self.root / "config.json")
        self.save_dtype = save_dtype
        self.sources = quant.plan({k: quant.Stored(i.dtype, i.shape) for k, i in self.stored.items()},
                                  self.quantization_config, str(self.root / "config.json"), save_dtype)
        self.tensors: dict[str, TensorInfo] = {
            k: TensorInfo(k, self.stored[s.keys[0]].file, s.dtype, s.shape,
                          math.prod(s.shape) * torch.empty(0, dtype=s.dtype).element_size())
            for k, s in self.sources.items()}

    @property
    def dequantized(self) -> bool:
        """Whether any tensor is dequantized on read (the output then carries no quantization_config)."""
        return any(s.kind != "plain" for s in self.sources.values())

    def _shard_files(self) -> list[str]:
        index = self.root / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise InputError(f"{index}: not a valid safetensors index (needs a 'weight_map'); fix or regenerate it")
            names = sorted(set(weight_map.values()))
            for name in names:
                if not _contained(self.root, name, index).is_file():
                    raise InputError(f"{index}: names shard '{name}', which is missing; re-download the checkpoint")
            self.weight_map = dict(weight_map)
            return names
        if (self.root / SINGLE_NAME).is_file():
            self.weight_map = {}
            return [SINGLE_NAME]
        if any(self.root.glob("*.bin")) or any(self.root.glob("*.pt")) or any(self.root.glob("*.pth")):
            raise InputError(
                f"{self.root}: only pickle weights (.bin/.pt); wanda-stream never unpickles files. "
                "Convert to safetensors first (load in a trusted environment and save_pretrained(safe_serialization=True))"
            )
        raise InputError(f"{self.root}: no model.safetensors or {INDEX_NAME}; pass a safetensors checkpoint directory")

    def check_index_consistent(self) -> None:
        """Every index entry names the shard that really holds the tensor."""
        for key, fname in self.weight_map.items():
            info = self.stored.get(key)
            if info is None or info.file != fname:
                raise InputError(f"{self.root / INDEX_NAME}: says '{key}' is in {fname}, but it is not; fix the index")

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def get(self, key: str, pin: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor, in its presented dtype) in full before returning.

        `pin`: read straight into page-locked memory (CUDA hosts), for fast, asynchronous copies to
        the device without a second host copy. `rows`: only rows [start, stop) of the first dimension
        (a group of experts of a tensor that stores them all), read alone.

        The bytes are copied into memory the process owns. A memory-mapped tensor (what safe_open
        returns) would defer the disk reads to the first touch: a prefetch thread would then read
        nothing, and the compute thread would stall on page faults instead.
        """
        src = self.sources.get(key)
        if src is None:
            raise InputError(f"{self.root}: tensor '{key}' is missing from the checkpoint")
        if src.kind == "plain" and src.dtype == self.stored[key].dtype:
            return self.get_stored(key, pin, rows)
        if rows is not None and (src.kind == "fp8" or any(self.stored[k].shape[0] != src.shape[0] for k in src.keys)):
            raise ValueError(f"'{key}': its stored parts are not indexed by its first dimension; read it whole")
        # Dequantized (or cast) on the CPU from pageable reads of the parts; the result is what gets pinned.
        w = quant.dequantize(src, [self.get_stored(k, rows=rows) for k in src.keys])
        if not pin:
            return w if w.dtype == src.dtype else w.to(src.dtype)
        return host_empty(w.shape, src.dtype, pin).copy_(w)  # the cast writes into the pinned memory

    def get_stored(self, key: str, pin: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one stored tensor as the shard holds it (see `get` for `pin` and `rows`)."""
        info = self.stored[key]
        start = self.data_start[info.file] + self.headers[info.file][key]["data_offsets"][0]
        shape = info.shape
        if rows is not None:
            first, stop = rows
            if not 0 <= first <= stop <= shape[0]:
                raise ValueError(f"'{key}': rows {first}:{stop} of {shape[0]}")
            start += first * (info.nbytes // shape[0]) if first else 0  # an empty tensor has rows of 0 bytes
            shape = (stop - first, *shape[1:])
        out = host_empty(shape, info.dtype, pin)
        read_exact(self.root / info.file, start, byte_view(out))
        return out

    def total_bytes(self) -> int:
        """Bytes of the presented tensors: the size of a checkpoint written from them (dequantized: larger)."""
        return sum(i.nbytes for i in self.tensors.values())

    def fingerprint(self) -> str:
        """Hash of file names, sizes and headers: changes when the checkpoint does."""
        h = hashlib.sha256()
        for fname in self.files:
            h.update(fname.encode())
            h.update(str((self.root / fname).stat().st_size).encode())
            h.update(json.dumps(self.headers[fname], sort_keys=True).encode())
        h.update((self.root / "config.json").read_bytes())
        return h.hexdigest()


def _quantization_config(path: Path) -> dict | None:
    """config.json's quantization_config; None when absent or when the file is not JSON (which the model's
    config loader reports in its own words)."""
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return qc if isinstance(qc, dict) else None


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialized CPU tensor, page-locked with `pin` unless it holds no bytes (the pinned allocator
    returns no memory for 0 bytes, so there is nothing to lock)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin and math.prod(shape) > 0)


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared with it (writing to the view writes the tensor)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy where possible."""
    return byte_view(t.detach().to("cpu").contiguous())


def build_header(items: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) for tensors written in the given order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset, sizes = 0, []
    for key, dtype, shape in items:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
        sizes.append(n)
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def write_shard(
    path: Path,
    items: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    before_rename: Callable[[], None] | None = None,
    in_order: bool = False,
) -> int:
    """Stream tensors into a safetensors file atomically; one tensor is in memory at a time.

    `items` fix the header; the tensors are written sorted by key, or in the order given with `in_order`
    (a block whose tensors are produced one group after another while the file is written).
    `produce(key)` returns each tensor when it is written. Returns the file size. The file is verified
    (header and size) before it is renamed into place.
    """
    items = list(items) if in_order else sorted(items)
    head, sizes = build_header(items)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(head)
        for (key, dtype, shape), n in zip(items, sizes):
            t = produce(key)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"tensor {key} is {t.dtype}{tuple(t.shape)}, header says {dtype}{shape}")
            f.write(tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())
    return _verify_and_place(tmp, path, len(head) + sum(sizes), {k for k, _, _ in items}, before_rename)


def write_shard_pieces(
    path: Path,
    items: list[tuple[str, torch.dtype, tuple[int, ...]]],
    pieces: Iterable[tuple[str, int, torch.Tensor]],
    before_rename: Callable[[], None] | None = None,
) -> int:
    """Stream tensors into a safetensors file atomically from pieces taken in any order.

    A piece is (key, first row, rows of the tensor along its first dimension); a whole tensor is one piece
    from row 0. Each piece is written in its place at once (positioned writes), so a streamed block whose
    experts' rows of several fused tensors come group by group is written as it is computed and no tensor is
    ever held whole. Pieces are taken until every row of every item is written; a row given twice, or a
    piece that does not fit its item, is an error. The header lists the tensors sorted, as `write_shard`'s.
    Returns the file size; the file is verified before it is renamed into place.
    """
    items = sorted(items)
    head, sizes = build_header(items)
    place: dict[str, tuple[int, torch.dtype, tuple[int, ...], int]] = {}  # key: offset, dtype, shape, row bytes
    offset = len(head)
    for (key, dtype, shape), n in zip(items, sizes):
        rows = shape[0] if shape else 1
        place[key] = (offset, dtype, shape, n // rows if rows else 0)
        offset += n
    todo = {key: set(range(shape[0] if shape else 1)) for key, _, shape in items}
    left = sum(len(r) for r in todo.values())
    tmp = path.with_name(path.name + ".partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, memoryview(head), 0)
        os.ftruncate(fd, offset)
        it = iter(pieces)
        while left:
            key, first, t = next(it)
            start, dtype, shape, row_bytes = place[key]
            rows = set(range(first, first + (t.shape[0] if shape else 1)))
            if t.dtype != dtype or tuple(t.shape[1:] if shape else t.shape) != tuple(shape[1:]) \
                    or not rows <= todo[key]:
                raise RuntimeError(f"piece {key}[{first}:] {t.dtype}{tuple(t.shape)} does not fit {dtype}{shape}")
            _pwrite_all(fd, tensor_bytes(t), start + first * row_bytes)
            todo[key] -= rows
            left -= len(rows)
        os.fsync(fd)
    finally:
        os.close(fd)
    return _verify_and_place(tmp, path, offset, set(place), before_rename)


def _verify_and_place(tmp: Path, path: Path, size: int, keys: set[str], before_rename: Callable[[], None] | None
                      ) -> int:
    """Check the written file `tmp` (its size and its header's tensors), then rename it to `path`."""
    header = read_header(tmp)
    if tmp.stat().st_size != size or set(header) - {"__metadata__"} != keys:
        raise RuntimeError(f"{tmp}: verification after writing failed")
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of `data` at `offset` (a positioned write may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def iter_keys_with_prefix(keys: Iterable[str], prefix: str) -> Iterator[str]:
    return (k for k in keys if k.startswith(prefix))
