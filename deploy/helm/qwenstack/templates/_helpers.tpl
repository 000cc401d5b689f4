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

{{/* The engine models: each entry of engine.models over engine's own values (a field it leaves
     out takes engine's, but servedModelName), each with `fullName` (its Deployment and Service) and `labels` (its pods'
     selector); without engine.models, the one model engine describes, named as before the list
     was (<release>-engine), so an upgrade keeps its Deployment. As YAML: fromYaml it. */}}
{{- define "qwenstack.engineModels" -}}
{{- $defaults := omit .Values.engine "models" -}}
{{- $models := list -}}
{{- if .Values.engine.models -}}
{{- range .Values.engine.models -}}
{{- /* A served name is one model's own: unset, the model's id. */ -}}
{{- $entry := mergeOverwrite (omit (deepCopy $defaults) "servedModelName") (deepCopy .) -}}
{{- if not $entry.servedModelName -}}{{- $_ := set $entry "servedModelName" $entry.model -}}{{- end -}}
{{- $_ := set $entry "fullName" (printf "%s-engine-%s" $.Release.Name (required "each engine.models entry needs a name" .name)) -}}
{{- $_ := set $entry "labels" (dict "qwenstack.io/engine-model" .name) -}}
{{- $models = append $models $entry -}}
{{- end -}}
{{- else -}}
{{- $models = list (merge (dict "fullName" (printf "%s-engine" .Release.Name) "labels" dict) (deepCopy $defaults)) -}}
{{- end -}}
models: {{ toJson $models }}
{{- end }}

{{/* vLLM's flags for an engine model's role: the chart's copy of engine/roles.py (the tests
     check they agree). */}}
{{- define "qwenstack.roleArgs" -}}
{{- $role := .role | default "chat" -}}
{{- if eq $role "embed" }}
- "--runner=pooling"
- "--convert=embed"
{{- else if eq $role "rerank" }}
- "--runner=pooling"
- "--convert=classify"
{{- with .hfOverrides }}
- {{ printf "--hf-overrides=%s" (toJson .) | quote }}
{{- end }}
{{- else if ne $role "chat" }}
{{- fail (printf "engine.models: role %s: chat, embed or rerank" $role) }}
{{- else }}
{{- with .toolCallParser }}
- "--enable-auto-tool-choice"
- "--tool-call-parser={{ . }}"
{{- end }}
{{- with .reasoningParser }}
- "--reasoning-parser={{ . }}"
{{- end }}
{{- end }}
{{- end }}

{{/* The engines' headless Services' DNS names, space-separated: engine.discovery_dns. */}}
{{- define "qwenstack.engineHosts" -}}
{{- $hosts := list -}}
{{- range .models -}}
{{- $hosts = append $hosts (printf "%s.%s.svc.cluster.local" .fullName $.root.Release.Namespace) -}}
{{- end -}}
{{ join " " $hosts }}
{{- end }}

{{/* The models as the gateway's engine.models describes them (no engine is started there):
     parsers only for chat models, as qwenstack.roleArgs gives them. */}}
{{- define "qwenstack.gatewayModels" -}}
{{- $described := list -}}
{{- range . -}}
{{- $chat := eq (.role | default "chat") "chat" -}}
{{- $described = append $described (dict "served_model_name" .servedModelName "role" (.role | default "chat") "tool_call_parser" (and $chat .toolCallParser | default "none") "reasoning_parser" (and $chat .reasoningParser | default "none")) -}}
{{- end -}}
{{ toJson $described }}
{{- end }}
