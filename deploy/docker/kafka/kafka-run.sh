#!/bin/bash
# Single KRaft node (broker + controller) configured like the apache/kafka image: every KAFKA_<NAME>
# variable becomes the property <name> in lower case, `_` -> `.`, `__` -> `_`, `___` -> `-`
# (KAFKA_LOG_DIRS -> log.dirs). CLUSTER_ID names the cluster when the storage is formatted.
set -euo pipefail
conf=/opt/kafka/config/server.properties
classpath='/opt/kafka/libs/*'
: > "$conf"
for name in $(compgen -e); do
    case "$name" in
        KAFKA_HEAP_OPTS | KAFKA_OPTS | KAFKA_LOG_LEVEL) continue ;;
        KAFKA_*) ;;
        *) continue ;;
    esac
    key=$(printf '%s' "${name#KAFKA_}" | tr '[:upper:]' '[:lower:]' \
        | sed -e 's/___/-/g' -e 's/__/@/g' -e 's/_/./g' -e 's/@/_/g')
    printf '%s=%s\n' "$key" "${!name}" >> "$conf"
done
grep -q '^log.dirs=' "$conf" || echo "log.dirs=/var/lib/kafka/data" >> "$conf"
log_dir=$(sed -n 's/^log.dirs=//p' "$conf" | cut -d, -f1)
java=(java ${KAFKA_HEAP_OPTS:--Xmx512m -Xms128m} -XX:+UseSerialGC
      "-Dorg.slf4j.simpleLogger.defaultLogLevel=${KAFKA_LOG_LEVEL:-warn}" ${KAFKA_OPTS:-} -cp "$classpath")
if [ ! -f "$log_dir/meta.properties" ]; then
    "${java[@]}" kafka.tools.StorageTool format -t "${CLUSTER_ID:-5L6g3nShT-eMCtK--X86sw}" -c "$conf"
fi
echo "kafka-run: starting the broker with $conf" >&2
exec "${java[@]}" kafka.Kafka "$conf"
