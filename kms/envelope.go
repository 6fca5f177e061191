package main

// The Kustody envelope and the KMS v2 associated data, byte for byte as the Python sidecar
// writes and reads them (operator/kustody/domain/envelope.py and aad.py): a KMS ciphertext
// sealed by either implementation opens in the other. testdata/vectors.json, written by the
// Python implementation (tools/gen_kms_vectors.py) and checked against it by
// tests/unit/test_kms_vectors.py, pins the format on both sides.
//
//	offset  size  field
//	0       4     magic "KSTY"
//	4       1     format version (1)
//	5       1     L = length of the KeyRing name (1..253)
//	6       L     KeyRing name (ASCII DNS-1123 subdomain)
//	6+L     4     KEK version (uint32, >= 1)
//	10+L    12    AES-GCM nonce
//	22+L    n     AES-256-GCM ciphertext ‖ 16-byte tag (17 <= n <= 4112)
//
// KMS associated data = header (bytes 0..10+L) ‖ "K" ‖ u32be(len(key_id)) ‖ key_id.

import (
	"encoding/binary"
	"fmt"
	"regexp"
	"unicode/utf8"
)

const (
	magic             = "KSTY"
	formatVersion     = 1
	nonceBytes        = 12
	tagBytes          = 16
	maxPlaintextBytes = 4096
	maxCiphertext     = maxPlaintextBytes + tagBytes
	maxRingBytes      = 253
	maxBinaryBytes    = 4 + 1 + 1 + maxRingBytes + 4 + nonceBytes + maxCiphertext
	maxKeyIDBytes     = 1024
	kmsTag            = 'K'
)

// validKeyRing: a DNS-1123 subdomain of 1..253 characters, as KeyVersionRef requires:
// dot-separated labels of [a-z0-9-], each starting and ending with [a-z0-9]. (By hand rather
// than with regexp: it runs on every Decrypt.)
func validKeyRing(name string) bool {
	if len(name) == 0 || len(name) > maxRingBytes {
		return false
	}
	start := true // at the first character of a label
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		switch {
		case alnum:
			start = false
		case c == '-' && !start && i+1 < len(name) && name[i+1] != '.':
		case c == '.' && !start && i+1 < len(name):
			start = true
		default:
			return false
		}
	}
	return true
}

// envelope is a sealed KMS seed. It never holds plaintext.
type envelope struct {
	ring    string
	version uint32
	nonce   []byte
	sealed  []byte // ciphertext ‖ tag
}

func header(ring string, version uint32) []byte {
	h := make([]byte, 0, 10+len(ring))
	h = append(h, magic...)
	h = append(h, formatVersion, byte(len(ring)))
	h = append(h, ring...)
	return binary.BigEndian.AppendUint32(h, version)
}

func (e envelope) bytes() []byte {
	out := header(e.ring, e.version)
	out = append(out, e.nonce...)
	return append(out, e.sealed...)
}

// parseEnvelope applies the Python parser's checks in its order, with its messages. The
// envelope's nonce and sealed bytes alias raw (a request's, which outlives the call).
func parseEnvelope(raw []byte) (envelope, *kmsError) {
	malformed := func(msg string) (envelope, *kmsError) {
		return envelope{}, newError(reasonMalformedEnvelope, msg)
	}
	if len(raw) > maxBinaryBytes {
		return malformed("envelope is too long")
	}
	if len(raw) < 6 || string(raw[:4]) != magic {
		return malformed("not a Kustody envelope (bad magic)")
	}
	if raw[4] != formatVersion {
		return malformed(fmt.Sprintf("unsupported envelope format version %d", raw[4]))
	}
	ringLen := int(raw[5])
	fixedEnd := 6 + ringLen + 4
	if ringLen == 0 || len(raw) < fixedEnd+nonceBytes+tagBytes+1 {
		return malformed("envelope is truncated")
	}
	ring := string(raw[6 : 6+ringLen])
	version := binary.BigEndian.Uint32(raw[6+ringLen : fixedEnd])
	if !validKeyRing(ring) || version == 0 {
		return malformed("envelope names an invalid KeyRing or version")
	}
	sealed := raw[fixedEnd+nonceBytes:]
	if len(sealed) > maxCiphertext {
		return malformed("envelope ciphertext is too long")
	}
	return envelope{ring: ring, version: version, nonce: raw[fixedEnd : fixedEnd+nonceBytes], sealed: sealed}, nil
}

// kmsAAD is the associated data binding a KMS seed to its envelope header and key_id.
func kmsAAD(ring string, version uint32, keyID string) ([]byte, *kmsError) {
	if keyID == "" {
		return nil, newError(reasonInvalidArgument, "a KMS binding needs a key_id")
	}
	if !utf8.ValidString(keyID) {
		return nil, newError(reasonInvalidArgument, "key_id is not valid UTF-8")
	}
	if len(keyID) > maxKeyIDBytes {
		return nil, newError(reasonInvalidArgument,
			fmt.Sprintf("key_id is %d bytes; the limit is %d", len(keyID), maxKeyIDBytes))
	}
	aad := header(ring, version)
	aad = append(aad, kmsTag)
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(keyID)))
	return append(aad, keyID...), nil
}

// keyID names the KeyRing, the version and the KEK it was created as: it changes when the
// write version changes, which tells kube-apiserver to re-encrypt.
func keyID(ring string, version uint32, fingerprint string) string {
	return fmt.Sprintf("%s:v%d:%s", ring, version, fingerprint)
}

// label and objectID name a KEK version in the token (domain/keyversion.py).
func label(ring string, version uint32) string {
	return fmt.Sprintf("kustody:%s:v%d", ring, version)
}

var labelPattern = regexp.MustCompile(`^kustody:([a-z0-9.-]{1,253}):v([1-9][0-9]{0,9})$`)

// parseLabel is the (ring, version) a token object's label names, or ok=false.
func parseLabel(l string) (string, uint32, bool) {
	m := labelPattern.FindStringSubmatch(l)
	if m == nil || !validKeyRing(m[1]) {
		return "", 0, false
	}
	var v uint64
	for _, c := range m[2] {
		v = v*10 + uint64(c-'0')
	}
	if v == 0 || v > 0xFFFFFFFF {
		return "", 0, false
	}
	return m[1], uint32(v), true
}
