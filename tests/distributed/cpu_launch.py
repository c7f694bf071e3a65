"""TEST-ONLY shim: run a training script under `accelerate launch` with FSDP or DeepSpeed on CPU processes.

accelerate enables FSDP and DeepSpeed only on GPU-type process groups (CUDA, XPU, NPU, ...); with `--cpu` it sets
up a gloo process group as `MULTI_CPU` and ignores the FSDP / DeepSpeed plugin the launch config asks for. Both work on
gloo, so CI can test them without a GPU: this shim lets accelerate set up its CPU process group, then switches the
state to the distributed type that the launch config (`ACCELERATE_USE_FSDP` / `ACCELERATE_USE_DEEPSPEED`) names, and
runs the script. For DeepSpeed it also turns off DeepSpeed's shared-memory CPU collectives, which it would otherwise
compile on first use (minutes on CI's two cores): gloo carries the same collectives. It changes nothing else; GPU runs
never need it.

    accelerate launch --config_file examples/accelerate/fsdp.yaml --cpu --num_processes 2 \
        --mixed_precision no tests/distributed/cpu_launch.py examples/finetune.py ARGS...
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


original_init = AcceleratorState.__init__


def init_on_cpu(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if _flag("ACCELERATE_USE_DEEPSPEED") and kwargs.get("deepspeed_plugin") is not None:
        plugin = kwargs["deepspeed_plugin"]
        plugin.set_mixed_precision(self.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = plugin
        self.distributed_type = DistributedType.DEEPSPEED
    elif _flag("ACCELERATE_USE_FSDP") and kwargs.get("fsdp_plugin") is not None:
        self.fsdp_plugin = kwargs["fsdp_plugin"]
        self.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = init_on_cpu
if _flag("ACCELERATE_USE_DEEPSPEED"):
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo, not a kernel compiled on first use

if __name__ == "__main__":
    script, *sys.argv[1:] = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
