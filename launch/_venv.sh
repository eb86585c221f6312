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
