"""The schema of SWEEP_DIR/sweep.json: what each entry must be, checked whenever the file is read.

sweep.json is shared and may be edited, copied or damaged; a malformed entry must stop nothing
but itself. :func:`problems` names every entry that does not match (``runs['x']: a number, not an
object``); :func:`salvage` keeps the entries that do, for the commands that can act on part of a
sweep (status, cancel). Keys not listed here are allowed (and kept): later versions may add them.

Versions: 1 = the layout of nondet_hpc 0.1.0 (``"format": 1`` and no ``"version"`` field);
2 = the same entries with ``"version": 2`` (written from this version on). A file of another
version is refused as a whole: it was written by a newer nondet_hpc.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Mapping

VERSION = 2  # written by this version
VERSIONS = (1, 2)  # read by this version; 1 = 0.1.0's files (no "version" field)

Spec = Any  # a type, a tuple of types, or ("list", spec) / ("map", spec) / ("obj", {key: (required, spec)})
_STR, _INT, _NUM = str, int, (int, float)
_NONE = type(None)


def _obj(**fields: tuple[bool, Spec]) -> tuple[str, dict]:
    return ("obj", fields)


JOB = _obj(job_id=(True, _STR), submission=(False, _INT), array_job_id=(False, _STR), index=(False, _INT),
           slot=(False, _INT))
# parent: the run id of the run it starts from (source.from_epoch > 0); keep_checkpoints: a parent's
# epochs its children start from
RUN = _obj(run_dir=(False, _STR), overrides=(False, ("list", _STR)), config_hash=(False, _STR),
           jobs=(False, ("list", JOB)), plan_key=(False, _STR), parent=(False, _STR),
           keep_checkpoints=(False, ("list", _INT)))
# role: "parents" or "children" (runs that start from a parent's checkpoint); absent: neither
ARRAY = _obj(job_id=(True, _STR), offset=(False, _INT), size=(False, _INT), runs_per_task=(False, _INT),
             tasks=(False, ("list", ("list", _STR))), role=(False, _STR))
ONE_JOB = (_NONE, _obj(job_id=(True, _STR)))  # the reducer job, the barrier job
SUBMISSION = _obj(n=(True, _INT), folder=(False, (_STR, _NONE)), arrays=(False, ("list", ARRAY)),
                  reducer=(False, ONE_JOB), barriers=(False, ONE_JOB), runs=(False, ("list", _STR)),
                  run_values=(False, ("map", dict)), base_config=(False, dict), varying_keys=(False, ("list", _STR)),
                  status=(False, _STR))
CANCELLATION = _obj(job_ids=(True, ("list", _STR)))
RULE = _obj(targets=(True, ("map", _NUM)), wave=(True, _INT), max_models=(True, (_INT, _NONE)))
GROUP = _obj(seeds=(True, ("list", _INT)), submitted=(True, ("list", _INT)), run_ids=(True, ("map", _STR)),
             state=(True, _STR), precision=(False, ("map", _NUM)), overrides=(False, ("list", _STR)),
             config=(False, dict), n_models=(False, _INT))
WAVE = _obj(n=(True, _INT), groups=(True, ("map", ("list", _INT))), status=(True, _STR), by=(False, _STR))
STUDY = _obj(rule=(True, RULE), groups=(True, ("map", GROUP)), waves=(True, ("list", WAVE)), status=(True, _STR),
             stop_reason=(False, (_STR, _NONE)))
TOP = _obj(runs=(True, ("map", RUN)), submissions=(True, ("list", SUBMISSION)),
           cancellations=(False, ("list", CANCELLATION)), study=(False, STUDY), sweep_dir=(False, _STR),
           format=(False, _INT), version=(False, _INT))


def _what(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({json.dumps(v)})"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return f"a string ({json.dumps(v[:40])})"
    return {dict: "an object", list: "a list"}.get(type(v), type(v).__name__)


def _expected(spec: Spec) -> str:
    if isinstance(spec, tuple) and spec and isinstance(spec[0], str):
        return {"list": "a list", "map": "an object", "obj": "an object"}[spec[0]]
    types = spec if isinstance(spec, tuple) else (spec,)
    names = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list",
             _NONE: "null"}
    return " or ".join(_expected(t) if isinstance(t, tuple) else names.get(t, t.__name__) for t in types)


def _is(v: Any, t: Any) -> bool:
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, t)


def check(value: Any, spec: Spec, where: str) -> list[str]:
    """Every place in ``value`` that does not match ``spec``, as ``where: what it is, what it should be``."""
    if isinstance(spec, tuple) and spec and isinstance(spec[0], str):
        kind, inner = spec
        if kind == "list":
            if not isinstance(value, list):
                return [f"{where}: {_what(value)}, not a list"]
            return [p for i, v in enumerate(value) for p in check(v, inner, f"{where}[{i}]")]
        if not isinstance(value, dict):
            return [f"{where}: {_what(value)}, not an object"]
        if kind == "map":
            return [p for k, v in value.items() for p in check(v, inner, f"{where}[{json.dumps(k)}]")]
        out = []
        for key, (required, sub) in inner.items():
            if key not in value:
                if required:
                    out.append(f"{where}: lacks '{key}'")
                continue
            out += check(value[key], sub, f"{where}.{key}" if where else key)
        return out
    options = spec if isinstance(spec, tuple) else (spec,)
    for t in options:
        if isinstance(t, tuple):
            if not check(value, t, where):
                return []
        elif _is(value, t):
            return []
    return [f"{where}: {_what(value)}, not {_expected(spec)}"]


def version_of(data: Mapping) -> int | str:
    """The file's version: its ``version`` field, 1 for 0.1.0's files (``format`` 1, no version)."""
    if "version" in data:
        return data["version"]
    return 1 if data.get("format", 1) == 1 else f"format {data.get('format')!r}"


def version_problem(data: Any) -> str:
    """Why the file as a whole cannot be read ("" when its top level and version are readable)."""
    if not isinstance(data, dict):
        return f"holds {_what(data)}, not the object a sweep manifest is"
    v = version_of(data)
    if v not in VERSIONS or isinstance(v, bool):
        return (f"has version {v!r}; this nondet_hpc reads versions {', '.join(map(str, VERSIONS))} (1: written by "
                f"nondet_hpc 0.1.0, without a version field). It was written by a newer nondet_hpc: update this one")
    missing = [k for k in ("runs", "submissions") if k not in data]
    if missing:
        return f"lacks {' and '.join(repr(k) for k in missing)}: it is not a nondet_hpc sweep manifest"
    return ""


def problems(data: Any) -> list[str]:
    """Every entry of a sweep manifest that does not match the schema ([] for a valid file)."""
    whole = version_problem(data)
    return [whole] if whole else check(data, TOP, "")


def salvage(data: Any) -> tuple[dict | None, list[str]]:
    """(the manifest with its damaged entries left out, what was left out); (None, why) when nothing
    of it can be used (its top level, version, runs or submissions are unreadable)."""
    whole = version_problem(data)
    if whole:
        return None, [whole]
    out = copy.deepcopy(dict(data))
    lost: list[str] = []
    top = TOP[1]
    for key in ("runs", "submissions"):
        if not isinstance(out[key], dict if key == "runs" else list):
            return None, check(out[key], top[key][1], key)
    out["runs"] = _keep({k: _prune(v, "jobs", JOB, f"runs[{json.dumps(k)}]", lost) for k, v in out["runs"].items()},
                        RUN, "runs", lost)
    subs = [_prune(_prune(v, "arrays", ARRAY, f"submissions[{i}]", lost), None, None, f"submissions[{i}]", lost)
            for i, v in enumerate(out["submissions"])]
    out["submissions"] = _keep(subs, SUBMISSION, "submissions", lost)
    if "cancellations" in out:
        if isinstance(out["cancellations"], list):
            out["cancellations"] = _keep(out["cancellations"], CANCELLATION, "cancellations", lost)
        else:
            lost.append(f"cancellations: {_what(out['cancellations'])}, not a list")
            out["cancellations"] = []
    if "study" in out:
        bad = check(out["study"], STUDY, "study")
        if bad:
            lost += bad
            del out["study"]
    return out, lost


def _prune(entry: Any, key: str | None, spec: Spec, where: str, lost: list[str]) -> Any:
    """``entry`` with the damaged items of its list ``key`` left out (key None: a damaged reducer or
    barrier job record of a submission set to null), so one bad job record does not hide its whole entry."""
    if not isinstance(entry, dict):
        return entry
    if key is None:
        for job in ("reducer", "barriers"):
            bad = check(entry.get(job), ONE_JOB, f"{where}.{job}") if job in entry else []
            if bad:
                lost += bad
                entry = {**entry, job: None}
        return entry
    if isinstance(entry.get(key), list):
        return {**entry, key: _keep(entry[key], spec, f"{where}.{key}", lost)}
    return entry


def _keep(entries: Any, spec: Spec, where: str, lost: list[str]) -> Any:
    """The valid items of a list or mapping; the problems of the others go to ``lost``."""
    if isinstance(entries, dict):
        keep = {}
        for k, v in entries.items():
            bad = check(v, spec, f"{where}[{json.dumps(k)}]")
            lost += bad
            if not bad:
                keep[k] = v
        return keep
    kept = []
    for i, v in enumerate(entries):
        bad = check(v, spec, f"{where}[{i}]")
        lost += bad
        if not bad:
            kept.append(v)
    return kept
