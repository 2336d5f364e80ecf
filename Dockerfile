# smtp-relay: a small image running `python smtp_relay.py` as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_FILE=/var/log/smtp-relay/smtp-relay.log

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --uid 1000 --home-dir /app --shell /usr/sbin/nologin relay \
    && mkdir -p /var/log/smtp-relay /etc/certs \
    && chown relay /var/log/smtp-relay
COPY smtp_relay.py .

USER relay
EXPOSE 1025
# Healthy while the listener answers SMTP: greeting, NOOP, QUIT.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, smtplib; s = smtplib.SMTP('127.0.0.1', int(os.environ.get('LISTEN_PORT') or 1025), timeout=8); s.noop(); s.quit()"]
CMD ["python", "smtp_relay.py"]
