#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh pipeline   install what is missing, then run the default pipeline (dvc repro) on Fashion-MNIST
#   ./run.sh test       install what is missing, then run the test suite
# Other commands run inside the project's venv: ./run.sh dvc metrics show, ./run.sh takd --help
set -euo pipefail
cd "$(dirname "$0")"
export DVC_NO_ANALYTICS=1 PIP_DISABLE_PIP_VERSION_CHECK=1 GIT_PYTHON_REFRESH=quiet
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1

pip_quiet() {  # this machine's pip config names local mirrors that may be absent; drop those notices only
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

setup() {
  local stamp=".venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "== installing into .venv (pinned: requirements.lock)"
    python3 -m venv .venv
    pip_quiet .venv/bin/pip install -q --upgrade pip
    pip_quiet .venv/bin/pip install -q -r requirements.lock
    .venv/bin/pip install -q --no-deps -e . > .venv/install-project.log 2>&1 \
      || { cat .venv/install-project.log; exit 1; }
    touch "$stamp"
  fi
  if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "== installing Debian's dataset-fashion-mnist"
      (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
        || echo "   not available: the pipeline will download Fashion-MNIST with torchvision"
    else
      echo "== no root/apt: the pipeline will download Fashion-MNIST with torchvision"
    fi
  fi
  export PATH="$PWD/.venv/bin:$PATH"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  pipeline)
    setup
    [ -d .git ] || { git init -q && git add -A && git -c user.email=takd@localhost -c user.name=takd commit -qm init; }
    python -m tasks fetch-data > /dev/null  # the data set into data/raw (copied from Debian's package, or downloaded)
    python -m takd dvc-yaml  # dvc.yaml (and experiments/) list what params.yaml makes each stage read; a no-op when they do
    start=$(date +%s)
    dvc repro "$@"
    echo "== dvc repro took $(( $(date +%s) - start )) s"
    dvc metrics show data/metrics/comparison.json
    cat data/reports/comparison.md
    ;;
  test)
    setup
    python -m pytest -q -n 2 --dist worksteal "$@"  # two workers, each taking tests as it frees up: the suite waits on processes as much as it computes
    ;;
  "" | -h | --help)
    sed -n '2,6p' "$0"
    ;;
  *)
    setup
    "$cmd" "$@"
    ;;
esac
