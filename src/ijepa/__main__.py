"""`python -m ijepa import SRC OUT_DIR` / `python -m ijepa export ENCODER_DIR OUT --format timm|hf` (ijepa.cli)."""
import sys

from ijepa.cli import main

sys.exit(main())
