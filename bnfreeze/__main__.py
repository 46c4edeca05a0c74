from bnfreeze.cli import main

main()
