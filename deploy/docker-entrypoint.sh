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

say() { echo "smtp-relay entrypoint: $*" >&2; }

# A directory of its own, never a system one: LOG_FILE=/var/log/relay.log, or a bare
# file name (the working directory: the code), would otherwise go to the relay's user.
dedicated() {
    case $1 in
        /bin*|/boot*|/dev*|/etc*|/lib*|/proc*|/sbin*|/sys*|/usr*) return 1 ;;
        /var/cache|/var/lib|/var/log|/var/run|/var/spool|/var/tmp) return 1 ;;
        /*/*) return 0 ;;
        *) return 1 ;;    # / and top-level directories: /app, /tmp, /var, /home...
    esac
}

prepare_log_dir() {
    dir=$(dirname -- "$LOG_FILE")
    mkdir -p -- "$dir"
    real=$(cd -P -- "$dir" && pwd)
    if ! dedicated "$real"; then
        say "not giving $real to uid $uid (not a directory of its own): point LOG_FILE" \
            "into one, as /var/log/smtp-relay/"
        return 0
    fi
    [ "$(stat -c %u -- "$real")" = "$uid" ] || chown "$uid:$gid" -- "$real" \
        || say "cannot chown $real (read-only mount?)"
    find "$real" -maxdepth 1 -type f -name "$(basename -- "$LOG_FILE")*" \
        ! -user "$uid" -exec chown -h "$uid:$gid" -- {} + \
        || say "cannot chown the log files in $real"
}

if [ "$(id -u)" = 0 ]; then
    [ -z "${LOG_FILE:-}" ] || prepare_log_dir
    if [ -d /var/spool/smtp-relay ]; then
        find /var/spool/smtp-relay -xdev ! -user "$uid" -exec chown -h "$uid:$gid" -- {} + \
            || say "cannot chown /var/spool/smtp-relay"
    fi
    home=$(getent passwd "$uid" | cut -d: -f6) || home=
    [ -z "$home" ] || export HOME="$home"
    exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs -- "$@"
fi

if [ -n "${LOG_FILE:-}" ]; then
    dir=$(dirname -- "$LOG_FILE")
    if [ -d "$dir" ] && ! [ -w "$dir" ]; then
        say "$dir is not writable by uid $(id -u): start the container once as root" \
            "(it prepares the directory, then runs as uid $uid), or chown it on the host"
    fi
fi
exec "$@"
