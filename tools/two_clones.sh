#!/bin/bash
# Issue 21's check: two fresh clones of this checkout (each its own venv) run the default suite at the same
# moment beside two CPU hogs; prints each wall time and rc, and whether /dev/shm gained or lost anything.
# Usage: tools/two_clones.sh [WORKDIR]   (WORKDIR: where the clones and logs go, default /tmp/shmmmu-two-clones)
# Objects in /dev/shm of processes that were running anyway (another VM, an explorer) show in the diff too.
set -u
SRC=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
W=${1:-/tmp/shmmmu-two-clones}
mkdir -p "$W"
C=$(git -C "$SRC" rev-parse --short HEAD)
for k in 1 2; do
  rm -rf "$W/clone$k" && git clone -q "$SRC" "$W/clone$k" && cd "$W/clone$k" && python3 -m venv .venv && \
    .venv/bin/pip install -q -e '.[test,browser,campaign]' 2>&1 | grep -v "^WARNING" | tail -2
done
ls /dev/shm > "$W/shm-before.txt"
yes > /dev/null & Y1=$!
yes > /dev/null & Y2=$!
echo "commit $C; start $(date +%T); load $(cat /proc/loadavg)"
pids=()
for k in 1 2; do
  (cd "$W/clone$k" && /usr/bin/time -f "clone$k wall %e s" .venv/bin/python -m pytest -q -p no:cacheprovider \
    > "$W/clone$k.log" 2>&1; echo "clone$k rc=$?" >> "$W/clone$k.log") &
  pids+=($!)
done
wait "${pids[@]}"
kill $Y1 $Y2
echo "end $(date +%T); load $(cat /proc/loadavg)"
tail -n 3 "$W/clone1.log" "$W/clone2.log"
ls /dev/shm > "$W/shm-after.txt"
diff "$W/shm-before.txt" "$W/shm-after.txt" && echo "shm: nothing left or removed"
