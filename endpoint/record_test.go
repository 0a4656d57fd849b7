package endpoint

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/ledger"
)

// The ledger keeps an endpoint as its own versioned record, not as the
// public struct: a record of another version is refused, not misread, and
// the record's field names are its own.
func TestRecordVersioned(t *testing.T) {
	ep, err := normalize(Spec{ID: 3, IPv4: netip.MustParseAddr("198.18.1.3"), Identity: 1000, NetNS: "x"},
		"node", []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}, 0)
	if err != nil {
		t.Fatal(err)
	}
	rec := &ledger.Record{Kind: ledger.KindEndpoint, ID: 3}
	if err := setObject(rec, ep); err != nil {
		t.Fatal(err)
	}
	back, err := decode(rec)
	if err != nil || !sameSpec(back.Spec, ep.Spec) {
		t.Fatalf("round trip: %+v, %v", back, err)
	}
	if !strings.Contains(string(rec.Object), `"host_ifname"`) {
		t.Errorf("the record uses the API's field names: %s", rec.Object)
	}
	var r map[string]any
	json.Unmarshal(rec.Object, &r)
	r["version"] = recordVersion + 1
	rec.Object, _ = json.Marshal(r)
	if _, err := decode(rec); !errors.Is(err, datapath.ErrIncompatible) {
		t.Errorf("a record of another version: %v, want ErrIncompatible", err)
	}
}
