// gokms: a reference KMS v2 plugin over PKCS#11 and a KMS v2 load client, for comparing
// Kustody's plugin with a minimal Go one on the same token (bench/kms.py, `make bench-hsm`).
//
//	gokms serve -module M -token-label L -pin-file F -socket S   (the plugin; plugin.go)
//	gokms load -socket S -op encrypt|decrypt -c 16                (the client; load.go)
//
// The same client drives both plugins, so whatever it costs, it costs both the same.
package main

import (
	"flag"
	"fmt"
	"os"
)

func flagSet(name string) *flag.FlagSet {
	return flag.NewFlagSet("gokms "+name, flag.ExitOnError)
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "gokms: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: gokms serve|load [flags]")
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "load":
		load(os.Args[2:])
	default:
		fail("unknown command %q (serve or load)", os.Args[1])
	}
}
