# ingestd container image.
#
#   docker build -t <REGISTRY>/ingestd:<VERSION> .
#
# Base image: pinned to an exact CPython patch release and Debian suite
# (3.11.17 on Debian 13 "trixie"), never a floating tag such as 3.11-slim or
# latest. It is not pinned by digest because the digest cannot be resolved
# from the offline environment this repository is developed and tested in (no
# registry but PyPI/Debian/npm is reachable there), and a made-up digest would
# break the build. The release pipeline, which can reach the registry, should
# resolve the digest and build with it (or pin it in the Kubernetes manifests
# via the kustomize `images:` field). Bump the patch version here and in BOTH
# FROM lines together, since the builder's venv is copied into the final stage
# and its interpreter symlink must point at the same /usr/local/bin/python3.11.

# ---------------------------------------------------------------------------
# Stage 1: build the app wheel and a venv holding the hash-locked dependencies.
# ---------------------------------------------------------------------------
FROM python:3.11.17-slim-trixie AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

RUN python -m venv /opt/venv

# Dependencies first, so this layer is cached across code-only changes.
# --require-hashes: every artifact must match requirements.lock (supply chain).
# --only-binary: everything in the lock ships manylinux/pure wheels, so the
# builder needs no compiler; a dependency that would need one fails loudly.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: \
        -r requirements.lock

# The app itself: build a wheel, then install it without resolving anything
# (its dependencies are already in the venv from the lock). The wheel build
# runs in pip's isolated build environment (setuptools, wheel from PyPI);
# only the resulting wheel reaches the final image, not the compiler. The
# compiler is for ingestd's one C module, the MD5 accelerator
# (ingestd/_md5pair.c: both MD5s of each byte in one pass, about 1 CPU s/GiB
# less; see bench/RESULTS.md). It is optional: built without it, ingestd
# hashes with hashlib and logs a warning at start.
# Versions pinned with a glob on the Debian revision, as tini's below.
# README* is a glob so the build works whether or not README.md exists yet.
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'gcc=4:14.2.0-*' 'libc6-dev=2.41-*' \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py setup.cfg README* ./
COPY ingestd ./ingestd
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps --no-index /wheels/ingestd-*.whl \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------
# Stage 2: runtime.
# ---------------------------------------------------------------------------
FROM python:3.11.17-slim-trixie

# Fixed, non-root UID/GID. The Kubernetes manifests (runAsUser/runAsGroup/
# fsGroup) and the NFS export's permissions use the same numbers.
ARG APP_UID=10001
ARG APP_GID=10001

# tini as PID 1 (why not run python as PID 1 directly?):
#  * the kernel gives PID 1 no default signal actions, so a SIGTERM/SIGINT
#    that the app has not (yet) installed a handler for would be ignored and
#    the pod would hang until SIGKILL; tini forwards SIGTERM to ingestd;
#  * ingestd's supervisor kills children stuck in hung NFS syscalls; any
#    process orphaned that way is re-parented to PID 1, and tini reaps it, so
#    zombies do not pile up across many respawns;
#  * tini exits with the child's exit code, so the graceful-shutdown exit 0
#    reaches Kubernetes.
# tini is started WITHOUT -g: SIGTERM goes to the ingestd parent only, which
# drains in-flight uploads for up to APP_SHUTDOWN_GRACE_S and then stops its
# children itself. Signalling the whole process group would hit the uploader
# children directly and cut their uploads short.
# Debian's tini (rather than `shareProcessNamespace` in the pod, or
# dumb-init from PyPI) keeps the init inside the image, where `docker run`
# gets it too, and in dpkg's database, where image scanners track it.
# The version is pinned with a glob on the Debian revision: upstream tini has
# been 0.19.0 for years, while Debian rebuilds (0.19.0-3+bN) replace each other
# in the archive, so an exact revision would break rebuilds.
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'tini=0.19.0-*' \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${APP_GID}" ingestd \
    && useradd --system --uid "${APP_UID}" --gid "${APP_GID}" \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ingestd

COPY --from=builder /opt/venv /opt/venv

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only at runtime (pip
#   already compiled .pyc files into the venv at build time).
# PYTHONUNBUFFERED: logs reach the container runtime immediately.
# APP_LOG_FORMAT=json: one JSON object per line for the log pipeline.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APP_LOG_FORMAT=json \
    APP_HTTP_HOST=0.0.0.0 \
    APP_HTTP_PORT=8080

# AZURE_TOKEN_CREDENTIALS=prod: DefaultAzureCredential only tries the
# Environment, WorkloadIdentity and ManagedIdentity credentials (no Azure CLI /
# developer-tool probing inside the pod). DL3064 is ignored on purpose: it
# flags any ENV name containing "TOKEN", but "prod" is a credential-chain
# selector, not a secret. Real secrets never go into the image: they come from
# the Kubernetes Secret (fallback keys) or the Workload Identity webhook.
# hadolint ignore=DL3064
ENV AZURE_TOKEN_CREDENTIALS=prod

# Writable at runtime (everything else is read-only in Kubernetes):
# /mnt/nfs (NFS volume), /mnt/staging (emptyDir), /tmp (emptyDir).
# The mount points are created here, owned by the app user, so that the image
# also works under plain `docker run` with those paths bind-mounted or not.
WORKDIR /tmp
RUN mkdir -p /mnt/nfs /mnt/staging \
    && chown "${APP_UID}:${APP_GID}" /mnt/nfs /mnt/staging

USER ${APP_UID}:${APP_GID}

EXPOSE 8080

# HEALTHCHECK: Kubernetes ignores it (the kubelet runs the pod's probes, never
# the image's HEALTHCHECK), so it exists for `docker run` / Compose users, who
# would otherwise get no health signal. It hits the same heartbeat-backed
# /healthz as the livenessProbe. Python does the request because the slim
# image has no curl/wget, and adding one only for this would grow the attack
# surface. The start period covers the bounded (30 s) Azure credential check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('APP_HTTP_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["ingestd"]
