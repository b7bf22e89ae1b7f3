#!/bin/sh
# Install what `make bench` needs and the venv does not hold: wrk (load
# generator) and nginx (the upstream stand-in), from Debian/Ubuntu packages.
# Needs root (or sudo). Does nothing when both are already installed.
set -eu
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if have wrk && have nginx; then exit 0; fi
SUDO=
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "bench: wrk and nginx are needed; install them as root: apt-get install wrk nginx" >&2
    exit 1
  fi
fi
echo "bench: installing wrk and nginx with apt-get" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wrk nginx >/dev/null
