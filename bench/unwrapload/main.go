// unwrapload drives kustody.workload.v1.Unwrap/Unwrap at a fixed concurrency and prints one
// JSON object: ops/s, p50/p99 latency and the CPU this process used, so the benchmark can tell
// how much of the machine the client took.
//
// The request is sent as pre-serialised protobuf bytes (written by bench/unwrap.py) through a
// pass-through codec, so no generated code is needed; each answer's plaintext (field 1) is
// checked against the expected bytes with protowire.
//
// With -flood FILE (one token per line) it also sends, from its own connection and starting
// when measuring starts, one unwrap per token at -flood-rate per second — forged tokens, to
// measure the legitimate callers' latency while the front door is being abused — and reports
// the reasons the flood got back.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const method = "/kustody.workload.v1.Unwrap/Unwrap"

// rawCodec sends and receives already-encoded protobuf messages.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

// plaintextOf returns field 1 (bytes plaintext) of an UnwrapResponse.
func plaintextOf(msg []byte) ([]byte, error) {
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		msg = msg[n:]
		if num == 1 && typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(msg)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			return v, nil
		}
		m := protowire.ConsumeFieldValue(num, typ, msg)
		if m < 0 {
			return nil, protowire.ParseError(m)
		}
		msg = msg[m:]
	}
	return nil, errors.New("no plaintext in the response")
}

type result struct {
	OpsS   float64 `json:"ops_s"`
	P50Ms  float64 `json:"p50_ms"`
	P99Ms  float64 `json:"p99_ms"`
	P90Ms  float64 `json:"p90_ms"`
	P999Ms float64 `json:"p999_ms"`
	MaxMs  float64 `json:"max_ms"`
	// Calls per whole millisecond of latency (index = ms), for the shape of the distribution.
	Histogram   []int   `json:"histogram_ms"`
	Calls       int     `json:"calls"`
	Failures    int     `json:"failures"`
	FirstError  string  `json:"first_error,omitempty"`
	Seconds     float64 `json:"seconds"`
	ClientCPU   float64 `json:"client_cpu_seconds"`
	Concurrency int     `json:"concurrency"`
	Conns       int     `json:"connections"`
	// CPU seconds of the watched processes (the sidecar's) over the measured window, by pid.
	Watched map[string]float64 `json:"watched_cpu_seconds"`
	Flood   *floodResult       `json:"flood,omitempty"`
}

type floodResult struct {
	Sent    int            `json:"sent"`
	Seconds float64        `json:"seconds"` // from the first send to the last send
	RateS   float64        `json:"rate_s"`  // achieved sends/s
	Reasons map[string]int `json:"reasons"` // kustody-reason (or the gRPC code) -> calls
	P50Ms   float64        `json:"p50_ms"`  // how long a forged call took to be refused
	P99Ms   float64        `json:"p99_ms"`
	MaxMs   float64        `json:"max_ms"`
}

// procCPU is the user+system CPU time of a process from /proc/<pid>/stat (clock ticks of
// 1/100 s, the Linux USER_HZ).
func procCPU(pid string) float64 {
	data, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0
	}
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return 0
	}
	fields := strings.Fields(string(data[end+1:]))
	if len(fields) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100
}

func watchedCPU(pids []string) map[string]float64 {
	out := make(map[string]float64, len(pids))
	for _, pid := range pids {
		out[pid] = procCPU(pid)
	}
	return out
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func main() {
	addr := flag.String("addr", "", "host:port of the workload service")
	caFile := flag.String("ca", "", "CA certificate (PEM)")
	serverName := flag.String("server-name", "localhost", "TLS server name")
	tokenFile := flag.String("token", "", "file holding the ServiceAccount token")
	requestFile := flag.String("request", "", "file holding a serialised UnwrapRequest")
	expectFile := flag.String("expect", "", "file holding the expected plaintext")
	concurrency := flag.Int("c", 16, "callers")
	conns := flag.Int("conns", 4, "TLS connections (callers are spread over them)")
	duration := flag.Duration("duration", 3*time.Second, "how long to measure")
	warmup := flag.Duration("warmup", 500*time.Millisecond, "load before measuring")
	watch := flag.String("watch-pids", "", "comma-separated pids whose CPU time to report")
	floodFile := flag.String("flood", "", "file of tokens (one a line) to send at -flood-rate")
	floodRate := flag.Float64("flood-rate", 1000, "flood calls per second")
	flag.Parse()

	fail := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "unwrapload: "+format+"\n", args...)
		os.Exit(2)
	}
	read := func(path string) []byte {
		data, err := os.ReadFile(path)
		if err != nil {
			fail("%v", err)
		}
		return data
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(read(*caFile)) {
		fail("no certificate in %s", *caFile)
	}
	token := string(bytes.TrimSpace(read(*tokenFile)))
	request := read(*requestFile)
	expect := read(*expectFile)
	creds := credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: *serverName})

	clients := make([]*grpc.ClientConn, *conns)
	for i := range clients {
		cc, err := grpc.NewClient(*addr,
			grpc.WithTransportCredentials(creds),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
			// Fixed flow-control windows: this turns off grpc-go's BDP estimation, whose PING
			// frames (answered by the server) are load that a real workload would not send at
			// this rate.
			grpc.WithInitialWindowSize(1<<20),
			grpc.WithInitialConnWindowSize(1<<20),
			// One HTTP/2 connection per ClientConn; without this they could share nothing
			// anyway, but keep the connections distinct and explicit.
			grpc.WithUserAgent(fmt.Sprintf("unwrapload/%d", i)))
		if err != nil {
			fail("%v", err)
		}
		defer cc.Close()
		clients[i] = cc
	}
	base := metadata.Pairs("authorization", "Bearer "+token)

	call := func(cc *grpc.ClientConn) error {
		ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(context.Background(), base), 5*time.Second)
		defer cancel()
		req := request
		var resp []byte
		if err := cc.Invoke(ctx, method, &req, &resp); err != nil {
			return err
		}
		got, err := plaintextOf(resp)
		if err != nil {
			return err
		}
		if !bytes.Equal(got, expect) {
			return errors.New("the plaintext differs from the expected one")
		}
		return nil
	}
	for _, cc := range clients { // TLS handshakes; the TokenReview and DataKey get cached
		if err := call(cc); err != nil {
			fail("warm-up call failed: %v", err)
		}
	}

	var (
		mu        sync.Mutex
		latencies []time.Duration
		failures  int
		firstErr  string
		wg        sync.WaitGroup
	)
	warmEnd := time.Now().Add(*warmup)
	stop := warmEnd.Add(*duration)
	floodDone := make(chan *floodResult, 1)
	if *floodFile != "" {
		var tokens []string
		for _, line := range strings.Split(string(read(*floodFile)), "\n") {
			if line = strings.TrimSpace(line); line != "" {
				tokens = append(tokens, line)
			}
		}
		cc, err := grpc.NewClient(*addr,
			grpc.WithTransportCredentials(creds),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
			grpc.WithInitialWindowSize(1<<20),
			grpc.WithInitialConnWindowSize(1<<20),
			grpc.WithUserAgent("unwrapload/flood"))
		if err != nil {
			fail("%v", err)
		}
		defer cc.Close()
		go func() { floodDone <- flood(cc, request, tokens, *floodRate, warmEnd) }()
	} else {
		floodDone <- nil
	}
	var pids []string
	if *watch != "" {
		pids = strings.Split(*watch, ",")
	}
	startCPU := make(chan float64, 1)
	startWatched := make(chan map[string]float64, 1)
	go func() {
		time.Sleep(time.Until(warmEnd))
		startCPU <- cpuSeconds()
		startWatched <- watchedCPU(pids)
	}()
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			cc := clients[w%len(clients)]
			own := make([]time.Duration, 0, 1<<14)
			bad, firstBad := 0, ""
			for {
				t0 := time.Now()
				if !t0.Before(stop) {
					break
				}
				err := call(cc)
				if t0.Before(warmEnd) {
					continue
				}
				own = append(own, time.Since(t0))
				if err != nil {
					if bad == 0 {
						firstBad = err.Error()
					}
					bad++
				}
			}
			mu.Lock()
			latencies = append(latencies, own...)
			failures += bad
			if firstErr == "" {
				firstErr = firstBad
			}
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	floodOut := <-floodDone
	cpu := cpuSeconds() - <-startCPU
	watched := watchedCPU(pids)
	for pid, before := range <-startWatched {
		watched[pid] -= before
	}
	elapsed := time.Since(warmEnd).Seconds()
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	out := result{
		Calls: len(latencies), Failures: failures, FirstError: firstErr, Seconds: elapsed,
		ClientCPU: cpu, Concurrency: *concurrency, Conns: *conns, Watched: watched,
		Flood: floodOut,
	}
	if n := len(latencies); n > 0 {
		at := func(q float64) float64 { return ms(latencies[min(n-1, int(float64(n)*q))]) }
		out.OpsS = float64(n) / elapsed
		out.P50Ms = at(0.5)
		out.P90Ms = at(0.9)
		out.P99Ms = at(0.99)
		out.P999Ms = at(0.999)
		out.MaxMs = ms(latencies[n-1])
		out.Histogram = make([]int, int(latencies[n-1]/time.Millisecond)+1)
		for _, l := range latencies {
			out.Histogram[int(l/time.Millisecond)]++
		}
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fail("%v", err)
	}
}

// flood sends one call per token, the i-th at start + i/rate, each in its own goroutine, and
// waits for all the answers.
func flood(cc *grpc.ClientConn, request []byte, tokens []string, rate float64, start time.Time) *floodResult {
	var (
		mu        sync.Mutex
		wg        sync.WaitGroup
		latencies []time.Duration
	)
	reasons := map[string]int{}
	time.Sleep(time.Until(start))
	first := time.Now()
	for i, token := range tokens {
		time.Sleep(time.Until(first.Add(time.Duration(float64(i) / rate * float64(time.Second)))))
		wg.Add(1)
		go func(token string) {
			defer wg.Done()
			var trailer metadata.MD
			md := metadata.Pairs("authorization", "Bearer "+token)
			ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(context.Background(), md), 10*time.Second)
			defer cancel()
			req, resp := request, []byte(nil)
			t0 := time.Now()
			err := cc.Invoke(ctx, method, &req, &resp, grpc.Trailer(&trailer))
			took := time.Since(t0)
			reason := "ok"
			if err != nil {
				reason = "code:" + grpcCode(err)
				if r := trailer.Get("kustody-reason"); len(r) > 0 {
					reason = r[0]
				}
			}
			mu.Lock()
			reasons[reason]++
			latencies = append(latencies, took)
			mu.Unlock()
		}(token)
	}
	sent := time.Since(first).Seconds()
	wg.Wait()
	out := &floodResult{Sent: len(tokens), Seconds: sent, Reasons: reasons}
	if sent > 0 {
		out.RateS = float64(len(tokens)) / sent
	}
	if n := len(latencies); n > 0 {
		sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		out.P50Ms = ms(latencies[n/2])
		out.P99Ms = ms(latencies[min(n-1, int(float64(n)*0.99))])
		out.MaxMs = ms(latencies[n-1])
	}
	return out
}

func grpcCode(err error) string {
	return status.Code(err).String()
}
