// kustody-kms: Kustody's KMS v2 plugin in Go, for kube-apiserver, on the same token and
// KeyRing as the Python sidecar (`kustody hsm --kms-socket`), with the same envelope,
// key_id, Status and errors, so the two are interchangeable on one cluster and a Secret
// sealed by one opens in the other. It exists for speed (docs/hsm.md, "KMS v2: the Go
// plugin"): PKCS#11 calls in parallel sessions from one process, where the Python plugin
// crosses a gRPC front end and one PKCS#11 worker.
//
// It only reads the token and uses its keys: creating, rotating, disabling and destroying
// KEK versions stay with the sidecar (the operator drives them through it).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"
)

const usage = `usage: kustody-kms --kms-socket PATH --kms-keyring NAME [flags]

Kustody's KMS v2 plugin for kube-apiserver, in Go: seals kube-apiserver's seeds under the
KeyRing's write version in the token (AES-256-GCM, nonce from the token RNG), with the same
envelope and key_id as 'kustody hsm --kms-socket', which it can replace on the same token.
It never creates, changes or destroys token objects: the KeyRing's versions come from the
Kustody sidecar. The PIN is read from a file only; there is no flag that takes it.

flags (one or two dashes):
`

type options struct {
	module, tokenLabel, pinFile, socket, ring, metrics, gcmIV string
	version                                                   uint
	sessions                                                  int
	healthInterval                                            time.Duration
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// parse reads the flags (one or two dashes); help goes to stdout, errors to stderr.
func parse(args []string, stdout, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("kustody-kms", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fs.SetOutput(stdout)
		fmt.Fprint(stdout, usage)
		fs.PrintDefaults()
		fs.SetOutput(stderr)
	}
	fs.StringVar(&o.module, "module", env("KUSTODY_HSM_MODULE", "/usr/lib/softhsm/libsofthsm2.so"), "PKCS#11 module (env KUSTODY_HSM_MODULE)")
	fs.StringVar(&o.tokenLabel, "token-label", env("KUSTODY_HSM_TOKEN_LABEL", "kustody"), "token to open (env KUSTODY_HSM_TOKEN_LABEL)")
	fs.StringVar(&o.pinFile, "pin-file", env("KUSTODY_HSM_PIN_FILE", ""), "file holding the user PIN; one trailing newline is stripped (env KUSTODY_HSM_PIN_FILE)")
	fs.StringVar(&o.socket, "kms-socket", "", "unix socket to serve KMS v2 on (mode 0600; required)")
	fs.StringVar(&o.ring, "kms-keyring", "", "the KeyRing whose versions seal the seeds (required)")
	fs.UintVar(&o.version, "kms-version", 0, "pin the write version (default 0: the primary, i.e. the highest ENABLED version)")
	fs.IntVar(&o.sessions, "sessions", 16, "most PKCS#11 sessions open at once, 1-256 (one per concurrent call)")
	fs.DurationVar(&o.healthInterval, "health-interval", 5*time.Second, "how often the token is probed (and reopened) and the KeyRing read again, 1s-5m")
	fs.StringVar(&o.metrics, "metrics-address", "", "host:port for Prometheus /metrics (default: off)")
	fs.StringVar(&o.gcmIV, "gcm-iv", env("KUSTODY_HSM_GCM_IV", "caller"), "GCM nonces: 'caller' (drawn from the token RNG and passed in) is the only mode; tokens that generate IVs themselves need 'kustody hsm --kms-socket' (env KUSTODY_HSM_GCM_IV)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	switch {
	case fs.NArg() > 0:
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case o.socket == "":
		return o, errors.New("--kms-socket is required")
	case o.ring == "":
		return o, errors.New("--kms-keyring is required")
	case !validKeyRing(o.ring):
		return o, fmt.Errorf("--kms-keyring %q is not a DNS-1123 subdomain (lowercase a-z, 0-9, '-', '.')", o.ring)
	case o.version > 0xFFFFFFFF:
		return o, fmt.Errorf("--kms-version %d is out of range 1..4294967295", o.version)
	case o.pinFile == "":
		return o, errors.New("--pin-file is required (or KUSTODY_HSM_PIN_FILE)")
	case o.sessions < 1 || o.sessions > 256:
		return o, fmt.Errorf("--sessions %d is out of range 1-256", o.sessions)
	case o.healthInterval < time.Second || o.healthInterval > 5*time.Minute:
		return o, fmt.Errorf("--health-interval %s is out of range 1s-5m", o.healthInterval)
	case o.gcmIV != "caller" && o.gcmIV != "auto":
		return o, fmt.Errorf("--gcm-iv %q is not supported here: only 'caller' (use 'kustody hsm --kms-socket' for token-generated IVs)", o.gcmIV)
	}
	return o, nil
}

// readPin: the file's content less one trailing newline; the error names the file only.
func readPin(path string) (string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			why := pe.Err.Error() // as Python's strerror: capitalised
			return "", fmt.Errorf("cannot read the PIN file %s: %s", path, strings.ToUpper(why[:1])+why[1:])
		}
		return "", fmt.Errorf("cannot read the PIN file %s", path)
	}
	if !utf8.Valid(raw) {
		return "", fmt.Errorf("the PIN file %s is not UTF-8", path)
	}
	pin := strings.TrimSuffix(strings.TrimSuffix(string(raw), "\n"), "\r")
	if pin == "" {
		return "", fmt.Errorf("the PIN file %s is empty", path)
	}
	return pin, nil
}

// listen binds the unix socket with mode 0600 from the start (umask), replacing a stale one.
func listen(path string) (net.Listener, error) {
	if info, err := os.Lstat(path); err == nil {
		if info.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		_ = os.Remove(path)
	}
	old := unix.Umask(0o177)
	defer unix.Umask(old)
	return net.Listen("unix", path)
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parse(args, stdout, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "kustody-kms: %v\n", err)
		return 2
	}
	logger := log.New(stderr, "kustody-kms: ", log.LstdFlags|log.LUTC)
	// Plaintext seeds pass through this process: no core dumps, no ptrace by other users.
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
	m := newMetrics()
	if o.metrics != "" {
		addr, err := m.serve(o.metrics)
		if err != nil {
			logger.Printf("metrics on %s: %v", o.metrics, err)
			return 2
		}
		logger.Printf("metrics on http://%s/metrics", addr)
	}
	tok := newToken(tokenConfig{module: o.module, label: o.tokenLabel, sessions: o.sessions}, nil)
	p := newPlugin(o.ring, uint32(o.version), tok, m, logger.Printf)
	tok.onLost = p.tokenLost
	ln, err := listen(o.socket)
	if err != nil {
		logger.Printf("listening on %s: %v", o.socket, err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go p.watch(ctx, o.pinFile, o.healthInterval, logger.Printf)
	server := grpc.NewServer(grpc.ConnectionTimeout(30 * time.Second))
	kmsapi.RegisterKeyManagementServiceServer(server, p)
	served := make(chan error, 1)
	go func() { served <- server.Serve(ln) }()
	logger.Printf("serving KMS v2 for KeyRing %s on %s (token %q, %d sessions)", o.ring, o.socket, o.tokenLabel, o.sessions)
	select {
	case err := <-served:
		logger.Printf("serving: %v", err)
		return 1
	case <-ctx.Done():
		stopped := make(chan struct{})
		go func() { server.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			server.Stop()
		}
		_ = os.Remove(o.socket)
		logger.Print("stopped")
		return 0
	}
}

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }
