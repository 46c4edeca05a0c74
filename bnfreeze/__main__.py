from bnfreeze.cli import entry_point

entry_point()
