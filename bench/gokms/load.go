package main

// The KMS v2 load client: -c callers over -conns connections (kube-apiserver keeps one) call
// Encrypt or Decrypt back to back for -duration after -warmup, and one JSON object is printed:
// ops/s, latency quantiles, this process's CPU and that of the watched (server) processes over
// the measured window. Encrypt sends a 32-byte seed (what kube-apiserver sends) and a fresh
// uid per call; Decrypt sends the ciphertext, key_id and annotations one Encrypt returned at
// the start, and every plaintext is checked.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

type loadResult struct {
	Op          string             `json:"op"`
	OpsS        float64            `json:"ops_s"`
	P50Ms       float64            `json:"p50_ms"`
	P90Ms       float64            `json:"p90_ms"`
	P99Ms       float64            `json:"p99_ms"`
	MaxMs       float64            `json:"max_ms"`
	Calls       int                `json:"calls"`
	Failures    int                `json:"failures"`
	FirstError  string             `json:"first_error,omitempty"`
	Seconds     float64            `json:"seconds"`
	ClientCPU   float64            `json:"client_cpu_seconds"`
	Concurrency int                `json:"concurrency"`
	Conns       int                `json:"connections"`
	KeyID       string             `json:"key_id"`
	Watched     map[string]float64 `json:"watched_cpu_seconds"`
}

// procCPU is the user+system CPU time of a process from /proc/<pid>/stat (USER_HZ = 100).
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

func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func load(args []string) {
	fs := flagSet("load")
	socket := fs.String("socket", "", "unix socket of the KMS v2 plugin")
	op := fs.String("op", "encrypt", "encrypt or decrypt")
	concurrency := fs.Int("c", 16, "callers")
	conns := fs.Int("conns", 1, "gRPC connections (callers are spread over them)")
	duration := fs.Duration("duration", 3*time.Second, "how long to measure")
	warmup := fs.Duration("warmup", time.Second, "load before measuring")
	seedBytes := fs.Int("plaintext-bytes", 32, "Encrypt plaintext size")
	watch := fs.String("watch-pids", "", "comma-separated pids whose CPU time to report")
	ready := fs.Duration("ready-timeout", 60*time.Second, "wait this long for Status healthz ok")
	_ = fs.Parse(args)
	if *op != "encrypt" && *op != "decrypt" {
		fail("-op must be encrypt or decrypt")
	}

	clients := make([]kmsapi.KeyManagementServiceClient, *conns)
	for i := range clients {
		cc, err := grpc.NewClient("unix://"+*socket,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithInitialWindowSize(1<<20), // fixed windows: no BDP-probe PINGs
			grpc.WithInitialConnWindowSize(1<<20))
		if err != nil {
			fail("%v", err)
		}
		defer cc.Close()
		clients[i] = kmsapi.NewKeyManagementServiceClient(cc)
	}
	seed := make([]byte, *seedBytes)
	_, _ = rand.Read(seed)
	ctx0, cancel0 := context.WithTimeout(context.Background(), *ready)
	for { // until the plugin says it is healthy (it may still be creating its key)
		status, err := clients[0].Status(ctx0, &kmsapi.StatusRequest{}, grpc.WaitForReady(true))
		if err == nil && status.Healthz == "ok" && status.Version == "v2" {
			break
		}
		if ctx0.Err() != nil {
			fail("Status: not ready within %v (last: %v %v)", *ready, status, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	sample, err := clients[0].Encrypt(ctx0, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "warm-up"})
	cancel0()
	if err != nil {
		fail("Encrypt: %v", err)
	}

	var counter struct {
		sync.Mutex
		n int
	}
	uid := func() string { // kube-apiserver sends a fresh UUID per call
		counter.Lock()
		counter.n++
		n := counter.n
		counter.Unlock()
		return fmt.Sprintf("00000000-0000-4000-8000-%012d", n)
	}
	call := func(c kmsapi.KeyManagementServiceClient) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if *op == "encrypt" {
			resp, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: uid()})
			if err != nil {
				return err
			}
			if len(resp.Ciphertext) <= len(seed) || resp.KeyId != sample.KeyId {
				return errors.New("unexpected Encrypt response")
			}
			return nil
		}
		resp, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{
			Ciphertext: sample.Ciphertext, Uid: uid(), KeyId: sample.KeyId,
			Annotations: sample.Annotations,
		})
		if err != nil {
			return err
		}
		if !bytes.Equal(resp.Plaintext, seed) {
			return errors.New("the plaintext differs from the seed")
		}
		return nil
	}

	var pids []string
	if *watch != "" {
		pids = strings.Split(*watch, ",")
	}
	var (
		mu        sync.Mutex
		wg        sync.WaitGroup
		latencies []time.Duration
		failures  int
		firstErr  string
	)
	warmEnd := time.Now().Add(*warmup)
	stop := warmEnd.Add(*duration)
	startCPU := make(chan float64, 1)
	startWatched := make(chan map[string]float64, 1)
	go func() {
		time.Sleep(time.Until(warmEnd))
		startCPU <- selfCPU()
		startWatched <- watchedCPU(pids)
	}()
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := clients[w%len(clients)]
			own := make([]time.Duration, 0, 1<<14)
			bad, firstBad := 0, ""
			for {
				t0 := time.Now()
				if !t0.Before(stop) {
					break
				}
				err := call(c)
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
	elapsed := time.Since(warmEnd).Seconds()
	cpu := selfCPU() - <-startCPU
	watched := watchedCPU(pids)
	for pid, before := range <-startWatched {
		watched[pid] -= before
	}
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	out := loadResult{
		Op: *op, Calls: len(latencies), Failures: failures, FirstError: firstErr,
		Seconds: elapsed, ClientCPU: cpu, Concurrency: *concurrency, Conns: *conns,
		KeyID: sample.KeyId, Watched: watched,
	}
	if n := len(latencies); n > 0 {
		at := func(q float64) float64 { return ms(latencies[min(n-1, int(float64(n)*q))]) }
		out.OpsS = float64(n-failures) / elapsed
		out.P50Ms, out.P90Ms, out.P99Ms = at(0.5), at(0.9), at(0.99)
		out.MaxMs = ms(latencies[n-1])
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("%v", err)
	}
}
