"""Settings.from_env: every variable of the contract, its default, fallback and validation."""

from __future__ import annotations

import pytest

from catalyst_proxy.config import DEFAULT_GATEWAY_URL, ConfigError, Settings

JWKS = "http://keycloak.test/realms/sovereign/protocol/openid-connect/certs"
BASE = {"CATALYST_JWKS_URL": JWKS}


def env(**values: str) -> Settings:
    return Settings.from_env({**BASE, **values})


def test_defaults():
    """With only a key source set, every other setting takes the contract's default."""
    settings = Settings.from_env(BASE)
    assert settings.gateway_url == DEFAULT_GATEWAY_URL
    assert settings.gateway_url == "http://gateway.org-services.svc.cluster.local:8080"
    assert settings.jwks_url == JWKS
    assert settings.public_key_file is None
    assert settings.jwks_cache_seconds == 600
    assert settings.token_algorithms == ("RS256",)
    assert settings.token_leeway_seconds == 30
    assert settings.token_issuers == ()
    assert settings.token_audiences == ()
    assert settings.session_cookie_secret is None
    assert settings.operator_email is None
    assert settings.bridge_secret is None
    assert settings.bridge_secret_file is None
    assert not settings.bridge_secret_configured
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.upstream_timeout_seconds == 3
    assert settings.routes_file is None
    assert settings.shutdown_grace_seconds == 10
    assert (settings.log_format, settings.log_level) == ("json", "info")


def test_every_variable_is_read():
    """Each contract variable lands in its setting."""
    settings = Settings.from_env(
        {
            "CATALYST_SME_GATEWAY_URL": "http://sme.test:8080",
            "CATALYST_JWKS_URL": JWKS,
            "CATALYST_SESSION_PUBLIC_KEY_FILE": "/keys/public.pem",
            "CATALYST_JWKS_CACHE_SECONDS": "120",
            "CATALYST_JWKS_TIMEOUT_SECONDS": "1.5",
            "CATALYST_TOKEN_ALGORITHMS": "RS256, PS256",
            "CATALYST_TOKEN_LEEWAY_SECONDS": "5",
            "CATALYST_TOKEN_ISSUER": "https://kc.test/realms/a, https://kc.test/realms/b",
            "CATALYST_TOKEN_AUDIENCE": "console,catalyst-proxy",
            "CATALYST_SESSION_COOKIE_SECRET": "cookie-secret",
            "OPERATOR_EMAIL": " owner@example.test ",
            "CATALYST_SME_JWT_SECRET": "bridge-secret",
            "CATALYST_SME_JWT_SECRET_FILE": "/secrets/JWT_SECRET",
            "CATALYST_MAX_BODY_BYTES": "2048",
            "CATALYST_UPSTREAM_TIMEOUT_SECONDS": "0.5",
            "CATALYST_ROUTES_FILE": "/etc/catalyst/routes.toml",
            "CATALYST_SHUTDOWN_GRACE_SECONDS": "25",
            "CATALYST_LOG_FORMAT": "Console",
            "CATALYST_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.gateway_url == "http://sme.test:8080"
    assert settings.public_key_file == "/keys/public.pem"
    assert settings.jwks_cache_seconds == 120
    assert settings.jwks_timeout_seconds == 1.5
    assert settings.token_algorithms == ("RS256", "PS256")
    assert settings.token_leeway_seconds == 5
    assert settings.token_issuers == ("https://kc.test/realms/a", "https://kc.test/realms/b")
    assert settings.token_audiences == ("console", "catalyst-proxy")
    assert settings.session_cookie_secret == b"cookie-secret"
    assert settings.operator_email == "owner@example.test"
    assert settings.bridge_secret == b"bridge-secret"
    assert settings.bridge_secret_file == "/secrets/JWT_SECRET"
    assert settings.max_body_bytes == 2048
    assert settings.upstream_timeout_seconds == 0.5
    assert settings.routes_file == "/etc/catalyst/routes.toml"
    assert settings.shutdown_grace_seconds == 25
    assert (settings.log_format, settings.log_level) == ("console", "debug")


def test_secrets_are_not_in_repr():
    """Secrets never show in the settings' repr (which could reach a log or a traceback)."""
    settings = env(
        CATALYST_SME_JWT_SECRET="bridge-secret-value",
        CATALYST_SESSION_COOKIE_SECRET="cookie-secret-value",
    )
    assert "bridge-secret-value" not in repr(settings)
    assert "cookie-secret-value" not in repr(settings)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, DEFAULT_GATEWAY_URL),
        ({"CATALYST_ORG_GATEWAY_URL": "http://org.test:8080"}, "http://org.test:8080"),
        ({"CATALYST_SME_GATEWAY_URL": "http://sme.test"}, "http://sme.test"),
        (
            {"CATALYST_SME_GATEWAY_URL": "http://sme.test", "CATALYST_ORG_GATEWAY_URL": "http://o"},
            "http://sme.test",
        ),
        ({"CATALYST_SME_GATEWAY_URL": "http://sme.test/"}, "http://sme.test"),
        ({"CATALYST_SME_GATEWAY_URL": "https://sme.test/prefix//"}, "https://sme.test/prefix"),
        ({"CATALYST_ORG_GATEWAY_URL": "http://org.test:8080/"}, "http://org.test:8080"),
        ({"CATALYST_SME_GATEWAY_URL": "  ", "CATALYST_ORG_GATEWAY_URL": "http://o"}, "http://o"),
    ],
)
def test_gateway_url_fallback_and_trim(values, expected):
    """SME gateway URL, else ORG gateway URL, else the default; a trailing '/' is trimmed."""
    assert env(**values).gateway_url == expected


@pytest.mark.parametrize(
    ("values", "secret"),
    [
        ({"CATALYST_SME_JWT_SECRET": "sme"}, b"sme"),
        ({"CATALYST_ORG_JWT_SECRET": "org"}, b"org"),
        ({"CATALYST_SME_JWT_SECRET": "sme", "CATALYST_ORG_JWT_SECRET": "org"}, b"sme"),
        ({"CATALYST_SME_JWT_SECRET": "", "CATALYST_ORG_JWT_SECRET": "org"}, b"org"),
        ({}, None),
    ],
)
def test_bridge_secret_fallback(values, secret):
    """The bridge secret is the SME secret, else the ORG secret, else none."""
    settings = env(**values)
    assert settings.bridge_secret == secret
    assert settings.bridge_secret_configured is (secret is not None)


def test_bridge_secret_file_counts_as_configured():
    """A secret file alone configures the bridge (it is read at request time)."""
    settings = env(CATALYST_SME_JWT_SECRET_FILE="/secrets/JWT_SECRET")
    assert settings.bridge_secret is None
    assert settings.bridge_secret_configured


@pytest.mark.parametrize(
    ("values", "url"),
    [
        (
            {"CATALYST_KC_ADDR": "http://keycloak.test:8080"},
            "http://keycloak.test:8080/realms/sovereign/protocol/openid-connect/certs",
        ),
        (
            {"CATALYST_KC_ADDR": "https://kc.test/", "CATALYST_KC_REALM": "acme"},
            "https://kc.test/realms/acme/protocol/openid-connect/certs",
        ),
        (
            {"CATALYST_KC_ADDR": "https://kc.test/auth", "CATALYST_KC_REALM": "acme"},
            "https://kc.test/auth/realms/acme/protocol/openid-connect/certs",
        ),
        (
            {"CATALYST_JWKS_URL": "https://idp.test/jwks", "CATALYST_KC_ADDR": "https://kc.test"},
            "https://idp.test/jwks",
        ),
    ],
)
def test_jwks_url_from_keycloak_address(values, url):
    """CATALYST_JWKS_URL wins; else KC_ADDR + realm (default sovereign) make the JWKS URL."""
    assert Settings.from_env(values).jwks_url == url


def test_local_key_alone_is_a_key_source():
    """A local PEM key alone is enough: no JWKS URL needed."""
    settings = Settings.from_env({"CATALYST_SESSION_PUBLIC_KEY_FILE": "/keys/public.pem"})
    assert settings.jwks_url is None
    assert settings.public_key_file == "/keys/public.pem"


@pytest.mark.parametrize(
    "values",
    [{}, {"CATALYST_KC_REALM": "acme"}, {"CATALYST_JWKS_URL": " "}, {"CATALYST_KC_ADDR": ""}],
)
def test_no_key_source_is_an_error(values):
    """Without a JWKS URL, Keycloak address or local key the gateway refuses to start."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(values)
    assert caught.value.variable == "CATALYST_JWKS_URL"
    assert "CATALYST_SESSION_PUBLIC_KEY_FILE" in str(caught.value)


@pytest.mark.parametrize(
    "value", ["HS256", "HS384", "HS512", "none", "None", "RS256,HS256", "rs256", "RS999"]
)
def test_token_algorithms_refuse_symmetric_and_none(value):
    """CATALYST_TOKEN_ALGORITHMS accepts asymmetric algorithms only: never HS* or none."""
    with pytest.raises(ConfigError) as caught:
        env(CATALYST_TOKEN_ALGORITHMS=value)
    assert caught.value.variable == "CATALYST_TOKEN_ALGORITHMS"


@pytest.mark.parametrize("value", ["ES256", "PS512", "EdDSA", "RS256,RS384,RS512"])
def test_token_algorithms_accept_asymmetric(value):
    """Every asymmetric JWS algorithm may be configured."""
    assert env(CATALYST_TOKEN_ALGORITHMS=value).token_algorithms == tuple(value.split(","))


BAD_VALUES = [
    ("CATALYST_SME_GATEWAY_URL", "sme.test:8080"),
    ("CATALYST_SME_GATEWAY_URL", "ftp://sme.test"),
    ("CATALYST_SME_GATEWAY_URL", "http://"),
    ("CATALYST_SME_GATEWAY_URL", "http://sme.test:port"),
    ("CATALYST_SME_GATEWAY_URL", "http://sme.test/?x=1"),
    ("CATALYST_SME_GATEWAY_URL", "http://sme.test/#top"),
    ("CATALYST_SME_GATEWAY_URL", "http://sme.test:0"),  # would have been port 80
    ("CATALYST_SME_GATEWAY_URL", "http://sme.test/a b"),  # its path goes into request lines
    ("CATALYST_SME_GATEWAY_URL", "http://sme.test/sm\u00e9"),
    ("CATALYST_SME_GATEWAY_URL", "http://sme.test/sme%zz"),
    ("CATALYST_IDEMPOTENCY_TTL_SECONDS", "1e16"),  # Redis refuses such an expiry: every key 503
    ("CATALYST_UPSTREAM_TIMEOUT_SECONDS", "1e12"),
    ("CATALYST_ORG_GATEWAY_URL", "gateway"),
    ("CATALYST_JWKS_URL", "keycloak/certs"),
    ("CATALYST_JWKS_URL", "http://:80/certs"),
    ("CATALYST_KC_ADDR", "keycloak:8080"),
    ("CATALYST_KC_REALM", "a/b"),
    ("CATALYST_KC_REALM", ".."),
    ("CATALYST_KC_REALM", "a?b"),
    ("CATALYST_JWKS_CACHE_SECONDS", "ten"),
    ("CATALYST_JWKS_CACHE_SECONDS", "0"),
    ("CATALYST_JWKS_CACHE_SECONDS", "-1"),
    ("CATALYST_JWKS_TIMEOUT_SECONDS", "0"),
    ("CATALYST_JWKS_TIMEOUT_SECONDS", "nan"),
    ("CATALYST_TOKEN_LEEWAY_SECONDS", "-5"),
    ("CATALYST_TOKEN_LEEWAY_SECONDS", "inf"),
    ("CATALYST_MAX_BODY_BYTES", "1MB"),
    ("CATALYST_MAX_BODY_BYTES", "-1"),
    ("CATALYST_MAX_BODY_BYTES", "1.5"),
    ("CATALYST_UPSTREAM_TIMEOUT_SECONDS", "0"),
    ("CATALYST_UPSTREAM_TIMEOUT_SECONDS", "3s"),
    ("CATALYST_SHUTDOWN_GRACE_SECONDS", "-1"),
    ("CATALYST_SHUTDOWN_GRACE_SECONDS", "soon"),
    ("CATALYST_LOG_FORMAT", "xml"),
    ("CATALYST_LOG_LEVEL", "verbose"),
    ("CATALYST_TOKEN_ALGORITHMS", "HS256"),
    # what int() and float() read but nobody writes as a number: refused, not guessed at
    ("CATALYST_MAX_BODY_BYTES", "1_048_576"),
    ("CATALYST_UPSTREAM_MAX_CONNECTIONS", "\u0661\u0660"),  # Arabic-Indic "10"
    ("CATALYST_BREAKER_FAILURES", "0x10"),
    ("CATALYST_UPSTREAM_TIMEOUT_SECONDS", "5_0"),
    ("CATALYST_SHUTDOWN_GRACE_SECONDS", "\uff15"),  # a fullwidth 5
    ("CATALYST_IDEMPOTENCY_TTL_SECONDS", "infinity"),
    ("CATALYST_UPSTREAM_IDLE_SECONDS", "1 5"),
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/\u00b3"),  # a superscript 3: not a database
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/0?db=5"),  # which one? said in one place
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379?socket_timeout=1&db=5"),
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/0?d%62=5"),  # redis-py decodes the name
    # options redis-py would hand the connection as text (a traceback at start, a 500 per
    # keyed request, garbled records), or that the gateway sets itself, or credentials
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/0?retry=x"),
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/0?redis_connect_func=x"),
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/0?decode_responses=1"),
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/0?max_connections=5"),
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/0?retry_on_timeout=1"),
    ("CATALYST_REDIS_URL", "redis://127.0.0.1:6379/0?password=x"),
]


@pytest.mark.parametrize(
    "query",
    ["socket_keepalive=true&client_name=catalyst-proxy.eu-1", "health_check_interval=30",
     "ssl_cert_reqs=required&ssl_ca_certs=/etc/ca%20bundle.pem&ssl_check_hostname=no",
     "ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_password=pw&ssl_ciphers=ECDHE+AESGCM"],
)  # fmt: skip
def test_the_redis_url_takes_connection_and_tls_options(query):
    """The query of CATALYST_REDIS_URL may set the connection's keep-alive, health checks and
    name, and TLS for rediss:// (REDIS_OPTIONS), each with a value it takes: the URL is kept
    as written."""
    url = f"rediss://127.0.0.1:6379/0?{query}"
    assert Settings.from_env({**BASE, "CATALYST_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize(
    ("query", "said"),
    [("socket_timeout=inf", "'socket_timeout' is not one"),  # the gateway's own bound
     ("socket_connect_timeout=0", "'socket_connect_timeout' is not one"),
     ("health_check_interval=-1", "'health_check_interval' has a value"),
     ("health_check_interval=nan", "'health_check_interval' has a value"),
     ("client_name=a%20b", "'client_name' has a value"),  # Redis refuses the name
     ("ssl_cert_reqs=foo", "'ssl_cert_reqs' has a value"),
     ("ssl_cert_reqs=REQUIRED", "'ssl_cert_reqs' has a value"),  # (redis-py: lower case only)
     ("socket_keepalive=maybe", "'socket_keepalive' has a value"),
     ("socket_keepalive=1;decode_responses=1", "'socket_keepalive' has a value"),
     ("ssl_password=", "'ssl_password' has a value"),
     ("Socket_Keepalive=1", "an option in the query is not one"),
     ("ssl_min_version=771", "'ssl_min_version' is not one")],
)  # fmt: skip
def test_a_redis_option_the_gateway_cannot_honour_is_refused(query, said):
    """An option that would override the gateway's own bounds (the timeouts: a keyed request
    hung for 40 s with `socket_timeout=inf` and Redis stopped), or a value the connection
    cannot use (a store never usable while /readyz said ready, or a 500 per keyed request),
    stops start-up with one line saying which; the value itself is not repeated."""
    with pytest.raises(ConfigError) as caught:
        env(CATALYST_REDIS_URL=f"rediss://127.0.0.1:6379/0?{query}")
    assert said in str(caught.value)
    assert "%20b" not in str(caught.value)


def test_tls_options_are_for_rediss_only():
    """An `ssl_*` option on a plain redis:// URL is refused as such (it was "not an option")."""
    with pytest.raises(ConfigError) as caught:
        env(CATALYST_REDIS_URL="redis://127.0.0.1:6379/0?ssl_cert_reqs=none")
    assert "'ssl_cert_reqs' is for rediss:// URLs only" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "seconds"), [("5", 5.0), ("2.5", 2.5), (".5", 0.5), ("2.", 2.0), ("+3", 3.0),
                           ("1e1", 10.0), ("1.5E+1", 15.0), (" 7 ", 7.0)]
)  # fmt: skip
def test_seconds_take_decimal_notation(value, seconds):
    """A number of seconds may have a sign, a fraction and an exponent, and white space
    around it (the variable is trimmed)."""
    settings = Settings.from_env({**BASE, "CATALYST_UPSTREAM_TIMEOUT_SECONDS": value})
    assert settings.upstream_timeout_seconds == seconds


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_names_the_variable(variable, value):
    """A bad value raises ConfigError naming the variable, in one line."""
    values = {variable: value}
    if variable in ("CATALYST_KC_REALM", "CATALYST_KC_ADDR"):
        values = {"CATALYST_KC_ADDR": "http://kc.test", **values}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(values if variable.startswith("CATALYST_KC") else {**BASE, **values})
    assert caught.value.variable == variable
    message = str(caught.value)
    assert message.startswith(variable + ": ")
    assert "\n" not in message


def test_bad_secret_values_are_not_echoed():
    """A configuration error about a secret never repeats the secret."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            {"CATALYST_SME_JWT_SECRET": "s3cr3t-value", "CATALYST_UPSTREAM_TIMEOUT_SECONDS": "x"}
        )
    assert "s3cr3t-value" not in str(caught.value)


def test_blank_values_count_as_unset():
    """An empty or blank variable takes the default, as if it were not set."""
    settings = env(
        CATALYST_UPSTREAM_TIMEOUT_SECONDS="",
        CATALYST_LOG_LEVEL="  ",
        CATALYST_SME_JWT_SECRET=" ",
        OPERATOR_EMAIL="",
    )
    assert settings.upstream_timeout_seconds == 3
    assert settings.log_level == "info"
    assert settings.bridge_secret is None
    assert settings.operator_email is None


def test_from_env_reads_only_the_mapping_given():
    """from_env takes a plain mapping: nothing comes from the process environment."""
    settings = Settings.from_env({"CATALYST_SESSION_PUBLIC_KEY_FILE": "/k.pem"})
    assert settings == Settings(public_key_file="/k.pem")


@pytest.mark.parametrize(
    "variable", ["CATALYST_TOKEN_ISSUER", "CATALYST_TOKEN_AUDIENCE", "CATALYST_TOKEN_ALGORITHMS"]
)
@pytest.mark.parametrize("value", [",", " , ", ",,,"])
def test_a_list_of_nothing_is_an_error_not_unset(variable, value):
    """A list variable set to commas alone is refused: read as unset, it would turn the
    issuer or audience check off without a word."""
    with pytest.raises(ConfigError) as caught:
        env(**{variable: value})
    assert caught.value.variable == variable


@pytest.mark.parametrize(
    "variable",
    ["CATALYST_MAX_BODY_BYTES", "CATALYST_UPSTREAM_MAX_CONNECTIONS",
     "CATALYST_UPSTREAM_MAX_PENDING", "CATALYST_IDEMPOTENCY_MAX_BODY_BYTES",
     "CATALYST_BREAKER_FAILURES"],
)  # fmt: skip
def test_a_count_or_size_past_int64_is_refused(variable):
    """Counts and sizes go up to 2**63 - 1 (the "unlimited" some operators write); a larger one
    was taken, then crashed start-up (the start-up line could not be written) and, with
    --workers, restarted forever."""
    field = variable.lower().removeprefix("catalyst_")
    assert getattr(env(**{variable: str(2**63 - 1)}), field) == 2**63 - 1
    with pytest.raises(ConfigError) as caught:
        env(**{variable: str(2**63)})
    assert caught.value.variable == variable
    assert "at most" in str(caught.value)


@pytest.mark.parametrize("value", ["315360001", "1e400", "1E999"])
def test_a_duration_too_long_says_so(value):
    """A duration past the ten-year bound, also one so large that it reads as infinity
    (1e400), is refused as too long: it was "must be greater than 0", which sends an
    operator looking the wrong way."""
    with pytest.raises(ConfigError) as caught:
        env(CATALYST_UPSTREAM_TIMEOUT_SECONDS=value)
    assert "at most 3.1536e+08 s (ten years)" in str(caught.value)


def test_secrets_keep_the_bytes_the_environment_held():
    """A secret byte that is not UTF-8 (Python hands it over as a surrogate escape) is kept
    as that byte, as the SME gateway reads its copy of the secret; it was a traceback."""
    raw = b"\xff\xfe-bridge-\x80-secret"
    held = raw.decode("utf-8", "surrogateescape")  # what os.environ holds
    settings = env(CATALYST_SME_JWT_SECRET=held, CATALYST_SESSION_COOKIE_SECRET=held)
    assert settings.bridge_secret == raw
    assert settings.session_cookie_secret == raw
    assert env(CATALYST_ORG_JWT_SECRET=held).bridge_secret == raw


def test_a_secret_is_trimmed_of_ascii_white_space_only():
    """A secret loses the ASCII white space around it (a newline from a file piped into the
    variable), as the secret file does, and nothing else: not a C0 separator nor a no-break
    space at its ends (str.strip() took them: the bridge token then failed upstream)."""
    raw = b"\x1f\xfe\x80-bridge-secret-0123456789\xc2\xa0"
    held = (b" \t" + raw + b"\n").decode("utf-8", "surrogateescape")
    assert env(CATALYST_SME_JWT_SECRET=held).bridge_secret == raw
    assert env(CATALYST_SESSION_COOKIE_SECRET=held).session_cookie_secret == raw


@pytest.mark.parametrize(
    "url",
    ["http://svc:pa55word@gw:80800", "http://svc:pa55word@[gw", "svc:pa55word@gw:8080",
     "http://svc:pa55word", "http://svc:pa55word%40gw:8080/", "http://svc:pa55word\uff20gw/",
     "https://gw.example/?api_key=pa55word", "https://gw.example/x#pa55word"],
)  # fmt: skip
def test_a_bad_url_is_refused_without_echo(url):
    """A bad URL is never repeated in the error line: a credential may sit anywhere in it (user
    info, broken or not, a query), and the line goes to the pod's log."""
    with pytest.raises(ConfigError) as caught:
        env(CATALYST_SME_GATEWAY_URL=url)
    assert caught.value.variable == "CATALYST_SME_GATEWAY_URL"
    assert "pa55word" not in str(caught.value)


@pytest.mark.parametrize(
    "variable", ["CATALYST_SME_GATEWAY_URL", "CATALYST_JWKS_URL", "CATALYST_KC_ADDR"]
)
@pytest.mark.parametrize(
    "host", ["gateway..svc", "gw\udcff", "x" * 64 + ".svc"], ids=["empty-label", "byte", "long"]
)
def test_a_host_that_is_no_dns_name_is_refused(variable, host):
    """A host that IDNA cannot encode (an empty or over-long label, a byte that is not UTF-8)
    exits 2 naming the variable; it was taken, then a traceback at start-up (the Host field
    and the JWKS client encode it)."""
    values = {variable: f"http://{host}:8080"}
    with pytest.raises(ConfigError) as caught:  # (KC_ADDR alone: the JWKS URL would win)
        Settings.from_env(values if variable == "CATALYST_KC_ADDR" else {**BASE, **values})
    assert caught.value.variable == variable
    assert "host" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["http://" + "k" * 63 + ":8080", "http://[::1]:8080", "http://b\u00fccher.example:8080/base",
     "http://localhost.:8080", "http://my_svc:8080"],
)  # fmt: skip
def test_hosts_that_are_dns_names_are_taken_with_their_ports(url):
    """A 63-character label (a Kubernetes service name may be one) with a port, an IPv6
    literal, an internationalised name, a trailing dot: all taken (the port was IDNA-encoded
    with the last label, and a label of 59-63 characters refused)."""
    assert env(CATALYST_SME_GATEWAY_URL=url).gateway_url == url.rstrip("/")


def test_url_with_credentials_is_refused_without_echo():
    """A URL carrying a password is refused, and the password is not repeated."""
    with pytest.raises(ConfigError) as caught:
        env(CATALYST_SME_GATEWAY_URL="http://user:pa55word@sme.test")
    assert caught.value.variable == "CATALYST_SME_GATEWAY_URL"
    assert "pa55word" not in str(caught.value)
