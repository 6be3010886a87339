"""Hydra's own launcher test suites (hydra.test_utils.launcher_common_tests) against the local
launcher, ``hydra/launcher=local`` (src/hydra_plugins/nondet_hpc_launcher/local.py).

``LauncherTestSuite`` sweeps Hydra's test applications in this process and checks each job's
overrides, config, job name, id and number, and the files of its output folder.
``IntegrationTestSuite`` runs a small ``@hydra.main`` application as a command with the launcher
and checks the job name, the working folder, the original folder and ``to_absolute_path``.

``LauncherTestSuite`` runs twice: ``n_jobs=1`` (the jobs one after another in this process) and
``n_jobs=2`` (a pool of spawned worker processes, with the callbacks called here). The launcher's
config lives in this package's conf/ (conf/hydra/launcher/local.yaml), so Hydra's applications get
conf/ on their search path; nothing else of conf/ is used by them.

What cannot apply, skipped with the reason (SKIPPED): the launcher runs a sweep of one job in this
process whatever n_jobs is (n_jobs is capped by the number of jobs), so the suite's one-job tests
have no worker path to test with n_jobs=2; they run with n_jobs=1. ``IntegrationTestSuite``'s
applications are all one job, so it runs once, with the launcher's default n_jobs.

KNOWN_BUGS marks what the suites found wrong in the launcher, as strict expected failures: a fix
makes them pass, which fails them until the entry is removed.
"""

from __future__ import annotations

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from nondet_hpc.config import conf_dir

SEARCH_CONF = f"hydra.searchpath=[file://{conf_dir()}]"  # where hydra/launcher=local is
MODES = {"serial": 1, "parallel": 2}  # hydra.launcher.n_jobs

_NO_JOB_NAME = (
    "local launcher, n_jobs>1: a spawned worker starts with fresh Hydra singletons, so run_job "
    "returns task_name='UNKNOWN_NAME' (Hydra's JobRuntime 'name' is unset there) and the suite "
    "looks for UNKNOWN_NAME.log; fix in hydra_plugins/nondet_hpc_launcher/local.py _work: set "
    "JobRuntime.instance().set('name', config.hydra.job.name) (or pass Singleton.get_state()) "
    "before run_job")
KNOWN_BUGS = {("parallel", name): _NO_JOB_NAME for name in (
    "test_sweep_2_jobs", "test_sweep_2_optimizers", "test_sweep_over_unspecified_mandatory_default",
    "test_sweep_and_override")}  # the suite's tests with two jobs: the ones that run in workers


_ONE_JOB = ("one job: the local launcher runs a sweep of one job in the launching process whatever "
            "n_jobs is, so n_jobs=2 has no worker path to test here; this test runs with n_jobs=1")
SKIPPED = {("parallel", name): _ONE_JOB for name in (
    "test_sweep_1_job", "test_sweep_1_job_strict", "test_sweep_1_job_strict_and_bad_key",
    "test_not_sweeping_hydra_overrides", "test_sweep_with_custom_resolver")}


@pytest.fixture(autouse=True)
def _skipped_and_known_bugs(request):
    key = (request.node.callspec.id.split("-")[0], request.node.originalname)
    if key in SKIPPED:
        pytest.skip(SKIPPED[key])
    if key in KNOWN_BUGS:
        request.node.add_marker(pytest.mark.xfail(reason=KNOWN_BUGS[key], strict=True))


@pytest.mark.parametrize("launcher_name, overrides", [
    pytest.param("local", [SEARCH_CONF, f"hydra.launcher.n_jobs={n}"], id=mode) for mode, n in MODES.items()])
class TestLocalLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [
    pytest.param({}, ["-m", "hydra/launcher=local", SEARCH_CONF], id="serial")])
class TestLocalLauncherIntegration(IntegrationTestSuite):
    pass
