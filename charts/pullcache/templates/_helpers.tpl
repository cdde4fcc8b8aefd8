{{/*
The chart's name, or nameOverride.
*/}}
{{- define "pullcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the release name, plus the chart name unless the release name already
contains it. Truncated to 63 characters (the DNS label limit) minus room for suffixes such as
"-cleanup" and "-ca-init".
*/}}
{{- define "pullcache.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "pullcache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "pullcache.labels" -}}
helm.sh/chart: {{ include "pullcache.chart" . }}
{{ include "pullcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pullcache
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels. Each workload adds its own app.kubernetes.io/component.
*/}}
{{- define "pullcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pullcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The service account of the cache pods.
*/}}
{{- define "pullcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pullcache.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest when a digest is set, else repository:tag (the tag
defaults to the chart's appVersion).
*/}}
{{- define "pullcache.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the intercept CA (ca.key, ca.crt).
*/}}
{{- define "pullcache.caSecretName" -}}
{{- default (printf "%s-ca" (include "pullcache.fullname" .)) .Values.intercept.caSecretName }}
{{- end }}

{{/*
The Secret holding the cluster CA (ca.key, ca.crt) that peers authenticate each other with.
*/}}
{{- define "pullcache.clusterCaSecretName" -}}
{{- default (printf "%s-cluster-ca" (include "pullcache.fullname" .)) .Values.cluster.caSecretName }}
{{- end }}

{{/*
The headless Service whose DNS name answers with every ready cache pod's IP (the node's, with
hostNetwork): cluster mode's peer discovery.
*/}}
{{- define "pullcache.peerServiceName" -}}
{{- printf "%s-peers" (include "pullcache.fullname" .) }}
{{- end }}

{{/*
The --peer target: the peer Service's fully qualified name, with a trailing dot so that the
resolver asks for it as is. Without the dot, a name with fewer dots than ndots (5 in a pod's
resolv.conf) is first tried under every search domain, several NXDOMAIN queries per pod and
refresh.
*/}}
{{- define "pullcache.peerTarget" -}}
{{- printf "%s.%s.svc.%s.:%d" (include "pullcache.peerServiceName" .) .Release.Namespace .Values.clusterDomain (int .Values.cluster.port) }}
{{- end }}

{{/*
Where containerd reaches pullcache: the node's loopback, which only processes on the node
(containerd among them) can connect to.
*/}}
{{- define "pullcache.mirrorURL" -}}
{{- printf "http://127.0.0.1:%d" (int .Values.pullcache.port) }}
{{- end }}

{{/*
Where the node's containerd certs.d directory is, in the wiring containers as on the node, so
that `install` can compare it with containerd's config_path and its messages name the node's
paths.
*/}}
{{- define "pullcache.certsDirMount" -}}
{{- clean .Values.containerd.certsDir }}
{{- end }}

{{/*
The directory holding certs.d (/etc/containerd), mounted read-write at the node's path. It
must exist (hostPath type Directory): the chart creates nothing on a node without containerd,
where the pod then waits with a FailedMount event. certs.d itself may be missing; install
creates it and uninstall removes it again.
*/}}
{{- define "pullcache.certsParentMount" -}}
{{- $parent := dir (clean .Values.containerd.certsDir) }}
{{- if or (ne (base $parent) "containerd") (ne (base (dir $parent)) "etc") }}
{{- fail (printf "containerd.certsDir %s: its directory %s would be mounted read-write; certs.d must be in containerd's own directory (/etc/containerd, or k3s's and RKE2's .../agent/etc/containerd)" .Values.containerd.certsDir $parent) }}
{{- end }}
{{- $parent }}
{{- end }}

{{/*
Where the directory holding the node's containerd config.toml is mounted (read-only), when it
is not certs.d's own directory: also at the node's path.
*/}}
{{- define "pullcache.containerdConfigDirMount" -}}
{{- dir (clean .Values.containerd.configFile) }}
{{- end }}

{{/*
The containerd wiring container's volume mounts: certs.d's directory read-write, and the
directory of containerd's config.toml, so `install` can check that containerd reads certs.d.
*/}}
{{- define "pullcache.containerdMounts" -}}
- name: containerd-dir
  mountPath: {{ include "pullcache.certsParentMount" . }}
{{- if and .Values.containerd.configFile (ne (include "pullcache.containerdConfigDirMount" .) (include "pullcache.certsParentMount" .)) }}
- name: containerd-config
  mountPath: {{ include "pullcache.containerdConfigDirMount" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The hostPath volumes behind pullcache.containerdMounts.
*/}}
{{- define "pullcache.containerdVolumes" -}}
{{- if and .Values.containerd.configFile (eq (dir (clean .Values.containerd.configFile)) (clean .Values.containerd.certsDir)) }}
{{- fail "containerd.configFile must not be inside containerd.certsDir" }}
{{- end }}
- name: containerd-dir
  hostPath:
    path: {{ include "pullcache.certsParentMount" . }}
    type: Directory
{{- if and .Values.containerd.configFile (ne (include "pullcache.containerdConfigDirMount" .) (include "pullcache.certsParentMount" .)) }}
- name: containerd-config
  hostPath:
    path: {{ include "pullcache.containerdConfigDirMount" . }}
    type: Directory
{{- end }}
{{- end }}

{{/*
The registry host of pullcache's own image, as containerd connects to it (Docker Hub images
come from registry-1.docker.io).
*/}}
{{- define "pullcache.imageRegistryHost" -}}
{{- $first := first (splitList "/" .Values.image.repository) }}
{{- if and (contains "/" .Values.image.repository) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $first }}
{{- else }}
{{- "registry-1.docker.io" }}
{{- end }}
{{- end }}
