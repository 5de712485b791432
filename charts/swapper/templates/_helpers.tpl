{{/* Names and labels. */}}
{{- define "swapper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "swapper.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "swapper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "swapper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "swapper.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "swapper.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "swapper.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* Secret names: the operator's, or the one this chart makes. */}}
{{- define "swapper.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "swapper.fullname" .)) -}}
{{- end -}}
{{- define "swapper.adminKeysSecret" -}}
{{- .Values.adminKeys.existingSecret | default (printf "%s-admin-keys" (include "swapper.fullname" .)) -}}
{{- end -}}
{{- define "swapper.hasApiKeys" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys -}}true{{- end -}}
{{- end -}}
{{- define "swapper.hasAdminKeys" -}}
{{- if or .Values.adminKeys.existingSecret .Values.adminKeys.keys -}}true{{- end -}}
{{- end -}}

{{/* Seconds Kubernetes waits after SIGTERM: the drain, then 10 s (+5 s) for each child to exit
and 5 s for the HTTP server, with room to spare. */}}
{{- define "swapper.terminationGrace" -}}
{{- add (int .Values.drainTimeoutSeconds) 30 -}}
{{- end -}}

{{/* The config file: the operator's settings plus the keys this chart owns. */}}
{{- define "swapper.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $_ := set $cfg "listen" (dict "host" "0.0.0.0" "port" 8080) -}}
{{- $_ := set $cfg "models_dir" "/models" -}}
{{- $_ := set $cfg "state_dir" "/var/lib/swapper" -}}
{{- $_ := set $cfg "drain_timeout" (printf "%ds" (int .Values.drainTimeoutSeconds)) -}}
{{- if .Values.preload }}{{ $_ := set $cfg "preload" .Values.preload }}{{ end -}}
{{- if .Values.pin }}{{ $_ := set $cfg "pin" .Values.pin }}{{ end -}}
{{- if include "swapper.hasApiKeys" . }}{{ $_ := set $cfg "api_key_file" "/etc/swapper/keys/api-keys" }}{{ end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Names the HTTPRoute matches with X-Gateway-Model-Name. */}}
{{- define "swapper.routeModels" -}}
{{- $names := concat .Values.httpRoute.models .Values.preload .Values.pin -}}
{{- range $name, $m := (.Values.config.models | default dict) -}}
{{- $names = append $names $name -}}
{{- if kindIs "map" $m }}{{ $names = concat $names ($m.aliases | default list) }}{{ end -}}
{{- end -}}
{{- toJson (uniq $names) -}}
{{- end -}}

{{/* Base models whose adapters the HTTPRoute matches with X-Gateway-Base-Model-Name. */}}
{{- define "swapper.routeBaseModels" -}}
{{- $names := .Values.httpRoute.baseModels -}}
{{- range $name, $m := (.Values.config.models | default dict) -}}
{{- if and (kindIs "map" $m) $m.adapters }}{{ $names = append $names $name }}{{ end -}}
{{- end -}}
{{- toJson (uniq $names) -}}
{{- end -}}
