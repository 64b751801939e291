"""graph.malloc: a freed whole-graph tensor's memory stays in the process for the next step."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# Allocates and frees a 48 MB tensor (the built-in graph's [U + I, 128] float32) twice and
# reports glibc's mmapped bytes (mallinfo2's hblkhd) while the second one is alive.
PROBE = """
import ctypes, json, sys
sys.path.insert(0, {repo!r})
import torch
from graph.malloc import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
threshold = retain_freed_memory() if {retain} else 0
mapped = []
for _ in range(2):
    t = torch.ones(94_150, 128)
    mapped.append(libc.mallinfo2().hblkhd)
    del t
print(json.dumps({{"threshold": threshold, "mapped": mapped}}))
"""


def _probe(retain: bool) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO), retain=retain)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt and mallinfo2 are glibc's")
def test_large_tensors_come_from_the_heap_once_retained() -> None:
    tensor = 94_150 * 128 * 4
    default = _probe(retain=False)
    retained = _probe(retain=True)
    # glibc's own thresholds: each 48 MB tensor is a fresh mmap (and munmap when freed), so
    # its pages are faulted in and zeroed by the kernel again every time.
    assert all(m >= tensor for m in default["mapped"]), default
    # Raised: it comes from the heap, whose freed memory the next allocation reuses.
    assert retained["threshold"] >= 32 * 2**20, retained
    if retained["threshold"] < tensor:
        pytest.skip(f"this glibc caps the mmap threshold at {retained['threshold']:,} bytes")
    assert all(m < tensor for m in retained["mapped"]), retained


def test_train_job_flag_turns_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import train_job

    monkeypatch.chdir(tmp_path)
    parser = train_job.build_parser()
    assert train_job.config_from_args(parser.parse_args([])).train.retain_freed_memory
    off = train_job.config_from_args(parser.parse_args(["--release-freed-memory"]))
    assert off.train.retain_freed_memory is False
