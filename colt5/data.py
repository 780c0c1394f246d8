"""Byte corpora for the language model: enwik8, an embedded default corpus, a window sampler.

Split rule for a file (`--data`): of n bytes, the first n*90//100 are train, the next n*5//100
validation, the rest test. For enwik8 as distributed (exactly 100,000,000 bytes) this is the
standard 90M / 5M / 5M split; a file of any other size is accepted and split by the same rule.

The default corpus, used when no file is given, is the `.py` source every install of this
project has: the running interpreter's standard library, its tests included
(`sysconfig.get_paths()["stdlib"]`, site-packages left out), then the installed packages of
DEFAULT_PACKAGES in that order (torch, triton, einops, numpy, ...; one not installed is left out).
About 122 MB (111 MB train) with CPython 3.11.7, torch 2.13.0 and the rest; 103 MB where the
stdlib comes without its tests, as in some Linux distributions and container images. A
5,000-step GPU run (164M bytes) sees the train split 1.5 times, against 15 times for the 11 MB
of stdlib modules alone that this corpus used to be. Files are read in a fixed order (sources in
that order, sorted relative paths within each), so the same install always gives the same bytes.
It is split by file, not by byte: a hash of each file's bytes sends about 5 % of the files to
validation and 5 % to test (file_split), so no file straddles two splits and the copies of a
duplicated file share one. Loading reads each file once into its split's buffer: 0.6 s (warm
page cache) and about the corpus's size in memory, so nothing is cached on disk.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "ENWIK8_BYTES",
    "Corpus",
    "split_corpus",
    "read_bytes",
    "load_enwik8",
    "DEFAULT_PACKAGES",
    "default_corpus_sources",
    "default_corpus_files",
    "file_split",
    "load_default_corpus",
    "load_corpus",
    "RandomWindowSampler",
]

ENWIK8_BYTES = 100_000_000
# (import name, distribution name) of the packages after the stdlib: this project's dependencies,
# numpy (the test extra) and torch's own pure-Python dependencies. Sizes of their .py source
# (torch 2.13.0 CPU wheel, Linux): torch 46 MB, sympy 26, numpy 9.1, networkx 6.5, triton 1.6,
# the rest under 1 each.
DEFAULT_PACKAGES = (
    ("torch", "torch"),
    ("triton", "triton"),
    ("einops", "einops"),
    ("numpy", "numpy"),
    ("sympy", "sympy"),
    ("networkx", "networkx"),
    ("jinja2", "jinja2"),
    ("packaging", "packaging"),
    ("local_attention", "local-attention"),
)
# site-packages inside the stdlib directory (an install without a venv) holds other packages.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """A named byte corpus split into train / valid / test uint8 tensors (num_files: default corpus)."""

    name: str
    train: Tensor
    valid: Tensor
    test: Tensor
    num_files: int | None = None

    @property
    def num_bytes(self) -> int:
        return self.train.numel() + self.valid.numel() + self.test.numel()

    def describe(self) -> str:
        if self.num_files is not None:
            mb = lambda t: f"{t.numel() / 1e6:.1f} MB"  # noqa: E731
            return f"{self.name}: {mb(self.train)} train, {mb(self.valid)} valid, {mb(self.test)} test, {self.num_files:,} files"
        return (
            f"{self.name}: {self.num_bytes:,} bytes "
            f"(train {self.train.numel():,} / valid {self.valid.numel():,} / test {self.test.numel():,})"
        )


def split_corpus(data: bytes | bytearray | Tensor, *, name: str) -> Corpus:
    """Split bytes 90 / 5 / 5 (train / valid / test) in order; see the module docstring."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) == 0:
            raise ValueError(f"corpus {name!r} is empty")
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.ndim != 1:
        raise TypeError("data must be bytes or a 1-d uint8 tensor")
    n = data.numel()
    n_train, n_valid = n * 90 // 100, n * 5 // 100
    return Corpus(name, data[:n_train], data[n_train : n_train + n_valid], data[n_train + n_valid :])


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a raw, gzip or zip file (detected by magic bytes, not the extension).

    A zip must hold a member named `enwik8` or exactly one file. Raises FileNotFoundError for a
    missing path and ValueError for anything unreadable or corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"data path {str(path)!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        if magic == b"PK\x03\x04":
            with zipfile.ZipFile(path) as zf:
                files = [i for i in zf.infolist() if not i.is_dir()]
                named = [i for i in files if Path(i.filename).name == "enwik8"]
                if named:
                    member = named[0]
                elif len(files) == 1:
                    member = files[0]
                else:
                    raise ValueError(
                        f"zip {str(path)!r} holds {len(files)} files and none is named 'enwik8'; "
                        "expected the enwik8 archive or a zip with a single file"
                    )
                return zf.read(member)
        return path.read_bytes()
    except (OSError, EOFError, zipfile.BadZipFile, gzip.BadGzipFile) as e:
        raise ValueError(f"could not read data file {str(path)!r}: {type(e).__name__}: {e}") from e


def load_enwik8(path: str | os.PathLike) -> Corpus:
    """enwik8 (raw, .gz or .zip) split 90M / 5M / 5M; other sizes split 90 / 5 / 5 %."""
    data = read_bytes(path)
    if len(data) == 0:
        raise ValueError(f"data file {str(path)!r} is empty")
    kind = "enwik8" if len(data) == ENWIK8_BYTES else "file"
    return split_corpus(data, name=f"{kind} {os.fspath(path)}")


def default_corpus_sources() -> list[tuple[str, str, Path]]:
    """(label, prefix, root) of each source tree of the default corpus, in the corpus's order.

    The standard library first (prefix "stdlib"), then each installed package of
    DEFAULT_PACKAGES (prefix = its import name, root = its package directory); a package that is
    not installed, or is a single module or a namespace package, is left out.
    """
    v = sys.version_info
    sources = [(f"Python {v.major}.{v.minor}.{v.micro} stdlib", "stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for module, dist in DEFAULT_PACKAGES:
        try:
            spec = importlib.util.find_spec(module)  # locates without importing
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if len(locations) != 1 or not Path(locations[0]).is_dir():
            continue
        try:
            label = f"{module} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            label = module
        sources.append((label, module, Path(locations[0])))
    return sources


def _source_files(prefix: str, root: Path) -> list[tuple[str, Path]]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.endswith(".py"):
                rel = f"{prefix}/{name}" if rel_dir == "." else f"{prefix}/{rel_dir}/{name}"
                files.append((rel, Path(dirpath, name)))
    return sorted(files)


def default_corpus_files() -> list[tuple[str, Path]]:
    """(relative path, path) of every `.py` file of the default corpus, in the corpus's order.

    Relative paths start with the source's prefix: "stdlib/json/decoder.py",
    "torch/nn/functional.py". Sources in default_corpus_sources() order, files sorted by
    relative path within each.
    """
    return [f for _, prefix, root in default_corpus_sources() for f in _source_files(prefix, root)]


def file_split(data: bytes) -> str:
    """"train", "valid" or "test" for one file of the default corpus, from a hash of its bytes.

    About 5 % of files go to valid and 5 % to test. Hashing the content (not the path) puts
    identical copies of a file, which the stdlib and packages do hold, in the same split.
    """
    bucket = int.from_bytes(hashlib.sha1(data, usedforsecurity=False).digest()[:8], "little") % 10_000
    return "valid" if bucket < 500 else "test" if bucket < 1000 else "train"


def _as_tensor(buffer: bytearray) -> Tensor:
    # frombuffer shares the bytearray's memory (no copy) but refuses an empty buffer.
    return torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)


def load_default_corpus() -> Corpus:
    """The embedded default corpus: the `.py` source of this install (see the module docstring)."""
    sources = default_corpus_sources()
    splits = {"train": bytearray(), "valid": bytearray(), "test": bytearray()}
    num_files = 0
    for _, prefix, root in sources:
        for _, path in _source_files(prefix, root):
            try:
                data = path.read_bytes()
            except OSError:
                continue  # an unreadable file is skipped; the order of the rest is unchanged
            if data:
                splits[file_split(data)] += data  # one copy per file into its split; no per-byte work
                num_files += 1
    if not splits["train"]:
        raise ValueError(f"no .py source found under {', '.join(str(root) for _, _, root in sources)}")
    name = "default, the .py source of " + " + ".join(label for label, _, _ in sources)
    return Corpus(name, *(_as_tensor(splits[s]) for s in ("train", "valid", "test")), num_files=num_files)


def load_corpus(path: str | os.PathLike | None) -> Corpus:
    """load_enwik8(path), or the default corpus when path is None."""
    return load_default_corpus() if path is None else load_enwik8(path)


class RandomWindowSampler:
    """Random windows of seq_len + 1 bytes (input and shifted target) from a 1-d uint8 tensor.

    Deterministic in (seed, step): step s draws the *global* batch of world_size * batch_size
    window starts from a generator seeded by (seed, s), and rank r keeps rows
    [r * batch_size, (r + 1) * batch_size). So the state is just the step counter, resuming is
    exact, and one process with batch B * W sees the same windows as W ranks with batch B.
    """

    def __init__(
        self, data: Tensor, *, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not isinstance(data, Tensor) or data.ndim != 1:
            raise TypeError("data must be a 1-d tensor of bytes")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if data.numel() < seq_len + 1:
            raise ValueError(
                f"corpus split has {data.numel():,} bytes, too short for seq_len={seq_len} "
                f"(needs at least seq_len + 1 = {seq_len + 1:,}); use a smaller --seq-len or a larger file"
            )
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.step = 0
        self._offsets = torch.arange(seq_len + 1)

    def batch_at(self, step: int) -> Tensor:
        """The [batch_size, seq_len + 1] long batch of this rank at `step` (does not advance)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))
        high = self.data.numel() - self.seq_len  # starts in [0, high) keep the window inside
        starts = torch.randint(0, high, (self.world_size * self.batch_size,), generator=g)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.data[starts[:, None] + self._offsets].long()

    def next_batch(self) -> Tensor:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler has seed {self.seed}")
        self.step = int(state["step"])
