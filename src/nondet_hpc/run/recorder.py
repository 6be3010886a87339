"""Recording a run's trajectory while it trains, without changing its training in any bit.

At each point of the grid (records/schedule.py) the :class:`Recorder` takes the parameters and
the logits of a fixed probe subset of the test set, in ONE device-to-host copy (the flat float32
parameter vector and the probe logits concatenated on the device), and computes on the host what
records/projection.py defines: the SHA-256 fingerprint, per-tensor L2 norms and the count sketch.

Why training cannot change: nothing here draws a random number (the projection is fixed, the
probe indices are evenly spaced), the probe forward pass runs under ``torch.no_grad`` in eval
mode (BatchNorm reads its running statistics and updates nothing) with autocast off, and every
module's train/eval flag is put back as it was. tests/test_recorder.py trains with and without a
recorder and compares every bit of the model, the optimizer and the random streams.

Resume: :meth:`Recorder.state_dict` goes into the trainer's checkpoint (tensors, numbers,
strings, lists: loadable with ``weights_only=True``); after :meth:`Recorder.load_state_dict`
the points recorded before the checkpoint are kept and later ones are recorded again by the
replayed (bit-identical) training, so the trajectory file of a resumed run has the same bytes as
an uninterrupted run's.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..config import ConfigError
from ..records.projection import DEFAULT_SKETCH_DIM, FINGERPRINT_BYTES, SKETCH_KEY, CountSketch, Layout, \
    fingerprint, tensor_digests, tensor_norms
from ..records.schedule import Grid, probe_indices
from ..records.trajectory import Trajectory, write_trajectory
from ..records.weights import write_weights
from .data import Dataset, Normalize

STATE_VERSION = 1


class Point(NamedTuple):
    """What one recorded point holds (the trajectory file's arrays at one step)."""

    step: int
    fingerprint: bytes  # 32 bytes
    tensor_digest: np.ndarray  # uint8 [n, 32]
    tensor_norm: np.ndarray  # float64 [n]
    sketch: np.ndarray  # float64 [D]
    probe_logits: np.ndarray  # float32 [K, C]


class RecorderMismatch(ConfigError):
    """A checkpoint's recorder state was made with other recording settings or another model."""


class Recorder:
    """Records the trajectory of one model; the trainer calls :meth:`maybe_record` after each step.

    ``probe_images``: uint8 [K, C, H, W] on the model's device; ``probe_index``/``probe_label``:
    their test-set positions and labels; ``normalize``: the run's test normalisation;
    ``grid``: the step counts to record (Grid.steps); ``batch_size``: probe images per forward.
    """

    def __init__(self, model: nn.Module, probe_images: torch.Tensor, probe_index: np.ndarray, probe_label: np.ndarray,
                 num_classes: int, normalize: Normalize, grid: Sequence[int], steps_per_epoch: int, *,
                 run_id: str = "", sketch_dim: int = DEFAULT_SKETCH_DIM, channels_last: bool = False,
                 batch_size: int = 500):
        named = list(model.named_parameters())
        bad = [n for n, p in named if p.dtype != torch.float32]
        if bad:
            raise TypeError(f"recording needs float32 parameters; {bad[:3]} are not")
        self.model, self.normalize, self.run_id = model, normalize, run_id
        self.layout = Layout.of((n, tuple(p.shape)) for n, p in named)
        self.sketch = CountSketch(self.layout.n_values, sketch_dim, SKETCH_KEY)
        self.probe_images, self.num_classes = probe_images, int(num_classes)
        self.probe_index = np.asarray(probe_index, dtype=np.int64)
        self.probe_label = np.asarray(probe_label, dtype=np.int64)
        self.grid, self.steps_per_epoch = sorted(set(int(s) for s in grid)), int(steps_per_epoch)
        self._grid = frozenset(self.grid)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.batch_size = max(1, int(batch_size))
        self.complete = True
        self.points: list[Point] = []

    @classmethod
    def for_run(cls, model: nn.Module, data: Dataset, data_cfg, *, grid: Grid, steps_per_epoch: int, epochs: int,
                probe: int = 512, sketch_dim: int = DEFAULT_SKETCH_DIM, channels_last: bool = False,
                batch_size: int = 500, run_id: str = "") -> "Recorder":
        """The recorder of one run: probe from ``data``'s test set (on the model's device)."""
        idx = probe_indices(len(data.test_y), probe)
        device = data.test_x.device
        images = data.test_x[torch.from_numpy(idx).to(device)]
        labels = data.test_y.cpu().numpy()[idx]  # once, when the recorder is made
        return cls(model, images, idx, labels, data.num_classes, Normalize(data_cfg.mean, data_cfg.std, device),
                   grid.steps(steps_per_epoch, epochs), steps_per_epoch, run_id=run_id, sketch_dim=sketch_dim,
                   channels_last=channels_last, batch_size=batch_size)

    # --- recording -----------------------------------------------------------------------
    def wants(self, step: int) -> bool:
        """Whether ``step`` is a grid point not recorded yet (a replayed step is not recorded twice)."""
        return step in self._grid and (not self.points or step > self.points[-1].step)

    def maybe_record(self, step: int) -> bool:
        """Record the model as it is after ``step`` optimizer steps if the grid asks for it."""
        if not self.wants(step):
            return False
        flat, logits = self.read_point()
        digests = tensor_digests(self.layout, flat)
        self.points.append(Point(int(step), fingerprint(self.layout, flat, digests), digests,
                                 tensor_norms(self.layout, flat), self.sketch.apply(flat), logits))
        return True

    @torch.no_grad()
    def _probe_logits(self) -> torch.Tensor:
        """float32 [K, C] on the device: eval mode, no autocast; every module's mode restored."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        device_type = self.probe_images.device.type
        try:
            with torch.autocast(device_type, enabled=False):
                out = [self.model(self.normalize(self.probe_images[i:i + self.batch_size]).contiguous(
                    memory_format=self.fmt)).float() for i in range(0, len(self.probe_images), self.batch_size)]
        finally:
            for m, mode in modes:
                m.training = mode
        return torch.cat(out)

    @torch.no_grad()
    def read_point(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [P] flat parameters, float32 [K, C] probe logits) from one device-to-host copy."""
        parts = [p.detach().reshape(-1) for _, p in self.model.named_parameters()]
        if len(self.probe_index):
            parts.append(self._probe_logits().reshape(-1))
        host = torch.cat(parts).cpu().numpy()  # the one device->host read of this point (a fresh buffer)
        n = self.layout.n_values
        if host.size != n + len(self.probe_index) * self.num_classes:
            raise RuntimeError(f"the model has {host.size - len(self.probe_index) * self.num_classes} parameter "
                               f"values, the recorder was made for {n}")
        return host[:n], host[n:].reshape(len(self.probe_index), self.num_classes).copy()

    def current_fingerprint(self) -> bytes:
        """The parameters' fingerprint now (one device-to-host read, includes the probe pass)."""
        return fingerprint(self.layout, self.read_point()[0])

    def check_resumed(self, step: int) -> None:
        """After loading a checkpoint at ``step``: if the last point is at that step, the model's
        fingerprint must equal the recorded one (the checkpoint holds the weights it claims)."""
        last = self.points[-1] if self.points else None
        if last is not None and last.step == step and self.current_fingerprint() != last.fingerprint:
            raise RecorderMismatch(f"the checkpoint's model at step {step} is not the one its trajectory recorded "
                                   f"at that step (fingerprints differ): the checkpoint was replaced or edited. "
                                   f"Nothing was trained; move the checkpoint away to train the run from scratch.")

    def adopt(self, parent: Trajectory, before: int) -> list[str]:
        """Start with ``parent``'s points at this grid's steps below ``before`` (a run that goes on
        from its parent's checkpoint at step ``before``: those points are its own, bit for bit).
        Returns what does not fit (empty: adopted); the trajectory is marked incomplete when the
        parent lacks a grid point below ``before``."""
        mine = self.settings()
        theirs = {"sketch_dim": int(parent.sketch.shape[1]), "sketch_key": f"{parent.sketch_key:#x}",
                  "steps_per_epoch": parent.steps_per_epoch, "probe_index": parent.probe_index.tolist(),
                  "num_classes": int(parent.probe_logits.shape[2]), "tensor_name": [str(n) for n in parent.tensor_name],
                  "tensor_size": parent.tensor_size.tolist()}
        differ = sorted(k for k in theirs if theirs[k] != mine[k])
        if differ:
            return differ
        wanted = [s for s in self.grid if s < before]
        at = {int(s): t for t, s in enumerate(parent.step)}
        self.points = [Point(s, parent.fingerprint[at[s]].tobytes(), parent.tensor_digest[at[s]].copy(),
                             parent.tensor_norm[at[s]].copy(), parent.sketch[at[s]].copy(),
                             parent.probe_logits[at[s]].copy()) for s in wanted if s in at]
        self.complete = bool(parent.complete) and len(self.points) == len(wanted)
        return []

    # --- the trajectory ----------------------------------------------------------------------
    def _stacked(self) -> dict[str, np.ndarray]:
        T, n, D = len(self.points), len(self.layout.names), self.sketch.dim
        K, C = len(self.probe_index), self.num_classes
        if not T:
            return {"step": np.zeros(0, np.int64), "fingerprint": np.zeros((0, FINGERPRINT_BYTES), np.uint8),
                    "tensor_digest": np.zeros((0, n, FINGERPRINT_BYTES), np.uint8),
                    "tensor_norm": np.zeros((0, n)), "sketch": np.zeros((0, D)),
                    "probe_logits": np.zeros((0, K, C), np.float32)}
        step, fp, digests, norms, sketch, logits = zip(*self.points)
        return {"step": np.array(step, np.int64),
                "fingerprint": np.frombuffer(b"".join(fp), np.uint8).reshape(T, FINGERPRINT_BYTES).copy(),
                "tensor_digest": np.stack(digests), "tensor_norm": np.stack(norms), "sketch": np.stack(sketch),
                "probe_logits": np.stack(logits)}

    def trajectory(self) -> Trajectory:
        return Trajectory(run_id=self.run_id, complete=self.complete, steps_per_epoch=self.steps_per_epoch,
                          tensor_name=np.array(self.layout.names, dtype=str), tensor_size=self.layout.sizes,
                          sketch_key=SKETCH_KEY, probe_index=self.probe_index, probe_label=self.probe_label,
                          **self._stacked())

    def write(self, path) -> None:
        """Write the trajectory so far (the whole file, atomically)."""
        write_trajectory(path, self.trajectory())

    # --- checkpoints -------------------------------------------------------------------------
    def settings(self) -> dict:
        """What must be equal for a checkpoint's points to continue in this recorder."""
        return {"sketch_dim": self.sketch.dim, "sketch_key": f"{SKETCH_KEY:#x}",
                "steps_per_epoch": self.steps_per_epoch,
                "grid": list(self.grid), "probe_index": self.probe_index.tolist(), "num_classes": self.num_classes,
                "tensor_name": list(self.layout.names), "tensor_size": self.layout.sizes.tolist()}

    def state_dict(self) -> dict:
        """Tensors, numbers, strings and lists only (``torch.load(weights_only=True)`` reads them)."""
        return {"version": STATE_VERSION, "settings": self.settings(), "complete": self.complete,
                **{k: torch.from_numpy(v) for k, v in self._stacked().items()}}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Continue from a checkpoint's recorder state; ``None`` (a checkpoint written without a
        recorder) keeps recording from now on and marks the trajectory incomplete."""
        if state is None:
            self.points, self.complete = [], False
            return
        if state.get("version") != STATE_VERSION:
            raise RecorderMismatch(f"recorder state version {state.get('version')!r}; this package writes "
                                   f"{STATE_VERSION}")
        mine, theirs = self.settings(), state.get("settings") or {}
        differ = sorted(k for k in mine if mine[k] != theirs.get(k))
        if differ:
            raise RecorderMismatch(f"the checkpoint's trajectory was recorded with other settings ({', '.join(differ)} "
                                   f"differ): keep the record.* settings the run started with, or move the "
                                   f"checkpoint away to train the run from scratch.")
        keys = ("step", "fingerprint", "tensor_digest", "tensor_norm", "sketch", "probe_logits")
        a = {k: state[k].detach().cpu().numpy() for k in keys}
        self.complete = bool(state.get("complete", True))
        self.points = [Point(int(a["step"][t]), a["fingerprint"][t].tobytes(), *(a[k][t].copy() for k in keys[2:]))
                       for t in range(len(a["step"]))]


def model_arrays(model: nn.Module) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(parameters, buffers) of ``model`` as host numpy copies, in ``state_dict`` order, NCHW layout."""
    pnames = {n for n, _ in model.named_parameters()}
    state = model.state_dict()
    host = {n: np.array(t.detach().cpu().contiguous().numpy()) for n, t in state.items()}
    return ({n: a for n, a in host.items() if n in pnames}, {n: a for n, a in host.items() if n not in pnames})


def write_model_weights(path, model: nn.Module, *, run_id: str, step: int) -> str:
    """Write ``model``'s final weights (records/weights.py); return the parameters' fingerprint (hex)."""
    params, buffers = model_arrays(model)
    order = [n for n, _ in model.named_parameters()]  # the flat vector's order, as the trajectory's
    return write_weights(path, {n: params[n] for n in order}, buffers, run_id=run_id, step=step)
