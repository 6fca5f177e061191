//go:build tools

// Package tools pins helm's CLI packages for go mod tidy.
package tools

import _ "helm.sh/helm/v3/pkg/action"
