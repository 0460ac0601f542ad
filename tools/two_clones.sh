#!/bin/bash
# Issue 21's check: two fresh clones of this checkout (each its own venv) run the default suite at the same
# moment beside two CPU hogs; prints each wall time and rc, and whether /dev/shm gained or lost anything.
# Usage: tools/two_clones.sh   (writes /work/measure/clone{1,2}.log; edit the paths for another machine)
set -u
C=$(git -C /work/main rev-parse --short HEAD)
for k in 1 2; do
  rm -rf /work/clone$k && git clone -q /work/main /work/clone$k && cd /work/clone$k && python3 -m venv .venv && \
    .venv/bin/pip install -q -e '.[test,browser,campaign]' 2>&1 | grep -v "^WARNING" | tail -2
done
ls /dev/shm > /work/measure/shm-before.txt
yes > /dev/null & Y1=$!
yes > /dev/null & Y2=$!
echo "commit $C; start $(date +%T); load $(cat /proc/loadavg)"
pids=()
for k in 1 2; do
  (cd /work/clone$k && /usr/bin/time -f "clone$k wall %e s" .venv/bin/python -m pytest -q -p no:cacheprovider > /work/measure/clone$k.log 2>&1; echo "clone$k rc=$?" >> /work/measure/clone$k.log) &
  pids+=($!)
done
wait "${pids[@]}"
kill $Y1 $Y2
echo "end $(date +%T); load $(cat /proc/loadavg)"
tail -n 3 /work/measure/clone1.log /work/measure/clone2.log
ls /dev/shm > /work/measure/shm-after.txt
diff /work/measure/shm-before.txt /work/measure/shm-after.txt && echo "shm: nothing left or removed"
