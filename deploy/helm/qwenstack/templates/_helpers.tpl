{{- define "qwenstack.labels" -}}
app.kubernetes.io/name: qwenstack
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: engine, gateway, ui, redis, postgresql. */}}
{{- define "qwenstack.selector" -}}
{{ include "qwenstack.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "qwenstack.secretName" -}}
{{ .Values.secrets.existingSecret | default (printf "%s-secrets" .Release.Name) }}
{{- end }}

{{- define "qwenstack.databaseUrl" -}}
{{- if .Values.postgresql.url -}}
{{ .Values.postgresql.url }}
{{- else if .Values.postgresql.deploy -}}
postgresql+psycopg://qwenstack:{{ required "postgresql.password is required with postgresql.deploy" .Values.postgresql.password }}@{{ .Release.Name }}-postgresql:5432/qwenstack
{{- end }}
{{- end }}

{{- define "qwenstack.redisUrl" -}}
{{- if .Values.redis.url -}}
{{ .Values.redis.url }}
{{- else if .Values.redis.deploy -}}
redis://{{ .Release.Name }}-redis:6379/0
{{- end }}
{{- end }}
