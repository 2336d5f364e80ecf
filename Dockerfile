# smtp-relay: a small image running `python smtp_relay.py` as an unprivileged user.
# Python 3.11: aiosmtpd 1.4.6 (requirements.txt) runs on 3.8-3.13 but not on 3.14, which
# removed typing.ByteString that it imports (aio-libs/aiosmtpd#549); 3.11 is also what the
# tests run on. Debian bookworm, as the stand-in ../shared/container/base-image.sh builds.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_FILE=/var/log/smtp-relay/smtp-relay.log \
    QUEUE_URL=sqlite:////var/spool/smtp-relay/queue.db \
    HTTP_PORT=8080

WORKDIR /app
COPY requirements.txt .
# The relay's user and group are uid/gid 1000 (deploy/docker-entrypoint.sh drops to them);
# setpriv comes with util-linux, which every Debian image has: the build checks it.
RUN pip install --no-cache-dir -r requirements.txt \
    && groupadd --system --gid 1000 relay \
    && useradd --system --uid 1000 --gid relay --home-dir /app --shell /usr/sbin/nologin relay \
    && mkdir -p /var/log/smtp-relay /var/spool/smtp-relay /etc/certs \
    && chown relay:relay /var/log/smtp-relay /var/spool/smtp-relay \
    && setpriv --version
COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
COPY smtp_relay.py .
COPY relay relay

# Unprivileged by default. Started as root instead (docker-compose.yml's prepare-dirs, or
# `docker run --user 0`), the entrypoint gives the mounted log and spool directories to
# uid 1000 and then runs the command as uid 1000.
USER 1000:1000
EXPOSE 1025 8080
# Healthy while the SMTP listener accepts connections (/healthz on HTTP_PORT).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('HTTP_PORT') or 8080), timeout=8)"]
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["python", "smtp_relay.py"]
