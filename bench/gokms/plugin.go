package main

// The reference KMS v2 plugin: what a minimal Go plugin over PKCS#11 does per call, and no
// more. Every Encrypt takes a 12-byte nonce from the token's RNG (C_GenerateRandom) and seals
// the plaintext with CKM_AES_GCM inside the token (C_EncryptInit + C_Encrypt) under one
// AES-256 token key (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not extractable: the template
// Kustody uses for its KEKs), with the key_id as AAD; every Decrypt is C_DecryptInit +
// C_Decrypt. Nothing is cached but the key handle and the sessions: no DEK cache, no
// batching. Sessions come from a pool that grows on demand (one per concurrent call, up to
// -sessions), all logged in through the first one (login is per application); the module is
// initialised with CKF_OS_LOCKING_OK, so calls on different sessions run in parallel.
//
// The gRPC side is Kubernetes' own k8s.io/kms/pkg/service (the server Go plugins embed), on
// a unix socket. Ciphertext = nonce ‖ AES-GCM(ciphertext ‖ tag).

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/pkcs11"
	"k8s.io/kms/pkg/service"
)

const nonceBytes = 12

type plugin struct {
	ctx   *pkcs11.Ctx
	slot  uint
	key   pkcs11.ObjectHandle
	keyID string
	aad   []byte
	pool  chan pkcs11.SessionHandle // idle sessions
	slots chan struct{}             // how many more sessions may be opened
}

func newPlugin(module, tokenLabel, pin, keyLabel string, sessions int) (*plugin, error) {
	ctx := pkcs11.New(module)
	if ctx == nil {
		return nil, fmt.Errorf("cannot load %s", module)
	}
	if err := ctx.Initialize(); err != nil {
		return nil, fmt.Errorf("C_Initialize: %w", err)
	}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return nil, fmt.Errorf("C_GetSlotList: %w", err)
	}
	p := &plugin{ctx: ctx, keyID: keyLabel, aad: []byte(keyLabel)}
	found := false
	for _, slot := range slots {
		info, err := ctx.GetTokenInfo(slot)
		if err == nil && strings.TrimRight(info.Label, " \x00") == tokenLabel {
			p.slot, found = slot, true
			break
		}
	}
	if !found {
		return nil, fmt.Errorf("no token labelled %q", tokenLabel)
	}
	first, err := ctx.OpenSession(p.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return nil, fmt.Errorf("C_OpenSession: %w", err)
	}
	if err := ctx.Login(first, pkcs11.CKU_USER, pin); err != nil {
		return nil, fmt.Errorf("C_Login: %w", err)
	}
	if p.key, err = findOrCreateKey(ctx, first, keyLabel); err != nil {
		return nil, err
	}
	p.pool = make(chan pkcs11.SessionHandle, sessions)
	p.slots = make(chan struct{}, sessions)
	for i := 1; i < sessions; i++ {
		p.slots <- struct{}{}
	}
	p.pool <- first
	return p, nil
}

func findOrCreateKey(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, label string) (pkcs11.ObjectHandle, error) {
	find := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	if err := ctx.FindObjectsInit(s, find); err != nil {
		return 0, fmt.Errorf("C_FindObjectsInit: %w", err)
	}
	objs, _, err := ctx.FindObjects(s, 1)
	if ferr := ctx.FindObjectsFinal(s); err == nil {
		err = ferr
	}
	if err != nil {
		return 0, fmt.Errorf("C_FindObjects: %w", err)
	}
	if len(objs) == 1 {
		return objs[0], nil
	}
	template := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
	key, err := ctx.GenerateKey(s, mech, template)
	if err != nil {
		return 0, fmt.Errorf("C_GenerateKey: %w", err)
	}
	return key, nil
}

// session takes an idle session, or opens one while fewer than -sessions exist, or waits.
func (p *plugin) session() (pkcs11.SessionHandle, error) {
	select {
	case s := <-p.pool:
		return s, nil
	default:
	}
	select {
	case s := <-p.pool:
		return s, nil
	case <-p.slots:
		s, err := p.ctx.OpenSession(p.slot, pkcs11.CKF_SERIAL_SESSION)
		if err != nil {
			p.slots <- struct{}{}
			return 0, fmt.Errorf("C_OpenSession: %w", err)
		}
		return s, nil
	}
}

func (p *plugin) release(s pkcs11.SessionHandle) { p.pool <- s }

func (p *plugin) Encrypt(_ context.Context, _ string, plaintext []byte) (*service.EncryptResponse, error) {
	if len(plaintext) == 0 || len(plaintext) > 4096 {
		return nil, errors.New("plaintext must be 1..4096 bytes")
	}
	s, err := p.session()
	if err != nil {
		return nil, err
	}
	defer p.release(s)
	nonce, err := p.ctx.GenerateRandom(s, nonceBytes)
	if err != nil {
		return nil, fmt.Errorf("C_GenerateRandom: %w", err)
	}
	params := pkcs11.NewGCMParams(nonce, p.aad, 128)
	defer params.Free()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
	if err := p.ctx.EncryptInit(s, mech, p.key); err != nil {
		return nil, fmt.Errorf("C_EncryptInit: %w", err)
	}
	sealed, err := p.ctx.Encrypt(s, plaintext)
	if err != nil {
		return nil, fmt.Errorf("C_Encrypt: %w", err)
	}
	return &service.EncryptResponse{Ciphertext: append(nonce, sealed...), KeyID: p.keyID}, nil
}

func (p *plugin) Decrypt(_ context.Context, _ string, req *service.DecryptRequest) ([]byte, error) {
	if req.KeyID != p.keyID {
		return nil, fmt.Errorf("unknown key_id %q", req.KeyID)
	}
	if len(req.Ciphertext) < nonceBytes+16 {
		return nil, errors.New("ciphertext too short")
	}
	s, err := p.session()
	if err != nil {
		return nil, err
	}
	defer p.release(s)
	params := pkcs11.NewGCMParams(req.Ciphertext[:nonceBytes], p.aad, 128)
	defer params.Free()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
	if err := p.ctx.DecryptInit(s, mech, p.key); err != nil {
		return nil, fmt.Errorf("C_DecryptInit: %w", err)
	}
	plaintext, err := p.ctx.Decrypt(s, req.Ciphertext[nonceBytes:])
	if err != nil {
		return nil, fmt.Errorf("C_Decrypt: %w", err)
	}
	return plaintext, nil
}

// Status probes the token (C_GetTokenInfo) on every call, as a plugin's healthz should.
func (p *plugin) Status(context.Context) (*service.StatusResponse, error) {
	healthz := "ok"
	if _, err := p.ctx.GetTokenInfo(p.slot); err != nil {
		healthz = err.Error()
	}
	return &service.StatusResponse{Version: "v2", Healthz: healthz, KeyID: p.keyID}, nil
}

func serve(args []string) {
	fs := flagSet("serve")
	module := fs.String("module", "", "PKCS#11 module (.so)")
	tokenLabel := fs.String("token-label", "", "token label")
	pinFile := fs.String("pin-file", "", "file holding the user PIN")
	keyLabel := fs.String("key-label", "gokms-bench", "label (and key_id) of the AES key; created if missing")
	socket := fs.String("socket", "", "unix socket to serve on")
	sessions := fs.Int("sessions", 64, "most PKCS#11 sessions open at once")
	_ = fs.Parse(args)
	pin, err := os.ReadFile(*pinFile)
	if err != nil {
		fail("%v", err)
	}
	p, err := newPlugin(*module, *tokenLabel, strings.TrimSpace(string(pin)), *keyLabel, *sessions)
	if err != nil {
		fail("%v", err)
	}
	_ = os.Remove(*socket)
	grpcService := service.NewGRPCService(*socket, 30*time.Second, p)
	done := make(chan error, 1)
	go func() { done <- grpcService.ListenAndServe() }()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	var once sync.Once
	select {
	case err := <-done:
		fail("serving: %v", err)
	case <-signals:
		once.Do(grpcService.Close)
	}
}
