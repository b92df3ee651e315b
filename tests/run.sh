#!/usr/bin/env bash
# The test command (see README): sets up one virtual environment per ComfyUI host, runs pytest on each.
#  * torch: the CPU wheel 2.13.0 (never a CUDA build, never torchvision/torchaudio: the tests use stand-ins).
#  * The ComfyUI hosts: $COMFYUI_PATH, else the ComfyUI containing this pack (one run, on that host); else every pinned
#    host (tests/comfyui.version: the oldest supported and the newest available), each extracted once from
#    ../shared/host into .comfyui/ (tests/host.py). The first run is the whole suite; each further host runs the
#    host tests again (ANYDRESSING_HOST_ONLY=1). Each host has its own environment ($ANYDRESSING_VENV, default .venv,
#    for the first; .venv-<tag> for the others) with that host's requirements.txt, without torch, torchvision,
#    torchaudio and spandrel (spandrel --no-deps), plus requests (imported by ComfyUI, not listed). Without a host
#    the host tests skip with one line, except under CI=true, where a missing host is a failure.
#  * pytest runs in ANYDRESSING_TEST_WORKERS (default 2) pytest-xdist workers, each file on one worker (its module
#    fixtures built once); each worker gets its share of the cores' threads (conftest.py).
#    ANYDRESSING_TEST_WORKERS=0 runs in this process; so does any -n/--numprocesses or -p no:xdist given here.
# Extra arguments go to pytest (paths relative to tests/), e.g.  bash tests/run.sh -m slow   or   -k masks
# ANYDRESSING_HOSTS=v0.8.0 (a space-separated subset of the pinned tags) runs only those hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BASE_VENV="${ANYDRESSING_VENV:-.venv}"

stamp_ok() { [ -f "$1/.stamp-$2" ] && [ "$(cat "$1/.stamp-$2")" = "$3" ]; }

# setup_venv VENV [HOST]: the environment for one host (or for none)
setup_venv() {
  local venv="$1" host="${2:-}"
  local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "${pip[@]}" torch==2.13.0
  fi
  local req_hash
  req_hash="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
  if ! stamp_ok "$venv" pack "$req_hash"; then
    "${pip[@]}" -r requirements.txt -r requirements-dev.txt
    echo "$req_hash" > "$venv/.stamp-pack"
  fi
  if [ -n "$host" ]; then
    local host_hash filtered
    host_hash="$(sha256sum "$host/requirements.txt" | cut -c1-16)"
    if ! stamp_ok "$venv" host "$host_hash"; then
      filtered="$(mktemp)"
      grep -v -E '^\s*(torch|torchvision|torchaudio|spandrel)\s*([<>=!~;#].*)?$' "$host/requirements.txt" > "$filtered"
      "${pip[@]}" -r "$filtered" requests
      "${pip[@]}" --no-deps spandrel
      rm -f "$filtered"
      echo "$host_hash" > "$venv/.stamp-host"
    fi
  fi
}

# The hosts: "tag path" lines (tag "own" for the user's own ComfyUI)
HOSTS=()
own="$("$PY" tests/host.py --own)"
if [ -n "$own" ]; then
  HOSTS+=("own $own")
elif [ -z "${COMFYUI_PATH:-}" ]; then
  for tag in $("$PY" tests/host.py --pinned); do
    if [ -n "${ANYDRESSING_HOSTS:-}" ] && [[ " $ANYDRESSING_HOSTS " != *" $tag "* ]]; then
      continue
    fi
    path="$(ANYDRESSING_HOST="$tag" "$PY" tests/host.py --find)"
    [ -n "$path" ] && HOSTS+=("$tag $path")
  done
fi

PARALLEL=(-n "${ANYDRESSING_TEST_WORKERS:-2}" --dist loadfile)
for a in "$@"; do
  case "$a" in -n|-n*|--numprocesses*|no:xdist|-pno:xdist) PARALLEL=() ;; esac
done
[ "${ANYDRESSING_TEST_WORKERS:-2}" = 0 ] && PARALLEL=()

# run_pytest VENV LABEL FIRST [ENV=VALUE...] -- pytest args: pytest runs from tests/ (the repository root is itself a
# ComfyUI package, which pytest must not import); its closing line is kept for the summary
SUMMARY=()
FAILED=0
TOTALS=(0 0 0)  # passed, failed (errors included), skipped
run_pytest() {
  local venv_abs label="$2" first="$3" envs=() rc log closing n
  venv_abs="$(cd "$1" && pwd)"
  shift 3
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  log="$(mktemp)"
  set +e
  (cd tests && env "${envs[@]}" "$venv_abs/bin/python" -m pytest "${PARALLEL[@]}" "$@") 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  # 5: no test collected (e.g. a -k that selects only host-free tests, on a further host)
  if [ "$rc" != 0 ] && { [ "$rc" != 5 ] || [ "$first" = 1 ]; }; then FAILED=1; fi
  closing="$(grep -E '(passed|failed|skipped|error|no tests ran|collected).* in [0-9.]+s' "$log" | tail -n 1 |
             sed -E 's/^=+ //; s/ =+$//' || true)"
  SUMMARY+=("ComfyUI $label: ${closing:-pytest exited $rc}")
  for i in 0 1 2; do
    case $i in 0) w=passed ;; 1) w='failed|errors?' ;; 2) w=skipped ;; esac
    for n in $(echo "$closing" | grep -Eo "[0-9]+ ($w)" | grep -Eo '^[0-9]+' || true); do
      TOTALS[$i]=$((TOTALS[$i] + n))
    done
  done
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || [ -n "$closing" ] || TOTALS[1]=$((TOTALS[1] + 1))
  rm -f "$log"
}

summary() {
  echo
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  echo "total: ${TOTALS[0]} passed, ${TOTALS[1]} failed, ${TOTALS[2]} skipped"
}

if [ ${#HOSTS[@]} -eq 0 ]; then
  setup_venv "$BASE_VENV"
  WHY="$("$PY" tests/host.py --why)"
  if [ "${CI:-}" = "true" ]; then
    echo "CI: $WHY" >&2
    echo "CI must run the host tests: a missing host is a failure here." >&2
    exit 1
  fi
  echo "$WHY"
  run_pytest "$BASE_VENV" "none" 1 COMFYUI_PATH="${COMFYUI_PATH:-}" -- "$@"
  summary
  exit $FAILED
fi

OLDEST="$("$PY" tests/host.py --pinned | head -n 1)"
i=0
for entry in "${HOSTS[@]}"; do
  tag="${entry%% *}"
  path="${entry#* }"
  venv="$BASE_VENV"  # the user's own host and the oldest pinned one; each other pinned host has its own
  [ "$tag" != own ] && [ "$tag" != "$OLDEST" ] && venv="$BASE_VENV-$tag"
  setup_venv "$venv" "$path"
  echo "ComfyUI host: $path"
  envs=("ANYDRESSING_HOST_LABEL=$tag")
  [ "$tag" != own ] && envs+=("ANYDRESSING_HOST=$tag")
  [ $i -gt 0 ] && envs+=("ANYDRESSING_HOST_ONLY=1")
  run_pytest "$venv" "$tag" "$([ $i = 0 ] && echo 1 || echo 0)" "${envs[@]}" -- "$@"
  i=$((i + 1))
done
summary
exit $FAILED
