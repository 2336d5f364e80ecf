# smtp-relay: a small image running `python smtp_relay.py` as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_FILE=/var/log/smtp-relay/smtp-relay.log \
    HTTP_PORT=8080

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --uid 1000 --home-dir /app --shell /usr/sbin/nologin relay \
    && mkdir -p /var/log/smtp-relay /etc/certs \
    && chown relay /var/log/smtp-relay
COPY smtp_relay.py .

USER relay
EXPOSE 1025 8080
# Healthy while the SMTP listener accepts connections (/healthz on HTTP_PORT).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('HTTP_PORT') or 8080), timeout=8)"]
CMD ["python", "smtp_relay.py"]
