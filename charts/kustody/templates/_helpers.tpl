{{/* The chart name, or nameOverride. */}}
{{- define "kustody.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name, at most 63 characters. */}}
{{- define "kustody.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "kustody.labels" -}}
app.kubernetes.io/name: {{ include "kustody.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kustody
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels. */}}
{{- define "kustody.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kustody.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The ServiceAccount name. */}}
{{- define "kustody.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kustody.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image reference: repository@digest, else repository:tag (default appVersion). */}}
{{- define "kustody.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Whether the pod runs the HSM sidecar (softhsm and pkcs11 modes; remote has none). */}}
{{- define "kustody.sidecar" -}}
{{- if ne .Values.hsm.mode "remote" }}true{{ end -}}
{{- end -}}

{{/* The Secret holding the SoftHSM2 PINs. */}}
{{- define "kustody.pinSecret" -}}
{{- default (printf "%s-pin" (include "kustody.fullname" .)) .Values.hsm.softhsm.pin.existingSecret -}}
{{- end -}}

{{/* The token PVC's name. */}}
{{- define "kustody.tokenClaim" -}}
{{- default (printf "%s-token" (include "kustody.fullname" .)) .Values.hsm.softhsm.persistence.existingClaim -}}
{{- end -}}

{{/* Fail early on values that cannot work together (the schema cannot express these). */}}
{{- define "kustody.validate" -}}
{{- if eq .Values.hsm.mode "pkcs11" -}}
{{- if not .Values.hsm.pkcs11.module -}}{{ fail "hsm.pkcs11.module is required when hsm.mode is pkcs11" }}{{- end -}}
{{- if not .Values.hsm.pkcs11.pin.secretName -}}{{ fail "hsm.pkcs11.pin.secretName is required when hsm.mode is pkcs11" }}{{- end -}}
{{- end -}}
{{- if eq .Values.hsm.mode "remote" -}}
{{- if not .Values.hsm.remote.endpoint -}}{{ fail "hsm.remote.endpoint is required when hsm.mode is remote" }}{{- end -}}
{{- if not .Values.hsm.remote.tlsSecret -}}{{ fail "hsm.remote.tlsSecret is required when hsm.mode is remote (mTLS only)" }}{{- end -}}
{{- if .Values.kms.enabled -}}{{ fail "kms.enabled needs a local sidecar: use hsm.mode softhsm or pkcs11, or run the KMS plugin next to the remote HSM" }}{{- end -}}
{{- if .Values.unwrap.enabled -}}{{ fail "unwrap.enabled needs a local sidecar: use hsm.mode softhsm or pkcs11" }}{{- end -}}
{{- end -}}
{{- if and .Values.unwrap.enabled (not .Values.unwrap.tlsSecret) -}}
{{ fail "unwrap.enabled needs unwrap.tlsSecret (the unwrap service is TLS only)" }}
{{- end -}}
{{- if and (eq .Values.hsm.mode "softhsm") .Values.hsm.softhsm.persistence.enabled (gt (int .Values.replicaCount) 1) (has "ReadWriteOnce" .Values.hsm.softhsm.persistence.accessModes) -}}
{{ fail "a SoftHSM2 token on a ReadWriteOnce claim cannot be shared: keep replicaCount at 1" }}
{{- end -}}
{{- end -}}

{{/* Whether the hsm container gets the unwrap service's own identity (only with unwrap). */}}
{{- define "kustody.unwrapIdentity" -}}
{{- if and .Values.unwrap.enabled (include "kustody.sidecar" .) }}true{{ end -}}
{{- end -}}

{{/* The unwrap service's ServiceAccount name. */}}
{{- define "kustody.unwrapServiceAccountName" -}}
{{- if .Values.unwrap.serviceAccount.create -}}
{{- default (printf "%s-unwrap" (include "kustody.fullname" .)) .Values.unwrap.serviceAccount.name -}}
{{- else -}}
{{- required "unwrap.serviceAccount.name is required when unwrap.serviceAccount.create is false" .Values.unwrap.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the unwrap ServiceAccount's token. */}}
{{- define "kustody.unwrapTokenSecret" -}}
{{- printf "%s-token" (include "kustody.unwrapServiceAccountName" .) -}}
{{- end -}}
