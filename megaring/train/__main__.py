from megaring.train.main import main

main()
