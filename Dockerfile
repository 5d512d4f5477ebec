# The pipeline image: every stage, the collector, the lag exporter and the operator commands. The product
# only (the `pipeline` and `agents` packages and the record schemas); the dev kit is not in it.
#
# BASE: any Debian-like image with Python 3.11+ and its venv module. The deploy test builds one from
# Debian's own python3 (deploy/docker/python/Dockerfile) and passes --build-arg BASE=...
ARG BASE=python:3.11-slim

# ---- build: a wheelhouse of the product and every dependency, installed from it into a venv (the
# record schemas ship inside the product's wheel: pipeline/schemas links to schemas/, copied with it)
FROM ${BASE} AS build
# Wheels prepared on the build machine go in deploy/docker/wheelhouse/ (empty in git) and are used
# first. OFFLINE=1 builds from them alone, without a package index (a machine whose registry access
# goes through its own CA, as on the test machines: tests/deploy/test_stack.py builds them on the host).
ARG OFFLINE=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# the dependencies first, in their own layers: a change of the source alone reuses them
COPY deploy/docker/wheelhouse/ /wheelhouse/
COPY pyproject.toml /src/
RUN set -eu; \
    index=""; if [ "$OFFLINE" = 1 ]; then index="--no-index"; fi; \
    python3 -m venv /opt/pipeline; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /src/requirements.txt; \
    /opt/pipeline/bin/pip wheel $index --find-links /wheelhouse --wheel-dir /wheelhouse -r /src/requirements.txt; \
    /opt/pipeline/bin/pip install --no-index --find-links /wheelhouse -r /src/requirements.txt
COPY README.md /src/
COPY pipeline /src/pipeline
COPY agents /src/agents
COPY schemas /src/schemas
RUN set -eu; \
    index=""; if [ "$OFFLINE" = 1 ]; then index="--no-index"; fi; \
    /opt/pipeline/bin/pip wheel $index --find-links /wheelhouse --wheel-dir /wheelhouse --no-deps /src; \
    /opt/pipeline/bin/pip install --no-index --find-links /wheelhouse opencode-panel-pipeline; \
    /opt/pipeline/bin/python -c 'import agents.registry, pipeline.cli.main, pipeline.model.records as r; r.validator("event.v1")'

# ---- runtime: the venv and a non-root user owning every directory a volume mounts
FROM ${BASE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/pipeline --no-create-home \
        --shell /usr/sbin/nologin pipeline \
    && mkdir -p /var/lib/pipeline/collector /etc/pipeline \
    && chown -R pipeline:pipeline /var/lib/pipeline
COPY --from=build /opt/pipeline /opt/pipeline
USER pipeline
WORKDIR /var/lib/pipeline
ENV PATH=/opt/pipeline/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIPELINE_CONFIG=/etc/pipeline/pipeline.toml \
    PIPELINE_KAFKA__CACHE_DIR=/var/lib/pipeline
# metrics and /healthz (--metrics-port in docker-compose.yml)
EXPOSE 9100
ENTRYPOINT ["pipeline"]
