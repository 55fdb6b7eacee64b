"""`python -m patterndsl.cli ...`."""
import sys

from . import main

sys.exit(main())
