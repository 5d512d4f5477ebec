# The pipeline image: every stage, the collector and the operator commands.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY agents ./agents
COPY schemas ./schemas
RUN pip install --no-cache-dir . && useradd --system --uid 10001 pipeline && mkdir -p /var/lib/pipeline \
    && chown pipeline /var/lib/pipeline
USER pipeline
ENV PIPELINE_CONFIG=/etc/pipeline/pipeline.toml \
    PIPELINE_KAFKA__CACHE_DIR=/var/lib/pipeline
ENTRYPOINT ["pipeline"]
