#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests (CI, or on your machine):
#   url=$(scripts/postgres-test-server.sh start DIR)   # prints postgresql://lab:lab@127.0.0.1:PORT/lab_test
#   LAB_TEST_POSTGRES_URL=$url .venv/bin/python -m pytest -q tests/test_sweeps_postgres.py
#   scripts/postgres-test-server.sh stop DIR           # stops it and deletes DIR
# A fresh cluster in DIR/data, listening on 127.0.0.1 only, on a free port; role `lab` (password `lab`) owns
# database `lab_test`. Needs the PostgreSQL server binaries (Debian: apt-get install postgresql; elsewhere
# initdb on the PATH, or PG_BIN=/path/to/bin). As root it runs as the `postgres` user (postgres refuses root).
# Only the URL goes to stdout; messages and errors go to stderr.
set -euo pipefail

die() { echo "postgres-test-server: $*" >&2; exit 1; }

usage="usage: $0 start|stop DIR"
[[ $# -eq 2 ]] || die "$usage"
action=$1
dir=$2

find_bin() {
    if [[ -n ${PG_BIN:-} ]]; then
        [[ -x $PG_BIN/initdb ]] || die "PG_BIN=$PG_BIN has no initdb"
        echo "$PG_BIN"; return
    fi
    local newest
    newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $newest && -x $newest/initdb ]]; then echo "$newest"; return; fi
    if command -v initdb >/dev/null; then dirname "$(command -v initdb)"; return; fi
    die "no PostgreSQL server binaries (initdb) found; install them (Debian: apt-get install postgresql) or set PG_BIN"
}

# postgres refuses to run as root: as root, run the server as the `postgres` system user
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u "${PG_USER:-postgres}" -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local bin port
    bin=$(find_bin)
    [[ ! -e $dir/data ]] || die "$dir/data exists (a server started there before?); stop it or choose another DIR"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ $(id -u) -eq 0 ]]; then
        id "${PG_USER:-postgres}" >/dev/null 2>&1 || die "running as root but there is no '${PG_USER:-postgres}' user to run the server as (set PG_USER)"
        chown "${PG_USER:-postgres}" "$dir"
        as_owner test -w "$dir" || die "user '${PG_USER:-postgres}' cannot write $dir (a parent directory is private?); choose a DIR under /tmp"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --locale=C --encoding=UTF8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    # a free port can be taken between choosing it and binding it: try a few
    for _ in 1 2 3 4 5; do
        port=$(free_port)
        # test server: no durability needed, so no fsync; sockets only in DIR and on 127.0.0.1
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
            start >/dev/null; then
            break
        fi
        port=
    done
    [[ -n $port ]] || { tail -n 20 "$dir/server.log" >&2; die "the server did not start (log: $dir/server.log)"; }
    as_owner "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE lab LOGIN PASSWORD 'lab'" -c "CREATE DATABASE lab_test OWNER lab" >&2 \
        || { stop; die "could not create role lab and database lab_test"; }
    echo "postgresql://lab:lab@127.0.0.1:$port/lab_test" | tee "$dir/url"
}

stop() {
    [[ -d $dir ]] || return 0
    if [[ -f $dir/data/postmaster.pid ]]; then
        as_owner "$(find_bin)/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null \
            || die "could not stop the server in $dir/data (log: $dir/server.log)"
    fi
    rm -rf "$dir"
}

case $action in
    start) start ;;
    stop) stop ;;
    *) die "$usage" ;;
esac
