"""Who may write a sweep folder, and the settings a study's next waves run with.

A SLURM sweep folder holds what its jobs execute as their owner (docs/slurm.md, "Sharing a sweep
folder"): the job pickles in ``slurm/`` (submitit unpickles them, with full pickle, at every
start of a job), and sweep.json, whose study record holds the launcher settings (``setup`` lines,
``python``, ``srun_args``, ...) and the run configs that the reducer job submits as the next
wave. So before the launcher submits and before a reducer job advances a study:

- :func:`check_sweep_folder`: the sweep folder, ``slurm/``, sweep.json and ``runs/`` belong to the
  user and nobody else can write them (their group may, with ``hydra.launcher.trust_group=true``);
  no folder above them lets others replace them; the folder the jobs start in is nobody else's to
  write either (``python -m`` imports from it first). Otherwise one :class:`TrustError` names
  every such path and the ``chmod`` to run, and nothing is submitted.
- :func:`owner_only_umask`: what the launcher creates, and through sbatch (which passes the umask
  on) what its jobs create, is not writable by the group or others, whatever the user's umask.
- :func:`sign_study` / :func:`verify_study`: the study's recorded settings carry an HMAC-SHA256 per
  item with a key only the user can read (``~/.config/nondet_hpc/sweep.key``, mode 0600, made on
  first use; ``NONDET_HPC_KEY_FILE`` points elsewhere). The reducer job verifies it before it
  submits a wave, so a sweep.json edited by someone else is refused, naming what changed.

Torch-, SLURM- and Hydra-free (the sweep layer).
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import hashlib
import hmac
import json
import os
import pwd
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..rundir import RUNS
from .manifest import MANIFEST, SweepError, now_iso

KEY_ENV = "NONDET_HPC_KEY_FILE"
KEY_BYTES = 32


class TrustError(SweepError):
    """Others could make this sweep's jobs run their code: what, where, and the fix."""


# =============================================================================== permissions
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _writers(st: os.stat_result, trust_group: bool) -> str | None:
    """Who besides the owner may write a file or folder with this mode, or None."""
    if st.st_mode & stat.S_IWOTH:
        return "everyone"
    if st.st_mode & stat.S_IWGRP and not trust_group:
        return f"the members of group {_group(st.st_gid)}"
    return None


def folder_problems(items: Sequence[tuple[Path, str, bool]], *, trust_group: bool = False,
                    above: Sequence[Path] = ()) -> tuple[list[str], list[Path]]:
    """(a line per path others could use against the user, the paths a ``chmod`` fixes).

    ``items``: (path, what it is, whether root may own it) that must be the user's and written by
    nobody else; a missing one is fine (the launcher makes it, privately). ``above``: paths whose
    parent folders must not let others rename them away (writable by others, no sticky bit)."""
    lines: list[str] = []
    fix: list[Path] = []
    me = os.getuid()
    for path, role, root_ok in items:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != me and not (root_ok and st.st_uid == 0):
            lines.append(f"  {path} ({role}) belongs to {_user(st.st_uid)}, not to you: they can change what your "
                         f"jobs run; use a folder of your own")
            continue
        who = _writers(st, trust_group)
        if who:
            lines.append(f"  {path} (mode {stat.S_IMODE(st.st_mode):o}): {who} can write it; {role}")
            fix.append(path)
    seen: set[Path] = {path for path, _, _ in items}
    for path in above:
        for parent in Path(path).absolute().parents:
            if parent in seen:
                continue
            seen.add(parent)
            try:
                st = parent.stat()
            except OSError:
                continue
            who = _writers(st, trust_group)
            if who and not st.st_mode & stat.S_ISVTX:
                lines.append(f"  {parent} (mode {stat.S_IMODE(st.st_mode):o}): {who} can write it; a folder above the "
                             f"sweep's: they can rename its folders away and put their own in place")
                fix.append(parent)
    return lines, fix


def check_sweep_folder(sweep_dir: str | os.PathLike, submitit_folder: str | os.PathLike, *, trust_group: bool = False,
                       cwd: str | os.PathLike | None = None, consequence: str = "Nothing was submitted.") -> None:
    """Refuse (:class:`TrustError`, one message) a sweep whose job files others could replace."""
    sweep_dir, folder = Path(sweep_dir).absolute(), Path(submitit_folder).absolute()
    start = Path(cwd if cwd is not None else os.getcwd()).absolute()
    items = [(sweep_dir, "the sweep folder", False),
             (sweep_dir / MANIFEST, "sweep.json, whose recorded settings a study's next waves run", False),
             (sweep_dir / RUNS, "runs/, the results", False),
             (folder, "the job pickles' folder, which every job unpickles its file from", False),
             (start, "the folder you submit from, where the jobs start and python -m imports from first", True)]
    lines, fix = folder_problems(items, trust_group=trust_group, above=[sweep_dir, folder])
    if not lines:
        return
    who = "others" if trust_group else "your group or others"
    msg = [f"{who} can change files this sweep's jobs execute as you:", *lines]
    if fix:
        bits = "o-w" if trust_group else "go-w"
        msg.append(f"Make them yours alone and rerun:  chmod {bits} {' '.join(_quote(p) for p in dict.fromkeys(fix))}")
        if not trust_group:
            msg.append("(if every member of the group may act as you: hydra.launcher.trust_group=true)")
    msg.append(consequence)
    raise TrustError("\n".join(msg))


def _quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


@contextlib.contextmanager
def owner_only_umask(trust_group: bool = False) -> Iterator[None]:
    """Files and folders made meanwhile (and by jobs submitted meanwhile: sbatch passes the umask
    on) are writable by the user alone (and the group, with ``trust_group``)."""
    old = os.umask(0o077)
    os.umask(old | (0o002 if trust_group else 0o022))
    try:
        yield
    finally:
        os.umask(old)


# =============================================================================== the recorded settings
def key_file() -> Path:
    """The user's signing key: ``NONDET_HPC_KEY_FILE``, else ``~/.config/nondet_hpc/sweep.key``."""
    env = os.environ.get(KEY_ENV)
    return Path(env).expanduser() if env else Path.home() / ".config" / "nondet_hpc" / "sweep.key"


def _make_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")


def load_key(create: bool = False) -> bytes:
    """The key, read only from a regular file of the user's that nobody else can read or write."""
    path = key_file()
    if create and not path.exists():
        _make_key(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise TrustError(f"{path}, the key that signs the settings your sweep command recorded, does not exist on "
                         f"this machine, so they cannot be checked. Its home must be visible here (or set {KEY_ENV} "
                         "to a private file on a shared file system); then rerun the same sweep command.") from None
    except OSError as e:
        raise TrustError(f"cannot open the signing key {path} ({e.strerror}; a symbolic link is refused): make it a "
                         "file of yours (chmod 600)") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise TrustError(f"the signing key {path} must be a file of yours that nobody else can read or write "
                             f"(mode {stat.S_IMODE(st.st_mode):o}, owner {_user(st.st_uid)}): whoever reads it can "
                             f"sign settings your jobs would run. Run  chmod 600 {_quote(path)}")
        key = f.read(4 * KEY_BYTES).strip()
    if len(key) < KEY_BYTES:
        raise TrustError(f"{path} is not a signing key of nondet_hpc: remove it (the next sweep command makes one)")
    return key.encode()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"nondet_hpc key id\0" + key).hexdigest()[:16]


def signed_items(study: Mapping[str, Any], sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """What the next waves are made of: the folder, the rule, each launcher setting, each group's
    overrides, seeds and config. Their states and precisions change at every decision: not signed."""
    items: dict[str, Any] = {"sweep folder": str(Path(sweep_dir).absolute()), "rule": study.get("rule"),
                             "ignore_keys": study.get("ignore_keys")}
    for name, value in dict(study.get("params") or {}).items():
        items[f"params.{name}"] = value
    for label, g in dict(study.get("groups") or {}).items():
        items[f"groups[{label}]"] = {k: g.get(k) for k in ("overrides", "seeds", "config")}
    return items


def _mac(key: bytes, name: str, value: Any) -> str:
    text = json.dumps([name, value], sort_keys=True, default=str)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sign_study(study: dict, sweep_dir: str | os.PathLike) -> None:
    """Record the signature of the study's settings in it (the key is made on first use)."""
    key = load_key(create=True)
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    study["signature"] = {"scheme": "hmac-sha256", "key_id": _key_id(key), "by": user, "time": now_iso(),
                          "items": {n: _mac(key, n, v) for n, v in signed_items(study, sweep_dir).items()}}


def changed_items(study: Mapping[str, Any], sweep_dir: str | os.PathLike) -> list[str]:
    """The signed items that differ from their signature ([] = all as recorded). Raises TrustError
    when there is no signature, or one made with another key than the user's."""
    sig = study.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("items"), dict):
        raise TrustError("sweep.json's study has no signature of the settings your sweep command recorded (a study "
                         "of an earlier version, or the signature was removed), so they cannot be told from settings "
                         "someone else wrote. Rerun the same sweep command: it records and signs them.")
    key = load_key()
    if sig.get("key_id") != _key_id(key):
        raise TrustError(f"sweep.json's study was signed with another key than yours ({key_file()}): it was not "
                         "recorded by your sweep command with this key. If it was yours (a key made anew), check the "
                         "study in sweep.json, delete its \"signature\" and rerun the same sweep command.")
    items = signed_items(study, sweep_dir)
    recorded = sig["items"]
    return sorted(n for n in set(items) | set(recorded)
                  if n not in items or n not in recorded or not hmac.compare_digest(str(recorded[n]),
                                                                                   _mac(key, n, items[n])))


def verify_study(study: Mapping[str, Any], sweep_dir: str | os.PathLike, renewed: Sequence[str] = ()) -> None:
    """Refuse (:class:`TrustError`) a study whose recorded settings changed since they were signed.
    ``renewed``: prefixes of items the caller is about to record anew from the user's own command
    (the launcher's settings), whose change does not matter."""
    changed = [n for n in changed_items(study, sweep_dir) if not n.startswith(tuple(renewed))]
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise TrustError(f"sweep.json: the study's {shown} changed since your sweep command recorded "
                         f"{'it' if len(changed) == 1 else 'them'} (the signature does not match): the next wave "
                         "would run what someone else wrote. Check the study in sweep.json; if the change is yours, "
                         "delete its \"signature\" and rerun the same sweep command, which records and signs it again.")
