"""`python -m ijepa.tune ...` (the Makefile's apply-best, and the worker processes of a study)."""
import sys

from ijepa.tune.cli import main

sys.exit(main())
