package xfrm

import (
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// The AEAD algorithms a Key may name, as the kernel's crypto API spells them.
const (
	AESGCM           = "rfc4106(gcm(aes))"
	ChaCha20Poly1305 = "rfc7539esp(chacha20,poly1305)"
)

// saltLen is the 4 bytes at the end of every AEAD key: the nonce's fixed
// part (RFC 4106, RFC 7634).
const saltLen = 4

// Key is one key of the cluster's IPsec key set. Every node holds the same
// set; the key of each SA is derived from it (see DeriveKey).
type Key struct {
	SPI     uint8  // 1..15: which key; in the mark and on the wire
	AEAD    string // AESGCM or ChaCha20Poly1305
	Key     []byte // AESGCM: 20, 28 or 36 bytes (AES-128/192/256 and the salt); ChaCha20Poly1305: 36 (32 and the salt)
	ICVBits int    // AESGCM: 64, 96 or 128; ChaCha20Poly1305: 128
}

// String describes k without its secret, so that logging a Key leaks nothing.
func (k Key) String() string {
	return fmt.Sprintf("SPI %d %s, %d-byte key, %d-bit ICV", k.SPI, k.AEAD, len(k.Key), k.ICVBits)
}

// Validate reports every field of k the kernel would refuse, or that
// sluice cannot put in a mark, in one error wrapping ErrInvalidKey. The
// key itself never appears in the message.
func (k Key) Validate() error {
	var bad []string
	if k.SPI < 1 || k.SPI > 15 {
		bad = append(bad, fmt.Sprintf("SPI %d is not in 1..15 (the mark has 4 bits for it)", k.SPI))
	}
	var keyLens, icvBits []int
	switch k.AEAD {
	case AESGCM:
		keyLens, icvBits = []int{16 + saltLen, 24 + saltLen, 32 + saltLen}, []int{64, 96, 128}
	case ChaCha20Poly1305:
		keyLens, icvBits = []int{32 + saltLen}, []int{128}
	default:
		bad = append(bad, fmt.Sprintf("AEAD %q is neither %q nor %q", k.AEAD, AESGCM, ChaCha20Poly1305))
	}
	if keyLens != nil && !slices.Contains(keyLens, len(k.Key)) {
		bad = append(bad, fmt.Sprintf("%s needs a key of %s bytes (with the %d-byte salt), not %d", k.AEAD, spell(keyLens), saltLen, len(k.Key)))
	}
	if icvBits != nil && !slices.Contains(icvBits, k.ICVBits) {
		bad = append(bad, fmt.Sprintf("%s takes an ICV of %s bits, not %d", k.AEAD, spell(icvBits), k.ICVBits))
	}
	if bad == nil {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrInvalidKey, strings.Join(bad, "; "))
}

// DeriveKey returns the key of the one-way SA src→dst for key k: HKDF-SHA256
// over k.Key, with "sluice-ipsec-v1" ‖ SPI ‖ src ‖ dst (16 bytes each, as
// As16 gives them) as info, and len(k.Key) bytes long, salt included.
//
// Each SA gets a key of its own, so no two SAs ever share an AES-GCM key
// and nonce space, and both ends derive the same one without an exchange.
// k must be valid (see Validate); DeriveKey panics when HKDF refuses it.
func DeriveKey(k Key, src, dst netip.Addr) []byte {
	s, d := src.As16(), dst.As16()
	var info strings.Builder
	info.WriteString("sluice-ipsec-v1")
	info.WriteByte(k.SPI)
	info.Write(s[:])
	info.Write(d[:])
	out, err := hkdf.Key(sha256.New, k.Key, nil, info.String(), len(k.Key))
	if err != nil {
		panic(fmt.Sprintf("xfrm: derive an SA key from %v: %v", k, err))
	}
	return out
}

// spell spells s as "20, 28 or 36".
func spell(s []int) string {
	words := make([]string, len(s))
	for i, v := range s {
		words[i] = fmt.Sprint(v)
	}
	if len(words) == 1 {
		return words[0]
	}
	return strings.Join(words[:len(words)-1], ", ") + " or " + words[len(words)-1]
}
