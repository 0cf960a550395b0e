"""glibc allocator tuning (medrobust.allocator): it takes effect where the C library is glibc, and a 33 MB tensor
allocated and freed in a loop then stops costing page faults."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from medrobust.allocator import keep_large_blocks


def _page_faults_of_a_loop() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(8_400_000).sum()  # 33.6 MB: above glibc's largest automatic mmap threshold (32 MiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_large_tensors_are_reused_instead_of_faulted_in_again():
    assert keep_large_blocks()
    _page_faults_of_a_loop()  # the first allocation grows the heap once
    # untuned, each of the 10 allocations maps ~8,200 fresh 4 KiB pages
    assert _page_faults_of_a_loop() < 2_000
