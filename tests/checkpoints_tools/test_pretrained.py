import subprocess
import sys

import pytest
import torch

from checkpoints_tools.pretrained import load_pretrained, save_pretrained
from dtrain.model_cmds import add_commands
from model.lm import DiffusionLM
from model.presets import get_preset


def _run_cmd(argv):
    import argparse
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tied):
    torch.manual_seed(0)
    model = DiffusionLM(get_preset("tiny-diffumamba-h").replace(tie_embeddings=tied)).eval()
    save_pretrained(model, tmp_path / "m")
    loaded, meta = load_pretrained(tmp_path / "m")
    ids = torch.randint(0, 511, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert meta["model"]["layer_pattern"] == "MMA"
    assert (loaded.head.proj.weight is loaded.embed.tok.weight) == tied


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)


def test_sample_command_prints_samples(tmp_path, capsys):
    torch.manual_seed(0)
    save_pretrained(DiffusionLM(get_preset("tiny-diffutran")), tmp_path / "m")
    assert _run_cmd(["sample", "--model", str(tmp_path / "m"), "--num", "2", "--length", "12",
                     "--steps", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line and not line.startswith("---")]
    assert len(rows) == 2 and all(len(r) == 12 for r in rows)
    assert all(int(tok) != 511 for r in rows for tok in r)  # no [MASK] left


@pytest.mark.parametrize("flag, graphs", [([], True), (["--no-cuda-graphs"], False), (["--cuda-graphs"], True)])
def test_sample_command_uses_cuda_graphs_unless_told_not_to(tmp_path, monkeypatch, flag, graphs):
    """On by default (a no-op on the CPU, where the graphed model runs eagerly); --no-cuda-graphs turns it off."""
    from model import sampler
    seen = []
    real = sampler.sample
    monkeypatch.setattr(sampler, "sample", lambda *a, **kw: seen.append(kw["cuda_graphs"]) or real(*a, **kw))
    save_pretrained(DiffusionLM(get_preset("tiny-diffumamba")), tmp_path / "m")
    assert _run_cmd(["sample", "--model", str(tmp_path / "m"), "--num", "1", "--length", "8", "--steps", "2",
                     "--device", "cpu", *flag]) == 0
    assert seen == [graphs]


def test_params_command_lists_every_preset():
    out = subprocess.run([sys.executable, "-c", ("from dtrain.model_cmds import add_commands; import argparse;"
                          "p=argparse.ArgumentParser(); add_commands(p.add_subparsers(dest='c'));"
                          "a=p.parse_args(['params']); a.func(a)")], capture_output=True, text=True, check=True).stdout
    for name in ["1.3b-diffumamba", "1.3b-diffumamba-h", "1.3b-diffutran", "240m-diffutran", "0.5b-diffumamba"]:
        assert name in out
