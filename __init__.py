"""timfusion: task-guided, implicitly-searched, meta-initialized image fusion."""

import os as _os

# torch's OpenMP threads spin while waiting; on a machine with few cores and another busy
# process (Ray workers, a test runner) that turns 2-thread kernels 10-50x slower. Passive
# waiting costs nothing measurable when the machine is idle. Set before torch loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
