#!/usr/bin/env bash
# Install medjax with its test extras and run the test suite. pytest's exit code is the
# script's: a failure, or no test collected (exit 5), fails.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e ".[test]"
python -m pytest tests -q "$@"
