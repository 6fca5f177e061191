package main

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Reasons and their gRPC codes: the subset of operator/kustody/api/errors.py this plugin
// can give, with the same names and codes (api/rpcerror.py), so alerts and clients read
// both implementations alike. A message names KeyRings, versions and reasons: never key
// material, plaintext or the PIN.
const (
	reasonInvalidArgument   = "INVALID_ARGUMENT"
	reasonMalformedEnvelope = "MALFORMED_ENVELOPE"
	reasonAADMismatch       = "AAD_MISMATCH"
	reasonVersionNotFound   = "VERSION_NOT_FOUND"
	reasonVersionDisabled   = "VERSION_DISABLED"
	reasonVersionDestroyed  = "VERSION_DESTROYED"
	reasonNoPrimaryVersion  = "NO_PRIMARY_VERSION"
	reasonKeyNotTrusted     = "KEY_NOT_TRUSTED"
	reasonRequestTooLarge   = "REQUEST_TOO_LARGE"
	reasonTokenUnavailable  = "TOKEN_UNAVAILABLE"
	reasonModuleUnavailable = "MODULE_UNAVAILABLE"
	reasonTokenNotFound     = "TOKEN_NOT_FOUND"
	reasonPinIncorrect      = "PIN_INCORRECT"
	reasonPinFileUnreadable = "PIN_FILE_UNREADABLE"
	reasonTokenLost         = "TOKEN_LOST"
	reasonTokenFull         = "TOKEN_FULL"
	reasonTokenIncompatible = "TOKEN_INCOMPATIBLE"
	reasonInternal          = "INTERNAL"
)

var reasonCodes = map[string]codes.Code{
	reasonInvalidArgument:   codes.InvalidArgument,
	reasonMalformedEnvelope: codes.InvalidArgument,
	reasonAADMismatch:       codes.InvalidArgument,
	reasonVersionNotFound:   codes.NotFound,
	reasonVersionDisabled:   codes.FailedPrecondition,
	reasonVersionDestroyed:  codes.FailedPrecondition,
	reasonNoPrimaryVersion:  codes.FailedPrecondition,
	reasonKeyNotTrusted:     codes.FailedPrecondition,
	reasonRequestTooLarge:   codes.ResourceExhausted,
	reasonTokenUnavailable:  codes.Unavailable,
	reasonModuleUnavailable: codes.Unavailable,
	reasonTokenNotFound:     codes.Unavailable,
	reasonPinIncorrect:      codes.Unavailable,
	reasonPinFileUnreadable: codes.Unavailable,
	reasonTokenLost:         codes.Unavailable,
	reasonTokenFull:         codes.ResourceExhausted,
	reasonTokenIncompatible: codes.Unavailable,
	reasonInternal:          codes.Internal,
}

// reasonKey is the trailing-metadata key that carries the reason (api/rpcerror.py).
const reasonKey = "kustody-reason"

type kmsError struct {
	reason  string
	message string
}

func newError(reason, message string) *kmsError { return &kmsError{reason, message} }

func (e *kmsError) Error() string { return e.reason + ": " + e.message }

// status is the gRPC error for a call, with the reason in the trailing metadata.
func (e *kmsError) status(ctx grpcContext) error {
	_ = grpc.SetTrailer(ctx, metadata.Pairs(reasonKey, e.reason))
	code, ok := reasonCodes[e.reason]
	if !ok {
		code = codes.Internal
	}
	return status.Error(code, e.message)
}
