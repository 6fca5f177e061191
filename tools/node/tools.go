//go:build tools

// Package tools pins the kind node build (tools/kind/build.py): kubelet, kubeadm,
// kube-scheduler and kube-proxy from the same Kubernetes release as tools/controlplane.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy/app"
	_ "k8s.io/kubernetes/cmd/kube-scheduler/app"
	_ "k8s.io/kubernetes/cmd/kubeadm/app"
	_ "k8s.io/kubernetes/cmd/kubelet/app"
)
