#!/bin/bash
# Single KRaft node (broker + controller) configured like the apache/kafka image: every KAFKA_<NAME>
# variable becomes the property <name> in lower case, `_` -> `.`, `__` -> `_`, `___` -> `-`
# (KAFKA_LOG_DIRS -> log.dirs). CLUSTER_ID names the cluster when the storage is formatted.
#
# Secured (docker-compose.yml sets SCRAM_USERNAME_TEMPLATE; it mounts this script into apache/kafka too):
# - SCRAM_PASSWORD_<ROLE> (one per pipeline role: INGEST, ..., COLLECTOR, OPERATOR, LAG, ADMIN) becomes the
#   SCRAM-SHA-256 and -512 credentials of the user SCRAM_USERNAME_TEMPLATE names with {role} replaced by
#   the role in lower case (`pipeline-{role}` -> pipeline-ingest), created when the storage is formatted
#   (`kafka-storage format --add-scram`): on the first start of an empty data volume only;
# - the broker authenticates to its own inter-broker listener as the admin user (a super user), with the
#   SCRAM login written here; the controller listener (SASL_PLAINTEXT, PLAIN, inside this container only)
#   gets a user `controller` with a password made at every start;
# - the key store password comes from $BROKER_TLS_DIR/broker.password (deploy/docker/kafka/kafka-certs.sh);
# - /tmp/kafka-client.properties: the admin's client settings, for the health check (kafka-health.sh) and
#   for the Kafka tools run by hand (`kafka-configs.sh --command-config /tmp/kafka-client.properties`).
# The files holding passwords are readable by the broker's user only; no password is printed.
set -euo pipefail
umask 077
conf_dir=/opt/kafka/config
[ -w "$conf_dir" ] || conf_dir=$(mktemp -d)
conf=$conf_dir/server.properties
classpath='/opt/kafka/libs/*'
say() { echo "kafka-run: $*" >&2; }
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
property() { sed -n "s/^$1=//p" "$conf" | tail -n 1; }

scram=()
if [ -n "${SCRAM_USERNAME_TEMPLATE:-}" ]; then
    user_of() { local role; role=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]'); printf '%s' "${SCRAM_USERNAME_TEMPLATE//\{role\}/$role}"; }
    for name in $(compgen -e); do
        case "$name" in SCRAM_PASSWORD_*) ;; *) continue ;; esac
        password=${!name}
        # the password goes into --add-scram and a JAAS line: no quotes, commas or brackets (hex is safe)
        if ! [[ "$password" =~ ^[A-Za-z0-9._~+/-]{16,}$ ]]; then
            say "$name must be at least 16 characters of A-Z a-z 0-9 . _ ~ + / - (make one with: openssl rand -hex 24)"
            exit 2
        fi
        user=$(user_of "${name#SCRAM_PASSWORD_}")
        for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
            scram+=(--add-scram "$mechanism=[name=$user,password=$password]")
        done
    done
    admin=$(user_of ADMIN)
    admin_password=${SCRAM_PASSWORD_ADMIN:?SCRAM_PASSWORD_ADMIN is not set (KAFKA_SASL_PASSWORD_ADMIN in .env)}
    tls_dir=${BROKER_TLS_DIR:-/etc/kafka/tls}
    if [ ! -r "$tls_dir/broker.password" ]; then
        say "$tls_dir/broker.password is missing: the kafka-certs service makes it (docker compose run --rm kafka-certs)"
        exit 2
    fi
    inter=$(property inter.broker.listener.name | tr '[:upper:]' '[:lower:]')
    controller=$(property controller.listener.names | cut -d, -f1 | tr '[:upper:]' '[:lower:]')
    controller_password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    scram_login=org.apache.kafka.common.security.scram.ScramLoginModule
    plain_login=org.apache.kafka.common.security.plain.PlainLoginModule
    {
        printf 'ssl.keystore.password=%s\nssl.key.password=%s\n' "$(cat "$tls_dir/broker.password")" "$(cat "$tls_dir/broker.password")"
        for mechanism in scram-sha-256 scram-sha-512; do
            printf 'listener.name.%s.%s.sasl.jaas.config=%s required username="%s" password="%s";\n' \
                "$inter" "$mechanism" "$scram_login" "$admin" "$admin_password"
        done
        printf 'listener.name.%s.plain.sasl.jaas.config=%s required username="controller" password="%s" user_controller="%s";\n' \
            "$controller" "$plain_login" "$controller_password" "$controller_password"
    } >> "$conf"
    # the admin's client settings, bootstrapping from the listener the broker advertises for itself
    advertised=$(property advertised.listeners | tr ',' '\n' | sed -n "s#^$(printf '%s' "$inter" | tr '[:lower:]' '[:upper:]')://##p" | head -n 1)
    client=/tmp/kafka-client.properties
    {
        printf 'bootstrap.servers=%s\n' "$advertised"
        printf 'security.protocol=%s\n' "$(property listener.security.protocol.map | tr ',' '\n' \
            | sed -n "s/^$(printf '%s' "$inter" | tr '[:lower:]' '[:upper:]')://p" | head -n 1)"
        printf 'sasl.mechanism=%s\n' "$(property sasl.mechanism.inter.broker.protocol)"
        printf 'sasl.jaas.config=%s required username="%s" password="%s";\n' "$scram_login" "$admin" "$admin_password"
        printf 'ssl.truststore.type=PEM\nssl.truststore.location=%s\n' "$(property ssl.truststore.location)"
    } > "$client"
fi

java=(java ${KAFKA_HEAP_OPTS:--Xmx512m -Xms128m} -XX:+UseSerialGC
      "-Dorg.slf4j.simpleLogger.defaultLogLevel=${KAFKA_LOG_LEVEL:-warn}" ${KAFKA_OPTS:-} -cp "$classpath")
# apache/kafka logs through log4j2 and ships its configuration; the local image logs through slf4j-simple
[ -f /opt/kafka/config/log4j2.yaml ] && java+=("-Dlog4j2.configurationFile=/opt/kafka/config/log4j2.yaml")
if [ ! -f "$log_dir/meta.properties" ]; then
    "${java[@]}" kafka.tools.StorageTool format -t "${CLUSTER_ID:-5L6g3nShT-eMCtK--X86sw}" -c "$conf" "${scram[@]}" \
        | sed -e 's/password=[^],]*/password=***/g' \
              -e 's/^Bootstrap metadata: .*UserScramCredentialRecord.*/Bootstrap metadata: (with the SCRAM credentials, not shown)/'
    [ "${#scram[@]}" -eq 0 ] || say "formatted with the SCRAM users of SCRAM_USERNAME_TEMPLATE ($(( ${#scram[@]} / 4 )) users)"
elif [ "${#scram[@]}" -gt 0 ]; then
    say "storage already formatted: the SCRAM users are the ones it was formatted with (see the README to add or rotate one)"
fi
say "starting the broker with $conf"
exec "${java[@]}" kafka.Kafka "$conf"
