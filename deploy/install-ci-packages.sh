#!/usr/bin/env bash
# Install the Debian packages the deploy checks need (deploy/ci-packages.txt),
# idempotently: nothing is done when all are there, and apt-get update runs at
# most once. A package counts as there when dpkg has it installed or another
# installed package provides it (NodeSource's nodejs provides npm, and
# Debian's npm would conflict with it).
#
#   bash deploy/install-ci-packages.sh        (as root; .ci/run calls it)
set -euo pipefail

list="$(dirname "$0")/ci-packages.txt"
provided="$(dpkg-query -W -f='${db:Status-Abbrev} ${Provides}\n' 2>/dev/null \
  | awk '$1 == "ii" { $1 = ""; print }' | tr ',' '\n' | awk '{ print $1 }' | sort -u)"

wanted=()
missing=()
while read -r package; do
  [[ -z "$package" || "$package" == \#* ]] && continue
  wanted+=("$package")
  status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$package" 2>/dev/null || true)"
  if [[ "$status" == ii* ]] || grep -qxF "$package" <<<"$provided"; then
    continue
  fi
  missing+=("$package")
done <"$list"

if ((${#missing[@]} == 0)); then
  echo "install-ci-packages: ${wanted[*]} present"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-ci-packages: missing ${missing[*]}; run this as root" >&2
  exit 1
fi
echo "install-ci-packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
