import os
import subprocess
import sys

import pytest

PROBE = ("from yt8m.host import tune_host; import os; first = tune_host(); "
         "print(first, tune_host() == first, os.environ.get('THP_MEM_ALLOC_ENABLE'), os.environ.get('OMP_WAIT_POLICY'))")


def run_probe(**env_values: str) -> list[str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("YT8M_TUNE_HOST", "THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY")}
    env.update(env_values)
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return result.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuning_applies_on_glibc_and_is_idempotent():
    assert run_probe() == ["True", "True", "1", "PASSIVE"]


def test_the_users_own_settings_win():
    assert run_probe(OMP_WAIT_POLICY="ACTIVE", THP_MEM_ALLOC_ENABLE="0")[2:] == ["0", "ACTIVE"]


def test_tuning_can_be_turned_off():
    assert run_probe(YT8M_TUNE_HOST="0") == ["False", "True", "None", "None"]


def test_large_buffers_still_allocate_and_free_after_tuning():
    import torch

    from yt8m.host import tune_host

    tune_host()
    for _ in range(3):
        batch = torch.ones(64, 300, 1024)  # 78 MB, above glibc's largest mmap threshold
        assert float(batch[-1, -1, -1]) == 1.0
        del batch
