"""Cost of recording one trajectory point, as a ratio to one training step of the same model.

For each model (digits ResNet-14: 1x8x8 images, batch 128; CIFAR-shaped ResNet-14: 3x32x32,
batch 512; random uint8 images) this process times the package's training step
(nondet_hpc.run.step, as the Trainer builds it) and the Recorder's work at one point (one
device-to-host copy of the parameters and the probe logits, SHA-256, per-tensor norms, count
sketch; probe of record.probe test images: 512, or the 256 conf/data/digits.yaml sets; --probe
to change it), alternating the two --repeats
times so machine load hits both, and prints the medians, their ratio, and the overhead that
ratio implies for the default grid of the model's usual schedule (digits: 40 epochs of 11 steps;
CIFAR-10: 500 epochs of 98 steps): points x point cost / (steps x step cost). Writing the
trajectory file (at each checkpoint) and the weights file (once) is timed too.

    python benchmarks/record_overhead.py                    # CPU, one thread
    python benchmarks/record_overhead.py --device cuda --steps 20 --points 10
    python benchmarks/record_overhead.py --models digits-resnet14 --probe 497 256 --end-to-end 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nondet_hpc.config import RecordConfig, conf_dir
from nondet_hpc.records.schedule import Grid
from nondet_hpc.run.data import Normalize
from nondet_hpc.run.models import build_model, init_weights
from nondet_hpc.run.recorder import Recorder, write_model_weights
from nondet_hpc.run.sources import configure_kernels, make_generator
from nondet_hpc.run.step import StepPlan, make_optimizer, make_step
from nondet_hpc.run.train import param_groups


def _digits_probe() -> int:
    """record.probe as data=digits sets it (conf/data/digits.yaml), at most the 497 test images."""
    node = OmegaConf.load(Path(conf_dir()) / "data" / "digits.yaml")
    return min(497, int(OmegaConf.select(node, "record.probe", default=RecordConfig.probe)))


#: name: (channels, image size, batch, probe images, steps per epoch, epochs of the usual schedule)
MODELS = {"digits-resnet14": (1, 8, 128, _digits_probe(), 11, 40),
          "cifar-resnet14": (3, 32, 512, RecordConfig.probe, 98, 500)}


def setup(name: str, device: torch.device, probe_override: int | None = None):
    c, size, batch, probe, spe, epochs = MODELS[name]
    probe = probe if probe_override is None else probe_override
    model = build_model("resnet14", 10, c)
    init_weights(model, make_generator("init", 1))
    model.to(device).train()
    plan = StepPlan("fp32", None, False, False, False, False)
    opt = make_optimizer(param_groups(model, 0.4, 0.1, 5e-4, "authors"), 0.9, plan)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, c, size, size), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    norm = Normalize([0.5] * c, [0.25] * c, device)
    step = make_step(model, opt, norm, plan, device, tuple(x.shape))
    images = torch.randint(0, 256, (probe, c, size, size), generator=g, dtype=torch.uint8).to(device)
    grid = Grid().steps(spe, epochs)
    rec = Recorder(model, images, torch.arange(probe).numpy(), torch.zeros(probe, dtype=torch.int64).numpy(), 10, norm,
                   grid, spe, run_id=name)
    return model, step, x, y, rec, len(grid), spe * epochs


def timed(fn, n: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def measure(name: str, device: torch.device, steps: int, points: int, repeats: int, probe: int | None = None) -> dict:
    model, step, x, y, rec, n_points, n_steps = setup(name, device, probe)
    lrs = [0.01, 0.001]
    step(x, y, lrs)  # warm-up of both
    rec.read_point()
    step_s, point_s = [], []
    for _ in range(repeats):
        step_s.append(timed(lambda: step(x, y, lrs), steps, device))
        rec.points.clear()
        point_s.append(timed(lambda: rec.maybe_record(rec.grid[len(rec.points)]), points, device))
    for s in rec.grid[len(rec.points):]:  # a full default-grid trajectory, for the file's size and write time
        rec.maybe_record(s)
    with tempfile.TemporaryDirectory() as tmp:
        write_s = timed(lambda: rec.write(Path(tmp) / "t.npz"), 3, device)
        weights_s = timed(lambda: write_model_weights(Path(tmp) / "w.safetensors", model, run_id=name, step=0), 3,
                          device)
        sizes = ((Path(tmp) / "t.npz").stat().st_size, (Path(tmp) / "w.safetensors").stat().st_size)
    st, pt = statistics.median(step_s), statistics.median(point_s)
    return {"model": name, "probe": len(rec.probe_index), "step_s": st, "point_s": pt, "ratio": pt / st,
            "points": n_points, "steps": n_steps, "overhead": n_points * pt / (n_steps * st), "write_s": write_s, "weights_s": weights_s, "sizes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as digits runs)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per timing block")
    ap.add_argument("--points", type=int, default=4, help="recorded points per timing block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--probe", type=int, nargs="+", default=[None],
                    help="probe sizes to time (default: record.probe of each model's data; e.g. --probe 497 256)")
    ap.add_argument("--json", help="also write the results to this JSON file (gpu_check.sh)")
    ap.add_argument("--end-to-end", type=int, default=0, metavar="PAIRS",
                    help="also train PAIRS x 2 whole digits runs with and without recording")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configure_kernels(True, device)
    print(f"device {device}, {torch.get_num_threads()} thread(s), medians of {args.repeats} alternating blocks")
    results = []
    for name, probe in ((n, p) for n in args.models for p in args.probe):
        r = measure(name, device, args.steps, args.points, args.repeats, probe)
        results.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()})
        print(f"{r['model']:>16}: probe {r['probe']}, step {1e3 * r['step_s']:8.2f} ms, point "
              f"{1e3 * r['point_s']:7.2f} ms, ratio {r['ratio']:.3f} steps/point; default grid {r['points']} points in {r['steps']:,} steps "
              f"-> overhead {100 * r['overhead']:.3f} %")
        print(f"{'':>16}  trajectory file {r['sizes'][0] / 1e6:.2f} MB written in {1e3 * r['write_s']:.1f} ms "
              f"(each checkpoint); weights file {r['sizes'][1] / 1e6:.2f} MB in {1e3 * r['weights_s']:.1f} ms (once)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "results": results}, indent=2))
    if args.end_to_end:
        end_to_end(args.end_to_end)


def end_to_end(pairs: int) -> None:
    """Whole digits runs (task.run, the README demo's settings) with and without recording,
    alternating, ``pairs`` times: the training seconds run.json records (timings.train_s)."""
    from hydra import compose, initialize_config_dir

    from nondet_hpc.registry.options import register_configs
    from nondet_hpc.run import task

    register_configs()
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(conf_dir(), version_base="1.3"):
        for k in range(pairs):
            for on in (False, True):
                cfg = compose("config", overrides=[f"out_dir={tmp}/{k}-{on}", "source=bitflip", f"seed={k + 1}",
                                                   f"record.trajectory={str(on).lower()}"])
                out = task.run(cfg)
                rec = json.loads((Path(out["run_dir"]) / "run.json").read_text())
                times[on].append(rec["timings"]["train_s"])
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"end to end, digits ResNet-14 40 epochs, {pairs} pairs: training {off:.2f} s without recording, "
          f"{on:.2f} s with (medians) -> overhead {100 * (on / off - 1):.2f} %")


if __name__ == "__main__":
    main()
