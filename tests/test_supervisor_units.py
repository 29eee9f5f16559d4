"""The supervisor's decisions, with fake children: no process starts.

The end-to-end tests prove these behaviours against real children on a real
(freezable) mount; here each decision is driven on its own, with a clock the
test sets, the way uvicorn tests its supervisor with a fake process handle:
dispatch, stall (kill and replace), respawn with back-off, the bound on
children stuck in the kernel, and the drain at shutdown.

``FakeChild`` stands in for ``ingestd.childhandle.ChildProcess``: it records what
the supervisor sends it and lets the test decide when it exits, stalls or
is reaped. The tests call the loop's steps (``_check_children``,
``_dispatch``, ...) with an explicit ``now`` instead of running the thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ingestd.supervisor as supervisor_module
from ingestd.config import Settings
from ingestd.messages import Beat, ChildState, Claimed, Done, Job, Stop
from ingestd.status import health
from ingestd.supervisor import REAP_GRACE_S, Supervisor

STALL_S = 5.0
_pids = itertools.count(40_000)


class FakeChild:
    """A child handle that never runs anything: the test plays the process."""

    def __init__(self, role: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.role = role
        self.target = target
        self.args = args
        self.pid = next(_pids)
        self.conn: object | None = object()  # only compared and tested for None
        self.started = time.monotonic()
        self.killed_at: float | None = None
        self.exitcode: int | None = None
        self.sent: list[object] = []
        self.refuse_sends = False
        self.released = False

    # what the supervisor calls
    def exited(self) -> bool:
        return self.exitcode is not None

    def send(self, message: object) -> bool:
        if self.conn is None or self.refuse_sends:
            return False
        self.sent.append(message)
        return True

    def close_pipe(self) -> None:
        self.conn = None

    def kill(self) -> None:
        self.close_pipe()
        if self.killed_at is None:
            self.killed_at = time.monotonic()

    def release(self) -> None:
        assert self.exited(), "released before it was reaped"
        self.released = True

    # what the test plays
    def exit(self, code: int = 1) -> None:
        """The process ended and ``waitpid`` reaped it."""
        self.exitcode = code
        self.close_pipe()

    @property
    def killed(self) -> bool:
        return self.killed_at is not None


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[FakeChild]:
    """Every child the supervisor "starts", in order."""
    made: list[FakeChild] = []

    def make(role: str, target: Callable[..., None], args: tuple[Any, ...]) -> FakeChild:
        child = FakeChild(role, target, args)
        made.append(child)
        return child

    monkeypatch.setattr(supervisor_module, "ChildProcess", make)
    return made


SupervisorFactory = Callable[..., Supervisor]


@pytest.fixture
def make_supervisor(children: list[FakeChild]) -> Iterator[SupervisorFactory]:
    """``make_supervisor(**settings)``: a Supervisor whose slots hold fake children.

    Started without its thread: the test runs the loop's steps itself.
    """

    def make(**overrides: Any) -> Supervisor:
        settings = Settings(
            azure_account_url="https://127.0.0.1:9/devstoreaccount1",
            azure_container="c",
            worker_concurrency=overrides.pop("worker_concurrency", 2),
            child_stall_timeout_s=STALL_S,
            **overrides,
        )
        sup = Supervisor(settings, "test")
        with sup.lock:
            for slot in sup.slots:
                sup._spawn(slot)
        sup.recovery_done = True
        return sup

    yield make


def job(name: str) -> Job:
    return Job(name=name, date="20250101", session="s", seen=(1, 1))


def uploader(sup: Supervisor, index: int) -> FakeChild:
    child = sup.slots[index].child
    assert isinstance(child, FakeChild)
    return child


# ---------------------------------------------------------------------- dispatch


def test_dispatch_gives_each_idle_uploader_one_job(make_supervisor: SupervisorFactory) -> None:
    sup = make_supervisor(worker_concurrency=2)
    for name in ("a", "b", "c"):
        sup.queue.add_new(job(name))
    now = time.monotonic()

    sup._dispatch(now)

    first, second = uploader(sup, 1), uploader(sup, 2)
    assert [m.name for m in first.sent if isinstance(m, Job)] == ["a"]
    assert [m.name for m in second.sent if isinstance(m, Job)] == ["b"]
    assert sup.slots[1].state == "claiming" and sup.slots[1].file == "a"
    assert len(sup.queue) == 1, "the third job waits for a free uploader"

    sup._dispatch(now)  # both busy: nothing more is sent
    assert sum(isinstance(m, Job) for m in first.sent + second.sent) == 2

    sup._handle(sup.slots[1], Done(sup.slots[1].job, 1, "md5", 0.1, 0.1), now)
    sup._dispatch(now)
    assert [m.name for m in first.sent if isinstance(m, Job)] == ["a", "c"]


def test_an_idle_beat_sent_before_the_job_arrived_does_not_hide_the_job(
    make_supervisor: SupervisorFactory,
) -> None:
    """The child beat "idle" just as the job was sent: applied after the dispatch,
    it must not make a claiming uploader look idle (and fileless) until its next
    beat, which never comes if its claim is stuck in a frozen mount. It still
    counts as a sign of life."""
    sup = make_supervisor(worker_concurrency=1)
    sup.queue.add_new(job("a"))
    now = time.monotonic()
    sup._dispatch(now)
    sup._handle(sup.slots[1], Beat(ChildState.IDLE), now + 0.5)
    assert sup.slots[1].state == ChildState.CLAIMING and sup.slots[1].file == "a"
    assert sup.slots[1].last_beat == now + 0.5

    sup._handle(sup.slots[1], Done(sup.slots[1].job, 1, "md5", 0.1, 0.1), now + 1)
    sup._handle(sup.slots[1], Beat(ChildState.IDLE), now + 1)  # after its result: idle
    assert sup.slots[1].state == ChildState.IDLE and sup.slots[1].file is None


def test_no_dispatch_before_recovery_or_while_draining(
    make_supervisor: SupervisorFactory,
) -> None:
    sup = make_supervisor(worker_concurrency=1)
    sup.queue.add_new(job("a"))
    now = time.monotonic()

    sup.recovery_done = False  # recovered files go first: wait for the scanner's list
    sup._dispatch(now)
    assert uploader(sup, 1).sent == []

    sup.recovery_done = True
    sup.begin_drain()
    sup._dispatch(now)
    assert uploader(sup, 1).sent == []
    assert len(sup.queue) == 1


def test_a_job_the_child_cannot_take_goes_back_to_the_queue(
    make_supervisor: SupervisorFactory,
) -> None:
    sup = make_supervisor(worker_concurrency=1)
    sup.queue.add_new(job("a"))
    uploader(sup, 1).refuse_sends = True  # its pipe broke

    sup._dispatch(time.monotonic())

    assert sup.slots[1].job is None
    assert len(sup.queue) == 1


# ------------------------------------------------------------------------- stall


def test_a_silent_child_is_killed_replaced_and_its_job_retried(
    make_supervisor: SupervisorFactory, children: list[FakeChild]
) -> None:
    sup = make_supervisor(worker_concurrency=2)
    sup.queue.add_new(job("a"))
    start = time.monotonic()
    sup._dispatch(start)
    silent, beating = uploader(sup, 1), uploader(sup, 2)
    made = len(children)

    later = start + STALL_S + 0.1
    sup._handle(sup.slots[2], Beat(ChildState.IDLE), later)  # the other one keeps beating
    sup._handle(sup.slots[0], Beat(ChildState.IDLE), later)
    sup._check_children(later)

    assert silent.killed and silent in sup.stuck
    assert not beating.killed
    replacement = uploader(sup, 1)
    assert replacement is not silent and len(children) == made + 1
    assert sup.stats.kills["uploader"] == 1 and sup.slots[1].restarts == 1
    assert sup.slots[1].stalled_since is not None, "liveness still sees the stall"
    # The file was handed out but never reported claimed: the retry looks in
    # .processing before it claims, and it waits a moment.
    assert sup.queue.take(later) is None
    retried = sup.queue.take(later + 1.0)
    assert retried is not None and retried.name == "a" and retried.maybe_claimed


def test_a_child_that_beats_within_the_stall_timeout_is_left_alone(
    make_supervisor: SupervisorFactory, children: list[FakeChild]
) -> None:
    sup = make_supervisor(worker_concurrency=1)
    start = time.monotonic()
    for step in range(1, 6):  # beats every STALL_S - 1 s, for five periods
        now = start + step * (STALL_S - 1)
        for slot in sup.slots:
            sup._handle(slot, Beat(ChildState.IDLE), now)
        sup._check_children(now)
    assert not any(c.killed for c in children) and len(children) == 2


def test_a_claimed_job_of_a_stalled_child_is_retried_as_claimed(
    make_supervisor: SupervisorFactory,
) -> None:
    sup = make_supervisor(worker_concurrency=1)
    sup.queue.add_new(job("a"))
    start = time.monotonic()
    sup._dispatch(start)
    sup._handle(sup.slots[1], Claimed(job("a").key), start)

    later = start + STALL_S + 0.1
    sup._handle(sup.slots[0], Beat(ChildState.IDLE), later)
    sup._check_children(later)

    retried = sup.queue.take(later + 1.0)
    assert retried is not None and retried.claimed and not retried.maybe_claimed


# ----------------------------------------------------------------------- respawn


def test_an_exited_child_is_respawned_with_growing_back_off(
    make_supervisor: SupervisorFactory, children: list[FakeChild]
) -> None:
    sup = make_supervisor(worker_concurrency=1)
    now = time.monotonic()
    delays = []
    for _ in range(4):
        dying = uploader(sup, 1)
        dying.exit(1)  # died at once: a quick death
        sup._check_children(now)
        assert dying.released and sup.slots[1].child is None
        delays.append(sup.slots[1].respawn_at - now)
        sup._check_children(sup.slots[1].respawn_at - 0.01)
        assert sup.slots[1].child is None, "respawned before its back-off"
        now = sup.slots[1].respawn_at
        sup._check_children(now)
        assert sup.slots[1].child is not None
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert sup.slots[1].restarts == 4 and sup.stats.restarts["uploader"] == 4


def test_a_child_that_lived_a_while_is_respawned_at_once(
    make_supervisor: SupervisorFactory,
) -> None:
    sup = make_supervisor(worker_concurrency=1)
    old = uploader(sup, 1)
    old.started -= 60  # ran for a minute, then exited
    old.exit(0)
    sup._check_children(time.monotonic())
    assert sup.slots[1].child is not None and sup.slots[1].child is not old


def test_a_quick_death_back_off_is_capped(make_supervisor: SupervisorFactory) -> None:
    sup = make_supervisor(worker_concurrency=1)
    sup.slots[1].quick_deaths = 20
    now = time.monotonic()
    uploader(sup, 1).exit(1)
    sup._check_children(now)
    assert sup.slots[1].respawn_at - now == supervisor_module.MAX_RESPAWN_DELAY_S


# ------------------------------------------------------------------- stuck bound


def stall_all(sup: Supervisor, now: float) -> None:
    """Every child stops beating; the loop runs once at ``now``."""
    for slot in sup.slots:
        slot.last_beat = now - STALL_S - 0.1
    sup._check_children(now)


def test_no_more_children_past_the_stuck_bound_until_they_are_reaped(
    make_supervisor: SupervisorFactory, children: list[FakeChild]
) -> None:
    """Killed children the kernel keeps count against APP_MAX_STUCK_CHILDREN: past it,
    slots are held back, so the process tree stays within slots + the bound."""
    sup = make_supervisor(worker_concurrency=1, max_stuck_children=2)
    slots, bound = len(sup.slots), 2

    def live() -> int:
        return sum(1 for slot in sup.slots if slot.child is not None)

    now = time.monotonic()
    stall_all(sup, now)  # the scanner is killed and replaced, then the uploader killed
    assert len(sup.stuck) == 2
    assert sup.slots[0].child is not None, "replaced: one unreaped child is under the bound"
    assert sup.slots[1].child is None and sup.slots[1].state == "held"
    assert "stuck in the kernel" in (sup.slots[1].held_back or "")

    now += STALL_S + 0.2
    stall_all(sup, now)  # the replacement scanner stalls too: killed, not replaced
    assert len(sup.stuck) == 3 and live() == 0
    made = len(children)
    sup._check_children(now + 1)
    assert len(children) == made, "held back while the killed ones stay in the kernel"
    assert live() + len(sup.stuck) <= slots + bound
    ok, reason = health(sup.snapshot(now + REAP_GRACE_S + 1))
    assert not ok and "stuck in the kernel" in reason

    for child in sup.stuck[:2]:
        child.exit(-9)  # the kernel let them go (the mount thawed)
    sup._reap_stuck(now + 2)
    assert len(sup.stuck) == 1 and all(c.released for c in children[:2])
    sup._check_children(now + 2)
    assert live() == slots and not any(slot.held_back for slot in sup.slots)
    assert len(children) == made + 2


def test_stuck_counts_only_after_the_reap_grace(make_supervisor: SupervisorFactory) -> None:
    sup = make_supervisor(worker_concurrency=1, max_stuck_children=4)
    now = time.monotonic()
    stall_all(sup, now)
    killed_at = min(c.killed_at for c in sup.stuck if c.killed_at)
    snapshot = sup.snapshot
    assert snapshot(killed_at + REAP_GRACE_S - 0.1).stuck_children == 0, "still dying, not stuck"
    assert snapshot(killed_at + REAP_GRACE_S + 0.1).stuck_children == 2


# ------------------------------------------------------------------------- drain


def test_drain_waits_for_the_upload_in_flight_then_stops_every_child(
    make_supervisor: SupervisorFactory,
) -> None:
    sup = make_supervisor(worker_concurrency=2, shutdown_grace_s=30)
    drained: list[bool] = []
    sup.on_drained = lambda: drained.append(True)
    sup.queue.add_new(job("a"))
    sup.queue.add_new(job("b"))
    sup._dispatch(time.monotonic())
    sup.queue.add_new(job("c"))

    sup.begin_drain()
    now = time.monotonic()
    sup._dispatch(now)
    sup._finish_drain(now)
    assert not sup.drained.is_set(), "two uploads still in flight"

    for index in (1, 2):
        slot = sup.slots[index]
        assert slot.job is not None
        sup._handle(slot, Done(slot.job, 1, "md5", 0.1, 0.1), now)
    uploader(sup, 1).exit(0)  # an uploader that exits while draining is not replaced
    uploader(sup, 1).started -= 60  # (and not for a back-off: it lived a minute)
    sup._check_children(now + 0.1)
    assert sup.slots[1].child is None
    sup._finish_drain(now + 1)

    assert sup.drained.is_set() and drained == [True]
    assert len(sup.queue) == 1, "the queued job was never handed out"
    for slot in (sup.slots[0], sup.slots[2]):
        assert slot.child is not None and isinstance(slot.child.sent[-1], Stop)


def test_drain_gives_up_on_the_upload_in_flight_after_the_grace(
    make_supervisor: SupervisorFactory,
) -> None:
    sup = make_supervisor(worker_concurrency=1, shutdown_grace_s=10)
    sup.queue.add_new(job("a"))
    sup._dispatch(time.monotonic())
    sup.begin_drain()
    deadline = sup.drain_deadline

    sup._finish_drain(deadline - 0.1)
    assert not sup.drained.is_set()
    sup._finish_drain(deadline + 0.1)
    assert sup.drained.is_set()
    assert isinstance(uploader(sup, 1).sent[-1], Stop)
    assert sup.slots[1].job is not None, "it stays in .processing for the next start"
