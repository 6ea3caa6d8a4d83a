#!/bin/sh
# Creates the compose stack's secrets in deploy/secrets/ (or the directory given): random passwords for the
# worker's and the PLCs' MQTT users and for Grafana's admin, and an empty SMTP password for Alertmanager
# (write your relay's password into it). Existing files are kept, so running it again changes nothing.
#
# The directory is private to its owner (0700); the files in it are 0644 because compose mounts them into
# containers that run as other users (worker 10001, Grafana 472, Alertmanager nobody).
set -eu

dir=${1:-$(dirname "$0")/secrets}
mkdir -p "$dir"
chmod 0700 "$dir"

random_password() {
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'
}

for name in mqtt_worker_password mqtt_plc_password grafana_admin_password smtp_password; do
    file="$dir/$name"
    if [ -e "$file" ]; then
        echo "kept    $file"
        continue
    fi
    if [ "$name" = smtp_password ]; then
        : >"$file"
    else
        random_password >"$file"
    fi
    chmod 0644 "$file"
    echo "created $file"
done
