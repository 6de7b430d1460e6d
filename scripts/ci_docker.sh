#!/usr/bin/env bash
# The docker tests (pytest -m docker, deselected by `make test`): a smoke attempt inside the
# harness image equals the local runner's, a container has no network and writes only its
# output folder, the OOM killer and a `docker kill` from outside end a stage as infra
# (refunded), and tests/security's docker cases (a stage container killed at a random moment is
# never charged). No image registry is reachable here, so everything is built locally:
#   1. Debian's docker.io and debootstrap, installed when missing;
#   2. dockerd, started in the background when no engine answers;
#   3. a Debian bookworm base image (debootstrap + docker import), built once, cached by tag;
#   4. the harness image from containers/Dockerfile (`harness image build`, network off),
#      then `harness image check` on it;
#   5. the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BASE=${HARNESS_BASE_IMAGE:-harness-base:bookworm}
export HARNESS_TEST_IMAGE=${HARNESS_TEST_IMAGE:-bitlinear-harness:cpu}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  echo "ci_docker: installing docker.io and debootstrap"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io debootstrap
fi

if ! docker info >/dev/null 2>&1; then
  echo "ci_docker: starting dockerd (log: /tmp/ci-dockerd.log)"
  $SUDO sh -c 'nohup dockerd >/tmp/ci-dockerd.log 2>&1 &'
  for _ in $(seq 60); do
    [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -20 /tmp/ci-dockerd.log; echo "ci_docker: dockerd did not start" >&2; exit 1; }
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "ci_docker: building the base image $BASE with debootstrap"
  root=$(mktemp -d)
  trap '$SUDO rm -rf "$root"' EXIT
  $SUDO debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root" >/dev/null
  $SUDO tar -C "$root" -c . | docker import - "$BASE" >/dev/null
fi

make install VENV="$VENV"
"$VENV/bin/harness" image build --base "$BASE" --tag "$HARNESS_TEST_IMAGE"
"$VENV/bin/harness" image check "$HARNESS_TEST_IMAGE"
# This -m replaces the default one in pyproject's addopts (the last -m wins).
"$VENV/bin/python" -m pytest -q -m docker tests/docker tests/security
