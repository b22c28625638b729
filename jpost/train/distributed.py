"""Multi-process start-up: `jax.distributed.initialize()` when a launcher set a coordinator."""
import os

import jax

# Set by tpu/ launch scripts, SLURM wrappers or by hand; TPU pods also auto-detect with no env.
_ENV = ("JAX_COORDINATOR_ADDRESS", "JPOST_COORDINATOR_ADDRESS")


def maybe_initialize():
  """Initialises the multi-controller runtime if this process is one of several."""
  address = next((os.environ[k] for k in _ENV if os.environ.get(k)), None)
  if address is None:
    return False
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=int(os.environ["JPOST_NUM_PROCESSES"]),
      process_id=int(os.environ["JPOST_PROCESS_ID"]))
  return True
