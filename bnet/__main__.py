from bnet.cli.main import main

main()
