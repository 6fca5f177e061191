//go:build tools

// Package tools pins helm for the chart tests and the demo. cmd/helm is a main package and
// cannot be imported, so its go.sum entries come from `go get helm.sh/helm/v3/cmd/helm@VERSION`;
// do not run `go mod tidy` here (it would drop them).
package tools

import _ "helm.sh/helm/v3/pkg/action"
