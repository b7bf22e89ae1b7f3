#!/usr/bin/env bash
# Install the Debian packages the tests need (tests/test-packages.txt) when they
# are missing; `make test` runs this before pytest. Nothing is done, quietly,
# when everything is there. As root it installs them with apt-get; otherwise it
# fails with one line saying what to install.
#
#   bash tests/install-test-packages.sh
set -euo pipefail

list="$(dirname "$0")/test-packages.txt"
missing=()
while read -r package commands; do
  [[ -z "$package" || "$package" == \#* ]] && continue
  found=
  for name in ${commands:-$package}; do
    if command -v "$name" >/dev/null; then
      found=yes
      break
    fi
  done
  [[ -n "$found" ]] || missing+=("$package")
done <"$list"

if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "install-test-packages: the tests need ${missing[*]}: install it (apt-get install ${missing[*]}) or run make test as root" >&2
  exit 1
fi
echo "install-test-packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
