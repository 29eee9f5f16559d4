"""Run the image's entrypoint the way the container would, without Docker.

No container engine runs here, so the test reproduces what the kubelet does:
the final stage's ENTRYPOINT + CMD (tini, then ingestd), the image's ENV, the
ConfigMap's settings, the fallback Secret, a non-root UID/GID with no passwd
entry, WORKDIR as the working directory, and folders standing in for the
volumes at the ConfigMap's paths. Only what must differ is changed: the
volume paths, the Azurite endpoint, the port, and PATH (the image's venv is
this repo's .venv).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.azurite import Azurite
from tests.support.service import free_port, wait_until, write_random

REPO = Path(__file__).resolve().parents[1]
IMAGE_VENV = Path("/opt/ingestd-image-venv")
"""Built by scripts/test like the Dockerfile's /opt/venv: the system Python
(the image's user could not enter /root, where a pyenv Python lives), the
hash-locked requirements, then the app wheel."""
MiB = 1024 * 1024


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """(instruction, argument) pairs of the last stage, continuations joined."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, argument = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), argument.strip()))
    return stages[-1]


def image_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, argument in stage:
        if instruction == "ENV":
            for pair in shlex.split(argument):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def image_command(stage: list[tuple[str, str]]) -> list[str]:
    import json

    entrypoint = next(a for i, a in stage if i == "ENTRYPOINT")
    command = next(a for i, a in stage if i == "CMD")
    return json.loads(entrypoint) + json.loads(command)


@pytest.fixture
def volumes() -> Iterator[Path]:
    """World-traversable folders (pytest's own tmp is 0700 root) owned by the app user."""
    root = Path(tempfile.mkdtemp(prefix="ingestd-volumes-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
def test_entrypoint_as_non_root_with_image_env_and_configmap_uploads_a_file(
    volumes: Path, azurite: Azurite, azurite_container: str
) -> None:
    stage = final_stage(REPO / "Dockerfile")
    command = image_command(stage)
    assert command[:2] == ["/usr/bin/tini", "--"] and command[2:] == ["ingestd"]
    tini = shutil.which("tini") or "/usr/bin/tini"
    assert os.access(tini, os.X_OK), "tini is installed by scripts/test (apt)"
    assert (IMAGE_VENV / "bin" / "ingestd").exists(), "scripts/test builds .venv-image"
    user = next(a for i, a in stage if i == "USER")
    assert "10001" in user or "APP_UID" in user
    workdir = [a for i, a in stage if i == "WORKDIR"][-1]

    nfs, staging = volumes / "nfs", volumes / "staging"
    for folder in (nfs, nfs / "incoming", staging):
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, 10001, 10001)

    configmap = yaml.safe_load((REPO / "manifests" / "configmap.yaml").read_text())["data"]
    env = {key: str(value) for key, value in configmap.items()}
    env.update(image_env(stage))
    port = free_port()
    env.update(
        {
            # What the volumes and the cluster provide:
            "APP_NFS_INCOMING_DIR": env["APP_NFS_INCOMING_DIR"].replace("/mnt/nfs", str(nfs)),
            "APP_NFS_PROCESSING_ROOT": env["APP_NFS_PROCESSING_ROOT"].replace("/mnt/nfs", str(nfs)),
            "APP_NFS_FAILED_ROOT": env["APP_NFS_FAILED_ROOT"].replace("/mnt/nfs", str(nfs)),
            "APP_LOCAL_STAGING_ROOT": str(staging),
            "APP_AZURE_ACCOUNT_URL": azurite.account_url,
            "APP_AZURE_CONTAINER": azurite_container,
            "APP_AZURE_CONNECTION_STRING": azurite.connection_string,  # from the Secret
            "APP_HTTP_HOST": "127.0.0.1",
            "APP_HTTP_PORT": str(port),
            "APP_AUTOSTART": "true",
            "APP_AUTOSTART_SESSION": "container",
            "HOME": "/",
            "PATH": f"{IMAGE_VENV / 'bin'}:/usr/bin:/bin",
            # AZURE_TOKEN_CREDENTIALS=prod from the image includes managed identity;
            # point it at a closed loopback port so it can never probe IMDS.
            "IDENTITY_ENDPOINT": f"http://127.0.0.1:{free_port()}/token",
            "IDENTITY_HEADER": "test",
        }
    )
    assert env["AZURE_TOKEN_CREDENTIALS"] == "prod"
    assert env["APP_LOG_FORMAT"] == "json"

    log_path = volumes / "container.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                "setpriv",
                "--reuid=10001",
                "--regid=10001",
                "--clear-groups",
                tini,
                "--",
                *command[2:],
            ],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def status() -> dict | None:
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                return httpx.get(f"{url}/v1/status", timeout=2).json()
            except httpx.HTTPError:
                return None

        first = wait_until(status, 60, what="the service to answer")
        assert first["active_session"] == "container"
        source = nfs / "incoming" / "from-the-pod.bin"
        md5 = write_random(source, 3 * MiB)
        os.chown(source, 10001, 10001)
        wait_until(lambda: (status() or {}).get("processed_ok") == 1, 60, what="the upload")
        blob = f"{first['session']['date_prefix']}/container/from-the-pod.bin"
        assert azurite.blob_md5(azurite_container, blob) == md5
        assert not source.exists()

        os.kill(proc.pid, signal.SIGTERM)  # what the kubelet sends to PID 1
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    lines = log_path.read_text().splitlines()
    import json

    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(e.get("message", "").startswith("uploaded ") for e in events)
    assert azurite.connection_string not in log_path.read_text()
