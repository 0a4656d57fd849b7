// Command unload unloads a datapath, importing nothing of sluice but the
// datapath package: a test runs it to show that Unload cleans up what the
// object packages made without their code being in the binary.
//
//	unload -bpffs DIR -name NAME -netns PATH
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/sluicedp/sluice/datapath"
)

func main() {
	bpffs := flag.String("bpffs", "", "BPF filesystem of the datapath")
	name := flag.String("name", "", "datapath name")
	netns := flag.String("netns", "", "network namespace of the datapath")
	flag.Parse()
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: *name, BPFFS: *bpffs, NetNS: *netns, MustExist: true})
	if err == nil {
		err = dp.Unload()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
