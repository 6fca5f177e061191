package main

// The KMS v2 service for one KeyRing (the Python plugin's contract, operator/kustody/
// sidecar/kms.py and docs/hsm.md "Kubernetes KMS v2 plugin"):
//
//   - Status: version v2; healthz "ok" only while the token answers and the write version
//     is ENABLED, else "REASON: message"; key_id = <ring>:v<version>:<fingerprint> of the
//     write version (the primary, or --kms-version).
//   - Encrypt: a 12-byte nonce from the token RNG, AES-256-GCM in the token under the write
//     version, AAD = header ‖ "K" ‖ lp(key_id); returns the envelope and the key_id.
//   - Decrypt: parses the envelope, refuses another KeyRing's, decrypts with the version it
//     names (while ENABLED) and the request's key_id in the AAD.
//
// The view of the KeyRing is rescanned every --health-interval, at most once a second on
// Status, and when a Decrypt names a version the view does not have (another plugin
// instance may have sealed under a version created since the last scan).

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
	kmsapi "k8s.io/kms/apis/v2"
)

type grpcContext = context.Context

const apiVersion = "v2"

type plugin struct {
	kmsapi.UnsafeKeyManagementServiceServer

	ring    string
	pinned  uint32 // 0: follow the primary version
	tok     *token
	metrics *metrics
	logf    func(string, ...any)

	view    atomic.Pointer[view]
	health  atomic.Pointer[kmsError] // nil: the token answers
	rescans sync.Mutex               // one scan at a time; callers arriving meanwhile share it
	scanned atomic.Int64             // unix nanos of the last scan that succeeded

	lastKeyID atomic.Pointer[string] // the last key_id Status gave
	// Set once the token refused a caller-supplied GCM IV: Status says so from then on.
	incompatible atomic.Pointer[kmsError]
}

func newPlugin(ring string, pinned uint32, tok *token, m *metrics, logf func(string, ...any)) *plugin {
	p := &plugin{ring: ring, pinned: pinned, tok: tok, metrics: m, logf: logf}
	p.view.Store(&view{ring: ring, versions: map[uint32]*version{}})
	p.health.Store(newError(reasonTokenUnavailable, "the token has not been opened yet"))
	return p
}

// rescan reads the KeyRing again unless a scan finished after `since` (then that one is
// used): concurrent callers share one scan.
func (p *plugin) rescan(since time.Time) *kmsError {
	p.rescans.Lock()
	defer p.rescans.Unlock()
	if p.scanned.Load() > since.UnixNano() {
		return nil
	}
	err := p.tok.with(func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		v, err := scan(ctx, s, p.ring)
		if err != nil {
			return err
		}
		p.reportUntrusted(p.view.Load(), v)
		p.view.Store(v)
		p.metrics.versions(v)
		return nil
	})
	if err != nil {
		return asKmsError(err, "reading the token")
	}
	p.scanned.Store(time.Now().UnixNano()) // only a scan that succeeded counts as fresh
	return nil
}

// tokenLost is the token's onLost: health says so at once, before the next health pass.
func (p *plugin) tokenLost(why *kmsError) {
	p.health.Store(why)
	p.metrics.tokenUp(false)
	p.logf("token unavailable: %s", why.Error())
}

// reportUntrusted logs each version whose token object became untrusted since the last scan
// (a key someone else put under Kustody's label): it is never used, and someone must look.
func (p *plugin) reportUntrusted(before, after *view) {
	for _, n := range after.numbers() {
		ver := after.versions[n]
		if ver.untrusted == "" {
			continue
		}
		if old, ok := before.versions[n]; ok && old.untrusted == ver.untrusted {
			continue
		}
		p.logf("KEY_NOT_TRUSTED: refusing to use the token object for %s/v%d: %s", p.ring, n, ver.untrusted)
	}
}

func asKmsError(err error, action string) *kmsError {
	if ke, ok := err.(*kmsError); ok {
		return ke
	}
	return newError(reasonInternal, fmt.Sprintf("%s failed (%s)", action, ckrName(err)))
}

// writeVersion is the version Encrypt uses and Status names.
func (p *plugin) writeVersion() (*version, *kmsError) {
	v := p.view.Load()
	n := p.pinned
	if n == 0 {
		primary, ok := v.primary()
		if !ok {
			return nil, newError(reasonNoPrimaryVersion, fmt.Sprintf("KeyRing %s has no ENABLED version", p.ring))
		}
		n = primary
	}
	return v.usable(n)
}

func (p *plugin) Status(ctx context.Context, _ *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	start := time.Now()
	if time.Since(time.Unix(0, p.scanned.Load())) > time.Second {
		_ = p.rescan(start.Add(-time.Second))
	}
	resp := &kmsapi.StatusResponse{Version: apiVersion, Healthz: "ok"}
	id, err := p.statusKeyID()
	if err == nil {
		p.lastKeyID.Store(&id)
	}
	if last := p.lastKeyID.Load(); last != nil {
		resp.KeyId = *last // on an error, the last key_id (as the sidecar does)
	}
	if h := p.incompatible.Load(); h != nil {
		resp.Healthz = h.Error()
	} else if h := p.health.Load(); h != nil {
		resp.Healthz = h.Error()
	} else if err != nil {
		resp.Healthz = err.Error()
	}
	p.metrics.ok("kms.Status", start)
	return resp, nil
}

// statusKeyID is the write version's key_id, or why there is none, in the sidecar's words
// (KmsServicer.current_key_id).
func (p *plugin) statusKeyID() (string, *kmsError) {
	v := p.view.Load()
	n := p.pinned
	if n == 0 {
		primary, ok := v.primary()
		if !ok {
			return "", newError(reasonNoPrimaryVersion, fmt.Sprintf("KeyRing %s has no ENABLED version", p.ring))
		}
		n = primary
	}
	ver, ok := v.versions[n]
	switch {
	case !ok:
		return "", newError(reasonVersionNotFound, fmt.Sprintf("KEK version %s/v%d does not exist", p.ring, n))
	case ver.untrusted != "":
		_, err := v.usable(n)
		return "", err
	case ver.state != stateEnabled:
		return "", newError(reasonVersionDisabled, fmt.Sprintf("KEK version %s/v%d is %s", p.ring, n, ver.state))
	}
	return ver.keyID, nil
}

func (p *plugin) Encrypt(ctx context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	start := time.Now()
	resp, err := p.encrypt(req.Plaintext)
	return resp, p.finish(ctx, "kms.Encrypt", start, err)
}

func (p *plugin) encrypt(plaintext []byte) (*kmsapi.EncryptResponse, *kmsError) {
	if len(plaintext) == 0 {
		return nil, newError(reasonInvalidArgument, fmt.Sprintf("plaintext is 0 bytes; allowed 1..%d", maxPlaintextBytes))
	}
	if len(plaintext) > maxPlaintextBytes {
		return nil, newError(reasonRequestTooLarge, fmt.Sprintf("plaintext is %d bytes; allowed 1..%d", len(plaintext), maxPlaintextBytes))
	}
	if h := p.health.Load(); h != nil {
		return nil, newError(reasonTokenUnavailable, h.Error())
	}
	ver, kerr := p.writeVersion()
	if kerr != nil {
		return nil, kerr
	}
	id, aad := ver.keyID, ver.sealAAD
	if aad == nil {
		return nil, newError(reasonInternal, fmt.Sprintf("KEK version %s/v%d has no usable key_id", p.ring, ver.number))
	}
	var env envelope
	err := p.tok.with(func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		nonce, err := ctx.GenerateRandom(s, nonceBytes)
		if err != nil {
			return err
		}
		if len(nonce) != nonceBytes {
			return newError(reasonInternal, "the token RNG returned a short nonce")
		}
		params := pkcs11.NewGCMParams(nonce, aad, tagBytes*8)
		defer params.Free()
		if err := ctx.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, ver.handle); err != nil {
			return err
		}
		sealed, err := ctx.Encrypt(s, plaintext)
		if err != nil {
			return err
		}
		if len(sealed) != len(plaintext)+tagBytes {
			return newError(reasonInternal, fmt.Sprintf("the token's GCM output under %s/v%d is malformed", p.ring, ver.number))
		}
		env = envelope{ring: p.ring, version: ver.number, nonce: nonce, sealed: sealed}
		return nil
	})
	if err != nil {
		return nil, p.keyError(err, ver.number, "sealing")
	}
	return &kmsapi.EncryptResponse{Ciphertext: env.bytes(), KeyId: id}, nil
}

func (p *plugin) Decrypt(ctx context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	start := time.Now()
	resp, err := p.decrypt(req.Ciphertext, req.KeyId)
	return resp, p.finish(ctx, "kms.Decrypt", start, err)
}

func (p *plugin) decrypt(ciphertext []byte, id string) (*kmsapi.DecryptResponse, *kmsError) {
	env, kerr := parseEnvelope(ciphertext)
	if kerr != nil {
		return nil, kerr
	}
	if env.ring != p.ring {
		return nil, newError(reasonInvalidArgument, fmt.Sprintf("this KMS plugin serves KeyRing %s, not %s", p.ring, env.ring))
	}
	aad, kerr := kmsAAD(env.ring, env.version, id)
	if kerr != nil {
		return nil, kerr
	}
	if h := p.health.Load(); h != nil {
		return nil, newError(reasonTokenUnavailable, h.Error())
	}
	if _, known := p.view.Load().versions[env.version]; !known {
		if err := p.rescan(time.Now().Add(-500 * time.Millisecond)); err != nil {
			return nil, err
		}
	}
	ver, kerr := p.view.Load().usable(env.version)
	if kerr != nil {
		return nil, kerr
	}
	var plaintext []byte
	err := p.tok.with(func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		params := pkcs11.NewGCMParams(env.nonce, aad, tagBytes*8)
		defer params.Free()
		if err := ctx.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, ver.handle); err != nil {
			return err
		}
		out, err := ctx.Decrypt(s, env.sealed)
		if err != nil {
			if authFailed(err) {
				// SoftHSM2 reports a failed tag as CKR_GENERAL_ERROR: make sure the token
				// still answers before calling it an authentication failure.
				if _, perr := ctx.GenerateRandom(s, 1); perr == nil {
					return newError(reasonAADMismatch, fmt.Sprintf(
						"the ciphertext does not authenticate under %s/v%d for this key_id (wrong key_id, or altered ciphertext)",
						p.ring, env.version))
				}
			}
			return err
		}
		plaintext = out
		return nil
	})
	if err != nil {
		return nil, p.keyError(err, env.version, "unsealing")
	}
	return &kmsapi.DecryptResponse{Plaintext: plaintext}, nil
}

func authFailed(err error) bool {
	return isCode(err, pkcs11.CKR_GENERAL_ERROR) || isCode(err, pkcs11.CKR_ENCRYPTED_DATA_INVALID) ||
		isCode(err, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE)
}

// keyError types a failed token call as the sidecar would (pkcs11/token.py: classify), with
// one addition: a key the token refuses to use (disabled since the last read) is
// VERSION_DISABLED, and the token is read again so the next call sees its state.
func (p *plugin) keyError(err error, n uint32, action string) *kmsError {
	if ke, ok := err.(*kmsError); ok {
		return ke
	}
	ref := fmt.Sprintf("%s/v%d", p.ring, n)
	switch {
	case isCode(err, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED):
		go func() { _ = p.rescan(time.Now()) }()
		return newError(reasonVersionDisabled, fmt.Sprintf("KEK version %s is disabled (the token refuses the key)", ref))
	case isCode(err, pkcs11.CKR_KEY_HANDLE_INVALID) || isCode(err, pkcs11.CKR_OBJECT_HANDLE_INVALID):
		go func() { _ = p.rescan(time.Now()) }()
		return newError(reasonTokenUnavailable, fmt.Sprintf("%s under %s: the token no longer knows the key handle; reading the token again", action, ref))
	case isCode(err, pkcs11.CKR_DEVICE_MEMORY) || isCode(err, pkcs11.CKR_HOST_MEMORY):
		return newError(reasonTokenFull, fmt.Sprintf("%s under %s: the token has no room left", action, ref))
	case action == "sealing" && (isCode(err, pkcs11.CKR_MECHANISM_PARAM_INVALID) || isCode(err, pkcs11.CKR_MECHANISM_INVALID)):
		why := newError(reasonTokenIncompatible, fmt.Sprintf(
			"the token refuses AES-GCM with a caller-supplied IV (%s); kustody-kms needs gcm-iv=caller: use 'kustody hsm --kms-socket' for this token", ckrName(err)))
		p.incompatible.Store(why)
		return why
	}
	return newError(reasonInternal, fmt.Sprintf("%s under %s failed (%s)", action, ref, ckrName(err)))
}

func (p *plugin) finish(ctx context.Context, op string, start time.Time, err *kmsError) error {
	if err == nil {
		p.metrics.ok(op, start)
		return nil
	}
	outcome := err.reason
	if ctx.Err() != nil {
		outcome = "cancelled"
	}
	p.metrics.observe(op, outcome, start)
	return err.status(ctx)
}

// watch keeps health and the view current: it probes (and if need be reopens) the token and
// rescans every interval until ctx ends. The PIN is read from its file for each login and
// not kept; a PIN the token refused is not tried again until the file changes, so a wrong
// PIN never counts down a token's retry limit by itself.
func (p *plugin) watch(ctx context.Context, pinFile string, interval time.Duration, logf func(string, ...any)) {
	var refused [32]byte // SHA-256 of the last PIN the token refused
	for {
		before := p.health.Load()
		var now *kmsError
		if before != nil {
			now = p.open(pinFile, &refused)
		} else {
			now = p.tok.probe()
		}
		if now == nil {
			if err := p.rescan(time.Now()); err != nil {
				if p.tok.current.Load() == nil {
					now = err // the token was lost while being read
				} else {
					logf("reading KeyRing %s from the token failed: %s; serving what was read before", p.ring, err.Error())
				}
			}
		}
		p.health.Store(now)
		p.metrics.tokenUp(now == nil)
		switch {
		case now == nil && before != nil:
			logf("token %q is serving KeyRing %s", p.tok.cfg.label, p.ring)
		case now != nil && (before == nil || before.Error() != now.Error()):
			logf("token unavailable: %s", now.Error())
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

func (p *plugin) open(pinFile string, refused *[32]byte) *kmsError {
	pin, err := readPin(pinFile)
	if err != nil {
		return newError(reasonPinFileUnreadable, err.Error())
	}
	digest := sha256.Sum256([]byte(pin))
	if digest == *refused {
		return newError(reasonPinIncorrect, fmt.Sprintf(
			"the token refused the PIN in %s; it is not tried again until that file changes", pinFile))
	}
	kerr := p.tok.open(pin)
	if kerr != nil && kerr.reason == reasonPinIncorrect {
		*refused = digest
	}
	return kerr
}
