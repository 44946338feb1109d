{{/* The objects' name: the release's, with the chart's appended unless the release already
says it (release "tessera" → "tessera", not "tessera-tessera"). */}}
{{- define "tessera.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "tessera.fullname" .) -}}
{{- end -}}

{{/* Labels shared by every object of the release. */}}
{{- define "tessera.labels" -}}
app.kubernetes.io/name: tessera
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: tessera
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The namespace of the trust bundle's ConfigMaps: never the release's own. */}}
{{- define "tessera.trustBundleNamespace" -}}
{{- default (printf "%s-trust-bundle" .Release.Namespace) .Values.trustBundleNamespace -}}
{{- end }}
