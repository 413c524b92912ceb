"""metafluence._store: atomic writes, checksummed tensor files, ProgressStore."""

from __future__ import annotations

import json

import pytest
import torch

from metafluence._store import (
    CheckpointCorruptError,
    CheckpointForeignError,
    ProgressStore,
    atomic_write_bytes,
    digest,
    load_tensors,
    map_chunks,
    save_tensors,
)

SUFFIXES = [".safetensors", ".pt"]


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "h": torch.randn(5, generator=g).to(torch.bfloat16),
        "step": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "gen": torch.Generator().manual_seed(1).get_state()[:32],
    }


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_roundtrip_exact(tmp_path, suffix):
    t = sample()
    meta = {"step": 3, "F": 0.1 + 1e-17, "inf": float("inf"), "nested": {"a": [1, None]}}
    p = save_tensors(tmp_path / f"x{suffix}", dict(t, view=t["w"][:, 0]), meta)
    got, m = load_tensors(p)
    assert m == meta and set(got) == set(t) | {"view"}
    for k in t:
        assert got[k].dtype == t[k].dtype and torch.equal(got[k], t[k]), k
    assert torch.equal(got["view"], t["w"][:, 0])
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed, not left


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_flipped_byte_and_every_truncation_is_detected(tmp_path, suffix):
    p = save_tensors(tmp_path / f"x{suffix}", {"w": torch.arange(6.0)}, {"step": 1})
    blob = p.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    missed = []
    stride = 1 if suffix == ".safetensors" else 5  # .pt: the raw-bytes hash; sample it
    for i in range(0, len(blob), stride):
        b = bytearray(blob)
        b[i] ^= 0x01
        bad.write_bytes(bytes(b))
        try:
            load_tensors(bad)
            missed.append(i)
        except CheckpointCorruptError as e:
            assert e.path == bad and "not used" in str(e) and str(bad) in str(e)
    assert missed == []
    for n in range(0, len(blob), 7):
        bad.write_bytes(blob[:n])
        with pytest.raises(CheckpointCorruptError):
            load_tensors(bad)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointCorruptError, match="no metafluence checksum"):
        load_tensors(tmp_path / "f.safetensors")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(p, b"old")
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    assert sorted(f.name for f in p.parent.iterdir()) == ["a.bin"]


def test_store_chunks_keys_and_completion(tmp_path):
    cfg = {"items": "task", "data": digest([torch.ones(2), {"a": (1, 2)}]), "n": 4}
    s = ProgressStore(tmp_path, cfg)
    assert s.keys() == [] and not s.done("a") and not s.is_complete and s.get("a") is None
    s.save("b", {"x": torch.ones(2)}, {"i": 1})
    s.save("a", {"x": torch.zeros(2)})
    assert s.done("a") and s.keys() == ["a", "b"]
    x, m = s.load("b")
    assert torch.equal(x["x"], torch.ones(2)) and m == {"i": 1}
    s.complete({"n": 2})
    again = ProgressStore(tmp_path, dict(cfg))  # same config: reopens
    assert again.is_complete and again.keys() == ["a", "b"]
    with pytest.raises(ValueError, match="chunk key"):
        s.save("../evil", {})


def test_store_config_mismatch_names_keys(tmp_path):
    first = ProgressStore(tmp_path, {"items": "task", "factor": 0.0, "opt": {"lr": 0.1, "seed": 1}})
    first.save("c", {"x": torch.ones(1)})
    with pytest.raises(ValueError, match=r"factor, opt\.lr") as e:
        ProgressStore(tmp_path, {"items": "task", "factor": 1.0, "opt": {"lr": 0.2, "seed": 1}})
    assert str(tmp_path) in str(e.value)
    (tmp_path / "user_notes.txt").write_text("keep")  # not the store's: survives overwrite
    s = ProgressStore(tmp_path, {"items": "point"}, overwrite=True)
    assert (tmp_path / "user_notes.txt").read_text() == "keep"
    assert s.keys() == [] and json.loads((tmp_path / "manifest.json").read_text())["config"] == {
        "items": "point"
    }
    with pytest.raises(TypeError, match="JSON"):
        ProgressStore(tmp_path / "x", {"f": object()})


def test_store_ignores_and_cleans_stray_temp_files(tmp_path):
    s = ProgressStore(tmp_path, {"a": 1})
    s.save("k0", {"x": torch.ones(1)})
    stray = tmp_path / ".k1.safetensors.abc123.tmp"  # a writer killed mid-write
    stray.write_bytes(b"\x00" * 10)
    assert s.keys() == ["k0"] and not s.done("k1")
    ProgressStore(tmp_path, {"a": 1})
    assert not stray.exists()


def test_store_damaged_chunk_is_reported_and_set_aside(tmp_path):
    s = ProgressStore(tmp_path, {"a": 1})
    s.save("k", {"x": torch.arange(4.0)})
    f = tmp_path / "k.safetensors"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(CheckpointCorruptError):
        s.load("k")
    with pytest.warns(RuntimeWarning, match="k.safetensors.*not used"):
        assert s.get("k") is None
    assert not s.done("k") and (tmp_path / "k.safetensors.corrupt").exists()


def test_store_chunk_copied_over_another_is_refused(tmp_path):
    s = ProgressStore(tmp_path, {"a": 1})
    s.save("k1", {"x": torch.arange(4.0)})
    s.save("k2", {"x": torch.arange(4.0) + 10})
    (tmp_path / "k2.safetensors").write_bytes((tmp_path / "k1.safetensors").read_bytes())
    load_tensors(tmp_path / "k2.safetensors")  # the checksum alone is valid
    with pytest.raises(CheckpointForeignError, match=r"k2.safetensors.*key: k1 ≠ k2"):
        s.load("k2")
    with pytest.warns(RuntimeWarning, match=r"k2.safetensors.*another computation.*not used"):
        assert s.get("k2") is None
    assert not s.done("k2") and s.get("k1") is not None


def test_store_chunk_of_another_config_is_refused(tmp_path):
    ProgressStore(tmp_path / "a", {"damping": 0.1}).save("k", {"x": torch.ones(2)})
    s = ProgressStore(tmp_path / "b", {"damping": 0.2})
    (tmp_path / "b" / "k.safetensors").write_bytes((tmp_path / "a" / "k.safetensors").read_bytes())
    with pytest.warns(RuntimeWarning, match=r"b/k.safetensors.*another computation \(store: "):
        assert s.get("k") is None


def test_store_identity_from_the_caller(tmp_path):
    s = ProgressStore(tmp_path, {"a": 1})
    s.save("k", {"x": torch.ones(2)}, {"note": 1}, identity={"tasks": "abc"})
    tensors, meta = s.load("k", identity={"tasks": "abc"})
    assert meta == {"note": 1} and torch.equal(tensors["x"], torch.ones(2))  # identity stripped
    with pytest.raises(CheckpointForeignError, match="tasks: abc ≠ abd"):
        s.load("k", identity={"tasks": "abd"})
    with pytest.raises(CheckpointForeignError, match="tasks"):
        s.load("k")  # asked without: the file's extra identity does not match either
    with pytest.raises(ValueError, match="reserved"):
        s.save("k", {}, {"__mf_identity__": 1})


def test_store_file_without_identity_is_refused(tmp_path):
    s = ProgressStore(tmp_path, {"a": 1})
    save_tensors(tmp_path / "k.safetensors", {"x": torch.ones(2)}, {"start": 0})  # older format
    with pytest.raises(CheckpointForeignError, match="carries no identity"):
        s.load("k")


def test_map_chunks_recomputes_a_copied_chunk(tmp_path):
    def compute(r):
        return {"v": torch.arange(r[0], r[1], dtype=torch.float64)}

    s = ProgressStore(tmp_path, {"n": 6})
    ref = torch.cat([c["v"] for c in map_chunks(compute, 6, 2, store=s)])
    (tmp_path / "00000002-00000004.safetensors").write_bytes(
        (tmp_path / "00000000-00000002.safetensors").read_bytes()
    )
    with pytest.warns(RuntimeWarning, match="00000002-00000004.safetensors.*another computation"):
        out = map_chunks(compute, 6, 2, store=s)
    assert torch.equal(torch.cat([c["v"] for c in out]), ref)


def test_map_chunks_skips_finished_chunks(tmp_path):
    seen = []

    def compute(r):
        seen.append(r)
        return {"v": torch.arange(r[0], r[1], dtype=torch.float64) ** 2}

    ref = torch.cat([c["v"] for c in map_chunks(compute, 10, 3)])
    assert torch.equal(ref, torch.arange(10.0, dtype=torch.float64) ** 2)
    s = ProgressStore(tmp_path, {"n": 10})
    s.save("00000003-00000006", {"v": torch.tensor([9.0, 16.0, 25.0], dtype=torch.float64)})
    seen.clear()
    out = map_chunks(compute, 10, 3, store=s)
    assert seen == [(0, 3), (6, 9), (9, 10)] and s.is_complete
    assert torch.equal(torch.cat([c["v"] for c in out]), ref)
    seen.clear()
    assert torch.equal(torch.cat([c["v"] for c in map_chunks(compute, 10, 3, store=s)]), ref)
    assert seen == []


def test_digest_stable_and_strict():
    a = {"t": torch.arange(3), "l": [1, "x", None]}
    assert digest(a) == digest({"l": [1, "x", None], "t": torch.arange(3)})
    assert digest(a) != digest({"t": torch.arange(3.0), "l": [1, "x", None]})  # dtype counts
    with pytest.raises(TypeError, match="object"):
        digest([object()])
    assert digest(iter([1]), strict=False) is None
