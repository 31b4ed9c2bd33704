# Spina agent image: runs as a sidecar beside a pod, or as one server node of a Raft cluster.
# Build stage compiles the Cython extensions into a wheel; the runtime stage installs only that wheel.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY spina_fast ./spina_fast
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/spina --create-home spina
USER spina
WORKDIR /var/lib/spina
VOLUME ["/var/lib/spina"]
# HTTP API, DNS (UDP and TCP), Raft peer traffic.
EXPOSE 8700/tcp 8600/udp 8600/tcp 8701/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import json, sys, urllib.request; sys.exit(0 if json.load(urllib.request.urlopen('http://127.0.0.1:8700/v1/status/leader', timeout=2)) else 1)"]
ENTRYPOINT ["spina", "agent"]
CMD ["--data-dir", "/var/lib/spina/data", "--http-addr", "0.0.0.0:8700", "--dns-addr", "0.0.0.0:8600", "--raft-addr", "0.0.0.0:8701"]
