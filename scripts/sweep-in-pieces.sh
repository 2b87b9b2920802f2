#!/usr/bin/env bash
# One piece of a long sweep on a machine held for minutes at a time (a lent or preemptible GPU host): starts the
# sweep detached, with a deadline (DEADLINE: sweep.deadline, no run is cut off) and/or a time limit (LIMIT), unless
# one already runs; waits up to WAIT s; copies the study database
# (sqlite's online backup: consistent while the sweep writes) to $OUT/study.backup.db every minute and at the end;
# tars runs/ (no checkpoints, event files or the live database) to $OUT/runs.tgz. Call it again to wait on.
#   SEED_DB=results/mqar_paper/study.db DEADLINE=25m WAIT=540 OUT=/tmp/out \
#     scripts/sweep-in-pieces.sh configs/sweeps/mqar_paper.yaml sweep.stack_lrs=true trainer.compile=true
# The live database sits at LIVE_DB (default runs/live/study.db, git-ignored), copied from SEED_DB only when
# absent: a tool that re-sends the working tree (tracked files included) before every call must not overwrite it.
# LAB: how to run the lab (default `python3 -m lab.cli`).
# CACHE (optional, e.g. .compile-cache.tgz, git-ignored: carry it): Inductor's and Triton's compile caches kept from
# piece to piece. A fresh machine otherwise compiles every kernel cold (a first stack's warm-up 81 s where a warm
# launch's took ~19 s). Unpacked into runs/compile-cache before the launch when present; packed to
# $OUT/compile-cache.tgz once no launch runs, if it fits the 16 MiB a file brought back may have: copy it to CACHE.
set -u
config=$1; shift
LIVE_DB=${LIVE_DB:-runs/live/study.db} WAIT=${WAIT:-540} OUT=${OUT:?set OUT, where the backups go}
LAB=${LAB:-python3 -m lab.cli}
mkdir -p "$(dirname "$LIVE_DB")" "$OUT" runs
if [ ! -f "$LIVE_DB" ] && [ -n "${SEED_DB:-}" ]; then cp "$SEED_DB" "$LIVE_DB"; fi
pidfile=runs/sweep-in-pieces.pid
running() { [ -f $pidfile ] && kill -0 "$(cat $pidfile)" 2>/dev/null; }
cache_dir=runs/compile-cache
if [ -n "${CACHE:-}" ]; then
  export TORCHINDUCTOR_CACHE_DIR=$PWD/$cache_dir/inductor TRITON_CACHE_DIR=$PWD/$cache_dir/triton
  if [ -f "$CACHE" ] && [ ! -d $cache_dir ]; then tar xzf "$CACHE" && echo "compile cache unpacked from $CACHE"; fi
fi
if [ -n "${LIMIT:-}${DEADLINE:-}" ] && ! running; then
  setsid nohup $LAB sweep --config "$config" "$@" "sweep.storage=sqlite:///$LIVE_DB" \
    ${LIMIT:+"sweep.time_limit=$LIMIT"} ${DEADLINE:+"sweep.deadline=$DEADLINE"} \
    >> runs/sweep-in-pieces.log 2>&1 < /dev/null &
  echo $! > $pidfile
  echo "launched pid $(cat $pidfile), time limit ${LIMIT:-none}, deadline ${DEADLINE:-none}, at $(date -u +%T)"
fi
backup() {
  python3 - "$LIVE_DB" "$OUT/study.backup.db" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst)
dst.close()
print("trials by state:", src.execute("select state, count(*) from trials group by state").fetchall())
PY
}
start=$(date +%s) n=0
while running && [ $(( $(date +%s) - start )) -lt "$WAIT" ]; do
  sleep 5; n=$((n + 1)); [ $((n % 12)) -eq 0 ] && backup > /dev/null
done
running && echo "still running at $(date -u +%T)" || echo "no launch running at $(date -u +%T)"
[ -f "$LIVE_DB" ] && backup
tar czf "$OUT/runs.tgz" --exclude='*.ckpt' --exclude='events.out.*' --exclude="$LIVE_DB" --exclude=$cache_dir runs \
  2>/dev/null
if [ -n "${CACHE:-}" ] && [ -d $cache_dir ] && ! running; then
  tar czf "$OUT/compile-cache.tgz" $cache_dir
  mib=$(( $(stat -c %s "$OUT/compile-cache.tgz") / 1048576 ))
  if [ $mib -ge 16 ]; then rm "$OUT/compile-cache.tgz"; echo "compile cache: $mib MiB packed, too large to bring back"
  else echo "compile cache: $mib MiB in \$OUT/compile-cache.tgz"; fi
fi
grep -v '━' runs/sweep-in-pieces.log | tail -25
