"""`python -m multicond <command>`: the command lines of the diffusers binding."""

import sys

from .core.diffusers_binding.cli import main

sys.exit(main())
