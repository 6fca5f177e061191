package main

// Prometheus metrics under the Python sidecar's names (docs/hsm.md "Metrics"), so one
// dashboard reads both plugins: kustody_hsm_requests_total{op,outcome},
// kustody_hsm_request_duration_seconds{op}, kustody_hsm_key_versions{keyring,state},
// kustody_hsm_token_up. Labels carry op names, reasons, the KeyRing and states only.

import (
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

type metrics struct {
	// The series every successful call touches, resolved once (the hot path).
	okCount    map[string]prometheus.Counter
	okDuration map[string]prometheus.Observer

	registry *prometheus.Registry
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	keys     *prometheus.GaugeVec
	up       prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kustody_hsm_requests_total",
			Help: "KMS v2 calls by op and outcome (ok, cancelled, or a reason).",
		}, []string{"op", "outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kustody_hsm_request_duration_seconds",
			Help:    "KMS v2 call latency.",
			Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5},
		}, []string{"op"}),
		keys: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kustody_hsm_key_versions",
			Help: "KEK versions of the KMS KeyRing by state, as last read from the token.",
		}, []string{"keyring", "state"}),
		up: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kustody_hsm_token_up",
			Help: "1 while the token answers, else 0.",
		}),
	}
	m.registry.MustRegister(m.requests, m.duration, m.keys, m.up)
	m.okCount = map[string]prometheus.Counter{}
	m.okDuration = map[string]prometheus.Observer{}
	for _, op := range []string{"kms.Status", "kms.Encrypt", "kms.Decrypt"} {
		m.okCount[op] = m.requests.WithLabelValues(op, "ok")
		m.okDuration[op] = m.duration.WithLabelValues(op)
	}
	return m
}

func (m *metrics) ok(op string, start time.Time) {
	m.okCount[op].Inc()
	m.okDuration[op].Observe(time.Since(start).Seconds())
}

func (m *metrics) observe(op, outcome string, start time.Time) {
	m.requests.WithLabelValues(op, outcome).Inc()
	m.duration.WithLabelValues(op).Observe(time.Since(start).Seconds())
}

func (m *metrics) versions(v *view) {
	for state, n := range v.counts() {
		m.keys.WithLabelValues(v.ring, state).Set(float64(n))
	}
}

func (m *metrics) tokenUp(up bool) {
	if up {
		m.up.Set(1)
	} else {
		m.up.Set(0)
	}
}

// serve answers /metrics on address until the listener fails; it returns the bound address.
func (m *metrics) serve(address string) (string, error) {
	ln, err := net.Listen("tcp", address)
	if err != nil {
		return "", err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}))
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = server.Serve(ln) }()
	return ln.Addr().String(), nil
}
