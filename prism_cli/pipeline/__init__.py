"""Runs over the whole pipeline (profile -> partition -> export -> bench): the committed operating-point
tables and their timing stability. Above every stage; the CLI's `prism tables` and `make tables`,
`make bench-stability` call it."""
