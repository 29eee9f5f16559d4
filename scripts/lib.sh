# Shared by scripts/run-local and scripts/test: idempotent installs, so a
# fresh machine and a warm one take the same path. Sourced, not executed.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$REPO/.venv"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# apt packages, only those missing; needs root (CI and these machines are root).
install_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        say "please install as root: apt-get install ${missing[*]}"; return 1
    fi
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The app's virtualenv with the package installed editable, plus extras ("test").
install_python() {
    local extras="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
    fi
    # Skip pip when pyproject.toml has not changed since the last install.
    local stamp="$VENV/.installed-${extras:-app}"
    # setup.py and the C source too: the editable install builds the MD5 accelerator in place.
    local digest; digest="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO"/ingestd/*.c | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then return 0; fi
    say "pip install -e .${extras:+[$extras]}"
    "$VENV/bin/pip" install -q -e "$REPO${extras:+[$extras]}" > "$VENV/pip.log" 2>&1 \
        || { cat "$VENV/pip.log" >&2; return 1; }
    echo "$digest" > "$stamp"
}

# Azurite, pinned in tools/package-lock.json.
install_node_tools() {
    if [ ! -x "$REPO/tools/node_modules/.bin/azurite-blob" ]; then
        command -v npm >/dev/null || install_apt nodejs npm
        say "npm ci (Azurite)"
        (cd "$REPO/tools" && npm ci --no-audit --no-fund --loglevel=error)
    fi
}

# checkov lives in its own venv: its pins (packaging, among others) clash with
# the app's test dependencies. The deploy-file tests call it by path.
install_checkov() {
    if [ ! -x "$REPO/.venv-tools/bin/checkov" ]; then
        say "installing checkov into .venv-tools"
        "$PYTHON" -m venv "$REPO/.venv-tools"
        "$REPO/.venv-tools/bin/pip" install -q 'checkov==3.3.30' > "$REPO/.venv-tools/pip.log" 2>&1 \
            || { cat "$REPO/.venv-tools/pip.log" >&2; return 1; }
    fi
}

# A venv built the way the Dockerfile's builder stage builds /opt/venv: the
# system interpreter (readable by the image's non-root user), the hash-locked
# dependencies, then the app as a wheel. The container-entrypoint test runs it
# as UID 10001, which also proves requirements.lock installs cleanly.
install_image_venv() {
    # Under /opt like the image's /opt/venv: UID 10001 must reach it, and a clone may sit
    # in a private (0700) folder.
    local venv="/opt/ingestd-image-venv" stamp digest
    stamp="$venv/.built"
    digest="$(cat "$REPO/requirements.lock" "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO"/ingestd/*.py "$REPO"/ingestd/*.c | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then return 0; fi
    say "building .venv-image from requirements.lock (as the Dockerfile does)"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    local wheels; wheels="$(mktemp -d)"
    {
        "$venv/bin/pip" install --require-hashes --no-deps --only-binary=:all: -r "$REPO/requirements.lock" \
        && "$venv/bin/pip" wheel --no-deps --wheel-dir "$wheels" "$REPO" \
        && "$venv/bin/pip" install --no-deps --no-index "$wheels"/ingestd-*.whl \
        && "$venv/bin/pip" check
    } > "$REPO/.venv-image.log" 2>&1 || { cat "$REPO/.venv-image.log" >&2; return 1; }
    rm -rf "$wheels"
    echo "$digest" > "$stamp"
}
