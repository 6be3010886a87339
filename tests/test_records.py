"""The torch-free record files and definitions (nondet_hpc.records): projection, grid, weights, trajectory.

Every reader must refuse what it did not write without executing anything: planted pickles,
links, FIFOs, oversized or malformed files. The sketch must be one fixed projection, unbiased
with the variance its docstring states, and keep a one-ulp change exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import cli_env
from nondet_hpc.config import ConfigError
from nondet_hpc.records.projection import (SKETCH_KEY, CountSketch, Layout, fingerprint, relative_sd, splitmix64,
                                           tensor_digests, tensor_norms, total_norm)
from nondet_hpc.safeio import RefusedFile
from nondet_hpc.records.schedule import Grid, probe_indices
from nondet_hpc.records.trajectory import SPEC, Trajectory, read_trajectory, write_trajectory
from nondet_hpc.records.weights import WeightsFile, read_weights, write_weights


# --- projection --------------------------------------------------------------------------------
def test_splitmix64_matches_the_published_generator():
    # SplitMix64 seeded with 0: its first outputs (Steele, Lea & Flood 2014; the reference C code)
    state = np.array([0, 0x9E3779B97F4A7C15], dtype=np.uint64)
    assert [int(v) for v in splitmix64(state)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_the_sketch_is_one_fixed_projection_whatever_the_seeds():
    import torch

    def digest(cs: CountSketch) -> str:
        return hashlib.sha256(cs.buckets.astype("<i8").tobytes() + cs.signs.tobytes()).hexdigest()

    first = digest(CountSketch(1000, 4096))
    for seed in (1, 7, 123):  # every global generator the training or a library might use, reseeded
        np.random.seed(seed)
        torch.manual_seed(seed)
        np.random.default_rng(seed).random(10)
        assert digest(CountSketch(1000, 4096)) == first
    # pinned: a change of the generator would make new sketches incomparable with every stored one
    assert first == "9e3cf8736acb9e977d3e617c02dc0e0a5d9cd23e9ee1dd6c041059520aa4b41f"
    assert SKETCH_KEY == 0x6E6F6E6465745F31
    cs = CountSketch(200_000, 4096)
    assert cs.buckets.min() == 0 and cs.buckets.max() == 4095
    counts = np.bincount(cs.buckets, minlength=4096)
    assert abs(counts.mean() - 200_000 / 4096) < 1e-9 and counts.std() < 2 * np.sqrt(200_000 / 4096)
    assert abs(cs.signs.astype(float).mean()) < 0.01
    # a prefix of the parameters is projected as in a larger model: the projection is per index
    assert np.array_equal(CountSketch(1000, 4096).buckets, cs.buckets[:1000])


def test_sketch_squared_distance_is_unbiased_with_the_stated_variance():
    rng = np.random.default_rng(0)
    d = (rng.standard_normal(3000) + 0.5).astype(np.float32)  # a non-zero mean: sign errors would bias
    true = float(np.sum(d.astype(np.float64) ** 2))
    D, keys = 64, 600
    est = np.array([np.sum(CountSketch(d.size, D, key=k).apply(d) ** 2) for k in range(keys)])
    var = 2.0 / D * (true ** 2 - float(np.sum(d.astype(np.float64) ** 4)))
    assert abs(est.mean() - true) < 4 * np.sqrt(var / keys)
    assert 0.8 < est.var() / var < 1.25
    # one SD of the distance estimate relative to the distance: about 1 / sqrt(2 D)
    rel = (np.sqrt(est) - np.sqrt(true)) / np.sqrt(true)
    assert 0.8 < rel.std() / relative_sd(D) < 1.25


def test_a_one_ulp_change_appears_exactly_in_the_float64_sketch_and_the_fingerprint():
    rng = np.random.default_rng(1)
    layout = Layout.of([("conv.weight", (16, 1, 3, 3)), ("fc.weight", (10, 64)), ("fc.bias", (10,))])
    x = (rng.standard_normal(layout.n_values) * 0.1).astype(np.float32)
    cs = CountSketch(x.size, 4096)
    for index in (0, 17, 700):
        y = x.copy()
        y[index] = np.nextafter(y[index], np.float32(np.inf))
        delta = float(y[index]) - float(x[index])
        diff = cs.apply(y) - cs.apply(x)
        assert np.flatnonzero(diff).tolist() == [cs.buckets[index]]
        assert diff[cs.buckets[index]] == cs.signs[index] * delta
        assert np.sqrt(np.sum(diff ** 2)) == abs(delta)
        assert fingerprint(layout, y) != fingerprint(layout, x)
        changed = np.any(tensor_digests(layout, y) != tensor_digests(layout, x), axis=1)
        assert np.flatnonzero(changed).tolist() == [int(np.searchsorted(layout.offsets, index, side="right")) - 1]
    assert fingerprint(layout, x.copy()) == fingerprint(layout, x)
    # the fingerprint covers what the bytes are: same bytes under another name or shape differ
    other = Layout.of([("conv.weight", (16, 9)), ("fc.weight", (10, 64)), ("fc.bias", (10,))])
    assert fingerprint(other, x) != fingerprint(layout, x)


def test_tensor_norms_are_the_l2_norms():
    rng = np.random.default_rng(2)
    layout = Layout.of([("a", (3, 4)), ("b", (0,)), ("c", (1000,))])
    x = rng.standard_normal(layout.n_values).astype(np.float32)
    norms = tensor_norms(layout, x)
    assert norms[1] == 0.0
    direct = [np.linalg.norm(x[:12].astype(float)), np.linalg.norm(x[12:].astype(float))]
    np.testing.assert_allclose(norms[[0, 2]], direct, rtol=1e-14)
    np.testing.assert_allclose(total_norm(norms), np.linalg.norm(x.astype(float)), rtol=1e-14)


# --- grid and probe --------------------------------------------------------------------------------
def test_the_default_grid_of_the_paper_schedule():
    steps = Grid().steps(98, 500)  # CIFAR-10 at batch 512: 98 steps per epoch
    assert steps[:8] == [0, 1, 2, 4, 8, 16, 32, 64]
    assert steps[8:] == [98 * e for e in (1, 2, 4, 8, 16, 32, 64, 128, 256, 500)]
    assert Grid(step_base=1, epoch_base=0).steps(5, 3) == [0, 1, 2, 3, 4, 15]
    assert Grid(step_base=0, epoch_base=0, extra_epochs=(2,)).steps(5, 3) == [0, 10, 15]
    assert Grid(step_base=3, epoch_base=3).steps(10, 9) == [0, 1, 3, 9, 10, 30, 90]
    assert Grid().steps(1, 1) == [0, 1]
    with pytest.raises(ConfigError, match="record.extra_epochs"):
        Grid(extra_epochs=(4,)).steps(5, 3)
    for bad in ({"step_base": -1}, {"epoch_base": 1}, {"epoch_base": 2.0}):
        with pytest.raises(ConfigError, match="record."):
            Grid(**bad)


def test_probe_indices_are_fixed_even_and_all_of_a_small_test_set():
    assert probe_indices(497, 512).tolist() == list(range(497))
    idx = probe_indices(10_000, 512)
    assert len(idx) == 512 and idx[0] == 0 and np.all(np.diff(idx) > 0) and idx[-1] < 10_000
    assert np.array_equal(idx, probe_indices(10_000, 512))
    assert probe_indices(100, 0).tolist() == []


# --- trajectory file ----------------------------------------------------------------------------------
def make_trajectory(T: int = 4, K: int = 6, C: int = 3, D: int = 16, run_id: str = "run-a",
                    seed: int = 0) -> Trajectory:
    rng = np.random.default_rng(seed)
    return Trajectory(run_id=run_id, complete=True, steps_per_epoch=4, step=np.array([0, 1, 2, 4, 8][:T]),
                      fingerprint=rng.integers(0, 256, (T, 32), dtype=np.uint8),
                      tensor_digest=rng.integers(0, 256, (T, 2, 32), dtype=np.uint8),
                      tensor_name=np.array(["w", "b"]), tensor_size=np.array([5, 2]),
                      tensor_norm=rng.random((T, 2)), sketch_key=SKETCH_KEY, sketch=rng.standard_normal((T, D)),
                      probe_index=np.arange(K) * 2, probe_label=rng.integers(0, C, K),
                      probe_logits=rng.standard_normal((T, K, C)).astype(np.float32))


def _same(a: Trajectory, b: Trajectory) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values()))


def test_trajectory_round_trip_with_the_same_bytes_every_time(tmp_path):
    t = make_trajectory()
    write_trajectory(tmp_path / "t.npz", t)
    first = (tmp_path / "t.npz").read_bytes()
    os.utime(tmp_path / "t.npz", (0, 0))
    write_trajectory(tmp_path / "t.npz", make_trajectory())
    assert (tmp_path / "t.npz").read_bytes() == first  # no timestamps, fixed order: same content, same bytes
    back = read_trajectory(tmp_path / "t.npz")
    assert _same(back, t) and back.run_id == "run-a" and back.complete is True
    with np.load(tmp_path / "t.npz", allow_pickle=False) as npz:  # an ordinary npz for any reader
        assert sorted(npz.files) == sorted(SPEC)
    assert back.epoch.tolist() == [0.0, 0.25, 0.5, 1.0]
    np.testing.assert_allclose(back.param_norm, np.linalg.norm(t.tensor_norm, axis=1))
    empty = make_trajectory(T=0)
    write_trajectory(tmp_path / "e.npz", empty)
    assert read_trajectory(tmp_path / "e.npz").n_points == 0


class _Payload:
    """Unpickling this creates a file: the proof that a reader executed the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _npz(arrays: dict, compress: bool = False, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=mode) as zf:
        for k, v in arrays.items():
            with zf.open(f"{k}.npy", "w") as f:
                np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=allow_pickle)
    return buf.getvalue()


def test_trajectory_reader_refuses_what_it_did_not_write_without_executing_it(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "trajectory.npz"
    good = make_trajectory().arrays()
    payload_arr = np.array([_Payload(marker)], dtype=object)
    cases = {
        "pickle": pickle.dumps(_Payload(marker)),
        "object array": _npz({**good, "sketch": payload_arr}, allow_pickle=True),
        "extra entry": _npz({**good, "extra": np.zeros(1)}),
        "missing entry": _npz({k: v for k, v in good.items() if k != "sketch"}),
        "compressed": _npz(good, compress=True),
        "wrong dtype": _npz({**good, "sketch": good["sketch"].astype(np.float32)}),
        "wrong shape": _npz({**good, "tensor_norm": good["tensor_norm"][:, :1]}),
        "steps not increasing": _npz({**good, "step": good["step"][::-1].copy()}),
        "empty": b"",
    }
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(RefusedFile):
            read_trajectory(path)
        assert not marker.exists(), name
    path.write_bytes(_npz(good))
    assert read_trajectory(path).n_points == 4  # the well-formed archive of the same arrays is read
    with pytest.raises(RefusedFile, match="more than"):
        read_trajectory(path, max_bytes=100)


def test_readers_refuse_links_fifos_folders_and_missing_files(tmp_path):
    write_trajectory(tmp_path / "real.npz", make_trajectory())
    (tmp_path / "link.npz").symlink_to(tmp_path / "real.npz")
    os.mkfifo(tmp_path / "fifo.npz")  # would block a plain open() forever
    (tmp_path / "dir.npz").mkdir()
    for name, why in (("link.npz", "symbolic link"), ("fifo.npz", "FIFO"), ("dir.npz", "folder"),
                      ("none.npz", "missing")):
        with pytest.raises(RefusedFile, match=why):
            read_trajectory(tmp_path / name)
        with pytest.raises(RefusedFile, match=why):
            read_weights(tmp_path / name)


# --- weights file ---------------------------------------------------------------------------------------
def _weights(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {"conv1.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
              "bn1.weight": np.ones(4, np.float32), "fc.weight": rng.standard_normal((3, 4)).astype(np.float32)}
    buffers = {"bn1.running_mean": np.zeros(4, np.float32), "bn1.running_var": np.ones(4, np.float32),
               "bn1.num_batches_tracked": np.array(7, np.int64)}
    return params, buffers


def test_weights_round_trip_keeps_order_dtypes_and_fingerprint(tmp_path):
    params, buffers = _weights()
    digest = write_weights(tmp_path / "w.safetensors", params, buffers, run_id="run-a", step=12)
    w = read_weights(tmp_path / "w.safetensors")
    assert list(w.params) == list(params) and list(w.buffers) == list(buffers)
    for k in params:
        assert np.array_equal(w.params[k], params[k]) and w.params[k].dtype == np.float32
    assert w.buffers["bn1.num_batches_tracked"].shape == () and int(w.buffers["bn1.num_batches_tracked"]) == 7
    assert w.meta["run_id"] == "run-a" and w.meta["step"] == "12" and w.meta["fingerprint"] == digest
    flat = np.concatenate([a.reshape(-1) for a in params.values()])
    assert digest == fingerprint(Layout.of((k, v.shape) for k, v in params.items()), flat).hex()
    import safetensors
    import safetensors.numpy
    # an ordinary safetensors file for the reference library, and the same bytes for the same weights
    with safetensors.safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as f:
        assert f.metadata() == w.meta and sorted(f.keys()) == sorted([*params, *buffers])
    ref = safetensors.numpy.load_file(str(tmp_path / "w.safetensors"))
    assert all(np.array_equal(ref[k], v) for k, v in {**params, **buffers}.items())
    first = (tmp_path / "w.safetensors").read_bytes()
    write_weights(tmp_path / "w.safetensors", params, buffers, run_id="run-a", step=12)
    assert (tmp_path / "w.safetensors").read_bytes() == first
    with WeightsFile(tmp_path / "w.safetensors") as f:
        n = f.layout.n_values
        for lo, hi in ((0, n), (3, 40), (36, 40), (39, n), (5, 5)):
            assert np.array_equal(f.flat_range(lo, hi), flat[lo:hi])


def test_weights_reader_refuses_pickles_edits_and_foreign_files(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "weights.safetensors"
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    with pytest.raises(RefusedFile):
        read_weights(path)
    import torch  # a torch checkpoint (zip of pickles) with a payload, planted under the name
    torch.save({"x": _Payload(marker)}, path)
    with pytest.raises(RefusedFile):
        read_weights(path)
    assert not marker.exists()

    params, buffers = _weights()
    write_weights(path, params, buffers, run_id="run-a", step=1)
    with WeightsFile(path) as f:
        at = f.entries["fc.weight"].start + 5
    data = bytearray(path.read_bytes())
    data[at] ^= 1  # one bit of one parameter value
    path.write_bytes(bytes(data))
    assert not np.array_equal(read_weights(path, verify=False).params["fc.weight"], params["fc.weight"])
    with pytest.raises(RefusedFile, match="fingerprint"):
        read_weights(path)

    import safetensors.numpy
    path.write_bytes(safetensors.numpy.save(params, metadata={"format": "pt"}))  # a foreign safetensors file
    with pytest.raises(RefusedFile, match="not a weights file"):
        read_weights(path)
    good = bytearray(safetensors.numpy.save(params, metadata={"format": "x"}))
    (n,) = struct.unpack("<Q", good[:8])
    path.write_bytes(struct.pack("<Q", 10**12) + bytes(good[8:]))  # impossible header length
    with pytest.raises(RefusedFile, match="header length"):
        read_weights(path)
    header = json.loads(good[8:8 + n])
    header["fc.weight"]["data_offsets"][1] += 4  # offsets that do not match the shape
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(good[8 + n:]))
    with pytest.raises(RefusedFile, match="offsets"):
        read_weights(path)


def test_reading_records_needs_no_torch(tmp_path):
    params, buffers = _weights()
    write_weights(tmp_path / "w.safetensors", params, buffers, run_id="run-a", step=1)
    write_trajectory(tmp_path / "t.npz", make_trajectory())
    code = (
        "import sys; sys.modules['torch'] = None  # any import of torch now fails\n"
        "from nondet_hpc.records.weights import read_weights\n"
        "from nondet_hpc.records.trajectory import read_trajectory\n"
        "from nondet_hpc.analysis.divergence import group_curve\n"
        "from nondet_hpc.analysis.instability import initial_change\n"
        f"w = read_weights({str(tmp_path / 'w.safetensors')!r}); t = read_trajectory({str(tmp_path / 't.npz')!r})\n"
        "print(len(w.params), t.n_points, group_curve([t, t]).distance.tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "4", "[0.0,", "0.0,", "0.0,", "0.0]"]
