"""`python -m engine` is the `tinyllama` command."""
import sys

from engine.cli import main

sys.exit(main())
