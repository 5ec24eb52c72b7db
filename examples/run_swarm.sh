#!/usr/bin/env bash
# Start N peers of examples/train_digits.py on this machine (default 3); Ctrl-C stops them all.
# PYTHON picks the interpreter (default: python3 on PATH, e.g. an activated venv's).
set -euo pipefail
python="${PYTHON:-python3}"
n="${1:-3}"
cd "$(dirname "$0")/.."
trap 'kill 0' EXIT
log="$(mktemp)"
"$python" examples/train_digits.py --index 0 --peers "$n" >"$log" 2>&1 &
until grep -q "listening" "$log"; do sleep 0.2; done
address="$(grep -m1 listening "$log" | cut -d' ' -f2)"
echo "first peer: $address"
tail -f "$log" &
for i in $(seq 1 $((n - 1))); do
    "$python" examples/train_digits.py --index "$i" --peers "$n" --bootstrap "$address" &
done
wait
