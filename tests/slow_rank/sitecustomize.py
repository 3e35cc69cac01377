"""Loaded by the DDP checkpoint test through PYTHONPATH: process 1 writes its accelerate checkpoint state a second
late, so a checkpoint renamed without waiting for every process would miss that process's files."""

import os
import time

if os.environ.get("LORAFIT_TEST_SLOW_RANK") == "1" and os.environ.get("RANK") is not None:
    import accelerate.accelerator as accelerator_module

    _save = accelerator_module.save_accelerator_state

    def slow_save(*args, **kwargs):
        if int(os.environ["RANK"]) == 1:
            time.sleep(1.0)
        return _save(*args, **kwargs)

    accelerator_module.save_accelerator_state = slow_save
