#!/bin/sh
# On an empty data volume: a cluster whose superuser is $POSTGRES_USER (password $POSTGRES_PASSWORD, needed from
# other hosts) with the database $POSTGRES_DB. Then the command: the server.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_USER:?set POSTGRES_USER}" "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}" "${POSTGRES_DB:?set POSTGRES_DB}"
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$password_file"
    initdb --username "$POSTGRES_USER" --pwfile "$password_file" --encoding UTF8 \
        --auth-local trust --auth-host scram-sha-256 >/dev/null
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    # the database, through a server that listens on its Unix socket only while it is made
    pg_ctl --pgdata "$PGDATA" --options "-c listen_addresses=''" --wait start >/dev/null
    createdb --username "$POSTGRES_USER" "$POSTGRES_DB"
    pg_ctl --pgdata "$PGDATA" --mode fast --wait stop >/dev/null
fi
exec "$@"
