# The hoopgw gateway as a container image: a slim Python base, the package
# built into wheels in a throwaway stage, run as an unprivileged user by
# twistd.  See docs/operations.rst.
#
#   docker build -t hoopgw .
#   docker run --rm -v /etc/hoopgw:/etc/hoopgw:ro -v hoopgw-state:/var/lib/hoopgw \
#       -v hoopgw-audit:/var/lib/hoopgw/audit -p 15432:15432 hoopgw
#
# The configuration and its keys are mounted read-only at /etc/hoopgw
# (hoopgw.yaml by default; give another with --config); the state and the
# record are volumes.

FROM python:3.11-slim-bookworm AS build
# Compilers and libpq's headers build psycopg2; they stay in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libpq-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg pyproject.toml README.rst ./
COPY hoopgw ./hoopgw
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# libpq for the PostgreSQL store; nothing else from the system.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 hoopgw \
    && useradd --system --uid 10001 --gid hoopgw --home-dir /var/lib/hoopgw --shell /usr/sbin/nologin hoopgw \
    && mkdir -p /etc/hoopgw /var/lib/hoopgw/audit \
    && chown -R hoopgw:hoopgw /var/lib/hoopgw \
    && chmod 0750 /var/lib/hoopgw /var/lib/hoopgw/audit
COPY --from=build /wheels /wheels
# The plugin cache is written now, as root: the unprivileged user cannot
# write into site-packages at run time.  The wheels are this checkout's and
# its dependencies', built above: nothing to pin here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links=/wheels hoopgw \
    && rm -rf /wheels \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && hoopgw --version
# Numeric, so that runAsNonRoot (Kubernetes) can tell it is not root.
USER 10001:10001
WORKDIR /var/lib/hoopgw
# The state (host keys, caches) and the record: keep both; give the record
# its own disk if you can.
VOLUME ["/var/lib/hoopgw", "/var/lib/hoopgw/audit"]
# PostgreSQL, SSH, Kubernetes API, admin API: whatever the configuration says.
EXPOSE 15432 2222 16443 8443
# twistd stops cleanly on SIGTERM and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["twistd", "--reactor=asyncio", "--nodaemon", "--pidfile=", "hoopgw"]
CMD ["--config", "/etc/hoopgw/hoopgw.yaml"]
