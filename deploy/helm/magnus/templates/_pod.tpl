{{/* The pod template of one component.
     (dict "root" $ "component" "batcher" "extraEnv" "<yaml list>" "image" "repo:tag"
           "pullPolicy" "IfNotPresent" "resources" {} "mountStore" true "mountModel" true
           "gpu" 0 "runtimeClassName" "") */}}
{{- define "magnus.podTemplate" -}}
{{- $root := .root -}}
{{- $values := index $root.Values .component -}}
metadata:
  labels:
    {{- include "magnus.selectorLabels" (dict "root" $root "component" .component) | nindent 4 }}
    app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
    app.kubernetes.io/part-of: magnus
  annotations:
    {{- include "magnus.podAnnotations" (dict "root" $root "values" $values) | nindent 4 }}
spec:
  serviceAccountName: {{ include "magnus.serviceAccountName" $root }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $values.terminationGracePeriodSeconds }}
  terminationGracePeriodSeconds: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ .component }}
      image: {{ .image | quote }}
      imagePullPolicy: {{ .pullPolicy }}
      args: ["python", "-m", "services.{{ .component }}"]
      ports:
        {{- include "magnus.ports" (dict "port" $values.port "internalPort" $values.internalPort "metricsPort" $root.Values.metrics.port) | nindent 8 }}
      env:
        {{- include "magnus.commonEnv" (dict "root" $root "component" .component) | nindent 8 }}
        {{- with .extraEnv }}
        {{- . | nindent 8 }}
        {{- end }}
      envFrom:
        {{- include "magnus.envFrom" (dict "root" $root "component" .component) | nindent 8 }}
      {{- include "magnus.probes" (dict "root" $root "component" .component "port" $values.port) | nindent 6 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      resources:
        {{- $resources := deepCopy (default dict $values.resources) }}
        {{- if gt (int .gpu) 0 }}
        {{- $limits := merge (dict $values.gpu.resourceName (int .gpu)) (default dict $resources.limits) }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        {{- include "magnus.scratchMounts" . | nindent 8 }}
        {{- with (include "magnus.tlsMount" $root | trim) }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- if .mountStore }}
        - name: model-store
          mountPath: /var/lib/magnus/model-store
        {{- end }}
        {{- if .mountModel }}
        {{- with (include "magnus.modelMount" $root | trim) }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- end }}
  volumes:
    {{- include "magnus.scratchVolumes" . | nindent 4 }}
    {{- with (include "magnus.tlsVolume" $root | trim) }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- if .mountStore }}
    - name: model-store
      persistentVolumeClaim:
        claimName: {{ include "magnus.modelStoreClaim" $root }}
    {{- end }}
    {{- if .mountModel }}
    {{- with (include "magnus.modelVolume" $root | trim) }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- end }}
  {{- with $values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.spread }}
  {{- if ne .mode "off" }}
  topologySpreadConstraints:
    - maxSkew: {{ .maxSkew | default 1 }}
      topologyKey: {{ .topologyKey | default "kubernetes.io/hostname" }}
      whenUnsatisfiable: {{ ternary "DoNotSchedule" "ScheduleAnyway" (eq .mode "hard") }}
      labelSelector:
        matchLabels:
          {{- include "magnus.selectorLabels" (dict "root" $root "component" $.component) | nindent 10 }}
  {{- end }}
  {{- end }}
{{- end -}}
