// composecheck loads and validates a compose file as `docker compose config` does: compose-go is
// the loader docker compose itself uses (schema, interpolation, profiles, depends_on, env files).
// There is no Docker engine or compose plugin on the build machines, so tests/unit/test_compose.py
// runs this instead. Exit 0 and the resolved model on stdout, or exit 1 and the loader's error.
//
//	composecheck [-env-file FILE] [-profile NAME]... COMPOSE_FILE
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

type names []string

func (n *names) String() string     { return fmt.Sprint(*n) }
func (n *names) Set(v string) error { *n = append(*n, v); return nil }

func main() {
	envFile := flag.String("env-file", "", "environment file used for interpolation")
	var profiles names
	flag.Var(&profiles, "profile", "profile to enable (repeatable)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: composecheck [-env-file FILE] [-profile NAME]... COMPOSE_FILE")
		os.Exit(2)
	}
	options := []cli.ProjectOptionsFn{cli.WithOsEnv, cli.WithProfiles(profiles)}
	if *envFile != "" {
		options = append(options, cli.WithEnvFiles(*envFile))
	}
	options = append(options, cli.WithDotEnv)
	opts, err := cli.NewProjectOptions([]string{flag.Arg(0)}, options...)
	if err != nil {
		fail(err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := project.MarshalYAML()
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "composecheck:", err)
	os.Exit(1)
}
