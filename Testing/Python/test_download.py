"""Model download and import: HTTP on 127.0.0.1 with Range/resume, SHA-256 refusal, zip safety, import."""
import hashlib
import io
import json
import shutil
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from DiffusionMICLib import download
from DiffusionMICLib.cli import main
from DiffusionMICLib.engine.network import build_network, network_config
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.models import ModelCard, resolve_model, save_model

from conftest import TINY_NETWORK


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(folder, top=None, extra=None, symlink=None) -> bytes:
    """The model folder's card + weights as a zip (at the root, or in folder `top`), plus extras."""
    buf = io.BytesIO()
    prefix = f"{top}/" if top else ""
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in ("model.json", "model.safetensors"):
            zf.write(folder / f, prefix + f)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    card = ModelCard(name="tiny", task="denoise", inputs=["noisy"], outputs=["clean"],
                     network=network_config(2, 1, **TINY_NETWORK), schedule={"prediction_type": "v_prediction"})
    return save_model(tmp_path_factory.mktemp("src") / "tiny", card, build_network(card.network))


@pytest.fixture(scope="module")
def model_zip(model_dir) -> bytes:
    return make_zip(model_dir, top="tiny")


class Handler(BaseHTTPRequestHandler):
    """GET /<mode>/<file>: 'range' honours Range, 'norange' ignores it, 'drop' also cuts the first reply halfway."""
    files: dict = {}
    log: list = []
    dropped: set = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode, _, name = self.path.strip("/").partition("/")
        data = self.files.get(name)
        self.log.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range") if mode in ("range", "drop") else None
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if mode == "drop" and self.path not in self.dropped:
            self.dropped.add(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True          # the server closes the socket: a broken download
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch, server, model_zip):
    """A catalog and cache in tmp_path; the server serves tiny.zip; returns a catalog writer."""
    Handler.files.clear()
    Handler.log.clear()
    Handler.dropped.clear()
    Handler.files["tiny.zip"] = model_zip
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0)
    catalog = tmp_path / "catalog.json"
    monkeypatch.setenv("DIFFUSIONMIC_CATALOG", str(catalog))
    monkeypatch.setenv("DIFFUSIONMIC_CACHE", str(tmp_path / "cache"))

    def write(mode="range", file="tiny.zip", sha256=None, name="remote"):
        catalog.write_text(json.dumps({"models": [
            {"name": name, "task": "denoise", "description": "served on 127.0.0.1",
             "url": f"{server}/{mode}/{file}", "sha256": sha256 or sha(Handler.files.get(file, b""))}]}), encoding="utf-8")
    write()
    return write


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusion-mic: error:") and "\n" not in err, err
    return err


def cache_models(tmp_path) -> list:
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_fetch_downloads_verifies_and_resolves(env, tmp_path, capsys):
    assert main(["models", "fetch", "remote"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["cached"] is False and out["bytes"] == len(Handler.files["tiny.zip"])
    assert "download remote" in captured.err                  # the tqdm bar, on stderr
    assert resolve_model("remote") == tmp_path / "cache" / "remote"
    assert cache_models(tmp_path) == ["remote"]               # no .part, no temp folders left
    assert main(["models", "verify", "remote"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    requests = len(Handler.log)
    assert main(["models", "fetch", "remote", "--progress", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True
    assert len(Handler.log) == requests                       # already there: no download


def test_broken_download_resumes_with_range(env, tmp_path, capsys):
    env(mode="drop")
    size = len(Handler.files["tiny.zip"])
    assert main(["models", "fetch", "remote", "--progress", "none"]) == 0   # retried within the call
    assert [r for _, r in Handler.log] == [None, f"bytes={size // 2}-"]
    assert json.loads(capsys.readouterr().out)["bytes"] == size             # half + the rest, not twice
    assert resolve_model("remote") == tmp_path / "cache" / "remote"


def test_broken_download_resumes_on_the_next_fetch(env, tmp_path, capsys, monkeypatch):
    env(mode="drop")
    size = len(Handler.files["tiny.zip"])
    monkeypatch.setattr(download, "RETRIES", 0)
    assert main(["models", "fetch", "remote", "--progress", "none"]) == 2
    assert "fetch' again to resume" in one_line_error(capsys)
    parts = list((tmp_path / "cache" / ".downloads").glob("remote-*.zip.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == size // 2
    monkeypatch.setattr(download, "RETRIES", 3)
    assert main(["models", "fetch", "remote", "--progress", "none"]) == 0
    assert Handler.log[-1][1] == f"bytes={size // 2}-"
    out = json.loads(capsys.readouterr().out)
    assert out["resumed_from"] == size // 2 and out["bytes"] == size - size // 2
    assert cache_models(tmp_path) == ["remote"]


def test_server_ignoring_range_restarts_cleanly(env, tmp_path, capsys):
    env(mode="norange")
    expected = sha(Handler.files["tiny.zip"])
    downloads = tmp_path / "cache" / ".downloads"
    downloads.mkdir(parents=True)
    (downloads / f"remote-{expected[:12]}.zip.part").write_bytes(b"stale bytes from elsewhere")
    assert main(["models", "fetch", "remote", "--progress", "none"]) == 0
    assert Handler.log == [("/norange/tiny.zip", "bytes=26-")]               # asked, got a 200 instead
    assert json.loads(capsys.readouterr().out)["sha256"] == expected
    assert cache_models(tmp_path) == ["remote"]


def test_wrong_hash_is_refused_and_nothing_stays(env, tmp_path, capsys):
    env(sha256="ab" * 32)
    assert main(["models", "fetch", "remote", "--progress", "none"]) == 2
    err = one_line_error(capsys)
    assert "remote" in err and "abababababab" in err and sha(Handler.files["tiny.zip"])[:12] in err
    assert cache_models(tmp_path) == []
    with pytest.raises(DiffusionMICError, match="not downloaded"):
        resolve_model("remote")


def test_http_error_is_one_line(env, capsys):
    env(file="missing.zip", sha256="0" * 64)
    assert main(["models", "fetch", "remote", "--progress", "none"]) == 2
    err = one_line_error(capsys)
    assert "HTTP 404" in err and "models import" in err


@pytest.mark.parametrize("extra, symlink, message", [
    ({"../evil.json": b"{}"}, None, "outside"),
    ({"/abs/evil.json": b"{}"}, None, "absolute"),
    ({"tiny/weights.pt": b"\x80\x04pickle"}, None, "not .json or .safetensors"),
    ({}, "tiny/link.json", "symbolic link"),
])
def test_unsafe_zip_is_refused(env, tmp_path, capsys, model_dir, extra, symlink, message):
    bad = make_zip(model_dir, top="tiny", extra=extra, symlink=symlink)
    (tmp_path / "bad.zip").write_bytes(bad)
    assert main(["models", "import", str(tmp_path / "bad.zip")]) == 2
    assert message in one_line_error(capsys)
    Handler.files["bad.zip"] = bad                            # the same zip from the catalog, hash matching
    env(file="bad.zip")
    assert main(["models", "fetch", "remote", "--progress", "none"]) == 2
    assert message in one_line_error(capsys)
    assert cache_models(tmp_path) == [] and not (tmp_path / "evil.json").exists()


def test_import_folder_and_zip(env, tmp_path, capsys, model_dir):
    folder = tmp_path / "from-usb"
    shutil.copytree(model_dir, folder)
    (folder / "checkpoint.pt").write_bytes(b"\x80\x04pickle")    # training leftovers are not copied
    assert main(["models", "import", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "tiny" and out["skipped"] == ["checkpoint.pt"]
    assert resolve_model("tiny") == tmp_path / "cache" / "tiny"
    assert not (tmp_path / "cache" / "tiny" / "checkpoint.pt").exists()
    assert main(["models", "verify", "tiny"]) == 0
    capsys.readouterr()
    assert main(["models", "import", str(folder)]) == 0        # the same weights again: fine
    capsys.readouterr()

    (tmp_path / "root.zip").write_bytes(make_zip(model_dir))  # files at the zip root this time
    assert main(["models", "import", str(tmp_path / "root.zip"), "--name", "tiny-copy"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny-copy"
    assert resolve_model("tiny-copy") == tmp_path / "cache" / "tiny-copy"
    assert main(["models", "info", "tiny-copy"]) == 0
    capsys.readouterr()

    other = save_model(tmp_path / "other", ModelCard(
        name="tiny", task="denoise", inputs=["noisy"], outputs=["clean"],
        network=network_config(2, 1, **{**TINY_NETWORK, "channels": [16, 32]}), schedule={}),
        build_network(network_config(2, 1, **{**TINY_NETWORK, "channels": [16, 32]})))
    assert main(["models", "import", str(other)]) == 2        # a different 'tiny': not silently replaced
    assert "--force" in one_line_error(capsys)
    assert main(["models", "import", str(other), "--force"]) == 0
    assert main(["models", "import", str(folder), "--name", "../escape"]) == 2
    assert "cache folder name" in one_line_error(capsys)


def test_tampered_or_fake_weights_are_refused_on_import(env, tmp_path, capsys, model_dir):
    folder = tmp_path / "tampered"
    shutil.copytree(model_dir, folder)
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    assert main(["models", "import", str(folder)]) == 2
    assert "SHA-256" in one_line_error(capsys)
    (tmp_path / "tampered.zip").write_bytes(make_zip(folder, top="tampered"))
    assert main(["models", "import", str(tmp_path / "tampered.zip")]) == 2
    assert "SHA-256" in one_line_error(capsys)

    fake = tmp_path / "fake"                                  # a pickle renamed, card hash made to match
    shutil.copytree(model_dir, fake)
    (fake / "model.safetensors").write_bytes(b"\x80\x04\x95pickle-not-safetensors" * 8)
    card = json.loads((fake / "model.json").read_text(encoding="utf-8"))
    card["sha256"] = sha((fake / "model.safetensors").read_bytes())
    (fake / "model.json").write_text(json.dumps(card), encoding="utf-8")
    assert main(["models", "import", str(fake)]) == 2
    assert "not a valid safetensors" in one_line_error(capsys)
    assert cache_models(tmp_path) == []


def test_catalog_zip_imported_offline_counts_as_fetched(env, tmp_path, capsys, model_dir, model_zip):
    env(name="tiny")                                          # catalog name == card name
    assert main(["models", "import", str(model_dir)]) == 2    # a folder cannot stand in for a catalog download
    assert "import its .zip" in one_line_error(capsys)
    (tmp_path / "tiny.zip").write_bytes(make_zip(model_dir, top="repacked"))   # same model, other bytes
    assert main(["models", "import", str(tmp_path / "tiny.zip")]) == 2
    assert "does not match the catalog" in one_line_error(capsys)
    (tmp_path / "tiny.zip").write_bytes(model_zip)           # carried in from a machine with internet
    assert main(["models", "import", str(tmp_path / "tiny.zip")]) == 0
    capsys.readouterr()
    assert main(["models", "fetch", "tiny", "--progress", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True and Handler.log == []
