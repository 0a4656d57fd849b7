package bpfobj

import (
	"crypto/sha256"
	"encoding/hex"
	"sync"
)

// Build identifies the programs of this build: a hash of the objects they
// load from. A datapath records the build whose programs it attached, so
// that a re-open by another build knows to swap them (an upgrade in place).
var Build = sync.OnceValue(func() string {
	h := sha256.New()
	h.Write(_EndpointBytes)
	h.Write(_SockBytes)
	return hex.EncodeToString(h.Sum(nil)[:16])
})
