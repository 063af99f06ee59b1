"""engine.runtime.memory: with the policy set, freed KV-cache-sized blocks leave the resident set (glibc)."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's mmap threshold is glibc's")

PROGRAM = """
import sys
import numpy as np
from engine.runtime.memory import return_large_frees_to_os
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "policy":
    assert return_large_frees_to_os()
big = np.ones(8 << 20, np.uint8); del big                 # a freed mmapped block: glibc's threshold rises to 8 MiB
base = rss()
blocks = [np.ones(3 << 20, np.uint8) for _ in range(64)]  # 192 MiB in 3 MiB blocks (TinyLlama's KV cache blocks)
keep = blocks[-1]; blocks.clear()                         # all freed but the newest
print((rss() - base) / 2**20)
"""


def resident_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True).stdout
    return float(out)


def test_freed_blocks_stay_resident_without_the_policy_and_leave_with_it():
    assert resident_after_free("default") > 150  # glibc's default: 63 freed blocks kept on the heap
    assert resident_after_free("policy") < 16    # each block its own mmap: only the one still held is resident

