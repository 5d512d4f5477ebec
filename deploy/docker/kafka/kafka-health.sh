#!/bin/bash
# docker-compose.yml's health check of the secured broker: an authenticated request over its SASL_SSL
# listener, as the admin, with the client settings kafka-run.sh wrote (/tmp/kafka-client.properties).
# apache/kafka runs kafka-broker-api-versions.sh; the local image (Kafka's jars, no scripts:
# deploy/docker/kafka/Dockerfile) describes the broker's configuration with the same settings instead.
set -euo pipefail
props=/tmp/kafka-client.properties
bootstrap=$(sed -n 's/^bootstrap.servers=//p' "$props")
if [ -x /opt/kafka/bin/kafka-broker-api-versions.sh ]; then
    exec /opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server "$bootstrap" --command-config "$props" >/dev/null 2>&1
fi
exec java -Xmx64m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Dorg.slf4j.simpleLogger.defaultLogLevel=error \
    -cp '/opt/kafka/libs/*' kafka.admin.ConfigCommand --bootstrap-server "$bootstrap" --command-config "$props" \
    --describe --entity-type brokers --entity-name "${KAFKA_NODE_ID:-1}" >/dev/null 2>&1
