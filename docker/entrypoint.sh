#!/bin/sh
# Container entrypoint: runs `mailserver run` in the foreground, logs on
# stderr.  The same script runs the health check (`mailserver status`), so
# both see the same configuration.
#
# Configuration: $MAILSERVER_CONFIG if set, else /etc/mailserver/config.toml
# when it is mounted, else the image's default (docker/config.toml), else
# the package's embedded default.  MAILSERVER_<PARAM> and
# MAILSERVER_<PARAM>_FILE variables override single parameters.
#
#   (no arguments)          mailserver run
#   -FLAGS...               mailserver run -FLAGS...  (e.g. --log-format json)
#   COMMAND [ARGS...]       COMMAND ARGS  (e.g. mailserver status, mailserver queue list)
set -eu

if [ -z "${MAILSERVER_CONFIG:-}" ]; then
    for candidate in /etc/mailserver/config.toml /usr/local/share/mailserver/config.toml; do
        if [ -f "$candidate" ]; then
            MAILSERVER_CONFIG=$candidate
            break
        fi
    done
fi
if [ -n "${MAILSERVER_CONFIG:-}" ]; then
    export MAILSERVER_CONFIG
fi

if [ "$#" -eq 0 ]; then
    set -- mailserver run
elif [ "${1#-}" != "$1" ]; then
    set -- mailserver run "$@"
fi

# exec: mailserver receives SIGTERM from the runtime directly and exits 0
# after draining (stop_timeout).
exec "$@"
