"""SWEEP_DIR/report/ as one unit: built in a temporary folder beside it and swapped in whole.

A reducer killed at any point (time limit, preemption, kill -9) leaves the previous report as it
was, never metrics.csv of one reduction beside per_model.csv of another: every file of a reduction
is written (through :mod:`nondet_hpc.safeio`, synced) into ``SWEEP/.report.<id>.tmp/`` with
``report.json`` last (the reduction's id and the SHA-256 of every file), then that folder replaces
report/ by two renames. Files in report/ that the reducer never writes (a user's notes) move into
the new report. ``report/`` as a link is refused before any work.

:func:`verified` is how the report is read back (python -m nondet_hpc.plan, a study's waves): a
file is used only if report.json lists it with the same digest, so a report whose parts come
from different reductions is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from pathlib import Path

from .. import safeio
from .scan import ReduceError

REPORT = "report"
REPORT_JSON = "report.json"  # written last: the reduction's id and every file's SHA-256
REPORT_FILES: tuple[str, ...] = (
    "metrics.csv", "metrics.md", "metrics.tex", "per_model.csv", "excluded.csv", "ablation.csv",
    "ablation.md", "claim1.csv", "claims.csv", "published.csv", "summary.txt", "report.md", "metrics.png", "sd_vs_n.png",
    "accuracy_spread.png", "claim1.png", "reduction.png", "architectures.csv", "architectures.md",
    "architectures.png", "instability.csv", "instability_groups.csv", "instability_pairs.csv", "divergence.png",
    "stability.csv", "stability_summary.csv", "stability.png", REPORT_JSON)
_TEMP = ".report."  # SWEEP/.report.<id>.tmp (being built) and .report.<id>.old (being replaced)


class ReportMismatch(ValueError):
    """A report whose files do not all come from one reduction (the message names the file)."""


def check_writable(sweep: Path) -> Path:
    """report/ may be written: nothing there, or a real folder (ReduceError before any work)."""
    report = sweep / REPORT
    try:
        st = os.lstat(report)
    except FileNotFoundError:
        return report
    if stat.S_ISLNK(st.st_mode):
        raise ReduceError(f"{report} is a symbolic link (to {os.readlink(report)}): the report is written only into "
                          f"a real folder of the sweep, never through a link. Nothing was written. Remove the link "
                          f"(rm {report}) and reduce again.")
    if not stat.S_ISDIR(st.st_mode):
        raise ReduceError(f"{report} exists and is not a folder: the report is written there. Move or rename that "
                          "file, then reduce again.")
    return report


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(sweep: Path, outputs: dict[str, bytes], warnings: list[str] | None = None) -> Path:
    """Write ``outputs`` (name -> bytes) as SWEEP/report/, whole; the previous report stays until
    the new one is complete. Returns the report folder."""
    report = check_writable(sweep)
    _remove_temps(sweep, warnings)
    rid = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    tmp = sweep / f"{_TEMP}{rid}.tmp"
    record = {"version": 1, "reduction": rid, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "files": {name: _sha(data) for name, data in outputs.items()}}
    try:
        safeio.make_dirs(tmp, root=sweep)
        for name, data in outputs.items():
            safeio.write_bytes(tmp / name, data, root=sweep)
        safeio.write_bytes(tmp / REPORT_JSON, (json.dumps(record, indent=1) + "\n").encode(), root=sweep)
        old = sweep / f"{_TEMP}{rid}.old"
        had_report = os.path.lexists(report)
        if had_report:
            os.rename(report, old)
        os.rename(tmp, report)
    except safeio.RefusedFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReduceError(str(e)) from None
    except OSError as e:  # read-only sweep folder, full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReduceError(f"cannot write the report to {report} ({type(e).__name__}: {e}); make it writable (or free "
                          "space) and reduce again; the previous report is unchanged") from None
    if had_report:
        _carry_over(old, report, set(outputs) | set(REPORT_FILES))
        shutil.rmtree(old, ignore_errors=True)
    return report


def _carry_over(old: Path, report: Path, ours: set[str]) -> None:
    """Entries of the previous report the reducer does not write (a user's files) move along."""
    try:
        entries = list(os.scandir(old))
    except OSError:
        return
    for e in entries:
        if e.name not in ours and not e.name.startswith(".") and not e.is_symlink():
            try:
                os.rename(e.path, report / e.name)
            except OSError:
                pass


def _remove_temps(sweep: Path, warnings: list[str] | None) -> None:
    """Folders a killed reduction left: a half-built report is removed; a replaced one (killed
    between the two renames of the swap) is kept and named, since it may hold a user's files."""
    try:
        entries = list(os.scandir(sweep))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(_TEMP) or e.is_symlink() or not e.is_dir(follow_symlinks=False):
            continue
        if e.name.endswith(".tmp"):
            shutil.rmtree(e.path, ignore_errors=True)
        elif e.name.endswith(".old") and warnings is not None:
            warnings.append(f"{e.path} is a previous report left by a reduction killed while swapping the report in; "
                            "delete it once you have taken out anything of yours")


def verified(sweep: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of report files ``names``, each checked against report.json (ReportMismatch if a
    part is missing, changed or from another reduction; report.json itself missing included)."""
    report = sweep / REPORT
    fix = f"Reduce again to make a consistent report: python -m nondet_hpc.reduce {sweep}"
    try:
        record = safeio.load_json(report / REPORT_JSON)
    except safeio.RefusedFile as e:
        what = ("is missing: the report was written by an older nondet_hpc or is incomplete, so its parts cannot be "
                "checked to come from one reduction" if e.why == "file missing" else e.why)
        raise ReportMismatch(f"{report / REPORT_JSON} {what}. {fix}") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        raise ReportMismatch(f"{report / REPORT_JSON} lists no files: it is not a report record. {fix}")
    rid = record.get("reduction", "?")
    strays = sorted(n for n in REPORT_FILES if n != REPORT_JSON and n not in files and os.path.lexists(report / n))
    if strays:
        raise ReportMismatch(f"{report}: {', '.join(strays)} not written by reduction {rid} (report.json): the "
                             f"report's parts come from different reductions. {fix}")
    out = {}
    for name in names:
        if name not in files:
            raise ReportMismatch(f"{report / name}: not part of reduction {rid} (report.json does not list it). {fix}")
        try:
            data = safeio.read_regular(report / name, safeio.MAX_ARRAY)
        except safeio.RefusedFile as e:
            raise ReportMismatch(f"{e}. {fix}") from None
        if _sha(data) != files[name]:
            raise ReportMismatch(f"{report / name} is not the file reduction {rid} wrote (changed since, or left from "
                                 f"another reduction): the report's parts disagree. {fix}")
        out[name] = data
    return out
