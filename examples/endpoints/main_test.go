package main

import (
	"testing"

	"github.com/sluicedp/sluice/internal/testutil"
)

// The demo README.md points to runs to the end.
func TestDemo(t *testing.T) {
	testutil.Privileged(t)
	if err := run(); err != nil {
		t.Fatal(err)
	}
}
