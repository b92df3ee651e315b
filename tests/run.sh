#!/usr/bin/env bash
# The test command (see README): sets up .venv, installs what the tests need, runs pytest.
#  * torch: the CPU wheel 2.13.0 (never a CUDA build, never torchvision/torchaudio: the tests use stand-ins).
#  * The ComfyUI host: $COMFYUI_PATH, else the ComfyUI containing this pack, else the pinned one
#    (tests/comfyui.version) extracted once from ../shared/host into .comfyui/ (tests/host.py). Its requirements.txt
#    is installed too, without torch, torchvision, torchaudio and spandrel (spandrel --no-deps), plus requests
#    (imported by ComfyUI, not listed). Without a host the host tests skip with one line, except under CI=true,
#    where a missing host is a failure.
#  * pytest runs in ANYDRESSING_TEST_WORKERS (default 2) pytest-xdist workers, each file on one worker (its module
#    fixtures built once); each worker gets its share of the cores' threads (conftest.py).
#    ANYDRESSING_TEST_WORKERS=0 runs in this process; so does any -n/--numprocesses or -p no:xdist given here.
# Extra arguments go to pytest (paths relative to tests/), e.g.  bash tests/run.sh -m slow   or   -k masks
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${ANYDRESSING_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

stamp_ok() { [ -f "$VENV/.stamp-$1" ] && [ "$(cat "$VENV/.stamp-$1")" = "$2" ]; }
mark() { echo "$2" > "$VENV/.stamp-$1"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" torch==2.13.0
fi
REQ_HASH="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if ! stamp_ok pack "$REQ_HASH"; then
  "${PIP[@]}" -r requirements.txt -r requirements-dev.txt
  mark pack "$REQ_HASH"
fi

HOST="$("$VENV/bin/python" tests/host.py --find)"
if [ -n "$HOST" ]; then
  HOST_HASH="$(sha256sum "$HOST/requirements.txt" | cut -c1-16)"
  if ! stamp_ok host "$HOST_HASH"; then
    FILTERED="$(mktemp)"
    grep -v -E '^\s*(torch|torchvision|torchaudio|spandrel)\s*([<>=!~;#].*)?$' "$HOST/requirements.txt" > "$FILTERED"
    "${PIP[@]}" -r "$FILTERED" requests
    "${PIP[@]}" --no-deps spandrel
    rm -f "$FILTERED"
    mark host "$HOST_HASH"
  fi
  echo "ComfyUI host: $HOST"
else
  WHY="$("$VENV/bin/python" tests/host.py --why)"
  if [ "${CI:-}" = "true" ]; then
    echo "CI: $WHY" >&2
    echo "CI must run the host tests: a missing host is a failure here." >&2
    exit 1
  fi
  echo "$WHY"
fi

# pytest runs from tests/ (the repository root is itself a ComfyUI package, which pytest must not import)
VENV_ABS="$(cd "$VENV" && pwd)"
cd tests
PARALLEL=(-n "${ANYDRESSING_TEST_WORKERS:-2}" --dist loadfile)
for a in "$@"; do
  case "$a" in -n|-n*|--numprocesses*|no:xdist|-pno:xdist) PARALLEL=() ;; esac
done
[ "${ANYDRESSING_TEST_WORKERS:-2}" = 0 ] && PARALLEL=()
exec "$VENV_ABS/bin/python" -m pytest "${PARALLEL[@]}" "$@"
