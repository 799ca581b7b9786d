import subprocess
import sys

import pytest

PROBE = ("from yt8m.host_memory import tune_host_memory; import os; "
         "first = tune_host_memory(); print(first, tune_host_memory() == first, os.environ['THP_MEM_ALLOC_ENABLE'])")


def run_probe(env_value: str | None) -> list[str]:
    import os

    env = dict(os.environ)
    env.pop("YT8M_TUNE_MALLOC", None)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if env_value is not None:
        env["YT8M_TUNE_MALLOC"] = env_value
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return result.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuning_applies_on_glibc_and_is_idempotent():
    applied, stable, thp = run_probe(None)
    assert applied == "True" and stable == "True" and thp == "1"


def test_tuning_can_be_turned_off():
    applied, stable, thp = run_probe("0")
    assert applied == "False" and stable == "True" and thp == "1"


def test_large_buffers_still_allocate_and_free_after_tuning():
    import torch

    from yt8m.host_memory import tune_host_memory

    tune_host_memory()
    for _ in range(3):
        batch = torch.ones(64, 300, 1024)  # 78 MB, above glibc's largest mmap threshold
        assert float(batch[-1, -1, -1]) == 1.0
        del batch
