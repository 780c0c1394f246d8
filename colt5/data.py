"""Byte corpora for the language model: enwik8, an embedded default corpus, a window sampler.

Split rule (one rule for every corpus): of n bytes, the first n*90//100 are train, the next
n*5//100 validation, the rest test. For enwik8 as distributed (exactly 100,000,000 bytes) this is
the standard 90M / 5M / 5M split; a file of any other size is accepted and split by the same rule.

The default corpus, used when no file is given, exists on every machine with Python: the `.py`
source of the running interpreter's standard library (`sysconfig.get_paths()["stdlib"]`), files
in sorted relative-path order, skipping test directories and site-packages, concatenated.
Its size depends on the Python version (about 11 MB for CPython 3.11).
"""

from __future__ import annotations

import gzip
import os
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
    "load_default_corpus",
    "load_corpus",
    "RandomWindowSampler",
]

ENWIK8_BYTES = 100_000_000
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """A named byte corpus split into train / valid / test uint8 tensors."""

    name: str
    train: Tensor
    valid: Tensor
    test: Tensor

    @property
    def num_bytes(self) -> int:
        return self.train.numel() + self.valid.numel() + self.test.numel()

    def describe(self) -> str:
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


def default_corpus_files() -> list[Path]:
    """The standard library `.py` files of the running interpreter, in a fixed sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_default_corpus() -> Corpus:
    """The embedded default corpus: this interpreter's standard library source (see module doc)."""
    files = default_corpus_files()
    if not files:
        raise ValueError(f"no .py files found under the standard library {sysconfig.get_paths()['stdlib']!r}")
    chunks = []
    for f in files:
        try:
            chunks.append(f.read_bytes())
        except OSError:
            continue  # an unreadable file is skipped; the order of the rest is unchanged
    data = b"".join(chunks)
    root = sysconfig.get_paths()["stdlib"]
    return split_corpus(data, name=f"Python stdlib source ({len(chunks)} .py files under {root})")


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
