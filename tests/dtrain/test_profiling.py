"""logging.profile_start: a torch.profiler trace of the chosen steps on every rank of a real 2-process run."""
import gzip
import json

import pytest
from conftest import base_config, check_ok, launch

pytestmark = pytest.mark.slow


def test_profile_of_two_steps_on_each_rank(tmp_path, dataset):
    cfg = base_config(tmp_path / "run", dataset, train={"steps": 4, "eval_interval": 0},
                      logging={"profile_start": 2, "profile_steps": 2, "num_samples": 0})
    proc = launch(cfg, tmp_path)
    check_ok(proc)
    assert "profile of steps 2-3" in proc.stdout
    folder = tmp_path / "run" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == [
        "rank0_steps2-3.json.gz", "rank0_steps2-3.txt", "rank1_steps2-3.json.gz", "rank1_steps2-3.txt"]
    for rank in (0, 1):
        trace = json.loads(gzip.decompress((folder / f"rank{rank}_steps2-3.json.gz").read_bytes()))
        names = {e.get("name", "") for e in trace["traceEvents"]}
        # the model's matmuls and the gradient all-reduce of data parallelism are in the trace
        assert any(n.startswith("aten::") and "mm" in n for n in names), sorted(names)[:50]
        assert any("all_reduce" in n or "allreduce" in n or "reduce_scatter" in n for n in names), \
            sorted(n for n in names if "c10d" in n or "gloo" in n)[:50]
        assert "Self CPU" in (folder / f"rank{rank}_steps2-3.txt").read_text()


def test_profile_start_is_checked():
    from dtrain.config import load_config
    from model.config import ConfigError
    with pytest.raises(ConfigError, match="logging.profile_start"):
        load_config("configs/tiny_cpu.yaml", ["logging.profile_start=0"])
