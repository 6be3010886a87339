"""model=custom end to end: a researcher's model from a file in the test directory (custom_nets.py).

It trains through task.run (with a TTA view), resumes bit-exactly (dropout included), varies with
the init source only, changes run id when its source file changes (locally, in experiments.plan's
resolution and through the SLURM launcher), takes its bit change where ``source.bitflip_param``
says, fails the control with the op named when an op has no deterministic kernel, and is imported
by ``evaluate`` only with the user's consent on the command line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cli_env, run_cli
from nondet_hpc.config import ConfigError
from nondet_hpc.registry.inputs import resolve_inputs
from nondet_hpc.rundir import run_id
from nondet_hpc.run import evaluate, task
from nondet_hpc.run.models import model_for_run
from nondet_hpc.run.sources import Streams, resolve_seeds

HERE = Path(__file__).resolve().parent
FACTORY = "custom_nets:tiny_cnn"
CUSTOM = ("model=custom", f"model.factory={FACTORY}")


def _rec(out: dict) -> dict:
    return json.loads((Path(out["run_dir"]) / "run.json").read_text())


def _logits(out: dict, view: str = "plain") -> np.ndarray:
    return np.load(Path(out["run_dir"]) / "logits" / f"{view}.npy")


def test_a_custom_model_trains_with_a_tta_view_and_records_its_identity(cfg_factory):
    cfg = cfg_factory(*CUSTOM, "model.kwargs={width: 6}", "source=bitflip", "seed=3", "eval.views=[plain,flip]")
    out = task.run(cfg)
    rec = _rec(out)
    sha = hashlib.sha256((HERE / "custom_nets.py").read_bytes()).hexdigest()
    assert out["state"] == "done" and rec["model"]["family"] == "custom"
    assert rec["model"]["factory"] == {"factory": FACTORY, "kwargs": {"width": 6}, "source_sha256": sha,
                                       "source_file": str(HERE / "custom_nets.py")}
    assert {"model.factory": FACTORY, "model.kwargs.width": 6, "model.source_sha256": sha}.items() <= \
        rec["identity"].items()
    assert rec["bitflip"]["param"] == rec["model"]["bitflip_param"] == "stem.weight"  # the first weight
    assert rec["n_parameters"] == 1 * 6 * 9 + 6 + 2 * 6 + 6 * 10 + 10
    assert _logits(out, "flip").shape == _logits(out).shape == (120, 10)


def _initial(source: str, seed: int) -> list[torch.Tensor]:
    from helpers import make_cfg

    cfg = make_cfg("/tmp/unused", *CUSTOM, f"source={source}", f"seed={seed}")
    streams = Streams.from_seeds(resolve_seeds(list(cfg.source.vary), cfg.seed, cfg.source.deterministic_kernels))
    return [t.clone() for t in model_for_run(cfg, (1, 8, 8), 10, streams.init).state_dict().values()]


def test_a_custom_model_varies_with_the_init_source_only(cfg_factory):
    torch.manual_seed(5)
    before = torch.get_rng_state()
    same = [_initial(s, seed) for s in ("shuffle", "augment", "bitflip") for seed in (1, 2)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left as it was
    for w in same[1:]:
        assert all(torch.equal(a, b) for a, b in zip(same[0], w))
    a, b = _initial("init", 1), _initial("init", 2)
    assert any(not torch.equal(x, y) for x, y in zip(a, b) if x.is_floating_point())
    # the control: two seeds, the same model bit for bit
    one, two = (task.run(cfg_factory(*CUSTOM, "source=none", f"seed={s}")) for s in (1, 2))
    assert np.array_equal(_logits(one), _logits(two))


def test_a_custom_model_with_dropout_resumes_bit_exactly(bit_exact_resume):
    """Dropout draws from torch's global generator: seeded at the start, kept in the checkpoint."""
    rec = bit_exact_resume(*CUSTOM, "model.kwargs={p_drop: 0.3}", "source=init", "seed=2", stop_at_step=6)
    assert rec["model"]["factory"]["kwargs"] == {"p_drop": 0.3}


def _model_file_copy(tmp_path, monkeypatch, prefix: str) -> tuple[str, Path]:
    """A copy of custom_nets.py under a module name unique to this test, importable from sys.path."""
    name = f"{prefix}_{abs(hash(str(tmp_path))) % 10**8}"
    path = tmp_path / "models" / f"{name}.py"
    path.parent.mkdir()
    shutil.copy(HERE / "custom_nets.py", path)
    monkeypatch.syspath_prepend(str(path.parent))
    return name, path


def test_editing_the_model_file_makes_new_run_ids(cfg_factory, tmp_path, monkeypatch):
    name, path = _model_file_copy(tmp_path, monkeypatch, "edited_nets")
    overrides = ("model=custom", f"model.factory={name}:tiny_cnn", "seed=4")
    planned = cfg_factory(*overrides)
    resolve_inputs(planned)  # as the SLURM launcher does before it submits
    before = run_id(planned)
    path.write_text(path.read_text().replace("width: int = 8", "width: int = 12"))
    now = cfg_factory(*overrides)
    resolve_inputs(now)
    assert run_id(now) != before and now.model.source_sha256 != planned.model.source_sha256
    # the job planned before the edit is refused where it runs: its id names the old code
    with pytest.raises(ConfigError, match=rf"{name}.py \(model.factory={name}:tiny_cnn\) changed after this run's "
                                          r"id was made"):
        task.run(planned)
    assert not list((tmp_path / "sweep").glob("runs/*"))
    assert task.run(now)["run_id"] == run_id(now)


def test_bitflip_param_names_the_tensor_or_is_refused_with_the_list(cfg_factory):
    out = task.run(cfg_factory(*CUSTOM, "source=bitflip", "source.bitflip_param=head.weight"))
    assert _rec(out)["bitflip"]["param"] == "head.weight"
    with pytest.raises(ConfigError, match=r"source.bitflip_param='conv9.weight' does not exist in this model; its "
                                          r"float32 parameters are: stem.weight, stem.bias, norm.weight, norm.bias, "
                                          r"head.weight, head.bias"):
        task.run(cfg_factory(*CUSTOM, "source=bitflip", "source.bitflip_param=conv9.weight"))
    with pytest.raises(ConfigError, match="'layer9.conv.weight' does not exist in this model; its float32 parameters "
                                          "are: conv1.weight, bn1.weight"):  # a registered model's too
        task.run(cfg_factory("model=resnet6", "source.bitflip_param=layer9.conv.weight"))


def test_a_nondeterministic_op_fails_the_control_with_the_op_named(cfg_factory):
    cfg = cfg_factory("model=custom", "model.factory=custom_nets:unpooling_net", "source=none")
    with pytest.raises(ConfigError, match=r"^the model uses max_unpooling2d_forward_out, which has no deterministic "
                                          r"implementation on this device") as e:
        task.run(cfg)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    rec = json.loads((Path(cfg.out_dir) / "runs" / run_id(cfg) / "run.json").read_text())
    assert rec["state"] == "failed" and rec["error"]["message"] == str(e.value)
    # with nondeterministic kernels allowed (the cuDNN source) the same model trains
    assert task.run(cfg_factory("model=custom", "model.factory=custom_nets:unpooling_net", "source=cudnn"))[
        "state"] == "done"


def test_evaluate_imports_a_factory_only_with_consent(cfg_factory, capsys):
    out = task.run(cfg_factory(*CUSTOM, "source=init"))
    rd = Path(out["run_dir"])
    with pytest.raises(evaluate.EvaluateError, match=rf"model.factory={FACTORY}, the researcher's own code: .* "
                                                      rf"add --allow-factory {FACTORY}"):
        evaluate.evaluate_run(rd, ["flip"])
    assert not (rd / "logits" / "flip.npy").exists()
    with pytest.raises(evaluate.EvaluateError, match="--allow-factory"):  # consent to another factory is not consent
        evaluate.evaluate_run(rd, ["flip"], allow_factory=["custom_nets:unpooling_net"])
    res = evaluate.evaluate_run(rd, ["flip"], allow_factory=[FACTORY])
    assert res["written"] == ["flip"] and res["plain_max_abs_diff"] == 0.0


def test_the_slurm_launcher_resolves_the_source_hash_before_the_run_ids(fake, tmp_path):
    """The launcher hashes the model file into every run id; a rerun after an edit is not taken for
    the same sweep (no plan-key shortcut): the folder refuses the other code, naming the key, and
    another folder gets runs of their own."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(HERE / "custom_nets.py", folder / "lab_nets.py")
    args = ["-m", "nondet_hpc", "-m", "model=custom", "model.factory=lab_nets:tiny_cnn", "source=init", "seed=1,2",
            "train.epochs=2", "hydra/launcher=slurm"]
    run_cli([*args, f"out_dir={tmp_path / 'sw'}"], env=cli_env(), cwd=folder)
    first = json.loads((tmp_path / "sw" / "sweep.json").read_text())["runs"]
    sha = hashlib.sha256((folder / "lab_nets.py").read_bytes()).hexdigest()
    assert len(first) == 2 and all(r.get("plan_key") is None for r in first.values())
    (folder / "lab_nets.py").write_text((folder / "lab_nets.py").read_text() + "\n# width 8 was too small\n")
    p = run_cli([*args, f"out_dir={tmp_path / 'sw'}"], env=cli_env(), cwd=folder, check=False)
    assert p.returncode == 1 and f'model.source_sha256: "{sha}" (recorded) != ' in p.stderr
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["runs"] == first
    run_cli([*args, f"out_dir={tmp_path / 'sw2'}"], env=cli_env(), cwd=folder)
    second = json.loads((tmp_path / "sw2" / "sweep.json").read_text())["runs"]
    assert len(second) == 2 and not set(second) & set(first)  # the same seeds, new code: new run ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_an_adaptive_pool_fails_the_control_with_the_op_named(cfg_factory):
    """The common case on a GPU: AdaptiveAvgPool2d's CUDA backward has no deterministic kernel."""
    cfg = cfg_factory("model=custom", "model.factory=custom_nets:adaptive_net", "source=none", "train.device=cuda")
    with pytest.raises(ConfigError, match=r"^the model uses adaptive_avg_pool2d_backward_cuda, which has no "
                                          r"deterministic implementation"):
        task.run(cfg)
    out = task.run(cfg_factory("model=custom", "model.factory=custom_nets:adaptive_net", "source=cudnn",
                               "train.device=cuda"))
    assert out["state"] == "done"


def test_custom_runs_packed_in_one_task_match_their_solo_runs(tmp_path):
    """runs_per_task=2 on a node: two custom runs as the SLURM launcher plans them (source hash
    resolved), trained side by side in spawned processes, each equal to its solo run bit for bit."""
    import signal

    from helpers import make_cfg
    from nondet_hpc.cluster import jobs, pack
    from nondet_hpc.rundir import run_dir

    old = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}  # PackJob installs handlers
    planned = []
    for seed in (1, 2):
        cfg = make_cfg(tmp_path / "pack", *CUSTOM, "source=init", f"seed={seed}", "train.threads=1")
        resolve_inputs(cfg)
        planned.append(jobs.RunJob(cfg, run_dir(cfg).name, str(run_dir(cfg)), max_requeue=3))
    try:
        outs = pack.PackJob(planned, mps="false")()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert [o["state"] for o in outs] == ["done", "done"]
    for job in planned:
        solo = task.run(make_cfg(tmp_path / "solo", *CUSTOM, "source=init", f"seed={job.cfg.seed}", "train.threads=1"))
        assert solo["run_id"] == Path(job.run_dir).name
        assert np.array_equal(_logits({"run_dir": job.run_dir}), _logits(solo))


def test_a_model_file_edited_between_runs_of_one_process_is_imported_again(cfg_factory, tmp_path, monkeypatch):
    name, path = _model_file_copy(tmp_path, monkeypatch, "reloaded_nets")
    first = task.run(cfg_factory("model=custom", f"model.factory={name}:tiny_cnn"))
    path.write_text(path.read_text().replace("width: int = 8", "width: int = 5"))
    second = task.run(cfg_factory("model=custom", f"model.factory={name}:tiny_cnn"))
    assert first["run_id"] != second["run_id"]
    assert (_rec(first)["n_parameters"], _rec(second)["n_parameters"]) == (8 * 9 + 8 + 16 + 80 + 10,
                                                                          5 * 9 + 5 + 10 + 50 + 10)
