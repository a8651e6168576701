"""Thin CLI commands: parse options, call the library, print. One module per subcommand."""
