"""Network guard: tests may talk to loopback only, and must fail loudly otherwise.

Why: the workplace flags any traffic beyond loopback, and DefaultAzureCredential
left unconfigured probes IMDS at 169.254.169.254. A test that reaches out must
fail, even when the code under test swallows the error and retries.

How: ``install()`` wraps ``socket.socket.connect``, ``connect_ex``, ``sendto``
and ``sendmsg`` (``socket.create_connection``, ``ssl`` sockets, urllib3,
requests and asyncio all go through these). An AF_INET/AF_INET6 destination
that is not a loopback IP or the literal name ``localhost`` is refused
*before* the real call, so no packet and no DNS lookup happens: the socket is
closed, the violation recorded and ``NetworkGuardViolation`` raised (a
RuntimeError, so ``except OSError`` retry loops do not swallow it). AF_UNIX
and every other family pass (multiprocessing, FUSE control, netlink).

As a pytest plugin (``pytest_plugins = ["tests.support.netguard"]``) it is
installed at configure time (so collection and session fixtures are guarded
too), a test whose call phase recorded a violation fails even if the code
caught the exception, and violations outside tests fail the session.

Child processes are not covered by the in-process patch. For them:
* ``child_env(extra)`` builds an environment from ``os.environ`` minus every
  variable that selects an identity source or a proxy, plus ``extra``, and
  checks it with ``assert_no_imds``;
* with ``guard_dir=`` it also puts a ``sitecustomize.py`` on ``PYTHONPATH``
  that installs this same guard in the child (Python children only) and
  logs violations to a file the ``netguard_child_env`` fixture checks.

Which variables keep a child (DefaultAzureCredential, azure-identity 1.27)
away from IMDS, read in its source:
* ``AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential`` - only MI in the chain,
  and its IMDS probe off; workload identity is then *excluded* (an MI with only
  AKS workload-identity vars would fall back to IMDS), so also:
* ``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER`` (both; loopback URL) and no
  ``IDENTITY_SERVER_THUMBPRINT`` -> App Service source, only that URL is called.
  ``IDENTITY_ENDPOINT`` alone (without the header, without ``IMDS_ENDPOINT``)
  silently means IMDS.
* for ``AZURE_TOKEN_CREDENTIALS=WorkloadIdentityCredential`` or
  ``EnvironmentCredential``: ``AZURE_AUTHORITY_HOST`` on loopback.
* no ``HTTP(S)_PROXY``/``ALL_PROXY`` pointing off the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOG_ENV = "INGESTD_NETGUARD_LOG"
# Set by the child sitecustomize: load the guard without importing pytest.
_CHILD_FLAG = "_INGESTD_NETGUARD_CHILD"
_INET_FAMILIES = {socket.AF_INET, socket.AF_INET6}
_LOCAL_NAMES = {"localhost"}


class NetworkGuardViolation(RuntimeError):
    """A connect/send to a non-loopback address was refused by the test guard."""


@dataclass(frozen=True)
class Violation:
    """One refused attempt: where to, how, and from which code."""

    operation: str
    family: str
    address: str
    thread: str
    at: float
    stack: str
    pid: int

    def __str__(self) -> str:
        return (
            f"{self.operation} to {self.address} "
            f"({self.family}, pid {self.pid}, thread {self.thread})"
        )


def is_loopback_host(host: Any) -> bool:
    """True for a loopback IP literal (127/8, ::1, ::ffff:127.x) or 'localhost'.

    Hostnames other than 'localhost' are refused without resolving them, so
    the guard itself never causes a DNS query.
    """
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    host = host.strip("[]").split("%", 1)[0]
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _is_allowed(sock: socket.socket, address: Any) -> bool:
    if sock.family not in _INET_FAMILIES:
        return True  # AF_UNIX, AF_NETLINK, ...: local by construction
    if not isinstance(address, tuple) or not address:
        return False
    return is_loopback_host(address[0])


class TripwireError(AssertionError):
    """The guard let a non-loopback call reach the real socket (caught by ``tripwire``)."""


_GUARDED = ("connect", "connect_ex", "sendto", "sendmsg")


def _destination(operation: str, args: tuple[Any, ...]) -> Any:
    """The address argument of a guarded call, or None for a connected-socket send."""
    if operation in ("connect", "connect_ex"):
        return args[0] if args else None
    if operation == "sendto":
        return args[-1] if len(args) >= 2 else None
    return args[3] if len(args) >= 4 else None  # sendmsg(buffers, ancdata, flags, address)


class NetGuard:
    """Process-wide socket patch; one instance per process (``GUARD``)."""

    def __init__(self, log_path: str | None = None) -> None:
        self._lock = threading.Lock()
        self._violations: list[Violation] = []
        self._expecting = 0
        self._expected: list[Violation] = []
        self._originals: dict[str, Callable[..., Any]] = {}
        self._wrappers: dict[str, Callable[..., Any]] = {}
        self.log_path = log_path

    @property
    def installed(self) -> bool:
        """True while *our* wrappers are the methods on ``socket.socket``."""
        return bool(self._wrappers) and all(
            getattr(socket.socket, name) is func for name, func in self._wrappers.items()
        )

    @property
    def violations(self) -> list[Violation]:
        """Unexpected violations so far (the ones that fail tests)."""
        with self._lock:
            return list(self._violations)

    def take_violations(self, since: int = 0) -> list[Violation]:
        """Return and forget the unexpected violations from index ``since`` on."""
        with self._lock:
            taken = self._violations[since:]
            del self._violations[since:]
            return taken

    @contextlib.contextmanager
    def expect_violations(self) -> Iterator[list[Violation]]:
        """Mark violations inside the block as expected (for tests of the guard).

        They are still refused; they are collected into the yielded list
        instead of failing the test.
        """
        caught: list[Violation] = []
        with self._lock:
            self._expecting += 1
            start = len(self._expected)
        try:
            yield caught
        finally:
            with self._lock:
                self._expecting -= 1
                caught.extend(self._expected[start:])
                del self._expected[start:]

    @contextlib.contextmanager
    def tripwire(self) -> Iterator[None]:
        """Make the *real* socket calls refuse non-loopback too, for testing the guard safely.

        Why: a test that proves the guard refuses 169.254.169.254 must not
        send a packet if the guard is broken. Inside this block a call that
        slips past the guard raises TripwireError instead of reaching the
        network.
        """
        self.install()
        saved = dict(self._originals)

        def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
            def checked(sock: socket.socket, *args: Any) -> Any:
                address = _destination(name, args)
                if address is not None and not _is_allowed(sock, address):
                    with contextlib.suppress(OSError):
                        sock.close()
                    raise TripwireError(f"guard let {name} to {address!r} through")
                return real(sock, *args)

            return checked

        self._originals = {name: wrap(name, real) for name, real in saved.items()}
        try:
            yield
        finally:
            self._originals = saved

    def _refuse(self, sock: socket.socket, operation: str, address: Any) -> None:
        violation = Violation(
            operation=operation,
            family=getattr(sock.family, "name", str(sock.family)),
            address=repr(address),
            thread=threading.current_thread().name,
            at=time.time(),
            stack="".join(traceback.format_stack(limit=25)[:-3]),
            pid=os.getpid(),
        )
        with self._lock:
            (self._expected if self._expecting else self._violations).append(violation)
        self._log(violation)
        with contextlib.suppress(OSError):
            sock.close()
        raise NetworkGuardViolation(
            f"network guard: {operation} to {address!r} refused; tests may reach loopback only"
        )

    def _log(self, violation: Violation) -> None:
        if not self.log_path:
            return
        with contextlib.suppress(OSError), open(self.log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(violation.__dict__) + "\n")

    def _make_wrapper(self, name: str) -> Callable[..., Any]:
        guard = self

        def guarded(sock: socket.socket, *args: Any) -> Any:
            address = _destination(name, args)
            if not (address is None and name in ("sendto", "sendmsg")) and not _is_allowed(
                sock, address
            ):
                guard._refuse(sock, name, address)
            return guard._originals[name](sock, *args)

        guarded.__name__ = guarded.__qualname__ = name
        guarded.__doc__ = f"socket.{name} guarded by tests/support/netguard.py (loopback only)"
        return guarded

    def install(self) -> None:
        """Patch ``socket.socket`` (again, if something restored the originals); idempotent.

        The plugin calls it at the start of every test phase, so a plugin or
        a monkeypatch that put the real methods back is undone at once. This
        guard is the suite's only one (it replaced pytest-socket, which
        covered ``connect`` alone and lifted itself before fixture teardown).
        """
        if self.installed:
            return
        if not self._originals:
            self._originals = {name: getattr(socket.socket, name) for name in _GUARDED}
            self._wrappers = {name: self._make_wrapper(name) for name in _GUARDED}
        for name, func in self._wrappers.items():
            setattr(socket.socket, name, func)

    def uninstall(self) -> None:
        if not self._wrappers:
            return
        for name, func in self._originals.items():
            setattr(socket.socket, name, func)
        self._wrappers = {}
        self._originals = {}


GUARD = NetGuard()


def install() -> NetGuard:
    """Install the process-wide guard (used by the plugin and by child sitecustomize)."""
    GUARD.install()
    return GUARD


# --------------------------------------------------------- child processes
_IDENTITY_SOURCE_VARS = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_TOKEN_CREDENTIALS",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
)
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _url_is_loopback(url: str) -> bool:
    try:
        return is_loopback_host(urlsplit(url).hostname or "")
    except ValueError:
        return False


def imds_risks(env: Mapping[str, str]) -> list[str]:
    """Reasons why a child with ``env`` could leave loopback for a token.

    Empty list = DefaultAzureCredential (azure-identity 1.27) in that child
    talks only to loopback. Models the chain selection in
    ``DefaultAzureCredential.__init__`` and ``ManagedIdentityCredential``.
    """
    risks: list[str] = []
    selected = env.get("AZURE_TOKEN_CREDENTIALS", "").strip().lower()
    if not selected:
        risks.append(
            "AZURE_TOKEN_CREDENTIALS unset: the full chain runs (developer credentials, IMDS probe)"
        )
    elif selected == "dev":
        risks.append(
            "AZURE_TOKEN_CREDENTIALS=dev: developer credentials (Azure CLI etc.) may go online"
        )
    uses_mi = selected in ("", "prod", "managedidentitycredential")
    uses_env_or_wi = selected in ("", "prod", "environmentcredential", "workloadidentitycredential")
    if uses_mi:
        endpoint, header = env.get("IDENTITY_ENDPOINT"), env.get("IDENTITY_HEADER")
        msi = env.get("MSI_ENDPOINT")
        if endpoint and header:
            if not _url_is_loopback(endpoint):
                risks.append(f"IDENTITY_ENDPOINT={endpoint} is not loopback")
        elif endpoint and env.get("IMDS_ENDPOINT"):
            if not (_url_is_loopback(endpoint) and _url_is_loopback(env["IMDS_ENDPOINT"])):
                risks.append("Azure Arc endpoints are not loopback")
        elif msi:
            if not _url_is_loopback(msi):
                risks.append(f"MSI_ENDPOINT={msi} is not loopback")
        else:
            wi = all(
                env.get(v)
                for v in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE")
            )
            if selected == "managedidentitycredential" or not wi:
                pod_host = env.get("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://169.254.169.254")
                if not _url_is_loopback(pod_host):
                    risks.append(
                        "managed identity has no loopback source (IDENTITY_ENDPOINT+"
                        f"IDENTITY_HEADER both needed): it would call IMDS at {pod_host}"
                    )
    if uses_env_or_wi:
        wants_authority = any(
            env.get(v)
            for v in (
                "AZURE_CLIENT_SECRET",
                "AZURE_CLIENT_CERTIFICATE_PATH",
                "AZURE_USERNAME",
                "AZURE_FEDERATED_TOKEN_FILE",
            )
        )
        authority = env.get("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com")
        if wants_authority and not _url_is_loopback(authority):
            risks.append(f"Environment/WorkloadIdentity credential would call {authority}")
    for name in _PROXY_VARS:
        value = env.get(name)
        if value and not _url_is_loopback(value):
            risks.append(f"{name}={value} sends HTTP through a non-loopback proxy")
    return risks


def assert_no_imds(env: Mapping[str, str]) -> None:
    """Fail if a child process with ``env`` could reach IMDS or any off-box endpoint."""
    risks = imds_risks(env)
    if risks:
        raise AssertionError("child environment is not offline-safe:\n  " + "\n  ".join(risks))


_SITECUSTOMIZE = '''\
"""Installed by tests/support/netguard.py: loopback-only sockets in this child."""
import importlib.util as _u, sys as _s
_spec = _u.spec_from_file_location("_ingestd_netguard", {path!r})
_mod = _u.module_from_spec(_spec)
_s.modules["_ingestd_netguard"] = _mod
import os as _o
_o.environ["{flag}"] = "1"
try:
    _spec.loader.exec_module(_mod)
finally:
    _o.environ.pop("{flag}", None)
_mod.GUARD.log_path = {log!r}
_mod.install()
'''


def child_env(
    extra: Mapping[str, str] | None = None,
    *,
    base: Mapping[str, str] | None = None,
    guard_dir: Path | None = None,
) -> dict[str, str]:
    """Environment for a child (the real service): scrubbed, ``extra`` applied, checked.

    ``guard_dir``: also install the socket guard in Python children through a
    ``sitecustomize.py`` there; violations go to ``guard_dir/violations.jsonl``
    (see ``child_violations``).
    """
    env: dict[str, str] = dict(os.environ if base is None else base)
    for name in (*_IDENTITY_SOURCE_VARS, *_PROXY_VARS):
        env.pop(name, None)
    env.update(extra or {})
    if guard_dir is not None:
        guard_dir.mkdir(parents=True, exist_ok=True)
        log = guard_dir / "violations.jsonl"
        (guard_dir / "sitecustomize.py").write_text(
            _SITECUSTOMIZE.format(
                path=str(Path(__file__).resolve()), log=str(log), flag=_CHILD_FLAG
            )
        )
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(guard_dir), env.get("PYTHONPATH", "")) if p
        )
        env[LOG_ENV] = str(log)
    assert_no_imds(env)
    return env


def child_violations(guard_dir: Path) -> list[dict[str, Any]]:
    """Violations that guarded children logged under ``guard_dir``."""
    log = guard_dir / "violations.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------ pytest plugin
if os.environ.get(_CHILD_FLAG) != "1":
    import pytest

    def pytest_configure(config: pytest.Config) -> None:
        install()

    def _fail_on_new(before: int, phase: str) -> None:
        new = GUARD.take_violations(since=before)
        if new:
            details = "\n".join(f"- {v}\n{v.stack}" for v in new)
            raise NetworkGuardViolation(
                f"non-loopback network access during test {phase}:\n{details}"
            )

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
        """Re-install if anything (a plugin, a monkeypatch) restored the real socket methods."""
        install()
        before = len(GUARD.violations)
        result = yield
        _fail_on_new(before, "setup")
        return result

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
        """Fail the test if its body made an unexpected off-loopback attempt, even a caught one."""
        install()
        before = len(GUARD.violations)
        result = yield
        _fail_on_new(before, "call")
        return result

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
        install()
        before = len(GUARD.violations)
        result = yield
        _fail_on_new(before, "teardown")
        return result

    def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
        """Violations outside test bodies (fixtures, collection) fail the run."""
        leftover = GUARD.take_violations()
        if leftover:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            lines = "\n".join(f"  {v}\n{v.stack}" for v in leftover)
            if reporter is not None:
                reporter.write_sep("=", "NETWORK GUARD VIOLATIONS", red=True)
                reporter.write_line(lines)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.fixture
    def netguard() -> NetGuard:
        """The installed guard, e.g. ``with netguard.expect_violations() as caught:``."""
        return install()

    @pytest.fixture
    def netguard_child_env(tmp_path: Path) -> Iterator[Callable[..., dict[str, str]]]:
        """Factory ``make(extra) -> env`` for guarded Python children.

        The test fails on any violation they logged."""
        guard_dir = tmp_path / "netguard-child"

        def make(extra: Mapping[str, str] | None = None, **kwargs: Any) -> dict[str, str]:
            return child_env(extra, guard_dir=guard_dir, **kwargs)

        yield make
        found = child_violations(guard_dir)
        if found:
            pytest.fail(
                "child process attempted non-loopback network access:\n"
                + json.dumps(found, indent=1)
            )
