#!/usr/bin/env bash
# Installs schemathesis (the API contract test's fuzzer, from PyPI) into a virtualenv of the
# project's own: $1, default target/contract-venv. Pinned: a new release may add checks.
set -euo pipefail
venv="${1:-$(dirname "$0")/../../target/contract-venv}"
version=4.32.5
if [ -x "$venv/bin/st" ] && "$venv/bin/python" -c "import schemathesis, sys; sys.exit(schemathesis.__version__ != '$version')" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
