{{/* Names and labels */}}
{{- define "opp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "opp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "opp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "opp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "opp.labels" -}}
{{ include "opp.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: opencode-panel-pipeline
{{- end -}}

{{- define "opp.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The stages, in pipeline order: pipeline.topics.PIPELINE_STAGES, with their input topic
     (pipeline.topics.STAGES[name].input) and consumer group (STAGES[name].app_id). */}}
{{- define "opp.stages" -}}
{{- toJson (list
  (dict "name" "ingest" "input" "opencode.events")
  (dict "name" "sample" "input" "sessions.idle")
  (dict "name" "scrub" "input" "traces.sampled")
  (dict "name" "sign" "input" "traces.scrubbed")
  (dict "name" "breaker" "input" "traces.signed")
  (dict "name" "deliver" "input" "traces.outbox")) -}}
{{- end -}}

{{- define "opp.consumerGroup" -}}
{{- printf "panel-pipeline-%s" . -}}
{{- end -}}

{{/* The topic table, from files/topics.json (`python -m pipeline.topics`). */}}
{{- define "opp.topics" -}}
{{- .Files.Get "files/topics.json" -}}
{{- end -}}

{{/* Partitions of one topic: the table's, or kafka.partitions. Args: (list $ topicName) */}}
{{- define "opp.partitions" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $found := "" -}}
{{- range (include "opp.topics" $root | fromJsonArray) -}}
{{- if eq .name $name -}}
{{- $found = ternary $root.Values.kafka.partitions .partitions (kindIs "invalid" .partitions) | int | toString -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "topic %s is not in files/topics.json: regenerate it with `python -m pipeline.topics`" $name) -}}
{{- end -}}
{{- $found -}}
{{- end -}}

{{/* The most replicas of a stage: maxReplicas, or its input's partitions; fails above that.
     Args: (list $ stage) where stage is a dict from opp.stages */}}
{{- define "opp.maxReplicas" -}}
{{- $root := index . 0 -}}
{{- $stage := index . 1 -}}
{{- $values := index $root.Values.stages $stage.name -}}
{{- $partitions := include "opp.partitions" (list $root $stage.input) | int -}}
{{- $max := $partitions -}}
{{- if not (kindIs "invalid" $values.maxReplicas) -}}
{{- $max = $values.maxReplicas | int -}}
{{- end -}}
{{- if gt $max $partitions -}}
{{- fail (printf "stages.%s.maxReplicas is %d but its input topic %s has %d partitions: a consumer group never has more active members than partitions (raise kafka.partitions, or lower maxReplicas)" $stage.name $max $stage.input $partitions) -}}
{{- end -}}
{{- if gt ($values.minReplicas | int) $max -}}
{{- fail (printf "stages.%s.minReplicas (%d) is above its maxReplicas (%d)" $stage.name ($values.minReplicas | int) $max) -}}
{{- end -}}
{{- $max -}}
{{- end -}}

{{/* pipeline.toml for the stages (no hosts) or for one collector. Args: (list $ hosts) with
     hosts a list of host entries or nil for the stages. */}}
{{- define "opp.pipelineToml" -}}
{{- $root := index . 0 -}}
{{- $hosts := index . 1 -}}
{{- $cfg := deepCopy $root.Values.config -}}
{{- $kafka := get $cfg "kafka" | default dict -}}
{{- $_ := set $kafka "bootstrap" $root.Values.kafka.bootstrapServers -}}
{{- $_ := set $kafka "partitions" ($root.Values.kafka.partitions | int) -}}
{{- $_ := set $kafka "replication" ($root.Values.kafka.replication | int) -}}
{{- $sec := $root.Values.kafka.security -}}
{{- $_ := set $kafka "security_protocol" $sec.protocol -}}
{{- if hasPrefix "SASL_" $sec.protocol -}}
{{- $_ := set $kafka "sasl_mechanism" $sec.saslMechanism -}}
{{- $_ := set $kafka "sasl_username" $sec.usernameTemplate -}}
{{- end -}}
{{- if hasSuffix "SSL" $sec.protocol -}}
{{- $_ := set $kafka "ssl_check_hostname" $sec.checkHostname -}}
{{- if or $sec.ca.secret $sec.ca.configMap -}}
{{- $_ := set $kafka "ssl_cafile" (include "opp.kafkaCaFile" $root) -}}
{{- end -}}
{{- if $sec.clientCert.secret -}}
{{- $_ := set $kafka "ssl_certfile" (include "opp.kafkaCertFile" $root) -}}
{{- $_ := set $kafka "ssl_keyfile" (include "opp.kafkaKeyFile" $root) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "kafka" $kafka -}}
{{- $_ := set $cfg "metrics" (dict "host" "0.0.0.0" "port" 9100) -}}
{{- if kindIs "slice" $hosts -}}
{{- $entries := list -}}
{{- range $hosts -}}
{{- $entries = append $entries (omit . "passwordSecret") -}}
{{- end -}}
{{- $_ := set $cfg "hosts" $entries -}}
{{- end -}}
{{- include "opp.wholeNumbers" $cfg -}}
{{- toToml $cfg -}}
{{- end -}}

{{/* YAML values reach templates as float64: 25 would be written `25.0`, which an integer key
     refuses. Rewrites, in place, every whole number of a map (and of its maps and lists) as an
     integer; a float key accepts an integer. */}}
{{- define "opp.wholeNumbers" -}}
{{- $map := . -}}
{{- range $key, $value := $map -}}
{{- if kindIs "map" $value -}}
{{- include "opp.wholeNumbers" $value -}}
{{- else if kindIs "slice" $value -}}
{{- $items := list -}}
{{- range $value -}}
{{- if kindIs "map" . -}}
{{- include "opp.wholeNumbers" . -}}
{{- $items = append $items . -}}
{{- else if and (kindIs "float64" .) (eq (. | int64 | float64) .) -}}
{{- $items = append $items (. | int64) -}}
{{- else -}}
{{- $items = append $items . -}}
{{- end -}}
{{- end -}}
{{- $_ := set $map $key $items -}}
{{- else if and (kindIs "float64" $value) (eq ($value | int64 | float64) $value) -}}
{{- $_ := set $map $key ($value | int64) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The collectors: [{name: "main", hosts: [host entries]}] when there are hosts, else []. One
     Deployment whose replicas share every host through Kafka group membership; fails on a host
     listed twice. */}}
{{- define "opp.collectors" -}}
{{- $byName := dict -}}
{{- range .Values.hosts -}}
{{- if hasKey $byName .name -}}
{{- fail (printf "hosts: %s is listed twice" .name) -}}
{{- end -}}
{{- $_ := set $byName .name . -}}
{{- end -}}
{{- $collectors := list -}}
{{- if .Values.hosts -}}
{{- $collectors = list (dict "name" "main" "hosts" .Values.hosts) -}}
{{- end -}}
{{- toJson $collectors -}}
{{- end -}}

{{/* The pod's security context and the container's: non-root uid 10001, read-only root. */}}
{{- define "opp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "opp.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "opp.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
readinessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
{{- end -}}

{{- define "opp.podExtras" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* ---- Kafka security: kafka.security, the same [kafka] keys every pipeline process reads. */}}

{{/* Fails on values that cannot work together (the schema checks each on its own). */}}
{{- define "opp.kafkaChecks" -}}
{{- $sec := .Values.kafka.security -}}
{{- $sasl := hasPrefix "SASL_" $sec.protocol -}}
{{- $tls := hasSuffix "SSL" $sec.protocol -}}
{{- if and $sasl (not $sec.passwordSecret.name) (not .Values.kafka.credentialsSecret) -}}
{{- fail (printf "kafka.security.protocol %s needs kafka.security.passwordSecret.name: an existing Secret with each role's SASL password (\"{role}\" in the name or the key is the role), never a value here" $sec.protocol) -}}
{{- end -}}
{{- if and (eq $sec.protocol "SASL_PLAINTEXT") (eq $sec.saslMechanism "PLAIN") -}}
{{- fail "kafka.security.saslMechanism PLAIN over SASL_PLAINTEXT would send every password in the clear: use SCRAM-SHA-512 or SASL_SSL" -}}
{{- end -}}
{{- if and $sec.ca.secret $sec.ca.configMap -}}
{{- fail "kafka.security.ca: a secret or a configMap, not both" -}}
{{- end -}}
{{- if and (not $tls) (or $sec.ca.secret $sec.ca.configMap $sec.clientCert.secret) -}}
{{- fail (printf "kafka.security.ca and clientCert are for TLS: kafka.security.protocol is %s (SSL or SASL_SSL use them)" $sec.protocol) -}}
{{- end -}}
{{- if .Values.topicsJob.acls -}}
{{- if not $sasl -}}
{{- fail (printf "topicsJob.acls grants ACLs to SASL principals: kafka.security.protocol is %s (use SASL_SSL)" $sec.protocol) -}}
{{- end -}}
{{- if not (contains "{role}" $sec.usernameTemplate) -}}
{{- fail (printf "topicsJob.acls: kafka.security.usernameTemplate %q gives every role the same principal, so no ACL can tell the stages apart; use one with {role} (pipeline-{role})" $sec.usernameTemplate) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The env entry of a role's SASL password, KAFKA_SASL_PASSWORD_<ROLE>, from the Secret
     kafka.security.passwordSecret names ({role} in its name or key replaced); nothing when the
     protocol has no SASL or no Secret is named. Args: (list $ role) */}}
{{- define "opp.kafkaPasswordEnv" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $sec := $root.Values.kafka.security -}}
{{- if and (hasPrefix "SASL_" $sec.protocol) $sec.passwordSecret.name }}
- name: KAFKA_SASL_PASSWORD_{{ $role | upper }}
  valueFrom:
    secretKeyRef: {name: {{ replace "{role}" $role $sec.passwordSecret.name | quote }}, key: {{ replace "{role}" $role $sec.passwordSecret.key | quote }}}
{{- end }}
{{- end -}}

{{/* The CA and the client certificate files, where the rendered [kafka] ssl_* keys name them. */}}
{{- define "opp.kafkaCaFile" -}}/etc/kafka-tls/ca/ca.crt{{- end -}}
{{- define "opp.kafkaCertFile" -}}/etc/kafka-tls/client/tls.crt{{- end -}}
{{- define "opp.kafkaKeyFile" -}}/etc/kafka-tls/client/tls.key{{- end -}}

{{- define "opp.kafkaVolumeMounts" -}}
{{- $sec := .Values.kafka.security -}}
{{- if or $sec.ca.secret $sec.ca.configMap }}
- {name: kafka-ca, mountPath: /etc/kafka-tls/ca, readOnly: true}
{{- end }}
{{- if $sec.clientCert.secret }}
- {name: kafka-client-cert, mountPath: /etc/kafka-tls/client, readOnly: true}
{{- end }}
{{- end -}}

{{- define "opp.kafkaVolumes" -}}
{{- $sec := .Values.kafka.security -}}
{{- if or $sec.ca.secret $sec.ca.configMap }}
# the operator's Secret or ConfigMap (cert-manager's trust bundle, say), one way for both: projected
- name: kafka-ca
  projected:
    sources:
      {{- if $sec.ca.secret }}
      - secret: {name: {{ $sec.ca.secret }}, items: [{key: {{ $sec.ca.key | quote }}, path: ca.crt}]}
      {{- else }}
      - configMap: {name: {{ $sec.ca.configMap }}, items: [{key: {{ $sec.ca.key | quote }}, path: ca.crt}]}
      {{- end }}
{{- end }}
{{- if $sec.clientCert.secret }}
- name: kafka-client-cert
  secret:
    secretName: {{ $sec.clientCert.secret }}
    # readable by the pods' group (fsGroup 10001) only
    defaultMode: 288
    items: [{key: {{ $sec.clientCert.certKey | quote }}, path: tls.crt}, {key: {{ $sec.clientCert.keyKey | quote }}, path: tls.key}]
{{- end }}
{{- end -}}

{{/* KEDA's Kafka scaler logs in too: the chart renders a TriggerAuthentication per stage (the stage's
     own principal, which may describe its group and input) unless keda.authenticationRef names one. */}}
{{- define "opp.kedaOwnAuth" -}}
{{- if and .Values.keda.enabled (ne .Values.kafka.security.protocol "PLAINTEXT") (not .Values.keda.authenticationRef.name) -}}
true
{{- end -}}
{{- end -}}

{{/* A container of the topics Job: `pipeline <args>` as `role`, with only that role's password.
     Args: (list $ name role args) */}}
{{- define "opp.jobContainer" -}}
{{- $root := index . 0 -}}
- name: {{ index . 1 }}
  image: {{ include "opp.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  args: {{ concat (list "--log-format" $root.Values.logFormat) (index . 3) | toJson }}
  env:
    - {name: PIPELINE_CONFIG, value: /etc/pipeline/pipeline.toml}
    - {name: PIPELINE_KAFKA__CACHE_DIR, value: /var/lib/pipeline}
    {{- include "opp.kafkaPasswordEnv" (list $root (index . 2)) | nindent 4 }}
  {{- with $root.Values.kafka.credentialsSecret }}
  envFrom:
    - secretRef: {name: {{ . }}}
  {{- end }}
  resources:
    {{- toYaml $root.Values.topicsJob.resources | nindent 4 }}
  securityContext:
    {{- include "opp.containerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    - {name: config, mountPath: /etc/pipeline, readOnly: true}
    - {name: data, mountPath: /var/lib/pipeline}
    - {name: tmp, mountPath: /tmp}
    {{- include "opp.kafkaVolumeMounts" $root | nindent 4 }}
{{- end -}}

{{/* The relabelings every Prometheus Operator monitor of the chart ends with. The operator gives each
     target the label `endpoint` (the port's name), and a target label wins over a series' own: the
     pipeline's `endpoint` (the panel or scrubber URL its breaker, delivery and 429 series carry, which
     deploy/alerts.yml groups by) would be renamed exported_endpoint. Dropping the target's keeps it. */}}
{{- define "opp.monitorRelabelings" -}}
- {action: labeldrop, regex: endpoint}
{{- end -}}
