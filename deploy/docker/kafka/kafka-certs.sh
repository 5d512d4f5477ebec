#!/bin/bash
# The broker's TLS material for docker-compose.yml, made with the Kafka image's own `keytool` (compose
# service `kafka-certs`, a one-shot run as root before `kafka` starts; every `up` runs it, and it makes only
# what is missing):
#   /pki  (volume kafka-pki, mounted here only): the CA's key store ca.p12 and its password
#   /tls  (volume kafka-tls, the broker's, read-only there): broker.p12 (the broker's key and certificate
#         chain, PKCS12), broker.password (its password, random), ca.pem; owned by the broker's uid, 0600
#   /ca   (volume kafka-ca, every client's, read-only there): ca.pem, the CA certificate clients trust
# The broker certificate names KAFKA_CERT_SAN (keytool's SAN syntax, `dns:kafka,ip:127.0.0.1`); it is made
# again when that list changes. RENEW=broker makes a new broker certificate from the same CA (clients keep
# trusting it; restart kafka after), RENEW=ca a new CA and certificate (restart everything after).
# Nothing secret is printed: the passwords are random and stay in the volumes.
set -euo pipefail
umask 077
pki=/pki tls=/tls ca_out=/ca
san=${KAFKA_CERT_SAN:-dns:kafka,dns:localhost,ip:127.0.0.1}
broker_uid=${BROKER_UID:-1000}
ca_days=${CA_DAYS:-3650}
cert_days=${CERT_DAYS:-825}
keytool=keytool
command -v keytool >/dev/null 2>&1 || keytool="${JAVA_HOME:?no keytool on PATH and no JAVA_HOME}/bin/keytool"

say() { echo "kafka-certs: $*" >&2; }
random() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

case "${RENEW:-}" in
    "") ;;
    broker) rm -f "$tls/broker.p12" ;;
    ca) rm -f "$pki/ca.p12" "$tls/broker.p12" ;;
    *) say "RENEW must be broker or ca, not '${RENEW}'"; exit 2 ;;
esac

if [ ! -s "$pki/ca.p12" ] || [ ! -s "$pki/ca.password" ]; then
    say "making a new CA (valid $ca_days days)"
    rm -f "$pki/ca.p12" "$tls/broker.p12"
    random > "$pki/ca.password"
    "$keytool" -genkeypair -noprompt -alias ca -keyalg RSA -keysize 3072 -validity "$ca_days" \
        -dname "CN=opencode-panel-pipeline Kafka CA" -ext bc:c=ca:true,pathlen:0 -ext ku:c=keyCertSign,cRLSign \
        -keystore "$pki/ca.p12" -storetype PKCS12 -storepass:file "$pki/ca.password" 2>/dev/null
fi
"$keytool" -exportcert -rfc -alias ca -keystore "$pki/ca.p12" -storepass:file "$pki/ca.password" \
    -file "$pki/ca.pem" 2>/dev/null

if [ ! -s "$tls/broker.p12" ] || [ ! -s "$tls/broker.password" ] || [ "$(cat "$tls/san" 2>/dev/null)" != "$san" ] \
        || ! cmp -s "$pki/ca.pem" "$tls/ca.pem"; then
    say "making the broker certificate for $san (valid $cert_days days)"
    rm -f "$tls/broker.p12"
    random > "$tls/broker.password"
    work=$(mktemp -d)
    "$keytool" -genkeypair -noprompt -alias broker -keyalg RSA -keysize 2048 -validity "$cert_days" \
        -dname "CN=kafka" -keystore "$tls/broker.p12" -storetype PKCS12 -storepass:file "$tls/broker.password" 2>/dev/null
    "$keytool" -certreq -alias broker -keystore "$tls/broker.p12" -storepass:file "$tls/broker.password" \
        -file "$work/broker.csr" 2>/dev/null
    "$keytool" -gencert -rfc -alias ca -keystore "$pki/ca.p12" -storepass:file "$pki/ca.password" \
        -infile "$work/broker.csr" -outfile "$work/broker.pem" -validity "$cert_days" \
        -ext "SAN=$san" -ext ku:c=digitalSignature,keyEncipherment -ext eku=serverAuth,clientAuth 2>/dev/null
    "$keytool" -importcert -noprompt -trustcacerts -alias ca -file "$pki/ca.pem" -keystore "$tls/broker.p12" \
        -storepass:file "$tls/broker.password" 2>/dev/null
    "$keytool" -importcert -noprompt -alias broker -file "$work/broker.pem" -keystore "$tls/broker.p12" \
        -storepass:file "$tls/broker.password" 2>/dev/null
    rm -rf "$work"
    printf '%s' "$san" > "$tls/san"
fi

cp "$pki/ca.pem" "$tls/ca.pem"
cp "$pki/ca.pem" "$ca_out/ca.pem"
chown "$broker_uid" "$tls/broker.p12" "$tls/broker.password" "$tls/ca.pem" "$tls/san"
chmod 0600 "$tls/broker.p12" "$tls/broker.password"
chmod 0644 "$tls/ca.pem" "$tls/san" "$ca_out/ca.pem"
chmod 0755 "$tls" "$ca_out"
chmod 0700 "$pki"
say "ready: CA certificate in the kafka-ca volume, broker key store in kafka-tls"
