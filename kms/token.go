package main

// The token: one PKCS#11 module, one token found by its label, logged in once as the user,
// and a pool of sessions (one per concurrent call, up to --sessions). The module is
// initialised with CKF_OS_LOCKING_OK, so calls on different sessions run in parallel.
//
// This process only reads the token and uses its keys: it never creates, changes or deletes
// an object (the Python sidecar, `kustody hsm`, owns the KEK lifecycle). A lost session
// (token removed, module reset, logged out) marks the token down; the health loop then
// opens it again.

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

type tokenConfig struct {
	module   string
	label    string
	sessions int
}

type token struct {
	cfg tokenConfig

	mu    sync.Mutex // guards the fields below and (re)opening
	ctx   *pkcs11.Ctx
	slot  uint
	pool  chan pkcs11.SessionHandle // idle sessions
	slots chan struct{}             // how many more sessions may be opened
	gen   uint64                    // bumped at every (re)open: sessions of older ones are dropped

	current atomic.Pointer[opened] // what calls use, without the lock; nil while closed
}

// opened is one generation of the open token, as calls see it.
type opened struct {
	ctx   *pkcs11.Ctx
	slot  uint
	pool  chan pkcs11.SessionHandle
	slots chan struct{}
	gen   uint64
}

func newToken(cfg tokenConfig) *token { return &token{cfg: cfg} }

// open loads the module (once), finds the token, logs in and fills the pool with one
// session. It returns a typed error naming what is wrong.
func (t *token) open(pin string) *kmsError {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closeLocked()
	if t.ctx == nil {
		ctx := pkcs11.New(t.cfg.module)
		if ctx == nil {
			return newError(reasonModuleUnavailable, fmt.Sprintf("cannot load the PKCS#11 module %s", t.cfg.module))
		}
		if err := ctx.Initialize(); err != nil && !isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			ctx.Destroy()
			return newError(reasonModuleUnavailable, fmt.Sprintf("C_Initialize of %s failed (%s)", t.cfg.module, ckrName(err)))
		}
		t.ctx = ctx
	}
	slots, err := t.ctx.GetSlotList(true)
	if err != nil {
		return newError(reasonTokenNotFound, fmt.Sprintf("C_GetSlotList failed (%s)", ckrName(err)))
	}
	found := 0
	for _, slot := range slots {
		info, err := t.ctx.GetTokenInfo(slot)
		if err == nil && strings.TrimRight(info.Label, " \x00") == t.cfg.label {
			t.slot = slot
			found++
		}
	}
	if found != 1 {
		return newError(reasonTokenNotFound, fmt.Sprintf("no single token labelled %q (%d found)", t.cfg.label, found))
	}
	first, err := t.ctx.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return newError(reasonTokenUnavailable, fmt.Sprintf("C_OpenSession failed (%s)", ckrName(err)))
	}
	if err := t.ctx.Login(first, pkcs11.CKU_USER, pin); err != nil && !isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		_ = t.ctx.CloseSession(first)
		if isCode(err, pkcs11.CKR_PIN_INCORRECT) || isCode(err, pkcs11.CKR_PIN_INVALID) ||
			isCode(err, pkcs11.CKR_PIN_LEN_RANGE) || isCode(err, pkcs11.CKR_PIN_LOCKED) {
			return newError(reasonPinIncorrect, fmt.Sprintf("login to token %q failed: the PIN is not accepted (%s)", t.cfg.label, ckrName(err)))
		}
		return newError(reasonTokenUnavailable, fmt.Sprintf("login to token %q failed (%s)", t.cfg.label, ckrName(err)))
	}
	t.gen++
	t.pool = make(chan pkcs11.SessionHandle, t.cfg.sessions)
	t.slots = make(chan struct{}, t.cfg.sessions)
	for i := 1; i < t.cfg.sessions; i++ {
		t.slots <- struct{}{}
	}
	t.pool <- first
	t.current.Store(&opened{ctx: t.ctx, slot: t.slot, pool: t.pool, slots: t.slots, gen: t.gen})
	return nil
}

// closeLocked closes every session of the current generation (login state goes with them).
func (t *token) closeLocked() {
	if t.ctx != nil && t.pool != nil {
		_ = t.ctx.CloseAllSessions(t.slot)
	}
	t.pool, t.slots = nil, nil
	t.current.Store(nil)
}

// with runs f on a session: an idle one, a new one while fewer than --sessions exist, or
// the next to come back. A session whose use failed as lost marks the token down.
func (t *token) with(f func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) error) error {
	o := t.current.Load()
	if o == nil {
		return newError(reasonTokenUnavailable, "the token is not open")
	}
	ctx, pool, slots, slot, gen := o.ctx, o.pool, o.slots, o.slot, o.gen
	var s pkcs11.SessionHandle
	select {
	case s = <-pool:
	default:
		select {
		case s = <-pool:
		case <-slots:
			opened, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
			if err != nil {
				slots <- struct{}{}
				t.lost(gen, err)
				return newError(reasonTokenUnavailable, fmt.Sprintf("C_OpenSession failed (%s)", ckrName(err)))
			}
			s = opened
		}
	}
	err := f(ctx, s)
	if err != nil && sessionLost(err) {
		t.lost(gen, err)
		return newError(reasonTokenLost, fmt.Sprintf("the token session was lost (%s)", ckrName(err)))
	}
	pool <- s
	return err
}

// lost marks the token down if gen is still the current generation; the health loop opens
// it again.
func (t *token) lost(gen uint64, _ error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if gen == t.gen {
		t.closeLocked()
	}
}

// probe: the token still answers (its label, and the RNG on a session).
func (t *token) probe() *kmsError {
	o := t.current.Load()
	if o == nil {
		return newError(reasonTokenUnavailable, "the token is not open")
	}
	info, err := o.ctx.GetTokenInfo(o.slot)
	if err != nil {
		return newError(reasonTokenLost, fmt.Sprintf("C_GetTokenInfo failed (%s)", ckrName(err)))
	}
	if strings.TrimRight(info.Label, " \x00") != t.cfg.label {
		return newError(reasonTokenLost, "a different token is in the slot")
	}
	err = t.with(func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		_, err := ctx.GenerateRandom(s, 8)
		return err
	})
	if err != nil {
		var ke *kmsError
		if errors.As(err, &ke) {
			return ke
		}
		return newError(reasonTokenLost, fmt.Sprintf("C_GenerateRandom failed (%s)", ckrName(err)))
	}
	return nil
}

func isCode(err error, code uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == code
}

// sessionLost: errors after which the session (or the whole login) cannot be used again.
func sessionLost(err error) bool {
	for _, code := range []uint{
		pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_DEVICE_ERROR,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
	} {
		if isCode(err, code) {
			return true
		}
	}
	return false
}

// ckrName is the PKCS#11 return value's name only: never data.
func ckrName(err error) string {
	var e pkcs11.Error
	if errors.As(err, &e) {
		text := e.Error() // "pkcs11: 0x..: CKR_NAME"
		return text[strings.LastIndex(text, ": ")+2:]
	}
	var ke *kmsError
	if errors.As(err, &ke) {
		return ke.reason
	}
	return "error"
}
