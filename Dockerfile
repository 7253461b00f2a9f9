# syntax=docker/dockerfile:1
#
# Elemta and every plugin of this repository in one image.
#
#   docker build -t elemta .
#   docker run -d --name elemta -p 25:25 -p 587:587 -p 465:465 \
#       -v elemta-data:/var/lib/elemta -v /srv/elemta/elemta.toml:/etc/elemta/elemta.toml:ro \
#       --stop-timeout 90 elemta
#
# The server runs as the user "elemta", never as root. It listens on 25, 587 and 465
# inside the container without any capability: Docker (20.10 and later) and Podman set
# net.ipv4.ip_unprivileged_port_start=0 in a container's own network namespace. Elsewhere
# (Kubernetes, host networking) see docs/how-to/production.md ("Docker").

# ---------------------------------------------------------------- build: wheels
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A C compiler for the dependencies published without a binary wheel (crypt_r, the
# datasource's passwd-file schemes); it stays in this stage. Debian's stable versions
# are not pinned: they change with each security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libcrypt-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY elemta ./elemta
COPY plugins ./plugins

# The core (with uvloop and Redis support) and each plugin under plugins/, and every
# dependency they have, as wheels: the final stage installs from these alone.
RUN python -m pip wheel --wheel-dir /wheels ".[uvloop,redis]" plugins/*/

# ---------------------------------------------------------------- the image
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="Elemta" \
      org.opencontainers.image.description="A plugin-driven SMTP server: MX and submission" \
      org.opencontainers.image.licenses="MIT"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/elemta/bin:$PATH

# The system user, fixed ids so that a volume keeps its owner across image versions;
# /var/lib/elemta (spool, state_dir, databases, mailboxes) is its alone.
RUN groupadd --system --gid 10025 elemta \
    && useradd --system --uid 10025 --gid elemta --home-dir /var/lib/elemta \
       --no-create-home --shell /usr/sbin/nologin elemta \
    && install -d -o elemta -g elemta -m 0700 /var/lib/elemta \
    && install -d -o root -g elemta -m 0750 /etc/elemta

COPY --from=build /wheels /tmp/wheels
RUN python -m venv /opt/elemta \
    && /opt/elemta/bin/pip install --no-index --find-links=/tmp/wheels /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

# An example configuration; mount your own over it (read-only is fine).
COPY --chown=root:elemta --chmod=0640 contrib/docker/elemta.toml /etc/elemta/elemta.toml

VOLUME ["/var/lib/elemta"]
# 25: MX, 587: submission (STARTTLS), 465: submission (implicit TLS),
# 9025: /metrics, /healthz and /readyz: publish it to your monitoring only
EXPOSE 25 587 465 9025

# numeric, so that Kubernetes' runAsNonRoot can check it: the user elemta
USER 10025:10025
# `docker exec elemta elemta queue list` finds ./elemta.toml here
WORKDIR /etc/elemta

HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 \
    CMD ["/opt/elemta/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9025/healthz', timeout=4)"]

# `serve` runs every check of `elemta check-config` first and exits with status 2 on a
# mistake; SIGTERM stops it within [server] shutdown_grace_seconds (give `docker stop`
# at least 90 s: --stop-timeout 90), SIGHUP reloads the TLS certificates.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/elemta/bin/elemta"]
CMD ["serve", "--config", "/etc/elemta/elemta.toml"]
