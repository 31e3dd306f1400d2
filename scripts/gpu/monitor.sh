#!/usr/bin/env bash
# Wait up to $1 seconds for all.sh to finish, then pack its logs and records into $OUT/out.tar.gz
# (one file: the device tool returns at most 8) and print the step log and the tails of the logs.
set -u
O=/root/work/out
end=$((SECONDS + ${1:-480}))
while [ ! -f "$O/DONE" ] && [ $SECONDS -lt $end ]; do sleep 5; done
tar -czf "$OUT/out.tar.gz" -C /root/work out $(cd /root/work && ls -d acc/flatquant_w4a4kv4 2>/dev/null) 2>/dev/null
cat "$O/steps.log" 2>/dev/null
for f in "$O"/*.log; do echo "== $f"; grep -v "^layer\|it/s\]\|s/it\]" "$f" | tail -n 12; done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
[ -f "$O/DONE" ] && echo ALL_DONE || echo STILL_RUNNING
