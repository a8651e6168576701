from prism_cli.cli import main

main()
