// Command goref is the go-reference row of `make bench`: the gateway's
// per-request work for one purchase route, written the way a Go service
// would be, so the Python gateway can be compared with it in the same run.
//
// For each POST on -path (default /api/v1/billing/purchase) it:
//
//  1. takes the operator token from "Authorization: Bearer <jwt>";
//  2. verifies it on every request (no cache) with golang-jwt v4: RS256
//     only, exp required, exp/nbf/iat with a 30 s leeway, sub a non-empty
//     string; any failure is 401 {"error":"unauthenticated"};
//  3. maps realm roles / tier to the SME role (docs/reference.md, Role mapping and the bridge token);
//  4. mints an HS256 bridge token {sub, email, role, iat, exp=iat+300,
//     typ="session", jti};
//  5. streams the body to the upstream's /api/billing/purchase through one
//     shared http.Client, with the bridge token, Content-Type (if any) and
//     Accept: application/json, and copies status, Content-Type and body
//     back; 503 {"error":"sme-gateway-unreachable"} when it cannot connect.
//
// What the gateway does beyond that (access log, metrics, X-Request-ID,
// X-Forwarded-*, the token cache) it does not do: the difference is the
// price of those, plus Python.
//
// bench.py builds it in GOPATH mode against Debian's
// golang-github-golang-jwt-jwt-dev, with no network: it copies this file to
// $WORK/gopath/src/catalyst-bench/goref/ next to a one-line go.mod (which
// lets GOPATH mode read the import .../jwt/v4 as Debian's .../jwt) and runs
//
//	GO111MODULE=off GOPATH=$WORK/gopath:/usr/share/gocode go build catalyst-bench/goref
//
// Settings come from flags, which default to the environment the gateway
// reads (CATALYST_SESSION_PUBLIC_KEY_FILE, CATALYST_SME_JWT_SECRET or
// CATALYST_SME_JWT_SECRET_FILE, CATALYST_SME_GATEWAY_URL) and GOREF_ADDR,
// GOREF_PATH for the listen address and the route.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/golang-jwt/jwt/v4"
)

const (
	leeway       = 30.0 // seconds, for exp, nbf and iat
	bridgeTTL    = 300  // seconds: exp = iat + 300
	upstreamPath = "/api/billing/purchase"
)

type config struct {
	addr, path, keyFile, secret, secretFile, upstream string
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func parseFlags() config {
	var c config
	flag.StringVar(&c.addr, "addr", env("GOREF_ADDR", "127.0.0.1:19084"), "listen address [$GOREF_ADDR]")
	flag.StringVar(&c.path, "path", env("GOREF_PATH", "/api/v1/billing/purchase"), "the route [$GOREF_PATH]")
	flag.StringVar(&c.keyFile, "key-file", os.Getenv("CATALYST_SESSION_PUBLIC_KEY_FILE"),
		"PEM RSA public key of the operator tokens [$CATALYST_SESSION_PUBLIC_KEY_FILE]")
	flag.StringVar(&c.secretFile, "secret-file", os.Getenv("CATALYST_SME_JWT_SECRET_FILE"),
		"file holding the HS256 bridge secret [$CATALYST_SME_JWT_SECRET_FILE]; "+
			"$CATALYST_SME_JWT_SECRET wins when set")
	flag.StringVar(&c.upstream, "upstream", os.Getenv("CATALYST_SME_GATEWAY_URL"),
		"upstream (SME gateway) base URL [$CATALYST_SME_GATEWAY_URL]")
	flag.Parse()
	c.secret = os.Getenv("CATALYST_SME_JWT_SECRET")
	return c
}

// gateway holds what every request shares: the key, the secret, the parser
// and the one pooled client.
type gateway struct {
	key      *rsa.PublicKey
	secret   []byte
	upstream string // base URL + upstreamPath
	parser   *jwt.Parser
	client   *http.Client
}

func newGateway(c config) (*gateway, error) {
	pem, err := os.ReadFile(c.keyFile)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	key, err := jwt.ParseRSAPublicKeyFromPEM(pem)
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", c.keyFile, err)
	}
	secret := c.secret
	if secret == "" && c.secretFile != "" {
		raw, err := os.ReadFile(c.secretFile)
		if err != nil {
			return nil, fmt.Errorf("secret file: %w", err)
		}
		secret = strings.TrimSpace(string(raw))
	}
	if secret == "" {
		return nil, errors.New("no bridge secret: set CATALYST_SME_JWT_SECRET or -secret-file")
	}
	if c.upstream == "" {
		return nil, errors.New("no upstream: set CATALYST_SME_GATEWAY_URL or -upstream")
	}
	transport := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 3 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:          4096,
		MaxIdleConnsPerHost:   4096, // the default, 2, would open and close connections under load
		IdleConnTimeout:       15 * time.Second,
		ResponseHeaderTimeout: 3 * time.Second,
		DisableCompression:    true, // pass bytes through; never add Accept-Encoding
	}
	return &gateway{
		key:      key,
		secret:   []byte(secret),
		upstream: strings.TrimRight(c.upstream, "/") + upstreamPath,
		parser:   jwt.NewParser(jwt.WithValidMethods([]string{"RS256"}), jwt.WithoutClaimsValidation()),
		client:   &http.Client{Transport: transport},
	}, nil
}

func writeError(w http.ResponseWriter, status int, code string) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	if status == http.StatusUnauthorized {
		h.Set("WWW-Authenticate", `Bearer realm="catalyst-proxy", error="invalid_token"`)
	}
	w.WriteHeader(status)
	io.WriteString(w, `{"error":"`+code+`"}`)
}

// operator verifies the request's bearer token and returns its claims.
func (g *gateway) operator(r *http.Request) (jwt.MapClaims, error) {
	auth := r.Header.Get("Authorization")
	scheme, token, ok := strings.Cut(auth, " ")
	if !ok || !strings.EqualFold(scheme, "bearer") || strings.TrimSpace(token) == "" {
		return nil, errors.New("no bearer token")
	}
	claims := jwt.MapClaims{}
	_, err := g.parser.ParseWithClaims(strings.TrimSpace(token), claims, func(t *jwt.Token) (interface{}, error) {
		if _, crit := t.Header["crit"]; crit {
			return nil, errors.New("critical header parameters are not supported")
		}
		return g.key, nil
	})
	if err != nil {
		return nil, err
	}
	return claims, checkClaims(claims, float64(time.Now().UnixNano())/1e9)
}

// checkClaims: valid while now < exp + leeway, nbf <= now + leeway and
// iat <= now + leeway; exp and sub are required.
func checkClaims(c jwt.MapClaims, now float64) error {
	exp, ok := c["exp"].(float64)
	if !ok {
		return errors.New("exp is missing or not a number")
	}
	if now >= exp+leeway {
		return errors.New("expired")
	}
	for _, name := range []string{"nbf", "iat"} {
		v, present := c[name]
		if !present {
			continue
		}
		t, ok := v.(float64)
		if !ok {
			return fmt.Errorf("%s is not a number", name)
		}
		if t > now+leeway {
			return fmt.Errorf("%s is in the future", name)
		}
	}
	if sub, _ := c["sub"].(string); strings.TrimSpace(sub) == "" {
		return errors.New("sub is missing or empty")
	}
	return nil
}

// role maps the operator's claims to the SME role. Claims of the wrong type
// count as absent as a whole.
func role(c jwt.MapClaims) string {
	for _, r := range realmRoles(c) {
		switch strings.ToLower(strings.TrimSpace(r)) {
		case "catalyst-owner":
			return "superadmin"
		case "catalyst-admin", "sovereign-admin", "application-admin":
			return "sovereign-admin"
		}
	}
	tier, _ := c["tier"].(string)
	switch strings.ToLower(strings.TrimSpace(tier)) {
	case "owner":
		return "superadmin"
	case "admin":
		return "sovereign-admin"
	}
	return "member"
}

func realmRoles(c jwt.MapClaims) []string {
	access, _ := c["realm_access"].(map[string]interface{})
	list, _ := access["roles"].([]interface{})
	roles := make([]string, 0, len(list))
	for _, v := range list {
		s, ok := v.(string)
		if !ok {
			return nil
		}
		roles = append(roles, s)
	}
	return roles
}

// bridgeClaims is the HS256 token's payload, in the contract's order.
type bridgeClaims struct {
	Sub   string `json:"sub"`
	Email string `json:"email"`
	Role  string `json:"role"`
	Iat   int64  `json:"iat"`
	Exp   int64  `json:"exp"`
	Typ   string `json:"typ"`
	Jti   string `json:"jti"`
}

func (bridgeClaims) Valid() error { return nil }

func (g *gateway) mint(c jwt.MapClaims) (string, error) {
	var jti [16]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", err
	}
	sub, _ := c["sub"].(string)
	email, _ := c["email"].(string)
	now := time.Now().Unix()
	// The header is {"alg":"HS256","typ":"JWT"}: golang-jwt's, keys sorted.
	return jwt.NewWithClaims(jwt.SigningMethodHS256, bridgeClaims{
		Sub: sub, Email: email, Role: role(c), Iat: now, Exp: now + bridgeTTL,
		Typ: "session", Jti: hex.EncodeToString(jti[:]),
	}).SignedString(g.secret)
}

func (g *gateway) purchase(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeError(w, http.StatusMethodNotAllowed, "method-not-allowed")
		return
	}
	claims, err := g.operator(r)
	if err != nil {
		writeError(w, http.StatusUnauthorized, "unauthenticated")
		return
	}
	bridge, err := g.mint(claims)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "sme-jwt-mint-failed")
		return
	}
	body := io.Reader(r.Body)
	if r.ContentLength == 0 {
		body = http.NoBody
	}
	out, err := http.NewRequestWithContext(r.Context(), http.MethodPost, g.upstream, body)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "bad-upstream-request")
		return
	}
	out.ContentLength = r.ContentLength // -1 (unknown) streams it chunked
	out.Header.Set("Authorization", "Bearer "+bridge)
	out.Header.Set("Accept", "application/json")
	if ct := r.Header.Get("Content-Type"); ct != "" {
		out.Header.Set("Content-Type", ct)
	}
	resp, err := g.client.Do(out)
	if err != nil {
		status, code := upstreamFailure(err)
		writeError(w, status, code)
		return
	}
	defer resp.Body.Close()
	ct := resp.Header.Get("Content-Type")
	if ct == "" {
		ct = "application/json"
	}
	w.Header().Set("Content-Type", ct)
	if resp.ContentLength >= 0 {
		w.Header().Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	}
	w.WriteHeader(resp.StatusCode)
	io.Copy(w, resp.Body) // a failure here can only cut the answer short
}

// upstreamFailure: a failed connect is 503 (nothing was sent), a timeout
// waiting for the answer 504, anything else 502.
func upstreamFailure(err error) (int, string) {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return http.StatusServiceUnavailable, "sme-gateway-unreachable"
	}
	var timeout interface{ Timeout() bool }
	if errors.As(err, &timeout) && timeout.Timeout() {
		return http.StatusGatewayTimeout, "sme-gateway-timeout"
	}
	return http.StatusBadGateway, "sme-gateway-bad-response"
}

func main() {
	runtime.GOMAXPROCS(runtime.NumCPU()) // all cores, whatever $GOMAXPROCS says
	c := parseFlags()
	g, err := newGateway(c)
	if err != nil {
		log.Fatalf("goref: %v", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc(c.path, g.purchase)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"status":"ok"}`)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		writeError(w, http.StatusNotFound, "not-found")
	})
	server := &http.Server{Addr: c.addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	// SIGTERM/SIGINT: stop accepting, let in-flight requests finish (10 s), exit 0.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		<-ctx.Done()
		grace, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		server.Shutdown(grace)
	}()
	log.Printf("goref: %s %s -> %s (GOMAXPROCS %d)", c.addr, c.path, g.upstream, runtime.GOMAXPROCS(0))
	if err := server.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("goref: %v", err)
	}
	<-drained
}
