package xfrm

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netns"
)

func gcmKey(spi uint8) Key {
	return Key{SPI: spi, AEAD: AESGCM, Key: bytes.Repeat([]byte{spi}, 20), ICVBits: 128}
}

func TestValidate(t *testing.T) {
	good := []Key{
		gcmKey(1),
		{SPI: 15, AEAD: AESGCM, Key: make([]byte, 28), ICVBits: 96},
		{SPI: 2, AEAD: AESGCM, Key: make([]byte, 36), ICVBits: 64},
		{SPI: 3, AEAD: ChaCha20Poly1305, Key: make([]byte, 36), ICVBits: 128},
	}
	for _, k := range good {
		if err := k.Validate(); err != nil {
			t.Errorf("%v: %v", k, err)
		}
	}
	secret := bytes.Repeat([]byte{0xAB}, 20)
	bad := []struct {
		key  Key
		want []string // in the message
	}{
		{Key{SPI: 0, AEAD: AESGCM, Key: secret, ICVBits: 128}, []string{"SPI 0 is not in 1..15"}},
		{Key{SPI: 16, AEAD: AESGCM, Key: secret, ICVBits: 128}, []string{"SPI 16"}},
		{Key{SPI: 1, AEAD: "cbc(aes)", Key: secret, ICVBits: 128}, []string{`AEAD "cbc(aes)"`}},
		{Key{SPI: 1, AEAD: AESGCM, Key: secret[:16], ICVBits: 128}, []string{"20, 28 or 36 bytes", "not 16"}},
		{Key{SPI: 1, AEAD: AESGCM, Key: secret, ICVBits: 256}, []string{"64, 96 or 128 bits, not 256"}},
		{Key{SPI: 1, AEAD: ChaCha20Poly1305, Key: make([]byte, 32), ICVBits: 96}, []string{"36 bytes", "not 32", "128 bits, not 96"}},
		{Key{}, []string{"SPI 0", `AEAD ""`}},
	}
	for _, c := range bad {
		err := c.key.Validate()
		if !errors.Is(err, ErrInvalidKey) {
			t.Errorf("%v: got %v, want ErrInvalidKey", c.key, err)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%v: %q lacks %q", c.key, err, w)
			}
		}
		if strings.Contains(strings.ToLower(err.Error()), "abab") {
			t.Errorf("the message shows the key: %v", err)
		}
	}
	if s := (Key{SPI: 1, AEAD: AESGCM, Key: secret, ICVBits: 128}).String(); strings.Contains(strings.ToLower(s), "abab") || strings.Contains(s, string(secret)) {
		t.Errorf("String shows the key: %s", s)
	}
}

func TestDeriveKey(t *testing.T) {
	a, b, c := netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("198.18.0.3")
	k := gcmKey(3)
	ab := DeriveKey(k, a, b)
	if len(ab) != len(k.Key) {
		t.Fatalf("length %d, want %d", len(ab), len(k.Key))
	}
	if !bytes.Equal(ab, DeriveKey(k, a, b)) {
		t.Error("not deterministic")
	}
	if !bytes.Equal(ab, DeriveKey(k, netip.AddrFrom16(a.As16()), b)) {
		t.Error("an IPv4-mapped address derives another key than the IPv4 one")
	}
	k4 := k
	k4.SPI = 4
	other := k
	other.Key = bytes.Repeat([]byte{9}, 20)
	differ := map[string][]byte{
		"reverse direction": DeriveKey(k, b, a),
		"another SPI":       DeriveKey(k4, a, b),
		"another source":    DeriveKey(k, c, b),
		"another dest":      DeriveKey(k, a, c),
		"another key":       DeriveKey(other, a, b),
		"the key itself":    k.Key,
	}
	for what, key := range differ {
		if bytes.Equal(ab, key) {
			t.Errorf("%s gives the same key", what)
		}
	}
	for _, n := range []int{28, 36} {
		long := Key{SPI: 1, AEAD: AESGCM, Key: make([]byte, n), ICVBits: 128}
		if got := len(DeriveKey(long, a, b)); got != n {
			t.Errorf("a %d-byte key derives %d bytes", n, got)
		}
	}
}

func TestMarks(t *testing.T) {
	if got := EncryptMark(3, 7); got != 0x00073E00 {
		t.Errorf("EncryptMark(3, 7) = %#x", got)
	}
	if got := EncryptMark(15, 0xFFFF); got != 0xFFFFFE00 {
		t.Errorf("EncryptMark(15, 0xffff) = %#x", got)
	}
	if got := DecryptMark(9); got != 0x00090D00 {
		t.Errorf("DecryptMark(9) = %#x", got)
	}
	// A decrypt mark matches the IN state of its node whatever the SPI
	// bits, and never an encrypt mask.
	if (DecryptMark(9)|4<<12)&DecryptMask != DecryptMark(9) || EncryptMark(4, 9)&DecryptMask == DecryptMark(9) {
		t.Error("masks do not separate encrypt and decrypt marks")
	}
	if EncryptMark(3, 7)&MarkMagicMask != MarkEncrypt || DecryptMark(7)&MarkMagicMask != MarkDecrypt {
		t.Error("magic bits")
	}
}

// Bad input is refused before any namespace is touched.
func TestBadInput(t *testing.T) {
	p := Peer{Node: 7, Local: netip.MustParseAddr("198.18.0.1"), Remote: netip.MustParseAddr("198.18.0.2")}
	// An open but bogus handle: should a check be missing, the call fails
	// instead of reaching the caller's namespace.
	bad := netns.NsHandle(1 << 30)
	if err := Install(bad, p, Key{SPI: 3}); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Install with a bad key: %v", err)
	}
	for _, q := range []Peer{
		{Node: 0, Local: p.Local, Remote: p.Remote},
		{Node: 7, Local: p.Local},
		{Node: 7, Local: p.Local, Remote: netip.MustParseAddr("fd00:1::2")},
		{Node: 7, Local: p.Local, Remote: p.Local},
		{Node: 7, Local: netip.MustParseAddr("0.0.0.0"), Remote: p.Remote},
		{Node: 7, Local: p.Local, Remote: netip.MustParseAddr("224.0.0.1")},
	} {
		if err := Install(bad, q, gcmKey(3)); !errors.Is(err, ErrInvalidPeer) {
			t.Errorf("Install(%v): %v", q, err)
		}
		if err := Remove(bad, q, 3); !errors.Is(err, ErrInvalidPeer) {
			t.Errorf("Remove(%v): %v", q, err)
		}
	}
	if err := Remove(bad, p, 0); !errors.Is(err, ErrInvalidKey) {
		t.Errorf("Remove SPI 0: %v", err)
	}
	for _, locals := range [][]netip.Addr{
		{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("198.18.0.3")},
		{netip.MustParseAddr("::")},
		{{}},
	} {
		if err := InstallBase(bad, locals); !errors.Is(err, ErrInvalidAddress) {
			t.Errorf("InstallBase(%v): %v", locals, err)
		}
	}
}

func TestAddrOf(t *testing.T) {
	// The netlink package reads 2001:db8:: as 32.1.13.184.
	v6 := netip.MustParseAddr("2001:db8::")
	if got := addrOf(netip.MustParseAddr("32.1.13.184").AsSlice(), 10); got != v6 {
		t.Errorf("got %v, want %v", got, v6)
	}
	v4 := netip.MustParseAddr("198.18.0.1")
	if got := addrOf(netip.AddrFrom16(v4.As16()).AsSlice(), 2); got != v4 {
		t.Errorf("got %v, want %v", got, v4)
	}
}
