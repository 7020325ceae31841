"""The operator's commands of `opscore`: `agents`, `definitions` and `runs`, each a group of
subcommands that talk to a server through `opscore.client.Client` and print tables (rich) or
JSON. See docs/cli.md."""
