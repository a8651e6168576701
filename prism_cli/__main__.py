from prism_cli.app import main

main()
