"""`python -m vlmtune ...`: the same CLI, in the form launchers take
(`torchrun --nproc_per_node 2 -m vlmtune train CONFIG`, `accelerate launch -m vlmtune train CONFIG`)."""

import sys

from .cli import main

sys.exit(main())
