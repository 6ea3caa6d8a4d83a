#!/bin/sh
# Writes Mosquitto's password file from the compose secrets, before each broker start (service
# mosquitto-init in deploy/compose.yaml). Users: plcsense (the worker), plc (PLCs, gateways) and
# healthcheck, whose random password is kept beside the password file for the broker's healthcheck.
# Passwords are never on a command line: mosquitto_passwd reads them from stdin.
set -eu

secrets=${SECRETS_DIR:-/run/secrets}
auth=${AUTH_DIR:-/mosquitto/auth}
umask 077
mkdir -p "$auth"
chmod 0755 "$auth" # the broker runs as user mosquitto
new="$auth/passwd.new"
rm -f "$new"
: >"$new"

add_user() { # user password-file
    [ -s "$2" ] || { echo "mosquitto-users: $2 is missing or empty; run deploy/init-secrets.sh" >&2; exit 1; }
    password=$(cat "$2")
    printf '%s\n%s\n' "$password" "$password" | mosquitto_passwd "$new" "$1" >/dev/null
}

add_user plcsense "$secrets/mqtt_worker_password"
add_user plc "$secrets/mqtt_plc_password"
# Made once and kept: a broker that is not restarted with this script keeps the password file it read.
if [ ! -s "$auth/healthcheck.password" ]; then
    head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$auth/healthcheck.password"
fi
add_user healthcheck "$auth/healthcheck.password"

# The broker drops to user mosquitto before it reads the file.
if id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$new"
fi
chmod 0600 "$new"
mv "$new" "$auth/passwd"
echo "mosquitto-users: wrote $auth/passwd (users plcsense, plc, healthcheck)"
