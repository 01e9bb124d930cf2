#!/usr/bin/env bash
# Build the Docker sandbox image on a CI machine (or any Debian/Ubuntu host) without a registry.
#
#   scripts/build-sandbox-image.sh            # idempotent: seconds when the image is up to date
#
# 1. installs docker.io and mmdebstrap when missing (apt-get; needs root),
# 2. starts dockerd in the background when no engine answers (no systemd on CI VMs) and waits for it,
# 3. builds the base from Debian packages + the torch wheels (sandbox.image.ensure_local_base; reused
#    when it exists), then the top-level Dockerfile with --build-arg BASE=<that base>
#    (python -m sandbox.image --base local; skipped when the image was built from the same inputs).
#
# Environment: LEMUR_SANDBOX_IMAGE (tag, default lemur-agent-server-sandbox:latest), PYTHON (the Python
# whose pip fetches wheels; default .venv/bin/python, else python3), LEMUR_SANDBOX_TORCH (the torch pair
# of the local base), LEMUR_SANDBOX_DEBIAN_MIRROR, DOCKERD_LOG (default /var/log/lemur-dockerd.log).
set -euo pipefail

cd "$(dirname "$0")/.."
TAG="${LEMUR_SANDBOX_IMAGE:-lemur-agent-server-sandbox:latest}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/lemur-dockerd.log}"
t_start=$(date +%s)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || command -v debootstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${missing[@]}" | sort -u) tini >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        as_root systemctl start docker
    else
        echo "starting dockerd in the background (log: $DOCKERD_LOG)" >&2
        as_root sh -c "nohup dockerd >>'$DOCKERD_LOG' 2>&1 &"
    fi
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        echo "dockerd did not come up; its log:" >&2
        tail -n 40 "$DOCKERD_LOG" >&2 || true
        exit 1
    fi
fi

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -m sandbox.image --base local --tag "$TAG"
echo "sandbox image $TAG ready ($(( $(date +%s) - t_start )) s)" >&2
