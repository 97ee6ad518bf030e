#!/usr/bin/env bash
# Installs what rex needs to build and test, from Debian packages, plus any packages named as
# arguments (scripts/train.sh adds the corpus and the plotting library). Installs only what is
# missing, so running it again is quick and changes nothing. Uses sudo when not run as root.
set -euo pipefail

packages=(g++ make cmake libeigen3-dev doctest-dev nlohmann-json3-dev "$@")

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all dependencies present (${packages[*]})"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
