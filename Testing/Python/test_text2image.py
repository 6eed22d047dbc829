"""Text-to-image on the Stable Diffusion architecture (issue 13): tokenizer, base, the four fine-tuning
methods, generation and the `diffusion-mic text2image` command line, on a tiny base built here."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from DiffusionMICLib.cli import main
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.text2image.finetune import finetune
from DiffusionMICLib.text2image.generate import load_pipeline, sample
from DiffusionMICLib.text2image.model import base_sha256, load_base
from DiffusionMICLib.text2image.tokenizer import clip_tokenizer
from DiffusionMICLib.text2image.train import pretrain

GOLDEN = Path(__file__).parent / "data" / "clip_golden_ids.json"
PROMPT = "axial PD brain MRI, middle slice"


def write_images(folder: Path, captions: list[str], size: int = 16, jsonl: bool = True) -> Path:
    """Bright discs of varying size on black, captioned in metadata.jsonl or in .txt files."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i, text in enumerate(captions):
        r = size / 4 + (i % 4)
        img = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r) * (120 + 40 * (i % 3))).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:02d}.png")
        rows.append({"file_name": f"img_{i:02d}.png", "text": text})
        if not jsonl:
            (folder / f"img_{i:02d}.txt").write_text(text, encoding="utf-8")
    if jsonl:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    base_data = write_images(root / "base_data", [f"axial {c} brain MRI, middle slice" for c in ("T1", "T2")] * 4)
    concept = write_images(root / "concept", [PROMPT] * 6, jsonl=False)
    pretrain(base_data, root / "base", max_steps=2, size="tiny", resolution=16, batch_size=4)
    return root, concept


# ---- tokenizer and base ---------------------------------------------------------------------------

def test_offline_clip_tokenizer_matches_open_clip():
    """Golden ids made once with open_clip's own tokenizer (how: see the file's "how")."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    for prompt, ids in golden["ids"].items():
        assert tok(prompt).input_ids == ids, prompt


def test_base_is_a_complete_diffusers_folder(work):
    root, _ = work
    card = json.loads((root / "base" / "text2image.json").read_text(encoding="utf-8"))
    assert card["kind"] == "text2image-base" and card["steps"] == 2 and card["vae_steps"] == 1
    pipe = load_base(root / "base")
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 16
    assert pipe.tokenizer(PROMPT).input_ids == clip_tokenizer()(PROMPT).input_ids
    assert not list((root / "base").rglob("*.bin"))          # weights only as safetensors


# ---- the four methods -----------------------------------------------------------------------------

def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "hypernetwork", "embedding", "dreambooth"])
def test_method_trains_only_its_own_parameters(work, method):
    root, concept = work
    before = file_hashes(root / "base")
    out = root / f"adapter-{method}"
    info = finetune(root / "base", concept, method, out, max_steps=3, token="PD", batch_size=2, lr=1e-2)
    assert file_hashes(root / "base") == before                  # the base on disk is only read
    base = load_base(root / "base")
    tuned = load_pipeline(root / "base", out)
    unet, text, vae = _state(base.unet), _state(base.text_encoder), _state(base.vae)
    if method == "dreambooth":                                     # all UNet weights, nothing else
        assert (out / "text2image.json").is_file() and (out / "model_index.json").is_file()
        assert any(not torch.equal(v, _state(tuned.unet)[k]) for k, v in unet.items())
        assert all(torch.equal(v, _state(tuned.text_encoder)[k]) for k, v in text.items())
        assert info["trainable_parameters"] == sum(v.numel() for v in base.unet.parameters())
    else:
        card = json.loads((out / "adapter.json").read_text(encoding="utf-8"))
        assert card["base_sha256"] == base_sha256(root / "base") and card["method"] == method
        assert sorted(p.name for p in out.iterdir()) == sorted(card["files"] + ["adapter.json"])
    if method == "embedding":                                      # one row of the embedding table
        tok_id = base.tokenizer("PD", add_special_tokens=False).input_ids[0]
        new = _state(tuned.text_encoder)
        emb = next(k for k in text if k.endswith("token_embedding.weight"))
        changed = (new[emb] != text[emb]).any(dim=1).nonzero().flatten().tolist()
        assert changed == [tok_id]
        assert all(torch.equal(v, new[k]) for k, v in text.items() if k != emb)
        assert all(torch.equal(v, _state(tuned.unet)[k]) for k, v in unet.items())
    if method in ("lora", "hypernetwork"):                         # base weights untouched, own weights trained
        from safetensors.torch import load_file
        weights = load_file(out / card["files"][0])
        assert all(("lora" in k) if method == "lora" else k.split(".")[0] in ("key", "value") for k in weights)
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k or k.endswith("net.2.weight"))
        assert all(torch.equal(v, _state(tuned.text_encoder)[k]) for k, v in text.items())
        assert all(torch.equal(v, _state(tuned.vae)[k]) for k, v in vae.items())
        plain = {k.replace(".base_layer", ""): v for k, v in _state(tuned.unet).items() if "lora" not in k}
        assert all(torch.equal(v, plain[k]) for k, v in unet.items())
    a = sample(tuned, PROMPT, [3], steps=3)
    b = sample(load_pipeline(root / "base", out), PROMPT, [3], steps=3)   # reloaded: the same image
    assert np.array_equal(a, b)


def test_dreambooth_prior_preservation_term_is_applied(work):
    root, concept = work
    args = dict(max_steps=2, token="PD", batch_size=2, seed=1)
    with_prior = finetune(root / "base", concept, "dreambooth", root / "db-prior", prior_images=2, **args)
    without = finetune(root / "base", concept, "dreambooth", root / "db-none", **args)
    assert without["prior_loss"] is None and with_prior["prior_loss"] > 0
    card = json.loads((root / "db-prior" / "text2image.json").read_text(encoding="utf-8"))["finetune"]
    assert card["prior_images"] == 2 and card["prior_weight"] == 1.0
    a, b = load_base(root / "db-prior").unet.state_dict(), load_base(root / "db-none").unet.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)              # the prior term changed the gradients


def test_class_prompt_removes_the_token():
    from DiffusionMICLib.text2image.methods.dreambooth import class_prompt
    assert class_prompt("axial PD brain MRI, middle slice", "PD") == "axial brain MRI, middle slice"
    assert class_prompt("sks, axial brain", "sks") == "axial brain"


# ---- command line ---------------------------------------------------------------------------------

def test_generate_command_is_byte_identical_for_a_seed(work, capsys):
    root, _ = work
    outs = []
    for name in ("g1", "g2"):
        assert main(["text2image", "generate", "--base", str(root / "base"), "--adapter", str(root / "adapter-lora"),
                     "--prompt", PROMPT, "--count", "2", "--seed", "5", "--steps", "3", "--out", str(root / name),
                     "--progress", "none"]) == 0
        outs.append(file_hashes(root / name))
    assert outs[0] == outs[1] and len(outs[0]) == 4
    printed = capsys.readouterr().out
    assert '"image_001_seed6.png"' in printed and '"seed": 5' in printed
    import SimpleITK as sitk
    nrrd = sitk.ReadImage(str(root / "g1" / "image_000_seed5.nrrd"))
    png = np.asarray(Image.open(root / "g1" / "image_000_seed5.png"))
    assert nrrd.GetSize() == (16, 16) and np.allclose(sitk.GetArrayFromImage(nrrd), png.mean(axis=2))


def _fails(argv, capsys, out: Path, expected: str):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffusion-mic: error:") and expected in err[0], err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_input_gives_one_line_and_writes_nothing(work, tmp_path, capsys):
    root, concept = work
    out = tmp_path / "out"
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    shutil.copy(concept / "img_00.png", uncaptioned)
    ft = ["text2image", "finetune", "--data", str(concept), "--out", str(out), "--max-steps", "1", "--progress", "none"]
    _fails(["text2image", "pretrain", "--data", str(uncaptioned), "--out", str(out), "--progress", "none"],
           capsys, out, "have no caption")
    _fails(ft + ["--base", str(root / "base"), "--method", "dora"], capsys, out, "unknown method 'dora'")
    broken = tmp_path / "broken"
    shutil.copytree(root / "base", broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    _fails(ft + ["--base", str(broken), "--method", "lora"], capsys, out, "'unet/' has no weights")
    single = tmp_path / "sd15.safetensors"
    single.write_bytes(b"\0" * 16)
    _fails(ft + ["--base", str(single), "--method", "lora"], capsys, out, "needs a local config folder")
    _fails(ft + ["--base", str(single), "--base-config", str(tmp_path), "--method", "lora"], capsys, out,
           "model_index.json is missing")
    _fails(ft + ["--base", str(root / "base"), "--method", "embedding"], capsys, out, "needs --token")
    _fails(["text2image", "generate", "--base", str(broken), "--prompt", "x", "--out", str(out), "--progress", "none"],
           capsys, out, "has no weights")
    assert file_hashes(concept) and (root / "base" / "model_index.json").is_file()


def test_adapter_refuses_another_base(work, tmp_path):
    root, _ = work
    other = tmp_path / "other"
    pretrain(root / "base_data", other, max_steps=1, size="tiny", resolution=16, batch_size=2, seed=7)
    with pytest.raises(DiffusionMICError, match="trained on another base"):
        load_pipeline(other, root / "adapter-lora")


def test_slices_command_captions_contrast_level_and_lesion(tmp_path, capsys):
    from DiffusionMICLib.phantom import write_phantom
    write_phantom(tmp_path / "ph", subjects=1, seed=3, resolution=2.0, noise=2.0, lesions=3)
    assert main(["text2image", "slices", str(tmp_path / "ph"), str(tmp_path / "sl"), "--channels", "PD",
                 "--resolution", "16", "--every", "4", "--progress", "none"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "sl" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = {r["text"] for r in rows}
    assert {f"axial PD brain MRI, {lvl} slice" for lvl in ("lower", "middle", "upper")} <= texts
    assert any(t.endswith("with lesion") for t in texts)
    assert Image.open(tmp_path / "sl" / rows[0]["file_name"]).size == (16, 16)
    _fails(["text2image", "slices", str(tmp_path / "ph"), str(tmp_path / "sl2"), "--channels", "CT"], capsys,
           tmp_path / "sl2", "not in the data set")


def test_study_command_writes_table_figure_and_results(work, tmp_path):
    root, concept = work
    heldout = write_images(tmp_path / "heldout", [PROMPT] * 3)
    assert main(["text2image", "study", "--base", str(root / "base"), "--data", str(concept), "--heldout", str(heldout),
                 "--sizes", "2,4", "--prompts", PROMPT, "--methods", "lora,embedding", "--token", "PD",
                 "--max-steps", "1", "--count", "2", "--steps", "2", "--out", str(tmp_path / "study"),
                 "--progress", "none"]) == 0
    result = json.loads((tmp_path / "study" / "results.json").read_text(encoding="utf-8"))
    assert [(r["method"], r["images"]) for r in result["runs"]] == [
        ("base", 0), ("lora", 2), ("lora", 4), ("embedding", 2), ("embedding", 4)]
    scores = result["runs"][1]["prompts"][PROMPT]
    assert len(scores["psnr"]) == 2 and all(-1 <= s <= 1 for s in scores["ssim"]) and scores["mmd"] == scores["mmd"]
    table = (tmp_path / "study" / "table.md").read_text(encoding="utf-8")
    assert "| embedding | 4 |" in table and "cannot be reproduced" in table and "Base (tiny, 16 px)" in table
    assert (tmp_path / "study" / "study.png").stat().st_size > 10_000
