"""KV dumps: meta_*.json + raw K/V files, and .npz files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from h2o_test_helpers import realistic_kv, words_of

from h2o_kernels.codec.rope import RopeSpec
from h2o_kernels.lossless import kvdump
from h2o_kernels.lossless.kvdump import (
    DumpEntry,
    DumpError,
    dump_cache,
    iter_dump_files,
    link_identical,
    load_many,
    meta_rope,
    read_meta,
    read_npz,
    write_dump,
)


def _kv(dtype=np.float16, shape=(9, 2, 5), seed=0):
    rng = np.random.default_rng(seed)
    k = realistic_kv(rng, *shape).astype(dtype)
    v = realistic_kv(rng, *shape).astype(dtype)
    return k, v


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_write_read_round_trip(tmp_path, dtype):
    k, v = _kv(dtype)
    if dtype == np.float16:  # special values survive bit for bit
        k.view(np.uint16)[0, 0, :3] = [0x7E01, 0x8000, 0xFC00]
    meta_path = write_dump(tmp_path, run_id="my run/1", stage="prefill", layer_id=7, seq_start=128, k=k, v=v)
    assert meta_path.parent == tmp_path and meta_path.name.startswith("meta_") and meta_path.suffix == ".json"
    meta = json.loads(meta_path.read_text())
    assert meta["seq_len"] == 9 and meta["kv_heads"] == 2 and meta["head_dim"] == 5
    assert meta["bytes_per_elem"] == np.dtype(dtype).itemsize
    assert (tmp_path / meta["k_file"]).stat().st_size == k.nbytes
    assert not list(tmp_path.glob("*.tmp")), "atomic writes left temporary files behind"

    entry = read_meta(meta_path)
    assert isinstance(entry, DumpEntry)
    assert (entry.run_id, entry.stage, entry.layer_id, entry.seq_start) == ("my run/1", "prefill", 7, 128)
    assert (entry.seq_len, entry.kv_heads, entry.head_dim) == (9, 2, 5)
    assert entry.bytes_per_elem == np.dtype(dtype).itemsize
    assert entry.raw_bytes == k.nbytes + v.nbytes
    k2, v2 = entry.load()
    assert k2.dtype == np.dtype(dtype).newbyteorder("<") and k2.shape == k.shape
    assert k2.tobytes() == k.tobytes() and v2.tobytes() == v.tobytes()
    assert not np.array_equal(k2, v2)


def test_write_dump_converts_big_endian_to_little_endian(tmp_path):
    k, v = _kv()
    meta_path = write_dump(tmp_path, run_id="r", stage="decode", layer_id=0, seq_start=0,
                           k=k.astype(">f2"), v=v.astype(">f2"))
    k2, v2 = read_meta(meta_path).load()
    assert np.array_equal(words_of(k2), words_of(k)) and np.array_equal(words_of(v2), words_of(v))


def test_entries_with_different_layers_and_stages_do_not_collide(tmp_path):
    k, v = _kv()
    paths = {write_dump(tmp_path, run_id="r", stage=stage, layer_id=layer, seq_start=start, k=k, v=v)
             for layer in (0, 1) for stage, start in (("prefill", 0), ("decode", 9))}
    assert len(paths) == 4
    assert sorted(iter_dump_files(tmp_path)) == sorted(paths)


@pytest.mark.parametrize("k,v", [
    (np.zeros((4, 2, 3), np.float16), np.zeros((4, 2, 4), np.float16)),  # shape mismatch
    (np.zeros((4, 6), np.float16), np.zeros((4, 6), np.float16)),  # not 3-D
    (np.zeros((4, 2, 3), np.float16), np.zeros((4, 2, 3), np.float32)),  # dtype mismatch
    (np.zeros((4, 2, 3), np.int16), np.zeros((4, 2, 3), np.int16)),  # not float
    (np.zeros((4, 2, 3), np.float64), np.zeros((4, 2, 3), np.float64)),  # unsupported width
])
def test_write_dump_rejects_bad_arrays(tmp_path, k, v):
    with pytest.raises(ValueError):
        write_dump(tmp_path, run_id="r", stage="prefill", layer_id=0, seq_start=0, k=k, v=v)
    assert not list(tmp_path.iterdir())


# --- npz -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_read_npz_with_metadata(tmp_path, dtype):
    k, v = _kv(dtype)
    path = tmp_path / "anything.npz"
    np.savez(path, k=k, v=v, layer_id=np.int64(5), stage="decode", run_id="runA", seq_start=np.int64(40))
    entry = read_npz(path)
    assert (entry.layer_id, entry.stage, entry.run_id, entry.seq_start) == (5, "decode", "runA", 40)
    assert (entry.seq_len, entry.kv_heads, entry.head_dim) == k.shape
    assert entry.bytes_per_elem == np.dtype(dtype).itemsize
    k2, v2 = entry.load()
    assert k2.tobytes() == k.tobytes() and v2.tobytes() == v.tobytes()


@pytest.mark.parametrize("name,layer", [("kv_layer12.npz", 12), ("model-layer_3-x.npz", 3),
                                        ("layer-04.npz", 4), ("noname.npz", 0)])
def test_read_npz_takes_the_layer_from_the_file_name(tmp_path, name, layer):
    k, v = _kv()
    np.savez(tmp_path / name, k=k, v=v)
    entry = read_npz(tmp_path / name)
    assert entry.layer_id == layer
    assert entry.stage == "prefill" and entry.seq_start == 0
    assert entry.run_id == Path(name).stem


def test_read_npz_layer_id_array_beats_the_file_name(tmp_path):
    k, v = _kv()
    np.savez(tmp_path / "layer9.npz", k=k, v=v, layer_id=np.int64(2))
    assert read_npz(tmp_path / "layer9.npz").layer_id == 2


def test_read_npz_big_endian_arrays_load_little_endian(tmp_path):
    k, v = _kv()
    np.savez(tmp_path / "layer1.npz", k=k.astype(">f2"), v=v.astype(">f2"))
    k2, v2 = read_npz(tmp_path / "layer1.npz").load()
    assert k2.dtype.byteorder in ("<", "=") and np.array_equal(words_of(k2), words_of(k))
    assert np.array_equal(words_of(v2), words_of(v))


@pytest.mark.parametrize("arrays,fragment", [
    ({"k": np.zeros((3, 2, 2), np.float16)}, "'v'"),
    ({"v": np.zeros((3, 2, 2), np.float16)}, "'k'"),
    ({"keys": np.zeros((3, 2, 2), np.float16), "values": np.zeros((3, 2, 2), np.float16)}, "missing"),
])
def test_read_npz_missing_arrays_name_the_file_and_the_array(tmp_path, arrays, fragment):
    path = tmp_path / "layer0.npz"
    np.savez(path, **arrays)
    with pytest.raises(DumpError) as info:
        read_npz(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


@pytest.mark.parametrize("k,v", [
    (np.zeros((3, 2, 2), np.float16), np.zeros((3, 2, 3), np.float16)),
    (np.zeros((3, 4), np.float16), np.zeros((3, 4), np.float16)),
    (np.zeros((0, 2, 2), np.float16), np.zeros((0, 2, 2), np.float16)),
    (np.zeros((3, 2, 2), np.int32), np.zeros((3, 2, 2), np.int32)),
    (np.zeros((3, 2, 2), np.float16), np.zeros((3, 2, 2), np.float32)),
])
def test_read_npz_bad_arrays(tmp_path, k, v):
    path = tmp_path / "layer0.npz"
    np.savez(path, k=k, v=v)
    with pytest.raises(DumpError, match="layer0.npz"):
        read_npz(path)


def test_read_npz_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "layer0.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DumpError, match="layer0.npz"):
        read_npz(bad)
    with pytest.raises(DumpError, match="absent.npz"):
        read_npz(tmp_path / "absent.npz")


# --- bad meta files --------------------------------------------------------------------------------


@pytest.fixture
def meta_path(tmp_path) -> Path:
    k, v = _kv()
    return write_dump(tmp_path, run_id="r", stage="prefill", layer_id=1, seq_start=0, k=k, v=v)


def _rewrite(meta_path: Path, **changes) -> dict:
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del meta[key]
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))
    return meta


_DELETE = object()


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe", "[1, 2, 3]", '"a string"', "null"])
def test_bad_json_names_the_file(meta_path, text):
    meta_path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DumpError) as info:
        read_meta(meta_path)
    assert str(meta_path) in str(info.value)


@pytest.mark.parametrize("key", ["layer_id", "seq_start", "seq_len", "kv_heads", "head_dim", "bytes_per_elem",
                                 "k_file", "v_file"])
def test_missing_keys_name_the_file_and_key(meta_path, key):
    _rewrite(meta_path, **{key: _DELETE})
    with pytest.raises(DumpError) as info:
        read_meta(meta_path)
    assert str(meta_path) in str(info.value)
    assert repr(key) in str(info.value) or key in str(info.value)


@pytest.mark.parametrize("key,value", [
    ("layer_id", "1"), ("layer_id", 1.0), ("layer_id", True), ("seq_len", 0), ("seq_len", -4),
    ("kv_heads", 0), ("head_dim", None), ("bytes_per_elem", "2"), ("k_file", ""), ("v_file", 3),
])
def test_bad_values_name_the_file_and_key(meta_path, key, value):
    _rewrite(meta_path, **{key: value})
    with pytest.raises(DumpError) as info:
        read_meta(meta_path)
    assert str(meta_path) in str(info.value) and key in str(info.value)


def test_missing_optional_keys_get_defaults(meta_path):
    _rewrite(meta_path, run_id=_DELETE, stage=_DELETE)
    entry = read_meta(meta_path)
    assert entry.run_id == "" and entry.stage == "unknown"
    assert entry.load()[0].shape == (9, 2, 5)


def test_missing_meta_file(tmp_path):
    with pytest.raises(DumpError, match="meta_absent.json"):
        read_meta(tmp_path / "meta_absent.json")


@pytest.mark.parametrize("which", ["k_file", "v_file"])
@pytest.mark.parametrize("delta", [-1, 1, -10**9])
def test_wrong_file_size_names_the_file(meta_path, which, delta):
    meta = json.loads(meta_path.read_text())
    path = meta_path.parent / meta[which]
    data = path.read_bytes()
    path.write_bytes(data[:delta] if delta < 0 else data + b"\0" * delta)
    entry = read_meta(meta_path)  # the meta itself is fine
    with pytest.raises(DumpError) as info:
        entry.load()
    assert str(path) in str(info.value)
    assert str(len(data)) in str(info.value), "the message should give the expected size"


@pytest.mark.parametrize("which", ["k_file", "v_file"])
def test_missing_binary_names_both_files(meta_path, which):
    meta = json.loads(meta_path.read_text())
    (meta_path.parent / meta[which]).unlink()
    entry = read_meta(meta_path)
    with pytest.raises(DumpError) as info:
        entry.load()
    assert str(meta_path) in str(info.value)
    assert meta[which] in str(info.value)


def test_meta_claiming_a_bigger_shape_fails_on_load(meta_path):
    _rewrite(meta_path, seq_len=10)
    with pytest.raises(DumpError, match="expected"):
        read_meta(meta_path).load()


def test_unsupported_bytes_per_elem_fails_on_load(meta_path):
    _rewrite(meta_path, bytes_per_elem=8)
    with pytest.raises(DumpError, match="bytes_per_elem"):
        read_meta(meta_path).load()


def test_dump_error_is_a_value_error():
    assert issubclass(DumpError, ValueError)


def test_iter_dump_files_finds_meta_and_npz_recursively_in_order(tmp_path):
    k, v = _kv()
    (tmp_path / "b" / "deep").mkdir(parents=True)
    m1 = write_dump(tmp_path / "a", run_id="r", stage="prefill", layer_id=0, seq_start=0, k=k, v=v)
    np.savez(tmp_path / "b" / "deep" / "layer1.npz", k=k, v=v)
    np.savez(tmp_path / "top.npz", k=k, v=v)
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "meta_x.txt").write_text("{}")
    found = list(iter_dump_files(tmp_path))
    assert set(found) == {m1, tmp_path / "b" / "deep" / "layer1.npz", tmp_path / "top.npz"}
    assert list(iter_dump_files(tmp_path)) == found  # deterministic
    assert list(iter_dump_files(tmp_path / "empty-nonexistent")) == []


# --- identical dumps stored once --------------------------------------------------------------------


def _two_runs(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """runA and runB: layers 0-1 identical (as front layers are), layer 2 differs at the same size,
    and runA's layer 3 has V equal to K. Returns the arrays written, by meta file path."""
    written = {}
    for run in ("runA", "runB"):
        for layer in range(4):
            k, v = _kv(seed=layer if layer < 2 else 10 * layer + len(written))
            v = k if layer == 3 and run == "runA" else v
            meta = write_dump(root / run, run_id=run, stage="prefill", layer_id=layer, seq_start=0, k=k, v=v)
            written[str(meta)] = (k, v)
    return written


def _read_all(root: Path) -> dict[str, tuple[bytes, bytes]]:
    return {str(path): tuple(a.tobytes() for a in read_meta(path).load()) for path in iter_dump_files(root)}


def _data(root: Path, run: str, which: str, layer: int) -> Path:
    return root / run / f"{which}_{run}_prefill_layer{layer:03d}_s000000.bin"


def test_link_identical_shares_equal_files_and_readers_see_the_same_tensors(tmp_path):
    written = _two_runs(tmp_path)
    before = _read_all(tmp_path)
    assert before == {path: (k.tobytes(), v.tobytes()) for path, (k, v) in written.items()}
    size = _data(tmp_path, "runA", "k", 0).stat().st_size
    assert link_identical(tmp_path) == (5, 5 * size)  # runB's K/V of layers 0-1, runA's V of layer 3
    assert _read_all(tmp_path) == before
    for layer in (0, 1):
        for which in ("k", "v"):
            a, b = (os.stat(_data(tmp_path, run, which, layer)) for run in ("runA", "runB"))
            assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    k3, v3 = (os.stat(_data(tmp_path, "runA", which, 3)) for which in ("k", "v"))
    assert k3.st_ino == v3.st_ino and k3.st_nlink == 2
    for which in ("k", "v"):  # the same size, other bytes: left alone
        a, b = (os.stat(_data(tmp_path, run, which, 2)) for run in ("runA", "runB"))
        assert a.st_ino != b.st_ino and a.st_nlink == b.st_nlink == 1
    assert link_identical(tmp_path) == (0, 0)  # already shared
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_later_write_replaces_a_linked_file_without_touching_its_twin(tmp_path):
    _two_runs(tmp_path)
    link_identical(tmp_path)
    twin = _data(tmp_path, "runA", "k", 0)
    old = twin.read_bytes()
    k, v = _kv(seed=99)
    write_dump(tmp_path / "runB", run_id="runB", stage="prefill", layer_id=0, seq_start=0, k=k, v=v)
    assert twin.read_bytes() == old and os.stat(twin).st_nlink == 1
    assert _data(tmp_path, "runB", "k", 0).read_bytes() == k.tobytes()
    assert read_meta(tmp_path / "runA" / "meta_runA_prefill_layer000_s000000.json").load()[0].tobytes() == old


def test_link_identical_confirms_bytes_before_linking(tmp_path, monkeypatch):
    _two_runs(tmp_path)
    before = _read_all(tmp_path)
    monkeypatch.setattr(kvdump, "_digest", lambda path: b"collision")  # every file of a size in one group
    size = _data(tmp_path, "runA", "k", 0).stat().st_size
    assert link_identical(tmp_path) == (5, 5 * size)  # the equal ones only
    assert _read_all(tmp_path) == before


def test_link_identical_leaves_files_alone_without_hard_links(tmp_path, monkeypatch):
    _two_runs(tmp_path)
    before = _read_all(tmp_path)

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(kvdump.os, "link", no_links)
    assert link_identical(tmp_path) == (0, 0)
    assert _read_all(tmp_path) == before
    assert all(os.stat(p).st_nlink == 1 for p in tmp_path.rglob("*.bin"))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_link_identical_counts_only_freed_bytes_and_skips_links_and_other_files(tmp_path):
    data = b"\x01" * 64
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.bin").write_bytes(data)
    os.link(tmp_path / "b.bin", tmp_path / "c.bin")  # b and c already share their data
    (tmp_path / "notes.txt").write_bytes(data)
    (tmp_path / "link.bin").symlink_to(tmp_path / "a.bin")
    (tmp_path / "empty1.bin").write_bytes(b"")
    (tmp_path / "empty2.bin").write_bytes(b"")
    assert link_identical(tmp_path) == (2, 64)  # b then c relinked to a; the data is freed once
    assert {os.stat(tmp_path / n).st_ino for n in ("a.bin", "b.bin", "c.bin")} == {os.stat(tmp_path / "a.bin").st_ino}
    assert os.stat(tmp_path / "notes.txt").st_nlink == 1 and (tmp_path / "link.bin").is_symlink()
    assert os.stat(tmp_path / "empty1.bin").st_ino != os.stat(tmp_path / "empty2.bin").st_ino


# --- RoPE in the meta ----------------------------------------------------------------------------------


def test_write_dump_records_rope_and_read_meta_reads_it(tmp_path):
    k, v = _kv()
    plain = write_dump(tmp_path, run_id="r", stage="prefill", layer_id=0, seq_start=0, k=k, v=v)
    assert "rope_theta" not in json.loads(plain.read_text()) and read_meta(plain).rope is None
    spec = RopeSpec(100000.0, "interleaved")
    meta_path = write_dump(tmp_path, run_id="r", stage="decode", layer_id=0, seq_start=9, k=k, v=v, rope=spec)
    meta = json.loads(meta_path.read_text())
    assert meta["rope_theta"] == 100000.0 and meta["rope_layout"] == "interleaved"
    assert read_meta(meta_path).rope == spec


@pytest.mark.parametrize("fields, rope, problem", [
    ({}, None, None),
    ({"rope_theta": 10000}, RopeSpec(10000.0), None),  # layout absent: rotate-half
    ({"rope_theta": 500000.0, "rope_layout": "half"}, RopeSpec(500000.0), None),
    ({"rope_theta": "1e4"}, None, "rope_theta '1e4' is not a number"),
    ({"rope_theta": True}, None, "rope_theta True is not a number"),
    ({"rope_theta": 1.0}, None, "RoPE theta must be a finite number > 1"),
    ({"rope_theta": float("inf")}, None, "RoPE theta must be a finite number > 1"),
    ({"rope_theta": 10000.0, "rope_layout": "neox"}, None, "RoPE layout must be 'half' or 'interleaved'"),
])
def test_meta_rope(tmp_path, fields, rope, problem):
    path = tmp_path / "meta_x.json"
    got, text = meta_rope(fields, path)
    assert got == rope
    if problem is None:
        assert text is None
    else:
        assert text.startswith(f"{path}: ") and problem in text and "not matched through RoPE" in text


class _Cache:
    """A runtime cache as dump_cache reads it: one layer, positions per row and KV head."""

    num_layers = 1

    def __init__(self, positions: np.ndarray) -> None:
        self._positions = positions
        self._k, self._v = _kv(shape=(len(positions), positions.shape[1], 4))

    def k(self, layer: int) -> np.ndarray:
        return self._k

    def v(self, layer: int) -> np.ndarray:
        return self._v

    def positions(self, layer: int) -> np.ndarray:
        return self._positions


def _stage_ropes(out_dir: Path) -> dict[str, RopeSpec | None]:
    return {read_meta(p).stage: read_meta(p).rope for p in iter_dump_files(out_dir)}


def test_dump_cache_records_rope_only_for_consecutive_rows(tmp_path):
    spec = RopeSpec(100000.0)
    full = np.repeat(np.arange(10)[:, None], 2, axis=1)  # prompt 0..5, decode 6..9, nothing evicted
    dump_cache(_Cache(full), tmp_path / "full", "r", prompt_len=6, rope=spec)
    assert _stage_ropes(tmp_path / "full") == {"prefill": spec, "decode": spec}
    evicted = np.repeat(np.array([0, 1, 3, 4, 5, 6, 7, 9])[:, None], 2, axis=1)  # token 2 and 8 evicted
    dump_cache(_Cache(evicted), tmp_path / "evicted", "r", prompt_len=6, rope=spec)
    assert _stage_ropes(tmp_path / "evicted") == {"prefill": None, "decode": None}
    per_head = full.copy()
    per_head[7, 1] = 8  # head 1 kept another token at row 7
    per_head[8, 1] = 9
    per_head[9, 1] = 10
    dump_cache(_Cache(per_head), tmp_path / "per_head", "r", prompt_len=6, rope=spec)
    assert _stage_ropes(tmp_path / "per_head") == {"prefill": spec, "decode": None}
    dump_cache(_Cache(full), tmp_path / "none", "r", prompt_len=6)
    assert _stage_ropes(tmp_path / "none") == {"prefill": None, "decode": None}


# --- load_many ---------------------------------------------------------------------------------------


def test_load_many_is_the_concatenation_of_the_entries(tmp_path):
    parts = [_kv(shape=(n, 2, 5), seed=n) for n in (9, 4, 1)]
    entries = [read_meta(write_dump(tmp_path, run_id="r", stage="s", layer_id=0, seq_start=i * 10, k=k, v=v))
               for i, (k, v) in enumerate(parts)]
    k, v = load_many(entries)
    assert words_of(k).tobytes() == b"".join(words_of(p[0]).tobytes() for p in parts)
    assert words_of(v).tobytes() == b"".join(words_of(p[1]).tobytes() for p in parts)
    assert load_many(entries[:1])[0].tobytes() == entries[0].load()[0].tobytes()
    wide = read_meta(write_dump(tmp_path, run_id="r", stage="s", layer_id=1, seq_start=0,
                                k=parts[0][0].astype(np.float32), v=parts[0][1].astype(np.float32)))
    k_mixed, _ = load_many([entries[0], wide])  # fp16 then fp32: numpy's concatenation, fp32
    assert k_mixed.dtype == np.float32 and np.array_equal(k_mixed[9:], parts[0][0].astype(np.float32))


@pytest.mark.parametrize("delta", [-2, 2])
def test_load_many_names_a_file_of_the_wrong_size(meta_path, delta):
    entry = read_meta(meta_path)
    entry.v_path.write_bytes(entry.v_path.read_bytes()[:delta] if delta < 0 else entry.v_path.read_bytes() + b"xx")
    with pytest.raises(DumpError, match=rf"{entry.v_path.name}: \d+ bytes, expected \d+ for shape"):
        load_many([entry])
    entry.v_path.unlink()
    with pytest.raises(DumpError, match=f"cannot read {entry.v_path}"):
        load_many([entry])
