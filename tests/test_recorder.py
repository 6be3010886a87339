"""The trajectory recorder (nondet_hpc.run.recorder) on real digits training.

A minimal harness attaches a Recorder to the package's Trainer the way the integration will:
record the initial weights when fit starts, record right after each optimizer step (before the
stop check), and keep the recorder's state in the checkpoint. The checks: training is the same to
the bit with and without recording; a resumed run writes the same trajectory bytes; one
device-to-host read per point; the weights file and the trajectory agree; the sketch and the
condition number against independent computations.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from helpers import make_cfg
from nondet_hpc.analysis.instability import initial_change, pair_result
from nondet_hpc.records.projection import CountSketch, Layout, fingerprint, relative_sd
from nondet_hpc.records.schedule import Grid
from nondet_hpc.records.trajectory import read_trajectory, trajectory_bytes
from nondet_hpc.records.weights import WeightsFile, read_weights
from nondet_hpc.run import train
from nondet_hpc.run.data import load_dataset
from nondet_hpc.run.models import init_weights, model_from_config
from nondet_hpc.run.recorder import Recorder, RecorderMismatch, write_model_weights
from nondet_hpc.run.sources import Streams, apply_bitflip, resolve_seeds
from nondet_hpc.run.step import make_step

CPU = torch.device("cpu")


class RecordingTrainer(train.Trainer):
    """The Trainer with a recorder attached as the integration will do it (test-local harness)."""

    def __init__(self, *args, recorder: Recorder, **kw):
        super().__init__(*args, **kw)
        self.recorder = recorder

    def state_dict(self) -> dict:
        return {**super().state_dict(), "recorder": self.recorder.state_dict()}

    def load_checkpoint(self) -> bool:
        if not super().load_checkpoint():
            return False
        state = train.load_checkpoint_file(self.checkpoint_path, self.run_id)
        self.recorder.load_state_dict(state.get("recorder"))
        self.recorder.check_resumed(self.progress.step)
        return True

    def fit(self) -> None:
        if self.step is None:  # the step the Trainer would build, with a record right after each call
            shape = (min(self.t.batch_size, self.n), *self.data.train_x.shape[1:])
            inner = make_step(self.model, self.opt, self.normalize, self.plan, self.device, shape, self.scaler)

            def stepped(x, y, lrs):
                loss = inner(x, y, lrs)
                self.recorder.maybe_record(self.progress.step + 1)  # the model after this step
                return loss
            self.step = stepped
        self.recorder.maybe_record(self.progress.step)  # step 0: the initial weights (no-op on resume)
        super().fit()


def _cfg(tmp_path, *overrides):
    return make_cfg(tmp_path, "train.checkpoint_every=1", *overrides)


def _model(cfg, bitflip: bool = False):
    seeds = resolve_seeds(list(cfg.source.vary), cfg.seed, True)
    streams = Streams.from_seeds(seeds)
    model = model_from_config(cfg)
    init_weights(model, streams.init)
    record = apply_bitflip(model.conv1.weight, seeds.bitflip) if bitflip else None
    return streams, model, record


def _trainer(cfg, data, path, *, record: bool = True, grid: Grid = Grid(), bitflip: bool = False, run_id: str = "r"):
    streams, model, flip = _model(cfg, bitflip)
    kw = dict(run_id=run_id)
    if not record:
        return train.Trainer(model, data, streams, cfg.train, cfg.data, CPU, path, **kw), None
    steps_per_epoch = len(train.training_batches(len(data.train_x), cfg.train.batch_size))
    rec = Recorder.for_run(model, data, cfg.data, grid=grid, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs,
                           probe=50, run_id=run_id)
    return RecordingTrainer(model, data, streams, cfg.train, cfg.data, CPU, path, recorder=rec, **kw), flip


def _bits(tr: train.Trainer) -> list[torch.Tensor]:
    opt = tr.opt.state_dict()["state"]
    return ([t.clone() for t in tr.model.state_dict().values()] + [s["momentum_buffer"].clone() for s in opt.values()]
            + [g.get_state() for g in (tr.streams.init, tr.streams.shuffle, tr.streams.augment)])


def test_recording_does_not_change_training_in_any_bit(tmp_path):
    cfg = _cfg(tmp_path, "train.batch_size=48")  # a short last batch too
    data = load_dataset(cfg.data)
    plain, _ = _trainer(cfg, data, tmp_path / "a.pt", record=False)
    global_rng = torch.get_rng_state()
    plain.fit()
    dense, _ = _trainer(cfg, data, tmp_path / "b.pt", grid=Grid(step_base=1, epoch_base=2))  # every step of epoch 1
    dense.fit()
    assert torch.equal(torch.get_rng_state(), global_rng)  # nothing drew from torch's global generator
    a, b = _bits(plain), _bits(dense)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert [p.step for p in dense.recorder.points] == list(range(0, 7)) + [12]  # 6 steps per epoch, 2 epochs


def test_recording_leaves_every_module_in_its_mode_and_its_buffers_alone(tmp_path):
    cfg = _cfg(tmp_path)
    data = load_dataset(cfg.data)
    tr, _ = _trainer(cfg, data, tmp_path / "c.pt")
    tr.model.train()
    tr.model.layers[1].eval()  # a module in a mode of its own
    modes = [m.training for m in tr.model.modules()]
    before = [t.clone() for t in tr.model.state_dict().values()]
    assert tr.recorder.maybe_record(0)
    assert [m.training for m in tr.model.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.state_dict().values()))  # BN statistics too


def _interrupted(cfg, data, path, at_step: int, monkeypatch) -> None:
    tr, _ = _trainer(cfg, data, path)
    real = train.Trainer.set_lr

    def set_lr(self, step):
        if step == at_step:
            train.request_stop()
        return real(self, step)
    monkeypatch.setattr(train.Trainer, "set_lr", set_lr)
    try:
        with pytest.raises(train.Preempted):
            tr.fit()
    finally:
        monkeypatch.setattr(train.Trainer, "set_lr", real)
        train.clear_stop()


def test_a_resumed_run_writes_the_same_trajectory_bytes(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "train.epochs=3")
    data = load_dataset(cfg.data)
    whole, _ = _trainer(cfg, data, tmp_path / "whole.pt")
    copies = []
    whole.on_epoch = lambda hb: copies.append(shutil.copy(whole.checkpoint_path, tmp_path / f"e{hb['epoch']}.pt"))
    whole.fit()
    reference = trajectory_bytes(whole.recorder.trajectory())
    write_model_weights(tmp_path / "whole.safetensors", whole.model, run_id="r", step=whole.progress.step)

    # stopped mid-epoch (SLURM's signal): the checkpoint holds the points so far; resumed by new objects
    _interrupted(cfg, data, tmp_path / "mid.pt", at_step=1, monkeypatch=monkeypatch)  # after step 2 of 4
    # killed after epoch 1 (the later points are lost with the process): resumed from that checkpoint
    shutil.copy(tmp_path / "e1.pt", tmp_path / "killed.pt")
    for name in ("mid", "killed"):
        tr, _ = _trainer(cfg, data, tmp_path / f"{name}.pt")
        assert tr.load_checkpoint()
        assert len(tr.recorder.points) < len(whole.recorder.points)
        tr.fit()
        tr.recorder.write(tmp_path / f"{name}.npz")
        assert (tmp_path / f"{name}.npz").read_bytes() == reference, name
        write_model_weights(tmp_path / f"{name}.safetensors", tr.model, run_id="r", step=tr.progress.step)
        assert (tmp_path / f"{name}.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_a_checkpoint_whose_model_is_not_the_recorded_one_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    data = load_dataset(cfg.data)
    tr, _ = _trainer(cfg, data, tmp_path / "c.pt")
    tr.fit()  # the last checkpoint is at the last step, which is a recorded point
    state = torch.load(tr.checkpoint_path, weights_only=True)  # the recorder's state loads without pickle
    state["model"]["fc.bias"][0] += 1.0  # the weights replaced behind the trajectory's back
    torch.save(state, tr.checkpoint_path)
    fresh, _ = _trainer(cfg, data, tmp_path / "c.pt")
    with pytest.raises(RecorderMismatch, match="fingerprints differ"):
        fresh.load_checkpoint()
    other, _ = _trainer(cfg, data, tmp_path / "c.pt", grid=Grid(step_base=0))
    with pytest.raises(RecorderMismatch, match="grid"):
        other.recorder.load_state_dict(torch.load(tr.checkpoint_path, weights_only=True)["recorder"])
    old = fresh.recorder
    old.load_state_dict(None)  # a checkpoint written before recording existed: recorded from now, marked
    assert old.points == [] and old.trajectory().complete is False


def test_channels_last_weights_are_recorded_in_their_logical_order(tmp_path):
    cfg = _cfg(tmp_path)
    data = load_dataset(cfg.data)
    tr, _ = _trainer(cfg, data, tmp_path / "c.pt")
    flat, logits = tr.recorder.read_point()
    tr.model.to(memory_format=torch.channels_last)
    assert not tr.model.layers[0].conv1.weight.is_contiguous()
    cl = Recorder(tr.model, tr.recorder.probe_images, tr.recorder.probe_index, tr.recorder.probe_label, 10,
                  tr.recorder.normalize, [0], 4, channels_last=True)
    flat_cl, logits_cl = cl.read_point()
    assert np.array_equal(flat, flat_cl)  # the fingerprint and sketch do not depend on the memory format
    np.testing.assert_allclose(logits, logits_cl, rtol=1e-5, atol=1e-5)


def test_one_device_to_host_read_per_recorded_point(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    data = load_dataset(cfg.data)
    tr, _ = _trainer(cfg, data, tmp_path / "c.pt")
    calls: list[str] = []
    # every way a tensor's value reaches the host (a dtype conversion with .to stays on the device)
    for name in ("cpu", "item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    assert tr.recorder.maybe_record(0)
    monkeypatch.undo()
    assert calls == ["cpu"]


def test_weights_file_and_trajectory_agree_and_one_ulp_is_exact_on_real_weights(tmp_path):
    cfg = _cfg(tmp_path, "source=bitflip", "seed=5")
    data = load_dataset(cfg.data)
    twin, _ = _trainer(cfg, data, tmp_path / "twin.pt", run_id="twin")
    flipped, record = _trainer(cfg, data, tmp_path / "flip.pt", bitflip=True, run_id="flip")
    for tr in (twin, flipped):
        tr.recorder.maybe_record(0)
    a, b = twin.recorder.points[0], flipped.recorder.points[0]
    assert a.fingerprint != b.fingerprint  # fingerprints differ for one ulp of one weight
    assert [k for k in range(len(a.tensor_digest)) if not np.array_equal(a.tensor_digest[k], b.tensor_digest[k])] \
        == [0]  # conv1.weight, the first tensor, and only it
    diff = b.sketch - a.sketch
    assert np.count_nonzero(diff) == 1 and np.sqrt(np.sum(diff ** 2)) == initial_change(record)
    assert initial_change(record) == abs(np.float32(record["new"]) - np.float32(record["old"]))

    twin.fit()
    twin.recorder.write(tmp_path / "t.npz")
    write_model_weights(tmp_path / "w.safetensors", twin.model, run_id="twin", step=twin.progress.step)
    traj, w = read_trajectory(tmp_path / "t.npz"), read_weights(tmp_path / "w.safetensors")
    flat = w.flat()
    assert bytes.fromhex(w.meta["fingerprint"]) == traj.fingerprint[-1].tobytes() == fingerprint(w.layout, flat)
    assert np.array_equal(CountSketch(flat.size, traj.sketch.shape[1]).apply(flat), traj.sketch[-1])
    for k, v in twin.model.state_dict().items():
        got = w.params.get(k, w.buffers.get(k))
        assert np.array_equal(got, v.numpy()), k
    # the same model built from the file gives the recorded probe logits
    _, fresh, _ = _model(cfg)
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in {**w.params, **w.buffers}.items()})
    fresh.eval()
    x = twin.recorder.normalize(twin.recorder.probe_images)
    with torch.no_grad():
        assert torch.equal(fresh(x), torch.from_numpy(traj.probe_logits[-1]))

    # one ulp of one trained weight: exactly that change in the sketch
    layout = Layout.of((k, v.shape) for k, v in w.params.items())
    moved = flat.copy()
    moved[12345] = np.nextafter(moved[12345], np.float32(-np.inf))
    sk = CountSketch(flat.size, 4096)
    d = sk.apply(moved) - sk.apply(flat)
    assert np.sqrt(np.sum(d ** 2)) == float(flat[12345]) - float(moved[12345])
    assert fingerprint(layout, moved) != fingerprint(layout, flat)


def test_sketch_distance_within_its_stated_error_on_real_weights(tmp_path):
    data = load_dataset(_cfg(tmp_path, "source=init").data)
    flats = []
    for seed in (1, 2):
        c = _cfg(tmp_path, "source=init", f"seed={seed}")
        tr, _ = _trainer(c, data, tmp_path / f"s{seed}.pt")
        tr.fit()
        write_model_weights(tmp_path / f"s{seed}.safetensors", tr.model, run_id=str(seed), step=tr.progress.step)
        flats.append(read_weights(tmp_path / f"s{seed}.safetensors").flat())
    exact = float(np.linalg.norm(flats[0].astype(np.float64) - flats[1].astype(np.float64)))
    assert exact > 0
    for D in (64, 256, 1024, 4096):
        sk = CountSketch(flats[0].size, D)
        est = float(np.linalg.norm(sk.apply(flats[0]) - sk.apply(flats[1])))
        assert abs(est - exact) / exact < 4 * relative_sd(D), D  # 4 SDs: a wrong sketch is off by far more


def test_condition_number_equals_an_independent_computation(tmp_path):
    cfg = _cfg(tmp_path, "source=bitflip", "seed=3")
    data = load_dataset(cfg.data)
    runs = {}
    for name, flip in (("twin", False), ("flip", True)):
        tr, record = _trainer(cfg, data, tmp_path / f"{name}.pt", bitflip=flip, run_id=name)
        init = [p.detach().clone().double() for p in tr.model.parameters()]
        tr.fit()
        tr.recorder.write(tmp_path / f"{name}.npz")
        write_model_weights(tmp_path / f"{name}.safetensors", tr.model, run_id=name, step=tr.progress.step)
        final = [p.detach().clone().double() for p in tr.model.parameters()]
        runs[name] = (torch.cat([t.reshape(-1) for t in init]), torch.cat([t.reshape(-1) for t in final]), record)
    (i0, f0, _), (i1, f1, record) = runs["twin"], runs["flip"]
    expected = float((f1 - f0).norm() / f0.norm() / ((i1 - i0).norm() / i0.norm()))
    assert float((i1 - i0).norm()) == initial_change(record)  # the exact initial change, from the record
    with WeightsFile(tmp_path / "flip.safetensors") as wf, WeightsFile(tmp_path / "twin.safetensors") as wt:
        got = pair_result(read_trajectory(tmp_path / "flip.npz"), read_trajectory(tmp_path / "twin.npz"), wf, wt,
                          initial_change(record))
    assert got.condition_number == pytest.approx(expected, rel=1e-12)
    assert got.initial_sketch_distance == got.initial_distance  # one ulp survives the float64 projection
    assert got.final_distance == pytest.approx(float((f1 - f0).norm()), rel=1e-12)
    assert got.condition_number > 1.0  # training amplified the change (the sign, not a size)
