"""Settings, read once from ``APP_``-prefixed environment variables.

Every knob an operator can turn lives here, with the PRD's defaults. The
parent validates the settings before it serves anything, and hands the same
object to each child process (it pickles), so parent and children can never
disagree about a path or a size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "APP_"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Turn ``8388608``, ``"8MiB"`` or ``"8 MB"`` into a number of bytes.

    Operators copy sizes from the PRD ("8MiB"), so both forms are accepted.
    """
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or e.g. 8MiB, 4MB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


STAGING_COPY_CHUNK = 256 * 1024
"""Bytes per read from NFS while staging (``ingestd.filesteps.COPY_CHUNK``)."""

MIN_TOKEN_LENGTH = 16
"""Shorter API tokens are refused: 16 random characters are beyond guessing."""

ByteSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
OptionalSize = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
"""A size where 0 means "derive it" (see the field's comment)."""

ACCESS_TIERS = ("Hot", "Cool", "Cold", "Archive")
"""The block blob tiers a commit may set (``x-ms-access-tier``), as Azure spells them."""


def parse_access_tier(value: object) -> str | None:
    """``"cool"``, ``"COOL"`` or ``"Cool"`` -> ``"Cool"``; blank -> None (the account default).

    Operators copy tier names from rclone and AzCopy flags in any case; the
    ConfigMap lists every setting, so an empty value must mean "not set".
    """
    if value is None or str(value).strip() == "":
        return None
    by_lower = {tier.lower(): tier for tier in ACCESS_TIERS}
    tier = by_lower.get(str(value).strip().lower())
    if tier is None:
        raise ValueError(
            f"{str(value)!r} is not an access tier: use one of "
            f"{', '.join(ACCESS_TIERS)} (any case), or leave it empty "
            "for the account's default"
        )
    return tier


AccessTier = Annotated[str | None, BeforeValidator(parse_access_tier)]


class Settings(BaseSettings):
    """The service's configuration; see the README for what each one does."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Azure: the two required keys, then the optional fallbacks.
    azure_account_url: str
    azure_container: str
    azure_connection_string: SecretStr | None = None
    azure_account_name: str | None = None
    azure_account_key: SecretStr | None = None
    azure_startup_timeout_s: float = Field(30.0, gt=0)

    # Folders. Incoming, .processing and .failed must share one filesystem so
    # that the claim (a rename) is atomic.
    nfs_incoming_dir: Path = Path("/mnt/nfs/incoming")
    nfs_processing_root: Path = Path("/mnt/nfs/.processing")
    nfs_failed_root: Path = Path("/mnt/nfs/.failed")
    local_staging_root: Path = Path("/mnt/staging")
    # The staging space all uploaders share (bytes). 0: the staging
    # filesystem's whole size, as the scanner measures it at start. The
    # parent dispatches a file only when its reservation (its size, or a
    # window) fits what is left of it (README, "Staging window").
    staging_budget: OptionalSize = 0
    # The most one windowed file holds in staging at a time. 0: the block
    # size x (APP_AZURE_MAX_CONCURRENCY + 2): the blocks being sent, the one
    # being copied, and one ready for the next free block thread.
    staging_window: OptionalSize = 0

    # Scanner.
    poll_interval_s: float = Field(2.0, gt=0)
    min_file_age_s: float = Field(5.0, ge=0)

    # Work queue and uploader processes.
    max_queue_size: int = Field(2000, gt=0)
    worker_concurrency: int = Field(4, gt=0, le=64)
    max_attempts: int = Field(5, gt=0)

    # Upload tuning, passed to the SDK. The PRD's defaults: 8 MiB blocks
    # (blobs up to 390 GiB, at most 50,000 blocks); 16 MiB is a tuning with
    # its figures in bench/RESULTS.md. Memory does not grow with the block
    # size: blocks are streamed from staging, never held whole.
    azure_max_block_size: ByteSize = 8 * 1024**2
    azure_max_single_put_size: ByteSize = 4 * 1024**2
    azure_max_concurrency: int = Field(8, gt=0, le=64)
    # Store the whole file's MD5 on every blob (Content-MD5), as rclone does
    # and azcopy's --put-md5: what downstream tools (rclone check, az storage
    # blob show) verify a blob by. Computed in the copy's single pass; its
    # cost is in bench/RESULTS.md. Each block is MD5-checked by storage
    # either way.
    azure_put_md5: bool = True
    # The tier set when each blob is committed (rclone --azureblob-access-tier,
    # AzCopy --block-blob-tier). None keeps the account's default tier.
    azure_access_tier: AccessTier = None
    # Cap on the pod's total upload rate, MB/s (10^6 bytes/s), shared by every
    # uploader and every parallel block (rclone --bwlimit, AzCopy --cap-mbps).
    # 0 = no cap. POST /v1/limits changes it without a restart.
    azure_max_mbps: float = Field(0.0, ge=0)

    # Supervision.
    child_stall_timeout_s: float = Field(60.0, gt=0)
    liveness_timeout_s: float = Field(300.0, gt=0)

    # Replicas on one share (ingestd.leases). The name this replica's claims
    # are recorded under; empty: the pod's name (HOSTNAME), else the host
    # name. Must differ between replicas running at the same time. A
    # replica whose lease has not changed for lease_timeout_s is taken for
    # dead and its claimed files go to a survivor. Keep it above the time a
    # frozen mount takes to get the pod restarted by its liveness probe
    # (liveness_timeout_s + probe period x failures + termination grace; 480
    # s with the manifests), so a live replica is never taken for dead.
    replica_id: str = ""
    lease_timeout_s: float = Field(600.0, gt=0)
    # At least 1: with 0, no killed child could ever be replaced.
    max_stuck_children: int = Field(8, ge=1)
    shutdown_grace_s: float = Field(120.0, ge=0)
    # How long storage may keep rejecting the credential (401/403, or no
    # token) before the service stops taking work, lets in-flight files
    # settle and exits with code 3. Long enough to ride out a token refresh.
    auth_failure_exit_s: float = Field(300.0, gt=0)

    # HTTP and logs.
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    # The bearer token that POST /v1/... (everything that changes state)
    # requires; unset, the control API is open (and a warning says so when it
    # listens beyond loopback). With api_token_for_reads, /v1/status and
    # /metrics require it too; /healthz and /readyz never do (the kubelet).
    api_token: SecretStr | None = None
    api_token_for_reads: bool = False
    log_format: Literal["json", "text"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Per-session counters kept besides the active session's; older sessions
    # are folded into one aggregate, so /v1/status stays small however many
    # sessions are started.
    session_history: int = Field(100, ge=0, le=10_000)

    # Start watching at boot, so a restarted pod resumes without an API call.
    autostart: bool = False
    autostart_session: str = ""

    @field_validator("api_token", mode="before")
    @classmethod
    def _strip_token(cls, value: object) -> object:
        """A token read from a file (``--from-file``) often ends in a newline."""
        return value.strip() if isinstance(value, str) else value

    @field_validator("api_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        """Refuse a token a guess could find, or one no HTTP header can carry.

        An empty value (a Secret created from the example unchanged) is refused
        too: running unprotected must be a choice, not an accident.
        """
        if value is None:
            return None
        token = value.get_secret_value()
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"must be at least {MIN_TOKEN_LENGTH} characters (e.g. openssl rand -hex 32)"
            )
        if not all("!" <= c <= "~" for c in token):
            raise ValueError("must be printable ASCII without spaces")
        return value

    @field_validator("replica_id")
    @classmethod
    def _check_replica_id(cls, value: str) -> str:
        """It names files on the share and is split from a token at its last ``~``."""
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", value):
            raise ValueError(
                "use letters, digits, '.', '_' and '-' (a pod name), "
                "starting with a letter or digit"
            )
        return value

    @model_validator(mode="after")
    def _lease_outlives_a_stall(self) -> Settings:
        """A stalled scanner is replaced after the stall timeout; its lease must outlast that.

        Only a floor against nonsense: the timeout to choose is far longer
        (see the comment at ``lease_timeout_s`` and docs/operations.md).
        """
        if self.lease_timeout_s <= self.child_stall_timeout_s:
            raise ValueError(
                "APP_LEASE_TIMEOUT_S must be more than APP_CHILD_STALL_TIMEOUT_S:"
                " a scanner killed for a stall must be replaced (and renew the "
                "lease) before its replica is taken for dead"
            )
        return self

    @model_validator(mode="after")
    def _reads_need_a_token(self) -> Settings:
        if self.api_token_for_reads and self.api_token is None:
            raise ValueError("APP_API_TOKEN_FOR_READS=true needs APP_API_TOKEN")
        return self

    def staging_window_bytes(self) -> int:
        """The window one file too large to stage whole may hold in staging.

        ``APP_STAGING_WINDOW``, or by default block size x (concurrency + 2),
        and never less than one block and one copy chunk, without which the
        copy could not finish a block for the upload to release.
        """
        block = self.azure_max_block_size
        window = self.staging_window or block * (self.azure_max_concurrency + 2)
        return max(window, block + STAGING_COPY_CHUNK)

    def secrets(self) -> list[str]:
        """The secret values configured, for the log redactor."""
        values = [self.azure_connection_string, self.azure_account_key, self.api_token]
        secrets = [v.get_secret_value() for v in values if v is not None]
        return [s for s in secrets if s]


class ConfigError(Exception):
    """The environment does not describe a runnable service."""


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings() -> Settings:
    """Read the settings from the environment, or explain what is wrong.

    pydantic's own message names Python fields; an operator reads variable
    names, so missing and invalid keys are reported as ``APP_...`` names.
    Secret values are never echoed back.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    missing = [env_name(str(e["loc"][0])) for e in exc.errors() if e["type"] == "missing"]
    # An error of the whole model (a rule across settings) has no field; its
    # message names the variables itself.
    invalid = [
        f"{env_name(str(e['loc'][0]))}: {e['msg']}" if e["loc"] else e["msg"]
        for e in exc.errors()
        if e["type"] != "missing"
    ]
    parts = []
    if missing:
        parts.append("missing required configuration: " + ", ".join(missing))
    if invalid:
        parts.append("invalid configuration: " + "; ".join(invalid))
    return ". ".join(parts)
