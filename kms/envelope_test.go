package main

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"strings"
	"testing"
)

// The vectors are written by the Python implementation (tools/gen_kms_vectors.py).
type vectors struct {
	Seal []struct {
		Ring        string `json:"ring"`
		Version     uint32 `json:"version"`
		Fingerprint string `json:"fingerprint"`
		KeyID       string `json:"key_id"`
		Label       string `json:"label"`
		ObjectID    string `json:"object_id"`
		Key         string `json:"key"`
		Nonce       string `json:"nonce"`
		Plaintext   string `json:"plaintext"`
		AAD         string `json:"aad"`
		Envelope    string `json:"envelope"`
	} `json:"seal"`
	Malformed []struct {
		Name  string `json:"name"`
		Raw   string `json:"raw"`
		Error string `json:"error"`
	} `json:"malformed"`
	Labels []struct {
		Label   string  `json:"label"`
		Ring    *string `json:"ring"`
		Version *uint32 `json:"version"`
	} `json:"labels"`
	KeyRings []struct {
		Name  string `json:"name"`
		Valid bool   `json:"valid"`
	} `json:"key_rings"`
	KeyIDErrors []struct {
		KeyID string `json:"key_id"`
		Error string `json:"error"`
	} `json:"key_id_errors"`
}

func load(t *testing.T) vectors {
	t.Helper()
	raw, err := os.ReadFile("../tests/vectors/kms_envelope_v1.json")
	if err != nil {
		t.Fatal(err)
	}
	var v vectors
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	if len(v.Seal) == 0 || len(v.Malformed) == 0 || len(v.Labels) == 0 || len(v.KeyIDErrors) == 0 {
		t.Fatal("the vectors file is missing a section")
	}
	return v
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSealVectors(t *testing.T) {
	for _, v := range load(t).Seal {
		id := keyID(v.Ring, v.Version, v.Fingerprint)
		if id != v.KeyID {
			t.Errorf("key_id %q, Python wrote %q", id, v.KeyID)
		}
		if l := label(v.Ring, v.Version); l != v.Label {
			t.Errorf("label %q, Python wrote %q", l, v.Label)
		}
		if sum := sha256.Sum256([]byte(v.Label)); hex.EncodeToString(sum[:]) != v.ObjectID {
			t.Errorf("object id of %s differs", v.Label)
		}
		aad, err := kmsAAD(v.Ring, v.Version, v.KeyID)
		if err != nil || hex.EncodeToString(aad) != v.AAD {
			t.Errorf("AAD for %s differs (%v)", v.KeyID, err)
		}
		raw := unhex(t, v.Envelope)
		env, perr := parseEnvelope(raw)
		if perr != nil {
			t.Fatalf("parsing Python's envelope: %v", perr)
		}
		if env.ring != v.Ring || env.version != v.Version || hex.EncodeToString(env.nonce) != v.Nonce {
			t.Errorf("parsed %s/v%d, Python wrote %s/v%d", env.ring, env.version, v.Ring, v.Version)
		}
		if hex.EncodeToString(env.bytes()) != v.Envelope {
			t.Errorf("re-encoding %s/v%d changes the bytes", v.Ring, v.Version)
		}
		block, _ := aes.NewCipher(unhex(t, v.Key))
		gcm, _ := cipher.NewGCM(block)
		plain, oerr := gcm.Open(nil, env.nonce, env.sealed, aad)
		if oerr != nil || hex.EncodeToString(plain) != v.Plaintext {
			t.Errorf("the envelope does not open with the AAD built here (%v)", oerr)
		}
		other, _ := kmsAAD(v.Ring, v.Version, v.KeyID+"x")
		if _, err := gcm.Open(nil, env.nonce, env.sealed, other); err == nil {
			t.Errorf("the envelope opens under another key_id")
		}
	}
}

func TestMalformedVectors(t *testing.T) {
	for _, v := range load(t).Malformed {
		_, err := parseEnvelope(unhex(t, v.Raw))
		if err == nil {
			t.Errorf("%s: parsed", v.Name)
			continue
		}
		if err.reason != reasonMalformedEnvelope || err.message != v.Error {
			t.Errorf("%s: %s, Python says %q", v.Name, err, v.Error)
		}
	}
}

func TestLabelVectors(t *testing.T) {
	for _, v := range load(t).Labels {
		ring, version, ok := parseLabel(v.Label)
		if ok != (v.Ring != nil) {
			t.Errorf("%q: ok=%t, Python parses it: %t", v.Label, ok, v.Ring != nil)
			continue
		}
		if ok && (ring != *v.Ring || version != *v.Version) {
			t.Errorf("%q: %s/v%d, Python %s/v%d", v.Label, ring, version, *v.Ring, *v.Version)
		}
	}
}

func TestKeyRingVectors(t *testing.T) {
	rings := load(t).KeyRings
	if len(rings) < 10 {
		t.Fatal("too few KeyRing name vectors")
	}
	for _, v := range rings {
		if got := validKeyRing(v.Name); got != v.Valid {
			t.Errorf("KeyRing name %q: valid=%t, Python says %t", v.Name, got, v.Valid)
		}
	}
}

func TestKeyIDErrorVectors(t *testing.T) {
	for _, v := range load(t).KeyIDErrors {
		_, err := kmsAAD("secrets", 1, v.KeyID)
		if err == nil || err.message != v.Error {
			t.Errorf("key_id of %d bytes: %v, Python says %q", len(v.KeyID), err, v.Error)
		}
	}
}

func TestFlags(t *testing.T) {
	base := []string{"--kms-socket", "/tmp/x.sock", "--kms-keyring", "secrets", "--pin-file", "/tmp/pin"}
	if _, err := parse(base, io.Discard, io.Discard); err != nil {
		t.Fatalf("valid flags refused: %v", err)
	}
	bad := map[string][]string{
		"--kms-keyring":     {"--kms-keyring", "Not_A_Ring"},
		"--sessions":        {"--sessions", "0"},
		"--health-interval": {"--health-interval", "10ms"},
		"--gcm-iv":          {"--gcm-iv", "token"},
		"--kms-version":     {"--kms-version", "4294967296"},
	}
	for name, extra := range bad {
		_, err := parse(append(append([]string{}, base...), extra...), io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%v: %v (want an error naming %s)", extra, err, name)
		}
	}
}

func TestHelpGoesToStdoutAndExitsZero(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--help"}, &stdout, &stderr); code != 0 {
		t.Fatalf("--help exited %d", code)
	}
	for _, want := range []string{"usage: kustody-kms", "-kms-keyring", "-pin-file", "-sessions"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("--help does not mention %s", want)
		}
	}
	if stderr.Len() != 0 {
		t.Errorf("--help wrote to stderr: %q", stderr.String())
	}
	stdout.Reset()
	if code := run([]string{"--kms-socket", "/tmp/x"}, &stdout, &stderr); code != 2 {
		t.Fatalf("a missing --kms-keyring exited %d, want 2", code)
	}
	if !strings.Contains(stderr.String(), "--kms-keyring is required") {
		t.Errorf("stderr: %q", stderr.String())
	}
}
