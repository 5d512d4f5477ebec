#!/usr/bin/env bash
# Every benchmark, one after the other (each starts its own broker on free ports and writes
# bench/results/<name>.md); about 20 minutes on 2 cores. Then bench/README.md's tables are
# copied from bench/results by hand. PYTHON defaults to the project's virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
for bench in ceiling stages end_to_end collector backpressure; do
  echo "== $bench" >&2
  "$PYTHON" "bench/$bench.py"
done
"$PYTHON" bench/novelty.py --sizes 200,10000,100000 --queries 1000
