"""fla kernels vs sleepzoo's torch ops on CUDA: values and every gradient (see ``sleepzoo_fla.parity``).

    python plugins/sleepzoo-fla/parity.py [--quick] [--json rows.json] [--device cpu]

Runs from a checkout whether or not the plugin is installed; exits 0 with a message when there is no CUDA device.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sleepzoo_fla package next to this file

from sleepzoo_fla.parity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
