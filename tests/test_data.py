"""colt5.data: the split rule, reading files, the default corpus (order, split by file, size), the sampler."""

import gzip
import importlib.util
import random
import re
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from colt5 import data as data_module
from colt5.data import (
    DEFAULT_PACKAGES,
    ENWIK8_BYTES,
    RandomWindowSampler,
    default_corpus_files,
    default_corpus_sources,
    file_split,
    load_corpus,
    load_default_corpus,
    load_enwik8,
    split_corpus,
)


def synthetic_text(n_bytes: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "and", "a", "dog", "ran", "to", "its", "home", "<page>", "\n"]
    out = bytearray()
    while len(out) < n_bytes:
        out += (rng.choice(words) + " ").encode()
    return bytes(out[:n_bytes])


def as_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


@pytest.fixture(scope="module")
def default_corpus():
    return load_default_corpus()


# ---- split rule and files -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [100, 1000, 12_345])
def test_split_is_90_5_5_in_order(n):
    data = bytes(random.Random(n).randrange(256) for _ in range(n))
    c = split_corpus(data, name="x")
    assert (c.train.numel(), c.valid.numel()) == (n * 90 // 100, n * 5 // 100)
    assert c.num_bytes == n
    assert bytes(torch.cat([c.train, c.valid, c.test]).tolist()) == data


def test_enwik8_size_gives_standard_split():
    c = split_corpus(torch.zeros(ENWIK8_BYTES, dtype=torch.uint8), name="enwik8")
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (90_000_000, 5_000_000, 5_000_000)


def test_raw_gz_zip_read_the_same(tmp_path):
    data = synthetic_text(3000, seed=1)
    raw = tmp_path / "enwik8"
    raw.write_bytes(data)
    gz = tmp_path / "enwik8.gz"
    gz.write_bytes(gzip.compress(data))
    zipped = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README", "not this one")
        zf.writestr("enwik8", data)
    single = tmp_path / "other.zip"
    with zipfile.ZipFile(single, "w") as zf:
        zf.writestr("somename.txt", data)
    expected = load_enwik8(raw)
    assert "3,000 bytes" in expected.describe()
    for path in (gz, zipped, single):
        c = load_corpus(path)
        for split in ("train", "valid", "test"):
            assert torch.equal(getattr(c, split), getattr(expected, split)), (path, split)


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_enwik8(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a regular file"):
        load_enwik8(tmp_path)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(ValueError, match="could not read"):
        load_enwik8(bad_gz)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        zf.writestr("a", "1")
        zf.writestr("b", "2")
    with pytest.raises(ValueError, match="none is named 'enwik8'"):
        load_enwik8(many)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_enwik8(empty)
    short = split_corpus(b"x" * 100, name="short")
    with pytest.raises(ValueError, match="too short for seq_len=90"):
        RandomWindowSampler(short.train, seq_len=90, batch_size=1)


# ---- the default corpus ---------------------------------------------------------------------------
def test_default_corpus_sources_and_file_order(monkeypatch):
    sources = default_corpus_sources()
    assert sources[0][1] == "stdlib" and Path(sysconfig.get_paths()["stdlib"]) == sources[0][2]
    installed = [m for m, _ in DEFAULT_PACKAGES if importlib.util.find_spec(m) is not None]
    assert [prefix for _, prefix, _ in sources[1:]] == installed  # the fixed order, installed ones only
    assert "torch" in installed and sources[1][0].startswith("torch 2.")
    files = default_corpus_files()
    rel = [r for r, _ in files]
    assert len(set(rel)) == len(rel)
    for _, prefix, root in sources:
        mine = [r for r in rel if r.split("/")[0] == prefix]
        assert mine and mine == sorted(mine), prefix
        assert all(Path(root, r[len(prefix) + 1 :]).is_file() for r in mine[:50])
    assert [r.split("/")[0] for r in rel] == sorted((r.split("/")[0] for r in rel), key=[p for _, p, _ in sources].index)
    assert not any({"site-packages", "dist-packages", "__pycache__"} & set(r.split("/")) for r in rel)
    assert all(r.endswith(".py") for r in rel)
    if Path(sources[0][2], "test", "test_json").is_dir():  # the stdlib's tests are in, where installed
        assert any(r.startswith("stdlib/test/test_json/") for r in rel)
    # A package that is not installed is left out; the others keep their order.
    monkeypatch.setattr(data_module, "DEFAULT_PACKAGES", (("colt5_no_such_package", "x"), *DEFAULT_PACKAGES[:2]))
    assert [p for _, p, _ in default_corpus_sources()] == ["stdlib", "torch", "triton"][: 1 + len(installed[:2])]


def test_file_split_is_deterministic_and_about_5_percent():
    rng = random.Random(0)
    blobs = [rng.randbytes(rng.randrange(1, 64)) for _ in range(20_000)]
    splits = [file_split(b) for b in blobs]
    assert splits == [file_split(bytes(b)) for b in blobs]
    for name in ("valid", "test"):
        assert 0.043 < splits.count(name) / len(blobs) < 0.057, name
    assert set(splits) == {"train", "valid", "test"}


def test_default_corpus_is_deterministic(default_corpus):
    again = load_corpus(None)
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(default_corpus, split), getattr(again, split)), split
    assert again.name == default_corpus.name and again.num_files == default_corpus.num_files


def test_default_corpus_is_split_by_file(default_corpus):
    """Each split is its files' bytes in corpus order; no validation or test file occurs in train."""
    parts = {"train": [], "valid": [], "test": []}
    for _, path in default_corpus_files():
        data = path.read_bytes()
        if data:
            parts[file_split(data)].append(data)
    for split, chunks in parts.items():
        assert as_bytes(getattr(default_corpus, split)) == b"".join(chunks), split
    assert default_corpus.num_files == sum(map(len, parts.values()))
    train = as_bytes(default_corpus.train)
    for split in ("valid", "test"):
        big = [d for d in parts[split] if len(d) > 4000]
        assert len(big) > 30, split
        for d in random.Random(1).sample(big, 30):
            assert train.find(d) == -1, f"a {split} file occurs in train"
    n_files = default_corpus.num_files
    for split in ("valid", "test"):
        assert 0.035 < len(parts[split]) / n_files < 0.065, split
        assert 0.02 < getattr(default_corpus, split).numel() / default_corpus.num_bytes < 0.09, split


def test_default_corpus_size_and_description(default_corpus):
    # The test environment has torch installed: its source alone is over 40 MB.
    assert default_corpus.num_bytes >= 50_000_000 and default_corpus.train.numel() >= 45_000_000
    assert default_corpus.valid.numel() >= 1_000_000
    line = default_corpus.describe()
    pattern = (r"default, the \.py source of Python \d+\.\d+\.\d+ stdlib \+ torch \S+ \+ .+: "
               r"\d+\.\d MB train, \d+\.\d MB valid, \d+\.\d MB test, [\d,]+ files")
    assert re.fullmatch(pattern, line), line
    assert f"{default_corpus.train.numel() / 1e6:.1f} MB train" in line and f"{default_corpus.num_files:,} files" in line


# ---- the sampler ----------------------------------------------------------------------------------
def test_sampler_windows_determinism_sharding_and_resume():
    data = torch.arange(5000) % 251  # consecutive values: a contiguous window increases by 1 mod 251
    data = data.to(torch.uint8)
    s = RandomWindowSampler(data, seq_len=16, batch_size=6, seed=3)
    batches = [s.next_batch() for _ in range(4)]
    for batch in batches:
        assert batch.shape == (6, 17) and batch.dtype == torch.long
        assert ((batch[:, 1:] - batch[:, :-1]) % 251 == 1).all()
    assert not torch.equal(batches[0], batches[1])
    # Resume: a fresh sampler with the saved state continues identically.
    state = s.state_dict()
    s2 = RandomWindowSampler(data, seq_len=16, batch_size=6, seed=3)
    s2.load_state_dict(state)
    assert torch.equal(s.next_batch(), s2.next_batch())
    # Sharding: ranks' slices of a step make up the single-process global batch.
    ranks = [RandomWindowSampler(data, seq_len=16, batch_size=3, seed=3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([r.batch_at(0) for r in ranks]), batches[0])
    with pytest.raises(ValueError, match="rank"):
        RandomWindowSampler(data, seq_len=4, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        RandomWindowSampler(data, seq_len=4, batch_size=1, seed=4).load_state_dict(state)
