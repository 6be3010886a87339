"""Fault injection over the reducer (issue 10): one healthy sweep, each fault applied to a copy.

For every case the reducer must end with a reason in excluded.csv, a line in its summary or a
clear error (exit 2), never a traceback; duplicates must not change N; and runs/ must be
byte-identical afterwards (every file hashed before and after, nothing added or removed). Cases
that could block (FIFOs) run the reducer in its own process, so a hang cannot block the tests'
(pytest-timeout ends it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import run_cli
from synthetic_sweep import CPU_ENV, LABELS, N_CLASSES, run_id, set_env, write_run, write_sweep_json

from nondet_hpc.analysis import cli

INIT = "Parameter Initialization"
R1, R2 = run_id("init", 1), run_id("init", 2)


@dataclass
class Case:
    name: str
    fault: Callable[[Path], None]
    expect: str  # substring of the outcome: the run's reason in excluded.csv, the summary, or stderr
    run: str = ""  # the run whose excluded.csv reason must hold ``expect`` ("" : summary or stderr)
    n_init: int | None = 3  # N of the init single-model row afterwards (None: exit 2 expected)
    subprocess: bool = False  # may block: run the reducer in its own process
    planned: int | None = 3  # n_planned of that row (None: no readable sweep.json)


def _runs(sweep: Path, rid: str = R2) -> Path:
    return sweep / "runs" / rid


def _edit_json(rid: str, **fields) -> Callable[[Path], None]:
    return lambda sweep: set_env(_runs(sweep, rid), **fields)


def _write(rel: str, data: bytes, rid: str = R2) -> Callable[[Path], None]:
    def fault(sweep: Path) -> None:
        p = _runs(sweep, rid) / rel
        p.unlink()
        p.write_bytes(data)
    return fault


def _replace(rel: str, make: Callable[[Path, Path], None]) -> Callable[[Path], None]:
    """Replace run 2's file ``rel`` by ``make(path, the same file of run 1)``."""
    def fault(sweep: Path) -> None:
        p = _runs(sweep) / rel
        p.unlink()
        make(p, _runs(sweep, R1) / rel)
    return fault


def _fifo(rel: str) -> Callable[[Path], None]:
    return _replace(rel, lambda p, _: os.mkfifo(p))


def _symlink_file(rel: str) -> Callable[[Path], None]:
    return _replace(rel, lambda p, other: os.symlink(other, p))


def _npy(rel: str, arr: np.ndarray, **kw) -> Callable[[Path], None]:
    def fault(sweep: Path) -> None:
        with open(_runs(sweep) / rel, "wb") as f:
            np.save(f, arr, **kw)
    return fault


def _truncate(sweep: Path) -> None:
    p = _runs(sweep) / "logits" / "plain.npy"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _copy(suffix: str, *, rename: bool) -> Callable[[Path], None]:
    def fault(sweep: Path) -> None:
        d = shutil.copytree(_runs(sweep, R1), sweep / "runs" / f"{R1}{suffix}")
        if rename:
            set_env(d, run_id=d.name)
    return fault


def _other_labels(sweep: Path) -> None:
    other = LABELS.copy()
    other[:4] = (other[:4] + 1) % N_CLASSES
    for s in (1, 2, 3):
        np.save(_runs(sweep, run_id("shuffle", s)) / "labels.npy", other, allow_pickle=False)


def _huge_header(sweep: Path) -> None:
    p = _runs(sweep) / "logits" / "plain.npy"
    with open(p, "wb") as f:  # a header promising 10^9 rows, then 16 bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 4)})
        f.write(b"\0" * 16)


def _replace_runs_by_file(sweep: Path) -> None:
    shutil.rmtree(sweep / "runs")
    (sweep / "runs").write_text("not a folder")


CASES: list[Case] = [
    Case("symlinked duplicate run folder", lambda s: os.symlink(R1, s / "runs" / f"{R1}.link"),
         "is a symbolic link", f"{R1}.link"),
    Case("copied <id>.bak folder", _copy(".bak", rename=False), "names run", f"{R1}.bak"),
    Case("copy renamed consistently (same group + seed)", _copy("-copy", rename=True), "same group and seed",
         f"{R1}-copy"),
    Case("FIFO logits/plain.npy", _fifo("logits/plain.npy"), "is a FIFO", R2, 2, subprocess=True),
    Case("FIFO labels.npy", _fifo("labels.npy"), "is a FIFO", R2, 2, subprocess=True),
    Case("FIFO run.json", _fifo("run.json"), "not a regular file", R2, 2, subprocess=True),
    Case("FIFO DONE", _fifo("DONE"), "DONE is a FIFO, not a regular file", R2, 2, subprocess=True),  # never opened
    Case("run.json is a JSON list", _write("run.json", b"[1, 2]"), "holds a JSON list", R2, 2),
    Case("run.json garbage", _write("run.json", b"{not json"), "run.json unreadable", R2, 2),
    Case("run.json empty", _write("run.json", b""), "run.json unreadable", R2, 2),
    Case("run.json binary", _write("run.json", bytes(range(256))), "run.json unreadable", R2, 2),
    Case("run.json without identity", _write("run.json", b'{"run_id": "x"}'), "lacks 'group_key'", R2, 2),
    Case("run.json group_key a list", _edit_json(R2, group_key=[1]), "lacks 'group_key'", R2, 2),
    Case("run.json views an integer", _edit_json(R2, views=5), "'views' must be a list", R2, 2),
    Case("run.json views a path", _edit_json(R2, views=["../../../etc/passwd"]), "not view names", R2, 2),
    Case("run.json view name with NUL", _edit_json(R2, views=["pl\u0000ain"]), "not view names", R2, 2),
    Case("run.json seed a string", _edit_json(R2, seed="two"), "'seed' must be an integer", R2, 2),
    Case("run.json experiment a list", _edit_json(R2, experiment=["x"]), "", "", 3),
    Case("run_id differs from folder name", _edit_json(R2, run_id="init-s0099-e10"), "names run 'init-s0099-e10'",
         R2, 2),
    Case("missing DONE", lambda s: (_runs(s) / "DONE").unlink(), "no DONE marker", R2, 2),
    Case("DONE folder without logits", lambda s: shutil.rmtree(_runs(s) / "logits"), "holds no logits", R2, 2),
    Case("logits/ a symlink to another run", lambda s: (shutil.rmtree(_runs(s) / "logits"),
                                                        os.symlink(_runs(s, R1) / "logits", _runs(s) / "logits")),
         "logits is a symbolic link", R2, 2),
    Case("plain.npy a symlink to another run's", _symlink_file("logits/plain.npy"), "is a symbolic link", R2, 2),
    Case("labels.npy a symlink to another run's", _symlink_file("labels.npy"), "is a symbolic link", R2, 2),
    Case("plain.npy a folder", lambda s: ((_runs(s) / "logits" / "plain.npy").unlink(),
                                          (_runs(s) / "logits" / "plain.npy").mkdir()), "is a folder", R2, 2),
    Case("truncated plain.npy", _truncate, "corrupt .npy", R2, 2),
    Case("plain.npy header promises 10^9 rows", _huge_header, "corrupt .npy", R2, 2),
    Case("plain.npy with pickled object dtype", _npy("logits/plain.npy", np.array([{"a": 1}] * 3, dtype=object),
                                                     allow_pickle=True), "holds Python objects", R2, 2),
    Case("labels.npy pickled", _write("labels.npy", b"\x80\x04\x95" + b"\0" * 20), "not a .npy file", R2, 2),
    Case("plain.npy an .npz archive", lambda s: np.savez(_runs(s) / "logits" / "plain.npy.npz", a=LABELS)
         or os.replace(_runs(s) / "logits" / "plain.npy.npz", _runs(s) / "logits" / "plain.npy"),
         "expected one .npy array, found NpzFile", R2, 2),
    Case("plain.npy integer dtype", _npy("logits/plain.npy", np.zeros((len(LABELS), N_CLASSES), np.int64)),
         "wrong shape or dtype", R2, 2),
    Case("plain.npy NaN", _npy("logits/plain.npy", np.full((len(LABELS), N_CLASSES), np.nan, np.float32)),
         "non-finite logits", R2, 2),
    Case("labels.npy empty", _npy("labels.npy", np.zeros(0, np.int64)), "expected non-empty 1-D", R2, 2),
    Case("labels.npy 2-D", _npy("labels.npy", np.zeros((3, 3), np.int64)), "expected non-empty 1-D", R2, 2),
    Case("labels differ across groups", _other_labels, "other run(s) of the sweep", run_id("shuffle", 1), 3),
    Case("data sha256 differs", lambda s: [set_env(_runs(s, run_id(src, k)), data={"sha256": "a" if
                                           (src, k) != ("init", 2) else "b"})
                                           for src in ("init", "shuffle", "all") for k in (1, 2, 3)],
         "data.sha256", R2, 0),  # the group is stopped, like one with other labels
    Case("planned run folder deleted", lambda s: shutil.rmtree(_runs(s)), "planned in sweep.json", R2, 2),
    Case("sweep.json garbage", lambda s: (s / "sweep.json").write_text("{"), "sweep.json cannot be read", "", 3,
         planned=None),
    Case("sweep.json a list", lambda s: (s / "sweep.json").write_text("[]"), "sweep.json cannot be read", "", 3,
         planned=None),
    Case("mixed thread counts in a group", lambda s: [set_env(_runs(s, run_id("init", k)), **{**CPU_ENV,
                                                      "threads": 1 + (k == 2)}) for k in (1, 2, 3)],
         "mixes environments", "", None),
    Case("report path is a file", lambda s: (s / "report").write_text("x"), "exists and is not a folder", "", None),
    Case("runs/ is a file", _replace_runs_by_file, "has no runs/ folder", "", None),
    Case("stray file in runs/", lambda s: (s / "runs" / "notes.txt").write_text("x"), "", "", 3),
]


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (not followed) -> its kind and content hash; FIFOs are never opened."""
    if not root.is_dir() or root.is_symlink():
        return {".": "not a folder"}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            key = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[key] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[key] = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                out[key] = "dir"
            else:
                out[key] = f"special:{stat.S_IFMT(st.st_mode)}"
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("faults") / "base"
    for src in ("init", "shuffle", "all"):
        for s in (1, 2, 3):
            write_run(sweep, src, s)
    write_sweep_json(sweep, [(src, s) for src in ("init", "shuffle", "all") for s in (1, 2, 3)])
    return sweep


def reduce_case(sweep: Path, case: Case, capsys) -> tuple[int, str, str]:
    args = [str(sweep), "--n-boot", "20", "--slurm-timeout", "0"]
    if case.subprocess:
        p = run_cli(["-m", "nondet_hpc.reduce", *args], check=False)
        return p.returncode, p.stdout, p.stderr
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def outcome(sweep: Path, case: Case, rc: int, out: str, err: str) -> str:
    """The first line of what the user is told about the fault (for the closing table too)."""
    if rc != 0:
        return err.strip().splitlines()[0]
    if case.run:
        ex = pd.read_csv(sweep / "report" / "excluded.csv", keep_default_na=False)
        hits = ex[ex["run_id"] == case.run]
        return hits["reason"].iloc[0] if len(hits) else "(run not in excluded.csv)"
    hit = [ln.strip() for ln in out.splitlines() if case.expect and case.expect in ln]
    return hit[0] if hit else "(reduced normally)"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(base: Path, tmp_path: Path, case: Case, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(base, sweep, symlinks=True)
    case.fault(sweep)
    before = tree_digest(sweep / "runs")
    rc, out, err = reduce_case(sweep, case, capsys)
    assert "Traceback" not in err + out, err
    assert tree_digest(sweep / "runs") == before  # nothing changed, added or removed under runs/
    message = outcome(sweep, case, rc, out, err)
    if case.n_init is None:
        assert rc == 2 and case.expect in err, err
        return
    assert rc == 0, err
    assert case.expect in message, (message, out)
    metrics = pd.read_csv(sweep / "report" / "metrics.csv", keep_default_na=False)
    init = metrics[metrics["group"] == INIT]
    assert list(init["n_models"]) == [case.n_init]
    # copies and links never raise the planned N
    assert list(init["n_planned"]) == ([case.planned] if case.planned is not None else [""])
