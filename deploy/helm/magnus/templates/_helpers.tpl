{{/* Names and labels. */}}
{{- define "magnus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "magnus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "magnus.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "magnus.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "magnus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "magnus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: magnus
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "batcher") */}}
{{- define "magnus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "magnus.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "magnus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "magnus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether the chart stores the database URL itself (database.url, or the bundled PostgreSQL's);
     otherwise the URL comes from database.existingSecret, a Secret the operator manages. */}}
{{- define "magnus.chartOwnsDatabaseSecret" -}}
{{- if or .Values.database.url .Values.postgresql.enabled -}}true{{- end -}}
{{- end -}}

{{- define "magnus.databaseSecretName" -}}
{{- if include "magnus.chartOwnsDatabaseSecret" . -}}
{{- printf "%s-database" (include "magnus.fullname" .) -}}
{{- else if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- fail "the log DB is not set: give database.existingSecret (recommended), database.url, or postgresql.enabled=true" -}}
{{- end -}}
{{- end -}}

{{- define "magnus.databaseSecretKey" -}}
{{- if include "magnus.chartOwnsDatabaseSecret" . -}}database-url{{- else -}}{{ .Values.database.existingSecretKey }}{{- end -}}
{{- end -}}

{{/* The URL the chart stores: database.url, else the bundled PostgreSQL's. */}}
{{- define "magnus.databaseUrl" -}}
{{- if .Values.database.url -}}
{{- .Values.database.url -}}
{{- else -}}
{{- printf "postgresql+asyncpg://%s:%s@%s-postgresql:5432/%s" .Values.postgresql.username .Values.postgresql.password .Release.Name .Values.postgresql.database -}}
{{- end -}}
{{- end -}}

{{/* Auth: the chart's Secret (generated service token, API-key entries from values). */}}
{{- define "magnus.authSecretName" -}}
{{- printf "%s-auth" (include "magnus.fullname" .) -}}
{{- end -}}

{{/* Refuse an install with auth on and no client API keys: nobody could call the API. */}}
{{- define "magnus.checkAuth" -}}
{{- if and (not .Values.auth.insecure) (not .Values.auth.apiKeys) (not .Values.auth.apiKeysSecret.name) -}}
{{- fail "auth: no client API keys, so no client could call Magnus. Give auth.apiKeys (TENANT:sha256:HEX entries from `python -m services.shared.auth hash-key --tenant TENANT`) or auth.apiKeysSecret.name (a Secret holding them), or set auth.insecure=true to run without auth (trials only)" -}}
{{- end -}}
{{- if and .Values.auth.apiKeys .Values.auth.apiKeysSecret.name -}}
{{- fail "auth: give the API keys once: auth.apiKeys or auth.apiKeysSecret.name, not both" -}}
{{- end -}}
{{- end -}}

{{/* MAGNUS_AUTH_* and MAGNUS_TLS_* of every service container. */}}
{{- define "magnus.securityEnv" -}}
{{- $auth := .Values.auth -}}
{{- if not $auth.insecure }}
- name: MAGNUS_AUTH_SERVICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ default (include "magnus.authSecretName" .) $auth.serviceToken.existingSecret }}
      key: {{ ternary $auth.serviceToken.existingSecretKey "service-token" (ne $auth.serviceToken.existingSecret "") }}
- name: MAGNUS_AUTH_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ default (include "magnus.authSecretName" .) $auth.apiKeysSecret.name }}
      key: {{ ternary $auth.apiKeysSecret.key "api-keys" (ne $auth.apiKeysSecret.name "") }}
{{- end }}
{{- if .Values.tls.secretName }}
- name: MAGNUS_TLS_CERT_FILE
  value: /etc/magnus/tls/tls.crt
- name: MAGNUS_TLS_KEY_FILE
  value: /etc/magnus/tls/tls.key
- name: MAGNUS_TLS_CA_FILE
  value: /etc/magnus/tls/ca.crt
- name: MAGNUS_TLS_REQUIRE_CLIENT_CERT
  value: {{ .Values.tls.requireClientCert | quote }}
{{- with .Values.tls.serverName }}
- name: MAGNUS_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The name a component is called by, as its certificate must carry it (probes verify it). */}}
{{- define "magnus.serviceHost" -}}
{{- $full := include "magnus.fullname" .root -}}
{{- if .root.Values.tls.serverName -}}
{{- .root.Values.tls.serverName -}}
{{- else if has .component (list "predictor" "estimator" "worker") -}}
{{- printf "%s-%s-headless" $full .component -}}
{{- else -}}
{{- printf "%s-%s" $full .component -}}
{{- end -}}
{{- end -}}

{{- define "magnus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "magnus.modelStoreClaim" -}}
{{- default (printf "%s-model-store" (include "magnus.fullname" .)) .Values.modelStore.existingClaim -}}
{{- end -}}

{{/* host:port of every replica of a StatefulSet component, comma-separated (trainer push targets). */}}
{{- define "magnus.replicaTargets" -}}
{{- $root := .root -}}
{{- $full := include "magnus.fullname" $root -}}
{{- $values := index $root.Values .component -}}
{{- $targets := list -}}
{{- range $i := until (int $values.replicas) -}}
{{- $targets = append $targets (printf "%s-%s-%d.%s-%s-headless.%s.svc:%d" $full $.component $i $full $.component $root.Release.Namespace (int $values.port)) -}}
{{- end -}}
{{- join "," $targets -}}
{{- end -}}

{{/* Environment every service container gets. (dict "root" $ "component" "batcher") */}}
{{- define "magnus.commonEnv" -}}
{{- $prefix := printf "MAGNUS_%s_" (upper .component) -}}
{{- $values := index .root.Values .component -}}
- name: {{ $prefix }}HOST
  value: "0.0.0.0"
- name: {{ $prefix }}PORT
  value: {{ $values.port | quote }}
- name: {{ $prefix }}METRICS_PORT
  value: {{ .root.Values.metrics.port | quote }}
- name: {{ $prefix }}LOG_LEVEL
  value: {{ .root.Values.logLevel | quote }}
- name: MAGNUS_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "magnus.databaseSecretName" .root }}
      key: {{ include "magnus.databaseSecretKey" .root }}
- name: MAGNUS_MODEL_STORE_DIR
  value: /var/lib/magnus/model-store
- name: MAGNUS_MODEL
  value: {{ .root.Values.model.path | quote }}
- name: HOME
  value: /tmp
- name: HF_HUB_OFFLINE
  value: "1"
{{- include "magnus.securityEnv" .root }}
{{- end -}}

{{/* envFrom: the component's ConfigMap and the chart's secret env. */}}
{{- define "magnus.envFrom" -}}
- configMapRef:
    name: {{ include "magnus.fullname" .root }}-{{ .component }}
{{- if .root.Values.secretEnv }}
- secretRef:
    name: {{ include "magnus.fullname" .root }}-env
{{- end }}
{{- end -}}

{{/* gRPC probes on the standard health service: "liveness" answers while the process does,
     "" turns SERVING only when the service is ready (model loaded, worker registered). With TLS
     the kubelet's gRPC probe (plaintext only) cannot connect, so a TLS client runs in the pod
     (tools/health_probe.py; a Python start per probe, hence the longer periods).
     (dict "root" $ "component" "batcher" "port" 50051) */}}
{{- define "magnus.probes" -}}
{{- if .root.Values.tls.secretName }}
{{- $probe := list "python" "-m" "tools.health_probe" "--port" (toString .port) "--server-name" (include "magnus.serviceHost" .) }}
readinessProbe:
  exec:
    command: {{ concat $probe (list "--service" "") | toJson }}
  periodSeconds: 10
  timeoutSeconds: 10
  failureThreshold: 3
livenessProbe:
  exec:
    command: {{ concat $probe (list "--service" "liveness") | toJson }}
  initialDelaySeconds: 10
  periodSeconds: 20
  timeoutSeconds: 10
  failureThreshold: 6
{{- else }}
readinessProbe:
  grpc:
    port: {{ .port }}
    service: ""
  periodSeconds: 5
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ .port }}
    service: liveness
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end }}
{{- end -}}

{{- define "magnus.ports" -}}
- name: grpc
  containerPort: {{ .port }}
  protocol: TCP
{{- with .internalPort }}
- name: grpc-internal
  containerPort: {{ . }}
  protocol: TCP
{{- end }}
- name: metrics
  containerPort: {{ .metricsPort }}
  protocol: TCP
{{- end -}}

{{/* Writable scratch (read-only root filesystem): var/ (demo model, caches) and /tmp. */}}
{{- define "magnus.scratchVolumes" -}}
- name: var
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}
{{- define "magnus.scratchMounts" -}}
- name: var
  mountPath: /app/var
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "magnus.tlsVolume" -}}
{{- with .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end -}}
{{- define "magnus.tlsMount" -}}
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: /etc/magnus/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "magnus.modelVolume" -}}
{{- if .Values.model.volume }}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end -}}
{{- define "magnus.modelMount" -}}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "magnus.podAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .root.Values.metrics.port | quote }}
prometheus.io/path: /metrics
checksum/config: {{ include (print .root.Template.BasePath "/configmaps.yaml") .root | sha256sum }}
checksum/security: {{ list .root.Values.auth .root.Values.tls | toJson | sha256sum }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}
