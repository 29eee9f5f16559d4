"""The seeded schedule: which writers and faults a run plays, and when.

Every random choice of a run is made here, up front, from
``random.Random(seed)``: the same seed gives the same plan, byte for byte
(``Plan.describe()`` prints it). What cannot be planned is the service's
own timing; choices that depend on it (which child to kill) are stored as a
number in [0, 1) and mapped onto whatever exists at that moment.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB

WRITER_KINDS = ("whole", "slow", "append_after_claim", "rewrite")
FAULT_KINDS = (
    "kill_child",
    "kill_tree",
    "sigterm",
    "freeze",
    "eio",
    "refuse",
    "blackhole",
    "staging_full",
)


@dataclass(frozen=True)
class Writer:
    """One version of one file, written the way ``kind`` says.

    * ``whole``: written under a dot name, renamed into place (atomic).
    * ``slow``: created in place, written in ``pieces`` separated by
      ``pauses`` (some shorter, some longer than the stability window), the
      descriptor open throughout.
    * ``append_after_claim``: ``size`` bytes written in place, descriptor
      kept open until the file leaves incoming (claimed) or ``wait_s``
      passes, then ``delay_s`` more, then the ``pieces`` appended through
      the same descriptor, ``pauses`` apart (a writer that keeps going
      across the copy, the upload and the cleanup): the writer of fix 1.
    * ``rewrite``: a new version of an earlier writer's name (``after``),
      ``delay_s`` after that one finished, renamed into place over it.
    """

    index: int
    kind: str
    name: str
    at_s: float
    size: int
    pieces: tuple[int, ...] = ()
    pauses: tuple[float, ...] = ()
    wait_s: float = 0.0
    delay_s: float = 0.0
    after: int | None = None
    content_seed: int = 0


@dataclass(frozen=True)
class Fault:
    """One fault, applied at ``at_s`` and cleared ``duration_s`` later (faults never overlap)."""

    kind: str
    at_s: float
    duration_s: float
    pick: float
    replica: int


@dataclass(frozen=True)
class Plan:
    seed: int
    duration_s: float
    replicas: int
    small_staging: bool
    session_switches: tuple[float, ...]
    writers: tuple[Writer, ...]
    faults: tuple[Fault, ...]
    settings: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [
            f"seed {self.seed}: {self.duration_s:.0f} s, {self.replicas} replica(s), "
            f"staging {'small tmpfs' if self.small_staging else 'local folder'}, "
            f"session switches at {[round(t, 1) for t in self.session_switches]}"
        ]
        for w in self.writers:
            lines.append(
                f"  writer {w.index:3d} {w.kind:19s} {w.name:24s} at {w.at_s:5.1f} s "
                f"size {w.size} pieces {len(w.pieces)} pauses "
                f"{[round(p, 2) for p in w.pauses]}"
            )
        for f in self.faults:
            lines.append(
                f"  fault {f.kind:13s} at {f.at_s:5.1f} s for {f.duration_s:4.1f} s "
                f"replica {f.replica} pick {f.pick:.2f}"
            )
        return "\n".join(lines)


STABILITY_S = 1.2
"""About how long a file must sit unchanged before it is taken, with the
settings the runner uses (min age 0.5 s, two polls 0.3 s apart, plus scan
time). Pauses are drawn on both sides of it."""


def file_size(rng: random.Random, big: bool) -> int:
    """Mostly small; some empty; some several blocks; with ``big`` a few hundred MiB."""
    roll = rng.random()
    if roll < 0.08:
        return 0
    if roll < 0.70:
        return rng.randint(1, 256 * KiB)
    if roll < 0.93:
        return rng.randint(256 * KiB, 3 * MiB)
    if roll < 0.99 or not big:
        return rng.randint(4 * MiB, 24 * MiB)
    return rng.randint(100 * MiB, 300 * MiB)


def make_writers(
    rng: random.Random, duration_s: float, count: int, big: bool, append_writers: int
) -> list[Writer]:
    writers: list[Writer] = []
    for index in range(count):
        kind = rng.choices(("whole", "slow", "rewrite"), weights=(6, 3, 2))[0]
        at_s = rng.uniform(0, duration_s * 0.8)
        if kind == "rewrite" and writers:
            earlier = rng.choice(writers)
            writers.append(
                Writer(
                    index,
                    "rewrite",
                    earlier.name,
                    max(at_s, earlier.at_s),
                    file_size(rng, big),
                    delay_s=rng.uniform(0, 4),
                    after=earlier.index,
                    content_seed=rng.getrandbits(32),
                )
            )
            continue
        kind = "slow" if kind == "slow" else "whole"
        size = file_size(rng, big)
        name = f"f{index:03d}-{kind}.bin"
        if kind == "whole":
            writers.append(Writer(index, kind, name, at_s, size, content_seed=rng.getrandbits(32)))
            continue
        pieces = _split(rng, size, rng.randint(2, 5))
        pauses = tuple(
            rng.choice(
                (
                    rng.uniform(0.05, STABILITY_S * 0.5),
                    rng.uniform(STABILITY_S * 1.5, STABILITY_S * 3),
                )
            )
            for _ in pieces[1:]
        )
        writers.append(
            Writer(
                index,
                kind,
                name,
                at_s,
                size,
                pieces=pieces,
                pauses=pauses,
                content_seed=rng.getrandbits(32),
            )
        )
    for extra in range(append_writers):
        index = count + extra
        writers.append(
            Writer(
                index,
                "append_after_claim",
                f"f{index:03d}-append.bin",
                rng.uniform(0, duration_s * 0.6),
                rng.randint(8 * MiB, 40 * MiB),
                pieces=tuple(rng.randint(1, 256 * KiB) for _ in range(rng.randint(8, 20))),
                pauses=tuple(rng.uniform(0.02, 0.15) for _ in range(20)),
                wait_s=STABILITY_S * 8,
                delay_s=rng.uniform(0, 0.5),
                content_seed=rng.getrandbits(32),
            )
        )
    return sorted(writers, key=lambda w: (w.at_s, w.index))


def _split(rng: random.Random, size: int, parts: int) -> tuple[int, ...]:
    cuts = sorted(rng.randint(0, size) for _ in range(parts - 1))
    bounds = [0, *cuts, size]
    return tuple(b - a for a, b in itertools.pairwise(bounds))


def make_faults(
    rng: random.Random, duration_s: float, replicas: int, small_staging: bool
) -> list[Fault]:
    """Faults one after another, with quiet gaps, until ``duration_s``."""
    kinds = [k for k in FAULT_KINDS if small_staging or k != "staging_full"]
    faults: list[Fault] = []
    at_s = rng.uniform(1, 3)
    while at_s < duration_s:
        kind = rng.choice(kinds)
        duration = {
            "freeze": rng.uniform(1, 6),
            "eio": rng.uniform(0.5, 3),
            "refuse": rng.uniform(1, 6),
            "blackhole": rng.uniform(1, 6),
            "staging_full": rng.uniform(1, 5),
        }.get(kind, rng.uniform(0, 1.5))
        faults.append(Fault(kind, at_s, duration, rng.random(), rng.randrange(replicas)))
        at_s += duration + rng.uniform(1, 4)
    return faults


def make_plan(
    seed: int,
    duration_s: float = 25.0,
    writers: int = 30,
    big: bool = False,
    append_writers: int = 2,
) -> Plan:
    """The whole schedule of one seed."""
    rng = random.Random(seed)
    replicas = 2 if rng.random() < 0.35 else 1
    small_staging = rng.random() < 0.4
    switches = tuple(
        sorted(
            rng.uniform(duration_s * 0.2, duration_s * 0.9) for _ in range(rng.choice((0, 1, 1, 2)))
        )
    )
    return Plan(
        seed=seed,
        duration_s=duration_s,
        replicas=replicas,
        small_staging=small_staging,
        session_switches=switches,
        writers=tuple(make_writers(rng, duration_s, writers, big, append_writers)),
        faults=tuple(make_faults(rng, duration_s, replicas, small_staging)),
        settings={
            "APP_WORKER_CONCURRENCY": str(rng.choice((1, 2, 3))),
            "APP_MAX_ATTEMPTS": str(rng.choice((3, 5))),
        },
    )
