# Sourced by the launch scripts: use the active virtualenv, else create/activate ./.venv.
# Needs only Python 3 (>= 3.10) on the machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  PYTHON="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    echo "Creating virtualenv .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
# 2 MiB pages for large allocations (glibc >= 2.35 with transparent huge pages in "madvise" or
# "always" mode; ignored elsewhere): XLA's CPU runtime allocates each step's temporaries afresh
# and their first-touch page faults cost 10-20 % of a CPU training step with 4 KiB pages
# (README "Performance"). An existing GLIBC_TUNABLES is left as it is.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
