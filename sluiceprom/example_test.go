package sluiceprom_test

import (
	"context"
	"log"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/sluiceprom"
)

// A program serves the counters of the datapath "node", which another
// program owns, on :9962/metrics.
func Example() {
	dp, err := datapath.OpenReadOnly(context.Background(), datapath.Config{Name: "node", MustExist: true})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(sluiceprom.New(dp, sluiceprom.Options{}))
	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	log.Fatal(http.ListenAndServe(":9962", nil))
}
