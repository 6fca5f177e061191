//go:build tools

// Package tools pins the control-plane build (see gen_gomod.py): importing each
// command's app package keeps go mod tidy recording every module it needs.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	_ "k8s.io/kubectl/pkg/cmd"
)
