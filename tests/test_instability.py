"""The Instability section's math (analysis/divergence.py, analysis/instability.py) on planted arrays.

Each number is checked against a direct computation written out here (full arrays in memory,
numpy's norms), so the streamed, blocked versions in the package must agree with it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from nondet_hpc.analysis.divergence import GroupAccumulator, InstabilityError, group_curve, pairwise_distances
from nondet_hpc.analysis.instability import (condition_number, differing_tensors, efolding_steps, exact_distance,
                                             final_distance_matrix, first_divergence, growth_factor, initial_change,
                                             pair_divergence, pair_mean_ratio, pair_mean_ratio_ci, pair_result,
                                             saturation_step, sketch_errors, summary, twin_key)
from nondet_hpc.records.projection import SKETCH_KEY, CountSketch, Layout, fingerprint, tensor_digests, tensor_norms
from nondet_hpc.records.trajectory import Trajectory
from nondet_hpc.records.weights import WeightsFile, write_weights

SHAPES = {"conv.weight": (8, 1, 3, 3), "bn.weight": (8,), "fc.weight": (10, 8), "fc.bias": (10,)}
LAYOUT = Layout.of(SHAPES.items())
STEPS = np.array([0, 1, 2, 4, 8, 16])


def _traj(run_id: str, flats: list[np.ndarray], logits: np.ndarray, D: int = 64) -> Trajectory:
    """A trajectory recorded from the given flat parameter vectors, as the recorder computes it."""
    sk = CountSketch(LAYOUT.n_values, D)
    return Trajectory(run_id=run_id, complete=True, steps_per_epoch=4, step=STEPS[:len(flats)],
                      fingerprint=np.stack([np.frombuffer(fingerprint(LAYOUT, f), np.uint8) for f in flats]),
                      tensor_digest=np.stack([tensor_digests(LAYOUT, f) for f in flats]),
                      tensor_name=np.array(LAYOUT.names), tensor_size=LAYOUT.sizes,
                      tensor_norm=np.stack([tensor_norms(LAYOUT, f) for f in flats]), sketch_key=SKETCH_KEY,
                      sketch=np.stack([sk.apply(f) for f in flats]), probe_index=np.arange(logits.shape[1]),
                      probe_label=np.zeros(logits.shape[1], np.int64), probe_logits=logits.astype(np.float32))


def _runs(n_runs: int = 5, seed: int = 0, K: int = 7, C: int = 4):
    """n_runs runs drifting apart: a shared start, per-run noise growing with the step."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(LAYOUT.n_values).astype(np.float32)
    out = []
    for r in range(n_runs):
        noise = rng.standard_normal(LAYOUT.n_values)
        flats = [(base + 1e-3 * s * noise).astype(np.float32) for s in STEPS]
        logits = rng.standard_normal((len(STEPS), K, C))
        out.append((f"run-{r}", flats, logits))
    return out


def test_group_curve_equals_the_direct_computation():
    runs = _runs()
    curve = group_curve(_traj(*r) for r in runs)  # a generator: one trajectory at a time
    trajs = [_traj(*r) for r in runs]
    for t in range(len(STEPS)):
        sk = np.stack([tr.sketch[t] for tr in trajs])
        pairs = list(itertools.combinations(range(len(runs)), 2))
        dist = np.mean([np.linalg.norm(sk[a] - sk[b]) for a, b in pairs])
        norm = np.mean([np.linalg.norm(r[1][t].astype(np.float64)) for r in runs])
        pred = [np.argmax(r[2][t].astype(np.float32), axis=1) for r in runs]
        dis = 100 * np.mean([np.mean(pred[a] != pred[b]) for a, b in pairs])
        assert curve.distance[t] == pytest.approx(dist, rel=1e-6)
        assert curve.mean_norm[t] == pytest.approx(norm, rel=1e-12)
        norms = [np.linalg.norm(r[1][t].astype(np.float64)) for r in runs]
        rel = 100 * np.mean([np.linalg.norm(sk[a] - sk[b]) / ((norms[a] + norms[b]) / 2) for a, b in pairs])
        assert curve.rel_distance[t] == pytest.approx(rel, rel=1e-6)
        assert curve.identical[t] == (t == 0)
        assert curve.disagreement[t] == pytest.approx(dis, rel=1e-12)
    assert curve.first_split == 1 and curve.n_runs == 5
    assert curve.epoch.tolist() == (STEPS / 4).tolist()
    assert curve.distance[0] == 0.0  # a shared start: exactly 0


def test_identical_runs_are_exactly_zero_and_never_split():
    _, flats, logits = _runs(1)[0]
    curve = group_curve(_traj(f"copy-{k}", flats, logits) for k in range(4))
    assert np.all(curve.distance == 0.0) and np.all(curve.disagreement == 0.0)
    assert curve.first_split is None


def test_the_first_split_is_the_first_point_where_one_run_differs():
    _, flats, logits = _runs(1)[0]
    late = [f.copy() for f in flats]
    for t in (4, 5):  # from step 8 on, one value moved by one ulp
        late[t][3] = np.nextafter(late[t][3], np.float32(np.inf))
    curve = group_curve([_traj("a", flats, logits), _traj("b", flats, logits), _traj("c", late, logits)])
    assert curve.first_split == 8
    assert np.all(curve.distance[:4] == 0) and np.all(curve.distance[4:] > 0)


def test_two_runs_part_at_the_first_differing_point_in_the_tensors_that_changed():
    _, flats, logits = _runs(1)[0]
    late = [f.copy() for f in flats]
    fc = LAYOUT.offsets[2]  # fc.weight
    for t in (3, 4, 5):
        late[t][fc + 1] += 0.5
        late[t][LAYOUT.offsets[3]] += 0.1  # fc.bias, a smaller change
    a, b = _traj("a", flats, logits), _traj("b", late, logits)
    assert first_divergence(a, b) == 3 and first_divergence(a, a) is None
    top = differing_tensors(a, b, 3)
    assert [n for n, _ in top] == ["fc.weight", "fc.bias"] and top[0][1] > top[1][1] > 0
    assert differing_tensors(a, b, 2) == [] and len(differing_tensors(a, b, 3, top=1)) == 1


def test_the_twin_of_a_bit_change_run_is_found_by_its_key():
    identity = {"data.name": "digits", "train.epochs": 3, "source.deterministic_kernels": True}
    bit = {"identity": {**identity, "source.name": "bitflip", "source.label": "Random Bit Change",
                        "source.vary": ["bitflip"]},
           "seeds": {"init": 1, "shuffle": 1, "augment": 1, "bitflip": 7, "deterministic_kernels": True}}
    control = {"identity": {**identity, "source.name": "none", "source.label": "Determinism Control",
                            "source.vary": []},
               "seeds": {"init": 1, "shuffle": 1, "augment": 1, "bitflip": None, "deterministic_kernels": True}}
    init2 = {**control, "seeds": {**control["seeds"], "init": 2}}
    longer = {**control, "identity": {**control["identity"], "train.epochs": 4}}
    gpu_free = {**control, "identity": {**control["identity"], "source.deterministic_kernels": False}}
    assert twin_key(bit) == twin_key(control)
    assert twin_key(bit) not in {twin_key(init2), twin_key(longer), twin_key(gpu_free)}


def test_runs_recorded_differently_are_refused_by_name():
    r = _runs(2)
    acc = GroupAccumulator()
    acc.add(_traj(*r[0]))
    with pytest.raises(InstabilityError, match="run-1 .*projection"):
        acc.add(_traj(*r[1], D=32))
    with pytest.raises(InstabilityError, match="step grid"):
        acc.add(_traj(r[1][0], r[1][1][:5], r[1][2][:5]))


def test_pairwise_distances_are_exact_for_copies_and_tiny_differences():
    x = np.array([[1e8, 1.0], [1e8, 1.0], [1e8, 1.0 + 2 ** -20]])
    d = pairwise_distances(x)
    assert d[0, 1] == 0.0 and d[0, 2] == 2 ** -20 and np.array_equal(d, d.T)


def test_initial_change_from_bitflip_records():
    a = {"index": 3, "shape": [16, 1, 3, 3], "old": 0.5, "new": float(np.nextafter(np.float32(0.5), np.float32(1)))}
    b = {"index": 9, "shape": [16, 1, 3, 3], "old": -0.25, "new": float(np.nextafter(np.float32(-0.25), np.float32(0)))}
    down = {**a, "new": float(np.nextafter(np.float32(0.5), np.float32(0)))}
    assert initial_change(a) == 2 ** -24
    assert initial_change(a, b) == math.hypot(2 ** -24, 2 ** -26)
    assert initial_change(a, down) == 2 ** -24 + 2 ** -25  # the same weight moved to its two neighbours
    assert initial_change(a, dict(a)) == 0.0
    with pytest.raises(InstabilityError):
        initial_change(a, {**b, "shape": [3]})
    with pytest.raises(InstabilityError):
        initial_change(a, {**a, "old": 0.75, "new": 0.76})


def test_growth_efolding_and_saturation_on_planted_curves():
    step = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256])
    tau = 10.0
    d = np.minimum(1e-9 * np.exp(step / tau), 1e-2)  # exponential, then level
    assert efolding_steps(step, d) == pytest.approx(tau, rel=1e-9)
    assert growth_factor(step, d, 8) == pytest.approx(math.exp(8 / tau), rel=1e-12)
    assert math.isnan(growth_factor(step, d, 5))  # no point at the end of the first epoch
    assert math.isnan(efolding_steps(step, np.zeros_like(d)))
    assert math.isnan(efolding_steps(step, d[::-1].copy()))  # shrinking: no e-folding time
    ref = np.full(len(step), 0.5)
    curve = np.array([0, 0, 0.1, 0.2, 0.3, 0.44, 0.46, 0.5, 0.5, 0.5])
    assert saturation_step(step, curve, step, ref) == 32
    assert saturation_step(step, curve, step, ref, fraction=1.0) == 64
    assert saturation_step(step, curve * 0.5, step, ref) is None
    assert saturation_step(step[:6], curve[:6], step, ref) is None  # only common points count


def test_condition_number_and_pair_result_equal_an_independent_computation(tmp_path):
    rng = np.random.default_rng(3)
    twin = [rng.standard_normal(LAYOUT.n_values).astype(np.float32)]
    index = 5
    flip0 = twin[0].copy()
    flip0[index] = np.nextafter(flip0[index], np.float32(np.inf))
    record = {"index": index, "shape": list(SHAPES["conv.weight"]), "old": float(twin[0][index]),
              "new": float(flip0[index])}
    flip = [flip0]
    for s in STEPS[1:]:  # the perturbation grows tenfold per recorded point, then training moves both
        step_noise = rng.standard_normal(LAYOUT.n_values)
        twin.append((twin[-1] + 1e-2 * step_noise).astype(np.float32))
        flip.append((twin[-1] + (flip[-1] - twin[-2]) * 10).astype(np.float32))
    logits = np.zeros((len(STEPS), 3, 2))
    paths = {}
    for name, flats in (("twin", twin), ("flip", flip)):
        params = {n: flats[-1][LAYOUT.offsets[k]:LAYOUT.offsets[k + 1]].reshape(s)
                  for k, (n, s) in enumerate(SHAPES.items())}
        write_weights(tmp_path / f"{name}.safetensors", params, {}, run_id=name, step=16)
        paths[name] = _traj(name, flats, logits, D=4096)
    f0, f1 = twin[-1].astype(np.float64), flip[-1].astype(np.float64)
    i0, i1 = twin[0].astype(np.float64), flip[0].astype(np.float64)
    expected = (np.linalg.norm(f1 - f0) / np.linalg.norm(f0)) / (np.linalg.norm(i1 - i0) / np.linalg.norm(i0))
    with WeightsFile(tmp_path / "flip.safetensors") as wf, WeightsFile(tmp_path / "twin.safetensors") as wt:
        got = pair_result(paths["flip"], paths["twin"], wf, wt, initial_change(record))
        assert exact_distance(wf, wt, block_bytes=48) == pytest.approx(
            (np.linalg.norm(f1 - f0), np.linalg.norm(f1), np.linalg.norm(f0)), rel=1e-13)
    assert got.condition_number == pytest.approx(expected, rel=1e-12)
    assert got.initial_distance == np.linalg.norm(i1 - i0) == got.initial_sketch_distance
    assert got.final_distance == pytest.approx(np.linalg.norm(f1 - f0), rel=1e-13)
    assert got.final_norm == pytest.approx(np.linalg.norm(f0), rel=1e-13)
    d = pair_divergence(paths["flip"], paths["twin"], initial_change(record))
    assert got.growth_first_epoch == pytest.approx(d[3] / d[0])  # step 4 ends the first epoch
    assert condition_number(1.0, 2.0, 0.0, 1.0) != condition_number(1.0, 2.0, 0.0, 1.0)  # NaN without a change
    assert condition_number(1.0, 2.0, 1e-8, 4.0) == pytest.approx(0.5 / 2.5e-9)


def test_final_distance_matrix_streams_blocks_across_tensors(tmp_path):
    runs = _runs(4, seed=5)
    files = []
    for name, flats, _ in runs:
        params = {n: flats[-1][LAYOUT.offsets[k]:LAYOUT.offsets[k + 1]].reshape(s)
                  for k, (n, s) in enumerate(SHAPES.items())}
        write_weights(tmp_path / f"{name}.safetensors", params, {}, run_id=name, step=16)
    flat64 = [r[1][-1].astype(np.float64) for r in runs]
    direct = np.array([[np.linalg.norm(a - b) for b in flat64] for a in flat64])
    try:
        files = [WeightsFile(tmp_path / f"{r[0]}.safetensors") for r in runs]
        for block in (8 * 4 * 7, 1 << 20):  # 7 values per run per block: blocks straddle every tensor boundary
            np.testing.assert_allclose(final_distance_matrix(files, block), direct, rtol=1e-13)
        sk = group_curve(_traj(*r, D=4096) for r in runs).final_sketch_distances
        err = sketch_errors(sk, final_distance_matrix(files))
        assert len(err) == 6 and np.all(np.abs(err) < 0.5)
    finally:
        for f in files:
            f.close()


def test_pair_mean_ratio_and_its_bootstrap_interval():
    rng = np.random.default_rng(0)

    def sym(n, scale):
        m = rng.random((n, n)) * scale
        m = m + m.T
        np.fill_diagonal(m, 0)
        return m
    a, b = sym(6, 1.0), sym(8, 2.0)
    ratio = pair_mean_ratio(a, b)
    assert ratio == pytest.approx(a[np.triu_indices(6, 1)].mean() / b[np.triu_indices(8, 1)].mean())
    r, lo, hi = pair_mean_ratio_ci(a, b, n_boot=2000, seed=1)
    assert r == ratio and lo < ratio < hi
    assert pair_mean_ratio_ci(a, b, n_boot=2000, seed=1) == (r, lo, hi)  # seeded: reproducible
    assert summary([3.0, float("nan"), 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_trajectory_dataclass_fields_are_the_file_arrays():
    names = {f.name for f in dataclasses.fields(Trajectory)}
    from nondet_hpc.records.trajectory import SPEC
    assert names | {"version"} == set(SPEC)
