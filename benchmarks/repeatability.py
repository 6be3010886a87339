"""Two questions the paper's table depends on, answered on this machine (used by gpu_check.sh):

1. ``cudnn``: do two ``source=cudnn`` runs with the same seed differ here, and after how many
   optimizer steps? Both runs train in this process, one after the other, with the cuDNN source's
   kernel settings (benchmark on, deterministic algorithms off); a digest of every parameter and
   buffer is taken before each step, so the first step whose result differs is known exactly. If
   they never differ, the cuDNN row of the study measures nothing on this GPU (the reducer then
   says so at the top of the report).
2. ``control``: are two determinism-control runs (``source=none``, same seed) bit-identical when
   trained in two separate processes (the command line, twice)? Their logits/plain.npy are
   compared byte for byte.

    python benchmarks/repeatability.py --device cuda --epochs 3 --json repeatability.json
    python benchmarks/repeatability.py --device cpu --epochs 1 --subset 256   # the CPU smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from nondet_hpc.config import conf_dir
from nondet_hpc.registry.options import register_configs


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_recorded(cfg) -> tuple[list[str], np.ndarray]:
    """Train ``cfg`` here; (digest before every step and after the last, the final plain logits)."""
    from nondet_hpc.run.data import load_dataset
    from nondet_hpc.run.device import resolve_device
    from nondet_hpc.run.models import init_weights, model_from_config
    from nondet_hpc.run.sources import Streams, configure_kernels, resolve_seeds
    from nondet_hpc.run.step import plan_step
    from nondet_hpc.run.train import Trainer
    from nondet_hpc.run.views import evaluate_test_set

    device = resolve_device(cfg.train.device)
    configure_kernels(cfg.source.deterministic_kernels, device)
    seeds = resolve_seeds(list(cfg.source.vary), cfg.seed, cfg.source.deterministic_kernels)
    streams = Streams.from_seeds(seeds)
    model = model_from_config(cfg)
    init_weights(model, streams.init)
    data = load_dataset(cfg.data).to(device)
    digests: list[str] = []

    class Recording(Trainer):
        def set_lr(self, step: int) -> float:
            if len(digests) == step:  # set_lr runs once per step (and once more at an epoch's start)
                digests.append(digest(self.model))
            return super().set_lr(step)

    with tempfile.TemporaryDirectory() as tmp:
        tr = Recording(model, data, streams, cfg.train, cfg.data, device, Path(tmp) / "ckpt.pt",
                       plan=plan_step(cfg.train, device), run_id="repeatability")
        tr.fit()
    digests.append(digest(model))
    logits, _ = evaluate_test_set(model, data, cfg.data, ["plain"], batch_size=cfg.eval.batch_size, device=device,
                                  channels_last=tr.plan.channels_last, with_features=False)
    return digests, logits["plain"]


def cudnn_pair(device: str, epochs: int, extra: list[str]) -> dict:
    cfg = compose("source=cudnn", "seed=1", f"train.epochs={epochs}", f"train.device={device}", "train.threads=1",
                  *extra)
    torch.set_num_threads(1)
    a, la = train_recorded(cfg)
    b, lb = train_recorded(cfg)
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"device": device, "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "steps": len(a) - 1, "differ": first is not None, "first_differing_after_steps": first,
            "final_logits_identical": bool(np.array_equal(la, lb)),
            "final_logits_max_abs_diff": float(np.max(np.abs(la.astype(np.float64) - lb))),
            "kernels": "cudnn.benchmark on, deterministic algorithms off (source=cudnn)"}


def control_pair(device: str, epochs: int, extra: list[str]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("a", "b"):
            cmd = [sys.executable, "-m", "nondet_hpc", "source=none", "seed=1", f"train.epochs={epochs}",
                   f"train.device={device}", "train.threads=1", f"out_dir={tmp}/{name}", *extra]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return {"error": f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-2000:]}"}
            (run,) = sorted(Path(tmp, name, "runs").iterdir())
            out[name] = (run.name, (run / "logits" / "plain.npy").read_bytes(),
                         np.load(run / "logits" / "plain.npy", allow_pickle=False))
    (ida, ba, la), (idb, bb, lb) = out["a"], out["b"]
    return {"device": device, "processes": 2, "same_run_id": ida == idb, "run_id": ida,
            "bit_identical": ba == bb, "max_abs_diff": float(np.max(np.abs(la.astype(np.float64) - lb)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=None, help="data.train_subset (a quick check)")
    ap.add_argument("--json", default=None, help="write the answers here")
    args = ap.parse_args()
    extra = [f"data.train_subset={args.subset}", "data.test_subset=120", "train.batch_size=64",
             "train.warmup_epochs=1"] if args.subset else []
    res = {"cudnn": cudnn_pair(args.device, args.epochs, extra), "control": control_pair(args.device, args.epochs,
                                                                                      extra)}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
