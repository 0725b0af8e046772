#!/usr/bin/env bash
# C++ test dependencies from Debian's packages: GoogleTest (headers + static libs), and clang with
# its libFuzzer and sanitizer runtimes for the fuzz targets.
set -euo pipefail
if [ -f /usr/include/gtest/gtest.h ] && ls /usr/lib/*/libgtest.a >/dev/null 2>&1 && command -v clang++ >/dev/null \
   && ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "tailrank: the C++ tests need GoogleTest and clang: apt-get install libgtest-dev clang libclang-rt-14-dev" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq libgtest-dev clang libclang-rt-14-dev >/dev/null
