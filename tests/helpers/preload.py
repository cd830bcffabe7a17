"""Imported once, by the forkserver the test pools fork their workers from (tests/helpers/pool.py):
what every worker needs, so that no worker imports it again."""

import torch  # noqa: F401
import torch.distributed  # noqa: F401

try:
    import deepspeed  # noqa: F401  (megaring imports it when it builds an engine)

    import megaring.train.trainer  # noqa: F401  (the model, the ring, the checkpoints)
except Exception:  # noqa: BLE001 - a broken import fails in the worker that needs it, with its traceback
    pass
