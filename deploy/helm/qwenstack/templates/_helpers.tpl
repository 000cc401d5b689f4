{{- define "qwenstack.labels" -}}
app.kubernetes.io/name: qwenstack
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
