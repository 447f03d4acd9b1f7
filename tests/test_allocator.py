"""The allocator setting: a train step of the reference model reuses the memory of the last one."""

import subprocess
import sys

import pytest

from charlstm_jax import allocator

# The median of minor page faults per train step after warm-up, in a fresh process (the setting
# must come before other threads allocate). Measured here: about 35,000 without it, 0 with it.
PROBE = """
import resource
from charlstm_jax import allocator
applied = allocator.reuse_freed_memory()
import jax, jax.numpy as jnp
from charlstm_jax import train
from charlstm_jax.config import get_config
config = get_config()
state = train.create_train_state(config, 71, jax.random.key(0))
carry = train.create_model(config, 71).initialize_carry(16)
ids = jnp.zeros((16, 100), jnp.int32)
step = jax.jit(train.train_step, donate_argnums=(0, 1))

def run(steps):  # one step at a time, as the train loop runs them
    global state, carry
    for _ in range(steps):
        state, carry, metrics = step(state, carry, ids, ids, jax.random.key(1))
        jax.block_until_ready((state, carry, metrics))

run(3)
allocator.programs_compiled()  # as the train loop does once its programs are built
run(3)  # the heap finds its layout: a step or two may still fault
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[2])
"""

needs_glibc = pytest.mark.skipif(not allocator.is_glibc(), reason="mallopt is glibc's")


@needs_glibc
def test_a_train_step_reuses_the_pages_of_the_last_one():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True
    )
    applied, median_faults = result.stdout.split()
    assert applied == "True"
    # The step's temporary buffer alone is about 140 MB: 35,000 pages, if it were fresh.
    assert float(median_faults) < 1000


def test_the_environment_can_keep_the_default_allocator(monkeypatch):
    monkeypatch.setenv(allocator.OPT_OUT, "1")
    assert allocator.reuse_freed_memory() is False
    assert allocator.programs_compiled() is False  # a process that did not opt in is left alone
