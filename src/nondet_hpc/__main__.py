"""`python -m nondet_hpc [-m] KEY=VALUE ...`: compose conf/ with Hydra and train one model per job.

    python -m nondet_hpc source=init seed=7                       # one model
    python -m nondet_hpc -m source=none,init,shuffle seed='range(1,9)'   # a local sweep + report
    python -m nondet_hpc -m experiment=sources hydra/launcher=slurm_v100 # SLURM arrays, returns at once
    python -m nondet_hpc --help                                   # every group and key

Results: out_dir/runs/<run id>/ (docs/contracts.md). Finished runs are skipped.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import conf_dir
from .registry.options import register_configs

register_configs()  # the schema, and every source and model option, before Hydra composes


def main() -> None:
    """The command line: Hydra's, after hydra.sweep.dir / hydra.run.dir became out_dir (guards.py)."""
    from .guards import check_launcher_keys, honour_hydra_dirs

    sys.argv[1:] = honour_hydra_dirs(sys.argv[1:])
    check_launcher_keys(sys.argv[1:])
    try:
        _hydra_main()
    except BrokenPipeError:  # `--help | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> dict:
    from .run import task
    from .config import ConfigError
    from .rundir import DiskFullError

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        try:
            out = task.run(cfg)
        except (ConfigError, DiskFullError) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":  # debugging: the whole traceback
                raise
            # bad input is the user's to fix: one message, exit 2 (argparse's code), no traceback
            print(f"nondet_hpc: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        print(f"[nondet_hpc] {out['run_id']}: {out['state']} -> {out['run_dir']}", flush=True)
        return out
    # In a sweep one failing job must not stop the others: record it, go on, and let the
    # end-of-sweep callback list every failure and exit non-zero.
    try:
        out = task.run(cfg)
    except ConfigError as e:
        print(f"[nondet_hpc] job {HydraConfig.get().job.num} refused: {e}", flush=True)
        return {"state": "failed", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded in run.json by task.run
        print(f"[nondet_hpc] job {HydraConfig.get().job.num} failed: {type(e).__name__}: {e}", flush=True)
        return {"state": "failed", "error": f"{type(e).__name__}: {e}"}
    acc = f" test acc {out['test_acc']:.4f}" if "test_acc" in out else ""
    print(f"[nondet_hpc] {out['run_id']}: {out['state']}{acc}", flush=True)
    return out


if __name__ == "__main__":
    main()
