package main

// The token: one PKCS#11 module, one token found by its label, logged in once as the user,
// and a pool of sessions (one per concurrent call, up to --sessions). The module is
// initialised with CKF_OS_LOCKING_OK, so calls on different sessions run in parallel.
//
// This process only reads the token and uses its keys: it never creates, changes or deletes
// an object (the Python sidecar, `kustody hsm`, owns the KEK lifecycle).
//
// Each open of the token is a generation. A call takes a session of the current generation
// and gives it back to the same one. When a call finds its session lost (token removed,
// module reset, logged out), the generation is closed at once: calls waiting for a session
// fail with TOKEN_UNAVAILABLE instead of waiting, and the plugin's health says TOKEN_LOST.
// The health loop then opens a new generation, but only after every call still holding a
// session of the old one has returned it (or 30 s have passed): a session handle number is
// reused by the module after C_CloseAllSessions, so closing while a call still holds one
// could hand that number to two calls at once.

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

type tokenConfig struct {
	module   string
	label    string
	sessions int
}

type token struct {
	cfg    tokenConfig
	onLost func(*kmsError) // called once per lost generation, with why

	mu      sync.Mutex // serialises open and close
	ctx     *pkcs11.Ctx
	lostAny bool // a generation was lost since the module was (re)initialised
	current atomic.Pointer[generation]
	last    *generation // the newest generation, open or closed (guarded by mu)
}

// generation is one open of the token, as calls see it.
type generation struct {
	ctx    *pkcs11.Ctx
	slot   uint
	pool   chan pkcs11.SessionHandle // idle sessions
	slots  chan struct{}             // how many more sessions may be opened
	done   chan struct{}             // closed when the generation is closed
	closed atomic.Bool
	calls  atomic.Int64 // calls that may hold one of its sessions
}

func newToken(cfg tokenConfig, onLost func(*kmsError)) *token {
	return &token{cfg: cfg, onLost: onLost}
}

// open (re)loads the module if needed, finds the token, logs in and starts a generation with
// one session. It returns a typed error naming what is wrong.
func (t *token) open(pin string) *kmsError {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.retireLocked()
	if t.ctx != nil && t.lostAny {
		// As the sidecar does after a loss: a module reset or a re-created token is only
		// seen after C_Finalize + C_Initialize. No call holds a session now (retireLocked).
		_ = t.ctx.Finalize()
		if err := t.ctx.Initialize(); err != nil && !isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			return newError(reasonModuleUnavailable, fmt.Sprintf("C_Initialize of %s failed (%s)", t.cfg.module, ckrName(err)))
		}
		t.lostAny = false
	}
	if t.ctx == nil {
		ctx := pkcs11.New(t.cfg.module)
		if ctx == nil {
			return newError(reasonModuleUnavailable, fmt.Sprintf("PKCS#11 module %s could not be loaded", t.cfg.module))
		}
		if err := ctx.Initialize(); err != nil && !isCode(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			ctx.Destroy()
			return newError(reasonModuleUnavailable, fmt.Sprintf("C_Initialize of %s failed (%s)", t.cfg.module, ckrName(err)))
		}
		t.ctx = ctx
	}
	slot, kerr := t.findSlot()
	if kerr != nil {
		t.lostAny = true // a token that re-appears needs a fresh C_Initialize to be seen
		return kerr
	}
	first, err := t.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		t.lostAny = true
		return newError(reasonTokenUnavailable, fmt.Sprintf("C_OpenSession failed (%s)", ckrName(err)))
	}
	if err := t.ctx.Login(first, pkcs11.CKU_USER, pin); err != nil && !isCode(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		_ = t.ctx.CloseSession(first)
		if isCode(err, pkcs11.CKR_PIN_INCORRECT) || isCode(err, pkcs11.CKR_PIN_INVALID) ||
			isCode(err, pkcs11.CKR_PIN_LEN_RANGE) || isCode(err, pkcs11.CKR_PIN_LOCKED) {
			return newError(reasonPinIncorrect, fmt.Sprintf("login to token %s failed: the PIN is not accepted (%s)", t.cfg.label, ckrName(err)))
		}
		return newError(reasonTokenUnavailable, fmt.Sprintf("login to token %s failed (%s)", t.cfg.label, ckrName(err)))
	}
	g := &generation{
		ctx:   t.ctx,
		slot:  slot,
		pool:  make(chan pkcs11.SessionHandle, t.cfg.sessions),
		slots: make(chan struct{}, t.cfg.sessions),
		done:  make(chan struct{}),
	}
	for i := 1; i < t.cfg.sessions; i++ {
		g.slots <- struct{}{}
	}
	g.pool <- first
	t.last = g
	t.current.Store(g)
	return nil
}

func (t *token) findSlot() (uint, *kmsError) {
	slots, err := t.ctx.GetSlotList(true)
	if err != nil {
		return 0, newError(reasonTokenNotFound, fmt.Sprintf("C_GetSlotList failed (%s)", ckrName(err)))
	}
	var found []uint
	for _, slot := range slots {
		info, err := t.ctx.GetTokenInfo(slot)
		if err == nil && strings.TrimRight(info.Label, " \x00") == t.cfg.label {
			found = append(found, slot)
		}
	}
	if len(found) != 1 {
		return 0, newError(reasonTokenNotFound, fmt.Sprintf("no single token labelled %s (%d found)", t.cfg.label, len(found)))
	}
	return found[0], nil
}

// retireLocked closes the newest generation (if not yet), waits until no call holds one of
// its sessions (at most 30 s), then closes all its sessions (and with them the login).
func (t *token) retireLocked() {
	g := t.last
	if g == nil {
		return
	}
	t.last = nil
	t.closeGeneration(g)
	// A call counts itself before it checks closed, so once closed is set, a zero count
	// stays zero for this generation's sessions.
	for deadline := time.Now().Add(30 * time.Second); g.calls.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	_ = g.ctx.CloseAllSessions(g.slot)
}

// closeGeneration stops g from handing out sessions; callers waiting for one fail.
func (t *token) closeGeneration(g *generation) bool {
	if !g.closed.CompareAndSwap(false, true) {
		return false
	}
	t.current.CompareAndSwap(g, nil)
	close(g.done)
	return true
}

// lost closes g because a call found its session lost; the health loop opens a new one.
func (t *token) lost(g *generation, err error) {
	if t.closeGeneration(g) {
		t.mu.Lock()
		t.lostAny = true
		t.mu.Unlock()
		if t.onLost != nil {
			t.onLost(newError(reasonTokenLost, fmt.Sprintf("the token stopped answering (%s); reconnecting", ckrName(err))))
		}
	}
}

var errClosed = newError(reasonTokenUnavailable, "the token is not open; reconnecting")

// with runs f on a session of the current generation: an idle one, a new one while fewer
// than --sessions exist, or the next to come back.
func (t *token) with(f func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) error) error {
	g := t.current.Load()
	if g == nil {
		return errClosed
	}
	g.calls.Add(1)
	defer g.calls.Add(-1)
	if g.closed.Load() {
		return errClosed
	}
	s, err := g.take()
	if err != nil {
		if sessionLost(err) {
			t.lost(g, err)
		}
		return asSessionError(err)
	}
	err = f(g.ctx, s)
	if err != nil && sessionLost(err) {
		t.lost(g, err)
		return newError(reasonTokenUnavailable, fmt.Sprintf("the token stopped answering (%s); reconnecting", ckrName(err)))
	}
	g.pool <- s // never blocks: at most --sessions sessions exist in a generation
	return err
}

// take returns an idle session, opens one while the generation may, or waits for one.
func (g *generation) take() (pkcs11.SessionHandle, error) {
	select {
	case s := <-g.pool:
		return s, nil
	default:
	}
	for {
		select {
		case s := <-g.pool:
			return s, nil
		case <-g.done:
			return 0, errClosed
		case <-g.slots:
			s, err := g.ctx.OpenSession(g.slot, pkcs11.CKF_SERIAL_SESSION)
			if err == nil {
				return s, nil
			}
			if sessionLost(err) {
				return 0, err
			}
			// E.g. CKR_SESSION_COUNT: the module allows fewer sessions than --sessions.
			// The slot is not given back; wait for a session in use instead.
		}
	}
}

func asSessionError(err error) error {
	var ke *kmsError
	if errors.As(err, &ke) {
		return ke
	}
	return newError(reasonTokenUnavailable, fmt.Sprintf("C_OpenSession failed (%s)", ckrName(err)))
}

// probe: the token still answers (its label, and the RNG on a session).
func (t *token) probe() *kmsError {
	g := t.current.Load()
	if g == nil {
		return errClosed
	}
	info, err := g.ctx.GetTokenInfo(g.slot)
	if err != nil || strings.TrimRight(info.Label, " \x00") != t.cfg.label {
		if err == nil {
			err = pkcs11.Error(pkcs11.CKR_TOKEN_NOT_RECOGNIZED)
		}
		t.lost(g, err)
		return newError(reasonTokenLost, fmt.Sprintf("the token stopped answering (%s); reconnecting", ckrName(err)))
	}
	err = t.with(func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		_, err := ctx.GenerateRandom(s, 8)
		return err
	})
	if err != nil {
		var ke *kmsError
		if errors.As(err, &ke) {
			return newError(reasonTokenLost, ke.message)
		}
		t.lost(g, err)
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
		pkcs11.CKR_SLOT_ID_INVALID,
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
