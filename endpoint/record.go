package endpoint

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
)

// An endpoint's record (ep_records in bpf/lib/endpoint.h) is its Endpoint as
// JSON, zero-padded to the map's fixed value size.

func encodeRecord(ep *Endpoint) (bpfobj.TypesEndpointRecord, error) {
	var rec bpfobj.TypesEndpointRecord
	b, err := json.Marshal(ep)
	if err != nil {
		return rec, err
	}
	if len(b) > len(rec.Data) {
		return rec, fmt.Errorf("endpoint %d: its record takes %d bytes, at most %d fit: shorten the labels: %w",
			ep.ID, len(b), len(rec.Data), datapath.ErrInvalid)
	}
	copy(rec.Data[:], b)
	return rec, nil
}

func decodeRecord(rec *bpfobj.TypesEndpointRecord) (*Endpoint, error) {
	var ep Endpoint
	if err := json.Unmarshal(bytes.TrimRight(rec.Data[:], "\x00"), &ep); err != nil {
		return nil, fmt.Errorf("decode endpoint record: %w", err)
	}
	return &ep, nil
}

// lookup returns the endpoint with the given ID, or ErrNotFound.
func lookup(st *core.State, id uint16) (*Endpoint, error) {
	var rec bpfobj.TypesEndpointRecord
	err := st.Objs.EpRecords.Lookup(uint32(id), &rec)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("endpoint %d: %w", id, datapath.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("endpoint %d: %w", id, err)
	}
	return decodeRecord(&rec)
}
