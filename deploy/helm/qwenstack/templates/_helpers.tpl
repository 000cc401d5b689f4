{{- define "qwenstack.labels" -}}
app.kubernetes.io/name: qwenstack
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: engine, gateway, ui, redis, limiter-redis, postgresql. */}}
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

{{- define "qwenstack.limiterRedisUrl" -}}
{{- if .Values.limiterRedis.url -}}
{{ .Values.limiterRedis.url }}
{{- else if .Values.limiterRedis.deploy -}}
redis://{{ .Release.Name }}-limiter-redis:6379/0
{{- end }}
{{- end }}

{{/* A single-pod Redis (Service and Deployment): root, component, values (image, maxmemory),
     policy (its maxmemory-policy). Reachable from gateway pods only (networkpolicy.yaml). */}}
{{- define "qwenstack.redis" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .root.Release.Name }}-{{ .component }}
  labels:
    {{- include "qwenstack.selector" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  selector:
    {{- include "qwenstack.selector" (dict "root" .root "component" .component) | nindent 4 }}
  ports:
    - {name: redis, port: 6379, targetPort: 6379}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .root.Release.Name }}-{{ .component }}
  labels:
    {{- include "qwenstack.selector" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  replicas: 1
  selector:
    matchLabels:
      {{- include "qwenstack.selector" (dict "root" .root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "qwenstack.selector" (dict "root" .root "component" .component) | nindent 8 }}
    spec:
      containers:
        - name: redis
          image: {{ .values.image }}
          args: ["--save", "", "--appendonly", "no", "--maxmemory", {{ .values.maxmemory | quote }},
                 "--maxmemory-policy", {{ .policy | quote }}]
          ports:
            - containerPort: 6379
          readinessProbe:
            exec: {command: ["redis-cli", "ping"]}
            periodSeconds: 5
{{- end }}
