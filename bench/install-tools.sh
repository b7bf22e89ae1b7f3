#!/bin/sh
# Install what `make bench` needs and the venv does not hold, from Debian/Ubuntu
# packages: wrk (load generator), nginx (the upstream stand-in), golang-go and
# golang-github-golang-jwt-jwt-dev (to build the go-reference row,
# bench/goref/main.go, in GOPATH mode: no module download), redis-server (the
# shared store of the *-redis rows) and valgrind (`make bench-instructions`
# counts instructions with its callgrind). Needs root (or sudo). Installs only
# what is missing; does nothing when everything is there.
set -eu
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
# golang-jwt v4 as Debian ships it (GOPATH mode finds .../jwt/v4 through its go.mod).
JWT_DIR=/usr/share/gocode/src/github.com/golang-jwt/jwt
missing=
have wrk || missing="$missing wrk"
have nginx || missing="$missing nginx"
have go || missing="$missing golang-go"
[ -f "$JWT_DIR/go.mod" ] || missing="$missing golang-github-golang-jwt-jwt-dev"
have redis-server || missing="$missing redis-server"
have valgrind || missing="$missing valgrind"
[ -z "$missing" ] && exit 0
SUDO=
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "bench: needed and missing:$missing; install them as root: apt-get install$missing" >&2
    exit 1
  fi
fi
echo "bench: installing$missing with apt-get" >&2
$SUDO apt-get update -qq
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
