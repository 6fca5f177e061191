//go:build tools

// Package tools pins what tools/kind/build.py builds: the kind CLI, CoreDNS and
// the local-path provisioner.
package tools

import (
	_ "github.com/coredns/coredns"
	_ "github.com/rancher/local-path-provisioner"
	_ "sigs.k8s.io/kind"
)
