"""Who owns a claimed file, so that replicas on one share never take each other's work.

The claim's rename says that *some* replica took a file; this module says
*which one*, and hands the files of a replica that died to one survivor.
Everything lives on the share, next to the claimed files, in dot-folders
that recovery and the PRD's layout ignore:

* **A lease per running replica**: ``.processing/.leases/<token>``, a small
  file the scanner rewrites every :func:`renew_interval`. The token is
  ``<replica>~<incarnation>``: the pod's name (``APP_REPLICA_ID``, else
  ``HOSTNAME``) and 8 hex digits drawn at each start of the process, so a
  restarted pod is a new owner that takes over its earlier life's files.
* **An owner link per claimed file**:
  ``.processing/<date>/<session>/.owner/<name>``, a symlink whose target is
  the claimer's token. A symlink is created with its content in one atomic
  step, and only if absent, so it is a lock: the uploader creates it
  *before* the claim's rename. There is no moment when a claimed file has
  no owner, and of two replicas racing for one file only the one holding
  the link renames (the rename's "lost reply" on NFS is no longer
  ambiguous either).
* **An heir link per dead owner**: ``.processing/.leases/<token>.heir``, a
  symlink to the token of the replica that took the dead owner's files,
  again created only if absent: exactly one survivor wins them, whatever
  the races. The heir then points each owner link at itself.

A file's owner is its link's token, followed through heir links. An owner
is dead when its lease has not changed for ``APP_LEASE_TIMEOUT_S`` as
measured on the *observer's* monotonic clock (no two clocks are compared,
so NFS server and node clock skew do not matter), when it released its
lease at a clean shutdown, or when it is an earlier life of this very
replica. Claimed files without a link (claimed before leases existed, or
moved back by an operator) are taken by whoever creates a link first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ingestd import provenance

LEASES = ".leases"
OWNERS = ".owner"
HEIR = ".heir"
RELEASED = "released\n"
"""A lease's content once its replica has stopped cleanly: dead at once."""
MAX_RENEW_INTERVAL_S = 30.0
MAX_CHAIN = 16
"""Heir links followed at most (a chain grows only when heirs die in turn)."""

_REPLICA = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_INCARNATION = re.compile(r"^[0-9a-f]{8}$")


class LeaseLost(Exception):
    """Another replica took this replica's files: it was taken for dead.

    Only possible after its mount was frozen (or the pod paused) for longer
    than the lease timeout. The replica must stop taking work at once.
    """


# Names


def replica_name(configured: str) -> str:
    """This replica's name: ``APP_REPLICA_ID``, else the pod's (``HOSTNAME``), made file-safe."""
    name = configured or provenance.host_name()
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")[:200]
    return name or "ingestd"


def valid_replica(name: str) -> bool:
    return bool(_REPLICA.match(name))


def new_token(replica: str) -> str:
    """A fresh owner token for one life of ``replica`` (one process start)."""
    return f"{replica}~{uuid.uuid4().hex[:8]}"


def replica_of(token: str) -> str:
    return token.rpartition("~")[0]


def is_token(name: str) -> bool:
    replica, sep, incarnation = name.rpartition("~")
    return bool(sep and _REPLICA.match(replica) and _INCARNATION.match(incarnation))


def renew_interval(lease_timeout_s: float) -> float:
    """How often the scanner renews its lease and looks for dead owners' files."""
    return min(MAX_RENEW_INTERVAL_S, lease_timeout_s / 10)


def owner_link(claimed: Path) -> Path:
    """The owner link of the claimed file at ``claimed``."""
    return claimed.parent / OWNERS / claimed.name


# Owner links (the uploader's side)


def holder(link: Path) -> str | None:
    """The token ``link`` names, or None if there is no link."""
    try:
        return os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None  # not a symlink: nobody's
        raise


def take(link: Path, me: str) -> bool:
    """Hold ``link`` for ``me``: True if it is now, or already was, ours.

    ``symlink`` creates the link with its content, only if nothing is
    there, in one step on the server: the one lock NFS gives for free.
    """
    for _ in range(3):
        try:
            os.symlink(me, link)
            return True
        except FileExistsError:
            held = holder(link)
            if held is not None:
                return held == me
        except FileNotFoundError:
            # The folder was never made, or an emptied one was just pruned
            # (again, perhaps, while it is made: then the loop tries again).
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(me, link)
    return True


def release(link: Path, me: str) -> None:
    """Remove ``link`` if ``me`` holds it; never another replica's."""
    if holder(link) == me:
        try:
            link.unlink()
        except FileNotFoundError:
            pass


def release_if_unclaimed(link: Path, claimed: Path, me: str) -> None:
    """Drop our link when there is no claimed file for it (the claim did not happen)."""
    if not os.path.lexists(claimed):
        release(link, me)


def give(link: Path, me: str) -> None:
    """Point ``link`` at ``me`` (we are the dead holder's heir): atomic replace."""
    temp = link.with_name(f".{uuid.uuid4().hex}.tmp")  # claimed names never start with "."
    os.symlink(me, temp)
    os.replace(temp, link)


# Leases (the scanner's side)


class Lease:
    """This replica's lease: renewed by the scanner, released at a clean stop."""

    def __init__(self, processing_root: Path, token: str) -> None:
        self.token = token
        self.folder = processing_root / LEASES
        self.path = self.folder / token
        self.heir = self.folder / (token + HEIR)
        self.renewals = 0

    def renew(self) -> None:
        """Write a new content (any change is a sign of life); refuse if we were buried."""
        heir = holder(self.heir)
        if heir is not None:
            raise LeaseLost(
                f"replica {heir!r} took over this replica's files "
                f"(its lease {self.token} had expired)"
            )
        self.renewals += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{self.renewals} {time.time():.3f} {os.getpid()}\n")

    def release(self) -> None:
        """Say we stopped cleanly: survivors take what is left at once, not after the timeout."""
        if holder(self.heir) is None:
            self.path.write_text(RELEASED)


@dataclass
class Registry:
    """What ``.leases`` holds: lease contents by token, and heirs by dead token."""

    leases: dict[str, str | None] = field(default_factory=dict)
    heirs: dict[str, str] = field(default_factory=dict)


def read_registry(processing_root: Path) -> Registry:
    folder = processing_root / LEASES
    registry = Registry()
    try:
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries]
    except FileNotFoundError:
        return registry
    for name in names:
        if name.endswith(HEIR) and is_token(name[: -len(HEIR)]):
            heir = holder(folder / name)
            if heir is not None:
                registry.heirs[name[: -len(HEIR)]] = heir
        elif is_token(name):
            try:
                registry.leases[name] = (folder / name).read_text()
            except FileNotFoundError:
                registry.leases[name] = None
    return registry


def resolve(token: str, heirs: dict[str, str]) -> str:
    """The owner now of files linked to ``token``: follow heir links to the end."""
    for _ in range(MAX_CHAIN):
        if token not in heirs:
            break
        token = heirs[token]
    return token


def inherit(processing_root: Path, dead: str, me: str) -> str:
    """Become ``dead``'s heir unless another replica already is; return the heir."""
    folder = processing_root / LEASES
    link = folder / (dead + HEIR)
    heir = None
    for _ in range(3):
        try:
            os.symlink(me, link)
            heir = me
            break
        except FileExistsError:
            heir = holder(link)  # None: buried meanwhile, try again
            if heir is not None:
                break
    if heir == me:
        (folder / dead).unlink(missing_ok=True)
    return heir or me


class Observer:
    """Which owners are dead, judged by watching their leases change.

    A lease is a sign of life only if it changes. Each observer notes when
    it last saw each lease's content change, on its own monotonic clock;
    no timestamps written by other machines are trusted. A fresh observer
    therefore waits a whole timeout before it calls anyone dead (except a
    released lease, or an earlier life of its own replica).
    """

    def __init__(
        self, me: str, timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.me = me
        self.timeout_s = timeout_s
        self.clock = clock
        self.seen: dict[str, tuple[str | None, float]] = {}

    def update(self, registry: Registry, tokens: set[str]) -> None:
        """Note every lease's content now; ``tokens`` are those that files or heirs name."""
        now = self.clock()
        watched = set(registry.leases) | set(registry.heirs.values()) | tokens
        for token in watched:
            content = registry.leases.get(token)
            old = self.seen.get(token)
            if old is None or old[0] != content:
                self.seen[token] = (content, now)
        for token in set(self.seen) - watched:
            del self.seen[token]

    def expired(self, token: str) -> bool:
        if token == self.me:
            return False
        if replica_of(token) == replica_of(self.me):
            return True  # an earlier life of this replica: that process is gone
        content, since = self.seen.setdefault(token, (None, self.clock()))
        return content == RELEASED or self.clock() - since >= self.timeout_s

    def silent_for(self, token: str) -> float:
        return self.clock() - self.seen.get(token, (None, self.clock()))[1]


# One recovery pass (the scanner's side)


DATE_FOLDER = re.compile(r"^\d{8}$")


@dataclass(frozen=True)
class Claim:
    """A claimed file found in ``.processing``, with the token its owner link names."""

    date: str
    session: str
    name: str
    size: int
    holder: str | None

    def link(self, root: Path) -> Path:
        return root / self.date / self.session / OWNERS / self.name


@dataclass
class PassResult:
    """What one pass found ours to upload, and why."""

    ours: list[Claim] = field(default_factory=list)
    adopted: dict[str, int] = field(default_factory=dict)  # earlier holder -> files taken
    ownerless: int = 0
    buried: list[str] = field(default_factory=list)


def _folders(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _names(path: Path) -> set[str]:
    try:
        with os.scandir(path) as entries:
            return {e.name for e in entries if not e.name.startswith(".")}
    except FileNotFoundError:
        return set()


def list_claims(root: Path, beat: Callable[[], None]) -> tuple[list[Claim], list[Claim]]:
    """Claimed files with their link's token, and links left without a claimed file."""
    claims, stale = [], []
    for date in _folders(root):
        if not DATE_FOLDER.match(date):
            continue
        for session in _folders(root / date):
            folder = root / date / session
            files: dict[str, int] = {}
            with os.scandir(folder) as entries:
                for entry in entries:
                    beat()
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        files[entry.name] = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # finished meanwhile
            links = _names(folder / OWNERS)
            for name, size in files.items():
                held = holder(folder / OWNERS / name) if name in links else None
                claims.append(Claim(date, session, name, size, held))
            for name in links - files.keys():
                held = holder(folder / OWNERS / name)
                if held is not None:
                    stale.append(Claim(date, session, name, 0, held))
    return claims, stale


class Recovery:
    """Finds the claimed files this replica must upload: its own, and dead owners'."""

    def __init__(self, root: Path, me: str, observer: Observer) -> None:
        self.root = root
        self.me = me
        self.observer = observer

    def run(self, start: bool, beat: Callable[[], None]) -> PassResult:
        """One pass over ``.processing``.

        At a scanner start (``start``) every file this replica holds is
        reported (the parent drops those already queued or in flight);
        later passes report only what they take over, so they never repeat
        work this replica is doing.
        """
        registry = read_registry(self.root)
        claims, stale = list_claims(self.root, beat)
        named = {c.holder for c in claims + stale if c.holder}
        self.observer.update(registry, named)
        heirs = dict(registry.heirs)
        result = PassResult()
        for claim in claims:
            beat()
            self._settle(claim, start, heirs, result)
        for claim in stale:
            held = claim.holder  # never None: a stale claim is listed by its link's holder
            if held is not None and held != self.me and self._owner(held, heirs) == self.me:
                release(claim.link(self.root), held)  # a dead owner's leftover link
        self._bury(registry, heirs, named - {c.holder for c in stale}, result)
        return result

    def _settle(self, claim: Claim, start: bool, heirs: dict[str, str], result: PassResult) -> None:
        link = claim.link(self.root)
        if claim.holder is None:
            if take(link, self.me):  # ownerless: whoever links it first
                result.ours.append(claim)
                result.ownerless += 1
            return
        if self._owner(claim.holder, heirs) != self.me:
            return  # a live replica's, or another survivor's to take
        if claim.holder != self.me:
            give(link, self.me)
            result.ours.append(claim)
            result.adopted[claim.holder] = result.adopted.get(claim.holder, 0) + 1
        elif start:
            result.ours.append(claim)

    def _owner(self, token: str, heirs: dict[str, str]) -> str:
        """Who owns files linked to ``token``; inherits from dead owners on the way."""
        owner = resolve(token, heirs)
        for _ in range(MAX_CHAIN):
            if owner == self.me or not self.observer.expired(owner):
                return owner
            heirs[owner] = inherit(self.root, owner, self.me)
            owner = resolve(token, heirs)
        return owner

    def _bury(
        self, registry: Registry, heirs: dict[str, str], still_named: set[str], result: PassResult
    ) -> None:
        """Remove the leases and heir links of dead owners that no file names any more.

        Pods get new names at every rollout; without this, ``.leases``
        would keep one entry per pod that ever ran. A file relinked in this
        pass still counts as named by its old holder, so that holder's heir
        link goes at the next pass; one removed too early is only inherited
        again (its owner is still dead).
        """
        folder = self.root / LEASES
        for token in registry.leases:
            if (
                token != self.me
                and token not in still_named
                and token not in heirs
                and self.observer.expired(token)
            ):
                heirs[token] = inherit(self.root, token, self.me)
        for token, heir in heirs.items():
            if token in still_named or token == self.me or resolve(token, heirs) != self.me:
                continue
            (folder / token).unlink(missing_ok=True)
            release(folder / (token + HEIR), heir)
            result.buried.append(token)
