package service_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/service"
)

// flockDir takes a flock on dir as another process would (its own open
// file), until the test ends.
func flockDir(t *testing.T, dir string, how int) {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(fd, how); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
}

// Readers share the datapath's lock and writers exclude them: Get, List
// and ReadCounters go on beside another process's reader, a change waits
// for it, and every wait for the lock ends with the caller's context.
func TestReadersShareWritersWait(t *testing.T) {
	n := newNode(t)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}
	upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, false, 8080)})

	flockDir(t, n.dp.PinDir(), unix.LOCK_SH) // another process reads
	done := make(chan error, 1)
	go func() {
		_, err := service.List(n.dp)
		if err == nil {
			_, err = service.Get(n.dp, fe)
		}
		if err == nil {
			_, err = service.ReadCounters(n.dp, fe)
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("readers waited for another reader")
	}

	for _, what := range []string{"Upsert", "Delete", "Reconcile"} {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		var err error
		switch what {
		case "Upsert":
			_, err = service.Upsert(ctx, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, false, 8081)})
		case "Delete":
			err = service.Delete(ctx, n.dp, fe)
		case "Reconcile":
			_, err = n.dp.Reconcile(ctx)
		}
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("%s while another process reads: %v, want context.DeadlineExceeded", what, err)
		}
	}
	if got, err := service.Get(n.dp, fe); err != nil || got.Backends[0].Port != 8080 {
		t.Errorf("after the refused changes: %+v, %v", got, err)
	}
}
