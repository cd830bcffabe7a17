from megaring.cli.train import main

main()
