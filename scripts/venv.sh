# Sourced by scripts/up and scripts/test: makes .venv with qwenstack installed, extras in $1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=$(command -v python3.11 || command -v python3)
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "qwenstack needs Python 3.11 or newer; $python is $("$python" --version)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=${1:+[$1]}
stamp=".venv/.installed$extras"
# Reinstall only when the project's dependencies changed.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # --no-compile: installing the ui and rag extras took 158 s with pip byte-compiling every file
  # (torch's thousands too), 60 s without, on 2 cores with pip's cache warm. Python compiles
  # the modules it imports, once, when it first imports them.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-compile -e ".$extras"
  touch "$stamp"
fi
