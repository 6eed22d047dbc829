"""Model folders: save/load round trip, SHA-256 check, catalog lookup, CLI models list/info."""
import json

import pytest
import torch

from DiffusionMICLib.cli import main
from DiffusionMICLib.engine.network import build_network, network_config
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.models import ModelCard, load_model, read_card, resolve_model, save_model

from conftest import TINY_NETWORK, perturb


def tiny_card(name="tiny"):
    return ModelCard(name=name, task="denoise", inputs=["noisy"], outputs=["clean"],
                     network=network_config(2, 1, **TINY_NETWORK), schedule={"prediction_type": "v_prediction"})


def test_save_load_round_trip(tmp_path):
    net = perturb(build_network(tiny_card().network))
    save_model(tmp_path / "m", tiny_card(), net)
    card, loaded = load_model(tmp_path / "m")
    assert card.name == "tiny" and len(card.sha256) == 64
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_fp16_weights_load_as_float32(tmp_path):
    net = perturb(build_network(tiny_card().network))
    save_model(tmp_path / "m", tiny_card(), net, half=True)
    _, loaded = load_model(tmp_path / "m")
    w = next(loaded.parameters())
    assert w.dtype == torch.float32
    assert torch.allclose(w, next(net.parameters()), atol=1e-3)


def test_tampered_weights_are_refused(tmp_path):
    save_model(tmp_path / "m", tiny_card(), build_network(tiny_card().network))
    with open(tmp_path / "m" / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(DiffusionMICError, match="SHA-256"):
        load_model(tmp_path / "m")


def test_unknown_card_field_and_task_rejected(tmp_path):
    save_model(tmp_path / "m", tiny_card(), build_network(tiny_card().network))
    d = json.loads((tmp_path / "m" / "model.json").read_text(encoding="utf-8"))
    (tmp_path / "m" / "model.json").write_text(json.dumps({**d, "task": "teleport"}), encoding="utf-8")
    with pytest.raises(DiffusionMICError, match="teleport"):
        read_card(tmp_path / "m")


def test_catalog_names_resolve(tmp_path, monkeypatch, capsys):
    save_model(tmp_path / "models" / "tiny", tiny_card(), build_network(tiny_card().network))
    catalog = tmp_path / "models" / "catalog.json"
    catalog.write_text(json.dumps({"models": [
        {"name": "tiny", "task": "denoise", "path": "tiny", "description": "a tiny one"},
        {"name": "remote", "task": "denoise", "url": "http://127.0.0.1:9/x.zip", "sha256": "0" * 64}]}), encoding="utf-8")
    monkeypatch.setenv("DIFFUSIONMIC_CATALOG", str(catalog))
    monkeypatch.setenv("DIFFUSIONMIC_CACHE", str(tmp_path / "cache"))
    assert resolve_model("tiny") == tmp_path / "models" / "tiny"
    with pytest.raises(DiffusionMICError, match="not downloaded"):
        resolve_model("remote")
    assert main(["models", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == ["tiny", "remote"]
    assert main(["models", "info", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "denoise"
    assert main(["models", "info", "nothing"]) == 2
    assert "nothing" in capsys.readouterr().err
