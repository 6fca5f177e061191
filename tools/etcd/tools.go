//go:build tools

// Package tools pins etcd's server (its main package is the module root) for go mod tidy.
package tools

import _ "go.etcd.io/etcd/server/v3/etcdmain"
