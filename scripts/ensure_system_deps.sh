#!/usr/bin/env bash
# C++ test dependencies from Debian's packages: GoogleTest (headers + static libs).
set -euo pipefail
if [ -f /usr/include/gtest/gtest.h ] && ls /usr/lib/*/libgtest.a >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "tailrank: the C++ tests need GoogleTest: install Debian's libgtest-dev (apt-get install libgtest-dev)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq libgtest-dev >/dev/null
