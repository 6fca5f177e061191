package main

// What the token holds for one KeyRing, read the way the Python sidecar reads it
// (operator/kustody/pkcs11/kekstore.py: scan, _state_of, _distrust, _fingerprint):
//
//   - a KEK version is a secret key whose CKA_LABEL is kustody:<ring>:v<N> and whose CKA_ID is
//     SHA-256 of that label;
//   - ENABLED: CKA_ENCRYPT and CKA_DECRYPT true and no kustody-disabled record; otherwise
//     DISABLED, or DESTROY_SCHEDULED with a kustody-destroy-scheduled record; a
//     kustody-tombstone record makes it DESTROYED (with or without the key, which an
//     interrupted destruction may have left; the sidecar finishes that, this plugin only
//     refuses it);
//   - trusted only if its public attributes are what Kustody generates (or, for a version
//     created for escrow, the escrow attributes); anything else under the label, e.g. planted
//     by another user of a shared partition, is never used (KEY_NOT_TRUSTED);
//   - the fingerprint: a kustody-fingerprint record, else CKA_CHECK_VALUE, else the first
//     3 bytes of AES-ECB(K, 0^16);
//   - the primary version: the highest ENABLED one.
//
// Only public attributes are read (never CKA_VALUE).

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"

	"github.com/miekg/pkcs11"
)

const (
	stateEnabled          = "ENABLED"
	stateDisabled         = "DISABLED"
	stateDestroyScheduled = "DESTROY_SCHEDULED"
	stateDestroyed        = "DESTROYED"

	appTombstone   = "kustody-tombstone"
	appSchedule    = "kustody-destroy-scheduled"
	appFingerprint = "kustody-fingerprint"
	appDisabled    = "kustody-disabled"
	appEscrow      = "kustody-escrow"
	appRecovered   = "kustody-recovered"

	kekBytes = 32
)

type version struct {
	number      uint32
	state       string
	fingerprint string
	handle      pkcs11.ObjectHandle
	hasKey      bool
	untrusted   string // why the object is not a key Kustody generated; "" if it is
	keyID       string // <ring>:v<N>:<fingerprint>, what Encrypt returns under this version
	sealAAD     []byte // the AAD Encrypt seals with under this version (bound to keyID)
}

// view is one scan of the token for one KeyRing; immutable once built.
type view struct {
	ring     string
	versions map[uint32]*version
}

// primary is the highest ENABLED version, trusted or not (as the sidecar decides it): an
// untrusted object there makes the write version unusable, loudly (KEY_NOT_TRUSTED in Status
// and Encrypt), rather than quietly falling back to an older version.
func (v *view) primary() (uint32, bool) {
	var best uint32
	for n, ver := range v.versions {
		if ver.state == stateEnabled && n > best {
			best = n
		}
	}
	return best, best != 0
}

// usable is the version's key handle if it is trusted and ENABLED, else why not.
func (v *view) usable(n uint32) (*version, *kmsError) {
	ver, ok := v.versions[n]
	if ok && ver.untrusted == "" && ver.state == stateEnabled {
		return ver, nil
	}
	ref := fmt.Sprintf("%s/v%d", v.ring, n)
	switch {
	case !ok:
		return nil, newError(reasonVersionNotFound, fmt.Sprintf("KEK version %s does not exist", ref))
	case ver.untrusted != "":
		return nil, newError(reasonKeyNotTrusted, fmt.Sprintf(
			"KEK version %s: the token object labelled '%s' is not a key Kustody generated (%s); "+
				"it is not used. Remove it from the token or use another version", ref, label(v.ring, n), ver.untrusted))
	case ver.state == stateDestroyed:
		return nil, newError(reasonVersionDestroyed, fmt.Sprintf("KEK version %s was destroyed", ref))
	case ver.state == stateDestroyScheduled:
		return nil, newError(reasonVersionDisabled, fmt.Sprintf("KEK version %s is disabled (its destruction is scheduled)", ref))
	default:
		return nil, newError(reasonVersionDisabled, fmt.Sprintf("KEK version %s is disabled", ref))
	}
}

// counts is the number of versions per state (for kustody_hsm_key_versions).
func (v *view) counts() map[string]int {
	out := map[string]int{stateEnabled: 0, stateDisabled: 0, stateDestroyScheduled: 0, stateDestroyed: 0}
	for _, ver := range v.versions {
		out[ver.state]++
	}
	return out
}

func (v *view) numbers() []uint32 {
	out := make([]uint32, 0, len(v.versions))
	for n := range v.versions {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

type rule struct {
	attr  uint
	name  string
	want  any    // bool, or []byte for an exact value
	shown string // the exact value as the sidecar names it ("AES", "32")
}

func ulong(n uint) []byte { return pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, n).Value }

var (
	aesType = ulong(pkcs11.CKK_AES)
	kekLen  = ulong(kekBytes)
	// What a KEK Kustody generated is (kekstore._TRUSTED).
	trustedRules = []rule{
		{pkcs11.CKA_KEY_TYPE, "CKA_KEY_TYPE", aesType, "AES"},
		{pkcs11.CKA_VALUE_LEN, "CKA_VALUE_LEN", kekLen, "32"},
		{pkcs11.CKA_LOCAL, "CKA_LOCAL", true, ""},
		{pkcs11.CKA_NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE", true, ""},
		{pkcs11.CKA_SENSITIVE, "CKA_SENSITIVE", true, ""},
		{pkcs11.CKA_EXTRACTABLE, "CKA_EXTRACTABLE", false, ""},
		{pkcs11.CKA_WRAP, "CKA_WRAP", false, ""},
		{pkcs11.CKA_UNWRAP, "CKA_UNWRAP", false, ""},
	}
	// A version created for an escrowed KeyRing (kekstore._ESCROWABLE).
	escrowableRules = []rule{
		{pkcs11.CKA_KEY_TYPE, "CKA_KEY_TYPE", aesType, "AES"},
		{pkcs11.CKA_VALUE_LEN, "CKA_VALUE_LEN", kekLen, "32"},
		{pkcs11.CKA_LOCAL, "CKA_LOCAL", true, ""},
		{pkcs11.CKA_SENSITIVE, "CKA_SENSITIVE", true, ""},
		{pkcs11.CKA_WRAP_WITH_TRUSTED, "CKA_WRAP_WITH_TRUSTED", true, ""},
		{pkcs11.CKA_WRAP, "CKA_WRAP", false, ""},
		{pkcs11.CKA_UNWRAP, "CKA_UNWRAP", false, ""},
	}
	// A version recovered from an escrow package (kekstore._RECOVERED).
	recoveredRules = []rule{
		{pkcs11.CKA_KEY_TYPE, "CKA_KEY_TYPE", aesType, "AES"},
		{pkcs11.CKA_SENSITIVE, "CKA_SENSITIVE", true, ""},
		{pkcs11.CKA_WRAP_WITH_TRUSTED, "CKA_WRAP_WITH_TRUSTED", true, ""},
		{pkcs11.CKA_WRAP, "CKA_WRAP", false, ""},
		{pkcs11.CKA_UNWRAP, "CKA_UNWRAP", false, ""},
	}
)

// reader reads attributes on one session.
type reader struct {
	ctx *pkcs11.Ctx
	s   pkcs11.SessionHandle
}

// attr is one attribute's value, or ok=false if the token will not say (invalid, sensitive).
func (r reader) attr(o pkcs11.ObjectHandle, a uint) ([]byte, bool) {
	got, err := r.ctx.GetAttributeValue(r.s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(a, nil)})
	if err != nil || len(got) != 1 || got[0].Value == nil {
		return nil, false
	}
	return got[0].Value, true
}

func (r reader) flag(o pkcs11.ObjectHandle, a uint) (bool, bool) {
	v, ok := r.attr(o, a)
	if !ok || len(v) != 1 {
		return false, false
	}
	return v[0] != 0, true
}

// find returns every object matching the template.
func (r reader) find(template []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := r.ctx.FindObjectsInit(r.s, template); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	for {
		part, _, err := r.ctx.FindObjects(r.s, 256)
		if err != nil {
			_ = r.ctx.FindObjectsFinal(r.s)
			return nil, err
		}
		if len(part) == 0 {
			break
		}
		all = append(all, part...)
	}
	return all, r.ctx.FindObjectsFinal(r.s)
}

// records: data objects of one application, by label, with their values.
func (r reader) records(app string) (map[string][][]byte, error) {
	found, err := r.find([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, app),
	})
	if err != nil {
		return nil, err
	}
	out := map[string][][]byte{}
	for _, o := range found {
		l, ok := r.attr(o, pkcs11.CKA_LABEL)
		if !ok {
			continue
		}
		value, _ := r.attr(o, pkcs11.CKA_VALUE)
		out[string(l)] = append(out[string(l)], value)
	}
	return out, nil
}

// distrust: "" for a key Kustody would have made, else which attribute says otherwise.
func (r reader) distrust(o pkcs11.ObjectHandle, escrow, recovered bool) string {
	rules := trustedRules
	if escrow && recovered {
		rules = recoveredRules
	} else if extractable, ok := r.flag(o, pkcs11.CKA_EXTRACTABLE); escrow && (extractable || !ok) {
		rules = escrowableRules
	}
	for _, rl := range rules {
		value, ok := r.attr(o, rl.attr)
		if !ok {
			return rl.name + " cannot be read"
		}
		switch want := rl.want.(type) {
		case bool:
			got := len(value) == 1 && value[0] != 0
			if len(value) != 1 || got != want {
				return fmt.Sprintf("%s is %t, must be %t", rl.name, got, want)
			}
		case []byte:
			if !bytes.Equal(value, want) {
				return rl.name + " is not " + rl.shown
			}
		}
	}
	return ""
}

// fingerprint: the key check value as the sidecar gets it under either profile:
// CKA_CHECK_VALUE, else the first 3 bytes of AES-ECB(K, 0^16), else (a key that can no
// longer encrypt, under profile fingerprint=aes-ecb) the kustody-fingerprint record kept
// for it. For an honest token all three agree; a record is never preferred over the key.
func (r reader) fingerprint(o pkcs11.ObjectHandle, records [][]byte) string {
	if cv, ok := r.attr(o, pkcs11.CKA_CHECK_VALUE); ok && len(cv) > 0 {
		return hex.EncodeToString(cv)
	}
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)}
	if err := r.ctx.EncryptInit(r.s, mech, o); err == nil {
		out, err := r.ctx.Encrypt(r.s, make([]byte, 16))
		if err == nil && len(out) >= 3 {
			return hex.EncodeToString(out[:3])
		}
	}
	for _, rec := range records {
		if len(rec) > 0 {
			return asciiReplace(rec)
		}
	}
	return ""
}

// asciiReplace decodes as the sidecar does (bytes.decode("ascii", "replace")).
func asciiReplace(raw []byte) string {
	var b strings.Builder
	for _, c := range raw {
		if c < 0x80 {
			b.WriteByte(c)
		} else {
			b.WriteRune('\uFFFD')
		}
	}
	return b.String()
}

// scan reads every version of ring from the token.
func scan(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, ring string) (*view, error) {
	r := reader{ctx, s}
	recs := map[string]map[string][][]byte{}
	for _, app := range []string{appSchedule, appFingerprint, appDisabled, appEscrow, appRecovered, appTombstone} {
		found, err := r.records(app)
		if err != nil {
			return nil, err
		}
		recs[app] = found
	}
	keys, err := r.find([]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY)})
	if err != nil {
		return nil, err
	}
	v := &view{ring: ring, versions: map[uint32]*version{}}
	for _, o := range keys {
		l, ok := r.attr(o, pkcs11.CKA_LABEL)
		if !ok {
			continue
		}
		kr, n, ok := parseLabel(string(l))
		if !ok || kr != ring {
			continue
		}
		id, _ := r.attr(o, pkcs11.CKA_ID)
		want := sha256.Sum256(l)
		if !bytes.Equal(id, want[:]) {
			continue
		}
		lbl := string(l)
		_, escrow := recs[appEscrow][lbl]
		_, recovered := recs[appRecovered][lbl]
		ver := &version{number: n, handle: o, hasKey: true}
		ver.untrusted = r.distrust(o, escrow, recovered)
		enc, _ := r.flag(o, pkcs11.CKA_ENCRYPT)
		dec, _ := r.flag(o, pkcs11.CKA_DECRYPT)
		_, disabled := recs[appDisabled][lbl]
		_, scheduled := recs[appSchedule][lbl]
		switch {
		case enc && dec && !disabled:
			ver.state = stateEnabled // a schedule record next to an enabled key is stale
		case scheduled:
			ver.state = stateDestroyScheduled
		default:
			ver.state = stateDisabled
		}
		if prev, dup := v.versions[n]; dup && prev.hasKey {
			// Two objects under one version's label and ID: the sidecar keeps one of them
			// (the last its scan finds); this plugin trusts neither rather than guess which.
			ver.untrusted = "the token holds more than one object under this label and ID"
		}
		ver.fingerprint = r.fingerprint(o, recs[appFingerprint][lbl])
		ver.keyID = keyID(ring, n, ver.fingerprint)
		if aad, err := kmsAAD(ring, n, ver.keyID); err == nil {
			ver.sealAAD = aad
		}
		v.versions[n] = ver
	}
	for lbl, values := range recs[appTombstone] {
		kr, n, ok := parseLabel(lbl)
		if !ok || kr != ring {
			continue
		}
		fp := ""
		if len(values) > 0 {
			fp = asciiReplace(values[len(values)-1]) // the sidecar keeps the last it reads
		}
		v.versions[n] = &version{number: n, state: stateDestroyed, fingerprint: fp}
	}
	return v, nil
}
