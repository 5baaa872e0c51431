"""`python -m gen_lightning.cli ...` as the console script."""

from gen_lightning.cli.main import console_main

console_main()
