"""Bytes of one finished run folder, by file, with the default record.* settings: measured by writing
the files of a real model (random weights, one recorded point repeated to the default grid's
length: the sizes do not depend on the values), beside the cost model's estimate
(presets.run_files_bytes, which ``python -m nondet_hpc.experiments`` adds up per preset).

    python benchmarks/storage.py                      # ResNet-14 / CIFAR-10 and ResNet-34 / CIFAR-100
    python benchmarks/storage.py --configs resnet14:10:500

Each config is MODEL:CLASSES:EPOCHS (CIFAR: 50,000 training images at batch 512, 10,000 test images,
plain logits only).
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from nondet_hpc.config import RecordConfig
from nondet_hpc.records.schedule import Grid
from nondet_hpc.presets import CIFAR_TEST, CIFAR_TRAIN, record_points, run_files_bytes
from nondet_hpc.run.data import Normalize
from nondet_hpc.run.models import build_model, init_weights
from nondet_hpc.run.recorder import Recorder, write_model_weights
from nondet_hpc.run.sources import make_generator
from nondet_hpc.run.step import StepPlan, make_optimizer, make_step
from nondet_hpc.run.train import param_groups


def measure(model_name: str, classes: int, epochs: int) -> dict[str, int]:
    rec_cfg, batch = RecordConfig(), 512
    model = build_model(model_name, classes, 3)
    init_weights(model, make_generator("init", 1))
    plan = StepPlan("fp32", None, False, False, False, False)
    opt = make_optimizer(param_groups(model, 0.4, 0.1, 5e-4, "authors"), 0.9, plan)
    norm = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    step = make_step(model, opt, norm, plan, torch.device("cpu"), tuple(x.shape))
    step(x, torch.randint(0, classes, (8,), generator=g), [0.01, 0.001])  # momentum buffers exist
    K = min(rec_cfg.probe, CIFAR_TEST)
    probe = torch.randint(0, 256, (K, 3, 32, 32), generator=g, dtype=torch.uint8)
    spe = math.ceil(CIFAR_TRAIN / batch)
    T = record_points(epochs, spe)
    grid = Grid().steps(spe, epochs)
    rec = Recorder(model, probe, np.arange(K), np.zeros(K, np.int64), classes, norm, grid, spe, run_id="storage")
    rec.maybe_record(0)
    rec.points = [rec.points[0]._replace(step=s) for s in grid]  # the same values at every step: same sizes
    assert len(rec.points) == T
    with tempfile.TemporaryDirectory() as tmp:
        rec.write(Path(tmp) / "t.npz")
        write_model_weights(Path(tmp) / "w.safetensors", model, run_id="storage", step=epochs * spe)
        buf = io.BytesIO()
        torch.save({"run_id": "storage", "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "progress": {"epoch": epochs, "batch": 0, "step": epochs * spe}, "recorder": rec.state_dict(),
                    "epoch_streams": {k: make_generator(k, 1).get_state() for k in ("init", "shuffle", "augment")},
                    "snapshots_done": 0, "elapsed": 0.0}, buf)
        logits = np.zeros((CIFAR_TEST, classes), np.float32)
        np.save(Path(tmp) / "l.npy", logits)
        np.save(Path(tmp) / "y.npy", np.zeros(CIFAR_TEST, np.int64))
        return {"points": T, "logits": (Path(tmp) / "l.npy").stat().st_size + (Path(tmp) / "y.npy").stat().st_size,
                "checkpoint": len(buf.getvalue()), "weights": (Path(tmp) / "w.safetensors").stat().st_size,
                "trajectory": (Path(tmp) / "t.npz").stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["resnet14:10:500", "resnet34:100:200"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for spec in args.configs:
        name, classes, epochs = spec.split(":")
        got = measure(name, int(classes), int(epochs))
        est = run_files_bytes(name, int(epochs), num_classes=int(classes))
        total = sum(got[k] for k in est)
        print(f"{name} / {classes} classes / {epochs} epochs ({got['points']} recorded points): "
              + ", ".join(f"{k} {got[k] / 1e6:.2f} MB (est. {est[k] / 1e6:.2f})" for k in est)
              + f"; total {total / 1e6:.2f} MB, of which the weights and trajectory files "
              + f"{(got['weights'] + got['trajectory']) / 1e6:.2f} MB (the checkpoint holds the trajectory again)")


if __name__ == "__main__":
    main()
