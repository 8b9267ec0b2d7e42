#!/usr/bin/env bash
# The Debian packages `make demo` and `make test` need: the one list (.ci/run uses it through make).
#
#   scripts/system-deps.sh demo|test
#
# Installs the missing ones when this user can (root, or sudo without a password); otherwise stops
# with one line naming the exact apt-get command. Nothing to do costs one dpkg-query.
set -euo pipefail

# Debian package            what needs it
DEMO=(
  python3-venv              # make install: python3 -m venv .venv
)
TEST=(
  "${DEMO[@]}"
  build-essential           # gcc: the C demo's syntax check and its build against the stand-in runtime
  cmake                     # builds the RV1103 C demo as its README does
  chromium                  # tests/engine_tests/test_report.py shows report.html as a person sees it
  graphviz                  # dot: edgepipe dag --format png|svg
  fonts-noto-cjk            # report figures with Chinese class names
  qemu-user-static          # tests/board_tests/test_emulated_boards.py: ARM code on this machine
  debootstrap               # ... the ARM Debian userland it runs in
  gcc-arm-linux-gnueabihf   # ... the RV1103 C demo cross-built for armhf
)

case "${1:-}" in
  demo) wanted=("${DEMO[@]}") ;;
  test) wanted=("${TEST[@]}") ;;
  *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "system-deps: not a Debian/Ubuntu system; install the equivalents of: ${wanted[*]}" >&2
  exit 0
fi
missing=()
for pkg in "${wanted[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "system-deps: missing Debian packages; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "system-deps: installing ${missing[*]}"
# another apt may hold the dpkg lock for a while: wait for it rather than fail
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -y -qq)
if ! { "${apt[@]}" update >/dev/null && "${apt[@]}" install "${missing[@]}" >/dev/null; }; then
  echo "system-deps: apt-get failed (see above); run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
