"""``python -m rlhf``: the ``rlhf`` command, as torchrun starts it
(``torchrun --nproc-per-node N -m rlhf <stage> ...``)."""

import sys

from rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main())
