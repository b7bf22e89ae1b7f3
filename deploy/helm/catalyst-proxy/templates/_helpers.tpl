{{/* Names and labels. */}}

{{- define "catalyst-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "catalyst-proxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "catalyst-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "catalyst-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catalyst-proxy.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{- define "catalyst-proxy.labels" -}}
helm.sh/chart: {{ include "catalyst-proxy.chart" . }}
{{ include "catalyst-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: catalyst
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "catalyst-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "catalyst-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "catalyst-proxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
A number as the gateway reads it: whole numbers without an exponent (values
files give Helm float64s, and 1048576 would otherwise print as 1.048576e+06).
*/}}
{{- define "catalyst-proxy.number" -}}
{{- if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/*
A Kubernetes quantity (values.schema.json: "quantity", a number or e.g. 256Mi, 0.5Gi,
200M) in bytes.
*/}}
{{- define "catalyst-proxy.bytes" -}}
{{- $text := toString . }}
{{- $suffix := regexFind "[A-Za-z]+$" $text }}
{{- $factors := dict "" 1 "m" 0.001 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- mulf (trimSuffix $suffix $text | float64) (get $factors $suffix) }}
{{- end }}

{{/*
The memory one gateway worker process needs, in MiB: the largest peak RSS measured per
worker, 83.2 MiB (bench/README.md: `make bench`, the gateway-idem row, whose memory store
holds its full 8 MiB of records; VmHWM), plus about 15 % headroom. The parent that
supervises `--workers N` only forks and waits; its pages are mostly shared with the
workers (copy-on-write), so it is not counted.
*/}}
{{- define "catalyst-proxy.workerMemoryMi" -}}96{{- end }}

{{/*
Paths the gateway routes before it reads CATALYST_ROUTES_FILE, space-separated: its
built-in table (catalyst_proxy/routes.py, DEFAULT_ROUTES) and its own endpoints
(OPERATIONS_PATHS). A routes file that routes one of them again stops the gateway at
start-up; tests/test_deploy.py checks these lists against the gateway's.
*/}}
{{- define "catalyst-proxy.builtinRoutes" -}}
/api/v1/billing/purchase /api/v1/sme/billing/purchase /api/v1/sme/billing/vouchers/list /api/v1/sme/billing/vouchers/issue /api/v1/sme/billing/vouchers/revoke/{code}
{{- end }}
{{- define "catalyst-proxy.ownEndpoints" -}}
/healthz /readyz /metrics /openapi.json
{{- end }}

{{/* A Prometheus duration (values.schema.json: "duration", e.g. 1h30m) in milliseconds. */}}
{{- define "catalyst-proxy.durationMs" -}}
{{- $factors := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 "d" 86400000 "w" 604800000 "y" 31536000000 -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d|w|y)" . -1 -}}
{{- $unit := regexFind "(ms|s|m|h|d|w|y)$" . -}}
{{- $total = add $total (mul (trimSuffix $unit . | int64) (get $factors $unit)) -}}
{{- end -}}
{{- $total -}}
{{- end }}

{{/* Where the mounted files live in the container. */}}
{{- define "catalyst-proxy.publicKeyDir" -}}/etc/catalyst-proxy/session-keys{{- end }}
{{- define "catalyst-proxy.bridgeDir" -}}/var/run/secrets/catalyst-proxy/bridge{{- end }}
{{- define "catalyst-proxy.routesDir" -}}/etc/catalyst-proxy/routes{{- end }}
{{- define "catalyst-proxy.redisDir" -}}/var/run/secrets/catalyst-proxy/redis{{- end }}

{{/* "true" when the gateway is given a Redis URL (plain or from a Secret), else "". */}}
{{- define "catalyst-proxy.redis" -}}
{{- if or .Values.redis.url .Values.redis.urlSecret.secretName }}true{{ end }}
{{- end }}

{{/*
Why more than one gateway process may serve this release, "" when only one does.
Each process keeps its own rate-limit counters, breaker and (without Redis)
idempotency records, so a retry can reach a process that never saw the first try.
*/}}
{{- define "catalyst-proxy.processes" -}}
{{- $why := list }}
{{- if .Values.autoscaling.enabled }}
{{- $why = append $why (printf "autoscaling.enabled, up to %d pods" (int .Values.autoscaling.maxReplicas)) }}
{{- else if gt (int .Values.replicaCount) 1 }}
{{- $why = append $why (printf "replicaCount %d" (int .Values.replicaCount)) }}
{{- end }}
{{- if gt (int .Values.workers) 1 }}
{{- $why = append $why (printf "workers %d per pod" (int .Values.workers)) }}
{{- end }}
{{- join ", " $why }}
{{- end }}

{{/*
CATALYST_IDEMPOTENCY as rendered: auto becomes off where several processes serve
the release and no Redis is shared between them (optional/required are refused
there by catalyst-proxy.validate).
*/}}
{{- define "catalyst-proxy.idempotency" -}}
{{- if and (eq .Values.idempotency.mode "auto") (include "catalyst-proxy.processes" .) (not (include "catalyst-proxy.redis" .)) }}
{{- "off" }}
{{- else }}
{{- .Values.idempotency.mode }}
{{- end }}
{{- end }}

{{/* A Redis URL with a password in it (user:password@ or ?password=). */}}
{{- define "catalyst-proxy.urlPassword" -}}
^[^/]*//[^@]*:[^@]*@|[?&][Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]=
{{- end }}

{{/* Does the release render a routes ConfigMap / mount one? */}}
{{- define "catalyst-proxy.routesFile" -}}
{{- if .Values.routes.existingConfigMap.name }}
{{- printf "%s/%s" (include "catalyst-proxy.routesDir" .) .Values.routes.existingConfigMap.key }}
{{- else if .Values.routes.aliases }}
{{- printf "%s/routes.json" (include "catalyst-proxy.routesDir" .) }}
{{- end }}
{{- end }}

{{/* Seconds of the preStop sleep actually rendered (0 where the cluster lacks the action). */}}
{{- define "catalyst-proxy.preStopSleep" -}}
{{- if and (gt (int .Values.shutdown.preStopSleepSeconds) 0) (semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version) }}
{{- int .Values.shutdown.preStopSleepSeconds }}
{{- else }}0{{- end }}
{{- end }}

{{/* The shutdown grace plus the preStop sleep plus a margin, in whole seconds. */}}
{{- define "catalyst-proxy.terminationGracePeriod" -}}
{{- $grace := ceil .Values.shutdown.graceSeconds | int }}
{{- add (include "catalyst-proxy.preStopSleep" . | int) $grace (int .Values.shutdown.terminationMarginSeconds) }}
{{- end }}

{{/*
Every plain (non-secret) variable the chart sets, name → value as a YAML map;
"" leaves the variable unset so the gateway's own default applies.
*/}}
{{- define "catalyst-proxy.plainEnv" -}}
{{- $v := .Values }}
{{- $publicKeyFile := "" }}
{{- if $v.auth.publicKey.secretName }}
{{- $publicKeyFile = printf "%s/%s" (include "catalyst-proxy.publicKeyDir" .) $v.auth.publicKey.key }}
{{- end }}
{{- $bridgeFile := "" }}
{{- if and $v.bridge.secretName (eq $v.bridge.mode "file") }}
{{- $bridgeFile = printf "%s/%s" (include "catalyst-proxy.bridgeDir" .) $v.bridge.key }}
{{- end }}
{{- $redisPasswordFile := "" }}
{{- if $v.redis.passwordSecret.secretName }}
{{- $redisPasswordFile = printf "%s/%s" (include "catalyst-proxy.redisDir" .) $v.redis.passwordSecret.key }}
{{- end }}
{{- dict
  "CATALYST_SME_GATEWAY_URL" $v.upstream.smeGatewayUrl
  "CATALYST_ORG_GATEWAY_URL" $v.upstream.orgGatewayUrl
  "CATALYST_UPSTREAM_TIMEOUT_SECONDS" (include "catalyst-proxy.number" $v.upstream.timeoutSeconds)
  "CATALYST_MAX_BODY_BYTES" (include "catalyst-proxy.number" $v.upstream.maxBodyBytes)
  "CATALYST_UPSTREAM_MAX_CONNECTIONS" (include "catalyst-proxy.number" $v.upstream.maxConnections)
  "CATALYST_UPSTREAM_MAX_PENDING" (include "catalyst-proxy.number" $v.upstream.maxPending)
  "CATALYST_UPSTREAM_IDLE_SECONDS" (include "catalyst-proxy.number" $v.upstream.idleSeconds)
  "CATALYST_BREAKER_FAILURES" (include "catalyst-proxy.number" $v.upstream.breaker.failures)
  "CATALYST_BREAKER_COOLDOWN_SECONDS" (include "catalyst-proxy.number" $v.upstream.breaker.cooldownSeconds)
  "CATALYST_KC_ADDR" $v.auth.keycloak.addr
  "CATALYST_KC_REALM" $v.auth.keycloak.realm
  "CATALYST_JWKS_URL" $v.auth.jwksUrl
  "CATALYST_JWKS_CACHE_SECONDS" (include "catalyst-proxy.number" $v.auth.jwksCacheSeconds)
  "CATALYST_JWKS_TIMEOUT_SECONDS" (include "catalyst-proxy.number" $v.auth.jwksTimeoutSeconds)
  "CATALYST_TOKEN_ALGORITHMS" (join "," $v.auth.algorithms)
  "CATALYST_TOKEN_LEEWAY_SECONDS" (include "catalyst-proxy.number" $v.auth.leewaySeconds)
  "CATALYST_TOKEN_ISSUER" (join "," $v.auth.issuers)
  "CATALYST_TOKEN_AUDIENCE" (join "," $v.auth.audiences)
  "OPERATOR_EMAIL" $v.auth.operatorEmail
  "CATALYST_SESSION_PUBLIC_KEY_FILE" $publicKeyFile
  "CATALYST_SME_JWT_SECRET_FILE" $bridgeFile
  "CATALYST_ROUTES_FILE" (include "catalyst-proxy.routesFile" .)
  "CATALYST_RATE_LIMIT" $v.rateLimit.limit
  "CATALYST_RATE_LIMIT_ON_STORE_ERROR" $v.rateLimit.onStoreError
  "CATALYST_REDIS_URL" $v.redis.url
  "CATALYST_REDIS_PASSWORD_FILE" $redisPasswordFile
  "CATALYST_IDEMPOTENCY" (include "catalyst-proxy.idempotency" .)
  "CATALYST_IDEMPOTENCY_TTL_SECONDS" (include "catalyst-proxy.number" $v.idempotency.ttlSeconds)
  "CATALYST_IDEMPOTENCY_MAX_BODY_BYTES" (include "catalyst-proxy.number" $v.idempotency.maxBodyBytes)
  "CATALYST_LOG_FORMAT" $v.log.format
  "CATALYST_LOG_LEVEL" $v.log.level
  "CATALYST_SHUTDOWN_GRACE_SECONDS" (include "catalyst-proxy.number" $v.shutdown.graceSeconds)
| toYaml }}
{{- end }}

{{/* The variables the chart fills from Secrets (by reference, never by value). */}}
{{- define "catalyst-proxy.secretEnvNames" -}}
CATALYST_SME_JWT_SECRET,CATALYST_ORG_JWT_SECRET,CATALYST_SESSION_COOKIE_SECRET,CATALYST_REDIS_URL
{{- end }}

{{/* The container's env list: plain values, then secret references, then extraEnv. */}}
{{- define "catalyst-proxy.env" -}}
{{- $v := .Values }}
{{- $plain := include "catalyst-proxy.plainEnv" . | fromYaml }}
{{- range $name := keys $plain | sortAlpha }}
{{- $value := get $plain $name | toString }}
{{- if $value }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- if and $v.bridge.secretName (eq $v.bridge.mode "env") }}
- name: CATALYST_SME_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $v.bridge.secretName | quote }}
      key: {{ $v.bridge.key | quote }}
      optional: {{ $v.bridge.optional }}
{{- end }}
{{- if $v.bridge.orgSecret.secretName }}
- name: CATALYST_ORG_JWT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $v.bridge.orgSecret.secretName | quote }}
      key: {{ $v.bridge.orgSecret.key | quote }}
      optional: {{ $v.bridge.optional }}
{{- end }}
{{- if $v.auth.sessionCookieSecret.secretName }}
- name: CATALYST_SESSION_COOKIE_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $v.auth.sessionCookieSecret.secretName | quote }}
      key: {{ $v.auth.sessionCookieSecret.key | quote }}
{{- end }}
{{- if $v.redis.urlSecret.secretName }}
- name: CATALYST_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.urlSecret.secretName | quote }}
      key: {{ $v.redis.urlSecret.key | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Refuse what would start a gateway that cannot work or hides a setting. */}}
{{- define "catalyst-proxy.validate" -}}
{{- $v := .Values }}
{{- if not (or $v.auth.keycloak.addr $v.auth.jwksUrl $v.auth.publicKey.secretName) }}
{{- fail "no operator key source: set auth.keycloak.addr, auth.jwksUrl or auth.publicKey.secretName (the gateway never runs without authentication)" }}
{{- end }}
{{- if and $v.routes.aliases $v.routes.existingConfigMap.name }}
{{- fail "routes: set either routes.aliases or routes.existingConfigMap.name, not both" }}
{{- end }}
{{- if and $v.autoscaling.enabled (lt (int $v.autoscaling.maxReplicas) (int $v.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be at least autoscaling.minReplicas" }}
{{- end }}
{{- if and $v.redis.url $v.redis.urlSecret.secretName }}
{{- fail "redis: set either redis.url or redis.urlSecret.secretName, not both" }}
{{- end }}
{{- /* The message must not repeat the URL: it holds the password. */}}
{{- if regexMatch (include "catalyst-proxy.urlPassword" .) $v.redis.url }}
{{- fail "redis.url holds a password, which would sit in the pod's plain environment: put the whole URL in a Secret (redis.urlSecret) or only the password (redis.passwordSecret, mounted as CATALYST_REDIS_PASSWORD_FILE)" }}
{{- end }}
{{- /* Nor these: a user:password@ would sit in the plain environment and in NOTES. */}}
{{- range $name, $url := dict "upstream.smeGatewayUrl" $v.upstream.smeGatewayUrl "upstream.orgGatewayUrl" $v.upstream.orgGatewayUrl "auth.jwksUrl" $v.auth.jwksUrl "auth.keycloak.addr" $v.auth.keycloak.addr }}
{{- if contains "@" (toString $url) }}
{{- fail (printf "%s must not hold credentials (user:password@): the gateway refuses them, and a chart value is not a secret" $name) }}
{{- end }}
{{- end }}
{{- if and (eq $v.bridge.mode "file") $v.bridge.secretName $v.bridge.orgSecret.secretName }}
{{- fail "bridge.orgSecret with bridge.mode file: the gateway takes CATALYST_ORG_JWT_SECRET before the mounted file, so the file (and its rotations) would never be used; set one of them" }}
{{- end }}
{{- if and $v.redis.passwordSecret.secretName (not (include "catalyst-proxy.redis" .)) }}
{{- fail "redis.passwordSecret is set but no Redis is: set redis.url or redis.urlSecret.secretName too" }}
{{- end }}
{{- $processes := include "catalyst-proxy.processes" . }}
{{- if and $processes (not (include "catalyst-proxy.redis" .)) }}
{{- $why := printf "this release runs more than one gateway process (%s) and no Redis, and each process's memory store would miss a retry that lands on another one, so a purchase could happen twice. Set redis.url or redis.urlSecret.secretName (a store every pod shares)" $processes }}
{{- if has $v.idempotency.mode (list "optional" "required") }}
{{- fail (printf "idempotency.mode %s needs Redis: %s, or set idempotency.mode to auto (rendered as off) or off" $v.idempotency.mode $why) }}
{{- end }}
{{- range $i, $route := $v.routes.aliases }}
{{- $mode := get $route "idempotency" | default "" }}
{{- if has $mode (list "optional" "required") }}
{{- fail (printf "routes.aliases[%d] (%s): idempotency %s needs Redis: %s, or drop the entry's idempotency" $i $route.path $mode $why) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* The gateway refuses a routes file that routes a path twice: the pod would crash-loop. */}}
{{- $builtin := splitList " " (include "catalyst-proxy.builtinRoutes" .) }}
{{- $own := splitList " " (include "catalyst-proxy.ownEndpoints" .) }}
{{- $seen := dict }}
{{- range $i, $route := $v.routes.aliases }}
{{- $twice := "the gateway refuses a path routed twice, so the pod would crash-loop" }}
{{- if hasKey $seen $route.path }}
{{- fail (printf "routes.aliases[%d]: %s is routed already, by routes.aliases[%d]; %s: give one entry all the path's methods" $i $route.path (get $seen $route.path) $twice) }}
{{- else if has $route.path $builtin }}
{{- fail (printf "routes.aliases[%d]: %s is one of the gateway's built-in routes; %s: drop the entry" $i $route.path $twice) }}
{{- else if has $route.path $own }}
{{- fail (printf "routes.aliases[%d]: %s is one of the gateway's own endpoints (%s), never a route; the gateway refuses it, so the pod would crash-loop" $i $route.path (join ", " $own)) }}
{{- end }}
{{- $_ := set $seen $route.path $i }}
{{- end }}
{{- /* Each worker process needs its own memory: too many for the limit and the pod is OOM-killed. */}}
{{- $limit := dig "limits" "memory" "" ($v.resources | default dict) }}
{{- if $limit }}
{{- $floor := include "catalyst-proxy.workerMemoryMi" . | int }}
{{- $mi := divf (include "catalyst-proxy.bytes" $limit | float64) 1048576 }}
{{- $workers := int $v.workers }}
{{- if lt (divf $mi $workers) (float64 $floor) }}
{{- $fit := floor (divf $mi $floor) | int }}
{{- $lower := ternary (printf " or lower workers to %d" $fit) "" (gt $fit 0) }}
{{- $shown := $limit }}
{{- if not (kindIs "string" $limit) }}{{ $shown = include "catalyst-proxy.number" $limit }}{{ end }}
{{- fail (printf "workers %d with resources.limits.memory %s leaves %.1fMi per worker process, below the %dMi one needs (its peak RSS measured by make bench, 83 MiB, and headroom: bench/README.md): the pod would be OOM-killed under load. Raise resources.limits.memory to at least %dMi%s" $workers $shown (divf $mi $workers) $floor (mul $workers $floor) $lower) }}
{{- end }}
{{- end }}
{{- $managed := concat (keys (include "catalyst-proxy.plainEnv" . | fromYaml)) (splitList "," (include "catalyst-proxy.secretEnvNames" .)) }}
{{- range $v.extraEnv }}
{{- if has .name $managed }}
{{- fail (printf "extraEnv: %s is set by the chart; set its chart value instead (see the chart README)" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Files the gateway reads: the public key, the bridge secret (file mode), the routes, the Redis password. */}}
{{- define "catalyst-proxy.volumeMounts" -}}
{{- if .Values.auth.publicKey.secretName }}
- name: session-keys
  mountPath: {{ include "catalyst-proxy.publicKeyDir" . }}
  readOnly: true
{{- end }}
{{- if and .Values.bridge.secretName (eq .Values.bridge.mode "file") }}
- name: bridge-secret
  mountPath: {{ include "catalyst-proxy.bridgeDir" . }}
  readOnly: true
{{- end }}
{{- if include "catalyst-proxy.routesFile" . }}
- name: routes
  mountPath: {{ include "catalyst-proxy.routesDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.redis.passwordSecret.secretName }}
- name: redis-password
  mountPath: {{ include "catalyst-proxy.redisDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "catalyst-proxy.volumes" -}}
{{- if .Values.auth.publicKey.secretName }}
- name: session-keys
  secret:
    secretName: {{ .Values.auth.publicKey.secretName | quote }}
    defaultMode: 0444
    items:
      - key: {{ .Values.auth.publicKey.key | quote }}
        path: {{ .Values.auth.publicKey.key | quote }}
{{- end }}
{{- if and .Values.bridge.secretName (eq .Values.bridge.mode "file") }}
# Mounted as a folder, not by subPath, so the kubelet swaps in a rotated secret.
- name: bridge-secret
  secret:
    secretName: {{ .Values.bridge.secretName | quote }}
    optional: {{ .Values.bridge.optional }}
    defaultMode: 0444
    items:
      - key: {{ .Values.bridge.key | quote }}
        path: {{ .Values.bridge.key | quote }}
{{- end }}
{{- if .Values.routes.existingConfigMap.name }}
- name: routes
  configMap:
    name: {{ .Values.routes.existingConfigMap.name | quote }}
    items:
      - key: {{ .Values.routes.existingConfigMap.key | quote }}
        path: {{ .Values.routes.existingConfigMap.key | quote }}
{{- else if .Values.routes.aliases }}
- name: routes
  configMap:
    name: {{ include "catalyst-proxy.fullname" . }}-routes
{{- end }}
{{- if .Values.redis.passwordSecret.secretName }}
# CATALYST_REDIS_PASSWORD_FILE: a file, so the password is never in the environment.
- name: redis-password
  secret:
    secretName: {{ .Values.redis.passwordSecret.secretName | quote }}
    defaultMode: 0444
    items:
      - key: {{ .Values.redis.passwordSecret.key | quote }}
        path: {{ .Values.redis.passwordSecret.key | quote }}
{{- end }}
{{- end }}
