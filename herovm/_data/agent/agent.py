"""Entry point of the herovm init agent: the initramfs switch_roots to `python3 -I -S agent.py` as PID 1."""

import sys

sys.path.insert(0, "/usr/lib/herovm/python")

from herovm_agent.main import main  # noqa: E402

main()
