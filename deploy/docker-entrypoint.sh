#!/bin/sh
# The image's entrypoint. Started as root (docker-compose.yml's one-shot prepare-dirs
# service, or `docker run --user 0`): gives the directories the relay writes to the
# relay's user (uid/gid 1000, made in the Dockerfile), so a bind mount such as ./logs
# works whoever owns it on the host, then runs the command as that user via setpriv
# (util-linux). Started as any other user (the image's default, or compose's `user:`):
# runs the command as it is.
# Prepared: the directory of LOG_FILE (and the log file with its rotations) and, when it
# exists, /var/spool/smtp-relay. Nothing else is touched; nothing recursive but the spool.
set -eu
uid=1000
gid=1000

if [ "$(id -u)" = 0 ]; then
    if [ -n "${LOG_FILE:-}" ]; then
        dir=$(dirname -- "$LOG_FILE")
        mkdir -p -- "$dir"
        [ "$(stat -c %u -- "$dir")" = "$uid" ] || chown "$uid:$gid" -- "$dir" \
            || echo "smtp-relay entrypoint: cannot chown $dir (read-only mount?)" >&2
        find "$dir" -maxdepth 1 -type f -name "$(basename -- "$LOG_FILE")*" \
            ! -user "$uid" -exec chown -h "$uid:$gid" -- {} + \
            || echo "smtp-relay entrypoint: cannot chown the log files in $dir" >&2
    fi
    if [ -d /var/spool/smtp-relay ]; then
        find /var/spool/smtp-relay -xdev ! -user "$uid" -exec chown -h "$uid:$gid" -- {} + \
            || echo "smtp-relay entrypoint: cannot chown /var/spool/smtp-relay" >&2
    fi
    home=$(getent passwd "$uid" | cut -d: -f6) || home=
    [ -z "$home" ] || export HOME="$home"
    exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs -- "$@"
fi

if [ -n "${LOG_FILE:-}" ]; then
    dir=$(dirname -- "$LOG_FILE")
    if [ -d "$dir" ] && ! [ -w "$dir" ]; then
        echo "smtp-relay entrypoint: $dir is not writable by uid $(id -u):" \
             "start the container once as root (it prepares the directory, then runs as" \
             "uid $uid), or chown it on the host" >&2
    fi
fi
exec "$@"
