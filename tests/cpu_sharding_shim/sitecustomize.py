"""Test-only: FSDP or DeepSpeed on CPU ranks, for launching the unmodified recipes on a machine without GPUs.

accelerate turns FSDP and DeepSpeed on only for accelerator devices. On CPU ranks (ACCELERATE_USE_CPU=1, gloo)
`AcceleratorState` stays MULTI_CPU and drops the plugin that `accelerate launch` configured from the YAML, so
the run silently becomes plain DDP. Python imports this file at start-up when its folder is on PYTHONPATH;
with `EMBER_TEST_CPU_SHARDING` set it wraps `AcceleratorState.__init__` so that a MULTI_CPU state ends up as
the launcher meant it:

- `fsdp`: distributed type FSDP with the plugin built from the FSDP_* variables the launcher exported (or the
  one passed to `Accelerator`), as accelerate does on GPUs.
- `deepspeed`: distributed type DEEPSPEED with the DeepSpeed plugin passed to `Accelerator` (the Trainer's,
  built from the ACCELERATE_DEEPSPEED_* variables), its mixed precision set and the plugin selected, again
  as accelerate does on GPUs. DeepSpeed's own communication then wraps the gloo group already set up.

Nothing else changes: `Accelerator.prepare`, the Trainer's checkpointing and saving take their real FSDP2 /
DeepSpeed paths. Without the variable (or with another value) this file does nothing.
"""

import inspect
import os

MODE = os.environ.get("EMBER_TEST_CPU_SHARDING", "")


def _switch_cpu_state_to_sharding(state, deepspeed_plugin, fsdp_plugin) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if MODE == "fsdp":
        plugin = fsdp_plugin if fsdp_plugin is not None else FullyShardedDataParallelPlugin()
        if state._mixed_precision != "no":
            plugin.set_mixed_precision(state._mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
    else:
        if deepspeed_plugin is None:
            raise RuntimeError("EMBER_TEST_CPU_SHARDING=deepspeed: no DeepSpeed plugin reached AcceleratorState "
                               "(launch with a DeepSpeed accelerate config)")
        plugins = deepspeed_plugin if isinstance(deepspeed_plugin, dict) else {"default": deepspeed_plugin}
        for plugin in plugins.values():
            plugin.set_mixed_precision(state._mixed_precision)
        next(iter(plugins.values())).select(_from_accelerator_state=True)  # the first one is the active one
        state.deepspeed_plugins = deepspeed_plugin
        state.distributed_type = DistributedType.DEEPSPEED
        state._mixed_precision = "no"  # DeepSpeed takes its precision from its JSON config
    PartialState._shared_state["distributed_type"] = state.distributed_type


def _install() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__
    signature = inspect.signature(original_init)

    def init_with_cpu_sharding(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        call = signature.bind(self, *args, **kwargs).arguments
        # Only the first, Accelerator-made initialisation decides; later AcceleratorState() calls share it.
        if call.get("_from_accelerator") and self.distributed_type == DistributedType.MULTI_CPU:
            _switch_cpu_state_to_sharding(self, call.get("deepspeed_plugin"), call.get("fsdp_plugin"))

    AcceleratorState.__init__ = init_with_cpu_sharding


def _install_tensor_parallel() -> None:
    """`tp`: accelerate accepts a ParallelismConfig only on accelerator-device ranks (MULTI_GPU, ...) or under
    FSDP2 / DeepSpeed; on MULTI_CPU ranks it refuses it before looking at the model. Everything after that
    check (the DTensor-sharded model, the device mesh, the data-parallel sharding of batches) is device-agnostic
    and runs on gloo, so the check is skipped for MULTI_CPU, with its one real condition kept."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType

    original = ParallelismConfig._validate_accelerator

    def validate(self, accelerator):
        if accelerator.distributed_type != DistributedType.MULTI_CPU:
            return original(self, accelerator)
        if self.total_size != accelerator.num_processes:
            raise ValueError(f"ParallelismConfig total_size ({self.total_size}) does not match num_processes "
                             f"({accelerator.num_processes})")

    ParallelismConfig._validate_accelerator = validate


if MODE in ("fsdp", "deepspeed"):
    _install()
elif MODE == "tp":
    _install_tensor_parallel()
